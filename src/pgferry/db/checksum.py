"""Server-side table digests: the one way pgferry decides whether two tables hold the same rows.

Seeding tests, the migration verifier and benchmarks all need to ask "is the data on the target exactly the
data on the source?" for tables far too large to pull into Python. Keeping a single mechanism here means
a test that trusts ``compare_tables`` is also testing what the verifier will trust in production.

How a digest is built, and why:

* Each row is rendered to text by PostgreSQL itself (``row(c1, c2, ...)::text``). Text output is exact for
  every type the platform uses: floats print in shortest-round-trip form (``-0``, ``NaN`` and ``Infinity``
  included), numerics keep their scale, jsonb is its canonical text, json keeps its bytes. Session
  settings that change text output (time zone, date and interval style, float digits, bytea format) are
  pinned for the duration of the query, so two servers configured differently still agree. Wide binary
  values (pgvector types, bytea) enter the row text as the md5 of their binary form: printing a
  1536-dimension vector as text costs about five times more than hashing its bytes, and equal bytes are
  equal values.
* Columns are taken in name order, not physical order. A table that grew by ``ALTER TABLE ... ADD COLUMN``
  on Neon and the same table created in one statement by a Supabase migration have the same rows but may
  have different column orders; they must digest equal.
* Each row text is hashed twice to 64 bits (``hashtextextended`` with two seeds: one pass over bytes already
  in memory, several times cheaper than md5 plus a hex-to-integer conversion), and the hashes are *summed*
  (exact ``numeric``) with the row count. Summing is order-independent, so no sort and no memory that grows
  with the table, and it works the same for tables without a key. Unlike XOR, duplicate rows do not cancel.
  ``hashtextextended`` is stable across PostgreSQL 11+ on the same byte order; :func:`hash_method_for` checks
  that two servers agree and falls back to md5 (slower, the same everywhere) when they do not.
* Rows are spread over ``buckets`` by a hash of their key (or, without a key, of the row itself): one
  sequential scan per table gives a digest per bucket, so a difference is localised to a bucket rather than
  "somewhere in tasks", and :func:`bucket_rows` can then list the exact rows of the few buckets that differ.
  Identical rows always share a bucket, which is what makes buckets work for keyless tables and duplicates.

Identifiers are always quoted with :class:`psycopg.sql.Identifier`; table and column names never reach the
SQL text any other way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg import sql

from pgferry.errors import PgferryError

__all__ = [
    "BucketDigest",
    "ChecksumError",
    "HashMethod",
    "TableChecksum",
    "TableDiff",
    "TableDigests",
    "bucket_expression",
    "bucket_rows",
    "compare_tables",
    "hash_method_for",
    "pin_output_settings",
    "primary_key_columns",
    "row_text_expression",
    "table_checksum",
    "table_columns",
    "table_digests",
]

HashMethod = Literal["hashtext", "md5"]

PINNED_SETTINGS: tuple[tuple[str, str], ...] = (
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
)
"""Settings that change how values print; pinned so the row text, hence the digest, is server-independent."""

MAX_BUCKETS = 1 << 16


class ChecksumError(PgferryError):
    """A checksum could not be computed as asked (missing table, unknown column, malformed key range)."""


@dataclass(frozen=True)
class BucketDigest:
    """The rows of one bucket reduced to their count and two 64-bit hash sums."""

    rows: int
    sum_a: int
    sum_b: int


@dataclass(frozen=True)
class TableDigests:
    """A table (or part of it) as per-bucket digests; two are equal exactly when the row multisets are."""

    table: str
    buckets: int
    method: HashMethod
    by_bucket: dict[int, BucketDigest] = field(default_factory=dict)

    @property
    def row_count(self) -> int:
        return sum(d.rows for d in self.by_bucket.values())

    def differing_buckets(self, other: TableDigests) -> list[int]:
        """Buckets whose rows differ between ``self`` and ``other`` (computed with the same layout)."""
        if (self.buckets, self.method) != (other.buckets, other.method):
            raise ChecksumError("digests with different bucket counts or hash methods cannot be compared")
        empty = BucketDigest(0, 0, 0)
        return sorted(
            b
            for b in set(self.by_bucket) | set(other.by_bucket)
            if self.by_bucket.get(b, empty) != other.by_bucket.get(b, empty)
        )

    def digest(self) -> str:
        """One text digest of the whole table, independent of the bucket layout."""
        rows = self.row_count
        a = sum(d.sum_a for d in self.by_bucket.values())
        b = sum(d.sum_b for d in self.by_bucket.values())
        return f"{self.method}:{rows}:{a}:{b}"


@dataclass(frozen=True)
class TableChecksum:
    """What a table (or a key range of it) contains, reduced to a row count and a digest.

    Two checksums are equal exactly when the row multisets are equal (up to hash collisions), regardless of
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


