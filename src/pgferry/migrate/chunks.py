"""Splitting a table into chunks that workers copy (and the verifier checks) independently.

Chunks serve three purposes: two workers can share one large table, a crash loses at most one chunk's work
per worker, and a verification mismatch points at a key range rather than "somewhere in tasks". Boundaries
only need to partition the key space: the first chunk is open below and the last open above, so rows
inserted after planning still fall into some chunk.

- Integer single-column keys are split arithmetically between min and max (no scan).
- Any other key (uuid, text, composite) is split at every n-th key in index order (one index-only scan).
- Tables without a primary key are split by physical block ranges (``ctid``), which PostgreSQL 14+ scans
  directly; ``ctid`` is stable within one snapshot, which is what a consistent copy reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from pgferry.migrate.catalog import Table
from pgferry.migrate.state import ChunkRecord

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
MIN_CHUNK_ROWS = 1_000
INTEGER_TYPES = {"smallint", "integer", "bigint"}
BLOCK_SIZE = 8192
VALUE_SETTINGS: tuple[tuple[str, str], ...] = (
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
)
"""How values are written as text (text COPY, chunk bounds) and read back: pinned on both servers, so that a
database's own settings (a Neon database with ``DateStyle = 'SQL, DMY'``) cannot change or reject the data."""


def pin_value_settings(conn: psycopg.Connection[Any]) -> None:
    """Set :data:`VALUE_SETTINGS` until the end of the caller's transaction."""
    conn.execute(
        "select " + ", ".join("set_config(%s, %s, true)" for _ in VALUE_SETTINGS),
        [v for pair in VALUE_SETTINGS for v in pair],
    )


def rows_per_chunk(table: Table, batch_rows: int | None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    if batch_rows:
        return max(1, batch_rows)
    if table.avg_row_bytes <= 0:
        return 1_000_000
    return max(MIN_CHUNK_ROWS, int(chunk_bytes / table.avg_row_bytes))


def _ident(table: Table) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(table.schema), sql.Identifier(table.name))


def plan_table_chunks(
    conn: psycopg.Connection[Any], table: Table, *, batch_rows: int | None = None
) -> list[ChunkRecord]:
    per_chunk = rows_per_chunk(table, batch_rows)
    wanted = math.ceil(table.row_estimate / per_chunk) if table.row_estimate else 1
    if wanted <= 1:
        return [ChunkRecord(table.schema, table.name, 0, "whole", None, None)]
    if table.primary_key:
        key_types = {c.name: c.type_sql for c in table.columns}
        if len(table.primary_key) == 1 and key_types[table.primary_key[0]] in INTEGER_TYPES:
            return _integer_chunks(conn, table, wanted)
        return _sampled_key_chunks(conn, table, per_chunk)
    return _ctid_chunks(conn, table, wanted)


def _from_bounds(table: Table, kind: str, bounds: Sequence[tuple[str, ...]]) -> list[ChunkRecord]:
    """Chunks between consecutive bounds, open at both ends."""
    edges: list[tuple[str, ...] | None] = [None, *bounds, None]
    return [ChunkRecord(table.schema, table.name, i, kind, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _integer_chunks(conn: psycopg.Connection[Any], table: Table, wanted: int) -> list[ChunkRecord]:
    key = sql.Identifier(table.primary_key[0])
    row = conn.execute(sql.SQL("select min({k}), max({k}) from {t}").format(k=key, t=_ident(table))).fetchone()
    if row is None or row[0] is None:
        return [ChunkRecord(table.schema, table.name, 0, "whole", None, None)]
    low, high = int(row[0]), int(row[1])
    step = max(1, math.ceil((high - low + 1) / wanted))
    bounds = [(str(b),) for b in range(low + step, high + 1, step)]
    return _from_bounds(table, "key", bounds)


def _sampled_key_chunks(conn: psycopg.Connection[Any], table: Table, per_chunk: int) -> list[ChunkRecord]:
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in table.primary_key)
    as_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in table.primary_key)
    query = sql.SQL(
        "select {as_text} from (select {keys}, row_number() over (order by {keys}) as pgferry_rn from {t}) s "
        "where pgferry_rn % {step} = 1 and pgferry_rn > 1 order by {keys}"
    ).format(as_text=as_text, keys=keys, t=_ident(table), step=sql.Literal(per_chunk))
    with conn.transaction():
        pin_value_settings(conn)  # bounds are read back as typed literals, on both servers
        bounds = [tuple(str(v) for v in r) for r in conn.execute(query).fetchall()]
    if not bounds:
        return [ChunkRecord(table.schema, table.name, 0, "whole", None, None)]
    return _from_bounds(table, "key", bounds)


def _ctid_chunks(conn: psycopg.Connection[Any], table: Table, wanted: int) -> list[ChunkRecord]:
    row = conn.execute(sql.SQL("select pg_relation_size({})").format(sql.Literal(f"{_quoted(table)}"))).fetchone()
    blocks = int(row[0]) // BLOCK_SIZE if row else 0
    if blocks <= 1:
        return [ChunkRecord(table.schema, table.name, 0, "whole", None, None)]
    step = max(1, math.ceil(blocks / wanted))
    bounds = [(str(b),) for b in range(step, blocks, step)]
    return _from_bounds(table, "ctid", bounds)


def _quoted(table: Table) -> str:
    return '"{}"."{}"'.format(table.schema.replace('"', '""'), table.name.replace('"', '""'))


def chunk_predicate(chunk: ChunkRecord, key_columns: tuple[str, ...], key_types: dict[str, str]) -> sql.Composable:
    """The WHERE clause selecting exactly this chunk's rows, with bounds as typed literals."""
    if chunk.kind == "whole":
        return sql.SQL("true")
    parts: list[sql.Composable] = []
    if chunk.kind == "ctid":
        if chunk.lower is not None:
            parts.append(sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({chunk.lower[0]},0)")))
        if chunk.upper is not None:
            parts.append(sql.SQL("ctid < {}::tid").format(sql.Literal(f"({chunk.upper[0]},0)")))
        return sql.SQL(" and ").join(parts) if parts else sql.SQL("true")
    keys = sql.SQL("({})").format(sql.SQL(", ").join(sql.Identifier(k) for k in key_columns))

    def literal_row(values: tuple[str, ...]) -> sql.Composable:
        return sql.SQL("({})").format(
            sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(v), sql.SQL(key_types[k]))
                for k, v in zip(key_columns, values, strict=True)
            )
        )

    if chunk.lower is not None:
        parts.append(sql.SQL("{} >= {}").format(keys, literal_row(chunk.lower)))
    if chunk.upper is not None:
        parts.append(sql.SQL("{} < {}").format(keys, literal_row(chunk.upper)))
    return sql.SQL(" and ").join(parts) if parts else sql.SQL("true")
