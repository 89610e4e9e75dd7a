"""Shared setup for migration tests: a seeded source, a service, and checks that the move was exact."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql

from pgferry.config import parse_database_url
from pgferry.migrate import Migration, MigrationOptions, ProgressReporter
from pgferry.migrate.catalog import TableFilter
from pgferry.sampledata import TestDataManager
from pgferry.schema.models import PLATFORM_TABLES


def seed_source(url: str, scale: float = 0.03, seed: int = 11) -> TestDataManager:
    manager = TestDataManager(url, seed=seed)
    manager.seed(scale)
    return manager


def service_for(
    source_url: str, target_url: str, *, reporter: ProgressReporter | None = None, **options: Any
) -> Migration:
    table_filter = options.pop("table_filter", TableFilter())
    return Migration(
        MigrationOptions(
            source_url=parse_database_url(source_url, "--source"),
            target_url=parse_database_url(target_url, "--target"),
            table_filter=table_filter,
            **options,
        ),
        reporter,
    )


ORACLE_SETTINGS = (
    "set TimeZone = 'UTC'; set DateStyle = 'ISO, YMD'; set IntervalStyle = 'postgres'; "
    "set extra_float_digits = 3; set bytea_output = 'hex'"
)


def _sorted_row_texts(conn: psycopg.Connection[Any], schema: str, table: str, columns: list[str]) -> Iterator[str]:
    """Every row of the table as PostgreSQL prints it, in byte order, streamed (a server-side cursor)."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    query = sql.SQL('select row({cols})::text collate "C" as r from {t} order by 1').format(
        cols=cols, t=sql.Identifier(schema, table)
    )
    with conn.transaction(), conn.cursor(name=f"oracle_{table}") as cur:
        cur.itersize = 500
        cur.execute(query)
        for (text,) in cur:
            yield str(text)


def assert_same_rows(
    source_url: str, target_url: str, tables: Sequence[str] = PLATFORM_TABLES, schema: str = "public"
) -> None:
    """The independent oracle for migration tests: both sides' rows, printed and sorted, compared one by one.

    It shares nothing with the verifier (no digests, no aggregation, no key ranges): a duplicated row, a
    missing row or a changed value shows up as the first pair of lines that differ.
    """
    with psycopg.connect(source_url) as src, psycopg.connect(target_url) as tgt:
        for conn in (src, tgt):
            conn.execute(ORACLE_SETTINGS)
        for table in tables:
            columns = sorted(
                str(r[0])
                for r in src.execute(
                    "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0 "
                    "and not attisdropped",
                    (sql.Identifier(schema, table).as_string(src),),
                )
            )
            left = _sorted_row_texts(src, schema, table, columns)
            right = _sorted_row_texts(tgt, schema, table, columns)
            count = 0
            for count, (a, b) in enumerate(itertools.zip_longest(left, right), start=1):
                if a != b:
                    raise AssertionError(
                        f"{schema}.{table} differs at sorted row {count}: source {_clip(a)} vs target {_clip(b)}"
                    )


def _clip(text: str | None) -> str:
    if text is None:
        return "<no row>"
    return text if len(text) <= 200 else text[:200] + f"… ({len(text)} chars)"
