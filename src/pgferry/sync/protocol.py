"""The ElectricSQL HTTP Shape protocol as types: offsets, shape definitions, messages and headers.

Shared by the dev server, the proxy and (later) the Python shape client, so the wire format is decided in one
place. Everything here is pure: no I/O, no database. Values are PostgreSQL's *text* representation, exactly as
Electric sends them (the client parses them by the types in the ``electric-schema`` header), so encoding a row
is "select every column as ``::text``" on the server side and nothing else; this module only shapes messages.

Wire facts follow ``@electric-sql/client`` (``constants.ts``, ``client.ts``) and Electric's server
(``Electric.Shapes.Api``); see ../shared/facts/electric.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from pgferry.db.quoting import quote_ident
from pgferry.sync.errors import ProtocolError

__all__ = [
    "BEFORE_ALL",
    "LIVE_CACHE_CONTROL",
    "LogOffset",
    "Operation",
    "Replica",
    "ShapeDefinition",
    "TableName",
    "change_message",
    "control_message",
    "encode_messages",
    "parse_offset",
    "parse_table_name",
    "row_key",
]

Operation = Literal["insert", "update", "delete"]
Replica = Literal["default", "full"]

# Header names, exactly as the client reads them.
HANDLE_HEADER: Final = "electric-handle"
OFFSET_HEADER: Final = "electric-offset"
SCHEMA_HEADER: Final = "electric-schema"
CURSOR_HEADER: Final = "electric-cursor"
UP_TO_DATE_HEADER: Final = "electric-up-to-date"
ELECTRIC_HEADERS: Final = (HANDLE_HEADER, OFFSET_HEADER, SCHEMA_HEADER, CURSOR_HEADER, UP_TO_DATE_HEADER)

# Electric's own caching policy: a chunk of a shape log never changes once written, so non-live responses can be
# cached by a CDN; live responses are only fresh for as long as nothing new arrives.
NON_LIVE_CACHE_CONTROL: Final = "public, max-age=604800, s-maxage=3600, stale-while-revalidate=2629746"
LIVE_CACHE_CONTROL: Final = "public, max-age=5, stale-while-revalidate=5"
UP_TO_DATE_CACHE_CONTROL: Final = "public, max-age=60, stale-while-revalidate=300"


@dataclass(frozen=True, slots=True, order=True)
class LogOffset:
    """A position in a shape log: ``<tx>_<op>``.

    ``tx`` is the commit LSN (as an integer) of the transaction a change came from, ``op`` its position in that
    transaction, so offsets sort like the log. The initial snapshot lives before every real LSN at ``0_<row>``.
    ``-1`` (before everything) is :data:`BEFORE_ALL`.
    """

    tx: int
    op: int

    def __str__(self) -> str:
        if self.tx < 0:
            return "-1"
        return f"{self.tx}_{self.op}"


BEFORE_ALL: Final = LogOffset(-1, 0)
_OFFSET_RE = re.compile(r"^(0|[1-9][0-9]{0,19})_(0|[1-9][0-9]{0,19}|inf)$")
_INF_OP = 2**62


def parse_offset(text: str | None) -> LogOffset | Literal["now"]:
    """Parse the ``offset`` query parameter: ``-1``, ``now`` or ``<tx>_<op>`` (``0_inf``: after the snapshot)."""
    if text is None or text == "":
        raise ProtocolError("offset", "offset is required: -1 for a new shape, or the electric-offset you received")
    if text == "-1":
        return BEFORE_ALL
    if text == "now":
        return "now"
    match = _OFFSET_RE.match(text)
    if match is None:
        raise ProtocolError("offset", "has invalid format (expected -1, now, or <tx>_<op> as sent in electric-offset)")
    op = _INF_OP if match[2] == "inf" else int(match[2])
    return LogOffset(int(match[1]), op)


@dataclass(frozen=True, slots=True)
class TableName:
    schema: str
    name: str

    @property
    def qualified(self) -> str:
        """``"schema"."name"``: quoted, as Electric writes the relation in message keys."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


IDENT_PATTERN: Final = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_TABLE_RE = re.compile(rf"^\s*({IDENT_PATTERN})\s*(?:\.\s*({IDENT_PATTERN})\s*)?$")


def unquote_ident(part: str) -> str:
    """PostgreSQL identifier semantics: quoted names are exact, unquoted ones fold to lower case."""
    if part.startswith('"'):
        return part[1:-1].replace('""', '"')
    return part.lower()


