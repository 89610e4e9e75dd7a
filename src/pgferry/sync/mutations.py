"""The write API's request body, checked: mutations parsed from JSON and their values checked against the table.

A body is ``{"mutations": [{"id": "<uuid>", "op": "insert"|"update"|"delete", "table": "public.tasks",
"row": {...}, "base": {...}?, "written_at": <ms since epoch>?}]}``. Everything a client can get wrong without the
database's help is found here, for every mutation of the batch at once, each problem naming its field
(``mutations[2].row.priority``): unknown table or column, a value of the wrong JSON type for its column, a missing
key. Values are converted to PostgreSQL's text form (arrays to lists of text) so the writer binds them all the
same way, cast to the column's type in SQL; what only PostgreSQL can judge (an enum label, a check constraint,
RLS) is the writer's to report.

Pure: no I/O. Owns the wire format of mutations and value conversion; must not build SQL or touch a connection.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pgferry.sync.errors import MutationRejectedError
from pgferry.sync.protocol import TableName, parse_table_name

__all__ = [
    "MAX_MUTATIONS",
    "Column",
    "Mutation",
    "MutationOp",
    "WriteTable",
    "key_text",
    "parse_mutations",
    "to_pg_text",
]

MutationOp = Literal["insert", "update", "delete"]
_OPS: Final = ("insert", "update", "delete")
_FIELDS: Final = frozenset({"id", "op", "table", "row", "base", "written_at"})

#: Mutations one request may carry; more is a 413 (send several batches: the outbox does).
MAX_MUTATIONS: Final = 5000

_INT_RANGES: Final = {
    "smallint": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "bigint": (-(2**63), 2**63 - 1),
}
_FLOATS: Final = frozenset({"real", "double precision"})
_TIMES: Final = frozenset(
    {
        "timestamp with time zone",
        "timestamp without time zone",
        "date",
        "time without time zone",
        "time with time zone",
    }
)
_VECTOR_RE: Final = re.compile(r"^(?:\w+\.)?vector(?:\((\d+)\))?$")
_NUMERIC_RE: Final = re.compile(r"^(?:numeric|decimal)(?:\(.*\))?$")
_LOWER_UUID_RE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_CANONICAL_UUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
#: A row's column plan (see ``_planned_values``): per column, its string kind and SQL type; cached per batch by the
#: table and the column names in the row's order.
_PlanKey = tuple[int, tuple[str, ...]]
_Plan = tuple[tuple[str | None, str], ...]


@dataclass(frozen=True, slots=True)
class Column:
    """A writable column as the catalog describes it: ``sql_type`` is ``format_type()`` (qualified when not on
    the search path, so it can be used as a cast); ``writable`` is false for generated and identity-always
    columns."""

    name: str
    sql_type: str
    not_null: bool = False
    has_default: bool = False
    writable: bool = True


@dataclass(frozen=True, slots=True)
class WriteTable:
    """A table the write API accepts mutations for: its columns in order, its primary key and owner column."""

    name: TableName
    columns: Mapping[str, Column]
    primary_key: tuple[str, ...]
    owner_column: str | None = "user_id"


@dataclass(slots=True)
class Mutation:
    """One checked mutation. ``ident`` is its id in canonical text form (lower case, hyphenated: how PostgreSQL
    prints a uuid, so stored and sent ids compare as strings); ``values`` are the row's columns in PostgreSQL
    text form (``None`` is SQL NULL, a list is an array of text); ``key`` the primary key values (text); ``base``
    the row as the client last saw it (for conflict resolution), in the same form; ``written_at`` the client's
    write time in ms (or None). Not changed once parsed; not a frozen dataclass only because a frozen one's
    ``__init__`` costs five times as much, and a batch builds thousands."""

    index: int
    ident: str
    op: MutationOp
    table: WriteTable
    values: Mapping[str, str | list[str | None] | None]
    key: tuple[str, ...]
    base: Mapping[str, str | list[str | None] | None] | None = None
    written_at: int | None = None
    raw_row: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def id(self) -> uuid.UUID:
        """The id as a UUID (for the conflict policies). Built on demand: the batch's hot path works on ``ident``,
        and constructing thousands of UUIDs (then printing them again) was a visible part of a batch's CPU."""
        return uuid.UUID(self.ident)

    def where(self, name: str) -> str:
        """The field path of ``name`` in the request body, for error messages."""
        return f"mutations[{self.index}].{name}"


