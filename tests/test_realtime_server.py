"""The Realtime server against a real PostgreSQL, driven by supabase-py's official ``realtime`` client, unchanged.

The oracle for authorization is PostgreSQL itself: each delivered change is compared with what the same user reads
through RLS (an RLS-scoped transaction, as PostgREST runs it), and changes of another tenant are written *before*
the user's own, so their absence is proven by the user's own change arriving (a socket delivers in commit order).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from realtime import RealtimeSubscribeStates

from pgferry.db.rls import scoped_transaction, user_claims
from pgferry.testing.asgi import ServedApp
from tests.realtime_helpers import USER_A, USER_B, Listener, in_thread, insert_task, serve, user_token


@pytest.fixture
def db(target_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def server(target_url: str, tmp_path: Path) -> Iterator[ServedApp]:
    with serve(target_url, tmp_path / "realtime") as served:
        yield served


def _as_user(url: str, user: Any, query: str, params: list[Any]) -> list[dict[str, Any]]:
    with psycopg.connect(url) as conn, scoped_transaction(conn, user_claims(user)) as scoped:
        cursor = scoped.execute(query, params)
        names = [d.name for d in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def test_join_reply_echoes_bindings_with_non_zero_ids_and_payloads_have_supabases_shape(
    server: ServedApp, db: Any, target_url: str
) -> None:
    async def scenario() -> None:
        listener = Listener(server.url, user_token(USER_A))
        try:
            channel = await listener.subscribe()
            await listener.wait_subscribed()
            [callback] = channel.postgres_changes_callbacks
            assert callback.id  # the server's binding id, never 0
            task = await in_thread(lambda: insert_task(db, USER_A, "first", priority=3, tags=["x", "y z"]))
            inserted = await listener.next()
            assert inserted["ids"] == [callback.id]
            data = inserted["data"]
            assert set(data) == {"schema", "table", "commit_timestamp", "type", "columns", "record", "errors"}
            assert (data["schema"], data["table"], data["type"], data["errors"]) == ("public", "tasks", "INSERT", None)
            assert data["commit_timestamp"].endswith("Z") and len(data["commit_timestamp"]) == 24
            columns = {c["name"]: c["type"] for c in data["columns"]}
            assert columns["id"] == "uuid" and columns["priority"] == "int4" and columns["tags"] == "_text"
            record = data["record"]
            # The oracle: the row as the user reads it through RLS, rendered by PostgreSQL's to_jsonb.
            [expected] = await in_thread(
                lambda: _as_user(target_url, USER_A, "select to_jsonb(t) as j from tasks t where id = %s", [task])
            )
            assert record == expected["j"]
            assert record["tags"] == ["x", "y z"] and record["priority"] == 3

            await in_thread(lambda: db.execute("update tasks set status = 'running' where id = %s", [task]))
            updated = (await listener.next())["data"]
            assert updated["type"] == "UPDATE" and updated["record"]["status"] == "running"
            assert updated["old_record"]["status"] == "pending" and updated["old_record"]["id"] == task

            await in_thread(lambda: db.execute("delete from tasks where id = %s", [task]))
            deleted = (await listener.next())["data"]
            assert deleted["type"] == "DELETE" and "record" not in deleted
            assert deleted["old_record"]["id"] == task and deleted["old_record"]["status"] == "running"
        finally:
            await listener.close()

    asyncio.run(scenario())


def test_a_user_never_sees_another_tenants_insert_update_or_delete(server: ServedApp, db: Any) -> None:
    async def scenario() -> None:
        a = Listener(server.url, user_token(USER_A))
        b = Listener(server.url, user_token(USER_B))
        try:
            for listener in (a, b):
                await listener.subscribe()
                await listener.wait_subscribed()
            theirs = await in_thread(lambda: insert_task(db, USER_B, "b's"))
            mine = await in_thread(lambda: insert_task(db, USER_A, "a's"))
            assert (await a.next())["data"]["record"]["id"] == mine  # B's insert came first and was not sent
            assert (await b.next())["data"]["record"]["id"] == theirs
            await in_thread(lambda: db.execute("update tasks set title = 'b2' where id = %s", [theirs]))
            await in_thread(lambda: db.execute("delete from tasks where id = %s", [theirs]))
            await in_thread(lambda: db.execute("update tasks set title = 'a2' where id = %s", [mine]))
            got = (await a.next())["data"]
            assert (got["type"], got["record"]["id"]) == ("UPDATE", mine)
            assert [(await b.next())["data"]["type"] for _ in range(2)] == ["UPDATE", "DELETE"]
            await in_thread(lambda: db.execute("delete from tasks where id = %s", [mine]))
            got = (await a.next())["data"]
            assert (got["type"], got["old_record"]["id"]) == ("DELETE", mine)
            await a.none(0.5)
            await b.none(0.0)
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_filtered_subscription_receives_only_matching_rows(server: ServedApp, db: Any) -> None:
    async def scenario() -> None:
        listener = Listener(server.url, user_token(USER_A))
        try:
            await listener.subscribe(filter="priority=gte.5")
            await listener.wait_subscribed()
            await in_thread(lambda: insert_task(db, USER_A, "low", priority=1))
            high = await in_thread(lambda: insert_task(db, USER_A, "high", priority=7))
            assert (await listener.next())["data"]["record"]["id"] == high
            await in_thread(lambda: db.execute("delete from tasks where priority = 1"))
            await in_thread(lambda: db.execute("delete from tasks where id = %s", [high]))
            deleted = (await listener.next())["data"]  # deletes are filtered on the old row
            assert (deleted["type"], deleted["old_record"]["id"]) == ("DELETE", high)
        finally:
            await listener.close()

    asyncio.run(scenario())


def test_in_filter_and_event_filter(server: ServedApp, db: Any) -> None:
    async def scenario() -> None:
        listener = Listener(server.url, user_token(USER_A))
        try:
            await listener.subscribe(event="INSERT", filter='title=in.(pending,"on,hold")')
            await listener.wait_subscribed()
            await in_thread(lambda: insert_task(db, USER_A, "done"))
            held = await in_thread(lambda: insert_task(db, USER_A, "on,hold"))
            got = (await listener.next())["data"]
            assert got["record"]["id"] == held
            await in_thread(lambda: db.execute("update tasks set title = 'pending' where id = %s", [held]))
            pending = await in_thread(lambda: insert_task(db, USER_A, "pending"))
            assert (await listener.next())["data"]["record"]["id"] == pending  # the UPDATE was not an INSERT
        finally:
            await listener.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("filter_text", "expected"),
    [
        ("priority=eq.high", "invalid input syntax for type integer"),
        ("nope=eq.1", "invalid column for filter nope"),
        ("priority=like.1", "Error parsing `filter` params: operator 'like' is not one of"),
        ("priority", "Error parsing `filter` params:"),
        ("id=in.(" + ",".join(["1"] * 101) + ")", "too many values for `in` filter. Maximum 100"),
    ],
)
def test_bad_filters_get_realtimes_system_error_and_the_socket_lives_on(
    server: ServedApp, db: Any, filter_text: str, expected: str
) -> None:
    async def scenario() -> None:
        listener = Listener(server.url, user_token(USER_A))
        try:
            await listener.subscribe(filter=filter_text)
            # supabase-py hands a system error to the subscribe callback as CHANNEL_ERROR with the payload as text
            errors: list[str] = []
            for _ in range(200):
                errors = [e or "" for status, e in listener.states if status == RealtimeSubscribeStates.CHANNEL_ERROR]
                if errors:
                    break
                await asyncio.sleep(0.02)
            assert errors, listener.states
            payload = json.loads(errors[0])
            assert payload["extension"] == "postgres_changes" and payload["status"] == "error"
            assert expected in payload["message"], payload
            good = Listener(server.url, user_token(USER_A))
            try:
                await good.subscribe("other")
                await good.wait_subscribed()
                task = await in_thread(lambda: insert_task(db, USER_A, "still served"))
                assert (await good.next())["data"]["record"]["id"] == task
            finally:
                await good.close()
        finally:
            await listener.close()

    asyncio.run(scenario())


def test_columns_the_role_may_not_read_are_never_sent(server: ServedApp, db: Any) -> None:
    db.execute("revoke select on tasks from authenticated")
    db.execute("grant select (id, user_id, title, status) on tasks to authenticated")

    async def scenario() -> None:
        listener = Listener(server.url, user_token(USER_A))
        try:
            await listener.subscribe()
            await listener.wait_subscribed()
            await in_thread(lambda: insert_task(db, USER_A, "narrow", metadata=json.dumps({"secret": 1})))
            data = (await listener.next())["data"]
            assert set(data["record"]) == {"id", "user_id", "title", "status"}
            assert [c["name"] for c in data["columns"]] == ["id", "user_id", "title", "status"]
        finally:
            await listener.close()

    asyncio.run(scenario())


def test_anon_sees_nothing_of_tables_without_an_anon_policy(server: ServedApp, db: Any) -> None:
    async def scenario() -> None:
        anon = Listener(server.url, None)
        user = Listener(server.url, user_token(USER_A))
        try:
            await anon.subscribe()
            await user.subscribe()
            await user.wait_subscribed()
            await in_thread(lambda: insert_task(db, USER_A, "private"))
            await user.next()
            await anon.none(0.5)
        finally:
            await anon.close()
            await user.close()

    asyncio.run(scenario())


def test_claims_of_one_subscriber_never_speak_for_the_next_in_a_batch(server: ServedApp, db: Any) -> None:
    """All tokens are judged in one transaction: a user's ``sub`` must not survive into an anon token's turn (the
    class of leak Supabase fixed in 2026-07). The policy below would show anon a row only through a stale sub."""
    db.execute("grant select on tasks to anon")
    db.execute("create policy anon_by_uid on tasks for select to anon using ((select auth.uid()) = user_id)")

    async def scenario() -> None:
        user = Listener(server.url, user_token(USER_A))
        anon = Listener(server.url, None)
        try:
            await user.subscribe()  # joined first: judged first in every batch
            await user.wait_subscribed()
            await anon.subscribe("anon")
            await anon.wait_subscribed()
            task = await in_thread(lambda: insert_task(db, USER_A, "a's"))
            assert (await user.next())["data"]["record"]["id"] == task
            await anon.none(0.5)
        finally:
            await user.close()
            await anon.close()

    asyncio.run(scenario())
