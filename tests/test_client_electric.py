"""``ElectricSupabaseClient`` end to end on real servers: SQLite replicas, optimistic writes, the outbox, the
proxy's write API and the dev sync server on a real PostgreSQL with RLS. The database read as its owner is the
oracle; replicas must end identical to it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pgferry.client import ClientConfig, ElectricSupabaseClient, Rejection
from pgferry.sync import ProxyConfig, WriteApiConfig, create_proxy_app
from pgferry.testing.asgi import ServedApp, free_port
from tests.write_helpers import ALICE, BOB, SYNC_SECRET, WriteStack, token_for, verifier, write_stack


@pytest.fixture
def stack(target_url: str, tmp_path: Path) -> Iterator[WriteStack]:
    with write_stack(target_url, tmp_path / "sync") as served:
        yield served


def db_tasks(url: str, user: uuid.UUID = ALICE) -> dict[str, dict[str, Any]]:
    with psycopg.connect(url) as conn:
        found = conn.execute("select id, title, status, priority, tags from tasks where user_id = %s", [user])
        return {str(r[0]): {"title": r[1], "status": r[2], "priority": r[3], "tags": r[4]} for r in found}


def local_tasks(client: ElectricSupabaseClient) -> dict[str, dict[str, Any]]:
    return {
        str(r["id"]): {"title": r["title"], "status": r["status"], "priority": r["priority"], "tags": r["tags"]}
        for r in client.query("tasks")
    }


async def start(url: str, user: uuid.UUID, path: Path | str = ":memory:") -> ElectricSupabaseClient:
    client = ElectricSupabaseClient()
    await client.initialize(ClientConfig(url=url, access_token=lambda: token_for(user), replica_path=path))
    await asyncio.wait_for(client.setup_sync(["tasks"]), 30)
    return client


async def converge(client: ElectricSupabaseClient, url: str, user: uuid.UUID = ALICE, timeout: float = 90) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if client.pending() == 0 and local_tasks(client) == await asyncio.to_thread(db_tasks, url, user):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"no convergence: local {local_tasks(client)} db {db_tasks(url, user)} pending {client.pending()}"
    )


def test_a_local_write_is_visible_at_once_then_confirmed_by_the_stream(stack: WriteStack) -> None:
    async def scenario() -> None:
        writer = await start(stack.proxy_url, ALICE)
        reader = await start(stack.proxy_url, ALICE)
        task_id = str(uuid.uuid4())
        await writer.insert("tasks", {"id": task_id, "user_id": ALICE, "title": "optimistic", "tags": ["x"]})
        assert [r["title"] for r in writer.query("tasks")] == ["optimistic"]  # before any network round trip
        assert writer.query("tasks", synced=True) == []
        assert writer.pending() == 1
        await converge(writer, stack.database_url)
        await converge(reader, stack.database_url)
        assert writer.query("tasks", synced=True)[0]["title"] == "optimistic"
        await writer.update("tasks", {"id": task_id, "status": "running"})
        assert local_tasks(writer)[task_id]["status"] == "running"
        await converge(writer, stack.database_url)  # delivered and seen in the stream
        await converge(reader, stack.database_url)
        assert local_tasks(reader)[task_id]["status"] == "running"
        await writer.close()
        await reader.close()

    asyncio.run(scenario())


def test_a_rejected_write_rolls_back_and_is_reported(stack: WriteStack) -> None:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        bobs = str(
            conn.execute("insert into tasks (user_id, title) values (%s, 'bob''s') returning id", [BOB]).fetchone()[0]
        )  # type: ignore[index]

    async def scenario() -> None:
        client = await start(stack.proxy_url, ALICE)
        rejected: list[Rejection] = []
        client.on_conflict(rejected.append)
        mine = str(uuid.uuid4())
        await client.insert("tasks", {"id": mine, "user_id": ALICE, "title": "fine"})
        await client.insert("tasks", {"id": str(uuid.uuid4()), "user_id": BOB, "title": "planted in bob's account"})
        assert len(client.query("tasks")) == 2  # optimistic, both
        await converge(client, stack.database_url)
        assert [r.status for r in rejected] == [403]
        assert rejected[0].row["title"] == "planted in bob's account"
        assert [r["title"] for r in client.query("tasks")] == ["fine"]  # the rejected one rolled back
        await client.close()

    asyncio.run(scenario())
    assert db_tasks(stack.database_url, BOB) == {
        bobs: {"title": "bob's", "status": "pending", "priority": 0, "tags": []}
    }


def test_writes_while_the_server_is_down_are_delivered_when_it_is_back(target_url: str, tmp_path: Path) -> None:
    port = free_port()

    def proxy(upstream: str) -> ServedApp:
        config = ProxyConfig(
            upstream=upstream,
            verifier=verifier(),
            electric_secret=SYNC_SECRET,
            write=WriteApiConfig(database_url=target_url, verifier=verifier()),
        )
        return ServedApp(create_proxy_app(config), port=port)

    with write_stack(target_url, tmp_path / "sync") as stack:

        async def scenario() -> None:
            first = proxy(stack.sync_url).start()
            client = await start(first.url, ALICE)
            states: list[str] = []
            client.on_connection_state(states.append)
            first.stop()
            ids = [str(uuid.uuid4()) for _ in range(60)]
            for n, task_id in enumerate(ids):
                await client.insert("tasks", {"id": task_id, "user_id": ALICE, "title": f"offline {n}"})
            await asyncio.sleep(1.0)
            assert client.pending() == 60 and db_tasks(target_url) == {}
            assert client._sender is not None
            # Offline writes do not cut the sender's backoff short: not one connection attempt per write.
            assert client._sender._failures <= 12, client._sender._failures  # 24 before the fix
            with proxy(stack.sync_url):
                await converge(client, target_url)
            assert sorted(t["title"] for t in db_tasks(target_url).values()) == sorted(
                f"offline {n}" for n in range(60)
            )
            await client.close()

        asyncio.run(scenario())


def test_two_clients_edit_the_same_row_offline_and_converge_per_column(stack: WriteStack) -> None:
    async def scenario() -> None:
        a = await start(stack.proxy_url, ALICE)
        b = await start(stack.proxy_url, ALICE)
        task_id = str(uuid.uuid4())
        await a.insert("tasks", {"id": task_id, "user_id": ALICE, "title": "shared", "priority": 1})
        await converge(a, stack.database_url)
        await converge(b, stack.database_url)
        # Both go offline (their senders cannot reach the API) and edit; b's title edit is the later one.
        for client in (a, b):
            assert client._sender is not None
            client._sender.url = "http://127.0.0.1:9/v1/mutations"
        await a.update("tasks", {"id": task_id, "title": "a's title", "status": "running"})
        await asyncio.sleep(0.01)
        await b.update("tasks", {"id": task_id, "title": "b's title", "priority": 5})
        for client in (a, b):
            assert client._sender is not None
            client._sender.url = f"{stack.proxy_url}/v1/mutations"  # back online: b first, then a
            client._sender.retry_now()
            await converge(client, stack.database_url)
        await converge(a, stack.database_url)
        final = db_tasks(stack.database_url)[task_id]
        assert final == {"title": "b's title", "status": "running", "priority": 5, "tags": []}
        assert local_tasks(a) == local_tasks(b) == db_tasks(stack.database_url)
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_a_rotated_shape_resyncs_and_keeps_the_outbox(stack: WriteStack) -> None:
    async def scenario() -> None:
        client = await start(stack.proxy_url, ALICE)
        assert client._sender is not None
        client._sender.url = "http://127.0.0.1:9/v1/mutations"  # keep the outbox full for now
        task_id = str(uuid.uuid4())
        await client.insert("tasks", {"id": task_id, "user_id": ALICE, "title": "kept through the refetch"})
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute("insert into tasks (user_id, title) values (%s, 'from elsewhere')", [ALICE])
        handle = client._streams["tasks"].handle  # the proxy's user-scoped shape, rotated on the server
        response = await asyncio.to_thread(
            httpx.delete, f"{stack.sync_url}/v1/shape", params={"handle": handle, "secret": SYNC_SECRET}
        )
        assert response.status_code == 202
        await asyncio.sleep(2.0)
        titles = sorted(r["title"] for r in client.query("tasks"))
        assert titles == ["from elsewhere", "kept through the refetch"], titles
        assert client._streams["tasks"].handle not in (None, handle)  # it did refetch, under a new handle
        assert client.pending() == 1
        client._sender.url = f"{stack.proxy_url}/v1/mutations"
        client._sender.retry_now()
        await converge(client, stack.database_url)
        await client.close()

    asyncio.run(scenario())


KILLED_CLIENT = textwrap.dedent(
    """
    import asyncio, os, sys, uuid
    from pgferry.client import ClientConfig, ElectricSupabaseClient

    async def main():
        client = ElectricSupabaseClient()
        await client.initialize(ClientConfig(url=sys.argv[1], access_token=sys.argv[2], replica_path=sys.argv[3]))
        await client.setup_sync(["tasks"])
        client._sender.url = "http://127.0.0.1:9/v1/mutations"   # nothing leaves before the kill
        for n in range(50):
            await client.insert("tasks", {"id": str(uuid.uuid4()), "user_id": sys.argv[4], "title": f"outbox {n}"})
        print("written", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_client_killed_with_a_full_outbox_delivers_each_item_exactly_once(
    stack: WriteStack, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    # The outbox is durable in either replica: a SQLite file, or a PostgreSQL database (a fresh one on the server).
    path = str(tmp_path / "agent.db") if kind == "sqlite" else str(request.getfixturevalue("blank_url"))
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_CLIENT,
            stack.proxy_url,
            token_for(ALICE, expires_in=3600),
            str(path),
            str(ALICE),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "written"
    finally:
        process.kill()
        process.wait()

    # The first 20 were delivered just before the kill, but their answer was lost: the server has them, the outbox
    # still says pending. (Posted here as the sender would have, from the outbox on disk.)
    from pgferry.client import OutboxSender, open_replica

    offline = open_replica(path)
    # All 50 are in the outbox on disk (checked here, not after the restart: the restarted client's sender starts
    # delivering while its stream catches up, and may have settled some before a check could run).
    assert offline.count_outbox(state="pending") == 50
    items = offline.outbox(state="pending", limit=20)
    body, sent = OutboxSender(offline, stack.proxy_url, {"tasks": "public.tasks"})._body(items)
    assert len(sent) == 20
    offline.close()
    delivered = httpx.post(
        f"{stack.proxy_url}/v1/mutations",
        content=body,
        headers={"authorization": f"Bearer {token_for(ALICE)}", "content-type": "application/json"},
        timeout=30,
    )
    assert delivered.status_code == 200, delivered.text

    async def scenario() -> None:
        client = await start(stack.proxy_url, ALICE, path)
        await converge(client, stack.database_url)
        await client.close()

    asyncio.run(scenario())
    titles = sorted(t["title"] for t in db_tasks(stack.database_url).values())
    assert titles == sorted(f"outbox {n}" for n in range(50))


def test_setup_sync_with_a_refused_token_raises_in_one_line(stack: WriteStack) -> None:
    from pgferry.client import ShapeRequestError

    async def scenario() -> None:
        client = ElectricSupabaseClient()
        await client.initialize(ClientConfig(url=stack.proxy_url, access_token="not-a-token"))
        with pytest.raises(ShapeRequestError, match="401") as raised:
            await asyncio.wait_for(client.setup_sync(["tasks"]), 30)
        assert "\n" not in str(raised.value)
        await client.close()

    asyncio.run(scenario())


def test_an_outbox_larger_than_one_request_is_split_and_delivered_in_order(stack: WriteStack) -> None:
    """160 updates of ~56 KB each (an embedding, and the base the client saw) are more than the write API's 8 MiB
    per request: the sender must split them by size (a 413 would reject a good write), deliver every one, and keep
    their order (several updates of one row in one request included)."""
    rejected: list[Rejection] = []

    async def scenario() -> None:
        client = await start(stack.proxy_url, ALICE)
        client.on_conflict(rejected.append)
        assert client._sender is not None
        client._sender.url = f"http://127.0.0.1:{free_port()}/v1/mutations"  # offline: the outbox fills up
        task_id = str(uuid.uuid4())
        await client.insert("tasks", {"id": task_id, "title": "v0", "embedding": [0.123456789] * 1536})
        for n in range(1, 160):
            await client.update("tasks", {"id": task_id, "title": f"v{n}", "embedding": [n / 7.0] * 1536})
        assert client.pending() == 160
        client._sender.url = f"{stack.proxy_url}/v1/mutations"
        client._sender.retry_now()
        await converge(client, stack.database_url)
        await client.close()

    asyncio.run(scenario())
    assert rejected == []
    assert [t["title"] for t in db_tasks(stack.database_url).values()] == ["v159"]
    with psycopg.connect(stack.database_url) as conn:
        found = conn.execute("select count(*), count(distinct txid) from pgferry.applied_mutations").fetchone()
    assert found is not None and found[0] == 160 and found[1] >= 2  # more than one request


def test_an_acknowledged_write_is_settled_by_the_snapshot_of_a_rotated_shape(stack: WriteStack, tmp_path: Path) -> None:
    """The gap: an item the write API applied (acknowledged with its txid) whose change never reaches this client's
    stream, because the shape is rotated first. The new snapshot carries no txids; the item must still settle (the
    snapshot, taken after the acknowledgement, holds the write) and its overlay must not shadow later changes.
    Alongside: a rejected item rolls back over the new snapshot, and an item never sent stays pending, re-applied
    over it, and is delivered afterwards."""
    from pgferry.client.outbox import OutboxSender
    from pgferry.client.replica import LocalReplica

    path = tmp_path / "agent.db"
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        bobs = str(
            conn.execute("insert into tasks (user_id, title) values (%s, 'bob''s') returning id", [BOB]).fetchone()[0]
        )  # type: ignore[index]

    async def scenario() -> None:
        client = await start(stack.proxy_url, ALICE, path)
        await client.close()  # offline from the stream from here on: its position stays before the write

        # The outbox delivers while the stream is not followed: acknowledged ("sent" with a txid), never seen.
        replica = LocalReplica(path)
        acked = str(uuid.uuid4())
        replica.write(
            "tasks",
            "insert",
            {"id": acked, "user_id": str(ALICE), "title": "acked"},
            {"id": acked, "user_id": str(ALICE), "title": "acked"},
        )
        sender = OutboxSender(
            replica,
            stack.proxy_url,
            {"tasks": "public.tasks"},
            headers=lambda: {"authorization": f"Bearer {token_for(ALICE)}"},
        )
        outcome = await sender.send_once()
        await sender.flush()
        assert outcome.sent == 1
        assert [item.state for item in replica.outbox()] == ["sent"]
        # Then a write the server will refuse (bob's row) and one that is sent only after the restart.
        planted = {"id": str(uuid.uuid4()), "user_id": str(BOB), "title": "planted"}
        replica.write("tasks", "insert", planted, planted)
        later = str(uuid.uuid4())
        row = {"id": later, "user_id": str(ALICE), "title": "written offline"}
        replica.write("tasks", "insert", row, row)
        await sender.aclose()
        position = replica.position("tasks")
        replica.close()
        assert position is not None

        # The shape is rotated server-side before this client saw the acknowledged change.
        response = await asyncio.to_thread(
            httpx.delete, f"{stack.sync_url}/v1/shape", params={"handle": position[1], "secret": SYNC_SECRET}
        )
        assert response.status_code == 202

        client = ElectricSupabaseClient()
        await client.initialize(
            ClientConfig(url=stack.proxy_url, access_token=lambda: token_for(ALICE), replica_path=path)
        )
        rejected: list[Rejection] = []
        client.on_conflict(rejected.append)
        await asyncio.wait_for(client.setup_sync(["tasks"]), 30)
        assert client._streams["tasks"].handle != position[1]  # it did refetch
        await converge(client, stack.database_url)  # every item settles: the acked one, then the offline one
        assert sorted(r["title"] for r in client.query("tasks")) == ["acked", "written offline"]
        assert [r.row["title"] for r in rejected] == ["planted"]  # reported, its overlay rolled back
        # No stale overlay: a later change to the acknowledged row shows through.
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute("update tasks set title = 'changed elsewhere' where id = %s", [acked])
        await converge(client, stack.database_url)
        assert client.pending() == 0
        await client.close()

    asyncio.run(scenario())
    assert db_tasks(stack.database_url, BOB) == {
        bobs: {"title": "bob's", "status": "pending", "priority": 0, "tags": []}
    }


class GatedRelay:
    """An HTTP relay in front of the proxy with two gates: shape requests wait at ``stream_gate`` before they are
    forwarded (the stream is paused without a backoff), mutation answers wait at ``ack_gate`` after the write API
    committed (an acknowledgement in flight). ``waiting`` counts shape requests held at the gate."""

    def __init__(self, upstream: str) -> None:
        import threading

        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        self.stream_gate = threading.Event()
        self.ack_gate = threading.Event()
        self.stream_gate.set()
        self.ack_gate.set()
        self.waiting = 0
        self.forwarded_mutations = 0

        async def forward(request: Request) -> Response:
            headers = {k: v for k, v in request.headers.items() if k in ("authorization", "content-type")}
            async with httpx.AsyncClient(timeout=60) as client:
                answer = await client.request(
                    request.method,
                    upstream + request.url.path,
                    params=list(request.query_params.multi_items()),
                    content=await request.body(),
                    headers=headers,
                )
            passed = {
                k: v
                for k, v in answer.headers.items()
                if k.startswith("electric-") or k in ("content-type", "cache-control", "etag")
            }
            return Response(answer.content, answer.status_code, headers=passed)

        async def shape(request: Request) -> Response:
            if not self.stream_gate.is_set():
                self.waiting += 1
                await asyncio.to_thread(self.stream_gate.wait, 60)
                self.waiting -= 1
            return await forward(request)

        async def mutations(request: Request) -> Response:
            response = await forward(request)
            self.forwarded_mutations += 1
            await asyncio.to_thread(self.ack_gate.wait, 60)
            return response

        self.app = Starlette(
            routes=[Route("/v1/shape", shape, methods=["GET"]), Route("/v1/mutations", mutations, methods=["POST"])]
        )


def test_an_acknowledgement_in_flight_across_a_refetch_still_settles(stack: WriteStack) -> None:
    """The write commits before the rotated shape's new snapshot is taken, but its acknowledgement arrives only
    after that snapshot is up to date: the client must not apply the reset in between (the snapshot holds the write,
    so its txid will never stream in), or the item would stay pending forever."""
    relay = GatedRelay(stack.proxy_url)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with ServedApp(relay.app) as served:
            client = await start(served.url, ALICE)
            relay.stream_gate.clear()  # the stream's next request waits in the relay
            deadline = loop.time() + 30
            while relay.waiting == 0:
                assert loop.time() < deadline, "the stream never reached the gate"
                await asyncio.sleep(0.05)
            relay.ack_gate.clear()
            task_id = str(uuid.uuid4())
            await client.insert("tasks", {"id": task_id, "user_id": ALICE, "title": "acked late"})
            while relay.forwarded_mutations == 0:  # committed; its answer is held
                assert loop.time() < deadline, "the write never reached the write API"
                await asyncio.sleep(0.05)
            assert list(await asyncio.to_thread(db_tasks, stack.database_url)) == [task_id]
            handle = client._streams["tasks"].handle
            response = await asyncio.to_thread(
                httpx.delete, f"{stack.sync_url}/v1/shape", params={"handle": handle, "secret": SYNC_SECRET}
            )
            assert response.status_code == 202
            relay.stream_gate.set()  # 409, then the new snapshot (with the write) up to date
            while client._streams["tasks"].handle in (None, handle):
                assert loop.time() < deadline, "no refetch"
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)  # time enough to apply the new snapshot, were the client not waiting
            relay.ack_gate.set()
            await converge(client, stack.database_url, timeout=20)
            await client.close()

    asyncio.run(scenario())


def test_a_snapshot_of_wide_rows_is_staged_by_bytes_not_only_by_count(
    stack: WriteStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of tens of KB (a 1536-d vector, a long description) reach the byte limit long before the row-count
    limit: the client parks them in the replica file by bytes held, so memory follows bytes, and the replica
    still ends exactly as the database."""
    import pgferry.client.electric as electric
    from pgferry.client.replica import LocalReplica

    monkeypatch.setattr(electric, "_STAGE_AFTER_BYTES", 256 << 10)
    staged: list[int] = []
    original = LocalReplica.stage_pages

    def counting_stage(self: LocalReplica, name: str, pages: Any, **kwargs: Any) -> None:
        staged.append(sum(len(page.decoded()) for page in pages))
        original(self, name, pages, **kwargs)

    monkeypatch.setattr(LocalReplica, "stage_pages", counting_stage)
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(
            "insert into tasks (user_id, title, description) "
            "select %s, 'wide ' || n, repeat(md5(n::text), 600) from generate_series(1, 800) n",
            [ALICE],
        )

    async def scenario() -> None:
        client = await start(stack.proxy_url, ALICE)
        try:
            # 800 rows (~15 MB, four pages of ~4 MB) are far below the count limit; by bytes they are staged a page
            # or so at a time (the last page, with the up-to-date, is applied at once).
            assert len(staged) >= 2 and max(staged) < 800
            await converge(client, stack.database_url)
            descriptions = {str(r["id"]): r["description"] for r in client.query("tasks")}
            with psycopg.connect(stack.database_url) as conn:
                expected = dict(conn.execute("select id::text, description from tasks where user_id = %s", [ALICE]))
            assert descriptions == expected and len(expected) == 800
        finally:
            await client.close()

    asyncio.run(scenario())


# -- acknowledged writes that no shape of the client holds (issue 12) ---------------------------------------------
#
# Their txid never streams in: they settle when an up-to-date of their table's shape carries global_last_seen_lsn at
# or past the write API's commit position (``lsn``), or on acknowledgement when the client follows no stream of the
# table. The database, read as its owner, is the oracle for what was written.


def replica_target(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A replica in a SQLite file, or in a fresh database on the target server."""
    return str(tmp_path / "agent.db") if kind == "sqlite" else str(request.getfixturevalue("blank_url"))


def db_row(url: str, table: str, row_id: str) -> tuple[Any, ...] | None:
    with psycopg.connect(url) as conn:
        columns = "title, status" if table == "tasks" else "name, version"
        return conn.execute(f"select {columns} from {table} where id = %s", [row_id]).fetchone()


async def start_queued_only(
    url: str, path: str, tables: tuple[str, ...] = ("tasks",), *, where: str | None = "status = 'queued'"
) -> ElectricSupabaseClient:
    """A client whose shapes hold only Alice's rows with status 'queued' (the proxy adds the owner term)."""
    client = ElectricSupabaseClient()
    await client.initialize(
        ClientConfig(
            url=url,
            access_token=lambda: token_for(ALICE),
            replica_path=path,
            shape_params={"where": where} if where else {},
        )
    )
    await asyncio.wait_for(client.setup_sync(list(tables)), 30)
    return client


async def until_settled(client: ElectricSupabaseClient, timeout: float) -> float:
    """Seconds until the outbox is empty; an AssertionError naming the items' states after ``timeout``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while client.pending():
        if loop.time() - started > timeout:
            assert client.replica is not None
            states = [(item.state, item.txid, item.lsn) for item in client.replica.outbox()]
            raise AssertionError(f"not settled after {timeout} s: {states}")
        await asyncio.sleep(0.05)
    return loop.time() - started


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_write_outside_a_where_filtered_shape_settles_and_leaves_the_visible_table(
    stack: WriteStack, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """The row does not match the shape's where clause, so the stream never carries its txid. With nothing else
    written afterwards (an idle server) the item still settles within a few seconds, its optimistic row leaves the
    visible table (it is not in the shape), and the database holds it. Then a row in the shape that is updated out
    of it: the stream's delete (with the txid) settles it and removes it."""
    path = replica_target(kind, tmp_path, request)
    outside = str(uuid.uuid4())
    leaving = str(uuid.uuid4())

    async def scenario() -> None:
        client = await start_queued_only(stack.proxy_url, path)
        await client.insert("tasks", {"id": outside, "title": "not queued", "status": "pending"})
        assert [r["title"] for r in client.query("tasks")] == ["not queued"]  # optimistic, pending
        took = await until_settled(client, timeout=15)
        assert took < 10, f"settling took {took:.1f} s on an idle server"
        assert client.query("tasks") == []  # not in the shape: the synced table never had it
        assert await asyncio.to_thread(db_row, stack.database_url, "tasks", outside) == ("not queued", "pending")

        await client.insert("tasks", {"id": leaving, "title": "queued", "status": "queued"})
        await until_settled(client, timeout=15)
        assert [r["title"] for r in client.query("tasks", synced=True)] == ["queued"]
        await client.update("tasks", {"id": leaving, "status": "running"})
        assert [r["status"] for r in client.query("tasks")] == ["running"]  # optimistic
        await until_settled(client, timeout=15)
        assert client.query("tasks") == []  # the stream's delete: the row left the shape
        await client.close()

    asyncio.run(scenario())
    assert db_row(stack.database_url, "tasks", leaving) == ("queued", "running")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_write_to_a_table_the_client_does_not_follow_settles_on_acknowledgement(
    stack: WriteStack, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """The replica knows ``workflows`` from an earlier session, this one follows only ``tasks``: a write to
    ``workflows`` is delivered (from the table the replica recorded) and settled by its acknowledgement, since no
    stream of that table will ever show it; later items are not held up behind it."""
    path = replica_target(kind, tmp_path, request)
    workflow = str(uuid.uuid4())
    task = str(uuid.uuid4())

    async def scenario() -> None:
        client = await start_queued_only(stack.proxy_url, path, ("tasks", "workflows"), where=None)
        await client.close()
        client = await start_queued_only(stack.proxy_url, path, where=None)  # tasks only
        await client.insert("workflows", {"id": workflow, "name": "nightly"})
        await client.insert("tasks", {"id": task, "title": "after it", "status": "queued"})
        await until_settled(client, timeout=15)
        assert client.query("workflows") == []  # the replica's copy of an unfollowed table is not moved
        assert [r["title"] for r in client.query("tasks")] == ["after it"]
        await client.close()

    asyncio.run(scenario())
    assert db_row(stack.database_url, "workflows", workflow) == ("nightly", 1)
    assert db_row(stack.database_url, "tasks", task) == ("after it", "queued")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_an_acknowledged_write_outside_the_shape_settles_after_a_restart(
    stack: WriteStack, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """The item was acknowledged (``sent``, its commit position stored in the outbox) while no stream ran; the
    restarted client settles it from the stored position at its first up-to-date past it."""
    from pgferry.client import OutboxSender, open_replica

    path = replica_target(kind, tmp_path, request)
    outside = str(uuid.uuid4())

    async def scenario() -> None:
        client = await start_queued_only(stack.proxy_url, path)
        await client.close()
        replica = open_replica(path)
        row = {"id": outside, "user_id": str(ALICE), "title": "acked offline", "status": "pending"}
        replica.write("tasks", "insert", row, row)
        sender = OutboxSender(
            replica,
            stack.proxy_url,
            {"tasks": "public.tasks"},
            headers=lambda: {"authorization": f"Bearer {token_for(ALICE)}"},
        )
        assert (await sender.send_once()).sent == 1
        await sender.aclose()
        [item] = replica.outbox()
        assert item.state == "sent" and item.txid is not None and item.lsn is not None
        replica.close()

        client = await start_queued_only(stack.proxy_url, path)
        await until_settled(client, timeout=15)
        assert client.query("tasks") == []
        await client.close()

    asyncio.run(scenario())
    assert db_row(stack.database_url, "tasks", outside) == ("acked offline", "pending")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_an_outbox_from_before_commit_positions_gains_the_column(
    target_url: str, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """A replica written by the code before has no ``lsn`` column in its outbox: opening it adds the column and
    keeps the items. (``target_url``: the server pair whose target server holds a PostgreSQL replica.)"""
    from pgferry.client import open_replica

    path = replica_target(kind, tmp_path, request)
    replica = open_replica(path)
    schema = {"id": {"type": "uuid", "pk_index": 0}, "title": {"type": "text"}}
    replica.apply("tasks", "public.tasks", [], offset="0_0", handle="h", schema=schema)
    row = {"id": str(uuid.uuid4()), "title": "old"}
    replica.write("tasks", "insert", row, row)
    replica.query("alter table _pgferry_outbox drop column lsn")
    replica.close()

    reopened = open_replica(path)
    [item] = reopened.outbox()
    assert item.row == row and item.lsn is None
    reopened.acknowledge([{"id": item.mutation_id, "txid": "7", "lsn": "1/2A"}])
    [item] = reopened.outbox()
    assert (item.state, item.txid, item.lsn) == ("sent", 7, (1 << 32) | 0x2A)
    reopened.close()


def test_an_acknowledgement_after_an_up_to_date_past_its_commit_settles_at_once(
    target_url: str, tmp_path: Path
) -> None:
    """The stream already applied an up-to-date past the write's commit when the write API's answer arrives (held in
    a relay): the item settles with its acknowledgement, not at the next up-to-date, which on a quiet shape comes
    only after a long-poll's timeout (30 s here)."""
    with write_stack(target_url, tmp_path / "sync", live_timeout=30) as stack:
        relay = GatedRelay(stack.proxy_url)
        outside = str(uuid.uuid4())

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            with ServedApp(relay.app) as served:
                client = await start_queued_only(served.url, ":memory:")
                relay.ack_gate.clear()
                await client.insert("tasks", {"id": outside, "title": "not queued", "status": "pending"})
                deadline = loop.time() + 20
                while relay.forwarded_mutations == 0:  # committed; its answer is held
                    assert loop.time() < deadline, "the write never reached the write API"
                    await asyncio.sleep(0.05)
                # A later change in the shape: its up-to-date carries a position past the held write's commit.
                queued = str(uuid.uuid4())
                with psycopg.connect(stack.database_url, autocommit=True) as conn:
                    conn.execute(
                        "insert into tasks (id, user_id, title, status) values (%s, %s, 'elsewhere', 'queued')",
                        [queued, ALICE],
                    )
                while [r["title"] for r in client.query("tasks", synced=True)] != ["elsewhere"]:
                    assert loop.time() < deadline, "the later change never streamed in"
                    await asyncio.sleep(0.05)
                relay.ack_gate.set()
                took = await until_settled(client, timeout=10)
                assert took < 5, f"settled only after {took:.1f} s"
                assert [r["title"] for r in client.query("tasks")] == ["elsewhere"]
                await client.close()

        asyncio.run(scenario())
        assert db_row(stack.database_url, "tasks", outside) == ("not queued", "pending")
