"""Keeping a service working through database outages: health checks, retries, stale reads, queued writes.

* **Reconnect with backoff and jitter**: psycopg_pool replaces broken connections itself (exponential backoff with
  jitter between attempts); each operation here is one transaction retried by :func:`pgferry.db.retry.call_with_retry`
  under a short :class:`~pgferry.db.retry.RetryPolicy` (full jitter), and only for errors that policy calls safe to
  retry (connection loss, restarts, deadlocks, serialization failures). Everything else reaches the caller at once.
* **Writes** (:meth:`ResilientDatabase.write`) carry an idempotency key. The key is inserted into
  ``pgferry.applied_operations`` (migration 20261130000300) in the same transaction as the write, so a write
  whose commit acknowledgement was lost, retried or replayed, still applies exactly once. A write that cannot
  reach the database goes to the durable queue (:mod:`pgferry.runtime.queue`) and, while anything is queued,
  later writes queue behind it, so :meth:`ResilientDatabase.sync_queued_operations` applies them in the order
  they were accepted.
* **Reads** (:meth:`ResilientDatabase.read`) fall back to the last answer for the same user and key
  (:mod:`pgferry.runtime.cache`) when the database is unreachable, marked ``stale``.

Queued writes run, when replayed, under the claims verified when they were accepted (the token may have expired
since; the write was authorized then). Writes are applied as the user: RLS still decides.

Owns these policies; connections come from :class:`pgferry.runtime.client.DatabaseClient`, classification from
:mod:`pgferry.db.retry`.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import psycopg
import structlog
from psycopg.rows import dict_row

from pgferry.db.retry import RetriesExhaustedError, RetryAttempt, RetryPolicy, call_with_retry, classify_error
from pgferry.db.rls import CLAIMS_SQL, claims_parameters, service_role_claims
from pgferry.observability.metrics import RuntimeMetrics
from pgferry.runtime.cache import ReadCache
from pgferry.runtime.client import DatabaseClient
from pgferry.runtime.errors import DatabaseUnavailableError, RuntimeSchemaError
from pgferry.runtime.queue import Operation, OperationQueue, QueuedOperation
from pgferry.runtime.scoped import user_claims_of
from pgferry.runtime.statements import (
    PreparedForm,
    SessionStatements,
    claims_statement,
    inline,
    inline_literals,
    literal_arguments,
    new_literals,
    prepared_form,
    send_message,
)
from pgferry.sync.auth import AuthenticatedUser

__all__ = ["Health", "ReadResult", "ResilientDatabase", "SyncReport", "WriteOutcome", "health_check"]

T = TypeVar("T")
_log = structlog.get_logger("pgferry.runtime.resilience")

_SEEN: Final = "select key from pgferry.applied_operations where key = any(%s)"
_RECORD: Final = "insert into pgferry.applied_operations (key) select unnest(%s::uuid[])"

#: Writes wait this long at most before being queued: a user should not wait through a whole outage.
WRITE_POLICY: Final = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.5, deadline=3.0)
READ_POLICY: Final = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.5, deadline=3.0)


class WriteOutcome(enum.Enum):
    APPLIED = "applied"
    """Committed now."""
    DUPLICATE = "duplicate"
    """Its key had already been applied (a retry of a write that got through): nothing done, nothing lost."""
    QUEUED = "queued"
    """On disk in the durable queue; :meth:`ResilientDatabase.sync_queued_operations` applies it later."""


@dataclass(frozen=True)
class ReadResult:
    rows: list[dict[str, Any]]
    stale: bool
    """True when the database was unreachable and these rows come from the local cache."""
    as_of: float
    """Unix time at which the database produced the rows."""


@dataclass(frozen=True)
class SyncReport:
    applied: int
    duplicates: int
    dead_lettered: int
    remaining: int
    error: str | None = None
    """Why replay stopped early (the database became unreachable again), else None."""


@dataclass(frozen=True)
class Health:
    ok: bool
    latency_ms: float | None
    mode: str
    error: str | None = None


def health_check(client: DatabaseClient, *, timeout: float = 3.0) -> Health:
    """Whether the database answers a query through the client's pool within ``timeout`` seconds."""
    started = time.perf_counter()
    try:
        with client.pool.connection(timeout=timeout) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        return Health(False, None, client.mode, f"{classify_error(exc).reason}: {str(exc).splitlines()[0]}")
    return Health(True, (time.perf_counter() - started) * 1000, client.mode)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RetriesExhaustedError) and exc.classification is not None:
        return exc.classification.reason
    return classify_error(exc).reason


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, RetriesExhaustedError):
        return True
    return classify_error(exc).retryable


