"""Pure decoding of ``pgoutput`` messages (PostgreSQL "Logical Replication Message Formats", protocol 1).

No I/O and no state: one ``bytes`` payload in (the body of an XLogData message on the replication stream, or
one row of ``pg_logical_slot_peek_binary_changes(..., 'proto_version', '1', ...)``), one frozen dataclass
out. Keeping it pure is what lets it be tested with hand-built byte strings, and lets the stateful parts
(relation cache, transaction grouping, reconnects) live in :mod:`pgferry.replication.reader` without
being entangled with byte offsets.

What is decoded, and how faithfully:

* Every message of protocol version 1 — ``B`` Begin, ``C`` Commit, ``O`` Origin, ``R`` Relation, ``Y``
  Type, ``I`` Insert, ``U`` Update, ``D`` Delete, ``T`` Truncate — plus ``M`` (logical decoding messages
  from ``pg_logical_emit_message``, sent when the ``messages`` option is on, PostgreSQL 14+).
* Tuple columns keep their kind: ``n`` NULL, ``u`` unchanged TOAST value (the server did not send it
  because the UPDATE did not touch it — *not* the same as NULL), ``t`` text, ``b`` binary (only with the
  ``binary`` option). Values stay ``bytes`` here; :meth:`TupleField.text` decodes them. The reader asks
  the server for ``client_encoding=UTF8``, so text values are UTF-8.
* Streaming of in-progress transactions (protocol 2+: ``S``/``E``/``c``/``A`` and an xid prefix on
  change messages) and two-phase messages are not supported: the reader never asks for them, and a
  message it does not understand raises :class:`DecodeError` instead of being mis-parsed.

Timestamps on the wire are microseconds since 2000-01-01 UTC; they are returned as aware ``datetime``\\ s.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from pgferry.errors import PgferryError
from pgferry.replication.lsn import Lsn

__all__ = [
    "ROW_CHANGE_TAGS",
    "Begin",
    "ColumnKind",
    "Commit",
    "DecodeError",
    "Delete",
    "Insert",
    "Message",
    "Origin",
    "PgOutputMessage",
    "Relation",
    "RelationColumn",
    "RowChangeValues",
    "Truncate",
    "TupleData",
    "TupleField",
    "Type",
    "Update",
    "decode_message",
    "decode_row_change",
    "pg_timestamp",
    "row_change_relation",
]

PG_EPOCH: Final = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

ColumnKind: TypeAlias = Literal["n", "u", "t", "b"]
ReplicaIdentity: TypeAlias = Literal["d", "n", "f", "i"]
OldTupleKind: TypeAlias = Literal["K", "O"]

TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2
RELATION_COLUMN_KEY: Final = 1
MESSAGE_TRANSACTIONAL: Final = 1


class DecodeError(PgferryError):
    """A payload is not a well-formed pgoutput protocol-1 message.

    Seeing this means a bug or a protocol mismatch (another output plugin, a newer protocol version), never
    a transient condition, so the reader does not retry it.
    """


def pg_timestamp(microseconds: int) -> dt.datetime:
    """A PostgreSQL wire timestamp (microseconds since 2000-01-01 UTC) as an aware ``datetime``."""
    return PG_EPOCH + dt.timedelta(microseconds=microseconds)


# --------------------------------------------------------------------------------------
# Message types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TupleField:
    """One column of a TupleData: its kind and, for ``t``/``b``, the raw bytes."""

    kind: ColumnKind
    data: bytes | None = None

    def text(self) -> str | None:
        """The value as text (``None`` for NULL); raises for an unchanged TOAST value, which has no value."""
        if self.kind == "n":
            return None
        if self.kind == "u":
            raise ValueError("an unchanged TOAST column carries no value; check TupleField.kind first")
        assert self.data is not None
        return self.data.decode("utf-8")


TupleData: TypeAlias = tuple[TupleField, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    """``B``: a transaction starts. ``final_lsn`` is the LSN of its commit record (known: decoding is at commit)."""

    final_lsn: Lsn
    commit_ts: dt.datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """``C``: the transaction ends. Confirm ``end_lsn`` (the end of the commit record) once it is stored."""

    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_ts: dt.datetime


@dataclass(frozen=True, slots=True)
class Origin:
    """``O``: the transaction was replayed from another node (replication origin ``name``)."""

    commit_lsn: Lsn
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    """A column as the Relation message describes it; ``flags & 1`` marks replica-identity (key) columns."""

    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & RELATION_COLUMN_KEY)


@dataclass(frozen=True, slots=True)
class Relation:
    """``R``: the shape of a table, sent before its first change on a connection and again after DDL.

    ``namespace`` is empty for ``pg_catalog``. ``replica_identity`` is ``relreplident``: ``d`` default
    (primary key), ``n`` nothing, ``f`` full, ``i`` index.
    """

    oid: int
    namespace: str
    name: str
    replica_identity: ReplicaIdentity
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True, slots=True)
class Type:
    """``Y``: the name of a non-built-in type used by a column (e.g. pgvector's ``vector``)."""

    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """``I``: a new row."""

    relation_oid: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    """``U``: a changed row.

    ``old`` is present only when the server logged it: always with REPLICA IDENTITY FULL (``old_kind``
    ``'O'``, the whole old row), and with DEFAULT/INDEX only when a key column changed (``'K'``, the old
    key with every non-key column NULL).
    """

    relation_oid: int
    new: TupleData
    old: TupleData | None = None
    old_kind: OldTupleKind | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """``D``: a removed row; ``old`` is the key (``'K'``) or, with REPLICA IDENTITY FULL, the row (``'O'``)."""

    relation_oid: int
    old: TupleData
    old_kind: OldTupleKind


@dataclass(frozen=True, slots=True)
class Truncate:
    """``T``: one TRUNCATE statement, covering every listed relation."""

    relation_oids: tuple[int, ...]
    options: int

    @property
    def cascade(self) -> bool:
        return bool(self.options & TRUNCATE_CASCADE)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & TRUNCATE_RESTART_IDENTITY)


