"""The data phase as a pipeline: copy chunks, and rebuild and verify each table as soon as its data is in.

Three kinds of work run side by side, each from its own priority queue:

* **copy** (``jobs`` workers): chunks stream from the source's exported snapshot into the target, each chunk
  committed (synchronously) together with its done-marker. Tables whose rebuild is most expensive (HNSW and
  other vector or GIN indexes) are copied first, so that their index builds start while the rest still copies.
* **indexes** (``jobs`` workers): when a table's last chunk is in, its dropped indexes are rebuilt (several of
  one table at once, the expensive ones first), then its keys attached ``USING INDEX``. Foreign keys wait for
  the ``indexes`` phase, when every referenced key exists.
* **verify** (one worker, two connections): when a table's last chunk is in, both sides are read once,
  sequentially, and compared bucket by bucket (:mod:`pgferry.migrate.verify`).

On one machine this keeps both cores busy; between Neon and Supabase, where the copy waits on the network and
index builds on the target's CPU, it hides one behind the other. A table the verifier (or a unique index)
finds different is marked ``differs`` and the run goes on; a later run repairs exactly the differing buckets
(:func:`repair_table`) before rebuilding and verifying that table again.

What this module must not do: decide phases or policies (``engine`` does), or talk to the operator (the
reporter does).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
import structlog
from psycopg import sql

from pgferry.db.checksum import bucket_expression, hash_method_for, pin_output_settings, table_columns
from pgferry.db.retry import classify_error
from pgferry.migrate import state as st
from pgferry.migrate.copy import ChunkResult, CopySpec, batched_copy_data, copy_table_chunk
from pgferry.migrate.deferred import DeferredObject, restore_one
from pgferry.migrate.errors import MigrationError, on_side
from pgferry.migrate.verify import TableCheck, verify_table

__all__ = ["DataPipeline", "PipelineHost", "SnapshotLostError", "TableWork", "repair_table"]

log = structlog.get_logger("pgferry.migrate")

PARALLEL_BUILD_BYTES = 64 * 1024 * 1024
"""Tables at least this large (heap and TOAST) build their indexes with parallel workers."""
EXPENSIVE_INDEX_METHODS = ("using hnsw", "using ivfflat", "using gin", "using gist", "using spgist")


class SnapshotLostError(Exception):
    """The exported snapshot can no longer be imported: its exporting session ended (source restart)."""


class PipelineHost(Protocol):
    """What the pipeline needs from the migration that runs it (connections, retries, reporting)."""

    def connect_source(self) -> psycopg.Connection[Any]: ...
    def connect_target(self) -> psycopg.Connection[Any]: ...
    def retry(self, fn: Callable[[], Any], operation: str) -> Any: ...
    def on_chunk_copied(self, chunk: st.ChunkRecord, result: ChunkResult) -> None: ...
    def on_table_failed(self, table: TableWork, exc: BaseException, phase: str) -> bool: ...
    def note(self, text: str, *, table: str | None = None, level: str = "info") -> None: ...


@dataclass
class TableWork:
    """One table's place in the pipeline."""

    spec: CopySpec
    row_estimate: int
    bytes_estimate: int
    state: str
    chunks: list[st.ChunkRecord] = field(default_factory=list)
    deferred: list[DeferredObject] = field(default_factory=list)
    verified: bool = False
    remaining_chunks: int = 0
    remaining_indexes: int = 0

    @property
    def qualified(self) -> str:
        return f"{self.spec.schema}.{self.spec.table}"

    @property
    def ident(self) -> tuple[str, str]:
        return (self.spec.schema, self.spec.table)

    @property
    def expensive(self) -> bool:
        return any(_expensive(o) for o in self.deferred)

    @property
    def copy_priority(self) -> tuple[int, int]:
        return (0 if self.expensive else 1, -self.bytes_estimate)


def _expensive(obj: DeferredObject) -> bool:
    return any(m in obj.definition.lower() for m in EXPENSIVE_INDEX_METHODS)


