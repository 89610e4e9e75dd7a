"""Tests for the shared retry mechanism (pgferry.db.retry).

Three layers: classification of psycopg/OS/SQLAlchemy exception types, the backoff schedule and retry loops
with an injected sleep and clock (no real waiting), and real failures provoked on a real PostgreSQL server
(deadlock, serialization failure, terminated backend, lock timeout, unique violation). The real tests never
stop or restart the shared server; ``pg_terminate_backend`` is how a connection is lost.
"""

from __future__ import annotations

import asyncio
import errno
import pickle
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg.conninfo import make_conninfo
from sqlalchemy import exc as sa_exc
from structlog.testing import capture_logs

from pgferry.db.retry import (
    DEFAULT_POLICY,
    ErrorClass,
    ErrorClassification,
    RetriesExhaustedError,
    RetryAttempt,
    RetryPolicy,
    acall_with_retry,
    call_with_retry,
    classify_error,
)
from pgferry.errors import ConfigError, PgferryError

RETRYABLE = ErrorClass.RETRYABLE
FATAL = ErrorClass.FATAL

FAST = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05)
"""Real-server tests: retry quickly so a test costs milliseconds, not seconds."""


# --------------------------------------------------------------------------------------
# Classification (exception types as psycopg builds them)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc_type", "sqlstate", "kind", "reconnect"),
    [
        (pg_errors.SerializationFailure, "40001", RETRYABLE, False),
        (pg_errors.DeadlockDetected, "40P01", RETRYABLE, False),
        (pg_errors.LockNotAvailable, "55P03", RETRYABLE, False),
        (pg_errors.InsufficientResources, "53000", RETRYABLE, False),
        (pg_errors.DiskFull, "53100", RETRYABLE, False),
        (pg_errors.OutOfMemory, "53200", RETRYABLE, False),
        (pg_errors.TooManyConnections, "53300", RETRYABLE, True),
        (pg_errors.AdminShutdown, "57P01", RETRYABLE, True),
        (pg_errors.CrashShutdown, "57P02", RETRYABLE, True),
        (pg_errors.CannotConnectNow, "57P03", RETRYABLE, True),
        (pg_errors.IdleSessionTimeout, "57P05", RETRYABLE, True),
        (pg_errors.IdleInTransactionSessionTimeout, "25P03", RETRYABLE, True),
        (pg_errors.ConnectionException, "08000", RETRYABLE, True),
        (pg_errors.ConnectionFailure, "08006", RETRYABLE, True),
        (pg_errors.SqlclientUnableToEstablishSqlconnection, "08001", RETRYABLE, True),
        (pg_errors.ProtocolViolation, "08P01", RETRYABLE, True),
        (pg_errors.QueryCanceled, "57014", FATAL, False),
        (pg_errors.TransactionTimeout, "25P04", FATAL, False),
        (pg_errors.InFailedSqlTransaction, "25P02", FATAL, False),
        (pg_errors.UniqueViolation, "23505", FATAL, False),
        (pg_errors.ForeignKeyViolation, "23503", FATAL, False),
        (pg_errors.NotNullViolation, "23502", FATAL, False),
        (pg_errors.SyntaxError, "42601", FATAL, False),
        (pg_errors.UndefinedTable, "42P01", FATAL, False),
        (pg_errors.InsufficientPrivilege, "42501", FATAL, False),
        (pg_errors.NumericValueOutOfRange, "22003", FATAL, False),
        (pg_errors.InvalidTextRepresentation, "22P02", FATAL, False),
        (pg_errors.DatabaseDropped, "57P04", FATAL, False),
        (pg_errors.InternalError_, "XX000", FATAL, False),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)
def test_classify_by_sqlstate(exc_type: type[psycopg.Error], sqlstate: str, kind: ErrorClass, reconnect: bool) -> None:
    exc = exc_type("message from the server")
    assert exc.sqlstate == sqlstate  # guards the table against psycopg renaming classes
    result = classify_error(exc)
    assert result.kind is kind
    assert result.sqlstate == sqlstate
    assert result.reconnect is reconnect
    assert result.retryable is (kind is RETRYABLE)
    assert result.reason
    if result.retryable:
        assert result.hint.startswith("check")


