"""The Realtime server's wire protocol frame by frame, with a plain websocket client against a real PostgreSQL.

Pins what Supabase's clients depend on and what the facts page documents (``../shared/facts/realtime.md``):
handshake refusals as HTTP responses with ``{"error": …}``, V1 objects with exactly ``topic/event/payload/ref``,
V2 arrays, heartbeats, error replies, ``access_token`` and ``phx_leave``; and that nothing a client sends takes the
server down (another client's change still arrives afterwards).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from pgferry.testing.asgi import ServedApp
from tests.realtime_helpers import USER_A, USER_B, anon_key, in_thread, insert_task, serve, sign, user_token


@pytest.fixture
def db(target_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def server(target_url: str, tmp_path: Path) -> Iterator[ServedApp]:
    with serve(target_url, tmp_path / "realtime") as served:
        yield served


def _ws(server: ServedApp, query: str) -> str:
    return f"ws://127.0.0.1:{server.port}/realtime/v1/websocket?{query}"


async def _send(ws: ClientConnection, topic: str, event: str, payload: Any, ref: str | None) -> None:
    await ws.send(json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref, "join_ref": None}))


async def _recv(ws: ClientConnection, timeout: float = 10.0) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def _until(ws: ClientConnection, predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        message = await _recv(ws, max(0.1, deadline - time.monotonic()))
        if predicate(message):
            return message


def _join_payload(token: str | None, **binding: Any) -> dict[str, Any]:
    config = {"broadcast": None, "presence": {"key": "", "enabled": False}, "private": False}
    config["postgres_changes"] = [{"event": "*", "schema": "public", "table": "tasks", **binding}]
    payload: dict[str, Any] = {"config": config}
    if token is not None:
        payload["access_token"] = token
    return payload


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("vsn=1.0.0", 401, "API key is missing"),
        ("apikey=not-a-jwt", 401, "The token provided is not a valid JWT"),
        ("apikey={expired}", 401, "Token has expired"),
        ("apikey={no_role}", 401, "Fields `role` and `exp` are required in JWT"),
        ("apikey={forged}", 401, "Failed to validate JWT signature"),
    ],
)
def test_refused_handshakes_are_http_responses_with_supabases_bodies(
    server: ServedApp, query: str, status: int, message: str
) -> None:
    now = int(time.time())
    tokens = {
        "expired": sign({"iss": "supabase", "role": "anon", "iat": now - 100, "exp": now - 60}),
        "no_role": sign({"iss": "supabase", "iat": now, "exp": now + 60}),
        "forged": sign({"iss": "supabase", "role": "anon", "iat": now, "exp": now + 60}, "another-secret" * 3),
    }

    async def scenario() -> None:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(_ws(server, query.format(**tokens))):
                pass
        response = refused.value.response
        assert response.status_code == status
        assert json.loads(response.body or b"{}") == {"error": message}

    asyncio.run(scenario())


def test_heartbeat_join_leave_and_v1_frames_carry_exactly_four_keys(server: ServedApp, db: Any) -> None:
    async def scenario() -> None:
        async with connect(_ws(server, f"apikey={anon_key()}")) as ws:
            await _send(ws, "phoenix", "heartbeat", {}, "7")
            assert await _recv(ws) == {
                "topic": "phoenix",
                "event": "phx_reply",
                "payload": {"status": "ok", "response": {}},
                "ref": "7",
            }
            await _send(ws, "realtime:t", "phx_join", _join_payload(user_token(USER_A)), "1")
            reply = await _recv(ws)
            assert set(reply) == {"topic", "event", "payload", "ref"} and reply["ref"] == "1"
            [binding] = reply["payload"]["response"]["postgres_changes"]
            assert binding["id"] and {k: v for k, v in binding.items() if k != "id"} == {
                "event": "*",
                "schema": "public",
                "table": "tasks",
            }
            system = await _recv(ws)
            assert system == {
                "topic": "realtime:t",
                "event": "system",
                "ref": None,
                "payload": {
                    "channel": "t",
                    "extension": "postgres_changes",
                    "message": "Subscribed to PostgreSQL",
                    "status": "ok",
                },
            }
            task = await in_thread(lambda: insert_task(db, USER_A, "x"))
            change = await _recv(ws)
            assert set(change) == {"topic", "event", "payload", "ref"} and change["ref"] is None
            assert change["payload"]["ids"] == [binding["id"]] and change["payload"]["data"]["record"]["id"] == task
            await _send(ws, "realtime:t", "phx_leave", {}, "2")
            assert (await _recv(ws))["payload"] == {"status": "ok", "response": {}}
            await in_thread(lambda: insert_task(db, USER_A, "after leave"))
            await _send(ws, "phoenix", "heartbeat", {}, "8")
            assert (await _recv(ws))["ref"] == "8"  # the change after the leave was not sent before this reply

    asyncio.run(scenario())


def test_v2_frames_are_arrays(server: ServedApp, db: Any) -> None:
    async def scenario() -> None:
        async with connect(_ws(server, f"apikey={anon_key()}&vsn=2.0.0")) as ws:
            await ws.send(json.dumps(["1", "1", "realtime:t", "phx_join", _join_payload(user_token(USER_A))]))
            reply = await _recv(ws)
            assert reply[:4] == ["1", "1", "realtime:t", "phx_reply"] and reply[4]["status"] == "ok"
            await _recv(ws)  # system
            await in_thread(lambda: insert_task(db, USER_A, "x"))
            change = await _recv(ws)
            assert change[:4] == [None, None, "realtime:t", "postgres_changes"]
            assert change[4]["data"]["type"] == "INSERT"

    asyncio.run(scenario())


def test_bad_frames_topics_and_tokens_get_errors_and_the_server_goes_on(server: ServedApp, db: Any) -> None:
    now = int(time.time())
    expired = sign({**_claims(USER_A), "exp": now - 30, "iat": now - 90})

    async def scenario() -> None:
        async with connect(_ws(server, f"apikey={anon_key()}")) as ws:
            for frame in ("not json", "[1,2]", '{"topic": 1}', '{"topic":"x","event":"y","payload":[]}'):
                await ws.send(frame)
                reply = await _recv(ws)
                assert reply["event"] == "phx_reply" and reply["payload"]["status"] == "error"
                assert reply["payload"]["response"]["reason"].startswith("malformed message")
            await _send(ws, "room:lobby", "phx_join", {}, "1")
            assert (await _recv(ws))["payload"]["response"] == {"reason": "unmatched topic"}
            await _send(ws, "realtime:", "phx_join", {}, "2")
            assert (await _recv(ws))["payload"]["response"]["reason"].startswith("TopicNameRequired")
            await _send(ws, "realtime:never-joined", "access_token", {"access_token": "x"}, "3")
            assert (await _recv(ws))["payload"]["response"] == {"reason": "unmatched topic"}
            await _send(ws, "realtime:t", "phx_join", _join_payload(expired), "4")
            assert (await _recv(ws))["payload"]["response"]["reason"].startswith("InvalidJWTToken: Token has expired")
            await _send(ws, "realtime:t", "phx_join", _join_payload("garbage"), "5")
            assert (await _recv(ws))["payload"]["response"]["reason"].startswith("MalformedJWT")
            await _send(ws, "realtime:t", "phx_join", {"config": {"postgres_changes": "tasks"}}, "6")
            assert (await _recv(ws))["payload"]["response"]["reason"].startswith("InvalidJoinPayload")
            # The same socket still works.
            await _send(ws, "realtime:t", "phx_join", _join_payload(user_token(USER_A)), "7")
            assert (await _recv(ws))["payload"]["status"] == "ok"
            await _recv(ws)
            task = await in_thread(lambda: insert_task(db, USER_A, "x"))
            assert (await _recv(ws))["payload"]["data"]["record"]["id"] == task

    asyncio.run(scenario())


def _claims(user: Any) -> dict[str, Any]:
    from pgferry.db.rls import user_claims

    return user_claims(user)


def test_access_token_refresh_changes_who_the_channel_acts_for(server: ServedApp, db: Any) -> None:
    """A pushed token replaces the claims: after switching to B's token, A's rows stop and B's arrive."""

    async def scenario() -> None:
        async with connect(_ws(server, f"apikey={anon_key()}")) as ws:
            await _send(ws, "realtime:t", "phx_join", _join_payload(user_token(USER_A)), "1")
            await _recv(ws)
            await _recv(ws)
            await _send(ws, "realtime:t", "access_token", {"access_token": user_token(USER_B)}, "2")
            await _send(ws, "phoenix", "heartbeat", {}, "3")
            assert (await _recv(ws))["ref"] == "3"  # accepted silently, as Realtime does
            await in_thread(lambda: insert_task(db, USER_A, "a"))
            theirs = await in_thread(lambda: insert_task(db, USER_B, "b"))
            assert (await _recv(ws))["payload"]["data"]["record"]["id"] == theirs
            await _send(ws, "realtime:t", "access_token", {"access_token": "garbage"}, "4")
            error = await _recv(ws)
            assert error["event"] == "system" and error["payload"]["status"] == "error"
            assert (await _recv(ws))["event"] == "phx_close"

    asyncio.run(scenario())


