"""RLS-scoped transactions: run SQL as a Supabase user, the way PostgREST does.

Backend code that acts for a user must not rely on its own WHERE clauses for isolation; it should let the
database's policies decide, exactly as they decide for requests through Supabase's API. PostgREST does it
per transaction: ``SET LOCAL ROLE <role claim>`` and ``request.jwt.claims`` set to the token's claims. This
module reproduces that and nothing more; verifying the token that produced the claims is the caller's job
(claims here must come from a verified token, never from a decoded one).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

import psycopg
from psycopg.pq import TransactionStatus

from pgferry.errors import PgferryError

API_ROLES = frozenset({"anon", "authenticated", "service_role"})


class ClaimsError(PgferryError):
    """Claims that cannot be turned into a database role."""


def user_claims(
    user_id: uuid.UUID | str,
    *,
    email: str | None = None,
    ttl_seconds: int = 3600,
    issuer: str = "http://127.0.0.1:54321/auth/v1",
) -> dict[str, Any]:
    """Claims shaped like a Supabase Auth access token for ``user_id``."""
    now = int(time.time())
    return {
        "sub": str(user_id),
        "role": "authenticated",
        "aud": "authenticated",
        "iss": issuer,
        "iat": now,
        "exp": now + ttl_seconds,
        "email": email or "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {},
        "aal": "aal1",
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
    }


def anon_claims() -> dict[str, Any]:
    return {"role": "anon", "iss": "supabase"}


def service_role_claims() -> dict[str, Any]:
    return {"role": "service_role", "iss": "supabase"}


def apply_claims(conn: psycopg.Connection[Any], claims: Mapping[str, Any]) -> None:
    """Switch the current transaction to the claims' role; must be called inside a transaction.

    One statement, as PostgREST sends it (``set_config('role', …, true)`` is ``SET LOCAL ROLE``): the runtime's
    pooled point queries pay one round trip for the switch, not four, and a caller that judges many users in one
    transaction (the Realtime server) one each. Every setting is written, ``sub`` as an empty string when the claims
    have none (``auth.uid()`` reads that as NULL): a value left by earlier claims in the same transaction must never
    speak for these.
    """
    conn.execute(CLAIMS_SQL, claims_parameters(claims))


CLAIMS_SQL: Final = (
    "select pg_catalog.set_config('role', %s, true), pg_catalog.set_config('request.jwt.claims', %s, true), "
    "pg_catalog.set_config('request.jwt.claim.sub', %s, true), "
    "pg_catalog.set_config('request.jwt.claim.role', %s, true)"
)
"""The statement :func:`apply_claims` runs, for callers holding another driver's connection (SQLAlchemy, async)."""


def claims_parameters(claims: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """The parameters of :data:`CLAIMS_SQL` for ``claims``; :class:`ClaimsError` for a role outside the API roles."""
    role = claims.get("role")
    if role not in API_ROLES:
        raise ClaimsError(f"role claim {role!r} is not one of {sorted(API_ROLES)}; refusing to switch role")
    sub = claims.get("sub")
    return str(role), json.dumps(dict(claims)), "" if sub is None else str(sub), str(role)


@contextmanager
def scoped_transaction(conn: psycopg.Connection[Any], claims: Mapping[str, Any]) -> Iterator[psycopg.Connection[Any]]:
    """A transaction in which every statement runs as the user the claims describe.

    It must be a real transaction, not a savepoint: ``SET LOCAL`` inside a savepoint survives its release
    and would keep the user's role (or worse, service_role) for whatever the caller runs next.
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise ClaimsError(
            "an RLS-scoped transaction needs a connection that is not already in a transaction "
            "(commit or roll back first, or use autocommit=True)"
        )
    with conn.transaction():
        apply_claims(conn, claims)
        yield conn
