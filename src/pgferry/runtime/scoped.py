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
from psycopg.pq import TransactionStatus

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
    pool: ConnectionPool[Any], user: AuthenticatedUser, statement: str, params: Sequence[Any] | Mapping[str, Any] = ()
) -> list[tuple[Any, ...]]:
    """One statement as ``user`` in its own transaction, in one network round trip: ``BEGIN``, the claims, the
    statement and ``COMMIT`` go out together in a pipeline (a request that is one query should not wait for four).
    Returns the statement's rows; an error rolls the transaction back and is raised.
    """
    claims = user_claims_of(user)
    with pool.connection() as conn:
        if conn.info.transaction_status != TransactionStatus.IDLE:
            raise ClaimsError("an RLS-scoped transaction needs a connection that is not already in a transaction")
        with conn.pipeline(), conn.transaction():
            conn.execute(CLAIMS_SQL, claims_parameters(claims))
            cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description is not None else []


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
