"""The one place pgferry decides whether a database failure is worth another try, and when.

The migration engine's copy workers and the runtime database clients all funnel failures through here, so
"is a deadlock retried?", "how long do we back off?" and "what does the operator see when we give up?" have
one answer. The module owns *decisions* only. It never opens, closes or resets a connection: the caller
passes a callable that does one complete attempt (typically one whole transaction), and that callable is
responsible for getting a working connection. A classification's ``reconnect`` flag tells it when the old
connection is gone.

Pattern (keep one connection while it is healthy, replace it only when told to)::

    conn: psycopg.Connection | None = None

    def forget_broken_connection(attempt: RetryAttempt) -> None:
        nonlocal conn
        log.warning("retrying", attempt=attempt.attempt, reason=attempt.classification.reason)
        if attempt.classification.reconnect and conn is not None:
            conn.close()
            conn = None

    def copy_chunk() -> int:
        nonlocal conn
        if conn is None or conn.closed:
            conn = psycopg.connect(url, autocommit=True)
        with conn.transaction():          # the whole transaction is the unit that is retried
            return write_rows(conn, rows)

    written = call_with_retry(copy_chunk, on_retry=forget_broken_connection)

If ``fn`` simply opens a fresh connection on every call (``with psycopg.connect(url) as conn: ...``), the
``reconnect`` flag needs no handling at all. What ``fn`` must never do is carry on inside a transaction that
failed: a retry always starts the transaction again from ``BEGIN``.

Classification (:func:`classify_error`):

* By SQLSTATE first, because it is the stable, language-independent contract. Retryable without a new
  connection: ``40001`` serialization_failure, ``40P01`` deadlock_detected (the transaction was rolled back,
  the session is fine), ``55P03`` lock_not_available, ``53000``/``53100``/``53200`` insufficient resources.
  Retryable *with* a new connection: all of class ``08`` (connection exception), ``57P01`` admin_shutdown
  (also what ``pg_terminate_backend`` sends), ``57P02`` crash_shutdown, ``57P03`` cannot_connect_now,
  ``57P05`` idle_session_timeout, ``25P03`` idle_in_transaction_session_timeout and ``53300``
  too_many_connections. Any retryable error reported with severity ``FATAL``/``PANIC`` ends the session,
  so it also gets ``reconnect=True``.
* ``57014`` query_canceled is **fatal**: it comes from ``statement_timeout`` (which would fire again on the
  same work) or from someone deliberately cancelling the query (``pg_cancel_backend``, Ctrl-C); neither
  should be silently undone by a retry. ``25P04`` transaction_timeout is fatal for the same reason. A caller
  that knows better can pass its own ``classify`` that wraps :func:`classify_error`.
* Every other SQLSTATE is fatal: syntax (``42601``), undefined objects (``42P01``), permissions
  (``42501``), data exceptions (``22xxx``), integrity violations (``23xxx``) and so on fail the same way
  every time.
* ``psycopg.OperationalError`` *without* a SQLSTATE is how psycopg reports a broken or failed connection
  ("server closed the connection unexpectedly", "SSL connection has been closed unexpectedly", "the
  connection is closed", "Connection refused", connection timeouts). These are retryable with
  ``reconnect=True``, **except** connection failures that are certainly permanent (libpq reports them
  without a SQLSTATE too): authentication failures, unknown role or database, no ``pg_hba.conf`` entry,
  unknown host name, SSL certificate problems, malformed connection options. Those are fatal so a typo in
  a URL fails in milliseconds instead of after the whole backoff schedule. The patterns are libpq's English
  messages; a message in another language falls back to "retryable", which costs time, not correctness.
* ``psycopg.InterfaceError`` is retryable (reconnect) only when its message says the connection is
  closed, lost or bad; otherwise it reports a bug in how psycopg is used ("the cursor is closed") and is
  fatal.
* ``OSError``: ``ConnectionError`` subclasses, ``TimeoutError``, network errnos (reset, unreachable, ...),
  SSL end-of-stream errors and temporary DNS failures are retryable with reconnect. File-system errors
  (``FileNotFoundError``, ``PermissionError``, ...) and permanent DNS failures are fatal: no amount of
  reconnecting fixes them.
* SQLAlchemy's ``DBAPIError`` is unwrapped to the driver exception it carries (the runtime data layer
  goes through SQLAlchemy); ``connection_invalidated`` forces ``reconnect=True``.
* :class:`~pgferry.errors.PgferryError` (including :class:`RetriesExhaustedError`) is fatal: it is already
  a decision, and retrying it would multiply nested retry loops. ``BaseException``\\ s that are not
  ``Exception`` (``KeyboardInterrupt``, ``asyncio.CancelledError``) are never caught by the retry loops.

Design choice: :class:`ErrorClass` has only ``RETRYABLE`` and ``FATAL``. "Needs a new connection" is the
orthogonal :attr:`ErrorClassification.reconnect` flag rather than a third ``CONNECTION`` kind, so "should
this be retried?" is a single comparison and cannot be gotten wrong by forgetting a kind.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import random
import re
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import psycopg
import structlog

from pgferry.errors import PgferryError
from pgferry.redaction import redact_text

__all__ = [
    "DEFAULT_POLICY",
    "ErrorClass",
    "ErrorClassification",
    "RetriesExhaustedError",
    "RetryAttempt",
    "RetryPolicy",
    "acall_with_retry",
    "call_with_retry",
    "classify_error",
]

T = TypeVar("T")

_log = structlog.get_logger("pgferry.db.retry")


# --------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------


class ErrorClass(enum.Enum):
    """Whether a failed attempt may be repeated.

    ``RETRYABLE``: transient; the same work can succeed if tried again (after a pause, and on a new
    connection when :attr:`ErrorClassification.reconnect` is set). ``FATAL``: retrying would fail the same
    way, or would undo a deliberate decision; the error goes to the caller unchanged.
    """

    RETRYABLE = "retryable"
    FATAL = "fatal"


@dataclass(frozen=True)
class ErrorClassification:
    """What :func:`classify_error` concluded about one exception.

    ``reason`` is a short human description ("deadlock detected"); ``hint`` says what an operator should
    check if the error keeps coming back (used in :class:`RetriesExhaustedError` messages). ``reconnect``
    is only meaningful for retryable errors: ``True`` means the connection that raised is unusable and the
    next attempt needs a new one; ``False`` means the transaction was rolled back but the session is fine.
    """

    kind: ErrorClass
    sqlstate: str | None
    reason: str
    reconnect: bool = False
    hint: str = ""

    @property
    def retryable(self) -> bool:
        return self.kind is ErrorClass.RETRYABLE


_HINT_CONCURRENCY: Final = (
    "check for other sessions writing the same rows concurrently (another pgferry run, the application), "
    "or lower the number of parallel workers"
)
_HINT_LOCKS: Final = "check pg_stat_activity for long-running transactions holding locks on the same tables"
_HINT_RESOURCES: Final = "check free disk space and memory on the database server"
_HINT_SLOTS: Final = (
    "check max_connections and connection-pooler limits on the server, or lower the number of parallel workers"
)
_HINT_SERVER: Final = (
    "check that the database server is up and reachable from this machine (host, port, firewall, SSL) "
    "and whether it is restarting or failing over"
)
_HINT_TERMINATED: Final = (
    "check whether something is ending sessions on the server (pg_terminate_backend, restarts, failovers, "
    "idle-session timeouts)"
)


@dataclass(frozen=True)
class _Rule:
    reason: str
    reconnect: bool
    hint: str


_RETRYABLE_SQLSTATES: Final[dict[str, _Rule]] = {
    "40001": _Rule("serialization failure", False, _HINT_CONCURRENCY),
    "40P01": _Rule("deadlock detected", False, _HINT_CONCURRENCY),
    "55P03": _Rule("lock not available", False, _HINT_LOCKS),
    "53000": _Rule("insufficient resources", False, _HINT_RESOURCES),
    "53100": _Rule("disk full", False, _HINT_RESOURCES),
    "53200": _Rule("out of memory", False, _HINT_RESOURCES),
    "53300": _Rule("too many connections", True, _HINT_SLOTS),
    "57P01": _Rule("connection terminated by administrator", True, _HINT_TERMINATED),
    "57P02": _Rule("server crash shutdown", True, _HINT_SERVER),
    "57P03": _Rule("server not accepting connections yet", True, _HINT_SERVER),
    "57P05": _Rule("idle session timeout", True, _HINT_TERMINATED),
    "25P03": _Rule("idle-in-transaction session timeout", True, _HINT_TERMINATED),
}
_CONNECTION_EXCEPTION_CLASS: Final = "08"

_FATAL_SQLSTATE_REASONS: Final[dict[str, str]] = {
    "57014": "query canceled (statement_timeout or an explicit cancel)",
    "25P04": "transaction timeout",
    "25P02": "statement inside an already-failed transaction",
}

# libpq/psycopg messages (no SQLSTATE available) that mean the connection can never succeed as configured.
_PERMANENT_CONNECT_FAILURE: Final = re.compile(
    r"authentication failed"
    r"|no pg_hba\.conf entry|pg_hba\.conf rejects"
    r"|(?:database|role|user) \"[^\"]*\" does not exist"
    r"|is not permitted to log in"
    r"|no password supplied|password is required"
    r"|permission denied"
    r"|is not currently accepting connections"
    r"|could not translate host name(?!.*temporary failure)"
    r"|name or service not known|nodename nor servname|no address associated with hostname"
    r"|certificate|server does not support ssl|sslmode value|requires ssl"
    r"|invalid connection option|invalid (?:integer |sslmode |)value|invalid uri|invalid port"
    r"|(?:could not|cannot) match .* (?:hosts?|port numbers?)"
    r"|tenant or user not found|could not be found",
    re.IGNORECASE | re.DOTALL,
)

# InterfaceError messages that are about the connection itself rather than API misuse.
_INTERFACE_CONNECTION_TROUBLE: Final = re.compile(
    r"connection is (?:closed|lost|bad|in status)|server closed the connection|connection (?:reset|refused)",
    re.IGNORECASE,
)

_NETWORK_ERRNOS: Final = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.ENOTCONN,
        errno.ESHUTDOWN,
    }
)


def _fatal(sqlstate: str | None, reason: str, hint: str = "") -> ErrorClassification:
    return ErrorClassification(ErrorClass.FATAL, sqlstate, reason, reconnect=False, hint=hint)


def _retry(sqlstate: str | None, reason: str, *, reconnect: bool, hint: str) -> ErrorClassification:
    return ErrorClassification(ErrorClass.RETRYABLE, sqlstate, reason, reconnect=reconnect, hint=hint)


def _session_ended(exc: psycopg.Error) -> bool:
    """``FATAL``/``PANIC`` severity always means the server closed the session."""
    severity = exc.diag.severity_nonlocalized or exc.diag.severity
    return severity in ("FATAL", "PANIC")


def _classify_sqlstate(exc: psycopg.Error, sqlstate: str) -> ErrorClassification:
    rule = _RETRYABLE_SQLSTATES.get(sqlstate)
    if rule is not None:
        return _retry(sqlstate, rule.reason, reconnect=rule.reconnect or _session_ended(exc), hint=rule.hint)
    if sqlstate.startswith(_CONNECTION_EXCEPTION_CLASS):
        return _retry(sqlstate, "connection exception", reconnect=True, hint=_HINT_SERVER)
    reason = _FATAL_SQLSTATE_REASONS.get(sqlstate, f"{type(exc).__name__} is not transient")
    return _fatal(sqlstate, reason)


def _classify_psycopg(exc: psycopg.Error) -> ErrorClassification:
    sqlstate = exc.sqlstate
    if sqlstate:
        return _classify_sqlstate(exc, sqlstate)
    message = str(exc)
    if isinstance(exc, psycopg.OperationalError):
        if _PERMANENT_CONNECT_FAILURE.search(message):
            return _fatal(None, "connection refused permanently (authentication, name or configuration)")
        return _retry(None, "connection lost or unavailable", reconnect=True, hint=_HINT_SERVER)
    if isinstance(exc, psycopg.InterfaceError) and _INTERFACE_CONNECTION_TROUBLE.search(message):
        return _retry(None, "connection lost or unavailable", reconnect=True, hint=_HINT_SERVER)
    return _fatal(None, f"{type(exc).__name__} is not transient")


def _classify_os_error(exc: OSError) -> ErrorClassification:
    if isinstance(exc, socket.gaierror):
        if exc.errno == socket.EAI_AGAIN:
            return _retry(None, "temporary DNS failure", reconnect=True, hint=_HINT_SERVER)
        return _fatal(None, "host name does not resolve", "check the host name in the connection URL")
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return _retry(None, "SSL connection closed unexpectedly", reconnect=True, hint=_HINT_SERVER)
    if isinstance(exc, ConnectionError | TimeoutError) or exc.errno in _NETWORK_ERRNOS:
        return _retry(None, "network error", reconnect=True, hint=_HINT_SERVER)
    return _fatal(None, f"{type(exc).__name__} is not a network error")


def classify_error(exc: BaseException) -> ErrorClassification:
    """Decide whether ``exc`` is worth retrying and whether the next attempt needs a new connection.

    Pure function of the exception: no I/O, safe to call from any thread. See the module docstring for
    the full table and the reasoning behind the borderline cases.
    """
    sa_exc = sys.modules.get("sqlalchemy.exc")  # a SQLAlchemy error can only exist if SQLAlchemy is loaded
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        inner = classify_error(exc.orig)
        if exc.connection_invalidated and inner.retryable and not inner.reconnect:
            return _retry(inner.sqlstate, inner.reason, reconnect=True, hint=inner.hint)
        return inner
    if isinstance(exc, PgferryError):
        return _fatal(None, f"{type(exc).__name__} is a final pgferry error")
    if isinstance(exc, psycopg.Error):
        return _classify_psycopg(exc)
    if isinstance(exc, OSError):
        return _classify_os_error(exc)
    if not isinstance(exc, Exception):
        return _fatal(None, f"interrupted ({type(exc).__name__})")
    return _fatal(None, f"{type(exc).__name__} is not a database error")


# --------------------------------------------------------------------------------------
# Backoff policy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how fast to retry.

    ``max_attempts`` counts every call of ``fn``, the first one included (``1`` disables retrying).
    ``deadline`` bounds the total time in seconds, measured from the first call: no new attempt is started
    if its backoff would end at or after the deadline. It does not interrupt an attempt that is running;
    bound those with ``statement_timeout``/``connect_timeout``.

    Backoff is *full jitter* (see :meth:`delay`). Defaults (8 attempts, 0.2 s doubling, 15 s cap) ride out a
    deadlock storm or a server restart/failover of up to about half a minute in expectation (~25 s of
    backoff at most), which covers a Supabase or Neon compute restart without stalling a migration for
    minutes on a problem that needs a human.
    """

    max_attempts: int = 8
    base_delay: float = 0.2
    max_delay: float = 15.0
    multiplier: float = 2.0
    jitter: float = 1.0
    deadline: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be at least 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(
                f"RetryPolicy delays must not be negative, got base_delay={self.base_delay}, max_delay={self.max_delay}"
            )
        if self.multiplier < 1:
            raise ValueError(f"RetryPolicy.multiplier must be at least 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy.jitter must be between 0 and 1, got {self.jitter}")
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError(f"RetryPolicy.deadline must be positive or None, got {self.deadline}")

    def ceiling(self, attempt: int) -> float:
        """The un-jittered backoff after failed attempt number ``attempt`` (1-based), capped."""
        if attempt < 1:
            raise ValueError(f"attempt numbers start at 1, got {attempt}")
        try:
            raw = self.base_delay * self.multiplier ** (attempt - 1)
        except OverflowError:
            raw = float("inf")
        return min(self.max_delay, raw)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based) before the next one.

        Full jitter: ``ceiling * (1 - jitter * U)`` with ``U`` uniform in ``[0, 1)``, where ``ceiling`` is
        ``min(max_delay, base_delay * multiplier ** (attempt - 1))``. With ``jitter=1`` the wait is uniform
        in ``(0, ceiling]``; with ``jitter=0`` it is exactly ``ceiling``.

        Why full jitter rather than decorrelated jitter: when a server restarts, every copy worker fails at
        the same instant; full jitter spreads their reconnects over the whole window, which in AWS's
        comparison gives the least total work and contention. It is also stateless (the delay depends only
        on the attempt number, not on the previous delay), so a frozen policy can be shared by all workers
        and threads, and its bounds are simple to state and test.
        """
        ceiling = self.ceiling(attempt)
        u = rng.random() if rng is not None else random.random()
        return ceiling * (1.0 - self.jitter * u)


DEFAULT_POLICY: Final = RetryPolicy()


# --------------------------------------------------------------------------------------
# Retry loops
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryAttempt:
    """Passed to ``on_retry`` after attempt number ``attempt`` failed and before sleeping ``delay`` s.

    ``elapsed`` is the time since the first attempt started; ``exception`` is what that attempt raised.
    """

    attempt: int
    max_attempts: int
    delay: float
    elapsed: float
    classification: ErrorClassification
    exception: BaseException


class RetriesExhaustedError(PgferryError):
    """A retryable failure kept happening until the policy's attempts or deadline ran out.

    The last underlying exception is ``__cause__`` (also :attr:`last_error`). The message is one line:
    what failed (SQLSTATE and the first line of the error), after how many attempts, and what to check.
    """

    attempts: int
    elapsed: float
    classification: ErrorClassification | None

    def __init__(
        self,
        message: str,
        *,
        attempts: int = 0,
        elapsed: float = 0.0,
        classification: ErrorClassification | None = None,
    ) -> None:
        # Only the message goes into ``args``; the rest travels in ``__dict__``, which BaseException
        # pickles too, so the error survives crossing a process boundary.
        super().__init__(message)
        self.attempts = attempts
        self.elapsed = elapsed
        self.classification = classification

    @property
    def last_error(self) -> BaseException | None:
        return self.__cause__


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else type(exc).__name__
    text = redact_text(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exhausted_message(
    operation: str | None,
    attempts: int,
    elapsed: float,
    deadline: float | None,
    classification: ErrorClassification,
    exc: BaseException,
) -> str:
    plural = "" if attempts == 1 else "s"
    stopped = f"gave up after {attempts} attempt{plural} in {elapsed:.1f}s"
    if deadline is not None:
        stopped += f" (deadline {deadline:g}s)"
    if classification.sqlstate:
        what = f"SQLSTATE {classification.sqlstate} ({classification.reason})"
    else:
        what = f"{classification.reason} ({type(exc).__name__})"
    hint = classification.hint or "check the database server and the error above"
    prefix = f"{operation}: " if operation else ""
    return f"{prefix}{stopped}: {what}: {_first_line(exc)}; {hint}"


class _RetryLoop:
    """State shared by the sync and async loops: counts attempts, applies the policy, reports."""

    def __init__(
        self,
        policy: RetryPolicy,
        on_retry: Callable[[RetryAttempt], None] | None,
        classify: Callable[[BaseException], ErrorClassification],
        clock: Callable[[], float],
        rng: random.Random | None,
        operation: str | None,
    ) -> None:
        self.policy = policy
        self.on_retry = on_retry
        self.classify = classify
        self.clock = clock
        self.rng = rng
        self.operation = operation
        self.started = clock()
        self.attempt = 0

    def failed(self, exc: Exception) -> float | None:
        """Called with attempt ``self.attempt``'s exception, from inside the ``except`` block.

        Returns the delay before the next attempt, or ``None`` when ``exc`` is fatal (the caller then
        re-raises it unchanged). Raises :class:`RetriesExhaustedError` when the policy is used up.
        """
        classification = self.classify(exc)
        if not classification.retryable:
            return None
        elapsed = self.clock() - self.started
        policy = self.policy
        give_up = self.attempt >= policy.max_attempts
        delay = 0.0 if give_up else policy.delay(self.attempt, self.rng)
        if not give_up and policy.deadline is not None and elapsed + delay >= policy.deadline:
            give_up = True
        if give_up:
            message = _exhausted_message(self.operation, self.attempt, elapsed, policy.deadline, classification, exc)
            raise RetriesExhaustedError(
                message, attempts=self.attempt, elapsed=elapsed, classification=classification
            ) from exc
        report = RetryAttempt(
            attempt=self.attempt,
            max_attempts=policy.max_attempts,
            delay=delay,
            elapsed=elapsed,
            classification=classification,
            exception=exc,
        )
        if self.on_retry is not None:
            self.on_retry(report)
        else:
            _log.warning(
                "db.retry",
                operation=self.operation,
                attempt=report.attempt,
                max_attempts=report.max_attempts,
                delay=round(delay, 3),
                sqlstate=classification.sqlstate,
                reason=classification.reason,
                reconnect=classification.reconnect,
                error=_first_line(exc),
            )
        return delay


def call_with_retry(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
    on_retry: Callable[[RetryAttempt], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    classify: Callable[[BaseException], ErrorClassification] = classify_error,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    operation: str | None = None,
) -> T:
    """Call ``fn()`` until it returns, retrying transient database failures according to ``policy``.

    ``fn`` must perform one complete attempt (a whole transaction) and obtain its own connection; see the
    module docstring for the reconnect pattern. Fatal errors propagate unchanged on the first occurrence.
    Retryable errors call ``on_retry`` (or, without one, log a ``db.retry`` warning), sleep, and try again;
    when ``max_attempts`` or ``deadline`` is used up, :class:`RetriesExhaustedError` is raised from the last
    error. Only ``Exception`` is caught: ``KeyboardInterrupt`` and friends always propagate at once.

    ``operation`` (e.g. ``"copy public.messages rows 0-10000"``) prefixes the give-up message. ``sleep``,
    ``clock`` and ``rng`` exist so tests can run the schedule without waiting.
    """
    loop = _RetryLoop(policy, on_retry, classify, clock, rng, operation)
    while True:
        loop.attempt += 1
        try:
            return fn()
        except Exception as exc:
            delay = loop.failed(exc)
            if delay is None:
                raise
        sleep(delay)


async def acall_with_retry(
    fn: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
    on_retry: Callable[[RetryAttempt], None] | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    classify: Callable[[BaseException], ErrorClassification] = classify_error,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    operation: str | None = None,
) -> T:
    """Async twin of :func:`call_with_retry`: awaits ``fn()`` and backs off with ``await sleep(delay)``.

    Cancellation (``asyncio.CancelledError``) is never retried and interrupts the backoff sleep too.
    """
    loop = _RetryLoop(policy, on_retry, classify, clock, rng, operation)
    while True:
        loop.attempt += 1
        try:
            return await fn()
        except Exception as exc:
            delay = loop.failed(exc)
            if delay is None:
                raise
        await sleep(delay)
