"""RLS-scoped runtime sessions on real PostgreSQL: a verified token becomes exactly that user, across tenants.

Tokens are real HS256 JWTs checked by ``pgferry.sync.auth``; the rows are the platform's eight tables with their
real policies. Every denial has a positive control, so a policy that denied everything would fail too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from pgferry.db.rls import ClaimsError
from pgferry.runtime.errors import ServiceRoleRefusedError
from pgferry.runtime.scoped import auser_transaction, service_role_transaction, user_transaction
from pgferry.schema.models import USER_OWNED_TABLES
from pgferry.supabase.project import SupabaseProject
from pgferry.sync.auth import AuthenticatedUser, ExpiredTokenError, InvalidTokenError, NotAUserTokenError
from tests.platform_rows import insert_row, insert_tree, row_values
from tests.runtime_helpers import project, service_role_key, token_for

ALICE = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
BOB = uuid.UUID("00000000-0000-4000-8000-0000000000b2")


@pytest.fixture
def tenants(target_url: str) -> dict[uuid.UUID, dict[str, Any]]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        return {ALICE: insert_tree(conn, ALICE), BOB: insert_tree(conn, BOB)}


@pytest.fixture
def pool(target_url: str) -> Iterator[ConnectionPool[Any]]:
    # One connection: every transaction reuses the same server session, so leaked state would show.
    with ConnectionPool(target_url, kwargs={"autocommit": True}, min_size=1, max_size=1) as pool:
        yield pool


@pytest.fixture
def tokens() -> Iterator[SupabaseProject]:
    with project() as blocking:
        yield blocking


def _count(conn: psycopg.Connection[Any], table: str, where: str = "true", params: tuple[Any, ...] = ()) -> int:
    row = conn.execute(
        sql.SQL("select count(*) from public.{} where " + where).format(sql.Identifier(table)), params
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("table", USER_OWNED_TABLES)
def test_verified_token_sees_only_its_users_rows(
    pool: ConnectionPool[Any], tokens: SupabaseProject, tenants: Any, table: str
) -> None:
    alice = tokens.verify_sync(token_for(ALICE))
    with user_transaction(pool, alice) as conn:
        assert _count(conn, table) == 1
        assert _count(conn, table, "id = %s", (tenants[ALICE][table],)) == 1  # positive control
        assert _count(conn, table, "id = %s", (tenants[BOB][table],)) == 0
        updated = conn.execute(
            sql.SQL("update public.{} set user_id = user_id where id = %s").format(sql.Identifier(table)),
            (tenants[BOB][table],),
        ).rowcount
        assert updated == 0
        deleted = conn.execute(
            sql.SQL("delete from public.{} where user_id = %s").format(sql.Identifier(table)), (BOB,)
        ).rowcount
        assert deleted == 0
    with service_role_transaction(pool) as conn:
        assert _count(conn, table, "user_id = %s", (BOB,)) == 1  # Bob's row survived Alice's delete


@pytest.mark.parametrize("table", USER_OWNED_TABLES)
def test_verified_user_cannot_write_rows_for_another_tenant(
    pool: ConnectionPool[Any], tokens: SupabaseProject, tenants: Any, table: str
) -> None:
    alice = tokens.verify_sync(token_for(ALICE))
    with user_transaction(pool, alice) as conn:  # positive control: her own row goes in
        insert_row(conn, table, row_values(table, ALICE, tenants[ALICE]))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        with user_transaction(pool, alice) as conn:
            insert_row(conn, table, row_values(table, BOB, tenants[BOB]))


def test_role_and_claims_do_not_outlive_the_transaction(
    pool: ConnectionPool[Any], tokens: SupabaseProject, tenants: Any
) -> None:
    with pool.connection() as conn:
        login_role = conn.execute("select current_user").fetchone()
    with user_transaction(pool, tokens.verify_sync(token_for(ALICE))) as conn:
        inside = conn.execute("select current_user, auth.uid(), auth.role()").fetchone()
    assert inside == ("authenticated", ALICE, "authenticated")
    with pool.connection() as conn:  # the same (only) server session, next checkout
        after = conn.execute(
            "select current_user, coalesce(current_setting('request.jwt.claims', true), ''), auth.uid()"
        ).fetchone()
        assert after == (login_role[0] if login_role else None, "", None)
        assert _count(conn, "tasks") == 2  # back to the login role, which bypasses nothing by accident


def test_failed_statement_rolls_back_the_users_whole_transaction(
    pool: ConnectionPool[Any], tokens: SupabaseProject, tenants: Any
) -> None:
    alice = tokens.verify_sync(token_for(ALICE))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        with user_transaction(pool, alice) as conn:
            conn.execute("update public.tasks set title = 'renamed' where user_id = %s", (ALICE,))
            insert_row(conn, "tasks", row_values("tasks", BOB, tenants[BOB]))
    with service_role_transaction(pool) as conn:
        assert _count(conn, "tasks", "title = 'renamed'") == 0


@pytest.mark.parametrize(
    ("make_token", "error"),
    [
        (lambda: token_for(ALICE, exp=int(time.time()) - 60), ExpiredTokenError),
        (lambda: token_for(ALICE, secret="not-the-project-secret-0123456789abcd"), InvalidTokenError),
        (lambda: token_for(ALICE, role="service_role"), NotAUserTokenError),
        (lambda: token_for(ALICE, role="anon"), NotAUserTokenError),
        (service_role_key, InvalidTokenError),  # refused (issuer "supabase", role service_role)
        (lambda: token_for(ALICE, aud="somebody-else"), InvalidTokenError),
        (lambda: token_for(ALICE, iss="https://evil.example/auth/v1"), InvalidTokenError),
    ],
    ids=["expired", "wrong-secret", "service-role-claim", "anon-claim", "service-role-key", "audience", "issuer"],
)
def test_tokens_that_are_not_a_signed_in_user_never_reach_the_database(
    tokens: SupabaseProject, make_token: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        tokens.verify_sync(make_token())


def test_decoded_but_unverified_claims_are_refused(pool: ConnectionPool[Any], tenants: Any) -> None:
    """Claims that did not come out of the verifier cannot be smuggled in as a user, least of all as service_role."""
    forged = AuthenticatedUser(user_id=ALICE, claims={"role": "service_role", "sub": str(ALICE)})
    with pytest.raises(ServiceRoleRefusedError, match="service_role_transaction"):
        with user_transaction(pool, forged):
            pass
    with pytest.raises(ServiceRoleRefusedError, match="AuthenticatedUser"):
        with user_transaction(pool, {"role": "authenticated", "sub": str(BOB)}):  # type: ignore[arg-type]
            pass


def test_async_user_transaction_is_scoped_the_same_way(target_url: str, tenants: Any) -> None:
    async def main() -> tuple[Any, Any, int]:
        async with project() as server:
            user = await server.verify(token_for(BOB))
        async with AsyncConnectionPool(target_url, kwargs={"autocommit": True}, min_size=1, max_size=1) as apool:
            async with auser_transaction(apool, user) as conn:
                cur = await conn.execute(
                    "select count(*), count(*) filter (where user_id = %s) from public.tasks", (BOB,)
                )
                seen = await cur.fetchone()
            async with auser_transaction(apool) as conn:  # service role, server code
                cur = await conn.execute("select count(*) from public.tasks")
                everything = await cur.fetchone()
            async with apool.connection() as conn:
                cur = await conn.execute("select auth.uid()")
                leftover = await cur.fetchone()
        assert seen is not None and everything is not None and leftover is not None
        return seen, leftover[0], everything[0]

    seen, leftover, everything = asyncio.run(main())
    assert seen == (1, 1)
    assert leftover is None
    assert everything == 2


def test_query_as_user_is_scoped_and_rolls_back_on_error(
    pool: ConnectionPool[Any], tokens: SupabaseProject, tenants: Any
) -> None:
    from pgferry.runtime.scoped import query_as_user

    alice = tokens.verify_sync(token_for(ALICE))
    rows = query_as_user(
        pool,
        alice,
        "select id, user_id from public.tasks where id = any(%s)",
        ([tenants[ALICE]["tasks"], tenants[BOB]["tasks"]],),
    )
    assert rows == [(tenants[ALICE]["tasks"], ALICE)]  # Bob's id asked for, not returned
    assert query_as_user(pool, alice, "update public.tasks set title = 'x' where user_id = %s", (BOB,)) == []
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        query_as_user(pool, alice, "insert into public.tasks (user_id, title) values (%s, 'no')", (BOB,))
    with pool.connection() as conn:  # the one-message transaction is gone, and so are the claims
        assert conn.execute("select current_user, auth.uid()").fetchone() == ("postgres", None)
    named = query_as_user(pool, alice, "select count(*) from public.tasks where user_id = %(u)s", {"u": BOB})
    assert named == [(0,)]  # named parameters work too, and RLS still hides Bob's rows
    with pytest.raises(ClaimsError, match="exactly one statement"):  # a second one would run without the role
        query_as_user(pool, alice, "select 1; commit; select count(*) from public.tasks")
    assert query_as_user(pool, alice, "select current_user, auth.uid() ;") == [("authenticated", ALICE)]
    with service_role_transaction(pool) as conn:
        assert _count(conn, "tasks", "title in ('x', 'no')") == 0
