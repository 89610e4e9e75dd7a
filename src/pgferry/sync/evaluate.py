"""Where clauses as SQL that one shape cannot turn against the others.

A where clause is evaluated by PostgreSQL, on the table for a snapshot and on replicated rows for each change.
Two properties keep one client's clause from hurting anyone else:

* **Guards.** The simple comparisons at the top level of an ``AND`` (``"user_id" = $3``, ``status = 'open'``,
  ``id IN (...)``: a column against constants, which cannot fail on any row) are hoisted and evaluated first,
  and the rest of the clause only runs inside ``CASE WHEN <guards> THEN <rest> ELSE false END``. SQL's ``AND``
  promises no evaluation order (the planner orders by cost), ``CASE`` does. The proxy puts the owner predicate
  at the top level, so a client's terms are only ever computed on that client's own rows: a term that fails on
  someone else's row (``1 / ("user_id" = '<me>')::int``) never meets one. The guards are also repeated outside
  the ``CASE``, so an index on the owner column still serves the snapshot.
* **Isolation.** :class:`WhereEvaluator` decides a batch of rows for many shapes in one query; if that query
  fails, each shape is retried alone and only the shapes that fail on their own are reported, so the caller can
  invalidate exactly those (see :meth:`pgferry.sync.shapes.ShapeManager.apply_transactions`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg import sql

from pgferry.sync.errors import is_connection_error
from pgferry.sync.session import connect_sql
from pgferry.sync.where import (
    Between,
    Binary,
    Boolean,
    BoolOp,
    Column,
    InList,
    IsTest,
    Node,
    Null,
    Number,
    Param,
    String,
    WhereClause,
    render_sql,
)

__all__ = ["EvaluatedShape", "Verdicts", "WhereEvaluator", "guarded_where"]

_EVAL_BATCH = 500
_EVAL_SHAPES = 50
EVAL_TIMEOUT_MS = 5_000  # one batch of rows for up to 50 shapes; a single shape gets the same budget alone

RowValues = Mapping[str, str | None]
_CONSTANT = (Param, String, Number, Boolean, Null)
_COMPARISONS = frozenset({"=", "<>", "<", "<=", ">", ">="})


def _is_guard(node: Node) -> bool:
    """A comparison of a column with constants: it cannot fail on any row (the constants are coerced to the
    column's type when the query is planned, so a bad constant fails the whole shape up front, with a 400)."""
    match node:
        case Binary(op=op, left=Column(), right=right) if op in _COMPARISONS:
            return isinstance(right, _CONSTANT)
        case Binary(op=op, left=left, right=Column()) if op in _COMPARISONS:
            return isinstance(left, _CONSTANT)
        case IsTest(arg=Column()):
            return True
        case InList(arg=Column(), items=items):
            return all(isinstance(item, _CONSTANT) for item in items)
        case Between(arg=Column(), low=low, high=high):
            return isinstance(low, _CONSTANT) and isinstance(high, _CONSTANT)
    return False


def guarded_where(
    clause: WhereClause,
    column: Callable[[str], sql.Composable],
    param: Callable[[int], sql.Composable],
) -> sql.Composable:
    """``clause`` as SQL whose non-trivial terms only run on rows that pass its guards (see the module doc).

    ``param`` is called once per ``$n`` occurrence in output order, like :func:`~pgferry.sync.where.render_sql`
    (guards are rendered twice, so their parameters are appended twice).
    """
    node = clause.node
    if not (isinstance(node, BoolOp) and node.op == "AND"):
        return render_sql(clause, column=column, param=param)
    guards = [arg for arg in node.args if _is_guard(arg)]
    rest = [arg for arg in node.args if not _is_guard(arg)]
    if not guards or not rest:
        return render_sql(clause, column=column, param=param)

    def conjunction(nodes: list[Node]) -> sql.Composable:
        target = nodes[0] if len(nodes) == 1 else BoolOp("AND", tuple(nodes))
        return render_sql(target, column=column, param=param)

    first = conjunction(guards)
    inside = conjunction(guards)
    rest_sql = conjunction(rest)
    return sql.SQL("({} AND (CASE WHEN {} THEN {} ELSE false END))").format(first, inside, rest_sql)


class EvaluatedShape(Protocol):
    """What the evaluator needs of a shape (kept structural so this module does not import the registry)."""

    @property
    def handle(self) -> str: ...

    @property
    def clause(self) -> WhereClause | None: ...

    @property
    def params(self) -> Mapping[int, str]: ...

    def column_type(self, name: str) -> str: ...


@dataclass(frozen=True)
class Verdicts:
    """``matches``: handle → one bool per row, for every shape that could be decided. ``failed``: handle → the
    database error its clause raised on these rows (evaluated alone), to be handled as that shape's problem."""

    matches: dict[str, list[bool]]
    failed: dict[str, psycopg.Error]


class WhereEvaluator:
    """Decides, in PostgreSQL, which of a batch of rows satisfy each shape's where clause.

    One per thread (it holds a connection); reconnects lazily after the database went away. Connection errors
    are raised (the caller retries the whole transaction after reconnecting); a statement error is retried
    shape by shape and reported in :attr:`Verdicts.failed`, never raised.
    """

    def __init__(self, url: str, *, timeout_ms: int = EVAL_TIMEOUT_MS) -> None:
        self._url = url
        self._timeout_ms = timeout_ms
        self._conn: psycopg.Connection[Any] | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect_sql(self._url, statement_timeout_ms=self._timeout_ms)
        return self._conn

    def matches(self, shapes: Sequence[EvaluatedShape], rows: Sequence[RowValues]) -> Verdicts:
        """One round trip per batch of shapes and rows, so a commit costs the same whether 1 or 100 filtered
        shapes watch the table; a failing batch is re-run one shape at a time to find the culprit."""
        result: dict[str, list[bool]] = {}
        failed: dict[str, psycopg.Error] = {}
        filtered = []
        for shape in shapes:
            if shape.clause is None:
                result[shape.handle] = [True] * len(rows)
            else:
                result[shape.handle] = []
                filtered.append(shape)
        if not rows:
            return Verdicts(result, failed)
        for first in range(0, len(filtered), _EVAL_SHAPES):
            group = filtered[first : first + _EVAL_SHAPES]
            for start in range(0, len(rows), _EVAL_BATCH):
                batch = rows[start : start + _EVAL_BATCH]
                live = [shape for shape in group if shape.handle not in failed]
                if not live:
                    break
                try:
                    verdicts = self._matches_batch(live, batch)
                except psycopg.Error as exc:
                    if is_connection_error(exc):
                        raise
                    verdicts = []
                    for shape in list(live):
                        try:
                            [column] = self._matches_batch([shape], batch)
                        except psycopg.Error as alone:
                            if is_connection_error(alone):
                                raise
                            failed[shape.handle] = alone
                            live.remove(shape)
                            continue
                        verdicts.append(column)
                for shape, column in zip(live, verdicts, strict=True):
                    result[shape.handle].extend(column)
        for handle in failed:
            result.pop(handle, None)
        return Verdicts(result, failed)

    def _matches_batch(self, shapes: Sequence[EvaluatedShape], rows: Sequence[RowValues]) -> list[list[bool]]:
        columns = sorted(set().union(*(shape.clause.columns for shape in shapes if shape.clause is not None)))
        values: list[Any] = []
        tests = []
        for shape in shapes:
            assert shape.clause is not None
            bound = shape.params

            def param(number: int, bound: Mapping[int, str] = bound) -> sql.Composable:
                values.append(bound[number])
                return sql.Placeholder()

            where = guarded_where(shape.clause, lambda name: sql.SQL("v.") + sql.Identifier(name), param)
            tests.append(sql.SQL("coalesce({}, false)").format(where))
        tuples = []
        reference = shapes[0]
        for index, row in enumerate(rows):
            cells = [sql.SQL("{}::int").format(sql.Literal(index))]
            for name in columns:
                cells.append(sql.SQL("{}::text::" + reference.column_type(name)).format(sql.Placeholder()))
                values.append(row.get(name))
            tuples.append(sql.SQL("(") + sql.SQL(", ").join(cells) + sql.SQL(")"))
        query = sql.SQL("select v.i, {} from (values {}) as v(i, {})").format(
            sql.SQL(", ").join(tests),
            sql.SQL(", ").join(tuples),
            sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        )
        found = {int(row[0]): row[1:] for row in self._connection().execute(query, values).fetchall()}
        return [[bool(found[i][n]) for i in range(len(rows))] for n in range(len(shapes))]
