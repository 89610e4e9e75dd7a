"""Online migration: follow the source by logical replication, cut over in seconds, and go back without loss.

The lifecycle, each step resumable from the state on the target (``pgferry.migration_streams``):

1. **Before the copy** a publication for the migrated tables and a ``pgoutput`` slot are created on the source;
   the slot's exported snapshot is the one the bulk copy reads, so copy and stream meet exactly (no gap, no
   overlap). If the copy is interrupted, unfinished tables are emptied and copied again under the snapshot of
   a short-lived second slot, and the stream skips their changes up to that slot's start
   (``migration_tables.copy_lsn``).
2. **Follow** (:func:`follow`): the stream is applied to the target by :class:`~pgferry.migrate.apply.
   ChangeApplier`, many source transactions per target transaction, the applied position stored in the same
   transaction. Lag (bytes of WAL behind the source, seconds behind its last commit) is kept in the state for
   ``status`` and the metrics.
3. **Cut-over** (:func:`cutover`, another process): the source is fenced (read-only by default for new
   sessions, open sessions given a grace period, then ended), a marker is written into its WAL, and once the
   follower has applied the marker the target has everything: sequences are set, a reverse slot is created on
   the target, both sides are verified, and only then is the switch announced, with the write downtime
   measured from the fence. Any failure before that unfences the source.
4. **Reverse** (:func:`reverse`): from the cut-over on, the target's changes stream back to the source, which
   stays an exact copy. ``rollback`` waits for that stream to catch up (a marker again), fences the target and
   unfences the source; ``finish`` drops the reverse stream and keeps the target.

Slots and publications are named after the run (``pgferry_fwd_<run>``, ``pgferry_rev_<run>``) and removed by
``finish`` and ``rollback``; ``status`` reports whether they are alive and how much WAL they hold.
It must not copy data itself (the pipeline does) nor build verification (``verify`` does).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import structlog
from psycopg import sql

from pgferry.migrate import state as st
from pgferry.migrate.apply import ApplyResult, ChangeApplier
from pgferry.migrate.errors import MigrationError
from pgferry.migrate.verify import verify_sequences
from pgferry.replication import (
    Lsn,
    ReplicationReader,
    ReplicationStreamEndedError,
    SlotNotFoundError,
    Transaction,
    create_slot,
    drop_publication,
    drop_slot,
    ensure_publication,
    exported_snapshot,
    get_slot,
)

if TYPE_CHECKING:
    from pgferry.migrate.engine import Migration

__all__ = [
    "CutoverError",
    "CutoverReport",
    "FollowLostError",
    "cutover",
    "drop_forward_stream",
    "finish",
    "follow",
    "forward_names",
    "online_snapshot",
    "reverse",
    "rollback_after_cutover",
]

log = structlog.get_logger("pgferry.migrate.online")

BATCH_CHANGES = 20_000
QUEUED_TRANSACTIONS = 20_000
REPORT_SECONDS = 10.0
BATCH_SECONDS = 0.05
POLL_SECONDS = 0.05
SOURCE_PROGRESS_DDL = """
create schema if not exists pgferry;
create table if not exists pgferry.reverse_progress (
  run_token text primary key,
  applied_lsn pg_lsn,
  marker text,
  changes_applied bigint not null default 0,
  updated_at timestamptz not null default now()
);
-- user triggers the reverse stream had to disable (a role that may not set session_replication_role)
create table if not exists pgferry.reverse_disabled_triggers (
  table_name text not null,
  trigger_name text not null,
  primary key (table_name, trigger_name)
);
"""


class FollowLostError(MigrationError):
    """The replication slot the follow needs is gone: continuing would silently lose changes."""


class CutoverError(MigrationError):
    """The cut-over could not finish; the source was made writable again."""


@dataclass(frozen=True)
class CutoverReport:
    downtime_seconds: float
    fence_lsn: str
    verified: bool
    target_url: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "downtime_seconds": round(self.downtime_seconds, 3),
            "fence_lsn": self.fence_lsn,
            "verified": self.verified,
            "switch_to": self.target_url,
        }


def forward_names(run_id: int) -> tuple[str, str]:
    """(slot, publication) of the source → target stream."""
    return f"pgferry_fwd_{run_id}", f"pgferry_fwd_{run_id}"


def reverse_names(run_id: int) -> tuple[str, str]:
    """(slot, publication) of the target → source stream."""
    return f"pgferry_rev_{run_id}", f"pgferry_rev_{run_id}"


def _tables(target: psycopg.Connection[Any], run_id: int) -> list[str]:
    return [
        f"{r[0]}.{r[1]}"
        for r in target.execute(
            "select schema_name, table_name from pgferry.migration_tables where run_id = %s and state <> 'skipped' "
            "order by 1, 2",
            (run_id,),
        )
    ]


def _qualified(name: str) -> str:
    schema, table = name.split(".", 1)
    return sql.Identifier(schema, table).as_string(None)


# -- 1. the copy's snapshot --------------------------------------------------------------------------------


@contextlib.contextmanager
def online_snapshot(migration: Migration, run_id: int) -> Iterator[tuple[str, Lsn]]:
    """The snapshot the bulk copy reads, and the stream position it corresponds to.

    The first time, the forward slot is created with it. After an interruption (the snapshot died with the
    process or the source), a temporary slot provides a new one: unfinished tables are emptied and copied
    again under it, and the stream skips their changes before its start.
    """
    slot, publication = forward_names(run_id)
    source_url = migration.options.source_url
    with migration.connect_target() as target:
        tables = _tables(target, run_id)
        stream = st.load_stream(target, run_id, "forward")
    with migration.connect_source() as source:
        ensure_publication(source, publication, [_qualified(t) for t in tables])
        exists = get_slot(source, slot) is not None
    if stream is None or not exists:
        if stream is not None and not exists:
            raise FollowLostError(
                f"the replication slot {slot} on the source is gone (Neon drops slots inactive for about 40 hours, "
                "a branch restore removes them): the changes since the copy started are lost to it; roll back "
                "(`pgferry migrate rollback`) and run again"
            )
        with exported_snapshot(source_url, slot) as info:
            assert info.snapshot_name is not None
            with migration.connect_target() as target:
                st.save_stream(
                    target, run_id, "forward", slot=slot, publication=publication, start_lsn=info.consistent_point
                )
            yield info.snapshot_name, info.consistent_point
        return
    temporary = f"{slot}_snap_{uuid.uuid4().hex[:8]}"
    try:
        with exported_snapshot(source_url, temporary) as info:
            assert info.snapshot_name is not None
            yield info.snapshot_name, info.consistent_point
    finally:
        with migration.connect_source() as source:
            drop_slot(source, temporary)


def reset_unfinished_tables(target: psycopg.Connection[Any], run_id: int, copy_lsn: Lsn) -> list[str]:
    """Tables whose copy did not finish: emptied, their chunks pending again, to be copied at ``copy_lsn``.

    A table copied partly under one snapshot and partly under another cannot be lined up with the stream, so
    it starts over. Tables not started yet just take the new position.
    """
    reset: list[str] = []
    rows = target.execute(
        "select t.schema_name, t.table_name, exists (select 1 from pgferry.migration_chunks c where c.run_id = "
        "t.run_id and c.schema_name = t.schema_name and c.table_name = t.table_name and c.state = 'done') "
        "from pgferry.migration_tables t where t.run_id = %s and t.state = 'pending'",
        (run_id,),
    ).fetchall()
    with target.transaction():
        for schema, table, started in rows:
            if started:
                target.execute(sql.SQL("truncate only {}").format(sql.Identifier(schema, table)))
                target.execute(
                    "update pgferry.migration_chunks set state = 'pending', rows_copied = null, bytes_copied = null "
                    "where run_id = %s and schema_name = %s and table_name = %s",
                    (run_id, schema, table),
                )
                reset.append(f"{schema}.{table}")
            target.execute(
                "update pgferry.migration_tables set copy_lsn = %s where run_id = %s and schema_name = %s "
                "and table_name = %s",
                (str(copy_lsn), run_id, schema, table),
            )
    return reset


# -- 2. follow ---------------------------------------------------------------------------------------------


def _skip_floors(target: psycopg.Connection[Any], run_id: int, start: Lsn) -> dict[str, Lsn]:
    return {
        f"{r[0]}.{r[1]}": Lsn.parse(str(r[2]))
        for r in target.execute(
            "select schema_name, table_name, copy_lsn::text from pgferry.migration_tables where run_id = %s "
            "and copy_lsn is not null and copy_lsn > %s::pg_lsn",
            (run_id, str(start)),
        )
    }


def follow(migration: Migration, run_id: int, stop: threading.Event | None = None) -> None:
    """Apply the source's changes to the target until the cut-over has happened (or ``stop`` is set)."""
    slot, publication = forward_names(run_id)
    with migration.connect_target() as target:
        stream = st.load_stream(target, run_id, "forward")
        if stream is None:
            raise MigrationError(f"run {run_id} has no forward stream; it was not started with --online")
        floors = _skip_floors(target, run_id, stream.start_lsn)
    applied = stream.applied_lsn or Lsn(0)

    def done() -> bool:
        return (stop is not None and stop.is_set()) or _phase(migration, run_id) not in {"follow", "cutover"}

    with migration.connect_target() as target, ReplicationReader(migration.options.source_url, messages=True) as reader:
        applier = ChangeApplier(target, skip_before=floors)
        reader.start(slot, [publication], start_lsn=applied)
        lag = _LagMeter(migration, run_id, "forward", migration.connect_source)
        try:
            _stream_loop(reader, applier, applied, lambda c, r: _record_forward(c, run_id, r), lag, done)
        except SlotNotFoundError as exc:
            if done():
                return
            raise FollowLostError(
                f"the replication slot {slot} on the source disappeared during the follow ({exc}); changes made "
                "since are lost to it: roll back (`pgferry migrate rollback`) and run again"
            ) from exc


