"""Verification: proving the target holds the source's rows, table by table, computed on the servers.

Each table is read once per side, sequentially, and reduced to per-bucket digests
(:func:`pgferry.db.checksum.table_digests`): rows are bucketed by a hash of their primary key (or, without a
key, of the row itself), so both servers put a row in the same bucket whatever its physical position. Equal
digests in every bucket mean equal row multisets. Where a bucket differs, only that bucket's rows are read
again on both sides and walked in key order, to name the rows that are missing, extra or different — a few
examples, never the whole table, in Python. Sequences must be at or beyond the source's position, every
constraint and index valid, and every index and key dropped for the load back.

Verification always reads the source as it is now, not the copy's snapshot: an offline migration assumes
the source is not written, and a table that differs because it was is worth knowing about.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from pgferry.db.checksum import HashMethod, bucket_rows, hash_method_for, table_columns, table_digests
from pgferry.migrate.catalog import list_sequences

__all__ = [
    "ROWS_PER_BUCKET",
    "TableCheck",
    "VerificationReport",
    "buckets_for",
    "invalid_constraints",
    "restore_pending",
    "verify_sequences",
    "verify_table",
]

ROWS_PER_BUCKET = 8_000
"""Bucket size aimed at: small enough that re-reading one differing bucket is cheap, large enough that the
digest query's hash aggregate stays small (a 100-million-row table gets 8,192 buckets)."""
MAX_EXAMPLES = 10
MAX_DRILLED_BUCKETS = 8


