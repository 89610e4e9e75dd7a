"""Token expiry, server restarts (graceful and ``kill -9``) and a PostgreSQL restart, with supabase-py's official
client, unchanged, reconnecting on its own: every event the user may see arrives, none of another tenant's does."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from realtime import RealtimeSubscribeStates

from pgferry.localstack.cluster import free_port
from pgferry.testing.servers import ServerPair
from tests.realtime_helpers import (
    JWT_SECRET,
    USER_A,
    USER_B,
    Listener,
    in_thread,
    insert_task,
    serve,
    until,
    user_token,
)


@pytest.fixture
def db(target_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        yield conn


async def _collect(listener: Listener, wanted: set[str], timeout: float = 30.0) -> set[str]:
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while not wanted <= seen:
        payload = await listener.next(max(0.1, deadline - time.monotonic()))
        data = payload["data"]
        seen.add((data.get("record") or data.get("old_record"))["id"])
    return seen


def test_expired_token_stops_delivery_until_set_auth_gives_a_fresh_one(
    target_url: str, db: Any, tmp_path: Path
) -> None:
    async def scenario() -> None:
        with serve(target_url, tmp_path / "rt") as served:
            listener = Listener(served.url, user_token(USER_A, ttl=2))
            try:
                await listener.subscribe()
                await listener.wait_subscribed()
                first = await in_thread(lambda: insert_task(db, USER_A, "valid"))
                assert (await listener.next())["data"]["record"]["id"] == first
                # supabase-py reports the server's "Token has expired" system error as CHANNEL_ERROR ...
                await until(
                    lambda: any(s == RealtimeSubscribeStates.CHANNEL_ERROR for s, _ in listener.states), timeout=8
                )
                await in_thread(lambda: insert_task(db, USER_A, "expired"))
                await listener.none(1.0)
                # ... and rejoins on its timer with the token set_auth gave it.
                await listener.client.set_auth(user_token(USER_A))
                await until(
                    lambda: [s for s, _ in listener.states].count(RealtimeSubscribeStates.SUBSCRIBED) >= 2, timeout=20
                )
                later = await in_thread(lambda: insert_task(db, USER_A, "refreshed"))
                assert (await listener.next())["data"]["record"]["id"] == later
            finally:
                await listener.close()

    asyncio.run(scenario())


def test_graceful_server_restart_loses_no_event_for_a_reconnecting_client(
    target_url: str, db: Any, tmp_path: Path
) -> None:
    port = free_port()
    slot = f"pgferry_rt_restart_{port}"

    async def scenario() -> None:
        first = serve(target_url, tmp_path / "rt", slot=slot, port=port).start()
        listener = Listener(first.url, user_token(USER_A))
        try:
            await listener.subscribe()
            await listener.wait_subscribed()
            before = await in_thread(lambda: insert_task(db, USER_A, "before"))
            assert (await listener.next())["data"]["record"]["id"] == before
            await in_thread(first.stop)
            during = {await in_thread(lambda n=n: insert_task(db, USER_A, f"down {n}")) for n in range(3)}
            await in_thread(lambda: insert_task(db, USER_B, "not a's"))
            second = serve(target_url, tmp_path / "rt", slot=slot, port=port).start()
            try:
                after = await in_thread(lambda: insert_task(db, USER_A, "after"))
                seen = await _collect(listener, {*during, after})
                assert seen == {*during, after}
                await listener.none(0.5)
            finally:
                await in_thread(second.stop)
        finally:
            await listener.close()

    asyncio.run(scenario())


def _pgferry() -> list[str]:
    return [sys.executable, "-m", "pgferry"]


def _start_cli(url: str, port: int, data_dir: Path, slot: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SUPABASE_JWT_SECRET": JWT_SECRET}
    command = [
        *_pgferry(),
        "realtime",
        "serve",
        "--database-url",
        url,
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--slot",
        slot,
        "--resume-grace",
        "20",
    ]
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"pgferry realtime serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/realtime/v1/health", timeout=2).status_code in (200, 503):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"pgferry realtime serve did not start:\n{log.read_text()}")


def test_kill_9_of_the_cli_server_loses_no_event_for_a_reconnecting_client(
    target_url: str, db: Any, tmp_path: Path
) -> None:
    port = free_port()
    slot = f"pgferry_rt_kill_{port}"
    log = tmp_path / "server.log"
    proc = _start_cli(target_url, port, tmp_path / "rt", slot, log)

    async def scenario() -> None:
        nonlocal proc
        listener = Listener(f"http://127.0.0.1:{port}", user_token(USER_A), max_retries=20)
        try:
            await listener.subscribe()
            await listener.wait_subscribed()
            await asyncio.sleep(1.5)  # the server writes who is subscribed every second
            stream = [await in_thread(lambda: insert_task(db, USER_A, "stream 0"))]
            assert (await listener.next())["data"]["record"]["id"] == stream[0]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            during = {await in_thread(lambda n=n: insert_task(db, USER_A, f"dead {n}")) for n in range(3)}
            proc = await in_thread(lambda: _start_cli(target_url, port, tmp_path / "rt", slot, log))
            after = await in_thread(lambda: insert_task(db, USER_A, "after"))
            seen = await _collect(listener, {*during, after}, timeout=60)
            assert {*during, after} <= seen
        finally:
            await listener.close()

    try:
        asyncio.run(scenario())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_postgresql_restart_is_survived_without_a_lost_event(
    target_url: str, db: Any, tmp_path: Path, server_pair: ServerPair
) -> None:
    async def scenario() -> None:
        with serve(target_url, tmp_path / "rt") as served:
            listener = Listener(served.url, user_token(USER_A))
            try:
                await listener.subscribe()
                await listener.wait_subscribed()
                first = await in_thread(lambda: insert_task(db, USER_A, "before"))
                assert (await listener.next())["data"]["record"]["id"] == first
                await in_thread(server_pair.target.restart)
                with psycopg.connect(target_url, autocommit=True) as fresh:
                    after = {await in_thread(lambda n=n: insert_task(fresh, USER_A, f"after {n}")) for n in range(3)}
                seen = await _collect(listener, after, timeout=60)
                assert seen == after
            finally:
                await listener.close()

    asyncio.run(scenario())