def _stream_loop(
    reader: ReplicationReader,
    applier: ChangeApplier,
    applied: Lsn,
    record: Callable[[psycopg.Connection[Any], ApplyResult], None],
    lag: _LagMeter,
    done: Callable[[], bool],
) -> None:
    """Decode on one thread, apply on this one: decoding is Python work, applying mostly waits on the server,
    so the two overlap (about twice the rate of doing them one after the other)."""
    arrived: queue.Queue[Transaction | BaseException | None] = queue.Queue(maxsize=QUEUED_TRANSACTIONS)

    def decode() -> None:
        try:
            for txn in reader.transactions():
                arrived.put(txn)
        except BaseException as exc:  # handed to the applying thread, which raises it
            arrived.put(exc)
        finally:
            arrived.put(None)

    decoder = threading.Thread(target=decode, name="pgferry-decode", daemon=True)
    decoder.start()
    last_poll = 0.0
    try:
        while True:
            now = time.monotonic()
            if now - last_poll >= 0.5:
                last_poll = now
                if done():
                    return
                lag.sample(applier.conn)
            batch = _next_batch(arrived)
            batch = [t for t in batch if t.commit_lsn > applied]
            if not batch:
                continue
            result = applier.apply(batch, record)
            if result.last is not None:
                applied = result.last.commit_lsn
                reader.confirm(result.last)
                lag.applied(result)
    finally:
        reader.stop()
        with contextlib.suppress(queue.Empty):
            while True:  # unblock a decoder waiting on a full queue
                arrived.get_nowait()
        decoder.join(10)


