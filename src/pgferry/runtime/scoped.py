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

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.pq import ExecStatus, TransactionStatus

from pgferry.db.rls import (
    CLAIMS_SQL,
    ClaimsError,
    claims_parameters,
    scoped_transaction,
    service_role_claims,
)
from pgferry.runtime.errors import ServiceRoleRefusedError
from pgferry.runtime.statements import (
    SessionStatements,
    claims_statement,
    inline,
    local_setting_calls,
    local_settings,
    prepared_form,
    rows_of_last_result,
    send_message,
)
from pgferry.sync.auth import USER_ROLE, AuthenticatedUser

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool, ConnectionPool
    from sqlalchemy.orm import Session

__all__ = [
    "apply_user_to_session",
    "auser_transaction",
    "claims_key",
    "query_as_user",
    "query_as_user_bound",
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
    settings: Mapping[str, str] | None = None,
) -> list[tuple[Any, ...]]:
    """One statement as ``user`` in its own transaction, in one network round trip; returns its rows.

    ``settings`` are set for that transaction only (``set_config(name, value, true)``, after the claims), e.g.
    ``{"hnsw.ef_search": "200"}``.

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
    parameters = _claims_parameters_of(user)
    statement = statement.rstrip().rstrip(";")
    if ";" in statement:
        raise ClaimsError(
            "query_as_user runs exactly one statement and this one has a ';': pass values as parameters, and run "
            "several statements with user_transaction()"
        )
    values = params or None  # as psycopg: no parameters, no placeholder processing
    form = prepared_form(statement, isinstance(values, Mapping), values is not None) if prepare else None
    with pool.connection() as conn:
        if conn.info.transaction_status != TransactionStatus.IDLE or not conn.autocommit:
            raise ClaimsError("an RLS-scoped query needs an autocommit connection that is not in a transaction")
        cursor = psycopg.ClientCursor(conn)
        local = inline(cursor, *local_settings(settings)) + "; " if settings else ""

        def render(session: SessionStatements | None) -> str:
            if session is None or form is None:
                return f"{claims_statement(parameters, False)}; {local}{inline(cursor, statement, values)}"
            execute = session.execute_text(conn, form)
            return f"{claims_statement(parameters, True)}; {local}{inline(cursor, execute, values)}"

        return rows_of_last_result(send_message(conn, render, prepare=form is not None))


def query_as_user_bound(
    pool: ConnectionPool[Any],
    user: AuthenticatedUser,
    statement: str,
    params: Sequence[Any] | Mapping[str, Any],
    *,
    settings: Mapping[str, str] | None = None,
) -> list[tuple[Any, ...]]:
    """:func:`query_as_user` for a statement whose values must be bound by the server, e.g. a binary ``vector``
    (a 1536-d embedding written as text costs more to format and parse than the HNSW scan that uses it).

    The claims-and-settings statement and ``statement`` are pipelined in the extended protocol behind one Sync,
    which PostgreSQL runs as one implicit transaction — the same guarantees as :func:`query_as_user` (claims and
    settings last exactly until the statement ends, an error rolls both back, nothing stays on the pooled
    connection, right behind a transaction-mode pooler: statements are unnamed), still one round trip. Never
    prepared: a generic plan of a nearest-neighbour query could trade the HNSW scan for a sort. The extended
    protocol takes exactly one statement per query, so a second one cannot ride along.
    """
    parameters = _claims_parameters_of(user)
    calls, setting_params = local_setting_calls(settings or {})
    setup = f"{CLAIMS_SQL}, {calls}" if calls else CLAIMS_SQL
    setup_params = [*parameters, *setting_params]
    with pool.connection() as conn:
        if conn.info.transaction_status != TransactionStatus.IDLE or not conn.autocommit:
            raise ClaimsError("an RLS-scoped query needs an autocommit connection that is not in a transaction")
        try:
            with conn.pipeline():
                conn.execute(setup, setup_params, prepare=False)
                cursor = conn.cursor()
                cursor.execute(statement, params, prepare=False)
        except BaseException:
            # After an error inside a pipeline psycopg may send a Flush behind the Sync: a transaction-mode pooler
            # (PgBouncer) then keeps its server connection linked to this client, waiting for a ReadyForQuery that
            # never comes, and every other client of that pool queues until query_wait_timeout (seen in the
            # PgBouncer test: the server idle after `select 1/0`, the next client waiting 120 s). Closing the
            # connection makes the pooler drop the link; the pool discards it (broken) and opens a fresh one.
            conn.pgconn.finish()
            raise
        result = cursor.pgresult
        return cursor.fetchall() if result is not None and result.status == ExecStatus.TUPLES_OK else []


def claims_key(user: AuthenticatedUser) -> tuple[str, str, str, str]:
    """What identifies ``user``'s view of the data under RLS (role and claims), e.g. to key cached reads by."""
    return _claims_parameters_of(user)


_claims_of_users: dict[int, tuple[AuthenticatedUser, tuple[str, str, str, str]]] = {}


def _claims_parameters_of(user: AuthenticatedUser) -> tuple[str, str, str, str]:
    """:func:`claims_parameters` of a verified user, computed once per user object: a service answers the same
    users again and again and should not re-encode their claims as JSON on every query."""
    entry = _claims_of_users.get(id(user))
    if entry is not None and entry[0] is user:
        return entry[1]
    parameters = claims_parameters(user_claims_of(user))
    if len(_claims_of_users) >= 4096:
        _claims_of_users.clear()  # users come and go; the active ones are computed again on next use
    _claims_of_users[id(user)] = (user, parameters)  # holding the user keeps its id from being reused
    return parameters


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