def parse_mutations(
    body: Any, tables: Mapping[TableName, WriteTable]
) -> tuple[list[Mutation], list[MutationRejectedError]]:
    """The batch's mutations, and every problem found in it (the batch is refused when there is any).

    A body that is not ``{"mutations": [...]}`` is a single problem for the field ``mutations``."""
    if not isinstance(body, dict) or not isinstance(body.get("mutations"), list):
        return [], [MutationRejectedError(None, "mutations", 'the body must be {"mutations": [...]}')]
    raw = body["mutations"]
    if not raw:
        return [], [MutationRejectedError(None, "mutations", "must hold at least one mutation")]
    if len(raw) > MAX_MUTATIONS:
        problem = f"holds {len(raw)} mutations; send at most {MAX_MUTATIONS} per request"
        return [], [MutationRejectedError(None, "mutations", problem, status=413)]
    mutations: list[Mutation] = []
    problems: list[MutationRejectedError] = []
    seen: dict[str, int] = {}
    names: dict[str, WriteTable] = {}  # the batch's table names as sent, parsed once each
    plans: dict[_PlanKey, _Plan | None] = {}  # see _row_plan
    for index, item in enumerate(raw):
        try:
            mutation = _parse_one(index, item, tables, names, plans)
        except MutationRejectedError as exc:
            problems.append(exc)
            continue
        if mutation.ident in seen:
            problems.append(
                MutationRejectedError(
                    mutation.ident, f"mutations[{index}].id", f"repeats the id of mutations[{seen[mutation.ident]}]"
                )
            )
            continue
        seen[mutation.ident] = index
        mutations.append(mutation)
    return mutations, problems


def _parse_one(
    index: int,
    item: Any,
    tables: Mapping[TableName, WriteTable],
    names: dict[str, WriteTable] | None = None,
    plans: dict[_PlanKey, _Plan | None] | None = None,
) -> Mutation:
    at = f"mutations[{index}]"
    if not isinstance(item, dict):
        raise MutationRejectedError(None, at, "must be an object with id, op, table and row")
    ident = _mutation_id(item.get("id"), at)
    if not _FIELDS.issuperset(item):
        unknown = sorted(item.keys() - _FIELDS)
        raise MutationRejectedError(ident, f"{at}.{unknown[0]}", "is not a mutation field")
    op = item.get("op")
    if op not in _OPS:
        raise MutationRejectedError(ident, f"{at}.op", "must be insert, update or delete")
    sent = item.get("table")
    table = names.get(sent) if names is not None and isinstance(sent, str) else None
    if table is None:
        table = _table(sent, tables, ident, at)
        if names is not None and isinstance(sent, str):
            names[sent] = table
    row = item.get("row")
    if not isinstance(row, dict):
        raise MutationRejectedError(ident, f"{at}.row", "must be an object of column values")
    values = _planned_values(row, table, ident, at, plans)
    if values is None:
        values = _values(row, table, ident, f"{at}.row", op=op)
    key = _key(values, table, ident, at, op=op)
    base_raw = item.get("base")
    base = None
    if base_raw is not None:
        if not isinstance(base_raw, dict):
            raise MutationRejectedError(ident, f"{at}.base", "must be an object of column values, or absent")
        base = _values(base_raw, table, ident, f"{at}.base", op="base")
    written_at = item.get("written_at")
    if written_at is not None and (
        isinstance(written_at, bool) or not isinstance(written_at, int) or not 0 <= written_at < 2**53
    ):
        raise MutationRejectedError(ident, f"{at}.written_at", "must be the client's write time in ms since 1970")
    return Mutation(index, ident, op, table, values, key, base, written_at, row)


def _mutation_id(value: Any, at: str) -> str:
    """The id's canonical text: as sent when it already is (the usual case, checked by pattern), else as
    :class:`uuid.UUID` prints it."""
    if isinstance(value, str):
        if _LOWER_UUID_RE.match(value) is not None:
            return value
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise MutationRejectedError(None, f"{at}.id", "must be a UUID the client chose for this mutation")