def test_an_expired_token_stops_delivery_until_a_fresh_one_arrives(server: ServedApp, db: Any) -> None:
    async def scenario() -> None:
        async with connect(_ws(server, f"apikey={anon_key()}")) as ws:
            short = sign({**_claims(USER_A), "exp": int(time.time()) + 2})
            await _send(ws, "realtime:t", "phx_join", _join_payload(short), "1")
            await _recv(ws)
            await _recv(ws)
            first = await in_thread(lambda: insert_task(db, USER_A, "while valid"))
            assert (await _recv(ws))["payload"]["data"]["record"]["id"] == first
            expired = await _until(ws, lambda m: m["event"] == "system", timeout=5)
            assert expired["payload"]["status"] == "error"
            assert expired["payload"]["message"].startswith("Token has expired")
            await in_thread(lambda: insert_task(db, USER_A, "while expired"))
            await _send(ws, "phoenix", "heartbeat", {}, "h1")
            await asyncio.sleep(0.5)
            assert (await _recv(ws))["ref"] == "h1"
            await _send(ws, "realtime:t", "access_token", {"access_token": user_token(USER_A)}, "2")
            later = await in_thread(lambda: insert_task(db, USER_A, "refreshed"))
            assert (await _recv(ws))["payload"]["data"]["record"]["id"] == later  # not the one while expired

    asyncio.run(scenario())


def test_closed_sockets_are_released_not_kept_until_their_tokens_expire(server: ServedApp) -> None:
    """Every channel has an expiry timer; a socket that goes must take its timers with it, or the server keeps each
    closed socket (and its buffers) for the token's lifetime — hours of memory growing with every reconnect."""
    import gc

    from pgferry.realtime.server import _Socket

    def alive() -> int:
        gc.collect()
        return sum(1 for item in gc.get_objects() if isinstance(item, _Socket))

    async def scenario() -> None:
        before = alive()
        for _ in range(10):
            async with connect(_ws(server, f"apikey={anon_key()}")) as ws:
                await _send(ws, "realtime:t", "phx_join", _join_payload(user_token(USER_A)), "1")
                await _recv(ws)
                await _recv(ws)
        deadline = time.monotonic() + 10
        while alive() > before and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert alive() == before

    asyncio.run(scenario())
