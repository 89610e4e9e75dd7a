"""Shapes: a table + where + columns, materialised as a log that starts with a snapshot and follows replication.

The alignment rule is Electric's: a shape's snapshot runs in a REPEATABLE READ transaction whose snapshot
(``pg_current_snapshot()``: xmin, xmax, in-progress xids) is stored with the shape; a replicated transaction is
applied to the shape exactly when it is *not* visible in that snapshot. The shape is registered (and starts
buffering transactions) *before* its snapshot is taken, so a transaction either committed before registration
(visible, already in the snapshot) or arrives in the buffer; nothing falls between the two.

Where clauses are evaluated by PostgreSQL, never by Python: a changed row's values (text, as replication delivers
them) are cast back to the column types and the shape's parsed and re-rendered where clause is run over them.
That keeps PostgreSQL's semantics (collations, numeric, time zones, operators on vectors and arrays) exact at the
price of one round trip per transaction and shape.

Owns: the shape registry, snapshots, converting replicated rows into Electric messages, durable logs on disk.
Must not know about HTTP (the server module) or how transactions arrive (the feed module).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import shutil
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
import structlog
from psycopg import sql

from pgferry.replication import RowChange, Transaction, TruncateChange
from pgferry.sync.catalog import TableInfo, load_table_info
from pgferry.sync.copyout import copy_functions, stream_copy_messages
from pgferry.sync.copytext import MessageTemplate, accelerated
from pgferry.sync.errors import (
    ProtocolError,
    ShapeUnavailableError,
    WhereClauseError,
    describe_error,
    is_connection_error,
)
from pgferry.sync.evaluate import WhereEvaluator, guarded_where
from pgferry.sync.protocol import (
    LogOffset,
    ShapeDefinition,
    change_message,
    encode_message,
    row_key,
)
from pgferry.sync.session import SESSION_SETTINGS, connect_sql, session_options
from pgferry.sync.store import LegacyLogError, ShapeLog, ZstdFrameFiller, write_json_atomic
from pgferry.sync.where import WhereClause, check_params, parse_where
from pgferry.sync.wire import compress_segment

__all__ = [
    "SESSION_SETTINGS",
    "Shape",
    "ShapeManager",
    "SnapshotInfo",
    "WhereEvaluator",
    "connect_sql",
    "session_options",
    "snapshot_failure",
]

_log = structlog.get_logger("pgferry.sync.shapes")

# The table's columns in meta.json, under a name older pgferry versions do not read: they drop a shape whose
# "columns" differ from the table's (missing counts), which is what they must do with a log holding deflated-only
# segments (pgferry.sync.store) they cannot read: otherwise they would cut the log at the first such segment and
# serve the shape short. Metas written before the rename (with "columns") still load.
_META_COLUMNS = "table_columns"

_VALIDATE_TIMEOUT_MS = 5_000  # type-checking a where clause plans it; constant folding must not run away
DEFAULT_SNAPSHOT_TIMEOUT_MS = 15_000  # longest wait for the next row of a snapshot
#: Plain JSON per stored snapshot segment: small enough that the first page is served while PostgreSQL still
#: produces the rest, large enough that framing and compression stay efficient (a page holds several).
SNAPSHOT_SEGMENT_BYTES = 1 << 20
#: Plain bytes of a snapshot appended between two background flushes of its log (see ``_copy_snapshot``).
_SNAPSHOT_SYNC_BYTES = 16 << 20

RowValues = Mapping[str, str | None]


def render_where(
    clause: WhereClause, definition: ShapeDefinition, column: Callable[[str], sql.Composable], params: list[Any]
) -> sql.Composable:
    """``clause`` as guarded SQL with placeholders (:func:`~pgferry.sync.evaluate.guarded_where`); the values of
    its ``$n`` are appended to ``params`` in order."""
    values = dict(definition.params)

    def param(number: int) -> sql.Composable:
        params.append(values[number])
        return sql.Placeholder()

    return guarded_where(clause, column, param)


def snapshot_failure(error: BaseException, *, timeout_ms: int) -> ProtocolError | BaseException:
    """What a client is told when its shape's snapshot failed: a 400 naming the condition (never the failing
    row's value: the message may reach whoever asks for that shape), 503 for a lost connection."""
    if isinstance(error, psycopg.errors.QueryCanceled):
        return WhereClauseError(
            f"the shape's query ran longer than {timeout_ms / 1000:g} s for one page (the per-shape statement "
            "timeout); narrow the where clause or add an index"
        )
    if isinstance(error, psycopg.Error):
        if is_connection_error(error):
            return ShapeUnavailableError("table", "the database connection was lost; retry", retry_after=2)
        return WhereClauseError(f"the shape's query failed: {describe_error(error)}")
    return error


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """``pg_current_snapshot()`` of a shape's snapshot transaction, with 64-bit xids."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> SnapshotInfo:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def visible(self, xid32: int) -> bool:
        """Whether a transaction with this 32-bit xid (as pgoutput sends it) is visible in the snapshot."""
        epoch = self.xmax >> 32
        xid = (epoch << 32) | xid32
        if xid > self.xmax + (1 << 31):  # the 32-bit xid wrapped: it belongs to the previous epoch
            xid -= 1 << 32
        if xid < self.xmin:
            return True
        return xid < self.xmax and xid not in self.xip

    def to_json(self) -> list[Any]:
        return [self.xmin, self.xmax, sorted(self.xip)]


@dataclass
class Shape:
    """A shape and its log. ``state`` moves snapshotting → ready → gone (gone: clients must refetch)."""

    handle: str
    definition: ShapeDefinition
    table: TableInfo
    clause: WhereClause | None
    log: ShapeLog
    state: Literal["snapshotting", "ready", "gone"] = "snapshotting"
    snapshot: SnapshotInfo | None = None
    buffered: list[Transaction] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    last_commit_ts: float | None = None
    first_rows: threading.Event = field(default_factory=threading.Event)  # set once the snapshot has started
    snapshot_error: BaseException | None = None
    live_page: tuple[Any, Any] | None = None  # the server's last live page of this shape, shared by its waiters
    _event: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def gone(self) -> bool:
        """Invalidated (truncate, column change, deletion, failed snapshot): clients must refetch."""
        return self.state == "gone"

    @property
    def snapshotting(self) -> bool:
        return self.state == "snapshotting"

    @property
    def selected(self) -> tuple[str, ...]:
        return self.definition.columns if self.definition.columns is not None else self.table.column_names

    def schema_header(self) -> str:
        selected = set(self.selected)
        return json.dumps(
            {c.name: c.schema_entry() for c in self.table.columns if c.name in selected}, separators=(",", ":")
        )

    def render_where(self, column: Callable[[str], sql.Composable], params: list[Any]) -> sql.Composable:
        assert self.clause is not None
        return render_where(self.clause, self.definition, column, params)

    @property
    def params(self) -> Mapping[int, str]:
        return dict(self.definition.params)

    def column_type(self, name: str) -> str:
        return self.table.column(name).sql_type

    # -- waking long-polls (called from any thread) ------------------------------------------------------------

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop = loop
            self._event = asyncio.Event()

    def changed_event(self) -> asyncio.Event:
        """The event the next change sets; take it *before* reading the log so no wake-up is lost."""
        assert self._event is not None, "bind_loop first"
        return self._event

    def notify(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        if event is not None:
            event.set()


def _close_when_done(reader: threading.Thread, conn: psycopg.Connection[Any]) -> None:
    reader.join()
    with contextlib.suppress(Exception):
        conn.close()


class ShapeManager:
    """Registry of shapes, on disk under ``data_dir/shapes/<handle>/``.

    Creating a shape is split so that the HTTP layer can run the database work on a bounded pool of its own
    (:mod:`pgferry.sync.creation`): :meth:`validate` (everything that makes a request a 400), :meth:`register`
    (the shape starts buffering replicated transactions) and :meth:`take_snapshot` (the long part).
    """

    def __init__(
        self,
        url: str,
        data_dir: Path,
        *,
        snapshot_timeout_ms: int = DEFAULT_SNAPSHOT_TIMEOUT_MS,
        segment_bytes: int = SNAPSHOT_SEGMENT_BYTES,
    ) -> None:
        self._url = url
        self.segment_bytes = segment_bytes
        self._dir = data_dir / "shapes"
        self._dir.mkdir(parents=True, exist_ok=True)
        self.snapshot_timeout_ms = snapshot_timeout_ms
        #: Read snapshots with the C COPY reader where it is available (:mod:`pgferry.sync.copyout`); the tests
        #: turn it off to run the psycopg path too.
        self.read_copy_in_c = True
        #: Connections of snapshots whose reader thread outlived the wait for it, by id: closed after it ends.
        self._close_after: dict[int, threading.Thread] = {}
        self._lock = threading.RLock()
        self._by_handle: dict[str, Shape] = {}
        self._by_definition: dict[ShapeDefinition, Shape] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = threading.Event()  # set at shutdown: running snapshots stop at their next page
        self._zstd_frames = ZstdFrameFiller()
        #: ``global_last_seen_lsn``: every transaction whose commit record starts at or before it has been applied
        #: to every shape (see :meth:`advance_processed`).
        self.processed_lsn = 0
        self.transactions_applied = 0
        self.shapes_invalidated = 0
        self.last_commit_latency: float | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loop = loop
            for shape in self._by_handle.values():
                shape.bind_loop(loop)

    def load(self, served: Callable[[ShapeDefinition], bool] = lambda _definition: True) -> int:
        """Load the shapes a previous run completed; drop half-made ones and those on tables no longer
        ``served``. Returns how many were loaded."""
        conn = connect_sql(self._url)
        try:
            for directory in sorted(self._dir.iterdir()):
                meta_path = directory / "meta.json"
                if not meta_path.exists():
                    shutil.rmtree(directory, ignore_errors=True)
                    continue
                meta = json.loads(meta_path.read_text())
                definition = ShapeDefinition.from_json(meta["definition"])
                if not served(definition):
                    shutil.rmtree(directory, ignore_errors=True)  # the table is no longer served
                    continue
                try:
                    table = load_table_info(conn, definition.table)
                except ProtocolError:
                    shutil.rmtree(directory, ignore_errors=True)  # the table is gone: so is the shape
                    continue
                if list(table.column_names) != meta.get(_META_COLUMNS, meta.get("columns")):
                    shutil.rmtree(directory, ignore_errors=True)  # altered while we were down
                    continue
                clause = parse_where(definition.where) if definition.where else None
                xmin, xmax, xip = meta["snapshot"]
                try:
                    log = ShapeLog(directory)
                except LegacyLogError:
                    shutil.rmtree(directory, ignore_errors=True)  # an older pgferry's log: its clients refetch
                    continue
                shape = Shape(
                    handle=meta["handle"],
                    definition=definition,
                    table=table,
                    clause=clause,
                    log=log,
                    state="ready",
                    snapshot=SnapshotInfo(xmin, xmax, frozenset(xip)),
                    created_at=float(meta["created_at"]),
                )
                self._register(shape)
                self._zstd_frames.submit(log)  # frames a crash lost, or a snapshot's not made before a stop
        finally:
            conn.close()
        return len(self._by_handle)

    def clear(self) -> None:
        """Forget every shape (the slot was lost, so the logs can no longer be continued)."""
        with self._lock:
            for shape in list(self._by_handle.values()):
                self._drop(shape)
            for directory in self._dir.iterdir():
                shutil.rmtree(directory, ignore_errors=True)

    def close(self) -> None:
        self._closing.set()
        self._zstd_frames.close()
        with self._lock:
            for shape in self._by_handle.values():
                shape.log.close()

    # -- lookup ---------------------------------------------------------------------------------------------

    def get(self, handle: str) -> Shape | None:
        """A live shape by handle (its snapshot may still be running: its first pages can be served already)."""
        with self._lock:
            shape = self._by_handle.get(handle)
            return shape if shape is not None and shape.state != "gone" else None

    def current(self, definition: ShapeDefinition) -> Shape | None:
        with self._lock:
            shape = self._by_definition.get(definition)
            return shape if shape is not None and shape.state != "gone" else None

    def shapes(self) -> list[Shape]:
        with self._lock:
            return [s for s in self._by_handle.values() if s.state == "ready"]

    def count(self) -> int:
        """Live shapes, those whose snapshot is still running included."""
        with self._lock:
            return sum(1 for s in self._by_handle.values() if s.state != "gone")

    def delete(self, handle: str) -> bool:
        with self._lock:
            shape = self._by_handle.get(handle)
            if shape is None:
                return False
            self._drop(shape)
            return True

    # -- creating shapes ------------------------------------------------------------------------------------

    def validate(self, definition: ShapeDefinition) -> tuple[TableInfo, WhereClause | None]:
        """Everything that makes a request a 400, checked before anything is created."""
        with connect_sql(self._url, statement_timeout_ms=_VALIDATE_TIMEOUT_MS) as conn:
            table = load_table_info(conn, definition.table)
            if definition.columns is not None:
                unknown = [c for c in definition.columns if c not in table.column_names]
                if unknown:
                    raise ProtocolError("columns", f"unknown column {unknown[0]!r} in table {str(table.name)!r}")
                missing = [c for c in table.primary_key if c not in definition.columns]
                if missing:
                    raise ProtocolError(
                        "columns", f"must include all primary key columns, missing: {', '.join(missing)}"
                    )
            clause = None
            if definition.where is not None:
                clause = parse_where(definition.where)
                unknown = sorted(clause.columns - set(table.column_names))
                if unknown:
                    raise WhereClauseError(f"unknown reference {unknown[0]!r} (not a column of {table.name})")
                check_params(clause, dict(definition.params))
                self._typecheck(conn, definition, table, clause)
            elif definition.params:
                raise ProtocolError("params", "params were given but there is no where clause using them")
        return table, clause

    def _typecheck(
        self, conn: psycopg.Connection[Any], definition: ShapeDefinition, table: TableInfo, clause: WhereClause
    ) -> None:
        """Let PostgreSQL type-check the rendered clause (planning only) so a bad shape fails now, with a 400."""
        params: list[Any] = []
        where = render_where(clause, definition, lambda name: sql.SQL("t.") + sql.Identifier(name), params)
        query = sql.SQL("explain select 1 from {} as t where {}").format(
            sql.Identifier(table.name.schema, table.name.name), where
        )
        try:
            conn.execute(query, params)
        except psycopg.errors.QueryCanceled as exc:
            raise WhereClauseError(
                f"planning the where clause took longer than {_VALIDATE_TIMEOUT_MS / 1000:g} s (cost budget)"
            ) from exc
        except psycopg.errors.Error as exc:
            if is_connection_error(exc):
                raise
            # Planning sees no rows, so the message can only quote the client's own constants.
            message = (exc.diag.message_primary or str(exc)).strip()
            raise WhereClauseError(f"invalid where clause: {message}") from exc

    def register(self, definition: ShapeDefinition, table: TableInfo, clause: WhereClause | None) -> tuple[Shape, bool]:
        """A new shape for ``definition`` (it buffers replicated transactions from now on) and True; the existing
        one and False if another request registered it first. The caller runs :meth:`take_snapshot` on a new one."""
        with self._lock:
            existing = self._by_definition.get(definition)
            if existing is not None and existing.state != "gone":
                return existing, False
            handle = f"{definition.fingerprint()}-{time.time_ns() // 1000}"
            shape = Shape(handle, definition, table, clause, ShapeLog(self._dir / handle))
            self._register(shape)
            return shape, True

    def take_snapshot(self, shape: Shape) -> None:
        """Run the shape's snapshot; on failure the shape is dropped and the error kept in ``snapshot_error``
        (waiting clients turn it into a 400 or a refetch). Never raises."""
        try:
            self._take_snapshot(shape)
        except BaseException as exc:  # the shape cannot be completed: drop it, waiting clients refetch
            shape.snapshot_error = exc
            _log.warning(
                "sync.snapshot_failed", handle=shape.handle, table=str(shape.table.name), error=describe_error(exc)
            )
            with self._lock:
                self._drop(shape)
        finally:
            shape.first_rows.set()
            shape.notify()

    def _snapshot_query(self, shape: Shape, params: list[Any]) -> tuple[sql.Composed, MessageTemplate]:
        """The snapshot as plain ``COPY`` text (the row's key, then each selected column as text) and the template
        that turns its lines into Electric messages (:mod:`pgferry.sync.copytext`): PostgreSQL prints values,
        the server builds the JSON on its own core, in bulk."""
        table = shape.table
        ident = sql.Identifier(table.name.schema, table.name.name)
        # As text, as the live path sends values; a column whose text is its output function's goes as it is
        # (COPY prints it the same, without evaluating a cast per value).
        as_is = {c.name for c in table.columns if c.text_is_output}
        values = sql.SQL(", ").join(
            sql.SQL("t.{}" if c in as_is else "t.{}::text").format(sql.Identifier(c)) for c in shape.selected
        )
        # The C converter builds the key from the primary key's values; the Python one reads it from PostgreSQL.
        key_built = accelerated()
        if key_built:
            query = sql.SQL("select {} from {} as t").format(values, ident)
        else:
            # The key as row_key() writes it: "schema"."table"/"pk1"/"pk2", a slash in a value doubled.
            key_parts = sql.SQL(" || '/' || ").join(
                sql.SQL("""coalesce('"' || replace(t.{}::text, '/', '//') || '"', '"_"')""").format(sql.Identifier(c))
                for c in table.primary_key
            )
            key = sql.SQL("{} || {}").format(sql.Literal(table.name.qualified + "/"), key_parts)
            query = sql.SQL("select {}, {} from {} as t").format(key, values, ident)
        if shape.clause is not None:
            where = shape.render_where(lambda name: sql.SQL("t.") + sql.Identifier(name), params)
            query = query + sql.SQL(" where {}").format(where)
        selected = list(shape.selected)
        template = MessageTemplate(
            selected,
            table.name.qualified + "/",
            [selected.index(c) for c in table.primary_key],
            {"operation": "insert", "relation": [table.name.schema, table.name.name]},
            key_built=key_built,
        )
        return query, template

    def _take_snapshot(self, shape: Shape) -> None:
        conn = connect_sql(self._url, statement_timeout_ms=self.snapshot_timeout_ms)
        evaluator = WhereEvaluator(self._url)
        try:
            conn.autocommit = False
            conn.execute("begin isolation level repeatable read read only")
            row = conn.execute("select pg_current_snapshot()::text").fetchone()
            assert row is not None
            snapshot = SnapshotInfo.parse(str(row[0]))
            # COPY runs as one statement: the per-page timeout becomes "no row for snapshot_timeout_ms" (watched
            # in _copy_snapshot), and the statement itself may run as long as rows keep coming.
            conn.execute("set local statement_timeout = 0")
            conn.execute("set local client_encoding = 'UTF8'")  # the messages are UTF-8 JSON, built from these bytes
            params: list[Any] = []
            query, template = self._snapshot_query(shape, params)
            started = time.monotonic()
            count = self._copy_snapshot(conn, shape, query, params, template)
            conn.rollback()
            shape.log.sync()
            with self._lock:
                if shape.gone:  # deleted or invalidated while its snapshot ran
                    return
                shape.snapshot = snapshot
                for txn in shape.buffered:
                    self._apply_to_shapes([shape], txn, evaluator)
                    if shape.gone:
                        return
                shape.buffered.clear()
                shape.log.sync()
                write_json_atomic(
                    shape.log.directory / "meta.json",
                    {
                        "handle": shape.handle,
                        "definition": shape.definition.to_json(),
                        _META_COLUMNS: list(shape.table.column_names),
                        "snapshot": snapshot.to_json(),
                        "created_at": shape.created_at,
                    },
                )
                shape.state = "ready"
            shape.notify()
            self._zstd_frames.submit(shape.log)
            _log.info(
                "sync.shape_created",
                handle=shape.handle,
                table=str(shape.table.name),
                rows=count,
                seconds=round(time.monotonic() - started, 3),
            )
        finally:
            evaluator.close()
            stuck = self._close_after.pop(id(conn), None)
            if stuck is None:
                conn.close()
            else:
                threading.Thread(
                    target=_close_when_done, args=(stuck, conn), name="pgferry-snapshot-close", daemon=True
                ).start()

    def _copy_snapshot(
        self,
        conn: psycopg.Connection[Any],
        shape: Shape,
        query: sql.Composed,
        params: list[Any],
        template: MessageTemplate,
    ) -> int:
        """Stream the snapshot's rows out of PostgreSQL with one ``COPY (…) TO STDOUT`` and append them to the
        log as messages in segments of about ``segment_bytes``, compressed as they are written, so that clients
        are served the first pages while later rows are still being produced. A reader thread pulls the COPY
        stream (psycopg waits on the socket without the GIL) and turns each block of it into messages
        (:class:`~pgferry.sync.copytext.MessageTemplate`), handing them through a small bounded queue to this
        thread, which compresses and writes segments (compression runs without the GIL): at most a few segments
        are in memory at once. Returns the number of rows."""
        batches: queue.Queue[tuple[bytes, array[int]] | BaseException | None] = queue.Queue(maxsize=4)
        stop = threading.Event()
        progress = [time.monotonic()]
        # COPY text is about two thirds of the JSON made from it: cut blocks so segments hold ~segment_bytes.
        block_bytes = max(1, self.segment_bytes * 2 // 3)

        def put(item: tuple[bytes, array[int]] | BaseException | None) -> None:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    batches.put(item, timeout=0.1)
                    return

        def convert(rows: list[bytes]) -> tuple[bytes, array[int]]:
            block = b"".join(rows)
            if not block.endswith(b"\n"):  # PostgreSQL sends one whole row per COPY message
                raise ShapeUnavailableError("table", "the snapshot stream ended inside a row; retry", retry_after=2)
            return template.convert_joined(block)

        def rows_arrived() -> None:
            progress[0] = time.monotonic()

        def produce() -> None:
            """Read and convert: in C where it is built (:mod:`pgferry.sync.copyout`: libpq read and converted
            without the GIL, one Python call per block); else through psycopg, the GIL-bound work in this one
            thread so it never waits for the GIL between rows. The consumer compresses and writes meanwhile."""
            statement = sql.SQL("copy ({}) to stdout").format(query)
            try:
                if self.read_copy_in_c and copy_functions() is not None:
                    text = psycopg.ClientCursor(conn).mogrify(statement, params or None)
                    for item in stream_copy_messages(conn, text.encode(), template, self.segment_bytes, rows_arrived):
                        put(item)
                    put(None)
                    return
                with conn.cursor() as cursor, cursor.copy(statement, params) as copy:
                    batch: list[bytes] = []
                    size = 0
                    for data in copy:
                        progress[0] = time.monotonic()
                        batch.append(bytes(data))
                        size += len(data)
                        if size >= block_bytes:
                            put(convert(batch))
                            batch, size = [], 0
                    if batch:
                        put(convert(batch))
                put(None)
            except BaseException as exc:  # handed to the consumer, which raises it
                put(exc)

        reader = threading.Thread(target=produce, name=f"pgferry-snapshot-{shape.handle[-8:]}", daemon=True)
        reader.start()
        timeout = self.snapshot_timeout_ms / 1000
        count = 0
        cancelled = False
        # The log is flushed to disk while the snapshot is still being written, by a thread of its own, whenever
        # another _SNAPSHOT_SYNC_BYTES were appended and no flush is running: the one fdatasync before the shape
        # is ready (in _take_snapshot) then has only the tail left, instead of the whole snapshot at once.
        flusher: threading.Thread | None = None
        unsynced = 0
        # Segments are stored deflated only: their plain bytes are not written, and their zstd frames are made
        # after the snapshot by the ZstdFrameFiller (see pgferry.sync.store), off the first client's path.
        try:
            while True:
                try:
                    item = batches.get(timeout=0.1)
                except queue.Empty:
                    stalled = time.monotonic() - progress[0] > timeout
                    if not cancelled and (stalled or self._closing.is_set()):
                        cancelled = True
                        conn.cancel()  # the reader gets QueryCanceled: a 400 naming the timeout
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    if self._closing.is_set():
                        raise ShapeUnavailableError("table", "the sync server is shutting down; retry", retry_after=2)
                    raise item
                plain, lengths = item
                if lengths:
                    deflated = compress_segment(plain)
                    shape.log.append_joined(0, count, plain, lengths, deflated=deflated, zstd=b"", store_plain=False)
                    count += len(lengths)
                    unsynced += len(plain)
                    shape.first_rows.set()
                    shape.notify()
                if unsynced >= _SNAPSHOT_SYNC_BYTES and (flusher is None or not flusher.is_alive()):
                    flusher = threading.Thread(target=shape.log.sync, name="pgferry-snapshot-sync", daemon=True)
                    flusher.start()
                    unsynced = 0
        finally:
            stop.set()
            if reader.is_alive():
                with contextlib.suppress(Exception):
                    conn.cancel()
            reader.join(30)
            if flusher is not None:
                flusher.join()
            if reader.is_alive():
                # Still inside libpq (PostgreSQL unreachable even for the cancel): closing the connection now would
                # free what that thread is using. It is closed when the thread is done; _take_snapshot leaves it.
                _log.warning("sync.snapshot_reader_stuck", handle=shape.handle)
                self._close_after[id(conn)] = reader
        return count

    # -- applying replicated transactions --------------------------------------------------------------------

    def apply_transaction(self, txn: Transaction, evaluator: WhereEvaluator) -> None:
        self.apply_transactions([txn], evaluator)

    def apply_transactions(self, txns: Sequence[Transaction], evaluator: WhereEvaluator) -> None:
        """Append each transaction's effect to every shape it touches, then make them durable (one fsync per
        shape for the whole batch: a burst of commits costs one disk flush, not one each) and wake the clients.
        Only after this returns may the feed confirm the last of them to the slot."""
        touched: dict[str, Shape] = {}
        with self._lock:
            for txn in txns:
                by_table: dict[str, list[Shape]] = {}
                for shape in list(self._by_handle.values()):
                    if shape.state == "gone" or not _touches(shape, txn):
                        continue
                    if shape.snapshot is None:  # its snapshot is running: decide when it is known what it saw
                        shape.buffered.append(txn)
                        continue
                    by_table.setdefault(str(shape.table.name), []).append(shape)
                for shapes in by_table.values():
                    for shape in self._apply_to_shapes(shapes, txn, evaluator):
                        touched[shape.handle] = shape
                        shape.last_commit_ts = txn.commit_ts.timestamp()
            for shape in touched.values():
                if shape.state != "gone":
                    shape.log.sync()
            if txns:
                self._advance_processed(int(txns[-1].end_lsn))
            self.transactions_applied += len(txns)
        for shape in touched.values():
            shape.notify()

    def advance_processed(self, position: int) -> None:
        """Everything before WAL position ``position`` has been applied (the feed calls this with the position of a
        keepalive that came between transactions, once every transaction received before it was applied)."""
        with self._lock:
            self._advance_processed(position)

    def _advance_processed(self, position: int) -> None:
        """Move :attr:`processed_lsn` to just below ``position``, the end of WAL processed so far: the end of the last
        applied commit record, or a keepalive's position. Just below, not at it: a commit record may *start* exactly
        there, and ``global_last_seen_lsn`` reads as a commit position — the official client resumes SSE from
        ``<lsn>_0`` (all of that transaction) and pglite-sync takes changes at or below it for replays — so reporting
        the position itself would drop such a transaction. Reporting more than the last commit LSN (which is what
        Electric reports) is what lets a write outside every shape be settled on an idle server: its write API answer
        carries a commit position (:func:`pgferry.sync.writer._commit_position`) that only a later WAL position
        reaches."""
        self.processed_lsn = max(self.processed_lsn, position - 1)

    def _apply_to_shapes(self, shapes: list[Shape], txn: Transaction, evaluator: WhereEvaluator) -> list[Shape]:
        """Apply ``txn`` to shapes of one table; returns the shapes whose logs changed (or that went away)."""
        table = shapes[0].table
        touched: list[Shape] = []
        pending: list[Shape] = []
        for shape in shapes:
            assert shape.snapshot is not None
            if shape.snapshot.visible(txn.xid):
                continue  # the snapshot already has it
            last = shape.log.last_offset
            if last is not None and last.tx >= int(txn.commit_lsn):
                continue  # redelivered after a restart: already in this log
            pending.append(shape)
        if not pending:
            return touched
        changes: list[RowChange] = []
        for change in txn.changes:
            if isinstance(change, TruncateChange):
                if str(table.name) in change.tables:
                    for shape in pending:
                        self._gone(shape, "table truncated")
                    return pending
                continue
            if change.schema != table.name.schema or change.table != table.name.name:
                continue
            if [c.name for c in change.relation.columns] != list(table.column_names):
                for shape in pending:
                    self._gone(shape, "table columns changed")
                return pending
            changes.append(change)
        if not changes:
            return touched
        befores: list[RowValues | None] = []
        afters: list[RowValues | None] = []
        for change in changes:
            old = change.old
            new = dict(change.new) if change.new is not None else None
            if new is not None and change.unchanged_toast_columns and old is not None:
                for name in change.unchanged_toast_columns:
                    new[name] = old.get(name)
            befores.append(old if change.kind != "insert" else None)
            afters.append(new if change.kind != "delete" else None)
        rows = [r for r in (*befores, *afters) if r is not None]
        verdicts = evaluator.matches(pending, rows)
        for shape in pending:
            failure = verdicts.failed.get(shape.handle)
            if failure is not None:  # its clause fails on these rows: its problem, never the feed's
                self._gone(shape, f"its where clause failed on a change: {describe_error(failure)}")
                touched.append(shape)
                continue
            column = iter(verdicts.matches[shape.handle])
            before_in = [_verdict(row, shape, column) for row in befores]
            after_in = [_verdict(row, shape, column) for row in afters]
            messages = self._messages_for(shape, changes, befores, afters, before_in, after_in, txn)
            if not messages:
                continue
            base = int(txn.commit_lsn)
            entries = []
            for op, message in enumerate(messages):
                message["headers"]["lsn"] = str(base)
                message["headers"]["op_position"] = op
                if op == len(messages) - 1:
                    message["headers"]["last"] = True
                entries.append((LogOffset(base, op), encode_message(message)))
            shape.log.append(entries)
            touched.append(shape)
        return touched

    def _messages_for(
        self,
        shape: Shape,
        changes: list[RowChange],
        befores: list[RowValues | None],
        afters: list[RowValues | None],
        before_in: list[bool],
        after_in: list[bool],
        txn: Transaction,
    ) -> list[dict[str, Any]]:
        """Electric's rules: inserts/deletes as they are, updates as updates while the row stays in the shape and
        as insert/delete when it moves in/out; a key change is a delete of the old key plus an insert."""
        pk = shape.table.primary_key
        selected = shape.selected
        full = shape.definition.replica == "full"
        relation = shape.table.name
        out: list[dict[str, Any]] = []

        def emit(
            operation: Literal["insert", "update", "delete"],
            row: RowValues,
            value: dict[str, str | None],
            old_value: dict[str, str | None] | None = None,
        ) -> None:
            out.append(
                change_message(
                    key=row_key(relation, [row.get(c) for c in pk]),
                    operation=operation,
                    value=value,
                    relation=relation,
                    offset=LogOffset(int(txn.commit_lsn), len(out)),
                    txid=txn.xid,
                    old_value=old_value,
                )
            )

        for change, before, after, was_in, is_in in zip(changes, befores, afters, before_in, after_in, strict=True):
            if change.kind == "insert":
                if is_in and after is not None:
                    emit("insert", after, {c: after.get(c) for c in selected})
            elif change.kind == "delete":
                row = before if before is not None else change.key
                if was_in:
                    emit("delete", row, _delete_value(row, pk, selected, full))
            else:
                assert after is not None
                old_row: RowValues = before if before is not None else after
                key_changed = any(old_row.get(c) != after.get(c) for c in pk)
                if was_in and is_in and not key_changed:
                    if before is None:
                        changed = list(selected)
                    else:
                        changed = [c for c in selected if before.get(c) != after.get(c)]
                    if changed and full:
                        emit(
                            "update",
                            after,
                            {c: after.get(c) for c in selected},
                            {c: old_row.get(c) for c in changed if c not in pk} if before is not None else None,
                        )
                    elif changed:
                        value = {c: after.get(c) for c in pk}
                        value.update({c: after.get(c) for c in changed})
                        emit("update", after, value)
                    # else: nothing the shape selects changed, so there is nothing to send (Electric drops it too)
                else:
                    if was_in:
                        emit("delete", old_row, _delete_value(old_row, pk, selected, full))
                    if is_in:
                        emit("insert", after, {c: after.get(c) for c in selected})
        return out

    # -- registry internals -----------------------------------------------------------------------------------

    def _register(self, shape: Shape) -> None:
        self._by_handle[shape.handle] = shape
        self._by_definition[shape.definition] = shape
        if self._loop is not None:
            shape.bind_loop(self._loop)

    def _gone(self, shape: Shape, reason: str) -> None:
        """Invalidate: clients holding the handle get 409 must-refetch. ``reason`` must carry no row values."""
        _log.info("sync.shape_invalidated", handle=shape.handle, table=str(shape.table.name), reason=reason)
        self.shapes_invalidated += 1
        self._drop(shape)

    def _drop(self, shape: Shape) -> None:
        shape.state = "gone"
        self._by_handle.pop(shape.handle, None)
        if self._by_definition.get(shape.definition) is shape:
            del self._by_definition[shape.definition]
        shape.log.delete()
        shape.notify()


def _touches(shape: Shape, txn: Transaction) -> bool:
    name = shape.table.name
    for change in txn.changes:
        if isinstance(change, TruncateChange):
            if str(name) in change.tables:
                return True
        elif change.schema == name.schema and change.table == name.name:
            return True
    return False


def _complete(row: RowValues, shape: Shape) -> bool:
    """Whether ``row`` carries every column the where clause reads (an old row without REPLICA IDENTITY FULL
    carries only the key)."""
    return shape.clause is None or all(name in row for name in shape.clause.columns)


def _verdict(row: RowValues | None, shape: Shape, verdicts: Iterator[bool]) -> bool:
    """The next verdict for ``row`` (verdicts were computed for every non-None row, in order). A row that lacks a
    column the where clause reads (an old row from before REPLICA IDENTITY FULL) counts as in the shape: sending
    a delete for a key the client does not have is harmless, missing one is not."""
    if row is None:
        return False
    verdict = next(verdicts)
    return verdict if _complete(row, shape) else True


def _delete_value(row: RowValues, pk: Sequence[str], selected: Sequence[str], full: bool) -> dict[str, str | None]:
    if full:
        return {c: row.get(c) for c in selected if c in row}
    return {c: row.get(c) for c in pk}
