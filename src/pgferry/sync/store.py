"""Shape logs on disk: append-only files of encoded messages, indexed by offset.

Why on disk: a server holding many shapes (or one 100k-row shape) must not hold every message in memory, and a
restart must not force every client to refetch; Electric keeps its logs on disk for the same reasons. Memory per
shape is an index of three integers per entry; message bytes are read from the file when a client asks.

File format (``log``): one entry per line, ``<tx> <op> <json>\\n``. A line is only indexed after the writer has
flushed it, so readers (the HTTP handlers) never see half an entry; a torn last line after a crash is cut off at
load. ``meta.json`` (written atomically, last) marks a shape whose snapshot completed: a directory without it is
an interrupted snapshot and is deleted at load.

This module knows nothing about PostgreSQL or HTTP.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgferry.sync.protocol import LogOffset

__all__ = ["LogChunk", "ShapeLog", "write_json_atomic"]


@dataclass(frozen=True, slots=True)
class LogChunk:
    """Entries after a requested offset: encoded messages, the offset of the last one, and whether the log
    ended there (so the response can say up-to-date)."""

    messages: list[bytes]
    last_offset: LogOffset | None
    at_end: bool


def write_json_atomic(path: Path, data: Any) -> None:
    """Write, fsync, rename: a reader (or a restarted server) sees the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ShapeLog:
    """One shape's log. Appends come from one writer thread; reads from any thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._path = directory / "log"
        self._lock = threading.Lock()
        self._tx: array[int] = array("q")
        self._op: array[int] = array("q")
        self._pos: array[int] = array("q")  # byte position of each entry's JSON
        self._len: array[int] = array("l")  # length of each entry's JSON
        self._load()
        self._writer = open(self._path, "ab")  # noqa: SIM115 - kept open for the shape's lifetime
        self._size = self._writer.tell()
        self._reader_fd = os.open(self._path, os.O_RDONLY)

    def _load(self) -> None:
        if not self._path.exists():
            self._path.touch()
            return
        good = 0
        with open(self._path, "rb") as handle:
            position = 0
            for line in handle:
                if not line.endswith(b"\n"):
                    break  # torn write from a crash: everything before it is intact
                tx_text, op_text, body = line.split(b" ", 2)
                head = len(tx_text) + len(op_text) + 2
                self._tx.append(int(tx_text))
                self._op.append(int(op_text))
                self._pos.append(position + head)
                self._len.append(len(body) - 1)
                position += len(line)
                good = position
        if good != self._path.stat().st_size:
            with open(self._path, "r+b") as handle:
                handle.truncate(good)

    def close(self) -> None:
        with self._lock:
            if not self._writer.closed:
                self._writer.close()
                os.close(self._reader_fd)

    def delete(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __len__(self) -> int:
        return len(self._tx)

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def last_offset(self) -> LogOffset | None:
        with self._lock:
            if not self._tx:
                return None
            return LogOffset(self._tx[-1], self._op[-1])

    def append(self, entries: Sequence[tuple[LogOffset, bytes]]) -> None:
        """Append and index entries (offsets must be increasing); call :meth:`sync` to make them durable."""
        if not entries:
            return
        buffer = bytearray()
        tx: list[int] = []
        op: list[int] = []
        pos: list[int] = []
        length: list[int] = []
        position = self._size
        for offset, body in entries:
            head = b"%d %d " % (offset.tx, offset.op)
            tx.append(offset.tx)
            op.append(offset.op)
            pos.append(position + len(head))
            length.append(len(body))
            buffer += head
            buffer += body
            buffer += b"\n"
            position += len(head) + len(body) + 1
        self._writer.write(buffer)
        self._writer.flush()
        with self._lock:
            self._tx.extend(tx)
            self._op.extend(op)
            self._pos.extend(pos)
            self._len.extend(length)
            self._size = position

    def sync(self) -> None:
        os.fsync(self._writer.fileno())

    def read_after(self, offset: LogOffset, *, max_bytes: int = 4 << 20) -> LogChunk:
        """Entries strictly after ``offset``, up to about ``max_bytes`` (at least one entry).

        A chunk never ends on op 0 of a replicated transaction that has more ops, so every offset handed out as
        ``<lsn>_0`` (lsn > 0) means "all of transaction lsn", which is how an SSE client resumes (see
        :func:`normalise_offset`)."""
        with self._lock:
            count = len(self._tx)
            start = bisect.bisect_right(range(count), (offset.tx, offset.op), key=lambda i: (self._tx[i], self._op[i]))
            end = start
            total = 0
            while end < count and (end == start or total + self._len[end] <= max_bytes):
                total += self._len[end] + 1
                end += 1
            if end < count and self._tx[end - 1] > 0 and self._op[end - 1] == 0 and self._tx[end] == self._tx[end - 1]:
                end += 1  # never end a chunk on op 0 of a transaction with more: see normalise_offset
            if start == end:
                return LogChunk([], None, True)
            first_pos = self._pos[start]
            last_pos = self._pos[end - 1] + self._len[end - 1]
            positions = [(self._pos[i] - first_pos, self._len[i]) for i in range(start, end)]
            last = LogOffset(self._tx[end - 1], self._op[end - 1])
            at_end = end == count
            blob = os.pread(self._reader_fd, last_pos - first_pos, first_pos)
        return LogChunk([blob[p : p + n] for p, n in positions], last, at_end)


def normalise_offset(offset: LogOffset) -> LogOffset:
    """``<lsn>_0`` of a replicated transaction read as "after every op of that transaction".

    The official client in SSE mode resumes from ``<global_last_seen_lsn>_0`` (``getOffset`` in its helpers),
    built from the ``up-to-date`` message that follows a complete transaction; read literally, that offset would
    resend the transaction's ops 1..n. The reading is exact for every offset this server hands out, because
    :meth:`ShapeLog.read_after` never ends a chunk on op 0 of a transaction that has more ops.
    """
    if offset.tx > 0 and offset.op == 0:
        return LogOffset(offset.tx, _LAST_OP)
    return offset


_LAST_OP = 2**62