def _next_batch(arrived: queue.Queue[Transaction | BaseException | None]) -> list[Transaction]:
    """What has arrived, up to :data:`BATCH_CHANGES` changes; waits at most :data:`BATCH_SECONDS` for a first."""
    batch: list[Transaction] = []
    changes = 0
    timeout: float | None = BATCH_SECONDS
    while changes < BATCH_CHANGES:
        try:
            item = arrived.get(timeout=timeout) if timeout is not None else arrived.get_nowait()
        except queue.Empty:
            break
        if item is None:
            raise ReplicationStreamEndedError("the replication stream ended")
        if isinstance(item, BaseException):
            raise item
        batch.append(item)
        changes += len(item.changes)
        timeout = None  # then take only what is already there
    return batch


def _record_forward(conn: psycopg.Connection[Any], run_id: int, result: ApplyResult) -> None:
    assert result.last is not None
    conn.execute(
        "update pgferry.migration_streams set applied_lsn = %s, changes_applied = changes_applied + %s, "
        "marker = coalesce(%s, marker), last_commit_at = %s, updated_at = now() "
        "where run_id = %s and direction = 'forward'",
        (
            str(result.last.commit_lsn),
            result.changes,
            result.markers[-1] if result.markers else None,
            result.last.commit_ts,
            run_id,
        ),
    )