class ExportedSnapshot:
    """The exported snapshot all copy workers read, re-exported if the source loses it (a restart).

    An online migration passes ``fixed``: the snapshot its replication slot exported, which the stream lines up
    with. It cannot be replaced by another one, so losing it stops the copy (a rerun starts the unfinished
    tables over under a new snapshot).
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], fixed: str | None = None) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self.snapshot_id: str | None = fixed
        self.fixed = fixed is not None
        self.exports = 0

    def current(self) -> str:
        if self.fixed:
            assert self.snapshot_id is not None
            return self.snapshot_id
        with self._lock:
            if self.snapshot_id is None or self._conn is None or self._conn.closed or self._conn.broken:
                self._export()
            assert self.snapshot_id is not None
            return self.snapshot_id

    def invalidate(self, snapshot_id: str) -> None:
        if self.fixed:
            raise MigrationError(
                "the copy's snapshot is gone (pgferry or the source restarted during an online copy); run the same "
                "command again: tables not finished are emptied and copied again under a new snapshot"
            )
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


class CopyWorker:
    """One copy job: a source connection inside the shared snapshot and a target connection, reused."""

    def __init__(self, host: PipelineHost, snapshot: ExportedSnapshot, run_id: int) -> None:
        self.host = host
        self.snapshot = snapshot
        self.run_id = run_id
        self.source: psycopg.Connection[Any] | None = None
        self.target: psycopg.Connection[Any] | None = None
        self.imported: str | None = None

    def copy(self, chunk: st.ChunkRecord, spec: CopySpec, on_bytes: Callable[[int], None]) -> ChunkResult | None:
        """Copy one chunk (``None`` if another life of this run already did); raises on failure."""
        target = self._target()
        source = self._source()
        try:
            return copy_table_chunk(source, target, spec, chunk, run_id=self.run_id, on_bytes=on_bytes)
        except st.ChunkAlreadyDoneError:
            return None
        except Exception as exc:
            if classify_error(exc).reconnect or isinstance(exc, SnapshotLostError):
                self.close()
            raise

    def _target(self) -> psycopg.Connection[Any]:
        if self.target is None or self.target.closed or self.target.broken:
            self.target = self.host.connect_target()
            self.target.execute("set session_replication_role = replica")
        return self.target

    def _source(self) -> psycopg.Connection[Any]:
        wanted = self.snapshot.current()
        if self.source is not None and not self.source.closed and not self.source.broken and self.imported == wanted:
            return self.source
        if self.source is not None:
            with contextlib.suppress(Exception):
                self.source.close()
        self.source = self.host.connect_source()
        self.source.execute("begin isolation level repeatable read read only")
        try:
            self.source.execute(sql.SQL("set transaction snapshot {}").format(sql.Literal(wanted)))
        except psycopg.Error as exc:
            if classify_error(exc).retryable:
                raise
            # The exporting session is gone (the source restarted): export a fresh snapshot.
            self.snapshot.invalidate(wanted)
            self.close()
            raise SnapshotLostError(str(exc)) from exc
        self.imported = wanted
        return self.source

    def close(self) -> None:
        for conn in (self.source, self.target):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self.source = self.target = None
        self.imported = None


class _WorkQueue:
    """A priority queue whose consumers also learn when no work can ever arrive again."""

    def __init__(self, tracker: _Outstanding) -> None:
        self._queue: queue.PriorityQueue[tuple[Any, int, Callable[[], None]]] = queue.PriorityQueue()
        self._tracker = tracker
        self._seq = itertools.count()

    def put(self, priority: Any, task: Callable[[], None]) -> None:
        self._tracker.add()
        self._queue.put((priority, next(self._seq), task))

    def serve(self, stop: threading.Event) -> None:
        while not stop.is_set() and not self._tracker.finished():
            try:
                _priority, _seq, task = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                if not stop.is_set():
                    task()
            finally:
                self._tracker.done()


class _Outstanding:
    """Counts queued and running tasks across all queues; zero means the pipeline is finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self) -> None:
        with self._lock:
            self._count += 1

    def done(self) -> None:
        with self._lock:
            self._count -= 1

    def finished(self) -> bool:
        with self._lock:
            return self._count == 0


