"""``pgferry.client`` ShapeStream (blocking) and AsyncShapeStream against real servers: the dev sync server on a
real PostgreSQL, and the proxy in front of it with real tokens. The oracle is the database itself."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pgferry.client import AsyncShapeStream, ShapeOptions, ShapeRequestError, ShapeStream
from pgferry.sync import SyncServerConfig, create_sync_app
from pgferry.testing.asgi import ServedApp, free_port
from tests.sync_helpers import SECRET, USER, insert_task, make_server
from tests.write_helpers import ALICE, BOB, token_for, write_stack


@pytest.fixture
def db(target_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        yield conn


def titles(changes: list[Any]) -> list[str]:
    return sorted(str(c.value["title"]) for c in changes if c.operation != "delete")


def options(live: bool = True, **extra: Any) -> ShapeOptions:
    return ShapeOptions("tasks", extra={"secret": SECRET}, live=live, **extra)


def test_blocking_stream_pages_to_up_to_date_and_resumes_from_a_stored_offset(
    target_url: str, db: Any, tmp_path: Path
) -> None:
    for n in range(5):
        insert_task(db, f"task {n}")
    with make_server(target_url, tmp_path / "sync") as server:
        with ShapeStream(server.url, options(live=False)) as stream:
            batches = list(stream)
        assert batches[-1].up_to_date
        assert titles([c for b in batches for c in b.changes]) == [f"task {n}" for n in range(5)]
        assert batches[-1].schema is not None and batches[-1].schema["id"]["type"] == "uuid"
        offset, handle = stream.offset, stream.handle

        insert_task(db, "after the first sync")
        # A new process resumes from the persisted position: only what changed since, no snapshot again.
        with ShapeStream(server.url, options(), offset=offset, handle=handle) as resumed:
            seen: list[Any] = []
            for batch in resumed:
                seen.extend(batch.changes)
                if seen:
                    break
        assert titles(seen) == ["after the first sync"]
        assert seen[0].txids  # a streamed change carries its transaction id


def test_async_stream_follows_live_changes_and_refetches_a_rotated_shape(
    target_url: str, db: Any, tmp_path: Path
) -> None:
    insert_task(db, "first")

    async def scenario(server_url: str) -> list[Any]:
        events: list[Any] = []
        async with AsyncShapeStream(server_url, options()) as stream:
            async for batch in stream:
                events.append(batch)
                if batch.up_to_date and len([e for e in events if e.up_to_date]) == 1:
                    await asyncio.to_thread(insert_task, db, "live change")
                if any(c.value.get("title") == "live change" for c in batch.changes):
                    handle = stream.handle
                    deleted = await asyncio.to_thread(
                        httpx.delete,
                        server_url + "/v1/shape",
                        params={"table": "tasks", "handle": handle, "secret": SECRET},
                    )
                    assert deleted.status_code == 202
                if any(e.must_refetch for e in events) and batch.up_to_date and batch.changes:
                    return events
        return events

    with make_server(target_url, tmp_path / "sync", live_timeout=1.0) as server:
        events = asyncio.run(asyncio.wait_for(scenario(server.url), 60))
    assert any(c.value.get("title") == "live change" for e in events for c in e.changes)
    refetch = next(i for i, e in enumerate(events) if e.must_refetch)
    after = [c for e in events[refetch:] for c in e.changes]
    assert titles(after) == ["first", "live change"]  # the whole shape again, from a new snapshot


def dev_server(url: str, data_dir: Path, port: int) -> ServedApp:
    config = SyncServerConfig(database_url=url, data_dir=data_dir, live_timeout=1.0, secret=SECRET)
    return ServedApp(create_sync_app(config), port=port)


def test_stream_rides_out_a_server_restart_with_backoff(target_url: str, db: Any, tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "sync"
    with dev_server(target_url, data_dir, port) as server:
        stream = ShapeStream(server.url, options())
        assert next(b for b in stream if b.up_to_date).up_to_date
    # Down: the stream backs off and keeps trying; a change made meanwhile arrives once the server is back.
    insert_task(db, "while the server was down")
    results: list[Any] = []

    def follow() -> None:
        for batch in stream:
            results.extend(batch.changes)
            if results:
                return

    follower = threading.Thread(target=follow)
    follower.start()
    follower.join(1.5)
    assert follower.is_alive() and stream.state.failures >= 1
    with dev_server(target_url, data_dir, port):
        follower.join(30)
    stream.close()
    assert titles(results) == ["while the server was down"]


def test_through_the_proxy_each_user_gets_their_rows(target_url: str, tmp_path: Path) -> None:
    with write_stack(target_url, tmp_path / "sync") as stack:
        with psycopg.connect(target_url, autocommit=True) as conn:
            for user, title in ((ALICE, "alice's"), (BOB, "bob's")):
                conn.execute("insert into tasks (user_id, title) values (%s, %s)", [user, title])
        token = token_for(ALICE)
        with ShapeStream(
            stack.proxy_url, ShapeOptions("tasks", live=False), headers=lambda: {"authorization": f"Bearer {token}"}
        ) as stream:
            changes = [c for b in stream for c in b.changes]
        assert titles(changes) == ["alice's"]

        with pytest.raises(ShapeRequestError, match="401"):
            list(ShapeStream(stack.proxy_url, ShapeOptions("tasks", live=False), headers={"authorization": "Bearer x"}))
        with pytest.raises(ShapeRequestError, match=r"403.*table"):
            list(
                ShapeStream(
                    stack.proxy_url,
                    ShapeOptions("pgferry.applied_mutations", live=False),
                    headers={"authorization": f"Bearer {token}"},
                )
            )
    assert USER != ALICE and uuid.UUID(str(ALICE))