@pytest.mark.parametrize(
    "message",
    [
        "consuming input failed: server closed the connection unexpectedly\n"
        "\tThis probably means the server terminated abnormally\n\tbefore or while processing the request.",
        "SSL connection has been closed unexpectedly",
        "SSL SYSCALL error: EOF detected",
        "the connection is closed",
        "the connection is lost",
        'connection failed: connection to server at "127.0.0.1", port 5433 failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?",
        "connection timeout expired",
        'connection failed: connection to server at "10.0.0.5", port 5432 failed: '
        "FATAL:  sorry, too many clients already",
        'connection failed: connection to server at "10.0.0.5", port 5432 failed: '
        "FATAL:  the database system is starting up",
        'connection failed: could not translate host name "db.example.com" to address: '
        "Temporary failure in name resolution",
    ],
)
def test_operational_error_without_sqlstate_is_retryable_with_reconnect(message: str) -> None:
    result = classify_error(psycopg.OperationalError(message))
    assert result.kind is RETRYABLE
    assert result.reconnect is True
    assert result.sqlstate is None


def test_connection_timeout_is_retryable() -> None:
    result = classify_error(pg_errors.ConnectionTimeout("connection timeout expired"))
    assert (result.kind, result.reconnect) == (RETRYABLE, True)


@pytest.mark.parametrize(
    "message",
    [
        'connection failed: connection to server at "h", port 5432 failed: '
        'FATAL:  password authentication failed for user "app"',
        'connection failed: connection to server at "h", port 5432 failed: FATAL:  database "nope" does not exist',
        'connection failed: connection to server at "h", port 5432 failed: FATAL:  role "nobody" does not exist',
        'connection failed: FATAL:  no pg_hba.conf entry for host "10.1.1.1", user "app", database "db", no encryption',
        "connection failed: fe_sendauth: no password supplied",
        'connection failed: could not translate host name "db.exampel.com" to address: Name or service not known',
        "connection failed: SSL error: certificate verify failed",
        'connection failed: FATAL:  permission denied for database "db"',
        "connection failed: FATAL:  Tenant or user not found",
        'invalid integer value "abc" for connection option "port"',
    ],
)
def test_permanent_connection_failures_are_fatal(message: str) -> None:
    result = classify_error(psycopg.OperationalError(message))
    assert result.kind is FATAL
    assert result.reconnect is False


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (psycopg.InterfaceError("cannot execute operations: the connection is in status 3"), RETRYABLE),
        (psycopg.InterfaceError("the connection is closed"), RETRYABLE),
        (psycopg.InterfaceError("the cursor is closed"), FATAL),
        (psycopg.InterfaceError("the cursor doesn't have a result"), FATAL),
        (psycopg.ProgrammingError("the query has 1 placeholder but 2 parameters were passed"), FATAL),
        (psycopg.DataError("bad data"), FATAL),
    ],
)
def test_driver_errors_without_sqlstate(exc: psycopg.Error, kind: ErrorClass) -> None:
    result = classify_error(exc)
    assert result.kind is kind
    assert result.reconnect is (kind is RETRYABLE)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), RETRYABLE),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), RETRYABLE),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), RETRYABLE),
        (TimeoutError("timed out"), RETRYABLE),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), RETRYABLE),
        (OSError(errno.EHOSTUNREACH, "No route to host"), RETRYABLE),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), RETRYABLE),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), RETRYABLE),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), FATAL),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), FATAL),
        (PermissionError(errno.EACCES, "Permission denied"), FATAL),
        (OSError("no errno at all"), FATAL),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
