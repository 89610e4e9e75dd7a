"""The proxy in front of the dev sync server, with real PGlite clients: each user syncs only their own rows.

This is the production read path on one machine: PGlite (``@electric-sql/pglite-sync``) → ``pgferry sync
proxy`` (token verified, where clause scoped to the user) → the dev server (standing in for Electric) → a real
PostgreSQL. It runs the README's example script unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest

from pgferry.sync.auth import TokenVerifier
from pgferry.sync.proxy import ProxyConfig, create_proxy_app
from pgferry.sync.server import SyncServerConfig, create_sync_app
from pgferry.testing.asgi import ServedApp

JS_DIR = Path(__file__).parent / "js"
SECRET = "test-only-jwt-secret-with-at-least-32-characters"
SYNC_SECRET = "proxy-to-dev-server-secret-0123"  # the dev server's; only the proxy knows it
SUPABASE_URL = "http://127.0.0.1:54321"
ALICE = uuid.UUID("00000000-0000-4000-8000-00000000a11c")
BOB = uuid.UUID("00000000-0000-4000-8000-000000000b0b")


def token_for(user: uuid.UUID, *, role: str = "authenticated", expires_in: int = 600) -> str:
    now = int(time.time())
    claims = {
        "sub": str(user),
        "role": role,
        "aud": "authenticated",
        "iss": f"{SUPABASE_URL}/auth/v1",
        "iat": now,
        "exp": now + expires_in,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None or not (JS_DIR / "node_modules" / "@electric-sql" / "pglite-sync").exists():
        pytest.fail("Node.js and the npm packages in tests/js are required: run ./run setup (npm ci in tests/js)")
    return found


@pytest.fixture
def stack(target_url: str, tmp_path: Path) -> Iterator[tuple[str, psycopg.Connection[Any]]]:
    """(proxy URL, a connection to the database behind it)."""
    config = SyncServerConfig(database_url=target_url, data_dir=tmp_path / "sync", live_timeout=2, secret=SYNC_SECRET)
    with ServedApp(create_sync_app(config)) as sync, psycopg.connect(target_url, autocommit=True) as conn:
        verifier = TokenVerifier(jwt_secret=SECRET, supabase_url=SUPABASE_URL)
        proxy_app = create_proxy_app(ProxyConfig(upstream=sync.url, verifier=verifier, electric_secret=SYNC_SECRET))
        with ServedApp(proxy_app) as proxy:
            yield proxy.url, conn


def add_task(conn: psycopg.Connection[Any], user: uuid.UUID, title: str) -> None:
    conn.execute("insert into tasks (user_id, title, tags) values (%s, %s, %s)", [user, title, ["a", "b c"]])


def run_example(
    node: str, proxy_url: str, token: str, data_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKEN": token, "PROXY_URL": proxy_url, "ONCE": "1", "PGLITE_DIR": str(data_dir or "")}
    return subprocess.run(
        [node, str(JS_DIR / "sync-tasks-example.mjs")], env=env, capture_output=True, text=True, timeout=120
    )


def test_each_user_syncs_only_their_own_tasks_into_pglite(node: str, stack: tuple[str, Any], tmp_path: Path) -> None:
    proxy_url, conn = stack
    add_task(conn, ALICE, "alice: plan the move")
    add_task(conn, ALICE, "alice: verify checksums")
    add_task(conn, BOB, "bob: rotate keys")

    alice = run_example(node, proxy_url, token_for(ALICE), tmp_path / "alice")
    assert alice.returncode == 0, alice.stderr
    rows = json.loads(alice.stdout.strip().splitlines()[-1])
    assert [r["title"] for r in rows] == ["alice: plan the move", "alice: verify checksums"]
    assert {r["user_id"] for r in rows} == {str(ALICE)}
    assert rows[0]["tags"] == ["a", "b c"]  # a text[] arrived as an array, parsed by the official client

    bob = run_example(node, proxy_url, token_for(BOB), tmp_path / "bob")
    assert bob.returncode == 0, bob.stderr
    assert [r["title"] for r in json.loads(bob.stdout.strip().splitlines()[-1])] == ["bob: rotate keys"]

    add_task(conn, ALICE, "alice: cut over")  # Alice's replica resumes from its stored offset and catches up
    again = run_example(node, proxy_url, token_for(ALICE), tmp_path / "alice")
    assert again.returncode == 0, again.stderr
    assert [r["title"] for r in json.loads(again.stdout.strip().splitlines()[-1])] == [
        "alice: cut over",
        "alice: plan the move",
        "alice: verify checksums",
    ]


@pytest.mark.parametrize("kind", ["expired", "service_role", "wrong_secret", "none"])
def test_bad_tokens_are_refused_before_the_dev_server(node: str, stack: tuple[str, Any], kind: str) -> None:
    proxy_url, conn = stack
    add_task(conn, ALICE, "secret plans")
    token = {
        "expired": token_for(ALICE, expires_in=-120),
        "service_role": token_for(ALICE, role="service_role"),
        "wrong_secret": jwt.encode({"sub": str(ALICE), "role": "authenticated"}, "x" * 40, algorithm="HS256"),
        "none": jwt.encode({"sub": str(ALICE), "role": "authenticated"}, None, algorithm="none"),
    }[kind]
    result = run_example(node, proxy_url, token)
    assert result.returncode == 1
    assert "secret plans" not in result.stdout
    assert "401" in result.stderr
    direct = httpx.get(
        proxy_url + "/v1/shape", params={"table": "tasks", "offset": "-1"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert direct.status_code == 401


def test_a_user_cannot_widen_the_shape_with_a_where_clause(stack: tuple[str, Any]) -> None:
    proxy_url, conn = stack
    add_task(conn, ALICE, "alice only")
    add_task(conn, BOB, "bob only")
    headers = {"Authorization": f"Bearer {token_for(ALICE)}"}
    cases = {  # where clause -> what Alice must see: her own rows that match it, never Bob's
        "true": ["alice only"],
        "user_id <> '00000000-0000-4000-8000-00000000a11c'": [],
        "title = 'bob only' or true": ["alice only"],
        "title = 'bob only'": [],
    }
    for where, expected in cases.items():
        response = httpx.get(
            proxy_url + "/v1/shape", params={"table": "tasks", "offset": "-1", "where": where}, headers=headers
        )
        assert response.status_code == 200, response.text
        titles = [m["value"]["title"] for m in response.json() if "key" in m]
        assert titles == expected, where
    hostile = httpx.get(
        proxy_url + "/v1/shape", params={"table": "tasks", "offset": "-1", "where": "true) or (true"}, headers=headers
    )
    assert hostile.status_code == 400


def test_unused_extra_params_cannot_carry_another_users_id(stack: tuple[str, Any]) -> None:
    """Alice sends a parameter her clause does not use, holding Bob's id. The owner's parameter is numbered past
    it; numbered after the used ones only, it would share number 2 with Bob's id and the upstream would choose."""
    proxy_url, conn = stack
    add_task(conn, ALICE, "x")
    add_task(conn, ALICE, "y")
    add_task(conn, BOB, "x")
    params = {"table": "tasks", "offset": "-1", "where": "title = $1", "params[1]": "x", "params[2]": str(BOB)}
    response = httpx.get(
        proxy_url + "/v1/shape", params=params, headers={"Authorization": f"Bearer {token_for(ALICE)}"}
    )
    assert response.status_code == 200, response.text
    rows = [m["value"] for m in response.json() if "key" in m]
    assert [(r["title"], r["user_id"]) for r in rows] == [("x", str(ALICE))]