class DataPipeline:
    """Runs the data phase for ``tables`` and returns when every table is copied, rebuilt and verified."""

    def __init__(
        self,
        host: PipelineHost,
        run_id: int,
        tables: Sequence[TableWork],
        *,
        jobs: int,
        verify: bool,
        repair: bool,
        maintenance_work_mem: str,
        on_bytes: Callable[[str, int], None],
        snapshot: str | None = None,
        connect_verify_source: Callable[[], psycopg.Connection[Any]] | None = None,
    ) -> None:
        self.host = host
        self.run_id = run_id
        self.tables = list(tables)
        self.jobs = max(1, jobs)
        self.verify = verify
        self.repair = repair
        self.maintenance_work_mem = maintenance_work_mem
        self.on_bytes = on_bytes
        self.snapshot = ExportedSnapshot(host.connect_source, fixed=snapshot)
        self.connect_verify_source = connect_verify_source or host.connect_source
        self._outstanding = _Outstanding()
        self.copies = _WorkQueue(self._outstanding)
        self.builds = _WorkQueue(self._outstanding)
        self.heavy_builds = _WorkQueue(self._outstanding)
        self.checks = _WorkQueue(self._outstanding)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._failures: list[BaseException] = []
        self._workers: dict[int, CopyWorker] = {}
        self._verify_connections: list[psycopg.Connection[Any]] = []

    # -- scheduling --------------------------------------------------------------------------------------
    def run(self) -> None:
        for table in sorted(self.tables, key=lambda t: t.copy_priority):
            self._schedule(table)
        threads = [
            *(self._thread(f"copy-{i}", self.copies) for i in range(self.jobs)),
            *(self._thread(f"index-{i}", self.builds) for i in range(self.jobs)),
            self._thread("heavy-index", self.heavy_builds),
            self._thread("verify", self.checks),
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        except BaseException:
            self._stop.set()
            self._cancel_verification()
            raise
        finally:
            self._stop.set()
            self.snapshot.close()
            for worker in self._workers.values():
                worker.close()
        if self._failures:
            raise self._failures[0]
        if self.snapshot.exports > 1:
            self.host.note(
                f"the source snapshot was lost and exported {self.snapshot.exports} times (source restart); "
                "verification compares the final state",
                level="warning",
            )

    def _thread(self, name: str, work: _WorkQueue) -> threading.Thread:
        return threading.Thread(target=work.serve, args=(self._stop,), name=f"pgferry-{name}", daemon=True)

    def _schedule(self, table: TableWork) -> None:
        if table.state == "skipped":
            return
        if table.state == "differs" and self.repair:
            self.copies.put((-1, table.copy_priority), lambda: self._guard(table, "data", self._repair, table))
            return
        if table.state == "pending":
            pending = [c for c in table.chunks if c.state != "done"]
            table.remaining_chunks = len(pending)
            if not pending:
                self._guard(table, "data", self._table_copied, table)
            for chunk in pending:
                self.copies.put(
                    (table.copy_priority, chunk.chunk_no),
                    lambda chunk=chunk: self._guard(table, "data", self._copy_chunk, table, chunk),  # type: ignore[misc]
                )
            return
        if table.state in {"copied", "indexed"}:
            self._after_copy(table)

    def _after_copy(self, table: TableWork) -> None:
        """The table's data is in: rebuild its indexes and verify it, side by side."""
        builds = [o for o in table.deferred if o.kind == "index"]
        table.remaining_indexes = len(builds)
        if not builds:
            self._attach(table)
        for obj in builds:
            # Expensive builds (HNSW above all) go one at a time, each with the server's parallel workers: two
            # single-threaded HNSW builds side by side leave a core idle for as long as the longer one lasts
            # alone, and two parallel ones oversubscribe the cores and spend the difference on lock waits.
            queue = self.heavy_builds if _expensive(obj) else self.builds
            queue.put(
                (-table.bytes_estimate, obj.name),
                lambda obj=obj: self._guard(table, "indexes", self._build_index, table, obj),  # type: ignore[misc]
            )
        if self.verify and not table.verified:
            self.checks.put(table.copy_priority, lambda: self._guard(table, "verify", self._verify, table))

    def _guard(self, table: TableWork, phase: str, fn: Callable[..., None], *args: Any) -> None:
        """Run one task; a failure either skips the table (the host's policy says so) or stops everything."""
        try:
            fn(*args)
        except Exception as exc:
            if self.host.on_table_failed(table, exc, phase):
                with self._lock:
                    table.state = "skipped"
                return
            with self._lock:
                self._failures.append(exc)
            self._stop.set()
            self._cancel_verification()

    # -- copy --------------------------------------------------------------------------------------------
    def _copy_chunk(self, table: TableWork, chunk: st.ChunkRecord) -> None:
        if table.state == "skipped":
            return
        worker = self._worker()
        try:
            result = self.host.retry(
                lambda: worker.copy(chunk, table.spec, lambda n: self.on_bytes(table.qualified, n)),
                f"copy {chunk.qualified} chunk {chunk.chunk_no}",
            )
        except Exception:
            worker.close()
            raise
        if result is not None:
            self.host.on_chunk_copied(chunk, result)
        with self._lock:
            table.remaining_chunks -= 1
            last = table.remaining_chunks == 0 and table.state == "pending"
        if last:
            self._table_copied(table)

    def _worker(self) -> CopyWorker:
        ident = threading.get_ident()
        with self._lock:
            if ident not in self._workers:
                self._workers[ident] = CopyWorker(self.host, self.snapshot, self.run_id)
            return self._workers[ident]

    def _table_copied(self, table: TableWork) -> None:
        """Record, durably, that every chunk of ``table`` is in; chunks found missing are copied again."""

        def record() -> list[st.ChunkRecord]:
            with self.host.connect_target() as target, target.transaction():
                missing = [c for c in st.load_chunks(target, self.run_id, table=table.ident) if c.state != "done"]
                if not missing:
                    st.set_table_state(target, self.run_id, table.ident, "copied")
                return missing

        missing: list[st.ChunkRecord] = self.host.retry(record, f"record {table.qualified} as copied")
        if missing:
            self.host.note(f"{len(missing)} chunks of {table.qualified} are missing on the target; copying them again")
            with self._lock:
                table.remaining_chunks = len(missing)
            for chunk in missing:
                self.copies.put(
                    (table.copy_priority, chunk.chunk_no),
                    lambda chunk=chunk: self._guard(table, "data", self._copy_chunk, table, chunk),  # type: ignore[misc]
                )
            return
        table.state = "copied"
        self._after_copy(table)

    # -- indexes -----------------------------------------------------------------------------------------
    def _build_index(self, table: TableWork, obj: DeferredObject) -> None:
        if table.state in {"skipped", "differs"}:
            return

        def build() -> None:
            with on_side("target"), self.host.connect_target() as conn:
                conn.execute(sql.SQL("set maintenance_work_mem = {}").format(sql.Literal(self.maintenance_work_mem)))
                if _expensive(obj) or table.bytes_estimate >= PARALLEL_BUILD_BYTES:
                    # PostgreSQL sizes parallel index builds by the heap alone; a vector table keeps its rows in
                    # TOAST and gets no worker, leaving one HNSW build on one core for a minute while the others
                    # idle. Let max_parallel_maintenance_workers (the server's setting) apply.
                    conn.execute("set min_parallel_table_scan_size = 0")
                restore_one(conn, self.run_id, obj)

        started = time.monotonic()
        try:
            self.host.retry(build, f"build index {obj.name} on {table.qualified}")
        except psycopg.errors.UniqueViolation as exc:
            self._mark_differs(table, f"duplicate keys while building {obj.name}: {str(exc).splitlines()[0]}")
            return
        log.info("index built", table=table.qualified, index=obj.name, seconds=round(time.monotonic() - started, 2))
        with self._lock:
            table.remaining_indexes -= 1
            last = table.remaining_indexes == 0
        if last:
            self._attach(table)

    def _attach(self, table: TableWork) -> None:
        """Keys and exclusion constraints of ``table``, in order (each ALTER TABLE locks the whole table)."""
        if table.state in {"skipped", "differs"}:
            return
        for obj in [o for o in table.deferred if o.kind in {"attach", "exclusion"}]:

            def attach(obj: DeferredObject = obj) -> None:
                with on_side("target"), self.host.connect_target() as conn:
                    conn.execute(
                        sql.SQL("set maintenance_work_mem = {}").format(sql.Literal(self.maintenance_work_mem))
                    )
                    restore_one(conn, self.run_id, obj)

            try:
                self.host.retry(attach, f"attach {obj.name} to {table.qualified}")
            except psycopg.errors.UniqueViolation as exc:
                self._mark_differs(table, f"duplicate keys while adding {obj.name}: {str(exc).splitlines()[0]}")
                return

        def record() -> None:
            with self.host.connect_target() as target:
                st.set_table_state(target, self.run_id, table.ident, "indexed", only_from=("copied",))

        self.host.retry(record, f"record {table.qualified} as indexed")
        table.state = "indexed"

    # -- verification ------------------------------------------------------------------------------------
    def _verify(self, table: TableWork) -> None:
        if table.state == "skipped":
            return
        check: TableCheck = self.host.retry(
            lambda: verify_table(
                self.connect_verify_source,
                self.host.connect_target,
                table.spec.schema,
                table.spec.table,
                table.spec.key_columns,
                row_estimate=table.row_estimate,
                on_connections=self._track_verification,
            ),
            f"verify {table.qualified}",
        )

        def record() -> None:
            with self.host.connect_target() as target:
                st.save_check(target, self.run_id, table.ident, check)

        self.host.retry(record, f"record the verification of {table.qualified}")
        table.verified = True
        if check.ok:
            self.host.note(f"{table.qualified}: {check.source_rows:,} rows verified identical ({check.seconds:.1f}s)")
        else:
            self._mark_differs(table, check.describe())

    def _track_verification(self, source: psycopg.Connection[Any], target: psycopg.Connection[Any]) -> None:
        with self._lock:
            self._verify_connections = [c for c in self._verify_connections if not c.closed] + [source, target]

    def _cancel_verification(self) -> None:
        """Cancel verification queries on both servers, so that a stopped run leaves nothing running there."""
        with self._lock:
            connections = list(self._verify_connections)
        for conn in connections:
            with contextlib.suppress(Exception):
                if not conn.closed:
                    conn.cancel_safe(timeout=5)

    def _mark_differs(self, table: TableWork, reason: str) -> None:
        table.state = "differs"

        def record() -> None:
            with self.host.connect_target() as target:
                st.set_table_state(target, self.run_id, table.ident, "differs")

        self.host.retry(record, f"record {table.qualified} as differing")
        self.host.note(f"{table.qualified} differs from the source: {reason}", table=table.qualified, level="error")

    # -- repair ------------------------------------------------------------------------------------------
    def _repair(self, table: TableWork) -> None:
        check: TableCheck = self.host.retry(
            lambda: verify_table(
                self.host.connect_source,
                self.host.connect_target,
                table.spec.schema,
                table.spec.table,
                table.spec.key_columns,
                row_estimate=table.row_estimate,
                on_connections=self._track_verification,
            ),
            f"compare {table.qualified} before repairing it",
        )
        if check.differing_buckets:
            self.host.note(
                f"{table.qualified}: copying {len(check.differing_buckets)} of {check.buckets} buckets again "
                f"(source {check.source_rows:,} rows, target {check.target_rows:,})",
                table=table.qualified,
                level="warning",
            )
            self.host.retry(
                lambda: repair_table(
                    self.host.connect_source,
                    self.host.connect_target,
                    table.spec,
                    buckets=check.buckets,
                    bucket_numbers=check.differing_buckets,
                ),
                f"repair {table.qualified}",
            )

        def record() -> None:
            with self.host.connect_target() as target:
                st.set_table_state(target, self.run_id, table.ident, "copied")
                st.forget_check(target, self.run_id, table.ident)

        self.host.retry(record, f"record {table.qualified} as repaired")
        table.state = "copied"
        table.verified = False
        self._after_copy(table)


def repair_table(
    connect_source: Callable[[], psycopg.Connection[Any]],
    connect_target: Callable[[], psycopg.Connection[Any]],
    spec: CopySpec,
    *,
    buckets: int,
    bucket_numbers: Sequence[int],
) -> int:
    """Replace the target's rows of ``bucket_numbers`` with the source's, in one target transaction.

    Buckets are what verification reports, and a bucket holds the same rows on both servers when they agree
    (a key always lands in the same bucket; a keyless row's bucket is its own hash). So deleting a differing
    bucket on the target and copying it again from the source makes it equal, whatever went wrong: a lost
    chunk, a row the source changed after it was copied, a row copied twice.
    """
    table = sql.Identifier(spec.schema, spec.table)
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in spec.columns)
    fmt = sql.SQL("binary" if spec.binary else "text")
    with connect_source() as source, connect_target() as target:
        method = hash_method_for(source, target)
        hashed = table_columns(source, spec.table, schema=spec.schema)

        def in_buckets(conn: psycopg.Connection[Any]) -> sql.Composable:
            bucket = bucket_expression(
                conn,
                spec.table,
                schema=spec.schema,
                columns=hashed,
                key_columns=spec.key_columns,
                buckets=buckets,
                method=method,
            )
            return sql.SQL("{} = any({})").format(bucket, sql.Literal(list(bucket_numbers)))

        copy_out = sql.SQL("copy (select {} from only {} where {}) to stdout (format {})").format(
            columns, table, in_buckets(source), fmt
        )
        copy_in = sql.SQL("copy {} ({}) from stdin (format {})").format(table, columns, fmt)
        with source.transaction(), target.transaction():
            # Bucket expressions print keys and rows as text, and text COPY prints values: both sides alike.
            pin_output_settings(source)
            pin_output_settings(target)
            target.execute("set local session_replication_role = replica")
            deleted = target.execute(sql.SQL("delete from only {} where {}").format(table, in_buckets(target))).rowcount
            with source.cursor() as src, target.cursor() as tgt:
                with src.copy(copy_out) as out, tgt.copy(copy_in) as into:
                    for block in batched_copy_data(out):
                        into.write(block)
                copied = tgt.rowcount
    log.info("repaired", table=f"{spec.schema}.{spec.table}", deleted=deleted, copied=copied)
    return copied
