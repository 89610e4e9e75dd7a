"""RLS-scoped transactions on pooled connections: backend code runs as the user whose token it verified.

PostgREST turns a request into a role per transaction (``SET LOCAL ROLE authenticated`` and
``request.jwt.claims``); doing the same here means the database's policies, not the service's own WHERE clauses,
decide what a user sees, so a bug in a query cannot leak another tenant's rows. Everything is transaction-local,
which is also what Supavisor's transaction mode (and PgBouncer's) requires: nothing of one user survives on a
pooled connection into the next checkout.

Only :class:`~pgferry.sync.auth.AuthenticatedUser` values, which only ``TokenVerifier`` produces and only for
``role = authenticated`` tokens, become user transactions. The service role has its own entry point,
:func:`service_role_transaction`, that takes no token at all: a client can never reach it.

Owns the transaction scoping only; the claims statement is :mod:`pgferry.db.rls`'s, verification is
:mod:`pgferry.sync.auth`'s.
"""

from __future__ import annotations

import functools
import itertools
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.pq import ExecStatus, TransactionStatus

from pgferry.db.rls import (
    CLAIMS_SQL,
    ClaimsError,
    claims_parameters,
    scoped_transaction,
    service_role_claims,
)
from pgferry.runtime.errors import ServiceRoleRefusedError
from pgferry.sync.auth import USER_ROLE, AuthenticatedUser

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool, ConnectionPool
    from sqlalchemy.orm import Session

__all__ = [
    "apply_user_to_session",
    "auser_transaction",
    "query_as_user",
    "service_role_transaction",
    "user_claims_of",
    "user_transaction",
]


def user_claims_of(user: AuthenticatedUser) -> Mapping[str, Any]:
    """The verified claims of ``user``; :class:`ServiceRoleRefusedError` for anything that is not a verified user."""
    if not isinstance(user, AuthenticatedUser):
        raise ServiceRoleRefusedError(
            "a user transaction needs an AuthenticatedUser from TokenVerifier.verify(); verify the token first"
        )
    if user.claims.get("role") != USER_ROLE:  # the verifier guarantees it; refuse loudly if it ever did not
        raise ServiceRoleRefusedError(
            f"claims with role {user.claims.get('role')!r} cannot run as a user; use service_role_transaction() "
            "in server code"
        )
    return user.claims


@contextmanager
def user_transaction(pool: ConnectionPool[Any], user: AuthenticatedUser) -> Iterator[psycopg.Connection[Any]]:
    """A pooled connection inside a transaction that runs as ``user``: RLS applies to every statement.

    Commits when the block ends, rolls back on an exception; the role and claims end with the transaction.
    """
    claims = user_claims_of(user)
    with pool.connection() as conn, scoped_transaction(conn, claims):
        yield conn


def query_as_user(
    pool: ConnectionPool[Any],
    user: AuthenticatedUser,
    statement: str,
    params: Sequence[Any] | Mapping[str, Any] = (),
    *,
    prepare: bool = False,
) -> list[tuple[Any, ...]]:
    """One statement as ``user`` in its own transaction, in one network round trip; returns its rows.

    The claims and ``statement`` go out as one simple-protocol message (values bound client-side, quoted by
    psycopg), which PostgreSQL runs as one implicit transaction: ``set_config(…, true)`` lasts exactly until
    the statement ends, an error rolls both back, and nothing is left on the pooled connection — so it is also
    right behind Supavisor's or PgBouncer's transaction mode. A request that is one query should not wait for
    four round trips, nor pay psycopg's pipeline machinery, which costs the client more than the query costs
    the server. ``statement`` must be a single statement: a second one after a ``COMMIT`` would run without
    the user's role, so a ``;`` in it is refused.

    ``prepare=True`` (only where the endpoint keeps sessions: direct or Supavisor session mode) sends
    ``EXECUTE`` of statements prepared once per connection with SQL ``PREPARE``, which halves the server's
    work for a point query. RLS still decides per execution: a plan prepared under another role is rewritten
    again when the role differs (PostgreSQL's plan cache records the role RLS was applied for), and ``auth.uid()``
    is evaluated at run time, never folded into a plan shared between users.
    """
    user_claims_of(user)  # refuses anything but a verified user
    statement = statement.rstrip().rstrip(";")
    if ";" in statement:
        raise ClaimsError(
            "query_as_user runs exactly one statement and this one has a ';': pass values as parameters, and run "
            "several statements with user_transaction()"
        )
    values = params or None  # as psycopg: no parameters, no placeholder processing
    with pool.connection() as conn:
        if conn.info.transaction_status != TransactionStatus.IDLE or not conn.autocommit:
            raise ClaimsError("an RLS-scoped query needs an autocommit connection that is not in a transaction")
        form = _prepared_form(statement, isinstance(values, Mapping), values is not None) if prepare else None
        if form is None:
            return _run_with_claims(conn, user, statement, values, prepared=False)
        cache = _prepared_statements(conn)
        try:
            return _run_with_claims(conn, user, cache.execute_sql(conn, form), values, prepared=True)
        except (psycopg.errors.InvalidSqlStatementName, psycopg.errors.FeatureNotSupported) as exc:
            # Someone ran DEALLOCATE/DISCARD on this session, or the table changed under a prepared plan
            # ("cached plan must not change result type"): forget this connection's statements, prepare again.
            if isinstance(exc, psycopg.errors.FeatureNotSupported) and "cached plan" not in str(exc):
                raise
            cache.forget_all(conn)
            return _run_with_claims(conn, user, cache.execute_sql(conn, form), values, prepared=True)


