"""``create_database_client``: the three Supabase endpoints, each on the local stack with the settings it needs.

Direct and session mode are real sessions on the test server; transaction mode (Supavisor's port 6543) goes
through a real PgBouncer in transaction mode started for the test. The pooler's one server connection is shared by
every client, which makes a prepared statement or a session setting leak from one client to the next at once,
so these tests fail if the client ever relies on session state there.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select, text

from pgferry.errors import ConfigError
from pgferry.runtime.client import create_async_database_client, create_database_client
from pgferry.runtime.endpoints import EndpointMode, endpoint_mode, plan_connection
from pgferry.schema.models import Task
from tests.platform_rows import insert_tree
from tests.runtime_helpers import SUPABASE_URL, service_role_key, settings_for, token_for

ALICE = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
BOB = uuid.UUID("00000000-0000-4000-8000-0000000000b2")


@pytest.mark.parametrize(
    ("url", "pooler", "declared", "expected"),
    [
        ("postgresql://postgres:pw@db.abcd.supabase.co:5432/postgres", False, "auto", EndpointMode.DIRECT),
        (
            "postgresql://postgres.abcd:pw@aws-0-eu-west-1.pooler.supabase.com:5432/postgres",
            True,
            "auto",
            EndpointMode.SESSION,
        ),
        (
            "postgresql://postgres.abcd:pw@aws-0-eu-west-1.pooler.supabase.com:6543/postgres",
            True,
            "auto",
            EndpointMode.TRANSACTION,
        ),
        ("postgresql://postgres@127.0.0.1:6543/postgres", False, "auto", EndpointMode.TRANSACTION),
        ("postgresql://postgres@127.0.0.1:41234/postgres", True, "auto", EndpointMode.TRANSACTION),
        ("postgresql://postgres@127.0.0.1:41234/postgres", True, "session", EndpointMode.SESSION),
        ("postgresql://postgres@127.0.0.1:41234/postgres", False, "auto", EndpointMode.DIRECT),
    ],
    ids=["direct", "supavisor-session", "supavisor-transaction", "port-6543", "unknown-pooler", "declared", "local"],
)
def test_endpoint_mode_from_url_or_setting(url: str, pooler: bool, declared: Any, expected: EndpointMode) -> None:
    assert endpoint_mode(url, pooler=pooler, declared=declared) is expected


def test_pooler_url_is_preferred_and_the_mode_decides_prepared_statements() -> None:
    plan = plan_connection(
        settings_for(
            "postgresql://postgres:pw@db.abcd.supabase.co:5432/postgres",
            supabase_pooler_url="postgresql://postgres.abcd:pw@aws-0-eu-west-1.pooler.supabase.com:6543/postgres",
        )
    )
    assert (plan.mode, plan.setting) == (EndpointMode.TRANSACTION, "SUPABASE_POOLER_URL")
    assert plan.psycopg_options() == {"prepare_threshold": None}
    assert "pw" not in repr(plan)
    direct = plan_connection(settings_for("postgresql://postgres:pw@db.abcd.supabase.co:5432/postgres"))
    assert direct.mode is EndpointMode.DIRECT and direct.psycopg_options() == {}


def test_no_database_url_is_one_line_naming_both_variables() -> None:
    with pytest.raises(ConfigError, match="SUPABASE_POOLER_URL: is not set and neither is SUPABASE_DB_URL"):
        plan_connection(settings_for("postgresql://x@h/db", supabase_db_url=None))


def _prepared_here(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select count(*) from pg_prepared_statements").fetchone()
    assert row is not None
    return int(row[0])


def test_direct_mode_prepares_repeated_statements(target_url: str) -> None:
    with create_database_client(settings_for(target_url), max_size=1) as client:
        assert client.mode == "direct"
        with client.pool.connection() as conn:
            for _ in range(6):
                conn.execute("select count(*) from public.tasks where user_id = %s", (ALICE,))
            assert _prepared_here(conn) >= 1


def _hammer(url: str, prepare_threshold: int | None, clients: int = 3, rounds: int = 12) -> list[BaseException]:
    """Several clients run the same statements through the pooler at once; the errors they met."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(url, autocommit=True, prepare_threshold=prepare_threshold) as conn:
                for n in range(rounds):
                    conn.execute("select count(*) from public.tasks where user_id = %s", (ALICE,))
                    conn.execute("select %s::int + 1", (n,))
        except psycopg.Error as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_transaction_mode_through_pgbouncer_never_prepares(target_url: str, pgbouncer: Callable[..., str]) -> None:
    pooled = pgbouncer(target_url, pool_size=1)  # one server connection shared by every client
    # Control: psycopg's default behaviour (prepare after repeated use) breaks behind a transaction pooler.
    failures = _hammer(pooled, prepare_threshold=0)
    expected = psycopg.errors.DuplicatePreparedStatement | psycopg.errors.InvalidSqlStatementName
    assert failures and all(isinstance(e, expected) for e in failures), failures
    with create_database_client(settings_for(target_url, supabase_pooler_url=pooled), max_size=3) as client:
        assert client.mode == "transaction"
        assert client.pool.kwargs["prepare_threshold"] is None
        errors: list[BaseException] = []

        def run() -> None:
            try:
                for n in range(12):
                    with client.pool.connection() as conn:
                        conn.execute("select count(*) from public.tasks where user_id = %s", (ALICE,))
                        conn.execute("select %s::int + 1", (n,))
            except psycopg.Error as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []


def test_user_transactions_through_pgbouncer_keep_tenants_apart_and_leave_nothing(
    target_url: str, pgbouncer: Callable[..., str]
) -> None:
    with psycopg.connect(target_url, autocommit=True) as conn:
        insert_tree(conn, ALICE)
        insert_tree(conn, BOB)
    pooled = pgbouncer(target_url, pool_size=1)
    settings = settings_for(target_url, supabase_pooler_url=pooled)
    with create_database_client(settings, max_size=2) as alice_side, create_database_client(settings) as bob_side:
        alice = alice_side.verify(token_for(ALICE))
        bob = bob_side.verify(token_for(BOB))
        for _ in range(5):  # interleaved, on the pooler's single server connection
            with alice_side.user_transaction(alice) as conn:
                assert conn.execute("select array_agg(distinct user_id) from public.tasks").fetchone() == ([ALICE],)
            with bob_side.user_transaction(bob) as conn:
                assert conn.execute("select array_agg(distinct user_id) from public.tasks").fetchone() == ([BOB],)
            with bob_side.pool.connection() as conn:  # no transaction: whatever the server connection still has
                leftover = conn.execute(
                    "select current_user, coalesce(current_setting('request.jwt.claims', true), '')"
                ).fetchone()
                assert leftover == ("postgres", "")


def test_prepared_point_queries_never_share_one_users_rows_with_another(target_url: str) -> None:
    """``client.query`` in direct mode runs EXECUTE of statements prepared once per session. One server session
    (pool of one), two users interleaved past the point where PostgreSQL switches to a generic plan: each sees
    only their own rows every time, so neither the plan nor anything in it is shared across users."""
    with psycopg.connect(target_url, autocommit=True) as conn:
        insert_tree(conn, ALICE)
        insert_tree(conn, BOB)
        owners = {row[0]: row[1] for row in conn.execute("select id, user_id from public.tasks")}
    statement = "select user_id, count(*) from public.tasks where id = any(%s) group by user_id"
    with create_database_client(settings_for(target_url), max_size=1) as client:
        assert client.mode == "direct"
        users = {ALICE: client.verify(token_for(ALICE)), BOB: client.verify(token_for(BOB))}
        everything = list(owners)
        for _ in range(12):
            for owner, user in users.items():
                mine = sum(1 for o in owners.values() if o == owner)
                assert client.query(user, statement, (everything,)) == [(owner, mine)]
                named = client.query(user, "select count(*) from public.tasks where user_id <> %(me)s", {"me": owner})
                assert named == [(0,)]
        with client.pool.connection() as conn:
            prepared = {r[0] for r in conn.execute("select statement from pg_prepared_statements")}
            assert any("any($1)" in text for text in prepared), prepared  # the statement really was prepared
            assert conn.execute("select current_user, auth.uid()").fetchone() == ("postgres", None)
            conn.execute("deallocate all")  # someone else's DISCARD/DEALLOCATE on the session: prepared again
        alice_rows = sum(1 for o in owners.values() if o == ALICE)
        assert client.query(users[ALICE], statement, (everything,)) == [(ALICE, alice_rows)]
        with pytest.raises(psycopg.errors.SyntaxError):  # a typo is the caller's error, at once, not cached
            client.query(users[ALICE], "selec 1")
        with pytest.raises(psycopg.errors.SyntaxError):
            client.query(users[ALICE], "selec 1")
        assert client.query(users[BOB], "select 100 %% 7, %s::int", (5,)) == [(2, 5)]