class _LagMeter:
    """How far behind the applier is: bytes of WAL and seconds, kept in the state and the metrics."""

    def __init__(
        self,
        migration: Migration,
        run_id: int,
        direction: str,
        connect_origin: Callable[[], psycopg.Connection[Any]],
    ) -> None:
        self.migration = migration
        self.run_id = run_id
        self.direction = direction
        self.connect_origin = connect_origin
        self.last_commit: Any = None
        self.backlog = False
        self.last_report = 0.0

    def applied(self, result: ApplyResult) -> None:
        if result.last is not None:
            self.last_commit = result.last.commit_ts
        self.backlog = result.changes >= BATCH_CHANGES
        self.migration.metrics.applied_changes.labels(self.direction).inc(result.changes)

    def sample(self, target: psycopg.Connection[Any]) -> None:
        try:
            with self.connect_origin() as origin:
                row = origin.execute("select pg_current_wal_lsn()::text").fetchone()
        except psycopg.Error:
            return  # the origin is restarting; the reader reconnects on its own
        current = str(row[0]) if row else None
        stored = target.execute(
            "select applied_lsn::text, last_commit_at from pgferry.migration_streams "
            "where run_id = %s and direction = %s",
            (self.run_id, self.direction),
        ).fetchone()
        if stored is None or current is None:
            return
        lag_bytes = max(0, int(Lsn.parse(current)) - int(Lsn.parse(stored[0] or "0/0")))
        seconds = 0.0
        if self.backlog and stored[1] is not None:
            seconds = max(0.0, time.time() - stored[1].timestamp())
        target.execute(
            "update pgferry.migration_streams set lag_bytes = %s, lag_seconds = %s where run_id = %s "
            "and direction = %s",
            (lag_bytes, seconds, self.run_id, self.direction),
        )
        self.migration.metrics.lag_bytes.labels(self.direction).set(lag_bytes)
        self.migration.metrics.lag_seconds.labels(self.direction).set(seconds)
        now = time.monotonic()
        if now - self.last_report >= REPORT_SECONDS:
            self.last_report = now
            self.migration.reporter.message(
                f"following: {lag_bytes:,} bytes of WAL and {seconds:.1f}s behind the source"
            )


def _phase(migration: Migration, run_id: int) -> str:
    with migration.connect_target() as target:
        row = target.execute("select phase from pgferry.migration_runs where id = %s", (run_id,)).fetchone()
    return str(row[0]) if row else ""


# -- 3. cut-over -------------------------------------------------------------------------------------------


