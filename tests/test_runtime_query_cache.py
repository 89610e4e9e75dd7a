"""The read cache (``create_database_client(…, read_cache=True)``, ``client.query(…, cache=True)``) on a real server.

The oracle is always a plain query on a separate connection (as the database owner, filtered by the user's id
by hand, not by RLS): whatever the cache answers must equal what the database says at that moment — after a
write by another connection once the feed has delivered it, at once after a write through the same client,
and after the feed's stream was cut and came back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from pgferry.errors import ConfigError
from pgferry.runtime.client import DatabaseClient, create_database_client
from pgferry.runtime.query_cache import tables_read_by_plan
from tests.platform_rows import insert_tree
from tests.runtime_helpers import settings_for, token_for

ALICE = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
BOB = uuid.UUID("00000000-0000-4000-8000-0000000000b2")
TITLES = "select id, title from public.tasks order by id"


@pytest.fixture
def seeded(target_url: str) -> str:
    with psycopg.connect(target_url, autocommit=True) as conn:
        for user in (ALICE, BOB):
            insert_tree(conn, user)
            conn.execute(
                "insert into public.tasks (id, user_id, title) select gen_random_uuid(), %s, 'task ' || n "
                "from generate_series(1, 5) n",
                (user,),
            )
    return target_url


@pytest.fixture
def client(seeded: str) -> Iterator[DatabaseClient]:
    with create_database_client(settings_for(seeded), max_size=2, read_cache=True) as client:
        assert client.query_cache is not None and client.query_cache.wait_streaming(30)
        yield client


def _truth(url: str, user: uuid.UUID) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("select id, title from public.tasks where user_id = %s order by id", (user,)).fetchall()


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_a_cached_read_is_served_until_another_connection_changes_it(seeded: str, client: DatabaseClient) -> None:
    cache = client.query_cache
    assert cache is not None
    alice = client.verify(token_for(ALICE))
    first = client.query(alice, TITLES, cache=True)
    assert first == _truth(seeded, ALICE)
    hits = cache.stats().hits
    assert client.query(alice, TITLES, cache=True) == first
    assert cache.stats().hits == hits + 1  # served without the database
    with psycopg.connect(seeded, autocommit=True) as other:  # another process writes, not through this client
        other.execute("update public.tasks set title = title || ' (edited)' where user_id = %s", (ALICE,))
    assert _eventually(lambda: client.query(alice, TITLES, cache=True) == _truth(seeded, ALICE))
    assert all(title.endswith("(edited)") for _, title in client.query(alice, TITLES, cache=True))
    with psycopg.connect(seeded, autocommit=True) as other:  # a delete and a truncate invalidate too
        other.execute("delete from public.tasks where user_id = %s and title like 'task 1%%'", (ALICE,))
    assert _eventually(lambda: client.query(alice, TITLES, cache=True) == _truth(seeded, ALICE))
    assert len(client.query(alice, TITLES, cache=True)) == len(first) - 1


def test_the_cache_never_answers_one_user_with_anothers_rows(seeded: str, client: DatabaseClient) -> None:
    alice, bob = client.verify(token_for(ALICE)), client.verify(token_for(BOB))
    for _ in range(3):
        assert client.query(alice, TITLES, cache=True) == _truth(seeded, ALICE)
        assert client.query(bob, TITLES, cache=True) == _truth(seeded, BOB)
    by_id = "select title from public.tasks where id = %s"
    bobs_task = _truth(seeded, BOB)[0][0]
    assert client.query(bob, by_id, (bobs_task,), cache=True) != []
    assert client.query(alice, by_id, (bobs_task,), cache=True) == []  # RLS hides it, and the cache keeps that


def test_writes_through_the_client_are_read_back_at_once(seeded: str, client: DatabaseClient) -> None:
    alice = client.verify(token_for(ALICE))
    client.query(alice, TITLES, cache=True)
    client.query(alice, "update public.tasks set title = 'renamed' where user_id = %s", (str(ALICE),))
    assert client.query(alice, TITLES, cache=True) == _truth(seeded, ALICE)  # no waiting for the feed
    with client.user_transaction(alice) as conn:
        conn.execute("update public.tasks set title = 'again' where user_id = %s", (str(ALICE),))
    assert {title for _, title in client.query(alice, TITLES, cache=True)} == {"again"}


def test_reads_the_feed_cannot_see_are_never_cached(seeded: str, client: DatabaseClient) -> None:
    cache = client.query_cache
    assert cache is not None
    alice = client.verify(token_for(ALICE))
    with psycopg.connect(seeded, autocommit=True) as conn:  # a table outside the feed's publication
        conn.execute("create table public.unpublished (id int primary key, note text)")
        conn.execute("grant select on public.unpublished to authenticated")
        conn.execute("insert into public.unpublished values (1, 'before')")
    unpublished = "select note from public.unpublished"
    assert client.query(alice, unpublished, cache=True) == [("before",)]
    with psycopg.connect(seeded, autocommit=True) as conn:
        conn.execute("update public.unpublished set note = 'after'")
    assert client.query(alice, unpublished, cache=True) == [("after",)]  # at once: it was never cached
    with psycopg.connect(seeded, autocommit=True) as conn:  # partitions: which ones a plan names depends on values
        conn.execute("create table public.parted (id int primary key, note text) partition by list (id)")
        conn.execute("create table public.parted_1 partition of public.parted for values in (1)")
        conn.execute("create table public.parted_2 partition of public.parted for values in (2)")
        conn.execute("grant select on public.parted to authenticated")
        conn.execute("insert into public.parted values (1, 'one'), (2, 'two')")
        conn.execute("alter publication supabase_realtime add table public.parted")
    cache._on_stream(True)  # as a new stream would: read the catalog again
    parted = "select note from public.parted where id = %s"
    assert client.query(alice, parted, (1,), cache=True) == [("one",)]
    with psycopg.connect(seeded, autocommit=True) as conn:
        conn.execute("update public.parted set note = 'deux' where id = 2")
    assert client.query(alice, parted, (2,), cache=True) == [("deux",)]
    clock = "select clock_timestamp()"  # no table at all: nothing could ever invalidate it
    assert client.query(alice, clock, cache=True) != client.query(alice, clock, cache=True)
    series = "select count(*) from generate_series(1, 3)"  # a function scan may read what the plan hides
    client.query(alice, series, cache=True)
    assert cache.stats().uncacheable >= 6


def test_a_cut_feed_starts_again_empty_and_a_stopped_one_serves_nothing(seeded: str, client: DatabaseClient) -> None:
    cache = client.query_cache
    assert cache is not None
    alice = client.verify(token_for(ALICE))
    client.query(alice, TITLES, cache=True)
    with psycopg.connect(seeded, autocommit=True) as admin:
        slots = admin.execute(
            "select slot_name, active_pid, temporary from pg_replication_slots where slot_name like 'pgferry_cache%%'"
        ).fetchall()
        assert len(slots) == 1 and slots[0][1] is not None and slots[0][2] is True
        streams = cache.stats().streams
        admin.execute("select pg_terminate_backend(%s)", (slots[0][1],))
        admin.execute("update public.tasks set title = 'while cut' where user_id = %s", (ALICE,))  # maybe unseen
        assert _eventually(lambda: cache.stats().streams > streams and cache.streaming, timeout=30)
        assert client.query(alice, TITLES, cache=True) == _truth(seeded, ALICE)
        assert {title for _, title in client.query(alice, TITLES, cache=True)} == {"while cut"}
        assert admin.execute(  # the old temporary slot went with its connection
            "select count(*) from pg_replication_slots where slot_name = %s", (slots[0][0],)
        ).fetchone() == (0,)
        cache.close()  # the feed stops: from now on nothing is known about changes, so nothing is served or kept
        client.query(alice, TITLES, cache=True)
        admin.execute("update public.tasks set title = 'after the feed stopped' where user_id = %s", (ALICE,))
        assert client.query(alice, TITLES, cache=True) == _truth(seeded, ALICE)


def test_closing_the_client_leaves_no_replication_slot(seeded: str) -> None:
    with create_database_client(settings_for(seeded), max_size=1, read_cache=True) as client:
        assert client.query_cache is not None and client.query_cache.wait_streaming(30)
    with psycopg.connect(seeded, autocommit=True) as admin:
        assert _eventually(
            lambda: (
                admin.execute(
                    "select count(*) from pg_replication_slots where slot_name like 'pgferry_cache%%'"
                ).fetchone()
                == (0,)
            )
        )


def test_cache_configuration_errors_name_what_to_set(seeded: str, pgbouncer: Callable[..., str]) -> None:
    with create_database_client(settings_for(seeded), max_size=1) as plain:
        with pytest.raises(ConfigError, match="read_cache=True"):
            plain.query(plain.verify(token_for(ALICE)), TITLES, cache=True)
    pooled = pgbouncer(seeded, pool_size=1)
    settings = settings_for(seeded, supabase_pooler_url=pooled, supabase_db_url=None)
    with pytest.raises(ConfigError, match="SUPABASE_DB_URL"):
        create_database_client(settings, read_cache=True)


def test_plans_name_the_tables_they_read_and_refuse_what_they_hide() -> None:
    scan = {"Node Type": "Seq Scan", "Relation Name": "tasks", "Schema": "public"}
    policy = {"Node Type": "Index Scan", "Relation Name": "environments", "Schema": "public"}
    plan = [{"Plan": {"Node Type": "Nested Loop", "Plans": [scan, {"Node Type": "Hash", "Plans": [policy]}]}}]
    assert tables_read_by_plan(plan) == {("public", "tasks"), ("public", "environments")}
    hidden = [{"Plan": {"Node Type": "Append", "Plans": [scan, {"Node Type": "Function Scan"}]}}]
    assert tables_read_by_plan(hidden) is None
    writes = [{"Plan": {"Node Type": "ModifyTable", "Plans": [scan]}}]
    assert tables_read_by_plan(writes) is None


def test_a_read_overtaken_by_a_change_is_not_kept(seeded: str, client: DatabaseClient) -> None:
    """The race the generations close: the read runs, then another connection commits a change and the feed
    delivers it, and only then does the read return — its rows are already stale and must not be stored."""
    cache = client.query_cache
    assert cache is not None
    alice = client.verify(token_for(ALICE))
    from pgferry.runtime.scoped import claims_key, query_as_user

    def stale_load() -> list[tuple[Any, ...]]:
        rows = query_as_user(client.pool, alice, TITLES)
        before = cache.stats().invalidations
        with psycopg.connect(seeded, autocommit=True) as other:
            other.execute("update public.tasks set title = 'overtaken' where user_id = %s", (ALICE,))
        assert _eventually(lambda: cache.stats().invalidations > before)
        return rows

    def explain() -> Any:
        return query_as_user(client.pool, alice, "explain (verbose, format json) " + TITLES)[0][0]

    stale = cache.read(claims_key(alice), TITLES, (), stale_load, explain)
    assert stale != _truth(seeded, ALICE)
    assert cache.read(claims_key(alice), TITLES, (), lambda: query_as_user(client.pool, alice, TITLES), explain) == (
        _truth(seeded, ALICE)
    )


def test_remembered_plans_stay_bounded_and_answers_stay_right(
    seeded: str, client: DatabaseClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service that formats values into its SQL makes a new statement text per call: the cache forgets the
    oldest plans beyond ``MAX_PLANS`` instead of growing, and a forgotten statement is explained again."""
    import pgferry.runtime.query_cache as query_cache

    monkeypatch.setattr(query_cache, "MAX_PLANS", 5)
    cache = client.query_cache
    assert cache is not None
    alice = client.verify(token_for(ALICE))
    for round_ in range(2):
        for n in range(12):
            statement = f"select id, title from public.tasks where {n} >= 0 order by id"
            assert client.query(alice, statement, cache=True) == _truth(seeded, ALICE), (round_, n)
            assert len(cache._plans) <= 5
