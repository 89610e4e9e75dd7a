"""Verification: proving the target holds the source's rows, chunk by chunk, computed on the servers.

Each chunk that was copied by key range is checksummed by that same range on both servers
(:func:`pgferry.db.checksum.table_checksum`), so a mismatch is reported as "tasks, keys [a, b)" rather than
"tasks differs". Tables copied by physical position (no primary key) are compared whole, since row
positions on the target are not the source's. Sequences must be at or beyond the source's position and
every constraint must be valid. Nothing is pulled into Python but counts and digests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pgferry.db.checksum import table_checksum, table_columns
from pgferry.migrate.catalog import list_sequences
from pgferry.migrate.state import ChunkRecord, load_chunks


@dataclass(frozen=True)
class ChunkCheck:
    table: str
    chunk_no: int
    lower: tuple[str, ...] | None
    upper: tuple[str, ...] | None
    source_rows: int
    target_rows: int
    matches: bool

    def describe(self) -> str:
        lo = "start" if self.lower is None else ",".join(self.lower)
        hi = "end" if self.upper is None else ",".join(self.upper)
        return (
            f"{self.table} chunk {self.chunk_no} [{lo}, {hi}): source {self.source_rows} rows, "
            f"target {self.target_rows} rows, {'same' if self.matches else 'DIFFERENT'} content"
        )


@dataclass
class VerificationReport:
    chunks: list[ChunkCheck] = field(default_factory=list)
    sequences: list[dict[str, Any]] = field(default_factory=list)
    invalid_constraints: list[str] = field(default_factory=list)
    missing_objects: list[str] = field(default_factory=list)

    @property
    def mismatched_chunks(self) -> list[ChunkCheck]:
        return [c for c in self.chunks if not c.matches]

    @property
    def lagging_sequences(self) -> list[dict[str, Any]]:
        return [s for s in self.sequences if not s["ok"]]

    @property
    def ok(self) -> bool:
        return not (
            self.mismatched_chunks or self.lagging_sequences or self.invalid_constraints or self.missing_objects
        )

    def tables(self) -> dict[str, dict[str, Any]]:
        summary: dict[str, dict[str, Any]] = {}
        for check in self.chunks:
            entry = summary.setdefault(check.table, {"chunks": 0, "rows": 0, "mismatched_chunks": 0})
            entry["chunks"] += 1
            entry["rows"] += check.source_rows
            entry["mismatched_chunks"] += 0 if check.matches else 1
        return summary

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "tables": self.tables(),
            "mismatches": [asdict(c) for c in self.mismatched_chunks],
            "sequences": self.sequences,
            "invalid_constraints": self.invalid_constraints,
            "missing_objects": self.missing_objects,
        }


def _verification_units(chunks: Sequence[ChunkRecord]) -> list[ChunkRecord]:
    """Key-range chunks as they are; physically chunked tables collapsed into one whole-table unit."""
    units: list[ChunkRecord] = []
    seen_whole: set[tuple[str, str]] = set()
    for chunk in chunks:
        if chunk.kind == "key":
            units.append(chunk)
        elif (chunk.schema, chunk.table) not in seen_whole:
            seen_whole.add((chunk.schema, chunk.table))
            units.append(ChunkRecord(chunk.schema, chunk.table, 0, "whole", None, None))
    return units


def verify_chunks(
    connect_source: Callable[[], psycopg.Connection[Any]],
    connect_target: Callable[[], psycopg.Connection[Any]],
    run_id: int,
    key_columns: dict[tuple[str, str], tuple[str, ...]],
    *,
    jobs: int,
    on_checked: Callable[[ChunkCheck], None] | None = None,
) -> list[ChunkCheck]:
    with connect_target() as conn:
        units = _verification_units(load_chunks(conn, run_id))
    columns_cache: dict[tuple[str, str], list[str]] = {}

    def check(unit: ChunkRecord) -> ChunkCheck:
        with connect_source() as source, connect_target() as target:
            source.autocommit = target.autocommit = True
            ident = (unit.schema, unit.table)
            if ident not in columns_cache:
                columns_cache[ident] = table_columns(source, unit.table, schema=unit.schema)
            columns = columns_cache[ident]
            keys = key_columns.get(ident) or None
            lower = None if unit.kind != "key" else unit.lower
            upper = None if unit.kind != "key" else unit.upper

            def side(conn: psycopg.Connection[Any]) -> Any:
                return table_checksum(
                    conn,
                    unit.table,
                    schema=unit.schema,
                    key_columns=keys if unit.kind == "key" else None,
                    lower=lower,
                    upper=upper,
                    columns=columns,
                )

            with ThreadPoolExecutor(max_workers=1) as other:
                remote = other.submit(side, target)
                local = side(source)
                theirs = remote.result()
        result = ChunkCheck(
            table=f"{unit.schema}.{unit.table}",
            chunk_no=unit.chunk_no,
            lower=lower,
            upper=upper,
            source_rows=local.row_count,
            target_rows=theirs.row_count,
            matches=local.row_count == theirs.row_count and local.digest == theirs.digest,
        )
        if on_checked is not None:
            on_checked(result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(check, units))


def verify_sequences(
    source: psycopg.Connection[Any], target: psycopg.Connection[Any], schemas: Sequence[str]
) -> list[dict[str, Any]]:
    """Each source sequence must exist on the target at or beyond the source's next value."""
    target_seqs = {s.qualified: s for s in list_sequences(target, schemas)}
    results = []
    for seq in list_sequences(source, schemas):
        mine = target_seqs.get(seq.qualified)
        src_next = (seq.last_value or 0) + (1 if seq.is_called else 0)
        tgt_next = None if mine is None else (mine.last_value or 0) + (1 if mine.is_called else 0)
        results.append(
            {
                "sequence": seq.qualified,
                "source_next": src_next,
                "target_next": tgt_next,
                "ok": tgt_next is not None and tgt_next >= src_next,
            }
        )
    return results


