"""``Migration``: one source → target move, its phases in order, each resumable from the state on the target.

The phases are listed, with what each does, in the README ("Migrating: pgferry migrate"); their names are
:data:`PHASES`. This module runs them and owns the policies around them: what a rerun resumes, when data is
repaired, what an error says. The work itself lives in the modules it calls: :mod:`plan`, :mod:`pipeline`
(copy, per-table index builds and verification), :mod:`deferred`, :mod:`verify`, :mod:`rollback`.

State lives in schema ``pgferry`` on the target and is written in the same transaction as the data it
describes; every state change commits synchronously, whatever the server's default. The source is only
ever read.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import structlog
from psycopg import sql

from pgferry.config import DatabaseUrl
from pgferry.db.connect import connect
from pgferry.db.retry import (
    ErrorClass,
    ErrorClassification,
    RetriesExhaustedError,
    RetryAttempt,
    call_with_retry,
    classify_error,
)
from pgferry.migrate import state as st
from pgferry.migrate.catalog import Table, column_types, list_sequences, list_tables
from pgferry.migrate.chunks import plan_table_chunks
from pgferry.migrate.copy import ChunkResult, CopySpec
from pgferry.migrate.deferred import collect_deferrable, drop_deferrable, pending_deferred, restore_deferred
from pgferry.migrate.errors import (
    MigrationError,
    MigrationInterruptedError,
    PlanBlockedError,
    SameDatabaseError,
    VerificationFailedError,
)
from pgferry.migrate.options import MigrationOptions
from pgferry.migrate.pipeline import DataPipeline, SnapshotLostError, TableWork
from pgferry.migrate.plan import MigrationPlan, build_plan, same_database
from pgferry.migrate.verify import (
    TableCheck,
    VerificationReport,
    invalid_constraints,
    restore_pending,
    verify_sequences,
    verify_table,
)
from pgferry.observability.metrics import MigrationMetrics
from pgferry.redaction import redact_text

__all__ = [
    "ONLINE_PHASES",
    "PHASES",
    "Migration",
    "MigrationStatus",
    "MigrationSummary",
    "NullReporter",
    "ProgressReporter",
    "TableMetrics",
]

log = structlog.get_logger("pgferry.migrate")

PHASES = ("plan", "schema", "prepare", "data", "indexes", "sequences", "verify", "complete")
ONLINE_PHASES = ("plan", "schema", "prepare", "data", "indexes", "follow", "reverse", "complete")
"""An online run follows the source after the copy; ``cutover`` moves it to ``reverse``, ``finish`` or
``rollback`` end it (sequences and verification happen at the cut-over)."""
MAX_DATA_PASSES = 5
"""How many times the data phase may find chunks missing on the target (a restart) before giving up."""


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


class ProgressReporter(Protocol):
    """What a migration tells whoever watches it (the CLI's progress bars, a test, a Python caller)."""

    def phase(self, name: str) -> None: ...
    def table_started(self, table: str, rows_estimate: int, rows_done: int) -> None: ...
    def chunk_done(self, table: str, rows: int, nbytes: int) -> None: ...
    def bytes_copied(self, table: str, nbytes: int) -> None: ...
    def message(self, text: str) -> None: ...


class NullReporter:
    """Reports nothing."""

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
class TableMetrics:
    """Rows, bytes and copy time of one table in a run."""

    table: str
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    state: str = "pending"


@dataclass
class MigrationSummary:
    """What a run did: per phase, per table, and the verification it stored."""

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


@dataclass
class MigrationStatus:
    """The persisted state of the latest run, as ``pgferry migrate status`` shows it."""

    run_id: int | None
    phase: str | None = None
    status: str | None = None
    tables_total: int = 0
    tables_completed: int = 0
    chunks_total: int = 0
    chunks_done: int = 0
    records_migrated: int = 0
    bytes_migrated: int = 0
    estimated_seconds_remaining: float | None = None
    phase_seconds: dict[str, float] | None = None
    errors: list[dict[str, Any]] | None = None
    streams: list[dict[str, Any]] | None = None
    warnings: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.run_id is None:
            return {"run": None}
        return {
            "run": self.run_id,
            "phase": self.phase,
            "status": self.status,
            "tables_total": self.tables_total,
            "tables_completed": self.tables_completed,
            "chunks_total": self.chunks_total,
            "chunks_done": self.chunks_done,
            "records_migrated": self.records_migrated,
            "bytes_migrated": self.bytes_migrated,
            "errors": self.errors or [],
            "estimated_seconds_remaining": self.estimated_seconds_remaining,
            "phase_seconds": self.phase_seconds or {},
            "streams": self.streams or [],
            "warnings": self.warnings or [],
        }


class _ChunksNotDurableError(Exception):
    """Chunks the copy counted as done are pending on the target: it crashed before they were on disk."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


class Migration:
    """Plan, run, verify, roll back and report on one source → target move.

    >>> migration = Migration(MigrationOptions(source_url=..., target_url=...), reporter=my_reporter)
    >>> migration.plan().errors          # nothing written anywhere
    >>> summary = migration.run()        # or resume: the same call continues an interrupted run
    """

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
        self._lock = threading.Lock()
        self._phase = "plan"
        self._run_id = 0
        self._ddl: str | None = None

    # -- connections -------------------------------------------------------------------------------------
    def connect_source(self) -> psycopg.Connection[Any]:
        """A new autocommit connection to the source (read only by intent: nothing here writes to it)."""
        return self._connect(self.options.source_url.get_secret_value(), "source")

    def connect_target(self) -> psycopg.Connection[Any]:
        """A new autocommit connection to the target whose commits are durable when they return."""
        conn = self._connect(self.options.target_url.get_secret_value(), "target")
        # Whatever the target's default: every change pgferry trusts on resume must be on disk when its
        # commit returns (a chunk's rows and its done-marker included). And pgferry keeps recording its state
        # on a target it fenced itself (read-only by default after an online rollback).
        conn.execute("set synchronous_commit = on")
        conn.execute("set default_transaction_read_only = off")
        return conn

    @staticmethod
    def _connect(url: str, side: str) -> psycopg.Connection[Any]:
        try:
            conn = connect(url, application_name="pgferry-migrate")
        except psycopg.Error as exc:
            exc.pgferry_side = side  # type: ignore[attr-defined]
            raise
        # As pg_dump does: if a row-level security policy would hide rows from us, fail loudly instead of
        # copying (and verifying) only the rows the policy lets this role see.
        conn.execute("set row_security = off")
        if conn.info.server_version >= 140000:
            # If pgferry dies (kill -9), the server notices within seconds and stops our long queries.
            conn.execute("set client_connection_check_interval = '2s'")
        return conn

    @contextlib.contextmanager
    def _target(self) -> Iterator[psycopg.Connection[Any]]:
        with self.connect_target() as conn:
            yield conn

    def retry(self, fn: Callable[[], Any], operation: str) -> Any:
        """Call ``fn`` (one complete attempt) until it succeeds, backing off on transient failures."""

        def note(attempt: RetryAttempt) -> None:
            with self._lock:
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

        try:
            return call_with_retry(
                fn,
                policy=self.options.retry_policy,
                on_retry=note,
                operation=operation,
                classify=classify_migration_error,
            )
        except Exception as exc:
            if not hasattr(exc, "pgferry_operation"):
                with contextlib.suppress(AttributeError):
                    exc.pgferry_operation = operation  # type: ignore[attr-defined]
            raise

    # -- the pipeline's host -----------------------------------------------------------------------------
    def on_chunk_copied(self, chunk: st.ChunkRecord, result: ChunkResult) -> None:
        self.metrics.rows.labels(chunk.qualified).inc(result.rows)
        self.metrics.bytes.labels(chunk.qualified).inc(result.nbytes)
        self.metrics.chunks.labels(chunk.qualified).inc()
        self.metrics.chunk_seconds.observe(result.seconds)
        self.reporter.chunk_done(chunk.qualified, result.rows, result.nbytes)

    def on_table_failed(self, table: TableWork, exc: BaseException, phase: str) -> bool:
        """``True`` when the policy skips the table (``--on-error skip-table``), ``False`` to stop the run."""
        if self.options.on_error != "skip-table" or phase != "data":
            return False
        self.metrics.errors.labels("data").inc()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        message = f"skipped {table.qualified} after error: {reason}"
        self.reporter.message(message)
        with self._target() as target:
            st.set_table_state(target, self._run_id, table.ident, "skipped")
            st.record_event(
                target,
                self._run_id,
                level="error",
                phase="data",
                table=table.qualified,
                message=message,
                sqlstate=getattr(exc, "sqlstate", None),
            )
        return True

    def note(self, text: str, *, table: str | None = None, level: str = "info") -> None:
        getattr(log, "warning" if level != "info" else "info")(text)
        self.reporter.message(text)
        if level != "info":
            with self._target() as target:
                st.record_event(target, self._run_id, level=level, phase=self._phase, table=table, message=text)

    # -- plan --------------------------------------------------------------------------------------------
    def plan(self, *, resuming: bool = False) -> MigrationPlan:
        """Connect to both servers, validate and estimate; nothing is written anywhere."""
        with self.connect_source() as source, self._target() as target:
            plan = build_plan(
                source,
                target,
                table_filter=self.options.table_filter,
                schema_from=self.options.schema_from,
                jobs=self.options.jobs,
                batch_rows=self.options.batch_rows,
                resuming=resuming,
                online=self.options.online,
            )
        if (
            self.options.schema_from == "source"
            and not resuming
            and not plan.errors
            and any(t.target == "created by schema phase" for t in plan.tables)
        ):
            self._try_source_schema(plan)
        return plan

    def _try_source_schema(self, plan: MigrationPlan) -> None:
        """Apply the source's schema to the target in a transaction that is rolled back: a conflict found
        here stops ``run`` before it writes, instead of half-way through."""
        from pgferry.migrate import source_schema
        from pgferry.migrate.plan import Problem

        try:
            source_schema.apply_schema_sql(self.options.target_url.get_secret_value(), self._source_ddl(), dry_run=True)
        except source_schema.SchemaApplyError as exc:
            plan.problems.append(
                Problem("error", f"the source's schema does not apply to the target: {exc.server_message}", exc.hint)
            )
        except (source_schema.SchemaDumpError, source_schema.SchemaRewriteError) as exc:
            plan.problems.append(Problem("error", str(exc)))

    # -- run ---------------------------------------------------------------------------------------------
    def run(self) -> MigrationSummary:
        """Run the migration, or resume the latest one from where it stopped; returns its summary."""
        with self.connect_source() as source, self._target() as target:
            if same_database(source, target):
                raise SameDatabaseError(
                    "the source and the target are the same database; nothing was written. Point --target "
                    "(SUPABASE_DB_URL) at the Supabase database and --source (NEON_DATABASE_URL) at Neon"
                )
            existing = st.latest_run(target)
        resumed = existing is not None and existing.status in {"running", "failed"}
        if existing is not None and existing.status == "completed":
            self.reporter.message(f"migration run {existing.id} already completed; showing its summary")
            return self.summary(existing.id)
        self.reporter.phase("plan")
        started = time.monotonic()
        following = resumed and existing is not None and existing.phase in {"follow", "reverse"}
        if not following:  # a follow resumes at once: the source may be fenced, and nothing is copied again
            plan = self.plan(resuming=resumed)
            if plan.errors and not (resumed and existing is not None and existing.phase not in {"plan", "schema"}):
                raise PlanBlockedError.from_plan(plan)
        with self._target() as target:
            if resumed and existing is not None:
                run = existing
                phase = self._resume_phase(target, run)
                st.set_phase(target, run.id, phase)
                st.record_event(target, run.id, level="info", phase=phase, message="resumed")
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
                phase = "schema"
                st.set_phase(target, run.id, phase)
        self._run_id = run.id
        try:
            self._run_phases(run.id, phase, resumed=resumed)
        except BaseException as exc:
            self._record_failure(run.id, exc)
            if self.options.on_error == "rollback" and isinstance(exc, Exception):
                self.reporter.message("rolling back after the error (--on-error rollback)")
                self.rollback(run.id)
            if isinstance(exc, Exception) and not isinstance(exc, MigrationError):
                raise self._explain(exc) from exc
            raise
        summary = self.summary(run.id)
        summary.resumed = resumed
        return summary

    @staticmethod
    def _resume_phase(target: psycopg.Connection[Any], run: st.Run) -> str:
        """Where a rerun starts: where the last one stopped, or back at ``data`` if a table needs repair."""
        differing = target.execute(
            "select count(*) from pgferry.migration_tables where run_id = %s and state = 'differs'", (run.id,)
        ).fetchone()
        if differing and differing[0] and PHASES.index(run.phase) > PHASES.index("data"):
            return "data"
        return run.phase

    def _explain(self, exc: Exception) -> MigrationInterruptedError:
        """One line for an unexpected failure: phase, step, server, cause, and that a rerun resumes."""
        side = self._side_of(exc)
        operation = getattr(exc, "pgferry_operation", None)
        cause = exc.__cause__ if isinstance(exc, RetriesExhaustedError) and exc.__cause__ else exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        where = f" on the {side}" if side else ""
        doing = f" ({operation})" if operation else ""
        sqlstate = getattr(cause, "sqlstate", None)
        classification = classify_error(cause)
        if classification.retryable:
            advice = (
                f"the {side or 'server'} kept failing ({classification.reason}); once it is reachable, rerun "
                "`pgferry migrate run`: it resumes from this point"
            )
        else:
            advice = "fix the cause, then rerun `pgferry migrate run`: it resumes from this point"
            if self.options.on_error == "rollback":
                advice = "the target was rolled back; fix the cause and run `pgferry migrate run` again"
        code = f" [{sqlstate}]" if sqlstate else ""
        return MigrationInterruptedError(
            redact_text(f"{self._phase} phase stopped{doing}{where}: {first}{code}; {advice}"),
            phase=self._phase,
            side=side,
            sqlstate=sqlstate,
        )

    def _side_of(self, exc: BaseException) -> str:
        for candidate in (exc, exc.__cause__):
            if candidate is None:
                continue
            side = getattr(candidate, "pgferry_side", None)
            if side:
                return str(side)
            pgconn = getattr(candidate, "pgconn", None)
            if pgconn is not None:
                for name, url in (("source", self.options.source_url), ("target", self.options.target_url)):
                    if _same_endpoint(pgconn, url.get_secret_value()):
                        return name
        return ""

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
                message=redact_text(str(exc) or type(exc).__name__),
                sqlstate=getattr(exc, "sqlstate", None),
            )

    def _run_phases(self, run_id: int, start_phase: str, *, resumed: bool) -> None:
        steps: list[tuple[str, Callable[[int], None]]] = [
            ("schema", self._phase_schema),
            ("prepare", self._phase_prepare),
            ("data", lambda r: self._phase_data(r, repair=resumed and not self.options.online)),
            ("indexes", self._phase_indexes),
        ]
        if self.options.online:
            steps += [("follow", self._phase_follow), ("reverse", self._phase_reverse)]
        else:
            steps += [("sequences", self._phase_sequences), ("verify", self._phase_verify)]
        names = [name for name, _ in steps]
        begin = names.index(start_phase) if start_phase in names else (len(names) if start_phase == "complete" else 0)
        for name, step in steps[begin:]:
            if name == "verify" and not self.options.verify:
                with self._target() as target:  # --no-verify: nothing left to do, the run is complete
                    st.set_phase(target, run_id, "complete", status="completed")
                continue
            self._phase = name
            self.reporter.phase(name)
            self.metrics.enter_phase(name)
            started = time.monotonic()
            following = names[names.index(name) + 1] if name != names[-1] else "complete"
            if name in {"follow", "reverse"}:
                # Their ends are decided elsewhere (cutover; finish or rollback), which set the next phase.
                step(run_id)
                with self._target() as target:
                    st.add_phase_seconds(target, run_id, name, time.monotonic() - started)
                continue
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
                    self.note(
                        f"{lost.count} copied chunks are not on the target any more (it restarted); copying them again",
                        level="warning",
                    )
        self._phase = "complete"
        self.reporter.phase("complete")
        self.metrics.enter_phase("complete")

    def _advance_phase(self, run_id: int, name: str, following: str, seconds: float) -> None:
        """Record that phase ``name`` is over, durably, and only if what it did is durably there.

        Chunk copies commit synchronously, and this transaction re-reads every chunk's state before the
        phase moves on, so the data phase cannot end with a chunk that a target crash took back out: it is
        pending again, this check finds it, and the data phase runs again for it.
        """
        with self._target() as target, target.transaction():
            if name == "data":
                row = target.execute(
                    "select count(*) from pgferry.migration_chunks c join pgferry.migration_tables t "
                    "using (run_id, schema_name, table_name) "
                    "where c.run_id = %s and c.state <> 'done' and t.state <> 'skipped'",
                    (run_id,),
                ).fetchone()
                if row is not None and row[0]:
                    # A table marked copied before the crash must be looked at again.
                    target.execute(
                        "update pgferry.migration_tables t set state = 'pending' where run_id = %s "
                        "and state <> 'skipped' and exists (select 1 from pgferry.migration_chunks c "
                        "where c.run_id = t.run_id and c.schema_name = t.schema_name "
                        "and c.table_name = t.table_name and c.state <> 'done')",
                        (run_id,),
                    )
                    raise _ChunksNotDurableError(int(row[0]))
            st.add_phase_seconds(target, run_id, name, seconds)
            st.set_phase(target, run_id, following, status="completed" if following == "complete" else "running")

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
        else:
            self._schema_from_source(target_url)
        with self._target() as target:
            # What the migration created is what exists now and did not before; a rollback removes exactly
            # that, never what someone adds to the target after the migration.
            inventory = source_schema.take_inventory(target)
            st.update_run(target, run_id, inventory_after_schema=[list(o) for o in sorted(inventory.objects)])

    def _schema_from_source(self, target_url: str) -> None:
        from pgferry.migrate import source_schema

        with self.connect_source() as source, self._target() as target:
            tables = list_tables(source, self.options.table_filter)
            missing = [
                t
                for t in tables
                if target.execute(
                    "select to_regclass(%s)", (sql.Identifier(t.schema, t.name).as_string(target),)
                ).fetchone()
                == (None,)
            ]
        if not missing:
            self.reporter.message("every source table already exists on the target; schema left as it is")
            return
        source_schema.apply_schema_sql(target_url, self._source_ddl())

    def _source_ddl(self) -> str:
        """The source's schema rewritten for the target (dumped once per process: plan and schema share it)."""
        from pgferry.migrate import source_schema

        if self._ddl is None:
            self._ddl = source_schema.schema_sql_for_target(
                self.options.source_url.get_secret_value(),
                self.options.target_url.get_secret_value(),
                schemas=list(self.options.table_filter.schemas) or None,
                tables=list(self.options.table_filter.tables) or None,
                exclude_tables=list(self.options.table_filter.exclude_tables) or None,
            )
        return self._ddl

    def _phase_prepare(self, run_id: int) -> None:
        with self.connect_source() as source, self._target() as target:
            tables = list_tables(source, self.options.table_filter)
            run = st.latest_run(target)
            assert run is not None
            before = {tuple(o) for o in (run.inventory_before or [])}
            sequences = _owned_sequence_positions(target, [(t.schema, t.name) for t in tables])
            with target.transaction():
                specs: list[tuple[str, str]] = []
                for table in tables:
                    existed = ("table", sql.Identifier(table.schema, table.name).as_string(target)) in before
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
                            table.table_bytes or table.total_bytes,
                        ),
                    )
                    specs.append((table.schema, table.name))
                    st.insert_chunks(
                        target, run_id, plan_table_chunks(source, table, batch_rows=self.options.batch_rows)
                    )
                drop_deferrable(target, run_id, collect_deferrable(target, specs))
                st.update_run(target, run_id, sequences_before=sequences)

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

    def _table_work(
        self, target: psycopg.Connection[Any], source: psycopg.Connection[Any], run_id: int
    ) -> list[TableWork]:
        rows = target.execute(
            "select schema_name, table_name, key_columns, copy_columns, binary_copy, row_estimate, bytes_estimate, "
            "state from pgferry.migration_tables where run_id = %s order by 1, 2",
            (run_id,),
        ).fetchall()
        chunks = st.load_chunks(target, run_id)
        deferred = [o for o in pending_deferred(target, run_id) if o.kind != "foreign_key"]
        checked = {(c["table"]) for c in st.load_checks(target, run_id) if not c["differing_buckets"]}
        work: list[TableWork] = []
        for schema, name, keys, columns, binary, estimate, nbytes, table_state in rows:
            key_types = column_types(source, schema, name)
            work.append(
                TableWork(
                    spec=CopySpec(schema, name, tuple(columns), tuple(keys), key_types, bool(binary)),
                    row_estimate=int(estimate),
                    bytes_estimate=int(nbytes),
                    state=str(table_state),
                    chunks=[c for c in chunks if (c.schema, c.table) == (schema, name)],
                    deferred=[o for o in deferred if (o.schema, o.table) == (schema, name)],
                    verified=f"{schema}.{name}" in checked,
                )
            )
        return work

    def _phase_data(self, run_id: int, *, repair: bool) -> None:
        if not self.options.online:
            self._copy(run_id, repair=repair)
            return
        from pgferry.migrate.online import online_snapshot, reset_unfinished_tables

        with online_snapshot(self, run_id) as (snapshot, position):
            with self._target() as target:
                for table in reset_unfinished_tables(target, run_id, position):
                    self.note(
                        f"{table}: copied again from the start under a new snapshot", table=table, level="warning"
                    )
            self._copy(run_id, repair=False, snapshot=snapshot)

    def _copy(self, run_id: int, *, repair: bool, snapshot: str | None = None) -> None:
        with self._target() as target, self.connect_source() as source:
            tables = self._table_work(target, source, run_id)
        for table in sorted(tables, key=lambda t: t.copy_priority):
            if table.state == "skipped":
                continue
            done = sum(c.rows_copied or 0 for c in table.chunks if c.state == "done")
            self.reporter.table_started(table.qualified, table.row_estimate, done)
        DataPipeline(
            self,
            run_id,
            tables,
            jobs=self.options.jobs,
            verify=self.options.verify,
            repair=repair,
            maintenance_work_mem=self.options.maintenance_work_mem,
            on_bytes=self.reporter.bytes_copied,
            snapshot=snapshot,
            connect_verify_source=None if snapshot is None else lambda: self._source_in_snapshot(snapshot),
        ).run()

    def _source_in_snapshot(self, snapshot: str) -> psycopg.Connection[Any]:
        """A source connection that sees the copy's snapshot: an online copy is verified against what it read."""
        conn = self.connect_source()
        conn.execute("begin isolation level repeatable read read only")
        conn.execute(sql.SQL("set transaction snapshot {}").format(sql.Literal(snapshot)))
        return conn

    def _phase_follow(self, run_id: int) -> None:
        from pgferry.migrate.online import follow

        self.reporter.message("following the source; run `pgferry migrate cutover` to switch to the target")
        follow(self, run_id)

    def _phase_reverse(self, run_id: int) -> None:
        from pgferry.migrate.online import drop_forward_stream, reverse

        with self._target() as target:
            row = target.execute("select phase from pgferry.migration_runs where id = %s", (run_id,)).fetchone()
        if row is None or row[0] != "reverse":
            return  # rolled back or finished before the cut-over
        drop_forward_stream(self, run_id)
        self.reporter.message("cut over: the source now follows the target (`pgferry migrate finish` ends it)")
        reverse(self, run_id)

    def _phase_indexes(self, run_id: int) -> None:
        """Foreign keys (every referenced key exists now) and anything the data phase did not rebuild."""
        with self._target() as target:
            held_back = self._hold_back(target, run_id)
            objects = pending_deferred(target, run_id)
        if objects:
            self.reporter.message(f"rebuilding {len(objects)} foreign keys and remaining indexes")

        def connect() -> psycopg.Connection[Any]:
            conn: psycopg.Connection[Any] = self.retry(self.connect_target, "connect to the target")
            conn.execute(
                sql.SQL("set maintenance_work_mem = {}").format(sql.Literal(self.options.maintenance_work_mem))
            )
            return conn

        def rebuild() -> None:
            with self._target() as target:
                pending = pending_deferred(target, run_id)
            restore_deferred(connect, run_id, pending, jobs=self.options.jobs)

        self.retry(rebuild, "rebuild foreign keys on the target")
        if held_back:
            self.reporter.message(f"held back {held_back} foreign keys of skipped or differing tables")

    def _hold_back(self, target: psycopg.Connection[Any], run_id: int) -> int:
        """Objects of skipped or differing tables, and foreign keys into them, cannot be built; say so.

        What an earlier run held back is looked at again: a table repaired since is no longer blocked.
        """
        target.execute(
            "update pgferry.migration_deferred set state = 'dropped' where run_id = %s and state = 'skipped'",
            (run_id,),
        )
        blocked = {
            f"{r[0]}.{r[1]}": str(r[2])
            for r in target.execute(
                "select schema_name, table_name, state from pgferry.migration_tables "
                "where run_id = %s and state in ('skipped', 'differs')",
                (run_id,),
            )
        }
        if not blocked:
            return 0
        count = 0
        for obj in pending_deferred(target, run_id):
            referenced = _referenced_table(obj.definition, obj.schema) if obj.kind == "foreign_key" else ""
            own = f"{obj.schema}.{obj.table}"
            reason = blocked.get(own) or blocked.get(referenced)
            if reason is None or (obj.kind != "foreign_key" and blocked.get(own) == "skipped"):
                continue  # a skipped table keeps its own indexes: what it holds is still queryable
            target.execute(
                "update pgferry.migration_deferred set state = 'skipped' where run_id = %s "
                "and schema_name = %s and table_name = %s and kind = %s and name = %s",
                (run_id, obj.schema, obj.table, obj.kind, obj.name),
            )
            st.record_event(
                target,
                run_id,
                level="error",
                phase="indexes",
                table=own,
                message=f"{obj.kind.replace('_', ' ')} {obj.name} not restored: it involves a {reason} table",
            )
            count += 1
        return count

    def _phase_sequences(self, run_id: int) -> None:
        with self.connect_source() as source, self._target() as target:
            schemas = list(self.options.table_filter.schemas) or None
            target_names = {s.qualified for s in list_sequences(target, schemas)}
            for seq in list_sequences(source, schemas):
                if seq.qualified not in target_names or seq.last_value is None:
                    continue
                target.execute(
                    "select setval(%s, %s, %s)",
                    (sql.Identifier(seq.schema, seq.name).as_string(target), seq.last_value, seq.is_called),
                )
            for schema, name in target.execute(
                "select schema_name, table_name from pgferry.migration_tables where run_id = %s", (run_id,)
            ).fetchall():
                target.execute(sql.SQL("analyze {}").format(sql.Identifier(schema, name)))

    def _phase_verify(self, run_id: int) -> None:
        """Assemble the report: stored table checks (tables not yet checked are checked now), sequences,
        constraints, rebuilt objects. It is stored with the run, so ``run`` never verifies twice."""
        with self._target() as target:
            stored = {c["table"] for c in st.load_checks(target, run_id)}
            tables = [
                (str(r[0]), str(r[1]), tuple(r[2]), int(r[3]))
                for r in target.execute(
                    "select schema_name, table_name, key_columns, row_estimate from pgferry.migration_tables "
                    "where run_id = %s and state <> 'skipped' order by 1, 2",
                    (run_id,),
                )
            ]
        for schema, name, keys, estimate in tables:
            if f"{schema}.{name}" in stored:
                continue
            check: TableCheck = self.retry(
                lambda schema=schema, name=name, keys=keys, estimate=estimate: verify_table(  # type: ignore[misc]
                    self.connect_source, self.connect_target, schema, name, keys, row_estimate=estimate
                ),
                f"verify {schema}.{name}",
            )
            with self._target() as target:
                st.save_check(target, run_id, (schema, name), check)
                if not check.ok:
                    st.set_table_state(target, run_id, (schema, name), "differs")
        report = self._report(run_id, [(s, n) for s, n, _, _ in tables])
        with self._target() as target:
            st.update_run(target, run_id, metrics={"verification": report.as_dict()})
        if not report.ok:
            raise VerificationFailedError.from_report(report, repairable=bool(report.differing_tables))

    def _report(self, run_id: int, tables: list[tuple[str, str]]) -> VerificationReport:
        with self.connect_source() as source, self._target() as target:
            report = VerificationReport(tables=[TableCheck.from_dict(c) for c in st.load_checks(target, run_id)])
            schemas = sorted({s for s, _ in tables})
            report.sequences = verify_sequences(source, target, schemas)
            report.invalid_constraints = invalid_constraints(target, tables)
            report.missing_objects = restore_pending(target, run_id)
            checked = {t.table for t in report.tables}
            report.unverified_tables = [f"{s}.{n}" for s, n in tables if f"{s}.{n}" not in checked]
        return report

    # -- verify / status / rollback ---------------------------------------------------------------------
    def verify(self, run_id: int | None = None) -> VerificationReport:
        """Compare source and target now, every table afresh (``jobs`` tables at a time); stores nothing."""
        with self._target() as target:
            run = st.latest_run(target)
            if run is None or (run_id is not None and run.id != run_id):
                raise MigrationError("no migration recorded on the target; run `pgferry migrate run` first")
            run_id = run.id
            tables = [
                (str(r[0]), str(r[1]), tuple(r[2]), int(r[3]))
                for r in target.execute(
                    "select schema_name, table_name, key_columns, row_estimate from pgferry.migration_tables "
                    "where run_id = %s and state <> 'skipped' order by 1, 2",
                    (run_id,),
                )
            ]
        from concurrent.futures import ThreadPoolExecutor

        def check(entry: tuple[str, str, tuple[str, ...], int]) -> TableCheck:
            schema, name, keys, estimate = entry
            result: TableCheck = self.retry(
                lambda: verify_table(
                    self.connect_source, self.connect_target, schema, name, keys, row_estimate=estimate
                ),
                f"verify {schema}.{name}",
            )
            return result

        with ThreadPoolExecutor(max_workers=self.options.jobs, thread_name_prefix="pgferry-verify") as pool:
            checks = list(pool.map(check, tables))
        with self.connect_source() as source, self._target() as target:
            schemas = sorted({s for s, _, _, _ in tables})
            return VerificationReport(
                tables=checks,
                sequences=verify_sequences(source, target, schemas),
                invalid_constraints=invalid_constraints(target, [(s, n) for s, n, _, _ in tables]),
                missing_objects=restore_pending(target, run_id),
            )

    def status(self) -> MigrationStatus:
        """The latest run as persisted on the target; safe to call while another process runs it."""
        return self.status_of(self.options.target_url, self.options.source_url)

    @staticmethod
    def status_of(target_url: DatabaseUrl, source_url: DatabaseUrl | None = None) -> MigrationStatus:
        """:meth:`status` with only the target's URL (``pgferry migrate status`` needs no source; with one, the
        source's replication slot is checked too)."""
        with Migration._connect(target_url.get_secret_value(), "target") as conn:
            run = st.latest_run(conn)
            if run is None:
                return MigrationStatus(run_id=None)
            progress = st.progress_summary(conn, run.id)
            elapsed = conn.execute(
                "select extract(epoch from now() - started_at) from pgferry.migration_runs where id = %s", (run.id,)
            ).fetchone()
            streams, warnings = _stream_status(conn, run.id, source_url)
        total_rows = sum(t["row_estimate"] for t in progress["tables"]) or 0
        seconds = float(elapsed[0]) if elapsed else 0.0
        rate = progress["rows_copied"] / seconds if seconds else 0.0
        remaining = max(0, total_rows - progress["rows_copied"])
        return MigrationStatus(
            run_id=run.id,
            phase=run.phase,
            status=run.status,
            tables_total=len(progress["tables"]),
            tables_completed=sum(1 for t in progress["tables"] if t["chunks"] and t["chunks"] == t["chunks_done"]),
            chunks_total=progress["chunks_total"],
            chunks_done=progress["chunks_done"],
            records_migrated=progress["rows_copied"],
            bytes_migrated=progress["bytes_copied"],
            estimated_seconds_remaining=round(remaining / rate, 1) if rate and run.status == "running" else None,
            phase_seconds=run.phase_seconds,
            errors=progress["errors"],
            streams=streams,
            warnings=warnings,
        )

    def rollback(self, run_id: int | None = None) -> Any:
        """Return the target to its state before the migration (see :mod:`pgferry.migrate.rollback`)."""
        from pgferry.migrate.rollback import rollback

        return rollback(self, run_id)

    def summary(self, run_id: int) -> MigrationSummary:
        """The stored summary of run ``run_id`` (verification included, as the run stored it)."""
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
        metrics = row[2] or {}
        verification = VerificationReport.from_dict(metrics["verification"]) if "verification" in metrics else None
        recorded = dict(row[1] or {})
        return MigrationSummary(
            run_id=run_id,
            status=str(row[0]),
            phase_seconds={p: float(recorded[p]) for p in PHASES if p in recorded},
            tables=tables,
            retries=self.retries,
            errors=errors,
            skipped_tables=[t.table for t in tables if t.state == "skipped"],
            verification=verification,
            resumed=False,
        )