def test_point_queries_through_pgbouncer_run_as_the_user_and_leave_nothing(
    target_url: str, pgbouncer: Callable[..., str]
) -> None:
    with psycopg.connect(target_url, autocommit=True) as conn:
        insert_tree(conn, ALICE)
        insert_tree(conn, BOB)
    pooled = pgbouncer(target_url, pool_size=1)
    settings = settings_for(target_url, supabase_pooler_url=pooled)
    with create_database_client(settings, max_size=2) as client:
        assert client.mode == "transaction"
        alice, bob = client.verify(token_for(ALICE)), client.verify(token_for(BOB))
        for _ in range(8):
            assert client.query(alice, "select array_agg(distinct user_id) from public.tasks") == [([ALICE],)]
            assert client.query(bob, "select array_agg(distinct user_id) from public.tasks") == [([BOB],)]
        with client.pool.connection() as conn:
            assert conn.execute("select count(*) from pg_prepared_statements").fetchone() == (0,)
            assert conn.execute(
                "select current_user, coalesce(current_setting('request.jwt.claims', true), '')"
            ).fetchone() == ("postgres", "")


def test_sqlalchemy_sessions_run_as_the_user(target_url: str, pgbouncer: Callable[..., str]) -> None:
    with psycopg.connect(target_url, autocommit=True) as conn:
        insert_tree(conn, ALICE)
        insert_tree(conn, BOB)
    for url in (target_url, pgbouncer(target_url)):
        with create_database_client(settings_for(url)) as client:
            alice = client.verify(token_for(ALICE))
            with client.session(alice) as session:
                owners = session.scalars(select(Task.user_id)).all()
                session.add(Task(user_id=ALICE, title="from the ORM"))
            assert owners == [ALICE]
            with client.service_role_session() as session:
                assert session.scalar(select(func.count()).select_from(Task)) == 3
            with pytest.raises(Exception, match="row-level security"):
                with client.session(alice) as session:
                    session.add(Task(user_id=BOB, title="into Bob's account"))
            with client.sessions() as session:  # the pool's connection came back clean
                assert session.scalar(text("select current_setting('request.jwt.claims', true)")) in (None, "")
        with psycopg.connect(target_url, autocommit=True) as conn:
            conn.execute("delete from public.tasks where title = 'from the ORM'")


def test_async_client_sessions_and_transactions(target_url: str, pgbouncer: Callable[..., str]) -> None:
    with psycopg.connect(target_url, autocommit=True) as conn:
        insert_tree(conn, ALICE)
        insert_tree(conn, BOB)
    pooled = pgbouncer(target_url)

    async def main() -> tuple[Any, ...]:
        async with await create_async_database_client(settings_for(target_url, supabase_pooler_url=pooled)) as client:
            bob = await client.verify(token_for(BOB))
            async with client.user_transaction(bob) as conn:
                cur = await conn.execute("select array_agg(distinct user_id) from public.tasks")
                raw = await cur.fetchone()
            async with client.session(bob) as session:
                orm = (await session.scalars(select(Task.user_id))).all()
            async with client.session(None) as session:
                everything = await session.scalar(select(func.count()).select_from(Task))
            return raw, orm, everything, client.plan.mode

    raw, orm, everything, mode = asyncio.run(main())
    assert raw == ([BOB],)
    assert orm == [BOB]
    assert everything == 2
    assert mode is EndpointMode.TRANSACTION


def test_supabase_client_holds_the_anon_key_and_the_service_role_needs_its_own(target_url: str) -> None:
    settings = settings_for(target_url)
    with create_database_client(settings) as client:
        assert client.supabase.supabase_key == settings.supabase_anon_key.get_secret_value()  # type: ignore[union-attr]
        assert str(client.supabase.supabase_url).rstrip("/") == SUPABASE_URL
        with pytest.raises(ConfigError, match="SUPABASE_SERVICE_ROLE_KEY"):
            client.service_role_supabase()
    key = service_role_key()
    with create_database_client(settings_for(target_url, supabase_service_role_key=key)) as client:
        assert client.service_role_supabase().supabase_key == key
        assert client.supabase.supabase_key != key
    with pytest.raises(ConfigError, match="SUPABASE_ANON_KEY: holds the service-role key"):
        create_database_client(settings_for(target_url, supabase_anon_key=key))
