"""Server-side table checksums: the one way pgferry decides whether two tables hold the same rows.

Seeding tests, the migration verifier and benchmarks all need to ask "is the data on the target exactly the
data on the source?" for tables far too large to pull into Python. Keeping a single mechanism here means
a test that trusts ``compare_tables`` is also testing what the verifier will trust in production.

How the digest is built, and why:

* Each row is rendered to text by PostgreSQL itself (``row(c1, c2, ...)::text``) and hashed with ``md5``.
  Text output is exact for every type the platform uses: floats and pgvector values print in
  shortest-round-trip form, numerics keep their scale, bytea is hex, jsonb is its canonical text. Session
  settings that change text output (time zone, date and interval style, float digits, bytea format) are
  pinned for the duration of the query, so two servers configured differently still agree.
* Columns are taken in name order, not physical order. A table that grew by ``ALTER TABLE ... ADD COLUMN``
  on Neon and the same table created in one statement by a Supabase migration have the same rows but may
  have different column orders; they must checksum equal.
* Row hashes are combined by *summing* the two 64-bit halves of each md5 (as exact ``numeric``), then the
  row count and both sums are hashed once more. Summing is order-independent, so no sort, no ordered
  ``string_agg`` and no memory that grows with the table; it works the same for tables without a primary
  key, and PostgreSQL can run it as a parallel aggregate. Unlike XOR, duplicate rows do not cancel out.
* A key range ``[lower, upper)`` over the key columns (the primary key unless told otherwise) lets a
  verifier checksum a large table chunk by chunk, re-checking only the chunks that differ. The range is a
  row comparison on the key columns, which the primary-key index serves directly.

Identifiers are always quoted with :class:`psycopg.sql.Identifier`; table and column names never reach the
SQL text any other way.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgferry.errors import PgferryError

__all__ = [
    "ChecksumError",
    "TableChecksum",
    "TableDiff",
    "compare_tables",
    "primary_key_columns",
    "table_checksum",
    "table_columns",
]

PINNED_SETTINGS: tuple[tuple[str, str], ...] = (
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
)
"""Settings that change how values print; pinned so the row text, hence the digest, is server-independent."""


class ChecksumError(PgferryError):
    """A checksum could not be computed as asked (missing table, unknown column, malformed key range)."""


@dataclass(frozen=True)
class TableChecksum:
    """What a table (or a key range of it) contains, reduced to a row count and a digest.

    Two checksums are equal exactly when the row multisets are equal (up to md5 collisions), regardless of
    physical row order, column order or the server's output settings.
    """

    table: str
    row_count: int
    digest: str


@dataclass(frozen=True)
class TableDiff:
    """The same table checksummed on two databases; ``matches`` is the verdict a verifier acts on."""

    table: str
    source: TableChecksum
    target: TableChecksum

    @property
    def matches(self) -> bool:
        return self.source.row_count == self.target.row_count and self.source.digest == self.target.digest

    def describe(self) -> str:
        verdict = "identical" if self.matches else "DIFFERENT"
        return (
            f"{self.table}: {verdict} (source {self.source.row_count} rows {self.source.digest}, "
            f"target {self.target.row_count} rows {self.target.digest})"
        )


def _relation_oid(conn: psycopg.Connection[Any], schema: str, table: str) -> int:
    row = conn.execute(
        """
        select c.oid::int8
        from pg_catalog.pg_class c
        join pg_catalog.pg_namespace n on n.oid = c.relnamespace
        where n.nspname = %s and c.relname = %s and c.relkind in ('r', 'p', 'v', 'm', 'f')
        """,
        (schema, table),
    ).fetchone()
    if row is None:
        raise ChecksumError(f"table {schema}.{table} does not exist")
    return int(row[0])


def table_columns(conn: psycopg.Connection[Any], table: str, *, schema: str = "public") -> list[str]:
    """The table's live columns in name (code point) order, the order the digest hashes them in."""
    oid = _relation_oid(conn, schema, table)
    rows = conn.execute(
        """
        select attname::text from pg_catalog.pg_attribute
        where attrelid = %s::oid and attnum > 0 and not attisdropped
        """,
        (oid,),
    ).fetchall()
    # Sorted in Python: the order must not depend on the server's collation.
    return sorted(str(r[0]) for r in rows)