def test_column_allow_list_keeps_columns_out_of_every_shape(target_url: str, tmp_path: Path) -> None:
    """`pgferry sync proxy --columns public.tasks=...`: embedding (and anything not listed) is never sent, neither
    selected explicitly, by default, nor usable in a where clause."""
    from pgferry.localstack.cluster import free_port

    config = SyncServerConfig(database_url=target_url, data_dir=tmp_path / "sync", secret=SYNC_SECRET)
    with ServedApp(create_sync_app(config)) as sync, psycopg.connect(target_url, autocommit=True) as conn:
        conn.execute(
            "insert into tasks (user_id, title, embedding) values (%s, 'with a vector',"
            " array_fill(0.5::real, array[1536])::extensions.vector)",
            [ALICE],
        )
        port = free_port()
        env = {
            **os.environ,
            "SUPABASE_JWT_SECRET": SECRET,
            "SUPABASE_URL": SUPABASE_URL,
            "SUPABASE_JWKS_URL": "",
            "ELECTRIC_SECRET": SYNC_SECRET,
        }
        command = [
            sys.executable, "-m", "pgferry", "sync", "proxy", "--upstream", sync.url, "--port", str(port),
            "--columns", "public.tasks=id,user_id,title,status",
        ]  # fmt: skip
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            base = f"http://127.0.0.1:{port}/v1/shape"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "the proxy did not start"
                time.sleep(0.1)
            headers = {"Authorization": f"Bearer {token_for(ALICE)}"}
            default = httpx.get(base, params={"table": "tasks", "offset": "-1"}, headers=headers)
            assert default.status_code == 200, default.text
            [row] = [m["value"] for m in default.json() if "key" in m]
            assert set(row) == {"id", "user_id", "title", "status"} and row["title"] == "with a vector"
            assert set(json.loads(default.headers["electric-schema"])) == {"id", "user_id", "title", "status"}
            for params in (
                {"columns": "id,title,embedding"},
                {"where": "embedding is not null"},
                {"columns": "id,description"},
            ):
                refused = httpx.get(base, params={"table": "tasks", "offset": "-1", **params}, headers=headers)
                assert refused.status_code == 403, (params, refused.text)
                assert refused.json()["message"] == "Forbidden"
        finally:
            proc.terminate()
            proc.wait(timeout=10)
