"""RealtimeService (pgferry.supabase.realtime) over supabase-py's client against ``pgferry.realtime``'s server on a
real PostgreSQL: typed events, filters, unsubscribe, refusals, token refresh and reconnect with resubscribe."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgferry.db.rls import user_claims
from pgferry.localstack.cluster import free_port
from pgferry.supabase.errors import ServiceRoleKeyRefusedError
from pgferry.supabase.project import SupabaseProject
from pgferry.supabase.realtime import ChangeEvent, RealtimeService, RealtimeSubscribeError
from tests.realtime_helpers import JWT_SECRET, USER_A, USER_B, anon_key, in_thread, insert_task, serve, sign, user_token


@pytest.fixture
def db(target_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        yield conn


def _project(base: str) -> SupabaseProject:
    return SupabaseProject(base, anon_key(), jwt_secret=JWT_SECRET)


class _Refreshing:
    """A token source that mints short-lived tokens for one user and counts refreshes (an AuthService stand-in
    with real signatures; the server verifies every one)."""

    def __init__(self, user: uuid.UUID, ttl: int) -> None:
        self.user, self.ttl, self.refreshes = user, ttl, 0
        self.token = self._mint()

    def _mint(self) -> str:
        return sign({**user_claims(self.user), "exp": int(time.time()) + self.ttl, "session_id": str(uuid.uuid4())})

    async def access_token(self) -> str:
        return self.token

    async def refreshed_access_token(self) -> str | None:
        self.refreshes += 1
        self.token = self._mint()
        return self.token


async def _next(queue: asyncio.Queue[ChangeEvent], timeout: float = 10.0) -> ChangeEvent:
    return await asyncio.wait_for(queue.get(), timeout)


def test_subscribe_to_table_gets_typed_events_of_the_users_rows_only(target_url: str, db: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        with serve(target_url, tmp_path / "rt") as served:
            project = _project(served.url)
            got: asyncio.Queue[ChangeEvent] = asyncio.Queue()
            async with RealtimeService(project, user_token(USER_A)) as service:
                await service.subscribe_to_table("tasks", got.put_nowait)
                await in_thread(lambda: insert_task(db, USER_B, "theirs"))
                mine = await in_thread(lambda: insert_task(db, USER_A, "mine", priority=4))
                event = await _next(got)
                assert (event.type, event.table, event.schema) == ("INSERT", "tasks", "public")
                assert event.record is not None and event.record["id"] == mine and event.record["priority"] == 4
                assert event.old_record is None and event.errors == ()
                assert isinstance(event.commit_timestamp, dt.datetime) and event.commit_timestamp.tzinfo is not None
                assert ("id", "uuid") in {(c.name, c.type) for c in event.columns}
                await in_thread(lambda: db.execute("delete from tasks where id = %s", [mine]))
                deleted = await _next(got)
                assert deleted.type == "DELETE" and deleted.old_record is not None and deleted.old_record["id"] == mine
            await project.aclose()

    asyncio.run(scenario())


def test_subscribe_to_changes_filters_and_unsubscribe_stops_delivery(target_url: str, db: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        with serve(target_url, tmp_path / "rt") as served:
            project = _project(served.url)
            urgent: asyncio.Queue[ChangeEvent] = asyncio.Queue()
            every: list[ChangeEvent] = []

            async def slow(event: ChangeEvent) -> None:  # coroutine callbacks are awaited in their own task
                await asyncio.sleep(0)
                every.append(event)

            def broken(event: ChangeEvent) -> None:
                raise RuntimeError("a callback bug must not stop delivery")

            async with RealtimeService(project, user_token(USER_A)) as service:
                high = await service.subscribe_to_changes("tasks", "priority=gt.5", urgent.put_nowait, event="INSERT")
                await service.subscribe_to_table("tasks", broken)
                await service.subscribe_to_table("tasks", slow)
                await in_thread(lambda: insert_task(db, USER_A, "low", priority=1))
                top = await in_thread(lambda: insert_task(db, USER_A, "high", priority=9))
                assert (await _next(urgent)).record == {**(await _wait_for(every, 2))[1].record}  # type: ignore[dict-item]
                assert every[1].record is not None and every[1].record["id"] == top
                await service.unsubscribe(high)
                await in_thread(lambda: insert_task(db, USER_A, "higher", priority=10))
                await _wait_for(every, 3)
                assert urgent.empty()
                assert len(service.subscriptions) == 2
            await project.aclose()

    asyncio.run(scenario())


async def _wait_for(items: list[ChangeEvent], count: int, timeout: float = 10.0) -> list[ChangeEvent]:
    deadline = time.monotonic() + timeout
    while len(items) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(items)} of {count} events")
        await asyncio.sleep(0.02)
    return items


def test_refused_subscriptions_and_service_role_tokens_raise_named_errors(target_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        with serve(target_url, tmp_path / "rt") as served:
            project = _project(served.url)
            async with RealtimeService(project, user_token(USER_A)) as service:
                with pytest.raises(RealtimeSubscribeError, match="invalid input syntax for type integer"):
                    await service.subscribe_to_changes("tasks", "priority=eq.high", print)
                with pytest.raises(RealtimeSubscribeError, match="not in publication"):
                    await service.subscribe_to_table("no_such_table", print)
                with pytest.raises(RealtimeSubscribeError, match=r"column=operator\.value"):
                    await service.subscribe_to_changes("tasks", "priority", print)
                assert service.subscriptions == ()
            now = int(time.time())
            service_key = sign({"iss": "supabase", "role": "service_role", "iat": now, "exp": now + 60})
            async with RealtimeService(project, service_key) as privileged:
                with pytest.raises(ServiceRoleKeyRefusedError):
                    await privileged.subscribe_to_table("tasks", print)
            await project.aclose()

    asyncio.run(scenario())


def test_the_token_is_refreshed_before_it_expires_and_delivery_goes_on(
    target_url: str, db: Any, tmp_path: Path
) -> None:
    async def scenario() -> None:
        with serve(target_url, tmp_path / "rt") as served:
            project = _project(served.url)
            source = _Refreshing(USER_A, ttl=4)
            got: asyncio.Queue[ChangeEvent] = asyncio.Queue()
            async with RealtimeService(project, source, refresh_margin=2.0) as service:
                await service.subscribe_to_table("tasks", got.put_nowait)
                await asyncio.sleep(6.5)  # past the first token's exp: it must have been replaced on the channel
                assert source.refreshes >= 1
                task = await in_thread(lambda: insert_task(db, USER_A, "after the first token expired"))
                assert (await _next(got)).record["id"] == task  # type: ignore[index]
            await project.aclose()

    asyncio.run(scenario())


def test_reconnect_and_resubscribe_after_the_client_gave_up(target_url: str, db: Any, tmp_path: Path) -> None:
    """supabase-py stops after max_retries failed connects; the service builds a new client and rejoins."""
    port = free_port()
    slot = f"pgferry_rt_svc_{port}"

    async def scenario() -> None:
        first = serve(target_url, tmp_path / "rt", slot=slot, port=port).start()
        project = _project(first.url)
        got: asyncio.Queue[ChangeEvent] = asyncio.Queue()
        options = {"max_retries": 1, "initial_backoff": 0.2}
        async with RealtimeService(project, user_token(USER_A), reconnect_after=1.0, client_options=options) as svc:
            await svc.subscribe_to_changes("tasks", "priority=gte.0", got.put_nowait)
            await asyncio.sleep(1.5)  # the server notes who is subscribed every second
            await in_thread(first.stop)
            during = await in_thread(lambda: insert_task(db, USER_A, "while the server was down"))
            await asyncio.sleep(3)  # the client has given up by now
            second = serve(target_url, tmp_path / "rt", slot=slot, port=port, resume_grace=30.0).start()
            try:
                assert (await _next(got, 30)).record["id"] == during  # type: ignore[index]
                assert svc.reconnects >= 1
                task = await in_thread(lambda: insert_task(db, USER_A, "after reconnect"))
                assert (await _next(got, 20)).record["id"] == task  # type: ignore[index]
            finally:
                await in_thread(second.stop)
        await project.aclose()

    asyncio.run(scenario())
