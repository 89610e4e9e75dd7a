"""Shape logs on disk: segments of encoded messages, stored in their final wire form, indexed by offset.

Why on disk: a server holding many shapes (or one 100k-row shape) must not hold every message in memory, and a
restart must not force every client to refetch; Electric keeps its logs on disk for the same reasons. Memory per
shape is an index of four integers per entry; message bytes are read from the file when a client asks.

Why segments in wire form: a materialised shape is served to many clients, so each appended batch of entries (a
slice of the snapshot, or one replicated transaction) is stored once as the plain JSON a response carries (the
messages joined by commas) and once compressed (a raw deflate piece, see :mod:`pgferry.sync.wire`); a page of the
log that starts at a segment boundary is those stored bytes laid end to end, never encoded again.

Snapshot segments are stored deflated only (no plain bytes, no zstd frame yet): a fresh snapshot is written on
its way to its first client, and on this machine kind the plain JSON (3-5x the deflate bytes) cost more to put
into the page cache than to produce, and the zstd frames cost as much CPU as the deflate pieces. Every client
accepts gzip (browsers, Node's fetch, httpx); a request for identity, or an offset inside such a segment,
inflates the stored piece (ISA-L, ~1 GB/s) and checks it against the stored CRC-32. The zstd frames are made
after the snapshot, at low priority (:class:`ZstdFrameFiller`), and recorded by frame records appended to the
index; until a run's frames exist, a client asking for zstd gets gzip (or identity when it refuses gzip).

Files: ``data`` holds each segment's plain bytes (unless compressed only) followed by its deflate bytes and its
zstd frame; ``index`` holds, per segment, a header (kind, first entry, entry count, plain, deflate and zstd
positions and lengths, CRC-32 of the plain bytes) followed by one record per entry (tx, op, position and length of
its JSON: in ``data``, or inside the inflated segment when compressed only). A segment exists once its index
record is complete: at load, a torn index tail and data beyond the last complete segment are cut off.
``meta.json`` (written atomically, last) marks a shape whose snapshot completed: a directory without it is an
interrupted snapshot and is deleted at load.

This module knows nothing about PostgreSQL or HTTP.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import queue
import shutil
import struct
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import add
from pathlib import Path
from typing import Any

import structlog

from pgferry.sync.protocol import LogOffset
from pgferry.sync.wire import (
    AVAILABLE_ENCODINGS,
    CorruptSegmentError,
    GzipPiece,
    compress_segment,
    compress_zstd,
    inflate_segment,
    segment_crc32,
)

__all__ = [
    "CorruptSegmentError",
    "LegacyLogError",
    "LogChunk",
    "SegmentRun",
    "ShapeLog",
    "ZstdFrameFiller",
    "write_json_atomic",
]

# kind, first entry, count, plain pos, plain len, deflate pos, deflate len, crc, zstd pos, zstd len
_log = structlog.get_logger("pgferry.sync.store")

_SEGMENT = struct.Struct("<10q")
_SEGMENT_KIND = 2  # plain, deflate and zstd stored
_COMPRESSED_SEGMENT_KIND = 3  # deflate and zstd only; plain position -1, entry positions relative to the segment
_ZSTD_FRAME_KIND = 4  # a zstd frame made after its segment: (kind, segment, 0 ... 0, zstd pos, zstd len), no entries
_ENTRY_FIELDS = 4  # tx, op, pos, len (int64 each)
_ENTRY_BYTES = 8 * _ENTRY_FIELDS


class LegacyLogError(Exception):
    """A shape directory written by an older pgferry (one ``log`` file of lines): it cannot be served in wire
    form, so the shape is dropped and its clients refetch."""


@dataclass(frozen=True, slots=True)
class LogChunk:
    """Entries after a requested offset: encoded messages, the offset of the last one, and whether the log
    ended there (so the response can say up-to-date)."""

    messages: list[bytes]
    last_offset: LogOffset | None
    at_end: bool


@dataclass(frozen=True, slots=True)
class SegmentRun:
    """Whole stored segments after a requested offset, as they go on the wire: ``plain`` (each segment's
    messages joined by commas) and/or ``deflated`` (see :func:`pgferry.sync.wire.gzip_body`) or ``zstd`` (one
    frame each), as asked."""

    plain: list[bytes]
    deflated: list[GzipPiece]
    zstd: list[bytes]
    plain_bytes: int
    last_offset: LogOffset
    at_end: bool
    #: The coding read: the one asked for, or the fallback when the run's zstd frames are not all made yet.
    encoding: str = "identity"


@dataclass(frozen=True, slots=True)
class _StoredSegment:
    """A segment's bytes as read from ``data``: its plain JSON, or (``plain_pos`` -1) its deflate piece."""

    body: bytes
    plain_pos: int
    crc: int

    def plain(self, where: Path) -> bytes:
        return self.body if self.plain_pos >= 0 else inflate_segment(self.body, self.crc, where)


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
        if (directory / "log").exists():
            raise LegacyLogError(str(directory))
        self._data_path = directory / "data"
        self._index_path = directory / "index"
        self._lock = threading.Lock()
        # Appends come from the shape's writer and from the zstd frame filler: one at a time, in file order.
        self._append_lock = threading.Lock()
        self._closed = False
        self._tx: array[int] = array("q")
        self._op: array[int] = array("q")
        self._pos: array[int] = array("q")  # byte position of each entry's JSON in data
        self._len: array[int] = array("q")  # length of each entry's JSON
        self._seg_first: array[int] = array("q")  # first entry of each segment
        self._seg_plain: array[int] = array("q")  # position, length of its plain bytes
        self._seg_plain_len: array[int] = array("q")
        self._seg_gz: array[int] = array("q")  # position, length of its deflate bytes
        self._seg_gz_len: array[int] = array("q")
        self._seg_crc: array[int] = array("q")
        self._seg_zstd: array[int] = array("q")  # position, length of its zstd frame
        self._seg_zstd_len: array[int] = array("q")
        data_size, index_size = self._load()
        self._data = open(self._data_path, "ab")  # noqa: SIM115 - kept open for the shape's lifetime
        self._index = open(self._index_path, "ab")  # noqa: SIM115
        self._size = data_size
        self._index_size = index_size
        self._reader_fd = os.open(self._data_path, os.O_RDONLY)

    def _load(self) -> tuple[int, int]:
        """Index the complete segments; cut off a torn tail. Returns (data size, index size) kept."""
        for path in (self._data_path, self._index_path):
            if not path.exists():
                path.touch()
        raw = self._index_path.read_bytes()
        data_size = self._data_path.stat().st_size
        position = 0
        data_end = 0
        while position + _SEGMENT.size <= len(raw):
            fields: tuple[int, ...] = _SEGMENT.unpack_from(raw, position)
            kind, first, count, _plain_pos, _plain_len, _gz_pos, _gz_len, _crc, zstd_pos, zstd_len = fields
            end = position + _SEGMENT.size + count * _ENTRY_BYTES
            if kind == _ZSTD_FRAME_KIND:
                segment = first
                if (
                    segment >= len(self._seg_first)
                    or count != 0
                    or zstd_pos < data_end
                    or zstd_pos + zstd_len > data_size
                ):
                    break
                self._seg_zstd[segment] = zstd_pos
                self._seg_zstd_len[segment] = zstd_len
                data_end = zstd_pos + zstd_len
                position = end
                continue
            known = kind in (_SEGMENT_KIND, _COMPRESSED_SEGMENT_KIND)
            if not known or end > len(raw) or zstd_pos + zstd_len > data_size or first != len(self._tx):
                break
            records = array("q")
            records.frombytes(raw[position + _SEGMENT.size : end])
            self._remember_segment(fields, records)
            data_end = zstd_pos + zstd_len
            position = end
        if position != len(raw):
            with open(self._index_path, "r+b") as handle:
                handle.truncate(position)
        if data_end != data_size:
            with open(self._data_path, "r+b") as handle:
                handle.truncate(data_end)
        return data_end, position

    def close(self) -> None:
        with self._append_lock, self._lock:
            if not self._closed:
                self._closed = True
                self._data.close()
                self._index.close()
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
    def segments(self) -> int:
        return len(self._seg_first)

    @property
    def last_offset(self) -> LogOffset | None:
        with self._lock:
            if not self._tx:
                return None
            return LogOffset(self._tx[-1], self._op[-1])

    def append(self, entries: Sequence[tuple[LogOffset, bytes]], *, deflated: bytes | None = None) -> None:
        """Append ``entries`` (offsets increasing) as one segment, compressed here once (or pass ``deflated``,
        :func:`~pgferry.sync.wire.compress_segment` of the comma-joined bodies, computed elsewhere); call
        :meth:`sync` to make them durable."""
        if not entries:
            return
        bodies = [body for _offset, body in entries]
        tx = array("q", (offset.tx for offset, _body in entries))
        op = array("q", (offset.op for offset, _body in entries))
        self._append_segment(b",".join(bodies), array("q", map(len, bodies)), tx, op, deflated)

    def append_joined(
        self,
        tx: int,
        first_op: int,
        plain: bytes,
        lengths: array[int],
        *,
        deflated: bytes | None = None,
        zstd: bytes | None = None,
        store_plain: bool = True,
    ) -> None:
        """Append a snapshot slice as one segment at offsets ``tx_first_op``, ``tx_first_op+1``, …: messages already
        joined by commas, given with their lengths (what
        :meth:`pgferry.sync.copytext.MessageTemplate.convert_joined` makes), so no Python object per row at all.
        ``deflated`` and ``zstd``: :func:`~pgferry.sync.wire.compress_segment` and
        :func:`~pgferry.sync.wire.compress_zstd` of ``plain``, when they were computed elsewhere. ``store_plain``
        false stores the segment compressed only (see the module's docstring)."""
        count = len(lengths)
        if count:
            offsets = array("q", range(first_op, first_op + count))
            self._append_segment(
                plain, lengths, array("q", (tx,)) * count, offsets, deflated, zstd, store_plain=store_plain
            )

    def _append_segment(
        self,
        plain: bytes,
        lengths: array[int],
        tx: array[int],
        op: array[int],
        deflated: bytes | None = None,
        zstd: bytes | None = None,
        *,
        store_plain: bool = True,
    ) -> None:
        gz = deflated if deflated is not None else compress_segment(plain)
        if zstd is None:
            zstd = compress_zstd(plain)
        crc = segment_crc32(plain)
        with self._append_lock:  # the zstd frame filler appends too
            first = len(self._tx)
            if store_plain:
                kind, plain_pos, gz_pos = _SEGMENT_KIND, self._size, self._size + len(plain)
            else:
                kind, plain_pos, gz_pos = _COMPRESSED_SEGMENT_KIND, -1, self._size
            zstd_pos = gz_pos + len(gz)
            count = len(lengths)
            # Each body starts one comma after the end of the one before it (in the file, or in the inflated segment).
            positions = array("q", accumulate(map(add, lengths, repeat(1, count - 1)), initial=max(plain_pos, 0)))
            records = array("q", bytes(_ENTRY_BYTES * count))
            records[0::_ENTRY_FIELDS] = tx
            records[1::_ENTRY_FIELDS] = op
            records[2::_ENTRY_FIELDS] = positions
            records[3::_ENTRY_FIELDS] = lengths
            fields = (kind, first, count, plain_pos, len(plain), gz_pos, len(gz), crc, zstd_pos, len(zstd))
            if store_plain:
                self._data.write(plain)
            self._data.write(gz)
            self._data.write(zstd)
            self._data.flush()
            self._index.write(_SEGMENT.pack(*fields) + records.tobytes())
            self._index.flush()
            with self._lock:
                self._remember_segment(fields, records)
                self._size = zstd_pos + len(zstd)

    def _remember_segment(self, fields: tuple[int, ...], records: array[int]) -> None:
        """Index a segment in memory from its header's fields and its entries' records, as ``index`` holds them
        (at load, and after an append)."""
        _kind, first, _count, plain_pos, plain_len, gz_pos, gz_len, crc, zstd_pos, zstd_len = fields
        self._tx.extend(records[0::_ENTRY_FIELDS])
        self._op.extend(records[1::_ENTRY_FIELDS])
        self._pos.extend(records[2::_ENTRY_FIELDS])
        self._len.extend(records[3::_ENTRY_FIELDS])
        self._seg_first.append(first)
        self._seg_plain.append(plain_pos)
        self._seg_plain_len.append(plain_len)
        self._seg_gz.append(gz_pos)
        self._seg_gz_len.append(gz_len)
        self._seg_crc.append(crc)
        self._seg_zstd.append(zstd_pos)
        self._seg_zstd_len.append(zstd_len)

    def sync(self) -> None:
        os.fdatasync(self._data.fileno())
        os.fdatasync(self._index.fileno())

    def segments_without_zstd(self) -> list[int]:
        """Segments whose zstd frame is still to be made (none when zstandard is not installed)."""
        if "zstd" not in AVAILABLE_ENCODINGS:
            return []
        with self._lock:
            return [seg for seg, length in enumerate(self._seg_zstd_len) if length == 0]

    def make_zstd_frame(self, segment: int) -> bool:
        """Make segment ``segment``'s zstd frame from its stored bytes and append it with a frame record.
        Not made durable here: a frame lost in a crash is made again. False when the log was closed meanwhile."""
        with self._lock:
            if self._closed:
                return False
            stored = self._read_stored(segment)
        frame = compress_zstd(stored.plain(self.directory))
        with self._append_lock:
            if self._closed:
                return False
            position = self._size
            self._data.write(frame)
            self._data.flush()
            self._index.write(_SEGMENT.pack(_ZSTD_FRAME_KIND, segment, 0, 0, 0, 0, 0, 0, position, len(frame)))
            self._index.flush()
            with self._lock:
                self._seg_zstd[segment] = position
                self._seg_zstd_len[segment] = len(frame)
                self._size = position + len(frame)
        return True

    def _start(self, offset: LogOffset) -> int:
        count = len(self._tx)
        return bisect.bisect_right(range(count), (offset.tx, offset.op), key=lambda i: (self._tx[i], self._op[i]))

    def read_after(self, offset: LogOffset, *, max_bytes: int = 4 << 20) -> LogChunk:
        """Entries strictly after ``offset``, up to about ``max_bytes`` (at least one entry).

        A chunk never ends on op 0 of a replicated transaction that has more ops, so every offset handed out as
        ``<lsn>_0`` (lsn > 0) means "all of transaction lsn", which is how an SSE client resumes (see
        :func:`normalise_offset`)."""
        with self._lock:
            count = len(self._tx)
            start = self._start(offset)
            end = start
            total = 0
            while end < count and (end == start or total + self._len[end] <= max_bytes):
                total += self._len[end] + 1
                end += 1
            if end < count and self._tx[end - 1] > 0 and self._op[end - 1] == 0 and self._tx[end] == self._tx[end - 1]:
                end += 1  # never end a chunk on op 0 of a transaction with more: see normalise_offset
            if start == end:
                return LogChunk([], None, True)
            last = LogOffset(self._tx[end - 1], self._op[end - 1])
            at_end = end == count
            first_seg = bisect.bisect_right(self._seg_first, start) - 1
            last_seg = bisect.bisect_right(self._seg_first, end - 1) - 1
            if all(self._seg_plain[seg] >= 0 for seg in range(first_seg, last_seg + 1)):
                first_pos = self._pos[start]
                last_pos = self._pos[end - 1] + self._len[end - 1]
                positions = [(self._pos[i] - first_pos, self._len[i]) for i in range(start, end)]
                blob = os.pread(self._reader_fd, last_pos - first_pos, first_pos)
                return LogChunk([blob[p : p + n] for p, n in positions], last, at_end)
            # A run with deflated-only segments: each segment whole, its entries sliced from its plain bytes.
            pieces = []
            for seg in range(first_seg, last_seg + 1):
                seg_end = self._seg_first[seg + 1] if seg + 1 < len(self._seg_first) else count
                lo, hi = max(start, self._seg_first[seg]), min(end, seg_end)
                pieces.append(([(self._pos[i], self._len[i]) for i in range(lo, hi)], self._read_stored(seg)))
        messages: list[bytes] = []
        for positions, stored in pieces:  # inflated outside the lock
            blob, base = stored.plain(self.directory), max(stored.plain_pos, 0)
            messages.extend(blob[p - base : p - base + n] for p, n in positions)
        return LogChunk(messages, last, at_end)

    def _read_stored(self, seg: int) -> _StoredSegment:
        """Segment ``seg``'s plain bytes as stored, or its deflate piece when it is deflated-only. Read under the
        lock (the caller holds it): a shape deleted meanwhile closes the descriptor, and a later read could hit
        another file reusing its number."""
        if self._seg_plain[seg] >= 0:
            body = os.pread(self._reader_fd, self._seg_plain_len[seg], self._seg_plain[seg])
        else:
            body = os.pread(self._reader_fd, self._seg_gz_len[seg], self._seg_gz[seg])
        return _StoredSegment(body, self._seg_plain[seg], self._seg_crc[seg])

    def read_segments(
        self, offset: LogOffset, *, max_bytes: int, encoding: str, plain_below: int = 0, fallback: str = "identity"
    ) -> SegmentRun | None:
        """Whole segments strictly after ``offset`` up to about ``max_bytes`` of plain JSON (at least one), in
        their stored form; ``None`` when ``offset`` is not a segment boundary (the caller reads entries with
        :meth:`read_after` instead) or nothing follows it. Segments hold whole transactions, so a run never ends
        inside one (see :func:`normalise_offset`). ``encoding`` (``identity``, ``gzip`` or ``zstd``) picks the
        stored form; a compressed run smaller than ``plain_below`` bytes is read plain as well (too small to be
        worth sending compressed). A zstd run whose frames are not all made yet is read as ``fallback`` (``gzip``
        or ``identity``) instead: see :attr:`SegmentRun.encoding`."""
        with self._lock:
            start = self._start(offset)
            if start == len(self._tx):
                return None
            first = bisect.bisect_left(self._seg_first, start)
            if first == len(self._seg_first) or self._seg_first[first] != start:
                return None
            last = first
            total = self._seg_plain_len[first]
            while last + 1 < len(self._seg_first) and total + 1 + self._seg_plain_len[last + 1] <= max_bytes:
                last += 1
                total += 1 + self._seg_plain_len[last]
            deflated: list[GzipPiece] = []
            zstd: list[bytes] = []
            if encoding == "zstd" and not all(self._seg_zstd_len[seg] for seg in range(first, last + 1)):
                encoding = fallback
            for seg in range(first, last + 1):
                if encoding == "gzip":
                    body = os.pread(self._reader_fd, self._seg_gz_len[seg], self._seg_gz[seg])
                    deflated.append(GzipPiece(body, self._seg_crc[seg], self._seg_plain_len[seg]))
                elif encoding == "zstd":
                    zstd.append(os.pread(self._reader_fd, self._seg_zstd_len[seg], self._seg_zstd[seg]))
            stored = (
                [self._read_stored(seg) for seg in range(first, last + 1)]
                if encoding == "identity" or total < plain_below
                else []
            )
            end_entry = self._seg_first[last + 1] - 1 if last + 1 < len(self._seg_first) else len(self._tx) - 1
            at_end = last + 1 == len(self._seg_first)
            last_offset = LogOffset(self._tx[end_entry], self._op[end_entry])
        plain = [segment.plain(self.directory) for segment in stored]  # inflated outside the lock
        return SegmentRun(plain, deflated, zstd, total, last_offset, at_end, encoding)


class ZstdFrameFiller:
    """Makes the zstd frames of logs stored without them (snapshots), one log after another, on one thread of
    lowered priority (nice 10 on Linux): the CPU goes to PostgreSQL, the replication feed and the clients first.
    A zstd client that arrives before its frames exist is served gzip meanwhile, so nothing waits for this."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[ShapeLog | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, log: ShapeLog) -> None:
        """Queue ``log`` if some of its segments lack a zstd frame."""
        if self._stop.is_set() or not log.segments_without_zstd():
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pgferry-zstd-frames", daemon=True)
                self._thread.start()
        self._queue.put(log)

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # per thread on Linux: a thread id is a process id there
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while not self._stop.is_set():
            log = self._queue.get()
            if log is None:
                return
            try:
                for segment in log.segments_without_zstd():
                    if self._stop.is_set() or not log.make_zstd_frame(segment):
                        break
            except Exception:  # a damaged or deleted log: its zstd clients keep getting gzip
                _log.warning("sync.zstd_frames_failed", directory=str(log.directory), exc_info=True)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)


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
