"""The Shape protocol as a client sees it, with no I/O: what to ask next, and what an answer means.

Shared by :class:`~pgferry.client.shape_async.AsyncShapeStream` and :class:`~pgferry.client.shape.ShapeStream`
(psycopg 3's pattern: one base, an async module and a sync module that only do the I/O). Follows
``@electric-sql/client``'s ``ShapeStream``: start at ``offset=-1``; page with the ``electric-offset`` and
``electric-handle`` of each answer until ``up-to-date``; then ``live=true`` long-polls carrying ``cursor``; a 409 is
``must-refetch`` (start over from ``-1`` with the new handle: the consumer must drop what it holds); 429 and 5xx are
retried after ``Retry-After`` or a backoff with full jitter; any other 4xx stops the stream with an error.

Owns the client's protocol state (offset, handle, cursor, schema); must not do HTTP or store anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, overload

import msgspec

from pgferry.client.errors import ShapeRequestError

__all__ = ["Change", "RowValues", "ShapeBatch", "ShapeOptions", "ShapeState", "lsn_number"]

HANDLE: Final = "electric-handle"
OFFSET: Final = "electric-offset"
CURSOR: Final = "electric-cursor"
SCHEMA: Final = "electric-schema"
UP_TO_DATE: Final = "electric-up-to-date"
_RETRIED: Final = frozenset({429, 500, 502, 503, 504})
#: With ``defer_decoding``, answers at least this large that do not end up to date are handed on undecoded.
DEFER_DECODING_FROM: Final = 64 << 10


@dataclass(frozen=True, slots=True)
class Change:
    """One row change: ``value`` holds PostgreSQL text values by column (``None``: SQL NULL; with
    ``replica=default`` an update carries only the changed columns and the key), ``txids`` the transaction(s) it
    came from (empty for snapshot rows)."""

    key: str
    operation: str
    value: Mapping[str, str | None]
    txids: tuple[int, ...] = ()


class ColumnOrder:
    """A shape's columns in schema order, with each one's position: shared by every :class:`RowValues` decoded
    under that schema."""

    __slots__ = ("names", "position")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.position = {name: index for index, name in enumerate(names)}


class RowValues(Mapping[str, "str | None"]):
    """An insert's values as a tuple in the schema's column order (``row``), read as a mapping.

    A snapshot is all inserts: decoding each row straight into a tuple, instead of a dict per row, halves the
    client's decoding CPU, and a replica loading a snapshot takes ``row`` as it is. Every column of
    the schema is present (a column the message left out is ``None``: for an insert that is what it means)."""

    __slots__ = ("columns", "row")

    def __init__(self, columns: ColumnOrder, row: tuple[str | None, ...]) -> None:
        self.columns = columns
        self.row = row

    def __getitem__(self, column: str) -> str | None:
        return self.row[self.columns.position[column]]

    @overload
    def get(self, column: str, /) -> str | None: ...
    @overload
    def get(self, column: str, default: Any, /) -> Any: ...
    def get(self, column: str, default: Any = None, /) -> Any:
        index = self.columns.position.get(column)
        return default if index is None else self.row[index]

    def __contains__(self, column: object) -> bool:
        return column in self.columns.position

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns.names)

    def __len__(self) -> int:
        return len(self.columns.names)

    def __repr__(self) -> str:
        return f"RowValues({dict(self)!r})"


@dataclass(frozen=True, slots=True)
class ShapeBatch:
    """One answer: its changes in log order, where the stream stands after it, and what it said.

    ``up_to_date``: the client now holds everything up to ``offset`` (a consistent point: apply the changes
    gathered since the previous up-to-date atomically here). ``must_refetch``: the shape was rotated; drop every
    row of it and everything gathered, the stream starts over. ``global_lsn``: the up-to-date's
    ``global_last_seen_lsn`` when it carried one (a commit position: the server had processed every transaction
    committed at or before it, so each change of those that belongs to this shape came before this up-to-date)."""

    changes: list[Change]
    offset: str
    handle: str | None
    up_to_date: bool = False
    must_refetch: bool = False
    schema: Mapping[str, Any] | None = None
    #: Bytes of the answer's JSON: what holding its changes in memory costs, roughly (wide rows make few changes
    #: large).
    size: int = 0
    global_lsn: int | None = None
    #: A page handed on undecoded (``defer_decoding``): ``changes`` is empty, :meth:`decoded` reads it.
    undecoded: bytes | None = None
    decoder: _TypedMessages | None = None

    def decoded(self) -> list[Change]:
        """The batch's changes; a page handed on undecoded is decoded now, on the calling thread.

        Why deferred: a client that stores a snapshot on a worker thread decodes there too, instead of one thread
        decoding (a long C call holding the GIL) while the other waits for the GIL between the rows it writes —
        that contention, not either job, was most of an initial sync's time. Such a page never ends up to date
        (those are decoded at once); a ``must-refetch`` inside one (not what Electric sends: it answers 409)
        raises :class:`RefetchInDeferredPageError`, for the consumer to start the stream again."""
        if self.undecoded is None:
            return self.changes
        changes, _up_to_date, refetch, _seen = _read_messages(self.undecoded, self.decoder)
        if refetch:
            raise RefetchInDeferredPageError("a must-refetch inside a page of changes; the stream must start again")
        return changes

    def leading_inserts(
        self, columns: Sequence[str]
    ) -> tuple[list[tuple[str | None, ...]], set[int], list[Change]] | None:
        """A page handed on undecoded, decoded for a replica loading a snapshot: its leading inserts as rows
        ``(key, *values)`` with the values in ``columns``' order, their txids, and the changes from the first
        message that is not an insert on (as :meth:`decoded` gives them). ``None`` when this page cannot be read
        that way (decoded already, no typed decoder, another column order, a value that is not a string): use
        :meth:`decoded`.

        Why: a snapshot is all inserts, and building a :class:`Change` and a :class:`RowValues` per row (and
        collecting them in Python's cyclic garbage collector) cost the client more CPU than decoding the JSON."""
        if self.undecoded is None or self.decoder is None or self.decoder.columns.names != tuple(columns):
            return None
        read = self.decoder.read_leading_inserts(self.undecoded)
        if read is None:
            return None
        rows, txids, rest = read
        if rest is None:
            raise RefetchInDeferredPageError("a must-refetch inside a page of changes; the stream must start again")
        return rows, txids, rest


class RefetchInDeferredPageError(RuntimeError):
    """A deferred page (:meth:`ShapeBatch.decoded`) turned out to carry a ``must-refetch``."""


@dataclass(frozen=True)
class ShapeOptions:
    """What shape to follow: ``table`` plus Electric's optional ``where``/``params``/``columns``/``replica``, and
    any extra query parameters (``secret`` for a dev server, a proxy's own). ``live=False`` stops at the first
    up-to-date."""

    table: str
    where: str | None = None
    params: Mapping[int, str] = field(default_factory=dict)
    columns: tuple[str, ...] | None = None
    replica: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    live: bool = True

    def query(self) -> dict[str, str]:
        query = {"table": self.table, **self.extra}
        if self.where is not None:
            query["where"] = self.where
        for index, value in self.params.items():
            query[f"params[{index}]"] = value
        if self.columns is not None:
            query["columns"] = ",".join(self.columns)
        if self.replica is not None:
            query["replica"] = self.replica
        return query


class ShapeState:
    """Where the stream stands: offset, handle, cursor, whether it is up to date, the last schema seen."""

    def __init__(
        self, options: ShapeOptions, *, offset: str = "-1", handle: str | None = None, defer_decoding: bool = False
    ) -> None:
        """``defer_decoding``: large answers that do not end up to date (the ``electric-up-to-date`` header says
        so, as Electric's protocol defines) come as batches to decode with :meth:`ShapeBatch.decoded`."""
        if offset != "-1" and handle is None:
            raise ValueError("resuming from an offset needs the handle it belongs to")
        self.defer_decoding = defer_decoding
        self.options = options
        self.offset = offset
        self.handle = handle
        self.cursor: str | None = None
        self.up_to_date = False
        self.schema: Mapping[str, Any] | None = None
        self.failures = 0
        self._typed: _TypedMessages | None = None

    def request_params(self) -> dict[str, str]:
        query = self.options.query()
        query["offset"] = self.offset
        if self.handle is not None:
            query["handle"] = self.handle
        if self.up_to_date and self.offset != "-1":
            query["live"] = "true"
            if self.cursor is not None:
                query["cursor"] = self.cursor
        return query

    def should_retry(self, status: int) -> bool:
        return status in _RETRIED

    def on_failure(self) -> int:
        """Count a failed attempt (retryable status or transport error); the attempt number for the backoff."""
        self.failures += 1
        return self.failures

    def on_response(self, status: int, headers: Mapping[str, str], body: bytes) -> ShapeBatch | None:
        """The batch an answer carries (``None`` for a 204 live timeout); :class:`ShapeRequestError` for a refusal
        that retrying cannot fix."""
        if status == 409:
            return self._must_refetch(headers)
        if status == 204:
            self.failures = 0
            return None
        if status != 200:
            raise ShapeRequestError.from_response(status, body)
        self.failures = 0
        self.handle = headers.get(HANDLE) or self.handle
        self.offset = headers.get(OFFSET) or self.offset
        self.cursor = headers.get(CURSOR) or self.cursor
        if SCHEMA in headers:
            self.schema = json.loads(headers[SCHEMA])
        if self.schema and (self._typed is None or self._typed.schema != self.schema):
            self._typed = _TypedMessages.for_schema(self.schema)
        if self.defer_decoding and len(body) >= DEFER_DECODING_FROM and UP_TO_DATE not in headers:
            # An up-to-date message in it without the header (a server off the protocol) is not seen: the stream
            # then asks again, non-live, and the next (small, decoded) answer carries it.
            return ShapeBatch(
                [], self.offset, self.handle, schema=self.schema, size=len(body), undecoded=body, decoder=self._typed
            )
        changes, up_to_date, refetch, global_lsn = _read_messages(body, self._typed)
        if refetch:
            return self._must_refetch(headers)
        up_to_date = up_to_date or UP_TO_DATE in headers
        if up_to_date:
            self.up_to_date = True
        return ShapeBatch(
            changes,
            self.offset,
            self.handle,
            up_to_date=up_to_date,
            schema=self.schema,
            size=len(body),
            global_lsn=global_lsn,
        )

    def _must_refetch(self, headers: Mapping[str, str]) -> ShapeBatch:
        self.offset = "-1"
        self.handle = headers.get(HANDLE) or None
        self.cursor = None
        self.up_to_date = False
        self.failures = 0
        return ShapeBatch([], self.offset, self.handle, must_refetch=True)


class _Headers(msgspec.Struct, gc=False):
    operation: str = "insert"
    control: str | None = None
    txids: tuple[int | str, ...] = ()
    global_last_seen_lsn: str | int | None = None


class _Message(msgspec.Struct, gc=False):
    headers: _Headers = msgspec.field(default_factory=_Headers)
    key: str | None = None
    value: dict[str, Any] = msgspec.field(default_factory=dict)


#: A page is decoded straight into these structs (msgspec, in C): the stdlib's ``json.loads`` building a dict per
#: message and per header, then read field by field in Python, was most of a client's CPU in an initial sync.
_MESSAGES: Final = msgspec.json.Decoder(list[_Message])


def _messages_decoder(names: tuple[str, ...], field_type: Any, default: Any) -> msgspec.json.Decoder[list[Any]]:
    """A decoder of a page into messages whose ``value`` is a struct with a field per column of ``names`` (each of
    ``field_type``, ``default`` when a message leaves it out); untracked by the cyclic GC (they hold only strings)."""
    fields = [(f"c{i}", field_type, default) for i in range(len(names))]
    value = msgspec.defstruct("Value", fields, rename={f"c{i}": name for i, name in enumerate(names)}, gc=False)
    message = msgspec.defstruct(
        "Message",
        [
            ("headers", _Headers, msgspec.field(default_factory=_Headers)),
            ("key", str | None, None),
            ("value", value | None, None),
        ],
        gc=False,
    )
    return msgspec.json.Decoder(list[message])  # type: ignore[valid-type]


class _TypedMessages:
    """A decoder for one schema: each message's ``value`` straight into a struct with a field per column (no dict,
    no key strings per row), turned into :class:`RowValues` for inserts and a dict of the columns present for
    updates and deletes (where a missing column means unchanged, not NULL)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema = dict(schema)
        self.columns = ColumnOrder(tuple(schema))
        self.decoder = _messages_decoder(self.columns.names, str | None | msgspec.UnsetType, msgspec.UNSET)
        self._inserts_decoder: msgspec.json.Decoder[list[Any]] | None = None

    @classmethod
    def for_schema(cls, schema: Mapping[str, Any]) -> _TypedMessages | None:
        try:
            return cls(schema)
        except (TypeError, ValueError):  # a column name msgspec cannot take: the generic decoding serves
            return None

    def read_leading_inserts(
        self, body: bytes
    ) -> tuple[list[tuple[str | None, ...]], set[int], list[Change] | None] | None:
        """See :meth:`ShapeBatch.leading_inserts` (``None``: read it as :meth:`read` would; the changes ``None``: a
        must-refetch among them)."""
        try:
            messages: list[Any] = self.inserts_decoder.decode(body)
        except msgspec.ValidationError:
            return None
        rows: list[tuple[str | None, ...]] = []
        append = rows.append
        txids: set[int] = set()
        astuple = msgspec.structs.astuple
        for index, message in enumerate(messages):
            headers = message.headers
            if message.key is None:
                if headers.control == "must-refetch":
                    return rows, txids, None
                continue
            if headers.operation != "insert" or message.value is None:
                # The snapshot ends here: the rest as changes, decoded again with the columns it left out unset
                # (an update's missing column is unchanged, not NULL).
                read = self.read(body, start=index)
                if read is None:
                    return None
                changes, _up_to_date, refetch, _lsn = read
                return rows, txids, None if refetch else changes
            append((message.key, *astuple(message.value)))
            if headers.txids:
                txids.update(map(int, headers.txids))
        return rows, txids, []

    @property
    def inserts_decoder(self) -> msgspec.json.Decoder[list[Any]]:
        """Like :attr:`decoder`, but a column a message leaves out is ``None`` (what it means for an insert), so an
        insert's values are a struct's fields as they are."""
        if self._inserts_decoder is None:
            self._inserts_decoder = _messages_decoder(self.columns.names, str | None, None)
        return self._inserts_decoder

    def read(self, body: bytes, *, start: int = 0) -> tuple[list[Change], bool, bool, int | None] | None:
        """The page's changes (from its message ``start`` on), or ``None`` when a value is not a string or null
        (the generic decoding then keeps it as it came)."""
        try:
            messages: list[Any] = self.decoder.decode(body)
        except msgspec.ValidationError:
            return None
        if start:
            del messages[:start]
        columns, names, unset, astuple = self.columns, self.columns.names, msgspec.UNSET, msgspec.structs.astuple

        def value_of(message: Any) -> Mapping[str, str | None]:
            values: tuple[Any, ...] = astuple(message.value) if message.value is not None else (unset,) * len(names)
            if message.headers.operation == "insert":
                if unset in values:
                    values = tuple(None if v is unset else v for v in values)
                return RowValues(columns, values)
            return {c: v for c, v in zip(names, values, strict=True) if v is not unset}

        return _collect(messages, value_of)


def _read_messages(body: bytes, typed: _TypedMessages | None = None) -> tuple[list[Change], bool, bool, int | None]:
    if not body.strip():
        return [], False, False, None
    if typed is not None:
        try:
            read = typed.read(body)
        except msgspec.DecodeError as exc:
            raise ShapeRequestError(200, f"the shape answer is not a JSON array of messages: {exc}") from None
        if read is not None:
            return read
    try:
        messages = _MESSAGES.decode(body)
    except msgspec.DecodeError as exc:
        raise ShapeRequestError(200, f"the shape answer is not a JSON array of messages: {exc}") from None
    return _collect(messages, _plain_value)


def _plain_value(message: Any) -> Mapping[str, Any]:
    return message.value  # type: ignore[no-any-return]


def _collect(
    messages: list[Any], value_of: Callable[[Any], Mapping[str, Any]]
) -> tuple[list[Change], bool, bool, int | None]:
    """One page's changes and control messages, the values built by ``value_of`` (typed or as decoded)."""
    changes: list[Change] = []
    append = changes.append
    up_to_date = refetch = False
    global_lsn: int | None = None
    for message in messages:
        headers = message.headers
        if message.key is not None:
            txids = headers.txids
            append(Change(message.key, headers.operation, value_of(message), tuple(map(int, txids)) if txids else ()))
        elif headers.control == "up-to-date":
            up_to_date = True
            global_lsn = _later(global_lsn, lsn_number(headers.global_last_seen_lsn))
        elif headers.control == "must-refetch":
            refetch = True
    return changes, up_to_date, refetch, global_lsn


def _later(current: int | None, seen: int | None) -> int | None:
    """The later of two WAL positions where either may be unknown."""
    if seen is None:
        return current
    return seen if current is None else max(current, seen)


def lsn_number(value: str | int | None) -> int | None:
    """A WAL position as a number, from Electric's decimal text (``global_last_seen_lsn``), PostgreSQL's ``X/Y``
    text (the write API's ``lsn``) or a number; ``None`` for anything else (an old server sends none)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    high, slash, low = value.strip().partition("/")
    try:
        number = (int(high, 16) << 32) | int(low, 16) if slash else int(high, 10)
    except ValueError:
        return None
    return number if number >= 0 else None


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a ``Retry-After`` header in seconds form (the form Electric and the proxy send)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, min(60.0, float(value)))
    except ValueError:
        return None