def invalid_constraints(target: psycopg.Connection[Any], tables: Sequence[tuple[str, str]]) -> list[str]:
    found: list[str] = []
    for schema, table in tables:
        for (name,) in target.execute(
            "select con.conname from pg_constraint con join pg_class c on c.oid = con.conrelid "
            "join pg_namespace n on n.oid = c.relnamespace where n.nspname = %s and c.relname = %s "
            "and not con.convalidated",
            (schema, table),
        ):
            found.append(f"{schema}.{table}.{name}")
        for (name,) in target.execute(
            "select ic.relname from pg_index i join pg_class ic on ic.oid = i.indexrelid "
            "join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = %s and c.relname = %s and not i.indisvalid",
            (schema, table),
        ):
            found.append(f"{schema}.{table} index {name} is invalid")
    return found


def restore_pending(target: psycopg.Connection[Any], run_id: int) -> list[str]:
    """Indexes and constraints dropped for the load that are not on the target now.

    Checked against the catalog, not only the bookkeeping: a record that says "restored" proves nothing if the
    object is missing (that is how a lost primary key once went unnoticed).
    """
    return [
        f"{schema}.{table} {kind} {name} was not rebuilt"
        for schema, table, kind, name, state, present in target.execute(
            """
            select d.schema_name, d.table_name, d.kind, d.name, d.state,
                   case when d.kind = 'index' then exists (
                            select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace
                            where n.nspname = d.schema_name and c.relname = d.name and c.relkind in ('i', 'I'))
                        else exists (
                            select 1 from pg_constraint con join pg_class c on c.oid = con.conrelid
                            join pg_namespace n on n.oid = c.relnamespace
                            where n.nspname = d.schema_name and c.relname = d.table_name and con.conname = d.name)
                   end
            from pgferry.migration_deferred d
            where d.run_id = %s and d.state <> 'skipped'
            order by 1, 2, 4, 3
            """,
            (run_id,),
        )
        if state == "dropped" or not present
    ]


def quote_table(schema: str, table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
