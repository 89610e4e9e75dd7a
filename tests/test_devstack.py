"""``pgferry dev``: two real servers from one command, harmless to repeat, clear about busy ports."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest

from pgferry.localstack.cluster import free_port
from pgferry.testing.servers import ServerPair
from tests.cli_helpers import run_pgferry


@pytest.fixture
def stack_env(server_pair: ServerPair) -> Iterator[dict[str, str]]:
    home = Path(tempfile.mkdtemp(prefix="pgferry-home-"))
    home.chmod(0o755)
    env = {"PGFERRY_HOME": str(home), "PGFERRY_PG_BINDIR": str(server_pair.install.bindir)}
    yield env
    run_pgferry("dev", "down", "--destroy", env=env)
    shutil.rmtree(home, ignore_errors=True)  # down --destroy keeps the home itself (its config and logs)


def test_dev_up_status_down(stack_env: dict[str, str], server_pair: ServerPair) -> None:
    ports = [str(free_port()) for _ in range(6)]
    up = run_pgferry(
        "dev", "up", "--source-port", ports[0], "--target-port", ports[1], "--sync-port", ports[2],
        "--proxy-port", ports[3], "--pooler-port", ports[4], "--api-port", ports[5], "--json", env=stack_env,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    status = run_pgferry("dev", "status", "--json", env=stack_env)
    assert status.returncode == 0, status.stderr
    urls = json.loads(status.stdout)
    assert set(urls) >= {"source", "target", "pooler", "sync", "proxy", "realtime", "api", "anon_key"}
    assert urls["api"] == f"http://127.0.0.1:{ports[5]}"
    # The pooler is PgBouncer in transaction mode in front of the target: two clients open at once share one
    # server session between their transactions (impossible directly or in session mode).
    with (
        psycopg.connect(urls["pooler"], autocommit=True, prepare_threshold=None) as first,
        psycopg.connect(urls["pooler"], autocommit=True, prepare_threshold=None) as second,
    ):
        pid = first.execute("select pg_backend_pid(), current_database()").fetchone()
        assert pid is not None and pid[1] == "postgres"
        assert second.execute("select pg_backend_pid()").fetchone() == (pid[0],)
    assert httpx.get(urls["sync"] + "/v1/health").json() == {"status": "active"}
    anon = jwt.decode(urls["anon_key"], options={"verify_signature": False})
    assert anon["role"] == "anon" and anon["exp"] > time.time() + 365 * 86400

    # The proxy in front of the sync server takes only tokens signed with the stack's secret.
    user = "6f1c2d4e-0000-4000-8000-000000000001"
    token = run_pgferry("dev", "token", "--user", user, env=stack_env).stdout.strip()
    shape = {"table": "tasks", "offset": "-1"}
    assert httpx.get(urls["proxy"] + "/v1/shape", params=shape).status_code == 401
    synced = httpx.get(urls["proxy"] + "/v1/shape", params=shape, headers={"Authorization": f"Bearer {token}"})
    assert synced.status_code == 200, synced.text
    assert synced.headers["electric-handle"]
    # Realtime on the API port, as `supabase start` has it: the official client with the anon key and a user token.
    _realtime_receives_own_insert(urls["api"], urls["anon_key"], token, urls["target"], user)

    # The sync server itself only answers requests carrying the secret `dev up` generated for the stack (and gave
    # to the proxy); it is private to the stack's home.
    direct = httpx.get(urls["sync"] + "/v1/shape", params=shape)
    assert direct.status_code == 401 and direct.json()["message"] == "Unauthorized", direct.text
    assert httpx.get(urls["sync"] + "/v1/shape", params={**shape, "secret": "guess" * 8}).status_code == 401
    secret_file = Path(stack_env["PGFERRY_HOME"]) / "dev" / "electric-secret"
    assert secret_file.stat().st_mode & 0o077 == 0
    with_secret = httpx.get(urls["sync"] + "/v1/shape", params={**shape, "secret": secret_file.read_text().strip()})
    assert with_secret.status_code == 200, with_secret.text
    with psycopg.connect(urls["source"]) as conn:
        version = conn.execute("show server_version_num").fetchone()
        assert version is not None and int(str(version[0])) // 10000 == server_pair.install.major_version
        assert conn.execute("show wal_level").fetchone() == ("logical",)
        assert conn.execute("select to_regclass('public.tasks')").fetchone() == ("tasks",)
        assert conn.execute("select to_regnamespace('auth')").fetchone() == (None,)
    with psycopg.connect(urls["target"]) as conn:
        assert conn.execute("show wal_level").fetchone() == ("logical",)
        rls = conn.execute(
            "select bool_and(relrowsecurity) from pg_class where relnamespace = 'public'::regnamespace "
            "and relkind = 'r'"
        ).fetchone()
        assert rls == (True,)
        assert conn.execute("select extversion is not null from pg_extension where extname = 'vector'").fetchone() == (
            True,
        )

    again = run_pgferry("dev", "up", "--json", env=stack_env)  # harmless, keeps the original ports
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["target"] == urls["target"]

    via_psql = run_pgferry("dev", "psql", "target", "-At", "-c", "select current_database()", env=stack_env)
    assert via_psql.returncode == 0, via_psql.stderr
    assert via_psql.stdout.strip() == "postgres"

    human = run_pgferry("dev", "status", env={**stack_env, "COLUMNS": "250"})
    assert human.returncode == 0, human.stderr
    for name in ("source", "target", "sync", "proxy"):  # each server on its own row, with its URL and "up"
        [row] = [line for line in human.stdout.splitlines() if f" {name} " in line]
        assert urls[name] in row and " up " in row, human.stdout

    down = run_pgferry("dev", "down", env=stack_env)
    assert down.returncode == 0
    stopped = json.loads(run_pgferry("dev", "status", "--json", env=stack_env).stdout)
    assert not any(server["running"] for server in stopped["servers"])
    restarted = run_pgferry("dev", "up", "--json", env=stack_env)  # data survives down/up
    assert restarted.returncode == 0, restarted.stderr
    resumed = httpx.get(
        urls["proxy"] + "/v1/shape",
        params={**shape, "offset": synced.headers["electric-offset"], "handle": synced.headers["electric-handle"]},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert resumed.status_code == 200, resumed.text  # the shape log survived the restart


def _realtime_receives_own_insert(api: str, anon_key: str, token: str, target: str, user: str) -> None:
    from realtime import AsyncRealtimeClient

    async def scenario() -> None:
        client = AsyncRealtimeClient(f"{api}/realtime/v1", anon_key)
        received: asyncio.Queue[Any] = asyncio.Queue()
        subscribed = asyncio.Event()
        try:
            await client.set_auth(token)
            channel = client.channel("dev-tasks")
            channel.on_postgres_changes("*", table="tasks", callback=received.put_nowait)  # type: ignore[arg-type]
            channel.on_system(lambda payload: subscribed.set())
            await channel.subscribe()
            await asyncio.wait_for(subscribed.wait(), 20)
            with psycopg.connect(target, autocommit=True) as conn:
                conn.execute("insert into tasks (user_id, title) values (%s, 'someone else''s')", [str(uuid.uuid4())])
                conn.execute("insert into tasks (user_id, title) values (%s, 'mine')", [user])
            payload = await asyncio.wait_for(received.get(), 20)
            assert payload["data"]["record"]["title"] == "mine"
        finally:
            await client.close()

    asyncio.run(scenario())


def test_dev_up_on_a_busy_port_fails_clearly(stack_env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_pgferry("dev", "up", "--source-port", str(port), "--target-port", str(free_port()), env=stack_env)
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and "in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_dev_status_before_up_says_what_to_do(stack_env: dict[str, str]) -> None:
    result = run_pgferry("dev", "status", env=stack_env)
    assert result.returncode == 2
    assert "pgferry dev up" in result.stderr


def test_demo_migrates_the_local_stack_and_verifies(stack_env: dict[str, str]) -> None:
    """The README's first command, end to end: stack up, seed "Neon", migrate into "Supabase", verify."""
    ports = ["--source-port", str(free_port()), "--target-port", str(free_port())]
    for _ in range(2):  # a second demo rolls the first one back and starts over
        result = run_pgferry("demo", "--scale", "0.02", *ports, env={**stack_env, "COLUMNS": "160"})
        assert result.returncode == 0, result.stderr[-2000:]
        assert "verification passed" in result.stdout
        assert "migration run 1: completed" in result.stdout