BINARY_HASHED_TYPES = frozenset({"vector", "halfvec", "sparsevec"})
"""Types hashed through their binary send function rather than their text form.

Printing a 1536-dimension vector as text formats 1536 floats and costs about five times more than hashing
its binary form, which is a fixed, server-independent layout (dimensions, then IEEE floats in network
order); on the platform's tables that is most of a verification's time. Exactness is unchanged: equal
binary forms are equal vectors.
"""


def _hash_expressions(
    conn: psycopg.Connection[Any], schema: str, table: str, columns: Sequence[str]
) -> list[sql.Composable]:
    oid = _relation_oid(conn, schema, table)
    senders = {
        str(name): str(send)
        for name, typname, send in conn.execute(
            """
            select a.attname::text, t.typname::text, t.typsend::regprocedure::oid::regproc::text
            from pg_catalog.pg_attribute a join pg_catalog.pg_type t on t.oid = a.atttypid
            where a.attrelid = %s::oid and a.attnum > 0 and not a.attisdropped
            """,
            (oid,),
        ).fetchall()
        if typname in BINARY_HASHED_TYPES or typname == "bytea"
    }
    expressions: list[sql.Composable] = []
    for column in columns:
        if senders.get(column) == "byteasend":
            # bytea prints as hex, twice its size; its md5 is taken over the bytes themselves.
            expressions.append(sql.SQL("pg_catalog.md5({})").format(sql.Identifier(column)))
        elif column in senders:
            # regproc text is already quoted/qualified as needed for this session's search_path.
            expressions.append(
                sql.SQL("pg_catalog.md5({}({}))").format(sql.SQL(senders[column]), sql.Identifier(column))
            )
        else:
            expressions.append(sql.Identifier(column))
    return expressions


def primary_key_columns(conn: psycopg.Connection[Any], table: str, *, schema: str = "public") -> list[str]:
    """The primary key's columns in key order; empty when the table has no primary key."""
    oid = _relation_oid(conn, schema, table)
    rows = conn.execute(
        """
        select a.attname::text
        from pg_catalog.pg_index i
        cross join lateral unnest(i.indkey) with ordinality as k(attnum, ord)
        join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
        where i.indrelid = %s::oid and i.indisprimary
        order by k.ord
        """,
        (oid,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _range_condition(
    key_columns: Sequence[str], lower: Sequence[Any] | None, upper: Sequence[Any] | None
) -> tuple[sql.Composable, list[Any]]:
    keys = sql.SQL("({})").format(sql.SQL(", ").join(sql.Identifier(c) for c in key_columns))
    conditions: list[sql.Composable] = []
    params: list[Any] = []
    for bound, op in ((lower, ">="), (upper, "<")):
        if bound is None:
            continue
        if len(bound) != len(key_columns):
            raise ChecksumError(
                f"key range bound has {len(bound)} values but the key has {len(key_columns)} columns "
                f"({', '.join(key_columns)})"
            )
        placeholders = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * len(bound)))
        conditions.append(sql.SQL("{} {} {}").format(keys, sql.SQL(op), placeholders))
        params.extend(bound)
    if not conditions:
        return sql.SQL(""), []
    return sql.SQL(" where ") + sql.SQL(" and ").join(conditions), params


