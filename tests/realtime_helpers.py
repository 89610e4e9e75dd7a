"""Helpers for the Realtime server tests: a served app on a real PostgreSQL, signed tokens, and a listener that
wraps supabase-py's official ``AsyncRealtimeClient`` (unchanged) and collects what its callbacks receive."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import psycopg
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates

from pgferry.db.rls import user_claims
from pgferry.realtime.server import RealtimeServerConfig, create_realtime_app
from pgferry.sync.auth import TokenVerifier
from pgferry.testing.asgi import ServedApp

JWT_SECRET = "realtime-test-jwt-secret-with-at-least-32-chars"
USER_A = uuid.UUID("00000000-0000-4000-8000-00000000000a")
USER_B = uuid.UUID("00000000-0000-4000-8000-00000000000b")


def sign(claims: dict[str, Any], secret: str = JWT_SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def user_token(user: uuid.UUID, *, ttl: int = 3600) -> str:
    return sign(user_claims(user, ttl_seconds=ttl))


def anon_key() -> str:
    now = int(time.time())
    return sign({"iss": "supabase", "role": "anon", "iat": now, "exp": now + 3600})


def make_app(url: str, data_dir: Path, *, slot: str | None = None, resume_grace: float = 15.0) -> Any:
    config = RealtimeServerConfig(
        database_url=url,
        verifier=TokenVerifier(jwt_secret=JWT_SECRET),
        data_dir=data_dir,
        slot=slot or f"pgferry_rt_test_{secrets.token_hex(4)}",
        resume_grace=resume_grace,
    )
    return create_realtime_app(config)


def serve(url: str, data_dir: Path, *, slot: str | None = None, port: int | None = None, **options: Any) -> ServedApp:
    return ServedApp(make_app(url, data_dir, slot=slot, **options), port=port)


def insert_task(conn: psycopg.Connection[Any], user: uuid.UUID, title: str, **values: Any) -> str:
    columns = {"user_id": user, "title": title, **values}
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join(["%s"] * len(columns))
    row = conn.execute(f"insert into tasks ({names}) values ({marks}) returning id::text", list(columns.values()))
    fetched = row.fetchone()
    assert fetched is not None
    return str(fetched[0])


class Listener:
    """One official client, one channel, every ``postgres_changes`` payload and system message it receives."""

    def __init__(self, base_url: str, token: str | None, *, apikey: str | None = None, **client: Any) -> None:
        self.client = AsyncRealtimeClient(f"{base_url}/realtime/v1", apikey or anon_key(), **client)
        self.token = token
        self.changes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.system: list[dict[str, Any]] = []
        self.states: list[tuple[RealtimeSubscribeStates, str | None]] = []
        self.channel: AsyncRealtimeChannel | None = None

    async def subscribe(
        self, topic: str = "tasks", *, event: str = "*", table: str = "tasks", filter: str | None = None
    ) -> AsyncRealtimeChannel:
        if self.token is not None:
            await self.client.set_auth(self.token)
        channel = self.client.channel(topic)
        channel.on_postgres_changes(
            event,  # type: ignore[arg-type]
            callback=lambda payload: self.changes.put_nowait(dict(payload)),
            table=table,
            filter=filter,
        )
        channel.on_system(lambda payload: self.system.append(dict(payload)))

        def state(status: RealtimeSubscribeStates, error: Exception | None) -> None:
            self.states.append((status, None if error is None else str(error)))

        await channel.subscribe(state)
        self.channel = channel
        return channel

    async def wait_subscribed(self, timeout: float = 10.0) -> None:
        await until(lambda: any(s.get("message") == "Subscribed to PostgreSQL" for s in self.system), timeout)

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.changes.get(), timeout)

    async def none(self, wait: float = 1.0) -> None:
        await asyncio.sleep(wait)
        assert self.changes.empty(), f"unexpected change: {self.changes.get_nowait()}"

    async def close(self) -> None:
        await self.client.close()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


async def in_thread(call: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(call)