def _planned_values(
    row: dict[str, Any], table: WriteTable, ident: str, at: str, plans: dict[_PlanKey, _Plan | None] | None
) -> dict[str, Any] | None:
    """A row's values as :func:`_values` converts them, with the columns looked up once per table and column set
    (an outbox sends thousands of rows naming the same columns): a string valid as sent for its column (text
    without NUL, a canonical UUID) is kept without a call, anything else goes through :func:`to_pg_text`, which
    names the field at fault. The row dict itself is returned when nothing needed converting. ``None`` when a
    name is not a writable column: :func:`_values` then reports it."""
    if plans is None:
        return None
    names = tuple(row)
    plan_key = (id(table), names)
    try:
        plan = plans[plan_key]
    except KeyError:
        plan = plans[plan_key] = _row_plan(table, names)
    if plan is None:
        return None
    values = row
    for (kind, sql_type), name, value in zip(plan, names, row.values(), strict=True):
        if type(value) is str and (
            (kind == _TEXT and "\x00" not in value) or (kind == _UUID and _CANONICAL_UUID_RE.match(value) is not None)
        ):
            continue
        if values is row:
            values = dict(row)
        values[name] = to_pg_text(value, sql_type, ident, f"{at}.row.{name}")
    return values


def _row_plan(table: WriteTable, names: tuple[str, ...]) -> _Plan | None:
    """Each named column's string kind (:func:`_string_kind`) and type, or ``None`` when a name is not a writable
    column of ``table``."""
    plan: list[tuple[str | None, str]] = []
    for name in names:
        column = table.columns.get(name)
        if column is None or not column.writable:
            return None
        plan.append((_string_kind(column.sql_type), column.sql_type))
    return tuple(plan)


def _table(value: Any, tables: Mapping[TableName, WriteTable], ident: str, at: str) -> WriteTable:
    if not isinstance(value, str):
        raise MutationRejectedError(ident, f"{at}.table", "must be a table name like public.tasks")
    try:
        name = parse_table_name(value)
    except Exception:
        raise MutationRejectedError(ident, f"{at}.table", "must be a table name like public.tasks") from None
    table = tables.get(name)
    if table is None:
        raise MutationRejectedError(ident, f"{at}.table", f"{name} does not accept writes", status=403)
    return table


def _values(
    row: Mapping[str, Any], table: WriteTable, ident: str, at: str, *, op: str
) -> dict[str, str | list[str | None] | None]:
    values: dict[str, str | list[str | None] | None] = {}
    columns = table.columns
    for name, value in row.items():
        column = columns.get(name)
        if column is None:
            raise MutationRejectedError(ident, f"{at}.{name}", f"{table.name} has no such column")
        if not column.writable and op != "base":
            raise MutationRejectedError(ident, f"{at}.{name}", "is generated by the database and cannot be written")
        if type(value) is str:
            # The common case, a string for a text or uuid column, checked here as to_pg_text would (anything
            # else, or a string that fails the check, takes the full path, which names the problem).
            kind = _string_kind(column.sql_type)
            if (kind == _TEXT and "\x00" not in value) or (
                kind == _UUID and _CANONICAL_UUID_RE.match(value) is not None
            ):
                values[name] = value
                continue
        values[name] = to_pg_text(value, column.sql_type, ident, f"{at}.{name}")
    return values


_TEXT: Final = "text"
_UUID: Final = "uuid"


@functools.lru_cache(maxsize=256)
def _string_kind(sql_type: str) -> str | None:
    """How :func:`_scalar_text` treats a JSON string for ``sql_type``: kept after a NUL check (``_TEXT``), kept
    when it is a canonical UUID (``_UUID``), or anything else (``None``: the full conversion). Once per type, not
    once per value: a batch of thousands of rows spent most of its parsing in the type tests."""
    if sql_type.endswith("[]") or sql_type in ("json", "jsonb", "boolean") or sql_type in _INT_RANGES:
        return None
    if sql_type in _FLOATS or _is_numeric(sql_type) or _vector_type(sql_type) is not None or sql_type in _TIMES:
        return None
    return _UUID if sql_type == "uuid" else _TEXT