def _database(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("select current_database()").fetchone()
    assert row is not None
    return str(row[0])


def fence(conn: psycopg.Connection[Any], grace: float) -> None:
    """Stop writes to ``conn``'s database: read-only by default for new sessions; open sessions are ended as
    soon as they are between transactions (an application reconnects into a read-only session), and any still
    inside a transaction after ``grace`` seconds is ended too. Replication connections stay."""
    database = sql.Identifier(_database(conn))
    _writable(conn)
    conn.execute(sql.SQL("alter database {} set default_transaction_read_only = on").format(database))
    sessions = (
        "select pid, state in ('idle', 'disabled') or backend_xid is null and state <> 'active' from pg_stat_activity "
        "where datname = current_database() and pid <> pg_backend_pid() and backend_type = 'client backend'"
    )
    deadline = time.monotonic() + grace
    while True:
        rows = conn.execute(sessions).fetchall()
        late = time.monotonic() >= deadline
        busy = False
        for pid, between_transactions in rows:
            if between_transactions or late:
                conn.execute("select pg_terminate_backend(%s)", (pid,))
            else:
                busy = True
        if not busy:
            return
        time.sleep(0.02)


def unfence(conn: psycopg.Connection[Any]) -> None:
    _writable(conn)
    conn.execute(
        sql.SQL("alter database {} reset default_transaction_read_only").format(sql.Identifier(_database(conn)))
    )


def _writable(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    conn.execute("set default_transaction_read_only = off")  # our own session, whatever the database's default
    return conn


def _emit_marker(conn: psycopg.Connection[Any], text: str) -> str:
    row = conn.execute("select pg_logical_emit_message(true, 'pgferry', %s)::text", (text,)).fetchone()
    assert row is not None
    return str(row[0])


def _wait_for_marker(read: Callable[[], str | None], marker: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read() == marker:
            return
        time.sleep(POLL_SECONDS)
    raise CutoverError(
        f"{what} did not catch up within {timeout:g}s; is `pgferry migrate run --online` running? Start it (it "
        "resumes) and try again"
    )


def cutover(migration: Migration, *, grace: float = 5.0, timeout: float = 120.0, verify: bool = True) -> CutoverReport:
    """Fence the source, wait for the target to have everything, set sequences, verify, start the reverse
    stream, then report the switch. Any failure before the switch makes the source writable again."""
    with migration.connect_target() as target:
        run = st.latest_run(target)
        if run is None or run.options.get("online") is not True:
            raise CutoverError("no online migration is recorded on the target; start one with `migrate run --online`")
        if run.phase in {"plan", "schema", "prepare", "data", "indexes"}:
            raise CutoverError(
                f"the bulk copy is still running (phase {run.phase}); cut over once `migrate status` shows phase follow"
            )
        if run.phase != "follow":
            raise CutoverError(f"run {run.id} is in phase {run.phase}; only a following run can be cut over")
        tables = _tables(target, run.id)
    with migration.connect_source() as source:
        following = get_slot(source, forward_names(run.id)[0])
    if following is None or not following.active:
        raise CutoverError(
            "nothing is following the source right now (its replication slot is not being read); start "
            "`pgferry migrate run --online` (it resumes the follow), then cut over; the source was not touched"
        )
    started = time.monotonic()
    created_reverse = False
    with migration.connect_source() as source:
        _writable(source)
        fence(source, grace)
        try:
            token = f"cutover:{run.id}:{uuid.uuid4().hex}"
            fence_lsn = _emit_marker(source, token)
            _wait_for_marker(lambda: _stream_marker(migration, run.id, "forward"), token, timeout, "the target")
            with migration.connect_target() as target:
                _set_sequences(source, target, sorted({t.split(".", 1)[0] for t in tables}))
                slot, publication = reverse_names(run.id)
                ensure_publication(target, publication, [_qualified(t) for t in tables])
            info = create_slot(migration.options.target_url, slot)
            created_reverse = True
            with migration.connect_target() as target:
                st.save_stream(
                    target, run.id, "reverse", slot=slot, publication=publication, start_lsn=info.consistent_point
                )
            source.execute(SOURCE_PROGRESS_DDL.encode())
            source.execute(
                "insert into pgferry.reverse_progress (run_token) values (%s) on conflict do nothing", (_token(run.id),)
            )
            verified = False
            if verify:
                report = migration.verify(run.id)
                if not report.ok:
                    raise CutoverError("verification failed at cut-over: " + "; ".join(report.problems()[:3]))
                verified = True
            with migration.connect_target() as target:
                st.set_phase(target, run.id, "reverse")
                st.record_event(target, run.id, level="info", phase="cutover", message=f"cut over at {fence_lsn}")
        except BaseException:
            with contextlib.suppress(Exception):
                unfence(source)
            if created_reverse:
                with contextlib.suppress(Exception), migration.connect_target() as target:
                    slot, publication = reverse_names(run.id)
                    drop_slot(target, slot)
                    drop_publication(target, publication)
                    target.execute(
                        "delete from pgferry.migration_streams where run_id = %s and direction = 'reverse'", (run.id,)
                    )
            raise
    downtime = time.monotonic() - started
    return CutoverReport(downtime, fence_lsn, verified, str(migration.options.target_url))


def _stream_marker(migration: Migration, run_id: int, direction: str) -> str | None:
    with migration.connect_target() as target:
        stream = st.load_stream(target, run_id, direction)
    return None if stream is None else stream.marker


def _set_sequences(source: psycopg.Connection[Any], target: psycopg.Connection[Any], schemas: list[str]) -> None:
    for entry in verify_sequences(source, target, schemas):
        if entry["target_next"] is None:
            continue
        schema, name = entry["sequence"].split(".", 1)
        target.execute(
            "select setval(%s, %s, false)", (sql.Identifier(schema, name).as_string(target), entry["source_next"])
        )


def _token(run_id: int) -> str:
    return f"run-{run_id}"


# -- 4. reverse, finish, rollback ---------------------------------------------------------------------------


def reverse(migration: Migration, run_id: int, stop: threading.Event | None = None) -> None:
    """Apply the target's changes to the source until ``finish`` or ``rollback`` ends the migration."""
    slot, publication = reverse_names(run_id)
    with migration.connect_source() as source:
        row = source.execute(
            "select applied_lsn::text from pgferry.reverse_progress where run_token = %s", (_token(run_id),)
        ).fetchone()
    applied = Lsn.parse(row[0]) if row and row[0] else Lsn(0)

    def done() -> bool:
        return (stop is not None and stop.is_set()) or _phase(migration, run_id) != "reverse"

    def record(conn: psycopg.Connection[Any], result: ApplyResult) -> None:
        assert result.last is not None
        conn.execute(
            "update pgferry.reverse_progress set applied_lsn = %s, changes_applied = changes_applied + %s, "
            "marker = coalesce(%s, marker), updated_at = now() where run_token = %s",
            (
                str(result.last.commit_lsn),
                result.changes,
                result.markers[-1] if result.markers else None,
                _token(run_id),
            ),
        )

    def remember(conn: psycopg.Connection[Any], table: str, triggers: list[str]) -> None:
        with conn.cursor() as cur:
            cur.executemany(
                "insert into pgferry.reverse_disabled_triggers values (%s, %s) on conflict do nothing",
                [(table, name) for name in triggers],
            )

    with migration.connect_source() as source, ReplicationReader(migration.options.target_url, messages=True) as reader:
        _writable(source)
        applier = ChangeApplier(source, on_triggers_disabled=remember)
        reader.start(slot, [publication], start_lsn=applied)
        lag = _LagMeter(migration, run_id, "reverse", migration.connect_target)
        try:
            _stream_loop(reader, applier, applied, record, _SourceLag(lag), done)
        except SlotNotFoundError as exc:
            if done():
                return
            raise FollowLostError(
                f"the reverse replication slot {slot} on the target disappeared ({exc}); the source no longer "
                "follows the target"
            ) from exc


class _SourceLag(_LagMeter):
    """The reverse direction keeps its position on the source; lag is only counted, not stored."""

    def __init__(self, inner: _LagMeter) -> None:
        super().__init__(inner.migration, inner.run_id, inner.direction, inner.connect_origin)

    def sample(self, target: psycopg.Connection[Any]) -> None:
        return None


def finish(migration: Migration) -> None:
    """End the migration on the target: drop the reverse stream and everything pgferry made on the source."""
    with migration.connect_target() as target:
        run = st.latest_run(target)
        if run is None or run.options.get("online") is not True or run.phase != "reverse":
            raise MigrationError("`finish` ends an online migration after its cut-over; nothing to finish here")
        st.set_phase(target, run.id, "complete", status="completed")
    _drop_streams(migration, run.id)


def rollback_after_cutover(migration: Migration, *, grace: float = 5.0, timeout: float = 120.0) -> float:
    """Make the source the primary again without losing a write; returns how long writes were stopped."""
    with migration.connect_target() as target:
        run = st.latest_run(target)
    assert run is not None
    started = time.monotonic()
    with migration.connect_target() as target:
        _writable(target)
        fence(target, grace)
        token = f"rollback:{run.id}:{uuid.uuid4().hex}"
        _emit_marker(target, token)

    def source_marker() -> str | None:
        with migration.connect_source() as source:
            row = source.execute(
                "select marker from pgferry.reverse_progress where run_token = %s", (_token(run.id),)
            ).fetchone()
        return None if row is None else row[0]

    try:
        _wait_for_marker(source_marker, token, timeout, "the source")
    except CutoverError:
        with migration.connect_target() as target:
            unfence(target)
        raise
    with migration.connect_source() as source:
        _writable(source)
        _enable_triggers_again(source)  # before the application can write there again
        unfence(source)
    with migration.connect_target() as target:
        st.set_phase(target, run.id, "rolled_back", status="rolled_back")
    _drop_streams(migration, run.id)
    return time.monotonic() - started


def _enable_triggers_again(source: psycopg.Connection[Any]) -> None:
    """The user triggers the reverse stream disabled (by name), enabled again."""
    if source.execute("select to_regclass('pgferry.reverse_disabled_triggers')").fetchone() == (None,):
        return
    for table, name in source.execute(
        "select table_name, trigger_name from pgferry.reverse_disabled_triggers"
    ).fetchall():
        schema, relname = str(table).split(".", 1)
        source.execute(
            sql.SQL("alter table {} enable trigger {}").format(sql.Identifier(schema, relname), sql.Identifier(name))
        )
    source.execute("delete from pgferry.reverse_disabled_triggers")


def drop_forward_stream(migration: Migration, run_id: int) -> None:
    """After the cut-over the source → target stream is over: its slot would only hold WAL on the source."""
    slot, publication = forward_names(run_id)
    with migration.connect_source() as source:
        _writable(source)
        drop_slot(source, slot)
        drop_publication(source, publication)


def _drop_streams(migration: Migration, run_id: int) -> None:
    """Every slot, publication and progress table pgferry created for ``run_id``, on both sides."""
    fwd_slot, fwd_pub = forward_names(run_id)
    rev_slot, rev_pub = reverse_names(run_id)
    with migration.connect_target() as target:
        drop_slot(target, rev_slot)
        drop_publication(target, rev_pub)
    with migration.connect_source() as source:
        _writable(source)
        drop_slot(source, fwd_slot)
        drop_publication(source, fwd_pub)
        _enable_triggers_again(source)
        source.execute("drop table if exists pgferry.reverse_progress, pgferry.reverse_disabled_triggers")
        source.execute(
            "do $$ begin if not exists (select 1 from pg_class where relnamespace = 'pgferry'::regnamespace) "
            "then drop schema pgferry; end if; exception when invalid_schema_name then null; end $$"
        )
