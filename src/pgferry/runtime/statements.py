"""Statements sent as one simple-protocol message, and prepared once per server session where that is allowed.

A user's point query and a replayed batch of queued writes have the same shape: some claims, some statements,
one transaction. Sent one statement at a time (or through psycopg's pipeline) the client spends more time than
the server; sent as one message with the values inlined by psycopg's client-side binding, PostgreSQL runs the
whole text as one implicit transaction — ``set_config(…, true)`` lasts until it ends, an error rolls everything
back — in one round trip, and it is right behind a transaction-mode pooler too.

Where the endpoint keeps sessions (direct, Supavisor session mode) statements are prepared with SQL ``PREPARE``
once per session and sent as ``EXECUTE``, which halves what the server spends on a point query. RLS is unaffected:
PostgreSQL's plan cache rewrites a plan again when the role differs from the one RLS was applied for, and
``auth.uid()`` is evaluated at run time.

Owns the message building and the per-session statement names; who the statements run as is
:mod:`pgferry.runtime.scoped`'s and :mod:`pgferry.db.rls`'s business.
"""

from __future__ import annotations

import functools
import itertools
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.abc import Transformer
from psycopg.pq import ExecStatus

from pgferry.db.rls import CLAIMS_SQL

__all__ = [
    "PreparedForm",
    "SessionStatements",
    "claims_statement",
    "inline",
    "inline_literals",
    "literal_arguments",
    "local_settings",
    "new_literals",
    "prepared_form",
    "rows_of_last_result",
    "send_message",
]

_MISSING = object()
_PLACEHOLDER = re.compile(r"%(?:\((?P<name>[^)]+)\))?(?P<kind>.)")
_CLAIMS_PREPARE = "prepare pgferry_claims(text, text, text, text) as " + (CLAIMS_SQL % ("$1", "$2", "$3", "$4"))


@dataclass(frozen=True)
class PreparedForm:
    """A statement with ``$n`` parameters for ``PREPARE``, and the ``EXECUTE`` argument list for its values
    (``arguments`` with psycopg placeholders; ``names`` the parameter of each, ``None`` for positional ones)."""

    body: str
    arguments: str
    names: tuple[str | None, ...] = ()


@functools.lru_cache(maxsize=1024)
def prepared_form(statement: str, named: bool, has_params: bool) -> PreparedForm | None:
    """Rewrite psycopg placeholders (``%s``, ``%(name)s``, ``%%``) as ``$n``; ``None`` for anything else, which
    then runs unprepared rather than guessed at. Without parameters the statement is taken as it is (as psycopg
    does: no parameters, no placeholder processing)."""
    if not has_params:
        return PreparedForm(statement, "")
    numbers: dict[str, int] = {}
    arguments: list[str] = []
    names: list[str | None] = []
    unsupported = False

    def number(match: re.Match[str]) -> str:
        nonlocal unsupported
        kind, name = match.group("kind"), match.group("name")
        if kind == "%" and name is None:
            return "%"
        if kind != "s" or (name is None) == named:
            unsupported = True
            return ""
        key = name if name is not None else str(len(arguments))
        if key not in numbers:
            numbers[key] = len(arguments) + 1
            arguments.append(f"%({name})s" if name is not None else "%s")
            names.append(name)
        return f"${numbers[key]}"

    body = _PLACEHOLDER.sub(number, statement)
    if unsupported:
        return None
    return PreparedForm(body, ", ".join(arguments), tuple(names))


def literal_arguments(form: PreparedForm, params: Mapping[str, Any] | Sequence[Any], literals: Transformer) -> str:
    """The ``EXECUTE`` argument list of ``form`` with ``params`` as SQL literals, quoted as psycopg's client-side
    binding quotes them, without a connection (so it can be built on another thread while one is busy)."""
    if isinstance(params, Mapping):
        missing = [name for name in form.names if name is not None and name not in params]
        if missing:
            raise psycopg.ProgrammingError(f"query parameter missing: {', '.join(missing)}")
        values = [params[name] for name in form.names if name is not None]
    else:
        values = list(params)
    if len(values) != len(form.names):
        raise psycopg.ProgrammingError(f"the query has {len(form.names)} placeholders but {len(values)} parameters")
    return ", ".join(literals.as_literal(value).decode() for value in values)


def new_literals() -> Transformer:
    """A connection-free literal renderer for :func:`literal_arguments` and :func:`inline_literals`; one per
    thread (it caches adapters as it goes)."""
    from psycopg.adapt import Transformer as DefaultTransformer

    transformer: Transformer = DefaultTransformer()
    return transformer


def inline_literals(statement: str, params: Mapping[str, Any] | Sequence[Any] | None, literals: Transformer) -> str:
    """``statement`` with ``params`` bound client-side as literals, without a connection; as it is without any."""
    if not params:
        return statement
    positional = iter(params) if not isinstance(params, Mapping) else None

    def literal(match: re.Match[str]) -> str:
        kind, name = match.group("kind"), match.group("name")
        if kind == "%" and name is None:
            return "%"
        if kind != "s":
            raise psycopg.ProgrammingError(f"only %s and %(name)s placeholders are supported, not {match.group(0)!r}")
        if name is not None:
            if not isinstance(params, Mapping):
                raise psycopg.ProgrammingError("named placeholders need a mapping of parameters")
            if name not in params:
                raise psycopg.ProgrammingError(f"query parameter missing: {name}")
            value = params[name]
        else:
            value = next(positional, _MISSING) if positional is not None else _MISSING
            if value is _MISSING:
                raise psycopg.ProgrammingError("the query has more placeholders than parameters, or needs a sequence")
        return literals.as_literal(value).decode()

    return _PLACEHOLDER.sub(literal, statement)


