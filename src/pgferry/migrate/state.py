"""Migration state, kept on the target in schema ``pgferry``.

Resume is only exact if "this chunk is copied" is recorded in the same transaction as the chunk's rows: then
a crash at any instant leaves either both or neither, and a rerun copies exactly the chunks that are not
marked. That is why the state lives on the target (and not in a local file, as pg_dump-style tools keep it)
and why :func:`mark_chunk_done` takes the connection the copy used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgferry.replication.lsn import Lsn

STATE_SCHEMA = "pgferry"

STATE_DDL = """
create schema if not exists pgferry;
create table if not exists pgferry.migration_runs (
  id bigint generated always as identity primary key,
  source text not null,
  target text not null,
  options jsonb not null,
  phase text not null default 'plan',
  status text not null default 'running',
  started_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  completed_at timestamptz,
  state_schema_created boolean not null default false,
  alembic_revision_before text,
  inventory_before jsonb,
  phase_seconds jsonb not null default '{}'::jsonb,
  metrics jsonb not null default '{}'::jsonb
);
alter table pgferry.migration_runs add column if not exists inventory_after_schema jsonb;
create table if not exists pgferry.migration_streams (
  run_id bigint not null references pgferry.migration_runs (id) on delete cascade,
  direction text not null,  -- forward: source -> target (online follow); reverse: target -> source (after cut-over)
  slot text not null,
  publication text not null,
  start_lsn pg_lsn not null,  -- the slot's consistent point
  applied_lsn pg_lsn,  -- commit position of the last transaction applied (forward only; reverse keeps it on the source)
  marker text,  -- the last pgferry marker (pg_logical_emit_message) applied
  changes_applied bigint not null default 0,
  last_commit_at timestamptz,
  lag_bytes bigint,
  lag_seconds double precision,
  updated_at timestamptz not null default now(),
  primary key (run_id, direction)
);
alter table pgferry.migration_runs add column if not exists sequences_before jsonb;
create table if not exists pgferry.migration_tables (
  run_id bigint not null references pgferry.migration_runs (id) on delete cascade,
  schema_name text not null,
  table_name text not null,
  target_existed boolean not null,
  key_columns text[] not null,
  copy_columns text[] not null,
  binary_copy boolean not null,
  row_estimate bigint not null,
  bytes_estimate bigint not null,
  -- pending (chunks to copy) -> copied -> indexed; or skipped (--on-error skip-table), or differs
  -- (verification or a unique index found the target's rows are not the source's; the next run repairs it)
  state text not null default 'pending',
  primary key (run_id, schema_name, table_name)
);
create table if not exists pgferry.migration_chunks (
  run_id bigint not null,
  schema_name text not null,
  table_name text not null,
  chunk_no integer not null,
  kind text not null,
  lower_bound text[],
  upper_bound text[],
  state text not null default 'pending',
  rows_copied bigint,
  bytes_copied bigint,
  attempts integer not null default 0,
  copied_at timestamptz,
  seconds double precision,
  primary key (run_id, schema_name, table_name, chunk_no),
  foreign key (run_id, schema_name, table_name)
    references pgferry.migration_tables (run_id, schema_name, table_name) on delete cascade
);
create table if not exists pgferry.migration_deferred (
  run_id bigint not null references pgferry.migration_runs (id) on delete cascade,
  schema_name text not null,
  table_name text not null,
  kind text not null,
  name text not null,
  definition text not null,
  ord integer not null,
  state text not null default 'dropped',
  -- a key constraint and its index share a name, and constraint names repeat across tables
  primary key (run_id, schema_name, table_name, kind, name)
);
alter table pgferry.migration_tables add column if not exists copy_lsn pg_lsn;
create table if not exists pgferry.migration_checks (
  run_id bigint not null,
  schema_name text not null,
  table_name text not null,
  checked_at timestamptz not null default now(),
  buckets integer not null,
  hash_method text not null,
  source_rows bigint not null,
  target_rows bigint not null,
  differing_buckets integer[] not null,
  examples jsonb not null default '[]'::jsonb,
  seconds double precision not null,
  primary key (run_id, schema_name, table_name),
  foreign key (run_id, schema_name, table_name)
    references pgferry.migration_tables (run_id, schema_name, table_name) on delete cascade
);
create table if not exists pgferry.migration_events (
  id bigint generated always as identity primary key,
  run_id bigint not null references pgferry.migration_runs (id) on delete cascade,
  at timestamptz not null default clock_timestamp(),
  level text not null,
  phase text not null,
  table_name text,
  sqlstate text,
  message text not null
);
"""

STATE_TABLES = (
    "migration_events",
    "migration_streams",
    "migration_checks",
    "migration_deferred",
    "migration_chunks",
    "migration_tables",
    "migration_runs",
)


def ensure_state_schema(conn: psycopg.Connection[Any]) -> bool:
    """Create the state tables; ``True`` when schema ``pgferry`` did not exist before (rollback drops it)."""
    existed = conn.execute("select 1 from pg_namespace where nspname = 'pgferry'").fetchone() is not None
    conn.execute(STATE_DDL.encode())
    return not existed


def state_exists(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("select to_regclass('pgferry.migration_runs')").fetchone()
    return row is not None and row[0] is not None


@dataclass
class Run:
    id: int
    source: str
    target: str
    options: dict[str, Any]
    phase: str
    status: str
    state_schema_created: bool
    alembic_revision_before: str | None
    inventory_before: list[list[str]] | None
    phase_seconds: dict[str, float]
    metrics: dict[str, Any]
    inventory_after_schema: list[list[str]] | None = None
    sequences_before: list[dict[str, Any]] | None = None


_RUN_COLUMNS = (
    "id, source, target, options, phase, status, state_schema_created, alembic_revision_before, "
    "inventory_before, phase_seconds, metrics, inventory_after_schema, sequences_before"
)


def _run(row: Sequence[Any]) -> Run:
    return Run(*row)


def latest_run(conn: psycopg.Connection[Any]) -> Run | None:
    if not state_exists(conn):
        return None
    row = conn.execute(f"select {_RUN_COLUMNS} from pgferry.migration_runs order by id desc limit 1").fetchone()
    return None if row is None else _run(row)


def create_run(
    conn: psycopg.Connection[Any],
    *,
    source: str,
    target: str,
    options: dict[str, Any],
    state_schema_created: bool,
) -> Run:
    row = conn.execute(
        f"insert into pgferry.migration_runs (source, target, options, state_schema_created) "
        f"values (%s, %s, %s, %s) returning {_RUN_COLUMNS}",
        (source, target, Jsonb(options), state_schema_created),
    ).fetchone()
    assert row is not None
    return _run(row)


def set_phase(conn: psycopg.Connection[Any], run_id: int, phase: str, *, status: str = "running") -> None:
    conn.execute(
        "update pgferry.migration_runs set phase = %s, status = %s, updated_at = now(), "
        "completed_at = case when %s in ('completed', 'rolled_back') then now() end where id = %s",
        (phase, status, status, run_id),
    )


def add_phase_seconds(conn: psycopg.Connection[Any], run_id: int, phase: str, seconds: float) -> None:
    conn.execute(
        "update pgferry.migration_runs set phase_seconds = jsonb_set(phase_seconds, array[%s], "
        "to_jsonb(coalesce((phase_seconds ->> %s)::float, 0) + %s)) where id = %s",
        (phase, phase, seconds, run_id),
    )


_JSON_RUN_FIELDS = frozenset({"inventory_before", "inventory_after_schema", "sequences_before", "metrics", "options"})


def update_run(conn: psycopg.Connection[Any], run_id: int, **fields: Any) -> None:
    for column, value in fields.items():
        if column not in {"alembic_revision_before", *_JSON_RUN_FIELDS}:
            raise ValueError(column)
        wrapped = Jsonb(value) if column in _JSON_RUN_FIELDS else value
        conn.execute(
            psycopg.sql.SQL("update pgferry.migration_runs set {} = %s, updated_at = now() where id = %s").format(
                psycopg.sql.Identifier(column)
            ),
            (wrapped, run_id),
        )


def record_event(
    conn: psycopg.Connection[Any],
    run_id: int,
    *,
    level: str,
    phase: str,
    message: str,
    table: str | None = None,
    sqlstate: str | None = None,
) -> None:
    conn.execute(
        "insert into pgferry.migration_events (run_id, level, phase, table_name, sqlstate, message) "
        "values (%s, %s, %s, %s, %s, %s)",
        (run_id, level, phase, table, sqlstate, message[:4000]),
    )


@dataclass(frozen=True)
class ChunkRecord:
    schema: str
    table: str
    chunk_no: int
    kind: str  # 'whole' | 'key' | 'ctid'
    lower: tuple[str, ...] | None
    upper: tuple[str, ...] | None
    state: str = "pending"
    rows_copied: int | None = None
    bytes_copied: int | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"


def insert_chunks(conn: psycopg.Connection[Any], run_id: int, chunks: Sequence[ChunkRecord]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "insert into pgferry.migration_chunks (run_id, schema_name, table_name, chunk_no, kind, lower_bound, "
            "upper_bound) values (%s, %s, %s, %s, %s, %s, %s) on conflict do nothing",
            [
                (
                    run_id,
                    c.schema,
                    c.table,
                    c.chunk_no,
                    c.kind,
                    None if c.lower is None else list(c.lower),
                    None if c.upper is None else list(c.upper),
                )
                for c in chunks
            ],
        )


def load_chunks(
    conn: psycopg.Connection[Any],
    run_id: int,
    *,
    state: str | None = None,
    table: tuple[str, str] | None = None,
) -> list[ChunkRecord]:
    schema_name, table_name = table if table is not None else (None, None)
    rows = conn.execute(
        "select schema_name, table_name, chunk_no, kind, lower_bound, upper_bound, state, rows_copied, "
        "bytes_copied from pgferry.migration_chunks where run_id = %s and (%s::text is null or state = %s) "
        "and (%s::text is null or (schema_name = %s and table_name = %s)) "
        "order by schema_name, table_name, chunk_no",
        (run_id, state, state, schema_name, schema_name, table_name),
    ).fetchall()
    return [
        ChunkRecord(
            schema=r[0],
            table=r[1],
            chunk_no=r[2],
            kind=r[3],
            lower=None if r[4] is None else tuple(r[4]),
            upper=None if r[5] is None else tuple(r[5]),
            state=r[6],
            rows_copied=r[7],
            bytes_copied=r[8],
        )
        for r in rows
    ]


def set_table_state(
    conn: psycopg.Connection[Any],
    run_id: int,
    table: tuple[str, str],
    state: str,
    *,
    only_from: Sequence[str] | None = None,
) -> None:
    """Move a table to ``state`` (optionally only from one of ``only_from``)."""
    conn.execute(
        "update pgferry.migration_tables set state = %s where run_id = %s and schema_name = %s "
        "and table_name = %s and (%s::text[] is null or state = any(%s::text[]))",
        (
            state,
            run_id,
            table[0],
            table[1],
            None if only_from is None else list(only_from),
            None if only_from is None else list(only_from),
        ),
    )


def save_check(conn: psycopg.Connection[Any], run_id: int, table: tuple[str, str], check: Any) -> None:
    """Store a :class:`pgferry.migrate.verify.TableCheck` for ``table`` (replacing an earlier one)."""
    conn.execute(
        "insert into pgferry.migration_checks (run_id, schema_name, table_name, buckets, hash_method, source_rows, "
        "target_rows, differing_buckets, examples, seconds) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "on conflict (run_id, schema_name, table_name) do update set checked_at = now(), buckets = excluded.buckets, "
        "hash_method = excluded.hash_method, source_rows = excluded.source_rows, target_rows = excluded.target_rows, "
        "differing_buckets = excluded.differing_buckets, examples = excluded.examples, seconds = excluded.seconds",
        (
            run_id,
            table[0],
            table[1],
            check.buckets,
            check.hash_method,
            check.source_rows,
            check.target_rows,
            list(check.differing_buckets),
            Jsonb(list(check.examples)),
            check.seconds,
        ),
    )


def forget_check(conn: psycopg.Connection[Any], run_id: int, table: tuple[str, str]) -> None:
    conn.execute(
        "delete from pgferry.migration_checks where run_id = %s and schema_name = %s and table_name = %s",
        (run_id, table[0], table[1]),
    )


def load_checks(conn: psycopg.Connection[Any], run_id: int) -> list[dict[str, Any]]:
    """Stored table checks as the dictionaries :meth:`TableCheck.from_dict` reads."""
    return [
        {
            "table": f"{r[0]}.{r[1]}",
            "buckets": r[2],
            "hash_method": r[3],
            "source_rows": r[4],
            "target_rows": r[5],
            "differing_buckets": list(r[6]),
            "examples": list(r[7]),
            "seconds": r[8],
        }
        for r in conn.execute(
            "select schema_name, table_name, buckets, hash_method, source_rows, target_rows, differing_buckets, "
            "examples, seconds from pgferry.migration_checks where run_id = %s order by 1, 2",
            (run_id,),
        )
    ]


def mark_chunk_done(
    conn: psycopg.Connection[Any], run_id: int, chunk: ChunkRecord, *, rows: int, nbytes: int, seconds: float
) -> None:
    """Record a copied chunk; call inside the transaction that wrote the chunk's rows."""
    updated = conn.execute(
        "update pgferry.migration_chunks set state = 'done', rows_copied = %s, bytes_copied = %s, "
        "copied_at = now(), seconds = %s, attempts = attempts + 1 "
        "where run_id = %s and schema_name = %s and table_name = %s and chunk_no = %s and state = 'pending'",
        (rows, nbytes, seconds, run_id, chunk.schema, chunk.table, chunk.chunk_no),
    ).rowcount
    if updated != 1:
        # Another worker (or an earlier life of this process) finished it: the caller's transaction must
        # roll back, or the chunk's rows would be in the table twice.
        raise ChunkAlreadyDoneError(f"chunk {chunk.chunk_no} of {chunk.qualified} is already marked done")


