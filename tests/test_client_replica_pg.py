"""The PostgreSQL replica (``postgresql://`` in ``ClientConfig.replica_path``) on real servers: the SQLite replica's
key properties again — exact values, changes committed with the position, staged pages gone after a crash, resume
after a restart — plus native column types, and the client end to end on it (optimistic writes, the outbox, a
rotated shape). The oracle for values is the source database read with psycopg (typed) and as ``::text``."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pgferry.client import ClientConfig, ElectricSupabaseClient, Rejection, open_replica
from pgferry.client.replica_pg import PostgresReplica
from pgferry.client.values import parse_value, to_text
from tests.sync_helpers import USER, make_server
from tests.test_client_electric import converge, db_tasks, local_tasks
from tests.test_client_replica import STAGE_SCHEMA, TRICKY_ROWS, replayed, staged_change, sync_once
from tests.write_helpers import ALICE, BOB, SYNC_SECRET, WriteStack, token_for, write_stack

COLUMNS = ["id", "user_id", "title", "tags", "metadata", "embedding", "due_at", "priority", "created_at"]


@pytest.fixture
def db(target_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def stack(target_url: str, tmp_path: Path) -> Iterator[WriteStack]:
    with write_stack(target_url, tmp_path / "sync") as served:
        yield served


def column_types(url: str, table: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "select attname, format_type(atttypid, atttypmod) from pg_attribute "
            "where attrelid = %s::regclass and attnum > 0 and not attisdropped",
            [f"pgferry_replica.{table}"],
        )
        return {name: kind for name, kind in found}


@pytest.mark.parametrize("with_vector", [True, False], ids=["pgvector", "no-pgvector"])
def test_values_round_trip_exactly_in_native_types(
    target_url: str, blank_url: str, db: Any, tmp_path: Path, with_vector: bool
) -> None:
    if with_vector:
        with psycopg.connect(blank_url, autocommit=True) as conn:
            conn.execute("create extension vector")
    for row in TRICKY_ROWS:
        db.execute(
            "insert into tasks (user_id, title, tags, metadata, embedding, due_at, priority) "
            "values (%s, %s, %s, %s::jsonb, %s::extensions.vector, %s, %s)",
            [
                USER,
                row["title"],
                row["tags"],
                json.dumps(row["metadata"]),
                None if row["embedding"] is None else str(row["embedding"]),
                row["due_at"],
                row["priority"],
            ],
        )
    replica = open_replica(blank_url)
    assert isinstance(replica, PostgresReplica)
    with make_server(target_url, tmp_path / "sync") as server:
        sync_once(server.url, replica)  # type: ignore[arg-type]

    types = column_types(blank_url, "_synced_tasks")
    assert types["id"] == "uuid" and types["metadata"] == "jsonb" and types["tags"] == "text[]"
    assert types["due_at"] == "timestamp with time zone" and types["priority"] == "integer"
    assert types["embedding"] == ("vector" if with_vector else "text")
    assert column_types(blank_url, "tasks") == {**types, "_pending": "integer"}

    expected_text = {
        r[0]: dict(zip(COLUMNS, r, strict=True))
        for r in db.execute(f"select {', '.join(c + '::text' for c in COLUMNS)} from tasks")
    }
    typed = {
        str(r[0]): dict(zip(COLUMNS, r, strict=True))
        for r in db.execute(
            "select id, user_id, title, tags, metadata, embedding::text, due_at, priority, created_at from tasks"
        )
    }
    local_text = {r["id"]: r for r in replica.rows("tasks", typed=False)}
    local = {str(r["id"]): r for r in replica.rows("tasks")}
    assert set(local) == set(expected_text) and len(local) == 2
    for key, pg_text in expected_text.items():
        assert {c: local_text[key][c] for c in COLUMNS} == pg_text  # PostgreSQL renders it back identically
        pg, got = typed[key], local[key]
        assert got["id"] == uuid.UUID(key) and got["user_id"] == USER
        assert got["title"] == pg["title"] and got["tags"] == pg["tags"] and got["metadata"] == pg["metadata"]
        assert got["due_at"] == pg["due_at"] and got["created_at"] == pg["created_at"]
        assert got["priority"] == pg["priority"]
        expected_vector = (
            None if pg["embedding"] is None else [float(x) for x in pg["embedding"].strip("[]").split(",")]
        )
        assert got["embedding"] == expected_vector
        schema = replica.schema("tasks")
        for column in ("tags", "due_at", "priority", "id", "embedding", "created_at"):
            assert parse_value(to_text(got[column], schema[column]), schema[column]) == got[column]
    # Native values for SQL on the replica: psycopg reads uuid, jsonb, arrays and timestamptz as Python values.
    native = {str(r[0]): r for r in replica.query("select id, metadata, tags, due_at from tasks")}
    for key, (_, metadata, tags, due_at) in native.items():
        assert (metadata, tags, due_at) == (typed[key]["metadata"], typed[key]["tags"], typed[key]["due_at"])
    replica.close()


def test_changes_and_position_commit_together_or_not_at_all(
    target_url: str, blank_url: str, db: Any, tmp_path: Path
) -> None:
    from pgferry.client import Change

    db.execute("insert into tasks (user_id, title) values (%s, 'one')", [USER])
    replica = open_replica(f"{blank_url}?replica_schema=agent_one")
    with make_server(target_url, tmp_path / "sync") as server:
        sync_once(server.url, replica)  # type: ignore[arg-type]
    before = (replica.position("tasks"), replica.rows("tasks", typed=False))
    good = Change(
        '"public"."tasks"/"00000000-0000-4000-8000-000000000001"',
        "insert",
        {"id": "00000000-0000-4000-8000-000000000001", "title": "two"},
    )
    uncastable = Change(
        '"public"."tasks"/"00000000-0000-4000-8000-000000000002"',
        "insert",
        {"id": "00000000-0000-4000-8000-000000000002", "priority": "not a number"},
    )
    with pytest.raises(psycopg.Error):
        replica.apply("tasks", "public.tasks", [good, uncastable], offset="999_0", handle="h", schema=None)
    assert (replica.position("tasks"), replica.rows("tasks", typed=False)) == before

    # A reopened replica resumes where its rows are: no refetch, no duplicates, the new row arrives once.
    replica.close()
    db.execute("insert into tasks (user_id, title) values (%s, 'three')", [USER])
    reopened = open_replica(f"{blank_url}?replica_schema=agent_one")
    assert reopened.position("tasks") == before[0]
    with make_server(target_url, tmp_path / "sync") as server:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sync_once(server.url, reopened)  # type: ignore[arg-type]
            if len(reopened.rows("tasks")) >= 2:
                break
            time.sleep(0.2)
    assert sorted(r["title"] for r in reopened.rows("tasks")) == ["one", "three"]
    assert reopened.position("tasks") != before[0]
    reopened.close()
    assert open_replica(blank_url).position("tasks") is None  # another schema, another replica


def replica_state(replica: Any, table: str = "_synced_tasks") -> dict[str, tuple[str | None, ...]]:
    return {row[0]: tuple(row[1:]) for row in replica.query(f'select _key, id, title, note from "{table}"')}


def test_staged_changes_are_invisible_until_applied_and_gone_after_a_crash(blank_url: str) -> None:
    replica = open_replica(blank_url)
    replica.apply("tasks", "public.tasks", [], offset="0_0", handle="h1", schema=STAGE_SCHEMA)
    replica.stage("tasks", [staged_change(n) for n in range(3000)], schema=STAGE_SCHEMA)
    assert replica_state(replica) == {} and replica.rows("tasks") == []
    replica.close()  # a crash before the up-to-date: the staged rows must not survive, the offset did not move

    reopened = open_replica(blank_url)
    assert reopened.position("tasks") == ("0_0", "h1")
    reopened.apply("tasks", "public.tasks", [], offset="1_0", handle="h1", schema=STAGE_SCHEMA)
    assert replica_state(reopened) == {}

    snapshot = [staged_change(n) for n in range(12_000)]
    reopened.stage("tasks", snapshot[:5000], schema=STAGE_SCHEMA)
    reopened.stage("tasks", snapshot[5000:11_000], schema=STAGE_SCHEMA)
    reopened.apply("tasks", "public.tasks", snapshot[11_000:], offset="2_0", handle="h1", schema=STAGE_SCHEMA)
    assert replica_state(reopened) == replayed(snapshot)
    assert reopened.query("select count(*) from tasks") == [(12_000,)]

    live = [
        staged_change(5, "update", title="renamed"),
        staged_change(7, "delete"),
        staged_change(7),
        staged_change(12_001),
        staged_change(8, "delete"),
        staged_change(12_001, "update", note=None, title="new"),
    ]
    reopened.stage("tasks", live, schema=STAGE_SCHEMA)
    seen = reopened.apply(
        "tasks", "public.tasks", [staged_change(9, "update", note="last")], offset="3_0", handle="h1", schema=None
    )
    expected = replayed([*snapshot, *live, staged_change(9, "update", note="last")])
    assert replica_state(reopened) == expected
    assert replica_state(reopened, "tasks") == expected
    assert seen == {1005, 1007, 1008, 1009, 13_001}
    assert reopened.position("tasks") == ("3_0", "h1")
    reopened.close()


async def start(url: str, user: uuid.UUID, replica: str) -> ElectricSupabaseClient:
    client = ElectricSupabaseClient()
    await client.initialize(ClientConfig(url=url, access_token=lambda: token_for(user), replica_path=replica))
    await asyncio.wait_for(client.setup_sync(["tasks"]), 30)
    return client


def test_the_client_writes_optimistically_through_a_postgres_replica(stack: WriteStack, blank_url: str) -> None:
    """Optimistic write, outbox, acknowledgement, a rejection rolled back, a rotated shape with a full outbox, and a
    restart that resumes from the position and outbox stored in PostgreSQL."""
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute("insert into tasks (user_id, title) values (%s, 'bob''s')", [BOB])

    async def scenario() -> None:
        client = await start(stack.proxy_url, ALICE, blank_url)
        rejected: list[Rejection] = []
        client.on_conflict(rejected.append)
        task_id = str(uuid.uuid4())
        await client.insert("tasks", {"id": task_id, "user_id": ALICE, "title": "optimistic", "tags": ["x", "y"]})
        await client.insert("tasks", {"id": str(uuid.uuid4()), "user_id": BOB, "title": "planted"})
        assert sorted(r["title"] for r in client.query("tasks")) == ["optimistic", "planted"]  # before any round trip
        assert client.query("tasks", synced=True) == [] and client.pending() == 2
        await converge(client, stack.database_url)
        assert [r.row["title"] for r in rejected] == ["planted"]
        assert client.query("tasks", synced=True)[0]["tags"] == ["x", "y"]

        # A rotated shape while an item waits in the outbox: re-synced, the item kept and delivered afterwards.
        assert client._sender is not None
        client._sender.url = "http://127.0.0.1:9/v1/mutations"
        await client.update("tasks", {"id": task_id, "status": "running"})
        handle = client._streams["tasks"].handle
        response = await asyncio.to_thread(
            httpx.delete, f"{stack.sync_url}/v1/shape", params={"handle": handle, "secret": SYNC_SECRET}
        )
        assert response.status_code == 202
        deadline = asyncio.get_running_loop().time() + 30
        while client._streams["tasks"].handle in (None, handle):
            assert asyncio.get_running_loop().time() < deadline, "no refetch"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert local_tasks(client)[task_id]["status"] == "running" and client.pending() == 1
        await client.close()  # with the item still in the outbox, stored in PostgreSQL

        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute("insert into tasks (user_id, title) values (%s, 'while away')", [ALICE])
        restarted = await start(stack.proxy_url, ALICE, blank_url)
        assert local_tasks(restarted)[task_id]["status"] == "running"  # the pending write survived the restart
        await converge(restarted, stack.database_url)
        assert sorted(t["title"] for t in db_tasks(stack.database_url).values()) == ["optimistic", "while away"]
        await restarted.close()

    asyncio.run(scenario())


def terminate_replica_connections(url: str, *, via: str | None = None) -> int:
    """Drop the replica's connections to database ``url`` from the server side, as a PostgreSQL restart or an idle
    timeout would (connected to ``via``, another database on that server, when ``url`` refuses connections)."""
    from urllib.parse import urlsplit

    with psycopg.connect(via or url, autocommit=True) as conn:
        found = conn.execute(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
            "where application_name = 'pgferry-replica' and datname = %s",
            [urlsplit(url).path.lstrip("/")],
        ).fetchone()
        return int(found[0]) if found else 0


def test_a_lost_connection_never_applies_a_boundary_without_its_staged_changes(blank_url: str) -> None:
    from pgferry.client.replica_pg import StagedChangesLost

    replica = open_replica(blank_url)
    replica.apply("tasks", "public.tasks", [], offset="0_0", handle="h1", schema=STAGE_SCHEMA)
    replica.stage("tasks", [staged_change(n) for n in range(100)], schema=STAGE_SCHEMA)
    assert terminate_replica_connections(blank_url) == 1
    # The staged rows went with the connection: storing the next offset now would skip them for good.
    with pytest.raises(psycopg.OperationalError):
        replica.apply("tasks", "public.tasks", [staged_change(100)], offset="1_0", handle="h1", schema=None)
    with pytest.raises(StagedChangesLost):  # and again, however often it is tried, on the new connection
        replica.apply("tasks", "public.tasks", [staged_change(100)], offset="1_0", handle="h1", schema=None)
    assert replica.position("tasks") == ("0_0", "h1") and replica_state(replica) == {}
    # Once the staged changes are given up (the stream restarts from 0_0), the boundary is fetched and applied again.
    replica.discard_staged("tasks")
    again = [staged_change(n) for n in range(101)]
    replica.stage("tasks", again[:100], schema=STAGE_SCHEMA)
    replica.apply("tasks", "public.tasks", again[100:], offset="1_0", handle="h1", schema=None)
    assert replica_state(replica) == replayed(again) and replica.position("tasks") == ("1_0", "h1")
    # Reads reconnect on their own (nothing staged is at stake), and so a local write after a drop goes through.
    assert terminate_replica_connections(blank_url) == 1
    assert replica.count_outbox() == 0
    assert terminate_replica_connections(blank_url) == 1
    replica.write("tasks", "update", {"id": "5", "title": "local"}, {"id": "5", "title": "local"})
    assert replica.count_outbox() == 1
    replica.close()


def test_the_client_recovers_when_the_replica_database_goes_away_for_a_while(stack: WriteStack, blank_url: str) -> None:
    """The replica's database drops the client's connection and refuses new ones for a while: the stream's next
    boundary cannot be applied (reported through ``on_error``), the outbox sender cannot read; once the database
    takes connections again the stream starts over from the stored position and everything converges."""
    from urllib.parse import urlsplit

    name = urlsplit(blank_url).path.lstrip("/")

    def allow_connections(allowed: bool) -> None:
        with psycopg.connect(stack.database_url, autocommit=True) as conn:  # the same server, another database
            conn.execute(f'alter database "{name}" with allow_connections {str(allowed).lower()}')

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client = await start(stack.proxy_url, ALICE, blank_url)
        errors: list[BaseException] = []
        client.on_error(errors.append)
        task_id = str(uuid.uuid4())
        await client.insert("tasks", {"id": task_id, "user_id": ALICE, "title": "before"})
        await converge(client, stack.database_url)
        await asyncio.to_thread(allow_connections, False)
        try:
            assert await asyncio.to_thread(terminate_replica_connections, blank_url, via=stack.database_url) >= 1
            with psycopg.connect(stack.database_url, autocommit=True) as conn:  # a change the stream must deliver
                conn.execute("insert into tasks (user_id, title) values (%s, 'while the replica was away')", [ALICE])
            deadline = loop.time() + 30
            while not errors:  # no replica reads here: they would fail too while connections are refused
                assert loop.time() < deadline, "the failed boundary was never reported"
                await asyncio.sleep(0.05)
            assert isinstance(errors[0], psycopg.OperationalError), errors
            assert client.state == "disconnected"
        finally:
            await asyncio.to_thread(allow_connections, True)
        await converge(client, stack.database_url, timeout=60)
        await client.update("tasks", {"id": task_id, "title": "written after recovery"})
        await converge(client, stack.database_url)
        titles = sorted(r["title"] for r in client.query("tasks"))
        assert titles == ["while the replica was away", "written after recovery"]
        await client.close()

    asyncio.run(scenario())