def table_checksum(
    conn: psycopg.Connection[Any],
    table: str,
    *,
    schema: str = "public",
    key_columns: Sequence[str] | None = None,
    lower: Sequence[Any] | None = None,
    upper: Sequence[Any] | None = None,
    columns: Sequence[str] | None = None,
) -> TableChecksum:
    """Row count and digest of ``schema.table``, or of the rows whose key lies in ``[lower, upper)``.

    ``key_columns`` defaults to the primary key and only matters when a bound is given: the digest itself
    is order-independent. ``columns`` restricts which columns are hashed (default: all of them), for a
    verifier that must ignore columns only one side has. The query runs inside the caller's transaction
    (as a savepoint if one is open), so a verifier can checksum many chunks against one snapshot.
    """
    if (lower is not None or upper is not None) and key_columns is None:
        key_columns = primary_key_columns(conn, table, schema=schema)
        if not key_columns:
            raise ChecksumError(f"table {schema}.{table} has no primary key; pass key_columns to checksum a key range")
    live = table_columns(conn, table, schema=schema)
    hashed = sorted(columns) if columns is not None else live
    if not hashed:
        raise ChecksumError(f"table {schema}.{table} has no columns to checksum")
    unknown = [c for c in [*hashed, *(key_columns or ())] if c not in set(live)]
    if unknown:
        raise ChecksumError(f"table {schema}.{table} has no column(s) {', '.join(unknown)}")

    where, params = _range_condition(key_columns or (), lower, upper)
    query = sql.SQL(
        """
        select count(*)::int8,
               pg_catalog.md5(
                   count(*)::text
                   || ':' || coalesce(sum(('x' || substr(h, 1, 16))::bit(64)::int8), 0)::text
                   || ':' || coalesce(sum(('x' || substr(h, 17, 16))::bit(64)::int8), 0)::text
               )
        from (select pg_catalog.md5(row({columns})::text) as h from {table}{where}) as hashed_rows
        """
    ).format(
        columns=sql.SQL(", ").join(_hash_expressions(conn, schema, table, hashed)),
        table=sql.Identifier(schema, table),
        where=where,
    )
    with conn.transaction():
        previous = _pin_settings(conn)
        row = conn.execute(query, params).fetchone()
        _restore_settings(conn, previous)
    assert row is not None
    return TableChecksum(table=table, row_count=int(row[0]), digest=str(row[1]))


def _pin_settings(conn: psycopg.Connection[Any]) -> list[str]:
    names = [name for name, _ in PINNED_SETTINGS]
    previous = conn.execute(
        sql.SQL("select {}").format(
            sql.SQL(", ").join(sql.SQL("current_setting({})").format(sql.Literal(n)) for n in names)
        )
    ).fetchone()
    assert previous is not None
    _set_local(conn, PINNED_SETTINGS)
    return [str(v) for v in previous]


def _restore_settings(conn: psycopg.Connection[Any], previous: Sequence[str]) -> None:
    # ``set local`` survives a released savepoint until the outer transaction ends; put the caller's values
    # back so checksumming inside their transaction does not change how their later queries print values.
    _set_local(conn, tuple(zip((n for n, _ in PINNED_SETTINGS), previous, strict=True)))


def _set_local(conn: psycopg.Connection[Any], settings: Sequence[tuple[str, str]]) -> None:
    conn.execute(
        sql.SQL("select {}").format(sql.SQL(", ").join(sql.SQL("set_config(%s, %s, true)") for _ in settings)),
        [v for pair in settings for v in pair],
    )


def compare_tables(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    tables: Sequence[str],
    schema: str = "public",
) -> list[TableDiff]:
    """Checksum each table on both sides; one :class:`TableDiff` per table, in the order given.

    Both sides hash the *source's* columns: the question is whether the target holds the source's data, so
    a column only the target has (added by a Supabase migration) is not a difference, while a column the
    target lacks fails loudly with :class:`ChecksumError` naming it.

    The two sides are computed concurrently (each on its own connection), since every checksum is a full
    scan on its server and waiting for them one after the other would double the time a verifier takes.
    For a consistent multi-table picture, open a repeatable-read transaction on each connection first.
    """
    if source is target:
        raise ChecksumError("compare_tables needs two different connections")
    diffs: list[TableDiff] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgferry-checksum") as pool:
        for table in tables:
            columns = table_columns(source, table, schema=schema)
            remote = pool.submit(table_checksum, target, table, schema=schema, columns=columns)
            local = table_checksum(source, table, schema=schema, columns=columns)
            diffs.append(TableDiff(table=table, source=local, target=remote.result()))
    return diffs