def parse_table_name(text: str | None, *, default_schema: str = "public") -> TableName:
    """Parse ``table``: ``tasks``, ``public.tasks``, ``"My Table"``; unquoted names fold to lower case as in SQL."""
    if not text:
        raise ProtocolError("table", "can't be blank (name the table to sync, e.g. table=tasks)")
    if len(text) > 200:
        raise ProtocolError("table", "is too long")
    match = _TABLE_RE.match(text)
    if match is None:
        raise ProtocolError("table", "is not a valid table name (use name or schema.name; quote mixed case)")
    if match[2] is None:
        return TableName(default_schema, unquote_ident(match[1]))
    return TableName(unquote_ident(match[1]), unquote_ident(match[2]))


_COLUMN_RE = re.compile(rf"^\s*({IDENT_PATTERN})\s*$")


def parse_columns(text: str) -> tuple[str, ...]:
    """Parse ``columns=a,b,"C d"`` into column names (unquoted names fold to lower case)."""
    parts: list[str] = []
    for part in split_outside_quotes(text):
        match = _COLUMN_RE.match(part)
        if match is None:
            raise ProtocolError(
                "columns", f"invalid column name {part.strip()[:60]!r} (comma-separated names expected)"
            )
        name = unquote_ident(match[1])
        if name in parts:
            raise ProtocolError("columns", f"column {name!r} is listed twice")
        parts.append(name)
    if not parts:
        raise ProtocolError("columns", "must list at least one column")
    return tuple(parts)


def split_outside_quotes(text: str) -> list[str]:
    """Split on commas outside double quotes (a quoted name may contain a comma)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


@dataclass(frozen=True, slots=True)
class ShapeDefinition:
    """What a shape is: the same definition gets the same shape (and handle) for every client."""

    table: TableName
    where: str | None = None
    params: tuple[tuple[int, str], ...] = ()
    columns: tuple[str, ...] | None = None
    replica: Replica = "default"

    def fingerprint(self) -> str:
        """A stable hash of the definition: the first half of every handle, so equal shapes share logs."""
        payload = json.dumps(
            [self.table.schema, self.table.name, self.where, list(self.params), self.columns, self.replica],
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.table.schema,
            "table": self.table.name,
            "where": self.where,
            "params": [[n, v] for n, v in self.params],
            "columns": list(self.columns) if self.columns is not None else None,
            "replica": self.replica,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShapeDefinition:
        columns = data.get("columns")
        return cls(
            table=TableName(str(data["schema"]), str(data["table"])),
            where=data.get("where"),
            params=tuple((int(n), str(v)) for n, v in data.get("params") or []),
            columns=tuple(str(c) for c in columns) if columns is not None else None,
            replica="full" if data.get("replica") == "full" else "default",
        )


def parse_replica(text: str | None) -> Replica:
    if text is None or text == "default":
        return "default"
    if text == "full":
        return "full"
    raise ProtocolError("replica", "must be one of default, full")


def row_key(table: TableName, pk_values: Sequence[str | None]) -> str:
    """Electric's message key: ``"schema"."table"/"pk1"/"pk2"``, with ``/`` in values doubled.

    Keys must be equal for the same row across the snapshot and the log, and unique per row, which is all the
    clients rely on; the format mirrors ``Electric.Replication.Changes.build_key/3``.
    """
    parts = ['"' + ("_" if value is None else value.replace("/", "//")) + '"' for value in pk_values]
    return table.qualified + "/" + "/".join(parts)


def change_message(
    *,
    key: str,
    operation: Operation,
    value: Mapping[str, str | None],
    relation: TableName,
    offset: LogOffset,
    txid: int | None,
    old_value: Mapping[str, str | None] | None = None,
    last: bool = False,
) -> dict[str, Any]:
    headers: dict[str, Any] = {"operation": operation, "relation": [relation.schema, relation.name]}
    if txid is not None:
        headers["txids"] = [txid]
        headers["lsn"] = str(offset.tx)
        headers["op_position"] = offset.op
    if last:
        headers["last"] = True
    message: dict[str, Any] = {"key": key, "value": dict(value), "headers": headers}
    if old_value is not None:
        message["old_value"] = dict(old_value)
    return message


def control_message(control: str, **extra: Any) -> dict[str, Any]:
    return {"headers": {"control": control, **extra}}


def encode_messages(messages: Iterable[Mapping[str, Any]]) -> bytes:
    """A JSON array, compact: responses are parsed by every client on every poll."""
    return json.dumps(list(messages), separators=(",", ":"), ensure_ascii=False).encode()


def encode_message(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