@dataclass(frozen=True)
class _RenderedOperation:
    """One operation as text: its claims statement, and either its prepared form with literal arguments (where
    the endpoint keeps sessions) or its statement with the values inlined."""

    key: uuid.UUID
    claims: str
    form: PreparedForm | None
    arguments: str
    inlined: str
    error: psycopg.Error | None = None


class ResilientDatabase:
    """Writes that survive outages and reads that degrade to stale ones, over a :class:`DatabaseClient`.

    ``state_dir`` holds ``queue.sqlite3`` and ``cache.sqlite3``; it must be on a disk that survives a restart of
    the service (the queue is the only copy of writes accepted during an outage).
    """

    def __init__(
        self,
        client: DatabaseClient,
        state_dir: Path,
        *,
        metrics: RuntimeMetrics | None = None,
        write_policy: RetryPolicy = WRITE_POLICY,
        read_policy: RetryPolicy = READ_POLICY,
        checkout_timeout: float = 1.0,
    ) -> None:
        self.client = client
        self.queue = OperationQueue(state_dir / "queue.sqlite3")
        self.cache = ReadCache(state_dir / "cache.sqlite3")
        if metrics is None:  # a caller that passes its own registry decides which pools it exports
            metrics = RuntimeMetrics()
            metrics.watch_pool(client.pool.get_stats)
        self.metrics = metrics
        self._write_policy = write_policy
        self._read_policy = read_policy
        self._checkout_timeout = checkout_timeout
        self._ready = False
        self.metrics.queue_depth.set(self.queue.depth())

    # -- helpers -------------------------------------------------------------------------------------------------

    def _on_retry(self, attempt: RetryAttempt) -> None:
        self.metrics.retries.labels(attempt.classification.reason).inc()
        _log.warning(
            "db.retry",
            attempt=attempt.attempt,
            delay=round(attempt.delay, 3),
            reason=attempt.classification.reason,
            sqlstate=attempt.classification.sqlstate,
        )

    def _retry(self, fn: Callable[[], T], policy: RetryPolicy, operation: str) -> T:
        started = time.perf_counter()
        try:
            return call_with_retry(fn, policy=policy, on_retry=self._on_retry, operation=operation)
        finally:
            self.metrics.query_seconds.labels(operation).observe(time.perf_counter() - started)

    def _ensure_idempotency_table(self, conn: psycopg.Connection[Any]) -> None:
        if not self._ready:
            row = conn.execute("select to_regclass('pgferry.applied_operations') is not null").fetchone()
            if not (row and row[0]):
                raise RuntimeSchemaError(
                    "pgferry.applied_operations is missing, so writes cannot be applied exactly once; apply the "
                    "migrations (`pgferry db upgrade`, or supabase/migrations/20261130000300_*.sql) and retry"
                )
            self._ready = True

    def _apply(self, items: Sequence[tuple[Operation, Mapping[str, Any]]]) -> tuple[int, int]:
        """Apply ``items`` in one transaction, each once: ``(applied, duplicates)``."""
        return self._apply_rendered(self._render(items))

    def _render(self, items: Sequence[tuple[Operation, Mapping[str, Any]]]) -> list[_RenderedOperation]:
        """Each operation's claims and statement as SQL text with its values inlined, without a connection: the
        replay renders the next batch on a thread while the database applies the current one."""
        prepare = self.client.plan.mode.allows_prepared_statements
        literals = new_literals()
        claims_texts: dict[int, str] = {}  # one rendering per claims object (the queue shares them)
        rendered = []
        for op, claims in items:
            claims_text = claims_texts.get(id(claims))
            if claims_text is None:
                claims_text = claims_texts[id(claims)] = claims_statement(claims_parameters(claims), prepare)
            params = op.params or None
            form = prepared_form(op.statement, True, params is not None) if prepare else None
            try:
                if form is not None and params is not None:
                    arguments, inlined = literal_arguments(form, params, literals), ""
                else:
                    arguments, inlined = "", inline_literals(op.statement, params, literals)
            except psycopg.Error as exc:  # a missing parameter, a value psycopg cannot adapt
                rendered.append(_RenderedOperation(op.key, claims_text, None, "", "", exc))
            else:
                rendered.append(_RenderedOperation(op.key, claims_text, form, arguments, inlined))
        return rendered

    def _apply_rendered(self, operations: Sequence[_RenderedOperation]) -> tuple[int, int]:
        """Apply rendered operations in one transaction, each once: ``(applied, duplicates)``.

        The keys already applied are read first; the rest go out as one message — their keys recorded as the login
        role, then each operation's claims and statement — which PostgreSQL runs as one transaction. A replayer
        racing us on the same key makes the key's insert fail on its primary key: the whole message rolls back
        and the retry finds the key applied, so the check outside the transaction cannot apply anything twice.
        """
        for op in operations:
            if op.error is not None:  # raised when applied, so a replay dead-letters this one and goes on
                raise op.error
        prepare = self.client.plan.mode.allows_prepared_statements
        with self.client.pool.connection(timeout=self._checkout_timeout) as conn:
            self._ensure_idempotency_table(conn)
            seen = {row[0] for row in conn.execute(_SEEN, ([op.key for op in operations],))}
            fresh = [op for op in operations if op.key not in seen]
            if fresh:
                record = inline(psycopg.ClientCursor(conn), _RECORD, ([op.key for op in fresh],))

                def render(session: SessionStatements | None) -> str:
                    parts = [record]  # as the login role, before any switch
                    if session is not None:
                        session.prepare_claims(conn)
                    for op in fresh:
                        parts.append(op.claims)
                        if session is not None and op.form is not None:
                            parts.append(session.execute_text(conn, op.form, op.arguments))
                        else:
                            parts.append(op.inlined)
                    return "; ".join(parts)

                send_message(conn, render, prepare=prepare)
        return len(fresh), len(operations) - len(fresh)

    def health_check(self, *, timeout: float = 3.0) -> Health:
        """:func:`health_check`, and when the database answers, each replication slot's retained WAL into
        ``pgferry_runtime_replication_slot_lag_bytes`` (Electric's and Realtime's slots fall behind here first)."""
        health = health_check(self.client, timeout=timeout)
        if health.ok:
            try:
                with self.client.pool.connection(timeout=timeout) as conn:
                    rows = conn.execute(
                        "select slot_name, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint "
                        "from pg_replication_slots"
                    ).fetchall()
            except psycopg.Error as exc:  # e.g. a role without pg_monitor: the health answer stands
                _log.warning("db.slot_lag_unavailable", error=type(exc).__name__)
            else:
                self.metrics.slot_lag_bytes.clear()
                for slot, retained in rows:
                    self.metrics.slot_lag_bytes.labels(str(slot)).set(int(retained))
        return health

    # -- writes --------------------------------------------------------------------------------------------------

    def write(self, user: AuthenticatedUser | None, operation: Operation) -> WriteOutcome:
        """Apply ``operation`` as ``user`` (``None``: the service role, server code only) now, or queue it.

        Errors that retrying cannot fix (a policy refusing the row, a constraint, bad SQL) are raised here and
        nothing is queued. While earlier writes are queued this one queues behind them, to keep the order.
        """
        claims = service_role_claims() if user is None else user_claims_of(user)
        if self.queue.depth() == 0:
            try:
                applied, _ = self._retry(lambda: self._apply([(operation, claims)]), self._write_policy, "write")
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                _log.warning("db.write_queued", key=str(operation.key), reason=_reason(exc))
            else:
                return WriteOutcome.APPLIED if applied else WriteOutcome.DUPLICATE
        self.queue.put(operation, claims)
        self.metrics.queued.inc()
        self.metrics.queue_depth.set(self.queue.depth())
        return WriteOutcome.QUEUED

    def sync_queued_operations(self, *, batch_size: int = 500) -> SyncReport:
        """Apply queued writes oldest first, each exactly once, until the queue is empty or the database is gone.

        A batch is one transaction. When a batch fails for a reason retrying cannot fix, its operations are tried
        one by one: the one the database refuses moves to the dead-letter table (with the error), the rest apply.
        While the database applies a batch, the next one is read from the queue and rendered on a second thread,
        so the client's share of the work overlaps the server's instead of adding to it.
        """
        applied = duplicates = dead = 0
        error: str | None = None

        def read_and_render(after: int | None) -> tuple[list[QueuedOperation], list[_RenderedOperation]]:
            batch = self.queue.peek(batch_size, after=after)
            return batch, self._render([(i.operation, i.claims) for i in batch])

        with ThreadPoolExecutor(1, thread_name_prefix="pgferry-replay") as renderer:
            batch, rendered = read_and_render(None)
            while batch:
                upcoming = renderer.submit(read_and_render, batch[-1].seq)
                try:
                    done, dup = self._retry(
                        lambda r=rendered: self._apply_rendered(r),  # type: ignore[misc]
                        self._write_policy,
                        "replay",
                    )
                except Exception as exc:
                    if _unavailable(exc):
                        error = f"database unreachable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                        upcoming.cancel()
                        break
                    done, dup, dead_here = self._replay_one_by_one(batch)
                    dead += dead_here
                else:
                    self.queue.remove(batch)
                applied += done
                duplicates += dup
                self.metrics.replayed.inc(done)
                self.metrics.queue_depth.set(self.queue.depth())
                batch, rendered = upcoming.result()
        remaining = self.queue.depth()
        self.metrics.queue_depth.set(remaining)
        return SyncReport(applied, duplicates, dead, remaining, error)

    def _replay_one_by_one(self, batch: Sequence[QueuedOperation]) -> tuple[int, int, int]:
        applied = duplicates = dead = 0
        for item in batch:
            try:
                done, dup = self._retry(
                    lambda i=item: self._apply([(i.operation, i.claims)]),  # type: ignore[misc]
                    self._write_policy,
                    "replay",
                )
            except Exception as exc:
                if _unavailable(exc):
                    raise DatabaseUnavailableError(
                        "the database became unreachable while replaying queued writes; call "
                        "sync_queued_operations() again when it is back"
                    ) from exc
                self.queue.dead_letter(item, " ".join(str(exc).split())[:500])
                _log.error("db.write_dead_lettered", key=str(item.operation.key), error=type(exc).__name__)
                dead += 1
                continue
            self.queue.remove([item])
            applied += done
            duplicates += dup
        return applied, duplicates, dead

    # -- reads ---------------------------------------------------------------------------------------------------

    def read(
        self, user: AuthenticatedUser, cache_key: str, statement: str, params: Mapping[str, Any] | Sequence[Any] = ()
    ) -> ReadResult:
        """Run ``statement`` as ``user``; when the database is unreachable, that user's last result for
        ``cache_key``, marked stale. :class:`DatabaseUnavailableError` when there is no such result either."""
        claims = user_claims_of(user)

        def attempt() -> list[dict[str, Any]]:
            with self.client.pool.connection(timeout=self._checkout_timeout) as conn, conn.transaction():
                conn.execute(CLAIMS_SQL, claims_parameters(claims))
                with conn.cursor(row_factory=dict_row) as cur:
                    cur.execute(statement, params)
                    return cur.fetchall()

        try:
            rows = self._retry(attempt, self._read_policy, "read")
        except Exception as exc:
            if not _unavailable(exc):
                raise
            cached = self.cache.load(str(user.user_id), cache_key)
            if cached is None:
                raise DatabaseUnavailableError(
                    f"the database is unreachable and there is no cached result for {cache_key!r}; retry later"
                ) from exc
            self.metrics.stale_reads.inc()
            return ReadResult(cached.rows, True, cached.as_of)
        self.cache.store(str(user.user_id), cache_key, rows)
        return ReadResult(rows, False, time.time())

    def close(self) -> None:
        self.queue.close()
        self.cache.close()


def new_key() -> uuid.UUID:
    """A fresh idempotency key (for callers that have no request id to derive one from)."""
    return uuid.uuid4()
