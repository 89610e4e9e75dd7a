"""The replication reader: one pgoutput stream in, whole committed transactions out, confirmed on request.

Contract with the consumer (online migration, the change feed, the dev sync server):

* **Whole transactions, in commit order.** Changes are buffered from Begin to Commit and handed over as
  one :class:`Transaction` only when its Commit arrives, so a consumer never sees half a transaction and
  can apply each one atomically. Transactions arrive in commit order with strictly increasing
  ``commit_lsn``.
* **Values as PostgreSQL text.** Row values are exactly what the column type's output function prints
  (``'t'``, ``'{"a": 1}'``, ``'[0.1,0.2]'``); NULL is ``None``. Each change carries the
  :class:`RelationInfo` it was decoded with, so type OIDs (and names of non-built-in types such as
  ``vector``) are at hand for conversion. A TOASTed value the statement did not touch is not sent by the
  server at all: it is missing from ``new`` and named in ``unchanged_toast_columns`` — it is *not* NULL.
* **The reader never confirms data the consumer has not confirmed.** :meth:`ReplicationReader.confirm`
  is the only way a transaction's position reaches the server; call it with the transaction (or its
  ``end_lsn``) once the transaction is durably stored. Until then PostgreSQL keeps the WAL and, after a
  reconnect or restart, sends the transaction again.

  One refinement, which every PostgreSQL client makes (the built-in subscriber, ``pg_recvlogical``,
  psycopg2): when everything the reader has received is confirmed and it is between transactions, a
  keepalive's WAL position is reported as flushed too. That WAL held nothing for this subscription, so
  confirming it loses nothing, and it matters twice over: an idle stream would otherwise pin WAL
  forever, and a clean server shutdown waits until every walsender's client has flushed up to the
  server's sent position — answering keepalives with an older position makes ``pg_ctl stop`` hang. The
  flip side: a consumer that keeps reading but sits on unconfirmed transactions delays a clean (smart or
  fast) shutdown until it confirms them — indefinitely, since the reader keeps answering — exactly as a
  standby that never flushes would. A consumer that has stopped reading altogether is cut off by the
  server after ``wal_sender_timeout``.
* **Resume and de-duplication.** A reader (re)starts streaming from the slot's ``confirmed_flush_lsn`` or
  from the consumer's own stored position, whichever is later (pass it as ``start_lsn``). Everything
  after it is sent again, so the consumer stores the ``commit_lsn`` of the last transaction it applied
  (atomically with the data) and **skips every transaction whose ``commit_lsn`` is at or below that
  stored position**. This is needed even with a perfect reader: PostgreSQL persists a slot's confirmed
  position lazily, so after a crash it may resend transactions that were already confirmed. Within one
  reader's lifetime, transactions already delivered are not delivered again after an automatic
  reconnect (they are counted in :attr:`ReaderStats.redeliveries_skipped`).
* **Surviving the database going away.** A lost connection, a server restart or failover, a walsender
  terminated by an administrator: the reader reconnects with backoff (:mod:`pgferry.db.retry`) and
  resumes from its last confirmed position; a partially received transaction is discarded and comes
  again whole. Permanent problems — the slot or publication was dropped, bad credentials — are raised.
  (One blind spot is PostgreSQL's: from version 18 a publication dropped *while* streaming only makes the
  server log a warning and send nothing more; the reader notices at its next reconnect.)

Threads: one thread runs the loop (iterating :meth:`ReplicationReader.transactions` or calling
:meth:`ReplicationReader.run`); :meth:`~ReplicationReader.confirm` and :meth:`~ReplicationReader.stop`
may be called from any thread and wake the loop at once. Keep the handler short compared to the
server's ``wal_sender_timeout`` (60 s by default): the loop answers keepalives only between
transactions, so a handler that blocks for longer gets the connection closed by the server (the reader
then reconnects and the transaction is delivered again).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import psycopg
import structlog
from psycopg import pq, sql
from psycopg.errors import error_from_result

from pgferry.config import DatabaseUrl
from pgferry.db.retry import (
    ErrorClass,
    ErrorClassification,
    RetriesExhaustedError,
    RetryAttempt,
    RetryPolicy,
    call_with_retry,
    classify_error,
)
from pgferry.db.sockets import wait_readable, wait_writable
from pgferry.replication import decoder as d
from pgferry.replication._conn import (
    ReplicationError,
    check_slot_name,
    connect_replication,
    conninfo,
    publication_names_option,
)
from pgferry.replication.lsn import Lsn
from pgferry.replication.slots import OUTPUT_PLUGIN, SlotNotFoundError

__all__ = [
    "RECONNECT_POLICY",
    "Change",
    "ColumnInfo",
    "ReaderStats",
    "RelationInfo",
    "ReplicationReader",
    "ReplicationStreamEndedError",
    "RowChange",
    "Transaction",
    "TransactionAssembler",
    "TruncateChange",
    "classify_replication_error",
]

_log = structlog.get_logger("pgferry.replication.reader")

RECONNECT_POLICY: Final = RetryPolicy(max_attempts=40, base_delay=0.2, max_delay=10.0, deadline=300.0)
"""Reconnect backoff: rides out about five minutes of outage (a restart, a failover, a Neon compute that is
waking up) before giving up. Longer than :data:`pgferry.db.retry.DEFAULT_POLICY` because a reader is a
long-running follower: waiting is cheap, and the slot keeps every change in the meantime."""

_PG_EPOCH_UNIX: Final = 946_684_800  # 2000-01-01T00:00:00Z as a Unix timestamp
_XLOGDATA: Final = struct.Struct("!QQq")  # after 'w': dataStart, walEnd, sendTime
_KEEPALIVE: Final = struct.Struct("!QqB")  # after 'k': walEnd, sendTime, replyRequested
_STATUS: Final = struct.Struct("!cQQQqB")  # 'r', write, flush, apply, clock, replyRequested
_XLOGDATA_HEADER: Final = 1 + _XLOGDATA.size
_STOP_POLL: Final = 0.1
_BUSY_CHECK_EVERY: Final = 64  # messages between stop/feedback checks on a busy stream (~3 ms at 20k/s)
_STABLE_AFTER: Final = 5.0  # a stream that lived this long resets the consecutive-failure count


# --------------------------------------------------------------------------------------
# Change events
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """A published column. ``type_name`` is known for non-built-in types (from pgoutput's Type message)."""

    name: str
    type_oid: int
    type_modifier: int
    is_key: bool
    type_name: str | None = None


@dataclass(frozen=True, slots=True)
class RelationInfo:
    """A table as the stream describes it, at the time of the change."""

    oid: int
    schema: str
    table: str
    replica_identity: Literal["d", "n", "f", "i"]
    columns: tuple[ColumnInfo, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def key_columns(self) -> tuple[str, ...]:
        """Replica-identity columns: the primary key (DEFAULT), the index's columns (USING INDEX), or
        every column (FULL — PostgreSQL flags them all)."""
        return tuple(column.name for column in self.columns if column.is_key)

    def column(self, name: str) -> ColumnInfo:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(f"{self.qualified_name} has no published column {name!r}")


RowValues: TypeAlias = dict[str, str | None]


@dataclass(frozen=True, slots=True)
class RowChange:
    """One inserted, updated or deleted row.

    ``new``: the row after an insert/update (``None`` for delete), minus ``unchanged_toast_columns``.
    ``old``: before an update/delete, when the server sent it — the whole row with REPLICA IDENTITY FULL;
    only the key columns with DEFAULT/INDEX, and for an update only when the key changed (otherwise
    ``None``: the key is in ``new``). ``lsn`` is the WAL position of this change.
    """

    kind: Literal["insert", "update", "delete"]
    schema: str
    table: str
    new: RowValues | None
    old: RowValues | None
    key_columns: tuple[str, ...]
    unchanged_toast_columns: tuple[str, ...]
    relation: RelationInfo
    lsn: Lsn

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def key(self) -> RowValues:
        """The row's replica-identity values: from ``old`` when present (the row as it was), else ``new``."""
        source = self.old if self.old is not None else self.new
        if source is None:
            return {}
        return {name: source.get(name) for name in self.key_columns}


@dataclass(frozen=True, slots=True)
class TruncateChange:
    """One TRUNCATE statement; ``tables`` are ``schema.table`` names (several with a multi-table TRUNCATE)."""

    tables: tuple[str, ...]
    relations: tuple[RelationInfo, ...]
    cascade: bool
    restart_identity: bool
    lsn: Lsn


Change: TypeAlias = RowChange | TruncateChange


@dataclass(frozen=True, slots=True)
class Transaction:
    """A committed transaction.

    ``commit_lsn`` is the position of its commit record: the de-duplication key (store it, skip
    transactions at or below it). ``end_lsn`` is the end of that record: what :meth:`ReplicationReader.
    confirm` sends when given the transaction. ``messages`` are transactional logical decoding messages
    (only with ``messages=True``).
    """

    xid: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_ts: dt.datetime
    changes: tuple[Change, ...]
    origin: str | None = None
    messages: tuple[d.Message, ...] = ()


@dataclass(frozen=True)
class ReaderStats:
    """Counters for logs and tests: how often the reader connected and what it delivered or skipped."""

    connects: int = 0
    transactions_delivered: int = 0
    redeliveries_skipped: int = 0
    confirmed_lsn: Lsn = field(default_factory=Lsn)
    reported_flush_lsn: Lsn = field(default_factory=Lsn)

    @property
    def reconnects(self) -> int:
        return max(0, self.connects - 1)


# --------------------------------------------------------------------------------------
# Grouping decoded messages into transactions (pure, no I/O)
# --------------------------------------------------------------------------------------


@dataclass
class _Pending:
    begin: d.Begin
    changes: list[Change] = field(default_factory=list)
    origin: str | None = None
    messages: list[d.Message] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _RelationShape:
    relation: RelationInfo
    names: tuple[str, ...]
    key_flags: tuple[bool, ...]
    key_columns: tuple[str, ...]


class TransactionAssembler:
    """Turns decoded pgoutput messages into :class:`Transaction` objects.

    Keeps the relation and type caches the protocol relies on (a Relation message is sent once per
    connection, before a table's first change, and again after DDL), and the transaction being received.
    Separate from the reader so it can be fed from any source — the replication stream, or rows of
    ``pg_logical_slot_peek_binary_changes`` — and tested without a server.
    """

    def __init__(self) -> None:
        self._relations: dict[int, RelationInfo] = {}
        self._shapes: dict[int, _RelationShape] = {}  # per relation: what the row-change fast path needs
        self._types: dict[int, str] = {}
        self._pending: _Pending | None = None

    @property
    def in_transaction(self) -> bool:
        return self._pending is not None

    @property
    def relations(self) -> Mapping[int, RelationInfo]:
        return self._relations

    def discard_partial(self) -> None:
        """Forget a half-received transaction (its connection died; it will be sent again whole)."""
        self._pending = None

    def feed(self, message: d.PgOutputMessage, lsn: Lsn = Lsn(0)) -> Transaction | None:  # noqa: B008
        """Take one message (``lsn``: its WAL position); returns a transaction when ``message`` is its Commit."""
        if isinstance(message, d.Begin):
            if self._pending is not None:
                raise ReplicationError(
                    f"pgoutput protocol violation: Begin of xid {message.xid} inside xid {self._pending.begin.xid}"
                )
            self._pending = _Pending(message)
        elif isinstance(message, d.Commit):
            return self._commit(message)
        elif isinstance(message, d.Relation):
            self._relations[message.oid] = self._relation_info(message)
            self._shapes.pop(message.oid, None)
        elif isinstance(message, d.Type):
            self._types[message.oid] = f"{message.namespace}.{message.name}" if message.namespace else message.name
        elif isinstance(message, d.Insert):
            self._require("Insert").changes.append(self._row("insert", message.relation_oid, message.new, None, lsn))
        elif isinstance(message, d.Update):
            old = None if message.old is None else (message.old, message.old_kind == "K")
            self._require("Update").changes.append(self._row("update", message.relation_oid, message.new, old, lsn))
        elif isinstance(message, d.Delete):
            old = (message.old, message.old_kind == "K")
            self._require("Delete").changes.append(self._row("delete", message.relation_oid, None, old, lsn))
        elif isinstance(message, d.Truncate):
            relations = tuple(self._relation(oid) for oid in message.relation_oids)
            self._require("Truncate").changes.append(
                TruncateChange(
                    tables=tuple(rel.qualified_name for rel in relations),
                    relations=relations,
                    cascade=message.cascade,
                    restart_identity=message.restart_identity,
                    lsn=lsn,
                )
            )
        elif isinstance(message, d.Origin):
            self._require("Origin").origin = message.name
        elif isinstance(message, d.Message) and message.transactional and self._pending is not None:
            # Non-transactional messages belong to no transaction and have no place in this API.
            self._pending.messages.append(message)
        return None

    def _commit(self, commit: d.Commit) -> Transaction:
        pending = self._require("Commit")
        self._pending = None
        if commit.commit_lsn != pending.begin.final_lsn:
            raise ReplicationError(
                f"pgoutput protocol violation: Commit at {commit.commit_lsn} for a Begin announcing "
                f"{pending.begin.final_lsn} (xid {pending.begin.xid})"
            )
        return Transaction(
            xid=pending.begin.xid,
            commit_lsn=commit.commit_lsn,
            end_lsn=commit.end_lsn,
            commit_ts=commit.commit_ts,
            changes=tuple(pending.changes),
            origin=pending.origin,
            messages=tuple(pending.messages),
        )

    def feed_row_change(self, payload: bytes, lsn: Lsn) -> None:
        """Take one Insert, Update or Delete payload (see :data:`decoder.ROW_CHANGE_TAGS`) undecoded.

        Equivalent to ``feed(decode_message(payload), lsn)`` but decodes straight into column values, which
        on a busy stream is about twice as fast: this is the reader's hot path.
        """
        oid = d.row_change_relation(payload)
        shape = self._shapes.get(oid)
        if shape is None:
            relation = self._relation(oid)
            shape = self._shapes[oid] = _RelationShape(
                relation,
                tuple(c.name for c in relation.columns),
                tuple(c.is_key for c in relation.columns),
                relation.key_columns,
            )
        pending = self._pending
        if pending is None:
            kind = {0x49: "Insert", 0x55: "Update", 0x44: "Delete"}.get(payload[0], "row change")
            raise ReplicationError(f"pgoutput protocol violation: {kind} message outside a transaction")
        try:
            values = d.decode_row_change(payload, shape.names, shape.key_flags)
        except d.DecodeError as exc:
            raise d.DecodeError(f"{exc} (table {shape.relation.qualified_name})") from None
        relation = shape.relation
        pending.changes.append(
            RowChange(
                kind=values.kind,
                schema=relation.schema,
                table=relation.table,
                new=values.new,
                old=values.old,
                key_columns=shape.key_columns,
                unchanged_toast_columns=tuple(dict.fromkeys(values.unchanged)) if values.unchanged else (),
                relation=relation,
                lsn=lsn,
            )
        )

    def _require(self, what: str) -> _Pending:
        if self._pending is None:
            raise ReplicationError(f"pgoutput protocol violation: {what} message outside a transaction")
        return self._pending

    def _relation_info(self, message: d.Relation) -> RelationInfo:
        columns = tuple(
            ColumnInfo(c.name, c.type_oid, c.type_modifier, c.is_key, self._types.get(c.type_oid))
            for c in message.columns
        )
        return RelationInfo(message.oid, message.namespace, message.name, message.replica_identity, columns)

    def _relation(self, oid: int) -> RelationInfo:
        try:
            return self._relations[oid]
        except KeyError:
            raise ReplicationError(
                f"pgoutput protocol violation: change for relation {oid} before its Relation"
            ) from None

    def _row(
        self,
        kind: Literal["insert", "update", "delete"],
        oid: int,
        new: d.TupleData | None,
        old: tuple[d.TupleData, bool] | None,
        lsn: Lsn,
    ) -> RowChange:
        relation = self._relation(oid)
        unchanged: list[str] = []
        new_values = None if new is None else _values(relation, new, keys_only=False, unchanged=unchanged)
        old_values = None if old is None else _values(relation, old[0], keys_only=old[1], unchanged=unchanged)
        return RowChange(
            kind=kind,
            schema=relation.schema,
            table=relation.table,
            new=new_values,
            old=old_values,
            key_columns=relation.key_columns,
            unchanged_toast_columns=tuple(dict.fromkeys(unchanged)),
            relation=relation,
            lsn=lsn,
        )


def _values(relation: RelationInfo, data: d.TupleData, *, keys_only: bool, unchanged: list[str]) -> RowValues:
    if len(data) != len(relation.columns):
        raise ReplicationError(
            f"tuple for {relation.qualified_name} has {len(data)} columns, its Relation message {len(relation.columns)}"
        )
    values: RowValues = {}
    for column, value in zip(relation.columns, data, strict=True):
        if keys_only and not column.is_key:
            continue  # a 'K' tuple carries the key; the other columns are placeholders (NULL)
        kind = value.kind
        if kind == "t":
            assert value.data is not None
            values[column.name] = value.data.decode("utf-8")
        elif kind == "n":
            values[column.name] = None
        elif kind == "u":
            unchanged.append(column.name)
        else:
            raise ReplicationError(f"binary value for {relation.qualified_name}.{column.name}: not requested")
    return values


# --------------------------------------------------------------------------------------
# Error classification
# --------------------------------------------------------------------------------------


class ReplicationStreamEndedError(ReplicationError):
    """The server ended the COPY stream without an error (what a walsender does on a clean shutdown)."""


class _StoppedError(Exception):
    """Internal: stop() was called while the reader was connecting or backing off."""


def classify_replication_error(exc: BaseException) -> ErrorClassification:
    """:func:`pgferry.db.retry.classify_error`, plus the two cases only a replication stream has.

    * The stream ended cleanly (:class:`ReplicationStreamEndedError`): the server is shutting down or failing
      over; reconnect.
    * ``55006`` object_in_use when starting the stream: the slot is still held by the walsender of our
      previous connection, which has not yet noticed that connection is gone; it lets go within
      ``wal_sender_timeout``, so this is worth retrying (it is fatal for ordinary SQL).
    """
    if isinstance(exc, ReplicationStreamEndedError):
        return ErrorClassification(
            ErrorClass.RETRYABLE,
            None,
            "replication stream ended by the server",
            reconnect=True,
            hint="check whether the server is restarting or failing over",
        )
    if isinstance(exc, psycopg.Error) and exc.sqlstate == "55006":
        return ErrorClassification(
            ErrorClass.RETRYABLE,
            "55006",
            "replication slot in use",
            reconnect=True,
            hint="another process streams from this slot (pg_stat_replication); only one reader per slot",
        )
    return classify_error(exc)


# --------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------


class ReplicationReader:
    """Streams committed transactions from a ``pgoutput`` slot; see the module docstring for the contract.

    Typical use::

        with ReplicationReader(url) as reader:
            reader.start("pgferry_sync", ["pgferry_pub"], start_lsn=stored_commit_lsn)
            for txn in reader.transactions():
                if txn.commit_lsn <= stored_commit_lsn:
                    continue                      # already applied before a crash
                apply_and_store_position(txn)     # one database transaction: data + txn.commit_lsn
                reader.confirm(txn)               # now the server may forget it
    """

    def __init__(
        self,
        dsn: str | DatabaseUrl,
        *,
        retry_policy: RetryPolicy = RECONNECT_POLICY,
        status_interval: float = 10.0,
        connect_timeout: float = 10.0,
        messages: bool = False,
        on_stream: Callable[[bool], None] | None = None,
    ) -> None:
        """``on_stream(True)`` is called (on the reading thread) each time a stream starts, ``on_stream(False)``
        each time one ends; a consumer of a temporary slot needs both, since it misses whatever commits between."""
        self._conninfo = conninfo(dsn)
        self._on_stream = on_stream
        self._temporary = False
        self._slot_base = ""
        self._temporary_serial = 0
        self._policy = retry_policy
        self._status_interval = status_interval
        self._connect_timeout = connect_timeout
        self._messages = messages

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._external_stop: threading.Event | None = None
        self._wake_r = -1
        self._wake_w = -1

        self._conn: psycopg.Connection[Any] | None = None
        self._slot: str | None = None
        self._publications: list[str] = []
        self._start_lsn = Lsn(0)
        self._assembler = TransactionAssembler()
        self._reset_positions()
        self._connects = 0
        self._delivered = 0
        self._skipped = 0

    def _reset_positions(self) -> None:
        self._confirmed = Lsn(0)  # highest position the consumer confirmed (or the slot had at start)
        self._reported = Lsn(0)  # flush position last sent on the current connection
        self._feedback_due = False  # the server asked for a reply, or a new connection needs our position
        self._last_status = 0.0
        self._last_commit = Lsn(0)  # commit_lsn of the last transaction delivered: skip anything <= it
        self._received_end = Lsn(0)  # end_lsn of the last complete transaction received
        self._idle_lsn = Lsn(0)  # a keepalive position seen between transactions ...
        self._idle_requires = Lsn(0)  # ... reportable once everything received before it is confirmed
        self._failures = 0  # consecutive stream failures, each within _STABLE_AFTER of connecting
        self._connected_at = 0.0

    # -- public API ----------------------------------------------------------------------------------------

    def __enter__(self) -> ReplicationReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def slot(self) -> str | None:
        return self._slot

    @property
    def confirmed_lsn(self) -> Lsn:
        """The highest position confirmed so far: by :meth:`confirm`, or the slot's own at :meth:`start`."""
        with self._lock:
            return self._confirmed

    @property
    def idle_position(self) -> Lsn:
        """The WAL position of the latest keepalive that came between transactions (``0/0``: none yet).

        The server sends it once it has decoded the WAL up to there, so every transaction committed before it was
        sent first: a consumer that has handled every transaction the reader delivered has seen all of them (WAL of
        other databases and of unpublished tables holds nothing for it)."""
        return self._idle_lsn

    @property
    def relations(self) -> Mapping[int, RelationInfo]:
        """Tables seen on the stream so far, by OID."""
        return self._assembler.relations

    @property
    def stats(self) -> ReaderStats:
        return ReaderStats(
            connects=self._connects,
            transactions_delivered=self._delivered,
            redeliveries_skipped=self._skipped,
            confirmed_lsn=self.confirmed_lsn,
            reported_flush_lsn=self._reported,
        )

    def start(
        self,
        slot: str,
        publication_names: Sequence[str] | str,
        start_lsn: Lsn | int | str | None = None,
        *,
        temporary: bool = False,
    ) -> None:
        """Connect and start streaming from ``slot`` (retrying per the policy while the server is unreachable).

        ``start_lsn``: the consumer's stored position, if it has one; streaming starts at the later of it and
        the slot's ``confirmed_flush_lsn``. Calling ``start`` again restarts from the confirmed position and
        re-delivers everything not confirmed.

        ``temporary=True``: each connection creates its own ``TEMPORARY`` slot (named ``slot`` plus a serial
        number) and streams from its start; the server drops it when the connection ends, so a consumer that
        crashes leaves no slot holding WAL behind. The price: nothing is re-delivered after a reconnect, and
        what committed while disconnected is never seen — for consumers that only need to know *that*
        something changed (a cache), which ``on_stream`` tells them.
        """
        check_slot_name(slot)
        publications = [publication_names] if isinstance(publication_names, str) else list(publication_names)
        publication_names_option(publications)  # validates: at least one
        self._disconnect()
        self._assembler.discard_partial()
        self._reset_positions()
        self._connects = self._delivered = self._skipped = 0
        self._slot = slot
        self._slot_base = slot
        self._temporary = temporary
        self._publications = publications
        self._start_lsn = Lsn(0) if start_lsn is None else Lsn.coerce(start_lsn)
        self._stop.clear()
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
        with contextlib.suppress(_StoppedError):
            self._reconnect()

    def next_batch(self, max_size: int, timeout: float = 1.0) -> list[Transaction]:
        """The next transaction (waiting up to ``timeout`` seconds) and whatever has already arrived after it,
        at most ``max_size`` in all; ``[]`` when nothing came. Never waits to fill a batch: a consumer that
        stores and confirms per batch (group commit) gets bigger batches exactly when it falls behind."""
        first = next(self.transactions(timeout=timeout), None)
        if first is None:
            return []
        batch = [first]
        for txn in self.transactions(timeout=0):
            batch.append(txn)
            if len(batch) >= max_size:
                break
        return batch

    def transactions(self, timeout: float | None = None) -> Iterator[Transaction]:
        """Yield committed transactions as they arrive.

        Ends when no transaction arrived for ``timeout`` seconds (``None``: never), or after :meth:`stop`.
        """
        self._require_started()
        while True:
            deadline = None if timeout is None else time.monotonic() + timeout
            txn = self._next(deadline)
            if txn is None:
                return
            yield txn

    def run(self, handler: Callable[[Transaction], None], stop_event: threading.Event | None = None) -> None:
        """Call ``handler`` with each transaction until ``stop_event`` is set or :meth:`stop` is called.

        Exceptions from ``handler`` propagate (the transaction stays unconfirmed and comes again after a
        restart); fatal stream errors propagate too.
        """
        self._require_started()
        self._external_stop = stop_event
        try:
            while True:
                txn = self._next(None)
                if txn is None:
                    return
                handler(txn)
        finally:
            self._external_stop = None

    def confirm(self, position: Transaction | Lsn | int | str) -> None:
        """Tell the server everything up to ``position`` is durably stored (a transaction means its ``end_lsn``).

        Thread-safe; the feedback is sent by the loop right away (it is woken up). Confirming a position
        lower than one already confirmed does nothing.
        """
        lsn = position.end_lsn if isinstance(position, Transaction) else Lsn.coerce(position)
        with self._lock:
            if lsn <= self._confirmed:
                return
            self._confirmed = lsn
        self._wake()

    def stop(self) -> None:
        """Make :meth:`transactions` / :meth:`run` return soon. Thread-safe."""
        self._stop.set()
        self._wake()

    def close(self) -> None:
        """Send the last confirmed position (best effort) and disconnect. Call from the loop's thread."""
        self._stop.set()
        self._disconnect()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- the loop ------------------------------------------------------------------------------------------

    def _require_started(self) -> None:
        if self._slot is None:
            raise ReplicationError("call ReplicationReader.start(slot, publications) before reading")

    def _stopping(self) -> bool:
        external = self._external_stop
        return self._stop.is_set() or (external is not None and external.is_set())

    def _next(self, deadline: float | None) -> Transaction | None:
        """Read until a transaction completes; ``None`` at ``deadline`` or when stopped."""
        checks_due = 0  # while messages keep coming, stop and status checks run once every _BUSY_CHECK_EVERY
        while True:
            if checks_due <= 0 and self._stopping():
                return None
            try:
                if self._conn is None:
                    self._reconnect()
                if checks_due <= 0:
                    self._maybe_send_status()
                    checks_due = _BUSY_CHECK_EVERY
                checks_due -= 1
                payload = self._read()
                if payload is None:
                    checks_due = 0
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        return None
                    self._wait(self._wait_time(now, deadline))
                    continue
            except _StoppedError:
                return None
            except Exception as exc:
                checks_due = 0
                self._close_connection()
                self._assembler.discard_partial()
                if self._stopping():
                    return None  # e.g. close() from another thread pulled the connection away
                classification = classify_replication_error(exc)
                if not classification.retryable:
                    raise
                try:
                    self._stream_lost(exc, classification)
                except _StoppedError:
                    return None
                continue
            if self._failures and time.monotonic() - self._connected_at >= _STABLE_AFTER:
                self._failures = 0
            txn = self._handle(payload)
            if txn is not None:
                return txn

    def _wait_time(self, now: float, deadline: float | None) -> float:
        wait = max(0.0, self._status_interval - (now - self._last_status))
        if deadline is not None:
            wait = min(wait, deadline - now)
        if self._external_stop is not None:
            wait = min(wait, _STOP_POLL)  # an Event cannot wake select(); poll it
        return max(0.0, wait)

    def _handle(self, payload: bytes) -> Transaction | None:
        tag = payload[:1]
        if tag == b"w":
            data_start, _wal_end, _sent = _XLOGDATA.unpack_from(payload, 1)
            body = payload[_XLOGDATA_HEADER:]
            if body and body[0] in d.ROW_CHANGE_TAGS:
                self._assembler.feed_row_change(body, Lsn(data_start))
                return None
            txn = self._assembler.feed(d.decode_message(body), Lsn(data_start))
            if txn is None:
                return None
            self._received_end = max(self._received_end, txn.end_lsn)
            if txn.commit_lsn <= self._last_commit:
                self._skipped += 1
                _log.debug("replication.redelivery_skipped", slot=self._slot, commit_lsn=str(txn.commit_lsn))
                return None
            self._last_commit = txn.commit_lsn
            self._delivered += 1
            return txn
        if tag == b"k":
            if len(payload) != 1 + _KEEPALIVE.size:
                raise ReplicationError(f"malformed keepalive message ({len(payload)} bytes)")
            wal_end, _sent, reply = _KEEPALIVE.unpack_from(payload, 1)
            if not self._assembler.in_transaction:
                self._idle_lsn = Lsn(wal_end)
                self._idle_requires = self._received_end
            if reply:
                self._feedback_due = True
            return None
        raise ReplicationError(f"unexpected message {tag!r} on the replication stream")

    def _flush_position(self) -> Lsn:
        """What to report as flushed: the consumer's confirmed position, or an idle keepalive position
        when every transaction received before it is confirmed (see the module docstring)."""
        with self._lock:
            confirmed = self._confirmed
        if self._idle_lsn > confirmed and confirmed >= self._idle_requires:
            return self._idle_lsn
        return confirmed

    def _maybe_send_status(self) -> None:
        flush = self._flush_position()
        overdue = time.monotonic() - self._last_status >= self._status_interval
        if self._feedback_due or flush > self._reported or overdue:
            self._send_status(flush)

    def _send_status(self, flush: Lsn) -> None:
        conn = self._conn
        if conn is None:
            return
        clock = int((time.time() - _PG_EPOCH_UNIX) * 1_000_000)
        write = max(flush, self._received_end)
        conn.pgconn.put_copy_data(_STATUS.pack(b"r", write, flush, flush, clock, 0))
        self._flush_output(conn.pgconn)
        self._reported = flush
        self._feedback_due = False
        self._last_status = time.monotonic()

    @staticmethod
    def _flush_output(pgconn: pq.abc.PGconn) -> None:
        while pgconn.flush() == 1:  # only in non-blocking mode: wait until the socket takes the rest
            wait_writable(pgconn.socket, 1.0)

    def _read(self) -> bytes | None:
        """One CopyData payload, or ``None`` when nothing is buffered; raises when the stream ended."""
        assert self._conn is not None
        pgconn = self._conn.pgconn
        nbytes, data = pgconn.get_copy_data(1)
        if nbytes == 0:
            pgconn.consume_input()
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes == 0:
                return None
        if nbytes > 0:
            return bytes(data)
        result = pgconn.get_result()
        if result is not None and result.status == pq.ExecStatus.FATAL_ERROR:
            raise error_from_result(result, encoding="utf-8")
        raise ReplicationStreamEndedError(f"the server ended the replication stream of slot {self._slot!r}")

    def _wait(self, timeout: float) -> None:
        assert self._conn is not None
        fds = [self._conn.pgconn.socket]
        if self._wake_r >= 0:
            fds.append(self._wake_r)
        readable = wait_readable(fds, timeout)
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 512):
                    pass

    def _wake(self) -> None:
        if self._wake_w >= 0:
            # A full pipe already wakes the loop; a closed one means there is no loop to wake.
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")

    # -- connections ---------------------------------------------------------------------------------------

    def _stream_lost(self, exc: Exception, classification: ErrorClassification) -> None:
        """Back off before reconnecting when the stream keeps dying soon after it was (re)established.

        Reconnecting itself is retried by :func:`call_with_retry`; this covers the other loop, where every
        connection succeeds and then dies (a walsender killed over and over, a server in a crash loop).
        """
        self._failures += 1
        _log.warning(
            "replication.stream_lost",
            slot=self._slot,
            reason=classification.reason,
            sqlstate=classification.sqlstate,
            error=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            resume_from=str(self.confirmed_lsn),
        )
        if self._failures > self._policy.max_attempts:
            raise RetriesExhaustedError(
                f"replication slot {self._slot}: stream failed {self._failures} times in a row without "
                f"delivering anything: {classification.reason}; {classification.hint}",
                attempts=self._failures,
                classification=classification,
            ) from exc
        if self._failures > 1:
            self._sleep(self._policy.delay(self._failures - 1))

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self._stopping():
                raise _StoppedError
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._stop.wait(min(remaining, _STOP_POLL))

    def _reconnect(self) -> None:
        def on_retry(attempt: RetryAttempt) -> None:
            _log.warning(
                "replication.reconnect_retry",
                slot=self._slot,
                attempt=attempt.attempt,
                delay=round(attempt.delay, 3),
                reason=attempt.classification.reason,
                sqlstate=attempt.classification.sqlstate,
            )

        call_with_retry(
            self._open_stream,
            policy=self._policy,
            classify=classify_replication_error,
            on_retry=on_retry,
            sleep=self._sleep,
            operation=f"start streaming from replication slot {self._slot}",
        )

    def _open_stream(self) -> None:
        if self._stopping():
            raise _StoppedError
        assert self._slot is not None
        conn = connect_replication(self._conninfo, connect_timeout=self._connect_timeout)
        try:
            start = self._create_temporary_slot(conn) if self._temporary else self._check_slot(conn, self._slot)
            options = ["proto_version '1'", f"publication_names {publication_names_option(self._publications)}"]
            if self._messages:
                options.append("messages 'true'")
            command = f"START_REPLICATION SLOT {self._slot} LOGICAL {start} ({', '.join(options)})"
            pgconn = conn.pgconn
            pgconn.send_query(command.encode())
            result = self._wait_result(pgconn)
            if result.status == pq.ExecStatus.FATAL_ERROR:
                error = error_from_result(result, encoding="utf-8")
                if error.sqlstate == "42704":  # dropped between the check above and START_REPLICATION
                    raise SlotNotFoundError(f"replication slot {self._slot!r} does not exist") from error
                raise error
            if result.status != pq.ExecStatus.COPY_BOTH:
                raise ReplicationError(f"START_REPLICATION answered {pq.ExecStatus(result.status).name}, not COPY_BOTH")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._connected_at = time.monotonic()
        self._connects += 1
        self._reported = Lsn(0)
        self._feedback_due = True  # tell the new walsender our position right away
        _log.info("replication.streaming", slot=self._slot, start_lsn=str(start), connects=self._connects)
        if self._on_stream is not None:
            self._on_stream(True)

    def _create_temporary_slot(self, conn: psycopg.Connection[Any]) -> Lsn:
        """A fresh ``TEMPORARY`` slot on this connection; where it starts. A new name each time: the slot of a
        connection that just died may live on until its walsender notices."""
        database = conn.execute("select pg_catalog.current_database()").fetchone()
        self._check_publications(conn, str(database[0]) if database else "")
        self._temporary_serial += 1
        self._slot = check_slot_name(f"{self._slot_base}_{os.getpid()}_{self._temporary_serial}")
        row = conn.execute(
            f"CREATE_REPLICATION_SLOT {self._slot} TEMPORARY LOGICAL {OUTPUT_PLUGIN} NOEXPORT_SNAPSHOT"
        ).fetchone()
        if row is None:  # pragma: no cover - the server always answers with one row
            raise ReplicationError(f"CREATE_REPLICATION_SLOT {self._slot} returned no row")
        return Lsn.parse(str(row[1]))

    def _check_slot(self, conn: psycopg.Connection[Any], slot: str) -> Lsn:
        """Fail fast and clearly on a wrong slot; return where to start (our position vs. the slot's)."""
        row = conn.execute(
            sql.SQL(
                "select plugin, database, confirmed_flush_lsn::text, pg_catalog.current_database() "
                "from pg_catalog.pg_replication_slots where slot_name = {}"
            ).format(sql.Literal(slot))
        ).fetchone()
        if row is None:
            raise SlotNotFoundError(
                f"replication slot {slot!r} does not exist; create it (create_slot / exported_snapshot) first"
            )
        plugin, database, confirmed, current = row
        if plugin != OUTPUT_PLUGIN:
            raise ReplicationError(f"replication slot {slot!r} uses plugin {plugin!r}, not {OUTPUT_PLUGIN!r}")
        if database != current:
            raise ReplicationError(
                f"replication slot {slot!r} belongs to database {database!r}; connect the reader to that database"
            )
        self._check_publications(conn, current)
        with self._lock:
            if confirmed is not None:
                self._confirmed = max(self._confirmed, Lsn.parse(confirmed))
            return max(self._confirmed, self._start_lsn)

    def _check_publications(self, conn: psycopg.Connection[Any], current: str) -> None:
        found = conn.execute(
            sql.SQL("select pubname::text from pg_catalog.pg_publication where pubname::text = any(array[{}])").format(
                sql.SQL(", ").join(sql.Literal(name) for name in self._publications)
            )
        ).fetchall()
        missing = sorted(set(self._publications) - {row[0] for row in found})
        if missing:
            # PostgreSQL 18 only warns about a missing publication and streams nothing; fail loudly instead.
            raise ReplicationError(
                f"publication(s) {', '.join(missing)} do not exist in database {current!r}; "
                "create them with ensure_publication() first"
            )

    def _wait_result(self, pgconn: pq.abc.PGconn) -> pq.abc.PGresult:
        deadline = time.monotonic() + max(self._connect_timeout, 1.0)
        while pgconn.is_busy():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise psycopg.OperationalError("timed out waiting for the server to start the replication stream")
            wait_readable([pgconn.socket], remaining)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            raise psycopg.OperationalError("the server sent no answer to START_REPLICATION")
        return result

    def _disconnect(self) -> None:
        """Close the stream, first telling the server the latest confirmed position (best effort)."""
        if self._conn is not None:
            try:
                flush = self._flush_position()
                if flush > self._reported:
                    self._send_status(flush)
            except (psycopg.Error, OSError) as exc:
                _log.info("replication.final_feedback_failed", slot=self._slot, error=str(exc).strip())
        self._close_connection()

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._on_stream is not None:
            self._on_stream(False)
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # closing a broken connection must not mask why it broke
                _log.debug("replication.close_failed", error=str(exc))