def _column_expressions(
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


def row_text_expression(
    conn: psycopg.Connection[Any], table: str, *, schema: str = "public", columns: Sequence[str] | None = None
) -> sql.Composable:
    """``row(...)::text`` over ``columns`` (default: all) in name order, wide binary values as their md5."""
    live = table_columns(conn, table, schema=schema)
    hashed = sorted(columns) if columns is not None else live
    if not hashed:
        raise ChecksumError(f"table {schema}.{table} has no columns to checksum")
    unknown = [c for c in hashed if c not in set(live)]
    if unknown:
        raise ChecksumError(f"table {schema}.{table} has no column(s) {', '.join(unknown)}")
    expressions = _column_expressions(conn, schema, table, hashed)
    return sql.SQL("row({})::text").format(sql.SQL(", ").join(expressions))


def _hash64(text: sql.Composable, seed: int, method: HashMethod) -> sql.Composable:
    if method == "hashtext":
        return sql.SQL("pg_catalog.hashtextextended({}, {})").format(text, sql.Literal(seed))
    # 16 hex digits of an md5 (a different part per seed) read as a signed 64-bit integer.
    return sql.SQL("('x' || substr(pg_catalog.md5({}), {}, 16))::bit(64)::int8").format(
        text, sql.Literal(1 + 16 * (seed % 2))
    )


def _key_text(key_columns: Sequence[str]) -> sql.Composable:
    if len(key_columns) == 1:
        return sql.SQL("{}::text").format(sql.Identifier(key_columns[0]))
    return sql.SQL("row({})::text").format(sql.SQL(", ").join(sql.Identifier(c) for c in key_columns))


def _bucket_of(identity: sql.Composable, buckets: int, method: HashMethod, *, hashed: bool) -> sql.Composable:
    """``0 .. buckets-1`` from a row's identity: a key's text (hashed here) or a row hash already computed."""
    _check_buckets(buckets)
    if buckets == 1:
        return sql.SQL("0")
    value = identity if hashed else _hash64(identity, 2, method)
    return sql.SQL("({} & {})").format(value, sql.Literal(buckets - 1))


def bucket_expression(
    conn: psycopg.Connection[Any],
    table: str,
    *,
    schema: str = "public",
    columns: Sequence[str] | None = None,
    key_columns: Sequence[str] | None,
    buckets: int,
    method: HashMethod = "hashtext",
) -> sql.Composable:
    """The bucket of a row of ``table`` as an expression over its columns, for ``WHERE`` clauses.

    The same bucket :func:`table_digests` puts the row in, so rows of differing buckets can be selected on
    both servers (to show them, or to copy them again).
    """
    if key_columns:
        return _bucket_of(_key_text(key_columns), buckets, method, hashed=False)
    row_text = row_text_expression(conn, table, schema=schema, columns=columns)
    return _bucket_of(_hash64(row_text, 0, method), buckets, method, hashed=True)


def _check_buckets(buckets: int) -> None:
    if buckets < 1 or buckets > MAX_BUCKETS or buckets & (buckets - 1):
        raise ChecksumError(f"buckets must be a power of two between 1 and {MAX_BUCKETS}, not {buckets}")


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
) -> tuple[list[sql.Composable], list[Any]]:
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
    return conditions, params


def table_digests(
    conn: psycopg.Connection[Any],
    table: str,
    *,
    schema: str = "public",
    columns: Sequence[str] | None = None,
    key_columns: Sequence[str] | None = None,
    buckets: int = 1,
    method: HashMethod = "hashtext",
    conditions: Sequence[sql.Composable] = (),
    params: Sequence[Any] = (),
) -> TableDigests:
    """Per-bucket digests of ``schema.table`` in one sequential scan.

    Rows are bucketed by ``key_columns`` (or by their own hash when ``None``/empty). ``columns`` restricts
    which columns are hashed (default: all of them), for a verifier that must ignore columns only one side
    has. The query runs inside the caller's transaction (as a savepoint if one is open), so a verifier can
    digest many tables against one snapshot.
    """
    row_text = row_text_expression(conn, table, schema=schema, columns=columns)
    if key_columns:
        live = set(table_columns(conn, table, schema=schema))
        unknown = [c for c in key_columns if c not in live]
        if unknown:
            raise ChecksumError(f"table {schema}.{table} has no column(s) {', '.join(unknown)}")
    where = sql.SQL(" where ") + sql.SQL(" and ").join(conditions) if conditions else sql.SQL("")
    key = _key_text(key_columns) if key_columns else sql.SQL("null::text")
    if key_columns:
        bucket = _bucket_of(sql.Identifier("k"), buckets, method, hashed=False)
    else:
        bucket = _bucket_of(sql.Identifier("a"), buckets, method, hashed=True)
    # OFFSET 0 keeps the row text (the expensive part) from being rendered once per reference to it.
    query = sql.SQL(
        """
        select bucket, count(*)::int8, coalesce(sum(a), 0)::text, coalesce(sum(b), 0)::text
        from (
            select {bucket} as bucket, a, b
            from (select {hash_a} as a, {hash_b} as b, k
                  from (select {row_text} as r, {key} as k from only {table}{where} offset 0) as rendered
                  offset 0) as hashed
        ) as bucketed
        group by bucket
        """
    ).format(
        bucket=bucket,
        hash_a=_hash64(sql.Identifier("r"), 0, method),
        hash_b=_hash64(sql.Identifier("r"), 1, method),
        row_text=row_text,
        key=key,
        table=sql.Identifier(schema, table),
        where=where,
    )
    with conn.transaction():
        previous = _pin_settings(conn)
        rows = conn.execute(query, list(params)).fetchall()
        _restore_settings(conn, previous)
    return TableDigests(
        table=table,
        buckets=buckets,
        method=method,
        by_bucket={int(r[0]): BucketDigest(int(r[1]), int(r[2]), int(r[3])) for r in rows},
    )