def _stream_status(
    target: psycopg.Connection[Any], run_id: int, source_url: DatabaseUrl | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """An online run's streams: position, lag, and whether each slot is alive and how much WAL it holds.

    A slot is the one thing that can silently end an online migration: Neon drops slots inactive for about
    40 hours and a branch restore removes them, and a live slot nobody reads fills the disk with WAL.
    """
    from pgferry.replication import get_slot, slot_lag_bytes

    if target.execute("select to_regclass('pgferry.migration_streams')").fetchone() == (None,):
        return [], []
    streams: list[dict[str, Any]] = []
    warnings: list[str] = []
    for direction in ("forward", "reverse"):
        stream = st.load_stream(target, run_id, direction)
        if stream is None:
            continue
        entry: dict[str, Any] = {
            "direction": direction,
            "slot": stream.slot,
            "applied_lsn": None if stream.applied_lsn is None else str(stream.applied_lsn),
            "changes_applied": stream.changes_applied,
            "lag_bytes": stream.lag_bytes,
            "lag_seconds": stream.lag_seconds,
        }
        conn: psycopg.Connection[Any] | None = None
        try:
            if direction == "reverse":
                conn = target
            elif source_url is not None:
                conn = Migration._connect(source_url.get_secret_value(), "source")
            if conn is not None:
                slot = get_slot(conn, stream.slot)
                entry["slot_alive"] = slot is not None
                if slot is None:
                    warnings.append(f"replication slot {stream.slot} ({direction}) is GONE: the stream cannot resume")
                else:
                    entry["slot_active"] = slot.active
                    entry["retained_wal_bytes"] = slot_lag_bytes(conn, stream.slot)
                    if not slot.active:
                        warnings.append(
                            f"replication slot {stream.slot} ({direction}) is not being read: it holds "
                            f"{entry['retained_wal_bytes']:,} bytes of WAL and Neon drops inactive slots after about "
                            "40 hours; is `pgferry migrate run --online` running?"
                        )
        except psycopg.Error as exc:
            warnings.append(f"could not check slot {stream.slot}: {str(exc).splitlines()[0] if str(exc) else exc}")
        finally:
            if conn is not None and conn is not target:
                conn.close()
        streams.append(entry)
    return streams, warnings


def _same_endpoint(pgconn: Any, url: str) -> bool:
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return False
    host = (pgconn.host or b"").decode(errors="replace")
    port = (pgconn.port or b"").decode(errors="replace")
    db = (pgconn.db or b"").decode(errors="replace")
    return (
        str(params.get("host", "")) == host
        and str(params.get("port", "5432")) == (port or "5432")
        and str(params.get("dbname", "")) == db
    )


def _referenced_table(definition: str, default_schema: str) -> str:
    import re

    match = re.search(r"REFERENCES\s+([^\s(]+)\s*\(", definition, re.IGNORECASE)
    referenced = match.group(1).replace('"', "") if match else ""
    return referenced if "." in referenced else f"{default_schema}.{referenced}"


def _owned_sequence_positions(target: psycopg.Connection[Any], tables: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Positions of the sequences owned by target tables that exist already, so a rollback can put them back."""
    positions: list[dict[str, Any]] = []
    for schema, table in tables:
        for (seq,) in target.execute(
            "select pg_get_serial_sequence(format('%%I.%%I', %s::text, %s::text), a.attname) from pg_attribute a "
            "where a.attrelid = to_regclass(format('%%I.%%I', %s::text, %s::text)) and a.attnum > 0 "
            "and not a.attisdropped",
            (schema, table, schema, table),
        ).fetchall():
            if seq is None:
                continue
            row = target.execute(sql.SQL("select last_value, is_called from {}").format(sql.SQL(seq))).fetchone()
            if row is not None:
                positions.append({"sequence": seq, "last_value": int(row[0]), "is_called": bool(row[1])})
    return positions
