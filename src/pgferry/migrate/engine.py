"""MigrationService: the phases of a move, in order, each resumable from the state on the target.

Phases (the names ``status`` shows):

1. ``plan`` — connect, validate, stop on anything that would lose data.
2. ``schema`` — pgferry's migrations, or the source's own schema (``--schema-from``). The target's objects
   before this phase are recorded, which is what ``rollback`` returns to.
3. ``prepare`` — save and drop the target tables' indexes and keys, split tables into chunks.
4. ``data`` — all chunks, ``jobs`` at a time, on one exported snapshot of the source; each chunk commits
   with its state row. A rerun after a crash copies only chunks not marked done.
5. ``indexes`` — rebuild indexes (HNSW included) in parallel, then keys, then foreign keys.
6. ``sequences`` — every sequence (and identity) at or beyond the source's position; ``ANALYZE``.
7. ``verify`` — per-chunk checksums on both servers, sequences, constraint validity.
8. ``complete`` — the summary.
"""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import psycopg
import structlog
from psycopg import sql

from pgferry.config import DatabaseUrl
from pgferry.db.retry import (
    ErrorClass,
    ErrorClassification,
    RetryAttempt,
    RetryPolicy,
    call_with_retry,
    classify_error,
)
from pgferry.errors import PgferryError
from pgferry.migrate import state as st
from pgferry.migrate.catalog import Table, TableFilter, column_types, list_sequences, list_tables
from pgferry.migrate.chunks import plan_table_chunks
from pgferry.migrate.copy import ChunkResult, CopySpec, copy_table_chunk
from pgferry.migrate.deferred import collect_deferrable, drop_deferrable, pending_deferred, restore_deferred
from pgferry.migrate.plan import MigrationPlan, build_plan
from pgferry.migrate.verify import (
    VerificationReport,
    invalid_constraints,
    restore_pending,
    verify_chunks,
    verify_sequences,
)
from pgferry.observability.metrics import MigrationMetrics

log = structlog.get_logger("pgferry.migrate")

PHASES = ("plan", "schema", "prepare", "data", "indexes", "sequences", "verify", "complete")
OnError = Literal["stop", "skip-table", "rollback"]


MAX_DATA_PASSES = 5
"""How many times the data phase may find chunks the target lost (a restart) before giving up."""