def note_chunk_attempt(conn: psycopg.Connection[Any], run_id: int, chunk: ChunkRecord) -> None:
    conn.execute(
        "update pgferry.migration_chunks set attempts = attempts + 1 "
        "where run_id = %s and schema_name = %s and table_name = %s and chunk_no = %s",
        (run_id, chunk.schema, chunk.table, chunk.chunk_no),
    )


class ChunkAlreadyDoneError(RuntimeError):
    """Raised inside a chunk's transaction so that it rolls back instead of duplicating rows."""


def progress_summary(conn: psycopg.Connection[Any], run_id: int) -> dict[str, Any]:
    row = conn.execute(
        "select count(*), count(*) filter (where state = 'done'), coalesce(sum(rows_copied), 0), "
        "coalesce(sum(bytes_copied), 0) from pgferry.migration_chunks where run_id = %s",
        (run_id,),
    ).fetchone()
    tables = conn.execute(
        "select t.schema_name || '.' || t.table_name, t.row_estimate, "
        "count(c.*), count(c.*) filter (where c.state = 'done'), coalesce(sum(c.rows_copied), 0), "
        "coalesce(sum(c.bytes_copied), 0) "
        "from pgferry.migration_tables t left join pgferry.migration_chunks c using (run_id, schema_name, table_name) "
        "where t.run_id = %s group by 1, 2 order by 1",
        (run_id,),
    ).fetchall()
    errors = conn.execute(
        "select at, phase, table_name, sqlstate, message from pgferry.migration_events "
        "where run_id = %s and level = 'error' order by id desc limit 20",
        (run_id,),
    ).fetchall()
    assert row is not None
    return {
        "chunks_total": int(row[0]),
        "chunks_done": int(row[1]),
        "rows_copied": int(row[2]),
        "bytes_copied": int(row[3]),
        "tables": [
            {
                "table": t[0],
                "row_estimate": int(t[1]),
                "chunks": int(t[2]),
                "chunks_done": int(t[3]),
                "rows_copied": int(t[4]),
                "bytes_copied": int(t[5]),
            }
            for t in tables
        ],
        "errors": [
            {"at": e[0].isoformat(), "phase": e[1], "table": e[2], "sqlstate": e[3], "message": e[4]} for e in errors
        ],
    }


