"""The C COPY reader (``pgferry.sync.copyout``, issue 16) on a real server: what it yields, and how it ends.

A snapshot's COPY is read by libpq without the GIL and converted in C; the server's watchdog, its cancel on
shutdown and its "a where clause that fails is a 400" all depend on how the reader reports progress and errors.
The oracle for the rows is psycopg's own COPY of the same statement, converted by the Python path.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import psycopg
import pytest

from pgferry.sync.copyout import copy_functions, stream_copy_messages
from pgferry.sync.copytext import MessageTemplate

HEADERS: dict[str, object] = {"operation": "insert", "relation": ["public", "t"]}


@pytest.fixture
def conn(target_url: str) -> Any:
    if copy_functions() is None:
        pytest.fail("the C COPY reader is not available on this install (pgferry.sync._copyjson not built?)")
    with psycopg.connect(target_url) as connection:
        connection.execute("begin")
        yield connection


def _template() -> MessageTemplate:
    return MessageTemplate(["i", "s"], '"public"."t"/', [0], HEADERS, key_built=True)


def test_rows_equal_the_python_conversion_of_psycopgs_copy(conn: psycopg.Connection[Any]) -> None:
    statement = (
        "copy (select i, repeat(chr(1 + i % 126), i % 40) || E'\\\\\\t\"/' from generate_series(1, 20000) i) to stdout"
    )
    blocks = list(stream_copy_messages(conn, statement.encode(), _template(), 64 << 10))
    assert len(blocks) > 10  # many blocks, each just under the segment size
    # Just under the segment size once the JSON-to-text ratio is known (the first block guesses it).
    assert all(50 << 10 < len(plain) < 64 << 10 for plain, _lengths in blocks[1:-1])
    messages = []
    for plain, lengths in blocks:
        start = 0
        for length in lengths:
            messages.append(plain[start : start + length])
            start += length + 1
        assert start == len(plain) + 1
    with conn.cursor() as cursor, cursor.copy(statement) as copy:
        text = b"".join(bytes(data) for data in copy)
    assert messages == _template().convert(text, accelerated=False)
    assert json.loads(messages[0])["key"] == '"public"."t"/"1"'
    assert conn.execute("select 1").fetchone() == (1,)  # the connection is psycopg's again


def test_slow_rows_are_handed_on_while_they_come(conn: psycopg.Connection[Any]) -> None:
    """The server's "no row for snapshot_timeout_ms" watchdog needs to hear from a slow stream: blocks come back
    after at most about half a second even when they are far from full."""
    calls: list[float] = []
    # Rows larger than PostgreSQL's 8 KiB send buffer, so each one leaves the server when it is made.
    statement = b"copy (select i, repeat('x', 9000) || pg_sleep(0.15)::text from generate_series(1, 12) i) to stdout"
    started = time.monotonic()
    rows = sum(
        len(lengths)
        for _p, lengths in stream_copy_messages(
            conn, statement, _template(), 1 << 20, lambda: calls.append(time.monotonic())
        )
    )
    assert rows == 12
    assert len(calls) >= 3, calls
    gaps = [b - a for a, b in zip([started, *calls], calls, strict=False)]
    assert max(gaps) < 1.2, gaps


def test_a_failing_statement_raises_and_hands_on_nothing_of_its_last_block(conn: psycopg.Connection[Any]) -> None:
    statement = b"copy (select i, (1 / (500 - i))::text from generate_series(1, 1000) i) to stdout"
    got: list[int] = []
    with pytest.raises(psycopg.errors.DivisionByZero):
        for _plain, lengths in stream_copy_messages(conn, statement, _template(), 1 << 20):
            got.append(len(lengths))
    assert got == []  # the 499 rows before the error were in the block the error ended
    conn.rollback()
    assert conn.execute("select 2").fetchone() == (2,)


def test_a_cancel_from_another_thread_ends_a_blocked_read(conn: psycopg.Connection[Any]) -> None:
    """The reader waits inside libpq without the GIL; PostgreSQL's cancel (what the server sends on a stall or at
    shutdown) ends it with QueryCanceled, and the connection can roll back and go on."""
    statement = b"copy (select i, pg_sleep(30)::text from generate_series(1, 3) i) to stdout"
    timer = threading.Timer(0.5, conn.cancel)
    timer.start()
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled):
        list(stream_copy_messages(conn, statement, _template(), 1 << 20))
    assert time.monotonic() - started < 10
    conn.rollback()
    assert conn.execute("select 3").fetchone() == (3,)


def test_a_statement_that_is_no_copy_is_refused(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.ProgrammingError, match="did not start a COPY"):
        list(stream_copy_messages(conn, b"select 1", _template(), 1 << 20))
    with pytest.raises(psycopg.errors.UndefinedTable):
        list(stream_copy_messages(conn, b"copy (select * from no_such_table) to stdout", _template(), 1 << 20))


def test_a_connection_past_descriptor_1024_is_read(target_url: str) -> None:
    """A sync server holding thousands of live requests has sockets past select()'s limit: the reader's waits must
    not use select (found by bench/sync.py: a new shape failed once 10,000 clients were connected)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with psycopg.connect(target_url) as connection:
            assert connection.pgconn.socket > 1024
            connection.execute("begin")
            statement = b"copy (select i, i::text from generate_series(1, 10) i) to stdout"
            blocks = list(stream_copy_messages(connection, statement, _template(), 1 << 20))
            assert sum(len(lengths) for _plain, lengths in blocks) == 10
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