class _ChunksNotDurableError(Exception):
    """Chunks a worker committed are pending again: the target crashed before their commit was flushed."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


class SnapshotLostError(Exception):
    """The exported snapshot can no longer be imported: its exporting session ended (source restart)."""


def classify_migration_error(exc: BaseException) -> ErrorClassification:
    """The shared classification, plus one migration-specific transient failure: a lost snapshot."""
    if isinstance(exc, SnapshotLostError):
        return ErrorClassification(
            ErrorClass.RETRYABLE,
            None,
            "source snapshot lost",
            reconnect=True,
            hint="the source restarted during the copy; a new snapshot is exported",
        )
    return classify_error(exc)


class MigrationError(PgferryError):
    """The migration stopped; the state on the target says where, and ``run`` resumes from there."""


class PlanBlockedError(MigrationError):
    def __init__(self, plan: MigrationPlan) -> None:
        self.plan = plan
        first = plan.errors[0]
        more = f" (and {len(plan.errors) - 1} more; see `pgferry migrate plan`)" if len(plan.errors) > 1 else ""
        super().__init__(f"nothing was written: {first.message}{'; ' + first.fix if first.fix else ''}{more}")


class ProgressReporter(Protocol):
    def phase(self, name: str) -> None: ...
    def table_started(self, table: str, rows_estimate: int, rows_done: int) -> None: ...
    def chunk_done(self, table: str, rows: int, nbytes: int) -> None: ...
    def bytes_copied(self, table: str, nbytes: int) -> None: ...
    def message(self, text: str) -> None: ...


class NullReporter:
    def phase(self, name: str) -> None:
        pass

    def table_started(self, table: str, rows_estimate: int, rows_done: int) -> None:
        pass

    def chunk_done(self, table: str, rows: int, nbytes: int) -> None:
        pass

    def bytes_copied(self, table: str, nbytes: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass


@dataclass
class MigrationOptions:
    source_url: DatabaseUrl
    target_url: DatabaseUrl
    jobs: int = 2
    table_filter: TableFilter = field(default_factory=TableFilter)
    schema_from: Literal["pgferry", "source"] = "pgferry"
    batch_rows: int | None = None
    verify: bool = True
    on_error: OnError = "stop"
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "filter": self.table_filter.as_dict(),
            "schema_from": self.schema_from,
            "batch_rows": self.batch_rows,
            "verify": self.verify,
            "on_error": self.on_error,
        }


@dataclass
class TableMetrics:
    table: str
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    state: str = "pending"


@dataclass
class MigrationSummary:
    run_id: int
    status: str
    phase_seconds: dict[str, float]
    tables: list[TableMetrics]
    retries: int
    errors: list[dict[str, Any]]
    skipped_tables: list[str]
    verification: VerificationReport | None
    resumed: bool

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tables)

    @property
    def total_seconds(self) -> float:
        return sum(self.phase_seconds.values())

    def as_dict(self) -> dict[str, Any]:
        data_seconds = self.phase_seconds.get("data", 0.0)
        return {
            "run_id": self.run_id,
            "status": self.status,
            "resumed": self.resumed,
            "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
            "total_seconds": round(self.total_seconds, 3),
            "rows": self.rows,
            "bytes": self.bytes,
            "rows_per_second": round(self.rows / data_seconds, 1) if data_seconds else None,
            "bytes_per_second": round(self.bytes / data_seconds, 1) if data_seconds else None,
            "tables": [t.__dict__ for t in self.tables],
            "retries": self.retries,
            "errors": self.errors,
            "skipped_tables": self.skipped_tables,
            "verification": None if self.verification is None else self.verification.as_dict(),
        }


class _Snapshot:
    """The exported snapshot all copy workers read, re-exported if the source loses it (a restart)."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self.snapshot_id: str | None = None
        self.exports = 0

    def current(self) -> str:
        with self._lock:
            if self.snapshot_id is None or self._conn is None or self._conn.closed or self._conn.broken:
                self._export()
            assert self.snapshot_id is not None
            return self.snapshot_id

    def invalidate(self, snapshot_id: str) -> None:
        with self._lock:
            if self.snapshot_id == snapshot_id:
                self._close()
                self.snapshot_id = None

    def _export(self) -> None:
        self._close()
        conn = self._connect()
        conn.execute("begin isolation level repeatable read read only")
        row = conn.execute("select pg_export_snapshot()").fetchone()
        assert row is not None
        self._conn = conn
        self.snapshot_id = str(row[0])
        self.exports += 1

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()


