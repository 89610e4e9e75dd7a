"""Supabase Realtime's ``postgres_changes`` filter grammar: parsed here, rendered as parameterised SQL.

Owns the grammar only: ``column=op.value`` segments joined by commas (all must hold), ``op`` one of ``eq``,
``neq``, ``lt``, ``lte``, ``gt``, ``gte``, ``in`` (``in.(a,b,"c,d")``, at most 100 values), values raw or
double-quoted with backslash escapes, exactly as Realtime's ``subscriptions.ex`` splits them. Whether a column
exists, the role may read it and each value casts to its type is checked against the database at subscribe time
(:mod:`pgferry.realtime.authorize`); values never reach SQL text, only parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from psycopg import sql

from pgferry.errors import PgferryError

__all__ = ["OPERATORS", "Filter", "FilterError", "parse_filter", "render_filters"]

OPERATORS: Final = {"eq": "=", "neq": "<>", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
MAX_IN_VALUES: Final = 100
_MAX_FILTER_LENGTH: Final = 4096


class FilterError(PgferryError):
    """A binding's ``filter`` that Realtime would refuse; the text is what the client is told (one line)."""


@dataclass(frozen=True, slots=True)
class Filter:
    """One ``column=op.value`` segment; ``values`` holds one value, or the list of an ``in``."""

    column: str
    op: str
    values: tuple[str, ...]


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside parentheses and double quotes (Realtime's ``split_top_level``)."""
    parts: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    current: list[str] = []
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
        elif not quoted and depth == 0 and char == separator:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if quoted or depth != 0:
        raise FilterError("unbalanced quotes or parentheses")
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        out: list[str] = []
        escaped = False
        for char in value[1:-1]:
            if escaped:
                out.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            else:
                out.append(char)
        return "".join(out)
    return value


def parse_filter(text: str) -> tuple[Filter, ...]:
    """The filter's segments; :class:`FilterError` saying what is wrong (prefixed by the caller with Realtime's
    ``Error parsing `filter` params:``)."""
    if len(text) > _MAX_FILTER_LENGTH:
        raise FilterError(f"filter longer than {_MAX_FILTER_LENGTH} characters")
    filters = []
    for segment in _split_top_level(text, ","):
        column, equals, rest = segment.partition("=")
        column = column.strip()
        if not equals or not column:
            raise FilterError(f"{segment!r} is not column=operator.value")
        op, dot, value = rest.partition(".")
        if not dot:
            raise FilterError(f"{segment!r} is not column=operator.value")
        if op == "in":
            if not (value.startswith("(") and value.endswith(")")):
                raise FilterError(f"`in` takes a list in parentheses, like {column}=in.(a,b,c)")
            inner = value[1:-1]
            items = [] if not inner.strip() else [_unquote(item.strip()) for item in _split_top_level(inner, ",")]
            if not items:
                raise FilterError("`in` filter needs at least one value")
            if len(items) > MAX_IN_VALUES:
                raise FilterError(f"too many values for `in` filter. Maximum {MAX_IN_VALUES}")
            filters.append(Filter(column, op, tuple(items)))
        elif op in OPERATORS:
            filters.append(Filter(column, op, (_unquote(value),)))
        else:
            raise FilterError(f"operator {op!r} is not one of {', '.join([*OPERATORS, 'in'])}")
    return tuple(filters)


def render_filters(
    filters: tuple[Filter, ...],
    column: Callable[[str], sql.Composable],
    type_of: Callable[[str], str],
    params: list[object],
) -> sql.Composable:
    """``filters`` as one SQL boolean (``true`` when empty) over ``column(name)``, each value a parameter cast
    to its column's type (``type_of``: ``format_type`` text); appends the values to ``params``."""
    if not filters:
        return sql.SQL("true")
    terms = []
    for item in filters:
        target = sql.SQL(type_of(item.column))
        if item.op == "in":
            params.append(list(item.values))
            terms.append(sql.SQL("{} = any(%s::text[]::{}[])").format(column(item.column), target))
        else:
            params.append(item.values[0])
            terms.append(sql.SQL("{} " + OPERATORS[item.op] + " %s::text::{}").format(column(item.column), target))
    return sql.SQL("(") + sql.SQL(" and ").join(terms) + sql.SQL(")")