def _run_with_claims(
    conn: psycopg.Connection[Any],
    user: AuthenticatedUser,
    statement: str,
    params: Sequence[Any] | Mapping[str, Any] | None,
    *,
    prepared: bool,
) -> list[tuple[Any, ...]]:
    claims = _claims_statement(conn, user, prepared)
    cursor = psycopg.ClientCursor(conn)
    if params is None:
        cursor.execute(f"{claims}; {statement}")
    else:
        cursor.execute(f"{claims.replace('%', '%%')}; {statement}", params)
    cursor.nextset()
    result = cursor.pgresult
    # Not ``cursor.description``: it builds a Column object per column on every call, which is a visible
    # share of a point query's client time.
    return cursor.fetchall() if result is not None and result.status == ExecStatus.TUPLES_OK else []


_rendered_claims: dict[tuple[int, bool], tuple[AuthenticatedUser, str]] = {}


def _claims_statement(conn: psycopg.Connection[Any], user: AuthenticatedUser, prepared: bool) -> str:
    """The claims statement for ``user`` with its values as literals, rendered once per user: a service that
    answers the same users again and again should not re-encode their claims as JSON on every query."""
    entry = _rendered_claims.get((id(user), prepared))
    if entry is not None and entry[0] is user:
        return entry[1]
    literals = [sql.Literal(value) for value in claims_parameters(user_claims_of(user))]
    template = "execute pgferry_claims({}, {}, {}, {})" if prepared else CLAIMS_SQL.replace("%s", "{}")
    text = sql.SQL(template).format(*literals).as_string(conn)
    if len(_rendered_claims) >= 4096:
        _rendered_claims.clear()  # users come and go; the ones still active are rendered again on next use
    _rendered_claims[(id(user), prepared)] = (user, text)  # holding the user keeps its id from being reused
    return text


_PLACEHOLDER = re.compile(r"%(?:\((?P<name>[^)]+)\))?(?P<kind>.)")


@dataclass(frozen=True)
class _PreparedForm:
    """``statement`` with ``$n`` parameters for ``PREPARE``, and the ``EXECUTE`` argument list for its values."""

    body: str
    arguments: str


@functools.lru_cache(maxsize=1024)
def _prepared_form(statement: str, named: bool, has_params: bool) -> _PreparedForm | None:
    """Rewrite psycopg placeholders (``%s``, ``%(name)s``, ``%%``) as ``$n``; ``None`` for anything else, which
    then runs unprepared rather than guessed at. Without parameters the statement is taken as it is."""
    if not has_params:
        return _PreparedForm(statement, "")
    numbers: dict[str, int] = {}
    arguments: list[str] = []
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
        return f"${numbers[key]}"

    body = _PLACEHOLDER.sub(number, statement)
    if unsupported:
        return None
    return _PreparedForm(body, ", ".join(arguments))


class _ConnectionStatements:
    """The statements prepared on one server session, by text; bounded, so a service that builds many distinct
    statements does not grow a session's memory without end. Preparing is its own round trip, once per
    statement and session: an error in it (a typo in the statement) is raised before anything is recorded."""

    LIMIT = 200

    def __init__(self) -> None:
        self.names: OrderedDict[str, str] = OrderedDict()
        self.claims_prepared = False

    def execute_sql(self, conn: psycopg.Connection[Any], form: _PreparedForm) -> str:
        """The statement's ``EXECUTE``, preparing it (and the claims statement) on this session first if needed."""
        if not self.claims_prepared:
            conn.execute("prepare pgferry_claims(text, text, text, text) as " + (CLAIMS_SQL % ("$1", "$2", "$3", "$4")))
            self.claims_prepared = True
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
        return f"execute {name}({form.arguments})" if form.arguments else f"execute {name}"

    def forget_all(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("deallocate all")
        self.names.clear()
        self.claims_prepared = False


_statement_numbers = itertools.count(1)
_sessions: weakref.WeakKeyDictionary[psycopg.Connection[Any], _ConnectionStatements] = weakref.WeakKeyDictionary()
_sessions_lock = threading.Lock()


def _prepared_statements(conn: psycopg.Connection[Any]) -> _ConnectionStatements:
    statements = _sessions.get(conn)
    if statements is None:
        with _sessions_lock:
            statements = _sessions.setdefault(conn, _ConnectionStatements())
    return statements


@contextmanager
def service_role_transaction(pool: ConnectionPool[Any]) -> Iterator[psycopg.Connection[Any]]:
    """A transaction as ``service_role`` (bypasses RLS), for server code paths only: it takes no token."""
    with pool.connection() as conn, scoped_transaction(conn, service_role_claims()):
        yield conn


@asynccontextmanager
async def auser_transaction(
    pool: AsyncConnectionPool[Any], user: AuthenticatedUser | None = None
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """The async :func:`user_transaction`; ``user=None`` is the service role (server code only)."""
    claims = service_role_claims() if user is None else user_claims_of(user)
    parameters = claims_parameters(claims)
    async with pool.connection() as conn:
        if conn.info.transaction_status != TransactionStatus.IDLE:
            raise ClaimsError("an RLS-scoped transaction needs a connection that is not already in a transaction")
        async with conn.transaction():
            await conn.execute(CLAIMS_SQL, parameters)
            yield conn


def apply_user_to_session(session: Session, user: AuthenticatedUser | None) -> None:
    """Make the SQLAlchemy ``session``'s current transaction run as ``user`` (``None``: the service role).

    Call it first thing in a transaction (``with Session.begin(): apply_user_to_session(...)``); the setting ends
    with that transaction, as PostgREST's does.
    """
    claims = service_role_claims() if user is None else user_claims_of(user)
    session.connection().exec_driver_sql(CLAIMS_SQL, claims_parameters(claims))