class MigrationService:
    """Plan, run, verify, roll back and report on one source → target move."""

    def __init__(
        self,
        options: MigrationOptions,
        reporter: ProgressReporter | None = None,
        metrics: MigrationMetrics | None = None,
    ) -> None:
        self.options = options
        self.reporter: ProgressReporter = reporter or NullReporter()
        self.metrics = metrics or MigrationMetrics()
        self.retries = 0
        self._retries_lock = threading.Lock()

    # -- connections -------------------------------------------------------------------------------------
    def connect_source(self) -> psycopg.Connection[Any]:
        return self._connect(self.options.source_url)

    def connect_target(self) -> psycopg.Connection[Any]:
        conn = self._connect(self.options.target_url)
        # Whatever the target's default: every state change pgferry trusts on resume must be durable when
        # its commit returns. Only the copy workers relax this, and the data phase's barrier makes up for it.
        conn.execute("set synchronous_commit = on")
        return conn

    @staticmethod
    def _connect(url: DatabaseUrl) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            url.get_secret_value(), autocommit=True, application_name="pgferry-migrate", connect_timeout=10
        )
        # As pg_dump does: if a row-level security policy would hide rows from us, fail loudly instead of
        # copying (and verifying) only the rows the policy lets this role see.
        conn.execute("set row_security = off")
        return conn

    @contextlib.contextmanager
    def _target(self) -> Iterator[psycopg.Connection[Any]]:
        with self.connect_target() as conn:
            yield conn

    def _retry(self, fn: Callable[[], Any], operation: str) -> Any:
        def note(attempt: RetryAttempt) -> None:
            with self._retries_lock:
                self.retries += 1
            self.metrics.retries.inc()
            log.warning(
                "retrying",
                operation=operation,
                attempt=attempt.attempt,
                delay=round(attempt.delay, 2),
                reason=attempt.classification.reason,
            )
            self.reporter.message(f"retrying {operation} ({attempt.classification.reason})")

        return call_with_retry(
            fn,
            policy=self.options.retry_policy,
            on_retry=note,
            operation=operation,
            classify=classify_migration_error,
        )

    # -- plan --------------------------------------------------------------------------------------------
    def plan(self, *, resuming: bool = False) -> MigrationPlan:
        with self.connect_source() as source, self._target() as target:
            return build_plan(
                source,
                target,
                table_filter=self.options.table_filter,
                schema_from=self.options.schema_from,
                jobs=self.options.jobs,
                batch_rows=self.options.batch_rows,
                resuming=resuming,
            )

    # -- run ---------------------------------------------------------------------------------------------
    def run(self) -> MigrationSummary:
        with self._target() as target:
            existing = st.latest_run(target)
        resumed = existing is not None and existing.status in {"running", "failed"}
        if existing is not None and existing.status == "completed":
            self.reporter.message(f"migration run {existing.id} already completed; showing its summary")
            return self.summary(existing.id)
        self.reporter.phase("plan")
        started = time.monotonic()
        plan = self.plan(resuming=resumed)
        if plan.errors and not (resumed and existing is not None and existing.phase not in {"plan", "schema"}):
            raise PlanBlockedError(plan)
        with self._target() as target:
            if resumed and existing is not None:
                run = existing
                st.set_phase(target, run.id, run.phase)
                st.record_event(target, run.id, level="info", phase=run.phase, message="resumed")
            else:
                created = st.ensure_state_schema(target)
                run = st.create_run(
                    target,
                    source=str(self.options.source_url),
                    target=str(self.options.target_url),
                    options=self.options.as_dict(),
                    state_schema_created=created,
                )
                st.add_phase_seconds(target, run.id, "plan", time.monotonic() - started)
                st.set_phase(target, run.id, "schema")
                run.phase = "schema"
        try:
            self._run_phases(run.id, run.phase)
        except BaseException as exc:
            self._record_failure(run.id, exc)
            if self.options.on_error == "rollback" and isinstance(exc, Exception):
                self.reporter.message("rolling back after the error (--on-error rollback)")
                from pgferry.migrate.rollback import rollback

                rollback(self, run.id)
            raise
        summary = self.summary(run.id)
        summary.resumed = resumed
        return summary

    def _record_failure(self, run_id: int, exc: BaseException) -> None:
        self.metrics.errors.labels(self.metrics.current_phase or "unknown").inc()
        with contextlib.suppress(Exception), self._target() as target:
            row = target.execute("select phase from pgferry.migration_runs where id = %s", (run_id,)).fetchone()
            phase = str(row[0]) if row else "unknown"
            st.set_phase(target, run_id, phase, status="failed")
            st.record_event(
                target,
                run_id,
                level="error",
                phase=phase,
                message=str(exc) or type(exc).__name__,
                sqlstate=getattr(exc, "sqlstate", None),
            )

    def _run_phases(self, run_id: int, start_phase: str) -> None:
        steps: list[tuple[str, Callable[[int], None]]] = [
            ("schema", self._phase_schema),
            ("prepare", self._phase_prepare),
            ("data", self._phase_data),
            ("indexes", self._phase_indexes),
            ("sequences", self._phase_sequences),
            ("verify", self._phase_verify),
        ]
        names = [name for name, _ in steps]
        begin = names.index(start_phase) if start_phase in names else (len(names) if start_phase == "complete" else 0)
        for name, step in steps[begin:]:
            if name == "verify" and not self.options.verify:
                continue
            self.reporter.phase(name)
            self.metrics.enter_phase(name)
            started = time.monotonic()
            following = names[names.index(name) + 1] if name != names[-1] else "complete"
            for attempt in range(1, MAX_DATA_PASSES + 1):
                step(run_id)
                try:
                    self._advance_phase(run_id, name, following, time.monotonic() - started)
                    break
                except _ChunksNotDurableError as lost:
                    if attempt == MAX_DATA_PASSES:
                        raise MigrationError(
                            f"the target lost {lost.count} committed chunks {attempt} times in a row (is it "
                            "crash-looping?); rerun `pgferry migrate run` once it is stable: it copies them again"
                        ) from None
                    self._note_lost_chunks(run_id, lost.count)
        self.reporter.phase("complete")
        self.metrics.enter_phase("complete")
        with self._target() as target:
            st.set_phase(target, run_id, "complete", status="completed")

    def _advance_phase(self, run_id: int, name: str, following: str, seconds: float) -> None:
        """Record that phase ``name`` is over, durably, and only if what it did is durably there.

        Copy workers commit with ``synchronous_commit = off`` (a chunk's rows and its done-marker are lost
        together, never one without the other). This transaction is the barrier that makes up for it: it
        re-reads the chunk states and commits synchronously, and a synchronous commit flushes the WAL up to
        its own commit record, which follows every chunk commit it saw. So either every chunk it counted as
        done is on disk when the phase moves on, or the target crashed before, and the lost chunks are back
        to pending for this check to find.
        """
        with self._target() as target, target.transaction():
            target.execute("set local synchronous_commit = on")
            if name == "data":
                row = target.execute(
                    "select count(*) from pgferry.migration_chunks c join pgferry.migration_tables t "
                    "using (run_id, schema_name, table_name) "
                    "where c.run_id = %s and c.state <> 'done' and t.state <> 'skipped'",
                    (run_id,),
                ).fetchone()
                if row is not None and row[0]:
                    raise _ChunksNotDurableError(int(row[0]))
                target.execute(
                    "update pgferry.migration_tables set state = 'copied' where run_id = %s and state = 'pending'",
                    (run_id,),
                )
            st.add_phase_seconds(target, run_id, name, seconds)
            st.set_phase(target, run_id, following, status="completed" if following == "complete" else "running")

    def _note_lost_chunks(self, run_id: int, count: int) -> None:
        message = f"{count} copied chunks were not on the target any more (it restarted); copying them again"
        log.warning("chunks lost by the target", run_id=run_id, chunks=count)
        self.reporter.message(message)
        with self._target() as target:
            st.record_event(target, run_id, level="warning", phase="data", message=message)

    # -- phases ------------------------------------------------------------------------------------------
    def _phase_schema(self, run_id: int) -> None:
        from pgferry.migrate import source_schema
        from pgferry.schema import migrator

        target_url = self.options.target_url.get_secret_value()
        with self._target() as target:
            run = st.latest_run(target)
            assert run is not None
            if run.inventory_before is None:
                inventory = source_schema.take_inventory(target)
                st.update_run(
                    target,
                    run_id,
                    inventory_before=[list(o) for o in sorted(inventory.objects)],
                    alembic_revision_before=migrator.current_revision(target_url),
                )
        if self.options.schema_from == "pgferry":
            migrator.upgrade(target_url)
            return
        with self.connect_source() as source, self._target() as target:
            tables = list_tables(source, self.options.table_filter)
            missing = [
                t
                for t in tables
                if target.execute(
                    "select to_regclass(%s)",
                    (sql.SQL("{}.{}").format(sql.Identifier(t.schema), sql.Identifier(t.name)).as_string(target),),
                ).fetchone()
                == (None,)
            ]
        if not missing:
            self.reporter.message("every source table already exists on the target; schema left as it is")
            return
        ddl = source_schema.schema_sql_for_target(
            self.options.source_url.get_secret_value(),
            target_url,
            schemas=list(self.options.table_filter.schemas) or None,
            tables=list(self.options.table_filter.tables) or None,
            exclude_tables=list(self.options.table_filter.exclude_tables) or None,
        )
        source_schema.apply_schema_sql(target_url, ddl)

    def _phase_prepare(self, run_id: int) -> None:
        with self.connect_source() as source, self._target() as target:
            tables = list_tables(source, self.options.table_filter)
            run = st.latest_run(target)
            assert run is not None
            before = {tuple(o) for o in (run.inventory_before or [])}
            with target.transaction():
                specs: list[tuple[str, str]] = []
                for table in tables:
                    existed = ("table", f"{table.schema}.{table.name}") in before or any(
                        o[0] == "table" and o[1].replace('"', "") == f"{table.schema}.{table.name}" for o in before
                    )
                    target.execute(
                        "insert into pgferry.migration_tables (run_id, schema_name, table_name, target_existed, "
                        "key_columns, copy_columns, binary_copy, row_estimate, bytes_estimate) "
                        "values (%s, %s, %s, %s, %s, %s, %s, %s, %s) on conflict do nothing",
                        (
                            run_id,
                            table.schema,
                            table.name,
                            existed,
                            list(table.primary_key),
                            list(table.copy_columns),
                            self._binary_ok(table, target),
                            table.row_estimate,
                            table.total_bytes,
                        ),
                    )
                    specs.append((table.schema, table.name))
                    st.insert_chunks(
                        target, run_id, plan_table_chunks(source, table, batch_rows=self.options.batch_rows)
                    )
                drop_deferrable(target, run_id, collect_deferrable(target, specs))

    def _binary_ok(self, table: Table, target: psycopg.Connection[Any]) -> bool:
        """Binary COPY needs binary-safe types and identical type names on both sides."""
        if not table.binary_copy:
            return False
        target_types = column_types(target, table.schema, table.name)
        for column in table.columns:
            if column.generated:
                continue
            theirs = target_types.get(column.name)
            if theirs is None or theirs.split(".")[-1] != column.type_sql.split(".")[-1]:
                return False
        return True

    def _copy_specs(self, target: psycopg.Connection[Any], run_id: int) -> dict[tuple[str, str], tuple[CopySpec, int]]:
        specs: dict[tuple[str, str], tuple[CopySpec, int]] = {}
        rows = target.execute(
            "select schema_name, table_name, key_columns, copy_columns, binary_copy, row_estimate, state "
            "from pgferry.migration_tables where run_id = %s",
            (run_id,),
        ).fetchall()
        with self.connect_source() as source:
            for schema, name, keys, columns, binary, estimate, table_state in rows:
                if table_state == "skipped":
                    continue
                key_types = column_types(source, schema, name)
                specs[(schema, name)] = (
                    CopySpec(schema, name, tuple(columns), tuple(keys), key_types, bool(binary)),
                    int(estimate),
                )
        return specs

    def _phase_data(self, run_id: int) -> None:
        with self._target() as target:
            specs = self._copy_specs(target, run_id)
            pending = [c for c in st.load_chunks(target, run_id, state="pending") if (c.schema, c.table) in specs]
            done = st.load_chunks(target, run_id, state="done")
        done_rows: dict[tuple[str, str], int] = {}
        for chunk in done:
            done_rows[(chunk.schema, chunk.table)] = done_rows.get((chunk.schema, chunk.table), 0) + (
                chunk.rows_copied or 0
            )
        for (schema, name), (_spec, estimate) in sorted(specs.items(), key=lambda kv: -kv[1][1]):
            self.reporter.table_started(f"{schema}.{name}", estimate, done_rows.get((schema, name), 0))
        # Largest tables first, their chunks interleaved, so the long tail is small chunks, not one big table.
        estimates = {k: v[1] for k, v in specs.items()}
        pending.sort(key=lambda c: (-estimates[(c.schema, c.table)], c.chunk_no))
        work: queue.Queue[st.ChunkRecord] = queue.Queue()
        for chunk in pending:
            work.put(chunk)
        snapshot = _Snapshot(self.connect_source)
        failures: list[BaseException] = []
        skipped: set[tuple[str, str]] = set()
        stop = threading.Event()
        lock = threading.Lock()

        def worker() -> None:
            source: psycopg.Connection[Any] | None = None
            target: psycopg.Connection[Any] | None = None
            imported: str | None = None

            def reset() -> None:
                nonlocal source, target, imported
                for conn in (source, target):
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.close()
                source = target = None
                imported = None

            def attempt(chunk: st.ChunkRecord, spec: CopySpec) -> ChunkResult | None:
                nonlocal source, target, imported
                if target is None or target.closed or target.broken:
                    target = self.connect_target()
                    target.execute("set session_replication_role = replica")
                    target.execute("set synchronous_commit = off")  # rows and state row are lost together
                wanted = snapshot.current()
                if source is None or source.closed or source.broken or imported != wanted:
                    if source is not None:
                        with contextlib.suppress(Exception):
                            source.close()
                    source = self.connect_source()
                    source.execute("begin isolation level repeatable read read only")
                    try:
                        source.execute(sql.SQL("set transaction snapshot {}").format(sql.Literal(wanted)))
                    except psycopg.Error as exc:
                        if classify_error(exc).retryable:
                            raise
                        # The exporting session is gone (the source restarted): export a fresh snapshot.
                        snapshot.invalidate(wanted)
                        with contextlib.suppress(Exception):
                            source.close()
                        source = None
                        raise SnapshotLostError(str(exc)) from exc
                    imported = wanted
                try:
                    return copy_table_chunk(
                        source,
                        target,
                        spec,
                        chunk,
                        run_id=run_id,
                        on_bytes=lambda n: self.reporter.bytes_copied(chunk.qualified, n),
                    )
                except st.ChunkAlreadyDoneError:
                    return None
                except Exception as exc:
                    if classify_migration_error(exc).reconnect:
                        reset()
                    raise

            while not stop.is_set():
                try:
                    chunk = work.get_nowait()
                except queue.Empty:
                    break
                ident = (chunk.schema, chunk.table)
                with lock:
                    if ident in skipped:
                        continue
                spec = specs[ident][0]
                try:
                    result = self._retry(
                        lambda chunk=chunk, spec=spec: attempt(chunk, spec),  # type: ignore[misc]
                        f"copy {chunk.qualified} chunk {chunk.chunk_no}",
                    )
                    if result is not None:
                        self.metrics.rows.labels(chunk.qualified).inc(result.rows)
                        self.metrics.bytes.labels(chunk.qualified).inc(result.nbytes)
                        self.metrics.chunks.labels(chunk.qualified).inc()
                        self.metrics.chunk_seconds.observe(result.seconds)
                        self.reporter.chunk_done(chunk.qualified, result.rows, result.nbytes)
                except Exception as exc:
                    reset()
                    if self.options.on_error == "skip-table":
                        with lock:
                            skipped.add(ident)
                        self._skip_table(run_id, chunk, exc)
                        continue
                    with lock:
                        failures.append(exc)
                    stop.set()
                    break
            reset()

        threads = [
            threading.Thread(target=worker, name=f"pgferry-copy-{i}", daemon=True)
            for i in range(max(1, self.options.jobs))
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        finally:
            stop.set()
            snapshot.close()
        if failures:
            raise failures[0]
        if snapshot.exports > 1:
            with self._target() as target:
                st.record_event(
                    target,
                    run_id,
                    level="warning",
                    phase="data",
                    message=f"the source snapshot was lost and exported {snapshot.exports} times "
                    "(source restart); verification compares the final state",
                )

    def _skip_table(self, run_id: int, chunk: st.ChunkRecord, exc: BaseException) -> None:
        self.metrics.errors.labels("data").inc()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        message = f"skipped {chunk.qualified} after error: {reason}"
        self.reporter.message(message)
        with self._target() as target:
            target.execute(
                "update pgferry.migration_tables set state = 'skipped' where run_id = %s "
                "and schema_name = %s and table_name = %s",
                (run_id, chunk.schema, chunk.table),
            )
            st.record_event(
                target,
                run_id,
                level="error",
                phase="data",
                table=chunk.qualified,
                message=message,
                sqlstate=getattr(exc, "sqlstate", None),
            )

    def _phase_indexes(self, run_id: int) -> None:
        with self._target() as target:
            self._hold_back_foreign_keys_of_skipped_tables(target, run_id)
            objects = pending_deferred(target, run_id)
        if objects:
            self.reporter.message(f"rebuilding {len(objects)} indexes and constraints, {self.options.jobs} at a time")

        def connect() -> psycopg.Connection[Any]:
            return self._retry(self.connect_target, "connect to target")  # type: ignore[no-any-return]

        self._retry(
            lambda: restore_deferred(
                connect, run_id, pending_deferred(self.connect_target(), run_id), jobs=self.options.jobs
            ),
            "rebuild indexes",
        )

    def _hold_back_foreign_keys_of_skipped_tables(self, target: psycopg.Connection[Any], run_id: int) -> None:
        """A foreign key into or out of a skipped table cannot be valid; say so instead of failing the run."""
        skipped = {
            f"{r[0]}.{r[1]}"
            for r in target.execute(
                "select schema_name, table_name from pgferry.migration_tables where run_id = %s and state = 'skipped'",
                (run_id,),
            )
        }
        if not skipped:
            return
        for obj in pending_deferred(target, run_id):
            if obj.kind != "foreign_key":
                continue
            match = re.search(r"REFERENCES\s+([^\s(]+)\s*\(", obj.definition, re.IGNORECASE)
            referenced = match.group(1).replace('"', "") if match else ""
            if "." not in referenced:
                referenced = f"{obj.schema}.{referenced}"
            if f"{obj.schema}.{obj.table}" in skipped or referenced in skipped:
                target.execute(
                    "update pgferry.migration_deferred set state = 'skipped' where run_id = %s "
                    "and schema_name = %s and table_name = %s and kind = 'foreign_key' and name = %s",
                    (run_id, obj.schema, obj.table, obj.name),
                )
                st.record_event(
                    target,
                    run_id,
                    level="error",
                    phase="indexes",
                    table=f"{obj.schema}.{obj.table}",
                    message=f"foreign key {obj.name} not restored: it involves a skipped table",
                )

    def _phase_sequences(self, run_id: int) -> None:
        with self.connect_source() as source, self._target() as target:
            schemas = list(self.options.table_filter.schemas) or None
            target_names = {s.qualified for s in list_sequences(target, schemas)}
            for seq in list_sequences(source, schemas):
                if seq.qualified not in target_names or seq.last_value is None:
                    continue
                target.execute(
                    "select setval(%s, %s, %s)",
                    (
                        sql.SQL("{}.{}").format(sql.Identifier(seq.schema), sql.Identifier(seq.name)).as_string(target),
                        seq.last_value,
                        seq.is_called,
                    ),
                )
            for schema, name in target.execute(
                "select schema_name, table_name from pgferry.migration_tables where run_id = %s", (run_id,)
            ).fetchall():
                target.execute(sql.SQL("analyze {}.{}").format(sql.Identifier(schema), sql.Identifier(name)))

    def _phase_verify(self, run_id: int) -> None:
        report = self.verify(run_id)
        with self._target() as target:
            st.update_run(target, run_id, metrics={"verification": report.as_dict()})
            if not report.ok:
                st.record_event(
                    target,
                    run_id,
                    level="error",
                    phase="verify",
                    message=f"verification found {len(report.mismatched_chunks)} differing chunks",
                )
        if not report.ok:
            raise VerificationFailedError(report)

    def rollback_report(self) -> Any:
        from pgferry.migrate.rollback import rollback

        return rollback(self)

    # -- verify / status ---------------------------------------------------------------------------------
    def verify(self, run_id: int | None = None) -> VerificationReport:
        with self._target() as target:
            run = st.latest_run(target) if run_id is None else None
            if run_id is None:
                if run is None:
                    raise MigrationError("no migration recorded on the target; run `pgferry migrate run` first")
                run_id = run.id
            keys = {
                (r[0], r[1]): tuple(r[2])
                for r in target.execute(
                    "select schema_name, table_name, key_columns from pgferry.migration_tables where run_id = %s "
                    "and state <> 'skipped'",
                    (run_id,),
                )
            }
        report = VerificationReport()
        report.chunks = [
            c
            for c in verify_chunks(self.connect_source, self.connect_target, run_id, keys, jobs=self.options.jobs)
            if tuple(c.table.split(".", 1)) in keys
        ]
        with self.connect_source() as source, self._target() as target:
            schemas = sorted({s for s, _ in keys})
            report.sequences = verify_sequences(source, target, schemas)
            report.invalid_constraints = invalid_constraints(target, list(keys))
            report.missing_objects = restore_pending(target, run_id)
        return report

    def summary(self, run_id: int) -> MigrationSummary:
        with self._target() as target:
            row = target.execute(
                "select status, phase_seconds, metrics from pgferry.migration_runs where id = %s", (run_id,)
            ).fetchone()
            assert row is not None
            tables = [
                TableMetrics(table=f"{r[0]}.{r[1]}", rows=int(r[2]), bytes=int(r[3]), seconds=float(r[4]), state=r[5])
                for r in target.execute(
                    "select t.schema_name, t.table_name, coalesce(sum(c.rows_copied), 0), "
                    "coalesce(sum(c.bytes_copied), 0), coalesce(sum(c.seconds), 0), t.state "
                    "from pgferry.migration_tables t left join pgferry.migration_chunks c "
                    "using (run_id, schema_name, table_name) where t.run_id = %s group by 1, 2, 6 order by 1, 2",
                    (run_id,),
                )
            ]
            errors = st.progress_summary(target, run_id)["errors"]
        skipped = [t.table for t in tables if t.state == "skipped"]
        verification = None
        metrics = row[2] or {}
        if "verification" in metrics:
            verification = _report_from_dict(metrics["verification"])
        recorded = dict(row[1] or {})
        return MigrationSummary(
            run_id=run_id,
            status=str(row[0]),
            phase_seconds={p: float(recorded[p]) for p in PHASES if p in recorded},
            tables=tables,
            retries=self.retries,
            errors=errors,
            skipped_tables=skipped,
            verification=verification,
            resumed=False,
        )


class VerificationFailedError(MigrationError):
    def __init__(self, report: VerificationReport) -> None:
        self.report = report
        parts = [c.describe() for c in report.mismatched_chunks[:3]]
        parts += [f"sequence {s['sequence']} behind the source" for s in report.lagging_sequences[:3]]
        parts += report.invalid_constraints[:3] + report.missing_objects[:3]
        super().__init__(
            "verification failed: " + "; ".join(parts) + " (run `pgferry migrate verify --json` for the full report)"
        )


def _report_from_dict(data: dict[str, Any]) -> VerificationReport:
    from pgferry.migrate.verify import ChunkCheck

    report = VerificationReport()
    for table, entry in data.get("tables", {}).items():
        # A stored report keeps per-table totals; rebuild one aggregate check per table for display.
        report.chunks.append(
            ChunkCheck(table, -1, None, None, entry["rows"], entry["rows"], entry["mismatched_chunks"] == 0)
        )
    report.sequences = data.get("sequences", [])
    report.invalid_constraints = data.get("invalid_constraints", [])
    report.missing_objects = data.get("missing_objects", [])
    return report
