"""Splitting a table into chunks that workers copy independently: ranges of physical blocks.

Chunks serve two purposes: two workers can share one large table, and a crash loses at most one chunk's work
per worker. Every table larger than one chunk is split by block (``ctid``) ranges, whatever its key, as
pgcopydb does: a ``ctid`` range is read by a TID range scan (PostgreSQL 14+), strictly sequentially, while a
key range over random UUIDs reads the whole heap at random through the index, once per chunk. The first
chunk is open below and the last open above, so rows that land beyond the planned blocks still fall into
some chunk.

What a block range guarantees: within one exported snapshot, the ranges partition the table exactly. After
a crash, the rerun copies the missing chunks under a *new* snapshot; row positions only move when rows are
written (an UPDATE writes a new version elsewhere, VACUUM never moves a live row), so while the source is not
written — the premise of an offline migration — the new snapshot partitions the same rows the same way. If
it was written in between, a row can be missed or copied twice; verification names the tables and buckets
that differ, and the next ``run`` copies exactly those buckets again.
"""

from __future__ import annotations

import math
from typing import Any

import psycopg
from psycopg import sql

from pgferry.migrate.catalog import Table
from pgferry.migrate.state import ChunkRecord

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
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


def blocks_per_chunk(table: Table, batch_rows: int | None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """How many heap blocks make one chunk: about ``batch_rows`` rows, or about ``chunk_bytes`` of data.

    Bytes count the table's out-of-line (TOAST) values too, so a table of a few multi-megabyte rows is not
    one giant chunk just because its heap is small.
    """
    blocks = max(1, table.heap_bytes // BLOCK_SIZE)
    if batch_rows:
        rows_per_block = table.row_estimate / blocks if table.row_estimate > 0 else 1.0
        return max(1, round(batch_rows / max(rows_per_block, 1e-9)))
    bytes_per_block = max(table.table_bytes, table.heap_bytes) / blocks
    return max(1, int(chunk_bytes / max(bytes_per_block, 1.0)))


def count_chunks(table: Table, batch_rows: int | None) -> int:
    """How many chunks :func:`plan_table_chunks` will make (for the plan, without touching the server)."""
    blocks = table.heap_bytes // BLOCK_SIZE
    if blocks <= 1:
        return 1
    return max(1, math.ceil(blocks / blocks_per_chunk(table, batch_rows)))


def plan_table_chunks(
    conn: psycopg.Connection[Any], table: Table, *, batch_rows: int | None = None
) -> list[ChunkRecord]:
    """Block ranges covering ``table`` on the source behind ``conn`` (one ``whole`` chunk when small)."""
    row = conn.execute(
        "select pg_relation_size(to_regclass(%s)), current_setting('server_version_num')::int",
        (sql.Identifier(table.schema, table.name).as_string(conn),),
    ).fetchone()
    blocks = int(row[0]) // BLOCK_SIZE if row and row[0] is not None else 0
    supports_tid_range_scans = bool(row and int(row[1]) >= 140000)
    per_chunk = blocks_per_chunk(table, batch_rows)
    if blocks <= 1 or per_chunk >= blocks or not supports_tid_range_scans:
        # Before PostgreSQL 14 a ctid range is a full scan with a filter, so one chunk per table is faster.
        return [ChunkRecord(table.schema, table.name, 0, "whole", None, None)]
    bounds = list(range(per_chunk, blocks, per_chunk))
    edges: list[int | None] = [None, *bounds, None]
    return [
        ChunkRecord(
            table.schema,
            table.name,
            i,
            "ctid",
            None if edges[i] is None else (str(edges[i]),),
            None if edges[i + 1] is None else (str(edges[i + 1]),),
        )
        for i in range(len(edges) - 1)
    ]


def chunk_predicate(chunk: ChunkRecord) -> sql.Composable:
    """The WHERE clause selecting exactly this chunk's rows."""
    if chunk.kind == "whole":
        return sql.SQL("true")
    if chunk.kind != "ctid":
        raise ValueError(f"chunk kind {chunk.kind!r} is not one this version of pgferry copies")
    parts: list[sql.Composable] = []
    if chunk.lower is not None:
        parts.append(sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({chunk.lower[0]},0)")))
    if chunk.upper is not None:
        parts.append(sql.SQL("ctid < {}::tid").format(sql.Literal(f"({chunk.upper[0]},0)")))
    return sql.SQL(" and ").join(parts) if parts else sql.SQL("true")