def buckets_for(rows: int) -> int:
    """A power of two near ``rows / ROWS_PER_BUCKET`` (1 for small tables, at most 65,536)."""
    wanted = max(1, rows // ROWS_PER_BUCKET)
    return min(1 << 16, 1 << (wanted - 1).bit_length()) if wanted > 1 else 1


@dataclass(frozen=True)
class TableCheck:
    """One table compared on both servers."""

    table: str
    buckets: int
    hash_method: str
    source_rows: int
    target_rows: int
    differing_buckets: tuple[int, ...] = ()
    examples: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.differing_buckets and self.source_rows == self.target_rows

    def describe(self) -> str:
        if self.ok:
            return f"{self.table}: identical ({self.source_rows:,} rows)"
        where = ", ".join(str(b) for b in self.differing_buckets[:8])
        more = f" (+{len(self.differing_buckets) - 8} more)" if len(self.differing_buckets) > 8 else ""
        first = f"; e.g. {self.examples[0]}" if self.examples else ""
        return (
            f"{self.table}: DIFFERENT: source {self.source_rows:,} rows, target {self.target_rows:,} rows, "
            f"{len(self.differing_buckets)} of {self.buckets} buckets differ ({where}{more}){first}"
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["differing_buckets"] = list(self.differing_buckets)
        data["examples"] = list(self.examples)
        data["ok"] = self.ok
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableCheck:
        return cls(
            table=str(data["table"]),
            buckets=int(data["buckets"]),
            hash_method=str(data["hash_method"]),
            source_rows=int(data["source_rows"]),
            target_rows=int(data["target_rows"]),
            differing_buckets=tuple(int(b) for b in data.get("differing_buckets", ())),
            examples=tuple(str(e) for e in data.get("examples", ())),
            seconds=float(data.get("seconds", 0.0)),
        )


@dataclass
class VerificationReport:
    tables: list[TableCheck] = field(default_factory=list)
    sequences: list[dict[str, Any]] = field(default_factory=list)
    invalid_constraints: list[str] = field(default_factory=list)
    missing_objects: list[str] = field(default_factory=list)
    unverified_tables: list[str] = field(default_factory=list)

    @property
    def differing_tables(self) -> list[TableCheck]:
        return [t for t in self.tables if not t.ok]

    @property
    def lagging_sequences(self) -> list[dict[str, Any]]:
        return [s for s in self.sequences if not s["ok"]]

    @property
    def ok(self) -> bool:
        return not (
            self.differing_tables
            or self.lagging_sequences
            or self.invalid_constraints
            or self.missing_objects
            or self.unverified_tables
        )

    def problems(self) -> list[str]:
        """Every reason the report is not ok, one line each, most important first."""
        lines = [t.describe() for t in self.differing_tables]
        lines += [
            f"sequence {s['sequence']} is behind the source (target next {s['target_next']}, "
            f"source next {s['source_next']})"
            for s in self.lagging_sequences
        ]
        lines += [f"invalid: {c}" for c in self.invalid_constraints]
        lines += self.missing_objects
        lines += [f"{t} was not verified" for t in self.unverified_tables]
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "tables": {t.table: t.as_dict() for t in self.tables},
            "sequences": self.sequences,
            "invalid_constraints": self.invalid_constraints,
            "missing_objects": self.missing_objects,
            "unverified_tables": self.unverified_tables,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VerificationReport:
        return cls(
            tables=[TableCheck.from_dict(t) for t in data.get("tables", {}).values()],
            sequences=list(data.get("sequences", [])),
            invalid_constraints=list(data.get("invalid_constraints", [])),
            missing_objects=list(data.get("missing_objects", [])),
            unverified_tables=list(data.get("unverified_tables", [])),
        )


def verify_table(
    connect_source: Callable[[], psycopg.Connection[Any]],
    connect_target: Callable[[], psycopg.Connection[Any]],
    schema: str,
    table: str,
    key_columns: Sequence[str],
    *,
    row_estimate: int,
    method: HashMethod | None = None,
    on_connections: Callable[[psycopg.Connection[Any], psycopg.Connection[Any]], None] | None = None,
) -> TableCheck:
    """Compare ``schema.table`` on both servers: one sequential read per side, concurrently.

    ``on_connections`` receives the two connections while they work, so a caller that is interrupted can
    cancel both queries instead of leaving them running on the servers.
    """
    started = time.monotonic()
    buckets = buckets_for(row_estimate)
    with connect_source() as source, connect_target() as target:
        if on_connections is not None:
            on_connections(source, target)
        chosen = method or hash_method_for(source, target)
        columns = table_columns(source, table, schema=schema)

        def digests(conn: psycopg.Connection[Any]) -> Any:
            return table_digests(
                conn, table, schema=schema, columns=columns, key_columns=key_columns, buckets=buckets, method=chosen
            )

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgferry-verify") as other:
            remote = other.submit(digests, target)
            mine = digests(source)
            theirs = remote.result()
        differing = mine.differing_buckets(theirs)
        examples: list[str] = []
        if differing:
            examples = _examples(source, target, schema, table, columns, key_columns, buckets, chosen, differing)
    return TableCheck(
        table=f"{schema}.{table}",
        buckets=buckets,
        hash_method=chosen,
        source_rows=mine.row_count,
        target_rows=theirs.row_count,
        differing_buckets=tuple(differing),
        examples=tuple(examples),
        seconds=time.monotonic() - started,
    )


def _examples(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    schema: str,
    table: str,
    columns: Sequence[str],
    key_columns: Sequence[str],
    buckets: int,
    method: HashMethod,
    differing: Sequence[int],
) -> list[str]:
    """Walk the rows of a few differing buckets on both sides in step; name what differs."""

    def rows(conn: psycopg.Connection[Any]) -> Iterator[tuple[str, int, str]]:
        return bucket_rows(
            conn,
            table,
            differing[:MAX_DRILLED_BUCKETS],
            schema=schema,
            columns=columns,
            key_columns=key_columns,
            buckets=buckets,
            method=method,
        )

    # Keyless rows are shown as the digest sees them: columns in name order.
    label = f"key ({', '.join(key_columns)}) = " if key_columns else f"row ({_clip(', '.join(columns), 60)}) = "

    def order(row: tuple[str, int, str]) -> tuple[str, int]:
        # Keys are unique per side; keyless rows are a multiset, ordered by their hash (ties are equal rows).
        return (row[0], 0) if key_columns else (row[0], row[1])

    def shown(row: tuple[str, int, str]) -> str:
        return _clip(row[0] if key_columns else row[2])

    found: list[str] = []
    left, right = rows(source), rows(target)
    a, b = next(left, None), next(right, None)
    while (a is not None or b is not None) and len(found) < MAX_EXAMPLES:
        if b is None or (a is not None and order(a) < order(b)):
            assert a is not None
            found.append(f"{label}{shown(a)} is on the source but not the target")
            a = next(left, None)
        elif a is None or order(b) < order(a):
            found.append(f"{label}{shown(b)} is on the target but not the source")
            b = next(right, None)
        else:
            if a[1] != b[1]:
                found.append(f"{label}{shown(a)} differs: source {_clip(a[2])}, target {_clip(b[2])}")
            a, b = next(left, None), next(right, None)
    for iterator in (left, right):
        _close(iterator)
    return found


def _close(iterator: Iterator[Any]) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


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
    """Constraints marked ``NOT VALID`` and indexes left invalid (a failed concurrent build) on ``tables``."""
    found: list[str] = []
    for schema, table in tables:
        for (name,) in target.execute(
            "select con.conname from pg_constraint con join pg_class c on c.oid = con.conrelid "
            "join pg_namespace n on n.oid = c.relnamespace where n.nspname = %s and c.relname = %s "
            "and not con.convalidated order by 1",
            (schema, table),
        ):
            found.append(f"{schema}.{table}.{name} is not validated")
        for (name,) in target.execute(
            "select ic.relname from pg_index i join pg_class ic on ic.oid = i.indexrelid "
            "join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = %s and c.relname = %s and not i.indisvalid order by 1",
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
