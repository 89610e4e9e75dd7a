"""A snapshot's ``COPY … TO STDOUT`` read and turned into Electric messages with no Python work per row.

Why: psycopg hands a COPY over one row at a time — a generator step and a Python object per row, ~1.5 µs each,
all of it holding the GIL that the same server's compression, disk writes and HTTP serving need. Here the C
extension (:mod:`pgferry.sync._copyjson`) calls libpq's ``PQgetCopyData`` in a loop without the GIL and converts
each block of rows as it arrives (:mod:`pgferry.sync.copytext`), so a block of thousands of rows costs Python one
call. The libpq functions are the ones psycopg itself loaded, found by address (the extension does not link libpq,
so one connection is never driven by two builds of it); everything around the rows — sending the statement, the
results before and after, errors — goes through psycopg's ``pq`` wrapper, so the connection stays psycopg's.

:func:`copy_functions` is ``None`` where any of that is not available (no C extension, no ``/proc/self/maps``,
more than one libpq loaded): the caller then reads the COPY through psycopg as before.

This module owns reading a COPY stream; it knows nothing about shapes, logs or HTTP.
"""

from __future__ import annotations

import ctypes
import functools
import os
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq
from psycopg.errors import error_from_result

from pgferry.db.sockets import wait_readable, wait_writable
from pgferry.sync.copytext import MessageTemplate

_ReadCopy = Callable[[int, int, int, tuple[bytes, ...], bytes, tuple[int, ...], int, float], tuple[bytes, bytes, int]]
_read_copy: _ReadCopy | None
try:
    from pgferry.sync._copyjson import read_copy as _read_copy
except ImportError:  # pragma: no cover - an install without a C compiler
    _read_copy = None

__all__ = ["copy_functions", "stream_copy_messages"]

#: How long one call may gather rows before it hands back what it has: the caller's "no row for N seconds"
#: watchdog needs to hear from the stream while rows keep coming, however slowly.
_MAX_BLOCK_SECONDS = 0.5


@functools.cache
def copy_functions() -> tuple[int, int] | None:
    """Addresses of ``PQgetCopyData`` and ``PQfreemem`` in the libpq psycopg loaded, or ``None``."""
    if _read_copy is None:
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    libraries = {line.split()[-1] for line in maps.splitlines() if "/libpq" in line and line.split()[-1][0] == "/"}
    if len(libraries) != 1:  # none (static, other platform) or several: never guess which one psycopg uses
        return None
    try:
        libpq = ctypes.CDLL(libraries.pop(), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        get_copy_data = ctypes.cast(libpq.PQgetCopyData, ctypes.c_void_p).value
        freemem = ctypes.cast(libpq.PQfreemem, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    if not get_copy_data or not freemem:
        return None
    return int(get_copy_data), int(freemem)


def stream_copy_messages(
    conn: psycopg.Connection[Any],
    statement: bytes,
    template: MessageTemplate,
    segment_bytes: int,
    on_rows: Callable[[], None] = lambda: None,
) -> Iterator[tuple[bytes, array[int]]]:
    """Run ``statement`` (a ``COPY … TO STDOUT`` in text format, parameters already merged) on ``conn`` and yield
    its rows as messages in blocks of just under ``segment_bytes`` of JSON (the COPY text read per block follows
    the JSON-to-text ratio seen so far): each block's messages joined by commas and their lengths
    (:meth:`MessageTemplate.convert_joined`). ``on_rows`` is called whenever rows arrived.
    Only when :func:`copy_functions` is not ``None``. PostgreSQL's errors (a cancel, a timeout) are raised as
    psycopg raises them."""
    functions = copy_functions()
    if functions is None or _read_copy is None:
        raise RuntimeError("the C COPY reader is not available here; read the COPY through psycopg")
    get_copy_data, freemem = functions
    pgconn = conn.pgconn
    address = getattr(pgconn, "pgconn_ptr", None)  # psycopg's C and ctypes wrappers have it, not its abc
    if not address:
        raise RuntimeError("this psycopg does not expose its libpq connection; read the COPY through psycopg")
    encoding = conn.info.encoding
    with conn.lock:
        pgconn.send_query(statement)
        while pgconn.flush() == 1:
            wait_writable(pgconn.socket, 1.0)
        started = _next_result(pgconn)
        if started is None or started.status != pq.ExecStatus.COPY_OUT:
            _drain(pgconn)
            if started is not None and started.status == pq.ExecStatus.FATAL_ERROR:
                raise error_from_result(started, encoding=encoding)
            raise psycopg.ProgrammingError("the snapshot statement did not start a COPY TO STDOUT")
        block_bytes = max(1, segment_bytes * 2 // 3)  # COPY text is about two thirds of its JSON
        read_bytes = json_bytes = 0
        while True:
            plain, lengths, status = _read_copy(
                get_copy_data,
                freemem,
                int(address),
                template.parts,
                template.key_head,
                template.pk_fields,
                block_bytes,
                _MAX_BLOCK_SECONDS,
            )
            on_rows()
            if status == -2:
                raise psycopg.OperationalError(pgconn.error_message.decode(errors="replace"))
            if status == -1:
                # The statement's outcome before the last rows: a COPY that failed (a where clause that errs on
                # some row, a cancel) hands on nothing of its last block, as the psycopg row loop before it.
                ended = _next_result(pgconn)
                _drain(pgconn)
                if ended is not None and ended.status == pq.ExecStatus.FATAL_ERROR:
                    raise error_from_result(ended, encoding=encoding)
            if lengths:
                counts = array("q")
                counts.frombytes(lengths)
                # Segments just under segment_bytes: a page (whole segments up to a size) then holds as many as fit.
                read_bytes += block_bytes
                json_bytes += len(plain)
                block_bytes = max(1, int(segment_bytes * 0.97 * read_bytes / json_bytes))
                yield plain, counts
            if status == -1:
                break


def _next_result(pgconn: pq.abc.PGconn) -> pq.abc.PGresult | None:
    """The next result, waiting for the socket without the GIL (libpq's own wait would hold it)."""
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            return pgconn.get_result()
        wait_readable([pgconn.socket], 1.0)


def _drain(pgconn: pq.abc.PGconn) -> None:
    while _next_result(pgconn) is not None:
        pass