@dataclass(frozen=True)
class Stream:
    """A replication stream of an online migration, as the state on the target records it."""

    direction: str
    slot: str
    publication: str
    start_lsn: Lsn
    applied_lsn: Lsn | None
    marker: str | None
    changes_applied: int
    lag_bytes: int | None
    lag_seconds: float | None


def save_stream(
    conn: psycopg.Connection[Any], run_id: int, direction: str, *, slot: str, publication: str, start_lsn: Lsn
) -> None:
    conn.execute(
        "insert into pgferry.migration_streams (run_id, direction, slot, publication, start_lsn) "
        "values (%s, %s, %s, %s, %s) on conflict (run_id, direction) do update set slot = excluded.slot, "
        "publication = excluded.publication, start_lsn = excluded.start_lsn, applied_lsn = null, marker = null",
        (run_id, direction, slot, publication, str(start_lsn)),
    )


def load_stream(conn: psycopg.Connection[Any], run_id: int, direction: str) -> Stream | None:
    row = conn.execute(
        "select direction, slot, publication, start_lsn::text, applied_lsn::text, marker, changes_applied, "
        "lag_bytes, lag_seconds from pgferry.migration_streams where run_id = %s and direction = %s",
        (run_id, direction),
    ).fetchone()
    if row is None:
        return None
    return Stream(
        direction=str(row[0]),
        slot=str(row[1]),
        publication=str(row[2]),
        start_lsn=Lsn.parse(str(row[3])),
        applied_lsn=None if row[4] is None else Lsn.parse(str(row[4])),
        marker=row[5],
        changes_applied=int(row[6]),
        lag_bytes=row[7],
        lag_seconds=row[8],
    )


def dumps(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)