def test_os_errors(exc: OSError, kind: ErrorClass) -> None:
    result = classify_error(exc)
    assert result.kind is kind
    assert result.reconnect is (kind is RETRYABLE)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bug"),
        KeyError("bug"),
        KeyboardInterrupt(),
        SystemExit(1),
        asyncio.CancelledError(),
        PgferryError("a decision"),
        ConfigError("DATABASE_URL", "is missing"),
        RetriesExhaustedError("gave up"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_everything_else_is_fatal(exc: BaseException) -> None:
    assert classify_error(exc).kind is FATAL


def test_sqlalchemy_errors_are_unwrapped() -> None:
    deadlock = sa_exc.OperationalError("update t", None, pg_errors.DeadlockDetected("deadlock detected"))
    result = classify_error(deadlock)
    assert (result.kind, result.sqlstate, result.reconnect) == (RETRYABLE, "40P01", False)

    invalidated = sa_exc.OperationalError(
        "update t", None, pg_errors.DeadlockDetected("deadlock"), connection_invalidated=True
    )
    assert classify_error(invalidated).reconnect is True

    unique = sa_exc.IntegrityError("insert", None, pg_errors.UniqueViolation("duplicate key"))
    assert classify_error(unique).kind is FATAL


def test_classification_is_a_frozen_value() -> None:
    first = classify_error(pg_errors.DeadlockDetected("x"))
    assert first == classify_error(pg_errors.DeadlockDetected("y"))
    with pytest.raises(AttributeError):
        first.kind = FATAL  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# Backoff schedule
# --------------------------------------------------------------------------------------


def test_delays_grow_exponentially_and_are_capped() -> None:
    policy = RetryPolicy(base_delay=0.2, multiplier=2.0, max_delay=5.0, jitter=0.0)
    delays = [policy.delay(attempt) for attempt in range(1, 10)]
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0])


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    policy = RetryPolicy(max_delay=7.0, jitter=0.0)
    assert policy.delay(100_000) == 7.0
    assert 0 < RetryPolicy(max_delay=7.0).delay(100_000, random.Random(3)) <= 7.0


@pytest.mark.parametrize("jitter", [1.0, 0.5, 0.1])
def test_full_jitter_stays_within_bounds(jitter: float) -> None:
    policy = RetryPolicy(base_delay=0.1, multiplier=3.0, max_delay=4.0, jitter=jitter)
    rng = random.Random(1234)
    for attempt in range(1, 12):
        ceiling = policy.ceiling(attempt)
        samples = [policy.delay(attempt, rng) for _ in range(400)]
        assert all(ceiling * (1 - jitter) < d <= ceiling for d in samples), attempt
        # It really is spread over the whole window, not bunched at one end.
        assert min(samples) < ceiling * (1 - 0.8 * jitter)
        assert max(samples) > ceiling * (1 - 0.2 * jitter)


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    a = [DEFAULT_POLICY.delay(n, random.Random(7)) for n in range(1, 6)]
    b = [DEFAULT_POLICY.delay(n, random.Random(7)) for n in range(1, 6)]
    assert a == b


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"base_delay": -1.0},
        {"max_delay": -0.1},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"jitter": -0.1},
        {"deadline": 0.0},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)


def test_attempt_numbers_start_at_one() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        DEFAULT_POLICY.delay(0)


# --------------------------------------------------------------------------------------
# Retry loop with injected sleep and clock
# --------------------------------------------------------------------------------------