@dataclass(frozen=True, slots=True)
class Message:
    """``M``: a logical decoding message (``pg_logical_emit_message``)."""

    transactional: bool
    lsn: Lsn
    prefix: str
    content: bytes


PgOutputMessage: TypeAlias = Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | Message


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------

_U8: Final = struct.Struct("!B")
_I16: Final = struct.Struct("!h")
_I32: Final = struct.Struct("!i")
_U32: Final = struct.Struct("!I")
_I64: Final = struct.Struct("!q")
_U64: Final = struct.Struct("!Q")


class _Cursor:
    """Reads big-endian fields from one payload, turning every overrun into a :class:`DecodeError`."""

    __slots__ = ("buf", "pos", "tag")

    def __init__(self, buf: bytes, tag: str) -> None:
        self.buf = buf
        self.pos = 1
        self.tag = tag

    def _unpack(self, fmt: struct.Struct) -> int:
        try:
            (value,) = fmt.unpack_from(self.buf, self.pos)
        except struct.error:
            raise self.error(f"truncated: needs {fmt.size} more byte(s) at offset {self.pos}") from None
        self.pos += fmt.size
        return int(value)

    def u8(self) -> int:
        return self._unpack(_U8)

    def i16(self) -> int:
        return self._unpack(_I16)

    def i32(self) -> int:
        return self._unpack(_I32)

    def u32(self) -> int:
        return self._unpack(_U32)

    def i64(self) -> int:
        return self._unpack(_I64)

    def lsn(self) -> Lsn:
        return Lsn(self._unpack(_U64))

    def timestamp(self) -> dt.datetime:
        return pg_timestamp(self.i64())

    def char(self) -> str:
        return chr(self.u8())

    def string(self) -> str:
        end = self.buf.find(b"\x00", self.pos)
        if end < 0:
            raise self.error(f"unterminated string at offset {self.pos}")
        raw = self.buf[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(f"string at offset {self.pos} is not UTF-8: {exc}") from None

    def take(self, length: int) -> bytes:
        if length < 0 or self.pos + length > len(self.buf):
            raise self.error(f"truncated: {length} byte(s) announced at offset {self.pos}, {self.remaining} left")
        data = self.buf[self.pos : self.pos + length]
        self.pos += length
        return data

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def finish(self) -> None:
        if self.remaining:
            raise self.error(f"{self.remaining} unexpected trailing byte(s)")

    def error(self, problem: str) -> DecodeError:
        return DecodeError(f"malformed pgoutput {self.tag!r} message: {problem}")

    def tuple_data(self) -> TupleData:
        # The hot loop of the whole reader (once per column of every row): locals and direct unpacking instead
        # of the helper methods, which cost about half the decoding time.
        buf, pos, size = self.buf, self.pos, len(self.buf)
        if pos + 2 > size:
            raise self.error(f"truncated: needs 2 more byte(s) at offset {pos}")
        (count,) = _I16.unpack_from(buf, pos)
        pos += 2
        if count < 0:
            raise self.error(f"negative column count {count}")
        fields: list[TupleField] = []
        append = fields.append
        unpack_length = _I32.unpack_from
        for _ in range(count):
            if pos >= size:
                raise self.error(f"truncated: needs 1 more byte(s) at offset {pos}")
            kind = buf[pos]
            pos += 1
            if kind == 0x6E:  # n
                append(_NULL)
            elif kind == 0x75:  # u
                append(_UNCHANGED)
            elif kind == 0x74 or kind == 0x62:  # t, b
                if pos + 4 > size:
                    raise self.error(f"truncated: needs 4 more byte(s) at offset {pos}")
                (length,) = unpack_length(buf, pos)
                pos += 4
                end = pos + length
                if length < 0 or end > size:
                    raise self.error(f"truncated: {length} byte(s) announced at offset {pos}, {size - pos} left")
                append(TupleField("t" if kind == 0x74 else "b", buf[pos:end]))
                pos = end
            else:
                raise self.error(f"unknown tuple column kind {chr(kind)!r}")
        self.pos = pos
        return tuple(fields)

    def old_kind(self, expected: str) -> OldTupleKind:
        kind = self.char()
        if kind == "K":
            return "K"
        if kind == "O":
            return "O"
        raise self.error(f"expected {expected}, got {kind!r}")

    def expect_new(self) -> None:
        kind = self.char()
        if kind != "N":
            raise self.error(f"expected 'N' before the new tuple, got {kind!r}")


_NULL: Final = TupleField("n")
_UNCHANGED: Final = TupleField("u")

# --------------------------------------------------------------------------------------
# Row changes straight to values (the reader's hot path)
# --------------------------------------------------------------------------------------

ROW_CHANGE_TAGS: Final = frozenset(b"IUD")
"""First bytes of the messages :func:`decode_row_change` takes: Insert, Update, Delete."""


@dataclass(slots=True)
class RowChangeValues:
    """An Insert, Update or Delete decoded straight into column values (text, or ``None`` for NULL).

    The general :func:`decode_message` builds a :class:`TupleField` per column; on a busy stream that is
    most of the decoding time, so the reader takes this path for row changes: one dict per tuple, keyed by
    the column names of the table's Relation message. ``old_kind`` is ``"K"`` when ``old`` holds only the
    replica-identity columns (the others are left out), ``"O"`` for a whole old row; ``unchanged`` lists
    unchanged TOAST columns (absent from the dicts).
    """

    kind: Literal["insert", "update", "delete"]
    new: dict[str, str | None] | None
    old: dict[str, str | None] | None
    old_kind: OldTupleKind | None
    unchanged: list[str]


def row_change_relation(payload: bytes) -> int:
    """The relation OID of an Insert, Update or Delete payload, needed to pick the column names first."""
    if len(payload) < 5:
        tag = chr(payload[0]) if payload else "?"
        raise DecodeError(f"malformed pgoutput {tag!r} message: truncated: needs 4 more byte(s) at offset 1")
    return int(_U32.unpack_from(payload, 1)[0])


def decode_row_change(payload: bytes, names: tuple[str, ...], key_flags: tuple[bool, ...]) -> RowChangeValues:
    """Decode an Insert, Update or Delete (see :data:`ROW_CHANGE_TAGS`) into column values.

    ``names`` and ``key_flags`` are the table's columns as its Relation message gave them. Checks exactly
    what :func:`decode_message` checks, plus that each tuple has as many columns as the Relation.
    """
    tag = payload[0]
    c = _Cursor(payload, chr(tag))
    c.pos = 5  # tag and relation OID (read by row_change_relation)
    unchanged: list[str] = []
    if tag == 0x49:  # I
        c.expect_new()
        change = RowChangeValues("insert", _tuple_values(c, names, None, unchanged), None, None, unchanged)
    elif tag == 0x55:  # U
        kind = c.char()
        if kind == "N":
            change = RowChangeValues("update", _tuple_values(c, names, None, unchanged), None, None, unchanged)
        elif kind in ("K", "O"):
            old = _tuple_values(c, names, key_flags if kind == "K" else None, unchanged)
            c.expect_new()
            new = _tuple_values(c, names, None, unchanged)
            change = RowChangeValues("update", new, old, "K" if kind == "K" else "O", unchanged)
        else:
            raise c.error(f"expected 'K', 'O' or 'N' after the relation OID, got {kind!r}")
    elif tag == 0x44:  # D
        old_kind = c.old_kind("'K' or 'O' before the old tuple")
        old = _tuple_values(c, names, key_flags if old_kind == "K" else None, unchanged)
        change = RowChangeValues("delete", None, old, old_kind, unchanged)
    else:
        raise c.error("not a row change (Insert, Update or Delete)")
    c.finish()
    return change


def _tuple_values(
    c: _Cursor, names: tuple[str, ...], key_flags: tuple[bool, ...] | None, unchanged: list[str]
) -> dict[str, str | None]:
    # Same checks as _Cursor.tuple_data, fused with the naming; with key_flags, non-key columns (NULL
    # placeholders in a 'K' tuple) are skipped.
    buf, pos, size = c.buf, c.pos, len(c.buf)
    if pos + 2 > size:
        raise c.error(f"truncated: needs 2 more byte(s) at offset {pos}")
    (count,) = _I16.unpack_from(buf, pos)
    pos += 2
    if count != len(names):
        if count < 0:
            raise c.error(f"negative column count {count}")
        raise c.error(f"tuple has {count} columns, its Relation message {len(names)}")
    values: dict[str, str | None] = {}
    unpack_length = _I32.unpack_from
    for index in range(count):
        if pos >= size:
            raise c.error(f"truncated: needs 1 more byte(s) at offset {pos}")
        kind = buf[pos]
        pos += 1
        if kind == 0x74:  # t
            if pos + 4 > size:
                raise c.error(f"truncated: needs 4 more byte(s) at offset {pos}")
            (length,) = unpack_length(buf, pos)
            pos += 4
            end = pos + length
            if length < 0 or end > size:
                raise c.error(f"truncated: {length} byte(s) announced at offset {pos}, {size - pos} left")
            if key_flags is None or key_flags[index]:
                try:
                    values[names[index]] = buf[pos:end].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise c.error(f"value of column {names[index]!r} is not UTF-8: {exc}") from None
            pos = end
        elif kind == 0x6E:  # n
            if key_flags is None or key_flags[index]:
                values[names[index]] = None
        elif kind == 0x75:  # u
            if key_flags is None or key_flags[index]:
                unchanged.append(names[index])
        elif kind == 0x62:  # b
            raise c.error(f"binary value for column {names[index]!r}: not requested")
        else:
            raise c.error(f"unknown tuple column kind {chr(kind)!r}")
    c.pos = pos
    return values


_REPLICA_IDENTITIES: Final[dict[str, ReplicaIdentity]] = {"d": "d", "n": "n", "f": "f", "i": "i"}


def _begin(c: _Cursor) -> Begin:
    return Begin(final_lsn=c.lsn(), commit_ts=c.timestamp(), xid=c.u32())


def _commit(c: _Cursor) -> Commit:
    return Commit(flags=c.u8(), commit_lsn=c.lsn(), end_lsn=c.lsn(), commit_ts=c.timestamp())


def _origin(c: _Cursor) -> Origin:
    return Origin(commit_lsn=c.lsn(), name=c.string())


def _relation(c: _Cursor) -> Relation:
    oid = c.u32()
    namespace = c.string()
    name = c.string()
    identity = _REPLICA_IDENTITIES.get(c.char())
    if identity is None:
        raise c.error(f"unknown replica identity {chr(c.buf[c.pos - 1])!r}")
    count = c.i16()
    columns = tuple(
        RelationColumn(flags=c.u8(), name=c.string(), type_oid=c.u32(), type_modifier=c.i32()) for _ in range(count)
    )
    return Relation(oid, namespace, name, identity, columns)


def _type(c: _Cursor) -> Type:
    return Type(oid=c.u32(), namespace=c.string(), name=c.string())


def _insert(c: _Cursor) -> Insert:
    oid = c.u32()
    c.expect_new()
    return Insert(oid, c.tuple_data())


def _update(c: _Cursor) -> Update:
    oid = c.u32()
    kind = c.char()
    if kind == "N":
        return Update(oid, c.tuple_data())
    if kind not in ("K", "O"):
        raise c.error(f"expected 'K', 'O' or 'N' after the relation OID, got {kind!r}")
    old = c.tuple_data()
    c.expect_new()
    return Update(oid, c.tuple_data(), old, "K" if kind == "K" else "O")


def _delete(c: _Cursor) -> Delete:
    oid = c.u32()
    kind = c.old_kind("'K' or 'O' before the old tuple")
    return Delete(oid, c.tuple_data(), kind)


def _truncate(c: _Cursor) -> Truncate:
    count = c.i32()
    options = c.u8()
    if count < 0:
        raise c.error(f"negative relation count {count}")
    return Truncate(tuple(c.u32() for _ in range(count)), options)


def _message(c: _Cursor) -> Message:
    flags = c.u8()
    lsn = c.lsn()
    prefix = c.string()
    content = c.take(c.i32())
    return Message(bool(flags & MESSAGE_TRANSACTIONAL), lsn, prefix, content)


_DECODERS: Final[dict[int, Callable[[_Cursor], PgOutputMessage]]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
}

_UNSUPPORTED: Final = {
    "S": "stream start (protocol 2 streaming)",
    "E": "stream stop (protocol 2 streaming)",
    "c": "stream commit (protocol 2 streaming)",
    "A": "stream abort (protocol 2 streaming)",
    "b": "begin prepare (protocol 3 two-phase)",
    "P": "prepare (protocol 3 two-phase)",
    "K": "commit prepared (protocol 3 two-phase)",
    "r": "rollback prepared (protocol 3 two-phase)",
    "p": "stream prepare (protocol 3 two-phase)",
}


def decode_message(payload: bytes | bytearray | memoryview) -> PgOutputMessage:
    """Decode one pgoutput message; raises :class:`DecodeError` for anything malformed or unsupported."""
    buf = bytes(payload)
    if not buf:
        raise DecodeError("empty pgoutput message")
    tag = chr(buf[0])
    decoder = _DECODERS.get(buf[0])
    if decoder is None:
        what = _UNSUPPORTED.get(tag)
        if what is not None:
            raise DecodeError(f"unsupported pgoutput message {tag!r}: {what}; the reader asks for protocol 1 only")
        raise DecodeError(f"unknown pgoutput message type {tag!r} (first byte 0x{buf[0]:02x})")
    cursor = _Cursor(buf, tag)
    message = decoder(cursor)
    cursor.finish()
    return message