class SessionStatements:
    """The statements prepared on one server session, by text; bounded, so a service that builds many distinct
    statements does not grow a session's memory without end. Preparing is its own round trip, once per
    statement and session: an error in it (a typo in the statement) is raised before anything is recorded."""

    LIMIT = 200

    def __init__(self) -> None:
        self.names: OrderedDict[str, str] = OrderedDict()
        self.claims_prepared = False

    def execute_text(self, conn: psycopg.Connection[Any], form: PreparedForm, arguments: str | None = None) -> str:
        """``EXECUTE`` of ``form`` (with ``arguments``, or its placeholders), preparing it, and the claims
        statement, on this session first if needed."""
        self.prepare_claims(conn)
        name = self.name_of(conn, form)
        arguments = form.arguments if arguments is None else arguments
        return f"execute {name}({arguments})" if form.names else f"execute {name}"

    def name_of(self, conn: psycopg.Connection[Any], form: PreparedForm) -> str:
        name = self.names.get(form.body)
        if name is None:
            name = f"pgferry_q{next(_statement_numbers)}"
            conn.execute(sql.SQL("prepare {} as ").format(sql.Identifier(name)) + sql.SQL(form.body))
            self.names[form.body] = name
            if len(self.names) > self.LIMIT:
                _, evicted = self.names.popitem(last=False)
                conn.execute(sql.SQL("deallocate {}").format(sql.Identifier(evicted)))
        else:
            self.names.move_to_end(form.body)
        return name

    def prepare_claims(self, conn: psycopg.Connection[Any]) -> None:
        if not self.claims_prepared:
            conn.execute(_CLAIMS_PREPARE)
            self.claims_prepared = True

    def forget_all(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("deallocate all")
        self.names.clear()
        self.claims_prepared = False


_statement_numbers = itertools.count(1)
_sessions: weakref.WeakKeyDictionary[psycopg.Connection[Any], SessionStatements] = weakref.WeakKeyDictionary()
_sessions_lock = threading.Lock()


def session_statements(conn: psycopg.Connection[Any]) -> SessionStatements:
    statements = _sessions.get(conn)
    if statements is None:
        with _sessions_lock:
            statements = _sessions.setdefault(conn, SessionStatements())
    return statements


@functools.lru_cache(maxsize=4096)
def claims_statement(parameters: tuple[str, str, str, str], prepared: bool) -> str:
    """The claims statement with its values as literals (``EXECUTE pgferry_claims(…)`` when ``prepared``), rendered
    once per distinct set of claims: the same users come back again and again. The literals are standard SQL
    strings (``standard_conforming_strings`` is on in every supported server), so no connection is needed."""
    literals = [sql.Literal(value) for value in parameters]
    template = "execute pgferry_claims({}, {}, {}, {})" if prepared else CLAIMS_SQL.replace("%s", "{}")
    return sql.SQL(template).format(*literals).as_string(None)


def local_settings(settings: Mapping[str, str]) -> tuple[str, list[str]]:
    """``settings`` as one statement setting each for the current transaction only (``set_config(…, true)``),
    and its parameters."""
    calls, params = local_setting_calls(settings)
    return f"select {calls}", params


def local_setting_calls(settings: Mapping[str, str]) -> tuple[str, list[str]]:
    """The ``set_config(…, true)`` calls of :func:`local_settings` (comma-separated, to add to a select list) and
    their parameters."""
    calls = ", ".join("pg_catalog.set_config(%s, %s, true)" for _ in settings)
    return calls, [x for item in settings.items() for x in item]


def inline(cursor: psycopg.ClientCursor[Any], statement: str, params: Sequence[Any] | Mapping[str, Any] | None) -> str:
    """``statement`` with ``params`` bound client-side (psycopg's quoting); as it is when there are none."""
    return statement if params is None else cursor.mogrify(statement, params)


def send_message(
    conn: psycopg.Connection[Any], render: Callable[[SessionStatements | None], str], *, prepare: bool
) -> psycopg.ClientCursor[Any]:
    """Send the text ``render`` builds as one simple-protocol message; with ``prepare``, ``render`` is given the
    session's statements and may use ``EXECUTE``. When the session lost its prepared statements (someone ran
    ``DEALLOCATE``/``DISCARD``) or a table changed under a prepared plan ("cached plan must not change result
    type"), they are prepared again and the message is sent once more — it was rolled back as a whole."""
    cursor = psycopg.ClientCursor(conn)
    if not prepare:
        cursor.execute(render(None))
        return cursor
    statements = session_statements(conn)
    try:
        cursor.execute(render(statements))
    except (psycopg.errors.InvalidSqlStatementName, psycopg.errors.FeatureNotSupported) as exc:
        if isinstance(exc, psycopg.errors.FeatureNotSupported) and "cached plan" not in str(exc):
            raise
        statements.forget_all(conn)
        cursor.execute(render(statements))
    return cursor


def rows_of_last_result(cursor: psycopg.ClientCursor[Any]) -> list[tuple[Any, ...]]:
    """The rows of the message's last statement (``[]`` when it returns none)."""
    while cursor.nextset():
        pass
    result = cursor.pgresult
    # Not ``cursor.description``: it builds a Column object per column on every call, a visible share of a
    # point query's client time.
    return cursor.fetchall() if result is not None and result.status == ExecStatus.TUPLES_OK else []