class FakeTime:
    """A clock that only moves when the code under test sleeps (or when a test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


class Flaky:
    """Raises the given exceptions in order, then returns ``result``."""

    def __init__(self, errors: Sequence[BaseException], result: str = "ok", *, cost: float = 0.0) -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0
        self.cost = cost
        self.time: FakeTime | None = None

    def __call__(self) -> str:
        self.calls += 1
        if self.time is not None:
            self.time.now += self.cost
        if self.errors:
            raise self.errors.pop(0)
        return self.result


NO_JITTER = RetryPolicy(max_attempts=5, base_delay=0.1, multiplier=2.0, max_delay=1.0, jitter=0.0)


def test_retries_until_success_and_reports_each_retry() -> None:
    fake = FakeTime()
    errors: list[BaseException] = [
        pg_errors.DeadlockDetected("deadlock detected"),
        pg_errors.SerializationFailure("could not serialize access"),
        psycopg.OperationalError("server closed the connection unexpectedly"),
    ]
    fn = Flaky(list(errors))
    seen: list[RetryAttempt] = []

    result = call_with_retry(fn, policy=NO_JITTER, on_retry=seen.append, sleep=fake.sleep, clock=fake.clock)

    assert result == "ok"
    assert fn.calls == 4
    assert fake.sleeps == pytest.approx([0.1, 0.2, 0.4])
    assert [a.attempt for a in seen] == [1, 2, 3]
    assert [a.delay for a in seen] == fake.sleeps
    assert [a.exception for a in seen] == errors
    assert [a.classification.sqlstate for a in seen] == ["40P01", "40001", None]
    assert [a.classification.reconnect for a in seen] == [False, False, True]
    assert all(a.max_attempts == 5 for a in seen)
    assert [a.elapsed for a in seen] == pytest.approx([0.0, 0.1, 0.3])


def test_fatal_error_is_reraised_unchanged_at_once() -> None:
    fake = FakeTime()
    boom = pg_errors.UniqueViolation("duplicate key value violates unique constraint")
    fn = Flaky([boom])
    seen: list[RetryAttempt] = []

    with pytest.raises(pg_errors.UniqueViolation) as info:
        call_with_retry(fn, policy=NO_JITTER, on_retry=seen.append, sleep=fake.sleep, clock=fake.clock)

    assert info.value is boom
    assert fn.calls == 1
    assert seen == []
    assert fake.sleeps == []


def test_gives_up_after_max_attempts_with_a_one_line_message() -> None:
    fake = FakeTime()
    last = pg_errors.DeadlockDetected("deadlock detected\nDETAIL:  Process 12 waits for ShareLock ...")
    fn = Flaky([pg_errors.DeadlockDetected("deadlock detected")] * 4 + [last])

    with pytest.raises(RetriesExhaustedError) as info:
        call_with_retry(
            fn,
            policy=NO_JITTER,
            sleep=fake.sleep,
            clock=fake.clock,
            on_retry=lambda _: None,
            operation="copy public.messages",
        )

    err = info.value
    assert fn.calls == 5
    assert len(fake.sleeps) == 4  # no pointless sleep after the last attempt
    assert err.__cause__ is last
    assert err.last_error is last
    assert err.attempts == 5
    assert err.elapsed == pytest.approx(sum(fake.sleeps))
    assert err.classification is not None and err.classification.sqlstate == "40P01"
    assert isinstance(err, PgferryError)
    message = str(err)
    assert "\n" not in message
    assert message.startswith("copy public.messages: gave up after 5 attempts")
    assert "SQLSTATE 40P01 (deadlock detected): deadlock detected;" in message
    assert "DETAIL" not in message
    assert "check for other sessions writing the same rows" in message


def test_deadline_stops_retrying_before_max_attempts() -> None:
    fake = FakeTime()
    policy = RetryPolicy(max_attempts=100, base_delay=0.3, multiplier=1.0, jitter=0.0, deadline=1.0)
    fn = Flaky([pg_errors.SerializationFailure("could not serialize access")] * 100)

    with pytest.raises(RetriesExhaustedError) as info:
        call_with_retry(fn, policy=policy, sleep=fake.sleep, clock=fake.clock, on_retry=lambda _: None)

    # Attempts start at t=0, 0.3, 0.6, 0.9; another one would start at 1.2, past the deadline.
    assert fn.calls == 4
    assert fake.sleeps == pytest.approx([0.3, 0.3, 0.3])
    assert "gave up after 4 attempts in 0.9s (deadline 1s)" in str(info.value)


def test_deadline_counts_time_spent_inside_attempts() -> None:
    fake = FakeTime()
    policy = RetryPolicy(max_attempts=100, base_delay=0.1, multiplier=1.0, jitter=0.0, deadline=2.0)
    fn = Flaky([psycopg.OperationalError("connection timeout expired")] * 100, cost=0.6)
    fn.time = fake

    with pytest.raises(RetriesExhaustedError) as info:
        call_with_retry(fn, policy=policy, sleep=fake.sleep, clock=fake.clock, on_retry=lambda _: None)

    # 0.6 + 0.1 + 0.6 + 0.1 + 0.6 = 2.0 at the third failure; nothing more may start.
    assert fn.calls == 3
    assert info.value.elapsed == pytest.approx(2.0)


def test_single_attempt_policy_never_sleeps() -> None:
    fake = FakeTime()
    fn = Flaky([pg_errors.AdminShutdown("terminating connection due to administrator command")])
    with pytest.raises(RetriesExhaustedError, match=r"gave up after 1 attempt in") as info:
        call_with_retry(fn, policy=RetryPolicy(max_attempts=1), sleep=fake.sleep, clock=fake.clock)
    assert fake.sleeps == []
    assert "SQLSTATE 57P01" in str(info.value)
    assert "pg_terminate_backend" in str(info.value)


def test_jittered_sleeps_respect_the_policy() -> None:
    fake = FakeTime()
    policy = RetryPolicy(max_attempts=8, base_delay=0.5, max_delay=3.0)
    fn = Flaky([pg_errors.LockNotAvailable("could not obtain lock")] * 7)
    call_with_retry(fn, policy=policy, sleep=fake.sleep, clock=fake.clock, rng=random.Random(5), on_retry=print)
    assert len(fake.sleeps) == 7
    for attempt, slept in enumerate(fake.sleeps, start=1):
        assert 0 < slept <= policy.ceiling(attempt)


def test_message_never_leaks_a_password() -> None:
    fake = FakeTime()
    fn = Flaky([psycopg.OperationalError("could not reach postgresql://app:s3cret@db.example.com/prod")] * 2)
    with pytest.raises(RetriesExhaustedError) as info:
        call_with_retry(fn, policy=RetryPolicy(max_attempts=2), sleep=fake.sleep, clock=fake.clock)
    assert "s3cret" not in str(info.value)
    assert "postgresql://app:***@db.example.com/prod" in str(info.value)


def test_custom_classifier_is_used() -> None:
    fake = FakeTime()

    def timeouts_are_retryable(exc: BaseException) -> ErrorClassification:
        if isinstance(exc, pg_errors.QueryCanceled):
            return ErrorClassification(RETRYABLE, exc.sqlstate, "statement timeout")
        return classify_error(exc)

    fn = Flaky([pg_errors.QueryCanceled("canceling statement due to statement timeout")])
    assert call_with_retry(fn, classify=timeouts_are_retryable, sleep=fake.sleep, clock=fake.clock) == "ok"
    assert fn.calls == 2


def test_keyboard_interrupt_is_never_caught() -> None:
    fake = FakeTime()
    fn = Flaky([KeyboardInterrupt()])
    with pytest.raises(KeyboardInterrupt):
        call_with_retry(fn, sleep=fake.sleep, clock=fake.clock)
    assert fn.calls == 1


def test_retries_are_logged_when_no_callback_is_given() -> None:
    fake = FakeTime()
    fn = Flaky([pg_errors.DeadlockDetected("deadlock detected")])
    with capture_logs() as logs:
        call_with_retry(fn, policy=NO_JITTER, sleep=fake.sleep, clock=fake.clock, operation="copy t")
    assert len(logs) == 1
    assert logs[0]["event"] == "db.retry"
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["sqlstate"] == "40P01"
    assert logs[0]["operation"] == "copy t"


def test_exhausted_error_survives_pickling() -> None:
    fake = FakeTime()
    fn = Flaky([pg_errors.TooManyConnections("sorry, too many clients already")] * 2)
    with pytest.raises(RetriesExhaustedError) as info:
        call_with_retry(fn, policy=RetryPolicy(max_attempts=2), sleep=fake.sleep, clock=fake.clock)
    copy = pickle.loads(pickle.dumps(info.value))  # noqa: S301 - our own bytes
    assert str(copy) == str(info.value)
    assert copy.attempts == 2
    assert copy.classification == info.value.classification


# --------------------------------------------------------------------------------------
# Async loop
# --------------------------------------------------------------------------------------


class AsyncFlaky(Flaky):
    async def run(self) -> str:
        return self()


def test_async_retries_until_success() -> None:
    fake = FakeTime()
    fn = AsyncFlaky([pg_errors.DeadlockDetected("deadlock"), ConnectionResetError("reset")])
    seen: list[RetryAttempt] = []
    result = asyncio.run(
        acall_with_retry(fn.run, policy=NO_JITTER, on_retry=seen.append, sleep=fake.asleep, clock=fake.clock)
    )
    assert result == "ok"
    assert fn.calls == 3
    assert fake.sleeps == pytest.approx([0.1, 0.2])
    assert [a.classification.reconnect for a in seen] == [False, True]


def test_async_fatal_and_exhausted() -> None:
    fake = FakeTime()
    boom = pg_errors.SyntaxError('syntax error at or near "selec"')
    fatal = AsyncFlaky([boom])
    with pytest.raises(pg_errors.SyntaxError) as info:
        asyncio.run(acall_with_retry(fatal.run, sleep=fake.asleep, clock=fake.clock))
    assert info.value is boom
    assert fatal.calls == 1

    flaky = AsyncFlaky([pg_errors.SerializationFailure("could not serialize")] * 3)
    with pytest.raises(RetriesExhaustedError, match="after 3 attempts") as exhausted:
        asyncio.run(
            acall_with_retry(
                flaky.run,
                policy=RetryPolicy(max_attempts=3),
                sleep=fake.asleep,
                clock=fake.clock,
                on_retry=lambda _: None,
            )
        )
    assert isinstance(exhausted.value.__cause__, pg_errors.SerializationFailure)


def test_async_cancellation_is_not_retried() -> None:
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(acall_with_retry(fn))
    assert calls == 1


def test_async_default_sleep_really_waits() -> None:
    fn = AsyncFlaky([pg_errors.DeadlockDetected("deadlock")])
    started = time.monotonic()
    policy = RetryPolicy(base_delay=0.05, jitter=0.0)
    assert asyncio.run(acall_with_retry(fn.run, policy=policy, on_retry=lambda _: None)) == "ok"
    assert time.monotonic() - started >= 0.05


# --------------------------------------------------------------------------------------
# Real server
# --------------------------------------------------------------------------------------


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, autocommit=True, connect_timeout=10)


@pytest.fixture
def probe_url(target_url: str) -> str:
    """``target_url`` with a two-row scratch table ``retry_probe(id, v)``."""
    with _connect(target_url) as conn:
        conn.execute("create table retry_probe (id int primary key, v int not null)")
        conn.execute("insert into retry_probe values (1, 0), (2, 0)")
    return target_url


def _values(url: str) -> dict[int, int]:
    with _connect(url) as conn:
        return dict(conn.execute("select id, v from retry_probe order by id").fetchall())


def _must_not_retry(attempt: RetryAttempt) -> None:
    pytest.fail(f"unexpected retry after {attempt.classification}")


def _wait_for_backend(admin: psycopg.Connection[tuple[Any, ...]], query_prefix: str, timeout: float = 20) -> int:
    """pid of another backend in this database that is actively running ``query_prefix...``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = admin.execute(
            "select pid from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid() "
            "and state = 'active' and query like %s",
            (query_prefix + "%",),
        ).fetchone()
        if row is not None:
            return int(row[0])
        time.sleep(0.02)
    raise AssertionError(f"no backend started running {query_prefix!r} within {timeout}s")


