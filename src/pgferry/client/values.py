"""PostgreSQL text values (as the Shape API sends them) to Python and back, by the shape's schema entry.

The replica stores every value exactly as the server sent it (PostgreSQL's text form), so nothing is lost or
rounded in storage; this module gives typed reads (``uuid.UUID``, ``dict``/``list`` for JSON, ``datetime`` for
timestamps, ``list`` for arrays and pgvector vectors, ``Decimal`` for numeric) and turns Python values into the
same text form for optimistic local writes, so a row written locally reads back as it will after syncing.
``parse(to_text(v)) == v`` for every supported type. Types it does not know stay text.

Pure. Owns the value mapping; must not touch storage or HTTP.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import uuid
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["parse_array", "parse_value", "to_json_value", "to_text"]

_INTS: Final = frozenset({"int2", "int4", "int8", "oid"})
_FLOATS: Final = frozenset({"float4", "float8"})
_SPECIAL_FLOATS: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def parse_value(text: str | None, entry: Mapping[str, Any]) -> Any:
    """``text`` (PostgreSQL's text form, ``None`` for NULL) as a Python value for a column described by ``entry``
    (an ``electric-schema`` entry: ``{"type": "int4", "dims": 1, ...}``)."""
    if text is None:
        return None
    type_name = str(entry.get("type", "text"))
    if entry.get("dims"):
        return parse_array(
            text, lambda element: _scalar(element, type_name), delimiter=";" if type_name == "box" else ","
        )
    return _scalar(text, type_name)


def _scalar(text: str | None, type_name: str) -> Any:
    if text is None:
        return None
    if type_name in _INTS:
        return int(text)
    if type_name in _FLOATS:
        return _SPECIAL_FLOATS.get(text) if text in _SPECIAL_FLOATS else float(text)
    if type_name == "numeric":
        return decimal.Decimal(text)
    if type_name == "bool":
        return text == "t"
    if type_name == "uuid":
        return uuid.UUID(text)
    if type_name in ("json", "jsonb"):
        return json.loads(text)
    if type_name == "vector":
        return [float(x) for x in text.strip("[]").split(",")] if text.strip("[]") else []
    try:
        if type_name == "timestamptz" or type_name == "timestamp":
            return dt.datetime.fromisoformat(text)
        if type_name == "date":
            return dt.date.fromisoformat(text)
    except ValueError:
        return text  # infinity, BC dates, years past 9999: kept as PostgreSQL wrote them
    return text


def parse_array(text: str, element: Any, delimiter: str = ",") -> list[Any]:
    """A PostgreSQL array literal (``{a,"b c",NULL,{1,2}}``) as nested lists, each element through ``element``."""
    position = 0
    if text.startswith("["):  # explicit bounds: [1:2]={...}
        position = text.index("=") + 1

    def parse_list() -> list[Any]:
        nonlocal position
        assert text[position] == "{"
        position += 1
        items: list[Any] = []
        if text[position] == "}":
            position += 1
            return items
        while True:
            if text[position] == "{":
                items.append(parse_list())
            elif text[position] == '"':
                position += 1
                chars: list[str] = []
                while text[position] != '"':
                    if text[position] == "\\":
                        position += 1
                    chars.append(text[position])
                    position += 1
                position += 1
                items.append(element("".join(chars)))
            else:
                end = position
                while text[end] not in (delimiter, "}"):
                    end += 1
                raw = text[position:end].strip()
                position = end
                items.append(None if raw == "NULL" else element(raw))
            if text[position] == "}":
                position += 1
                return items
            position += 1  # the delimiter

    return parse_list()


def to_text(value: Any, entry: Mapping[str, Any]) -> str | None:
    """A Python value as PostgreSQL's text form for the column ``entry`` describes (what the server would send)."""
    if value is None:
        return None
    type_name = str(entry.get("type", "text"))
    if entry.get("dims"):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"a {type_name}[] column needs a list, not {type(value).__name__}")
        return _array_text(value, type_name)
    return _scalar_text(value, type_name)


def _array_text(values: Any, type_name: str) -> str:
    parts = []
    for item in values:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, (list, tuple)) and type_name not in ("json", "jsonb"):
            parts.append(_array_text(item, type_name))
        else:
            text = _scalar_text(item, type_name)
            needs_quotes = text == "" or text.upper() == "NULL" or any(c in text for c in '{},"\\ \t\n')
            parts.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"' if needs_quotes else text)
    return "{" + ",".join(parts) + "}"


def _scalar_text(value: Any, type_name: str) -> str:
    if type_name in ("json", "jsonb"):
        return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)
    if type_name == "bool":
        return "t" if value else "f"
    if type_name == "vector":
        return "[" + ",".join(_float_text(float(x)) for x in value) + "]"
    if type_name in _FLOATS:
        return _float_text(float(value))
    if isinstance(value, dt.datetime):
        if type_name == "timestamptz" and value.tzinfo is not None:
            utc: dt.datetime = value.astimezone(dt.UTC)
            return utc.replace(tzinfo=None).isoformat(sep=" ") + "+00"
        return value.isoformat(sep=" ")
    if isinstance(value, (dt.date, uuid.UUID, decimal.Decimal)):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _float_text(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def to_json_value(value: Any, entry: Mapping[str, Any]) -> Any:
    """A Python value as the write API's JSON for its column (what ``POST /v1/mutations`` expects)."""
    if value is None:
        return None
    type_name = str(entry.get("type", "text"))
    if entry.get("dims"):
        return [to_json_value(item, {"type": type_name}) for item in value]
    if type_name in ("json", "jsonb") or isinstance(value, (bool, int, float, str)):
        return value
    if type_name == "vector":
        return [float(x) for x in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value) if type_name != "numeric" else str(value)
    return str(value)