def bucket_rows(
    conn: psycopg.Connection[Any],
    table: str,
    bucket_numbers: Sequence[int],
    *,
    schema: str = "public",
    columns: Sequence[str] | None = None,
    key_columns: Sequence[str] | None = None,
    buckets: int,
    method: HashMethod = "hashtext",
) -> Iterator[tuple[str, int, str]]:
    """``(identity, row hash, row text clipped)`` of every row in ``bucket_numbers``, sorted by identity.

    The identity is the key's text, or the row's own hash for a keyless table (so equal rows sort together).
    Streamed through a server-side cursor: a verifier walks both sides in step to name the rows that differ.
    """
    row_text = row_text_expression(conn, table, schema=schema, columns=columns)
    hash_a = _hash64(sql.Identifier("r"), 0, method)
    if key_columns:
        bucket = _bucket_of(sql.Identifier("k"), buckets, method, hashed=False)
        ident: sql.Composable = sql.Identifier("k")
    else:
        bucket = _bucket_of(sql.Identifier("a"), buckets, method, hashed=True)
        ident = sql.SQL("a::text")
    key = _key_text(key_columns) if key_columns else sql.SQL("null::text")
    query = sql.SQL(
        """
        select {ident} collate "C", a, left(r, 300)
        from (select {hash_a} as a, r, k
              from (select {row_text} as r, {key} as k from only {table} offset 0) as rendered offset 0) as hashed
        where {bucket} = any(%s)
        order by 1, 2
        """
    ).format(ident=ident, hash_a=hash_a, row_text=row_text, key=key, table=sql.Identifier(schema, table), bucket=bucket)
    with conn.transaction():
        previous = _pin_settings(conn)
        with conn.cursor(name=f"pgferry_bucket_rows_{id(conn)}") as cur:
            cur.itersize = 2000
            cur.execute(query, (list(bucket_numbers),))
            for ident_text, row_hash, clipped in cur:
                yield str(ident_text), int(row_hash), str(clipped)
        _restore_settings(conn, previous)


def hash_method_for(*conns: psycopg.Connection[Any]) -> HashMethod:
    """``hashtext`` when every server hashes a probe the same way, else ``md5`` (portable, slower)."""
    probes = set()
    for conn in conns:
        row = conn.execute("select pg_catalog.hashtextextended('pgferry: hash probe ✓', 0)").fetchone()
        probes.add(None if row is None else int(row[0]))
    return "hashtext" if len(probes) == 1 else "md5"


def table_checksum(
    conn: psycopg.Connection[Any],
    table: str,
    *,
    schema: str = "public",
    key_columns: Sequence[str] | None = None,
    lower: Sequence[Any] | None = None,
    upper: Sequence[Any] | None = None,
    columns: Sequence[str] | None = None,
    method: HashMethod = "hashtext",
) -> TableChecksum:
    """Row count and digest of ``schema.table``, or of the rows whose key lies in ``[lower, upper)``.

    ``key_columns`` defaults to the primary key and only matters when a bound is given: the digest itself
    is order-independent.
    """
    conditions: list[sql.Composable] = []
    params: list[Any] = []
    if lower is not None or upper is not None:
        if key_columns is None:
            key_columns = primary_key_columns(conn, table, schema=schema)
            if not key_columns:
                raise ChecksumError(
                    f"table {schema}.{table} has no primary key; pass key_columns to checksum a key range"
                )
        conditions, params = _range_condition(key_columns, lower, upper)
    digests = table_digests(
        conn, table, schema=schema, columns=columns, method=method, conditions=conditions, params=params
    )
    return TableChecksum(table=table, row_count=digests.row_count, digest=digests.digest())


def pin_output_settings(conn: psycopg.Connection[Any]) -> None:
    """Pin :data:`PINNED_SETTINGS` until the end of the caller's transaction (``set local``).

    For callers that run their own statements over :func:`bucket_expression` or :func:`row_text_expression`
    and must print values exactly as the digests do.
    """
    _set_local(conn, PINNED_SETTINGS)


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
    method = hash_method_for(source, target)
    diffs: list[TableDiff] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgferry-checksum") as pool:
        for table in tables:
            columns = table_columns(source, table, schema=schema)
            remote = pool.submit(table_checksum, target, table, schema=schema, columns=columns, method=method)
            local = table_checksum(source, table, schema=schema, columns=columns, method=method)
            diffs.append(TableDiff(table=table, source=local, target=remote.result()))
    return diffs