def _wait_until_gone(admin: psycopg.Connection[tuple[Any, ...]], pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if admin.execute("select 1 from pg_stat_activity where pid = %s", (pid,)).fetchone() is None:
            return
        time.sleep(0.02)
    raise AssertionError(f"backend {pid} still alive after {timeout}s")


@contextmanager
def _terminator(url: str, query_prefix: str) -> Iterator[list[int]]:
    """In the background, ``pg_terminate_backend`` the first backend seen running ``query_prefix``."""
    killed: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with _connect(url) as admin:
                pid = _wait_for_backend(admin, query_prefix)
                assert admin.execute("select pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
                killed.append(pid)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        thread.join(30)
        if errors:
            raise errors[0]


def test_real_deadlock_is_retried_on_the_same_connection(probe_url: str) -> None:
    barrier = threading.Barrier(2, timeout=20)
    retries: dict[str, list[RetryAttempt]] = {"a": [], "b": []}
    backends: dict[str, set[int]] = {"a": set(), "b": set()}
    committed = {"a": threading.Event(), "b": threading.Event()}

    def worker(name: str, first: int, second: int) -> str:
        with _connect(probe_url) as conn:
            # Only one side may detect the deadlock: if both timers fired together, both could be chosen.
            conn.execute("set deadlock_timeout = '50ms'" if name == "a" else "set deadlock_timeout = '5s'")
            calls = 0

            def transaction() -> str:
                nonlocal calls
                calls += 1
                backends[name].add(conn.info.backend_pid)
                if calls > 1:
                    # The victim's retry could otherwise take its first row back before the survivor gets it
                    # and deadlock a second time: a real outcome, but not the one this test is about.
                    committed["b" if name == "a" else "a"].wait(20)
                with conn.transaction():
                    conn.execute("update retry_probe set v = v + 1 where id = %s", (first,))
                    if calls == 1:
                        barrier.wait()  # both hold their first row lock: the second updates now deadlock
                    conn.execute("update retry_probe set v = v + 1 where id = %s", (second,))
                return name

            result = call_with_retry(transaction, policy=FAST, on_retry=retries[name].append)
            committed[name].set()
            return result

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(worker, "a", 1, 2), pool.submit(worker, "b", 2, 1)]
        assert sorted(f.result(timeout=60) for f in futures) == ["a", "b"]

    victims = retries["a"] + retries["b"]
    assert len(victims) == 1, "exactly one transaction is chosen as the deadlock victim"
    attempt = victims[0]
    assert isinstance(attempt.exception, pg_errors.DeadlockDetected)
    assert attempt.classification.kind is RETRYABLE
    assert attempt.classification.sqlstate == "40P01"
    assert attempt.classification.reconnect is False
    assert classify_error(attempt.exception) == attempt.classification
    # The session survived the deadlock: each worker used one backend throughout.
    assert all(len(pids) == 1 for pids in backends.values())
    # Both transactions committed exactly once in the end.
    assert _values(probe_url) == {1: 2, 2: 2}


def test_real_serialization_failure_is_retried(probe_url: str) -> None:
    seen: list[RetryAttempt] = []
    calls = 0
    with _connect(probe_url) as conn_a, _connect(probe_url) as conn_b:

        def transaction() -> int:
            nonlocal calls
            calls += 1
            with conn_a.transaction():
                conn_a.execute("set transaction isolation level repeatable read")
                row = conn_a.execute("select v from retry_probe where id = 1").fetchone()
                assert row is not None
                if calls == 1:
                    # A concurrent repeatable-read transaction changes the row after our snapshot.
                    with conn_b.transaction():
                        conn_b.execute("set transaction isolation level repeatable read")
                        conn_b.execute("select v from retry_probe where id = 1")
                        conn_b.execute("update retry_probe set v = v + 10 where id = 1")
                conn_a.execute("update retry_probe set v = v + 1 where id = 1")
                return int(row[0])

        seen_value = call_with_retry(transaction, policy=FAST, on_retry=seen.append)

    assert calls == 2
    assert seen_value == 10, "the retry saw the other transaction's committed write"
    assert len(seen) == 1
    assert isinstance(seen[0].exception, pg_errors.SerializationFailure)
    assert seen[0].classification.kind is RETRYABLE
    assert (seen[0].classification.sqlstate, seen[0].classification.reconnect) == ("40001", False)
    assert _values(probe_url)[1] == 11


def test_real_terminated_backend_is_retried_on_a_fresh_connection(target_url: str) -> None:
    seen: list[RetryAttempt] = []
    pids: list[int] = []

    def attempt() -> int:
        with _connect(target_url) as conn:
            pids.append(conn.info.backend_pid)
            seconds = 10 if len(pids) == 1 else 0  # only the first attempt is slow enough to be killed
            row = conn.execute("select pg_sleep(%s), pg_backend_pid()", (seconds,)).fetchone()
            assert row is not None
            return int(row[1])

    started = time.monotonic()
    with _terminator(target_url, "select pg_sleep(") as killed:
        result = call_with_retry(attempt, policy=FAST, on_retry=seen.append)

    assert time.monotonic() - started < 9, "the killed attempt did not sit out its pg_sleep(10)"
    assert killed == [pids[0]]
    assert len(pids) == 2 and pids[0] != pids[1]
    assert result == pids[1]
    assert len(seen) == 1
    classification = seen[0].classification
    assert classification.kind is RETRYABLE
    assert classification.reconnect is True
    assert isinstance(seen[0].exception, psycopg.OperationalError)
    assert classification.sqlstate in ("57P01", None)  # psycopg may only see the socket close
    assert classify_error(seen[0].exception) == classification


def test_real_dead_connection_is_replaced_only_when_told(target_url: str) -> None:
    """The reconnect pattern from the module docstring, against a connection killed while idle."""
    conn: psycopg.Connection[tuple[Any, ...]] | None = _connect(target_url)
    assert conn is not None
    first_pid = conn.info.backend_pid
    with _connect(target_url) as admin:
        admin.execute("select pg_terminate_backend(%s)", (first_pid,))
        _wait_until_gone(admin, first_pid)

    seen: list[RetryAttempt] = []

    def forget_broken_connection(attempt: RetryAttempt) -> None:
        nonlocal conn
        seen.append(attempt)
        if attempt.classification.reconnect and conn is not None:
            conn.close()
            conn = None

    def query() -> int:
        nonlocal conn
        if conn is None:
            conn = _connect(target_url)
        row = conn.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        return int(row[0])

    try:
        new_pid = call_with_retry(query, policy=FAST, on_retry=forget_broken_connection)
    finally:
        if conn is not None:
            conn.close()

    assert new_pid != first_pid
    assert len(seen) == 1
    assert seen[0].classification.retryable and seen[0].classification.reconnect


def test_real_unique_violation_is_fatal_and_not_retried(probe_url: str) -> None:
    calls = 0
    raised: list[BaseException] = []
    sleeps: list[float] = []
    with _connect(probe_url) as conn:

        def insert() -> None:
            nonlocal calls
            calls += 1
            try:
                conn.execute("insert into retry_probe values (1, 5)")
            except psycopg.Error as exc:
                raised.append(exc)
                raise

        with pytest.raises(pg_errors.UniqueViolation) as info:
            call_with_retry(insert, policy=FAST, sleep=sleeps.append, on_retry=_must_not_retry)

    assert calls == 1
    assert sleeps == []
    assert info.value is raised[0]
    result = classify_error(info.value)
    assert (result.kind, result.sqlstate) == (FATAL, "23505")


@pytest.mark.parametrize(
    ("sql", "sqlstate"),
    [
        ("selec 1", "42601"),
        ("select * from no_such_table", "42P01"),
        ("select 1/0", "22012"),
        ("select 'x'::int", "22P02"),
    ],
)
def test_real_statement_errors_are_fatal(target_url: str, sql: str, sqlstate: str) -> None:
    with _connect(target_url) as conn, pytest.raises(psycopg.Error) as info:
        conn.execute(sql)
    result = classify_error(info.value)
    assert (result.kind, result.sqlstate) == (FATAL, sqlstate)


def test_real_lock_timeout_is_retryable_and_statement_timeout_is_fatal(probe_url: str) -> None:
    with _connect(probe_url) as holder, _connect(probe_url) as waiter:
        with holder.transaction():
            holder.execute("select * from retry_probe where id = 1 for update")
            waiter.execute("set lock_timeout = '50ms'")
            with pytest.raises(pg_errors.LockNotAvailable) as lock_info:
                waiter.execute("update retry_probe set v = 1 where id = 1")
        lock = classify_error(lock_info.value)
        assert (lock.kind, lock.sqlstate, lock.reconnect) == (RETRYABLE, "55P03", False)
        assert waiter.execute("select 1").fetchone() == (1,), "lock timeout leaves the session usable"

        waiter.execute("set statement_timeout = '50ms'")
        with pytest.raises(pg_errors.QueryCanceled) as timeout_info:
            waiter.execute("select pg_sleep(2)")
        assert classify_error(timeout_info.value).kind is FATAL


def test_real_connection_to_missing_database_fails_fast(target_url: str) -> None:
    calls = 0

    def connect() -> None:
        nonlocal calls
        calls += 1
        with psycopg.connect(make_conninfo(target_url, dbname="pgferry_no_such_db"), connect_timeout=10):
            pass

    with pytest.raises(psycopg.OperationalError) as info:
        call_with_retry(connect, policy=FAST, on_retry=_must_not_retry)
    assert calls == 1
    assert classify_error(info.value).kind is FATAL


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_real_connection_refused_is_retried_then_reported(target_url: str) -> None:
    sleeps: list[float] = []
    url = make_conninfo(target_url, host="127.0.0.1", port=str(_unused_port()), connect_timeout=5)

    def connect() -> None:
        with psycopg.connect(url):
            pass

    with pytest.raises(RetriesExhaustedError) as info:
        call_with_retry(connect, policy=RetryPolicy(max_attempts=3), sleep=sleeps.append, on_retry=lambda _: None)

    assert len(sleeps) == 2
    message = str(info.value)
    assert "gave up after 3 attempts" in message
    assert "Connection refused" in message
    assert "check that the database server is up and reachable" in message
    assert isinstance(info.value.__cause__, psycopg.OperationalError)


def test_real_async_terminated_backend_is_retried(target_url: str) -> None:
    seen: list[RetryAttempt] = []
    pids: list[int] = []

    async def attempt() -> int:
        async with await psycopg.AsyncConnection.connect(target_url, autocommit=True) as conn:
            pids.append(conn.info.backend_pid)
            seconds = 10 if len(pids) == 1 else 0
            cur = await conn.execute("select pg_sleep(%s), pg_backend_pid()", (seconds,))
            row = await cur.fetchone()
            assert row is not None
            return int(row[1])

    with _terminator(target_url, "select pg_sleep(") as killed:
        result = asyncio.run(acall_with_retry(attempt, policy=FAST, on_retry=seen.append))

    assert killed == [pids[0]]
    assert result == pids[1] != pids[0]
    assert len(seen) == 1 and seen[0].classification.reconnect is True