def _key(
    values: Mapping[str, str | list[str | None] | None], table: WriteTable, ident: str, at: str, *, op: str
) -> tuple[str, ...]:
    key: list[str] = []
    for name in table.primary_key:
        value = values.get(name)
        if value is None or isinstance(value, list):
            if op == "insert" and table.columns[name].has_default:
                return ()  # the database chooses the key
            raise MutationRejectedError(ident, f"{at}.row.{name}", f"is the primary key and is required for {op}")
        key.append(value)
    return tuple(key)


def to_pg_text(value: Any, sql_type: str, ident: str | None, at: str) -> str | list[str | None] | None:
    """``value`` (JSON) as PostgreSQL text for a column of ``sql_type``; :class:`MutationRejectedError` naming
    ``at`` when it cannot be one. Types this function does not know are passed as text for PostgreSQL to judge."""
    if value is None:
        return None
    if sql_type.endswith("[]"):
        if not isinstance(value, list):
            raise MutationRejectedError(ident, at, f"must be a JSON array ({sql_type})")
        element_type = sql_type[:-2]
        elements: list[str | None] = []
        for position, element in enumerate(value):
            converted = to_pg_text(element, element_type, ident, f"{at}[{position}]")
            if isinstance(converted, list):
                raise MutationRejectedError(ident, f"{at}[{position}]", "nested arrays are not supported")
            elements.append(converted)
        return elements
    return _scalar_text(value, sql_type, ident, at)


def _scalar_text(value: Any, sql_type: str, ident: str | None, at: str) -> str:
    def wrong(expected: str) -> MutationRejectedError:
        return MutationRejectedError(ident, at, f"must be {expected} ({sql_type}), not {_json_kind(value)}")

    if sql_type in ("json", "jsonb"):
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    if sql_type == "boolean":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return "true" if value else "false"
    if sql_type in _INT_RANGES:
        low, high = _INT_RANGES[sql_type]
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        if not low <= value <= high:
            raise MutationRejectedError(ident, at, f"is out of range for {sql_type}")
        return str(value)
    if sql_type in _FLOATS or _is_numeric(sql_type):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise wrong("a finite number")
        return repr(value) if isinstance(value, float) else str(value)
    vector = _vector_type(sql_type)
    if vector is not None:
        return _vector_text(value, vector[0], sql_type, ident, at)
    if not isinstance(value, str):
        raise wrong("a string")
    if sql_type == "uuid":
        if _CANONICAL_UUID_RE.match(value) is None:  # the usual form checked by pattern, others by uuid.UUID
            try:
                uuid.UUID(value)
            except ValueError:
                raise wrong("a UUID") from None
    elif sql_type in _TIMES:
        _check_time(value, sql_type, ident, at)
    elif "\x00" in value:
        raise MutationRejectedError(ident, at, "must not contain a NUL character")
    return value


# The type tests by pattern, once per type rather than once per value (a batch converts thousands of values).
@functools.lru_cache(maxsize=256)
def _is_numeric(sql_type: str) -> bool:
    return _NUMERIC_RE.match(sql_type) is not None


@functools.lru_cache(maxsize=256)
def _vector_type(sql_type: str) -> tuple[str | None] | None:
    """``(dimensions or None,)`` for a pgvector type, else ``None``."""
    match = _VECTOR_RE.match(sql_type)
    return (match.group(1),) if match is not None else None


def _vector_text(value: Any, dimensions: str | None, sql_type: str, ident: str | None, at: str) -> str:
    if not isinstance(value, list) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value
    ):
        raise MutationRejectedError(ident, at, f"must be an array of finite numbers ({sql_type})")
    if dimensions is not None and len(value) != int(dimensions):
        raise MutationRejectedError(ident, at, f"must have {dimensions} dimensions, not {len(value)}")
    return "[" + ",".join(repr(float(x)) for x in value) + "]"


def _check_time(value: str, sql_type: str, ident: str | None, at: str) -> None:
    try:
        if sql_type == "date":
            dt.date.fromisoformat(value)
        elif sql_type.startswith("time "):
            dt.time.fromisoformat(value)
        else:
            dt.datetime.fromisoformat(value.replace(" ", "T", 1))
    except ValueError:
        raise MutationRejectedError(ident, at, f"must be an ISO 8601 {sql_type} like 2026-11-30T10:00:00Z") from None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def key_text(values: Sequence[str]) -> str:
    """A primary key as one string (for conflict records and logs): the values joined with ``/``."""
    return "/".join(v.replace("/", "//") for v in values)
