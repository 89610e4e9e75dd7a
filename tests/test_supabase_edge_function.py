"""The ``search-tasks`` Edge Function, run for real under Deno against a real database with RLS in force.

What runs for real: the function (``supabase/functions/search-tasks``, unchanged, with supabase-js from npm) under
Deno; ``match_tasks`` on the local target database (baseline + pgferry's migrations, RLS policies as on Supabase);
token verification; ``FunctionsService`` invoking it over HTTP. What stands in: PostgREST's RPC route
(:mod:`pgferry.testing.postgrest_rpc`, which verifies the token and runs the call in an RLS-scoped transaction as
PostgREST does) and the functions gateway (``tests/deno/functions_gateway.ts``, routing
``/functions/v1/search-tasks``; the platform's own JWT check before the function is not reproduced).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest

from pgferry.db.rls import user_claims
from pgferry.supabase import errors as e
from pgferry.supabase.functions import FunctionsService
from pgferry.supabase.project import SupabaseProject
from pgferry.sync.auth import TokenVerifier
from pgferry.testing.asgi import ServedApp, free_port
from pgferry.testing.postgrest_rpc import rpc_app

ROOT = Path(__file__).resolve().parents[1]
FUNCTION_DIR = ROOT / "supabase" / "functions" / "search-tasks"
SECRET = "edge-function-test-secret-0123456789abcdef"
ISSUER_BASE = "http://127.0.0.1:54321"
DIMENSIONS = 1536


def _deno() -> str:
    found = shutil.which("deno", path=str(Path(sys.executable).parent)) or shutil.which("deno")
    if found is None:
        pytest.skip("deno is not installed (pip install deno; ./run setup installs it)")
    return found


def _token(user_id: uuid.UUID, *, ttl: int = 3600) -> str:
    return jwt.encode(user_claims(user_id, ttl_seconds=ttl, issuer=f"{ISSUER_BASE}/auth/v1"), SECRET, algorithm="HS256")


def _vector(axis: int, wobble: float = 0.0) -> list[float]:
    values = [0.0] * DIMENSIONS
    values[axis] = 1.0
    values[(axis + 1) % DIMENSIONS] = wobble
    return values


def test_search_tasks_logic_under_deno() -> None:
    """The function's own unit tests (validation, 4xx contract, PostgREST refusals passed on)."""
    result = subprocess.run(
        [_deno(), "test", "--quiet", "--config", str(FUNCTION_DIR / "deno.json"), str(FUNCTION_DIR)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 passed" in result.stdout


@pytest.fixture
def gateway(target_url: str) -> Iterator[tuple[str, str]]:
    """(functions base URL, database URL): PostgREST's RPC stand-in on the target database and the function under
    Deno, pointed at it."""
    verifier = TokenVerifier(jwt_secret=SECRET, supabase_url=ISSUER_BASE)
    with ServedApp(rpc_app(target_url, verifier)) as postgrest:
        port = free_port()
        env = {**os.environ, "SUPABASE_URL": postgrest.url, "SUPABASE_ANON_KEY": "anon-key-for-tests", "NO_COLOR": "1"}
        process = subprocess.Popen(
            [
                _deno(),
                "run",
                "--quiet",
                "--config",
                str(FUNCTION_DIR / "deno.json"),
                "--allow-net=127.0.0.1",
                "--allow-env",
                str(ROOT / "tests" / "deno" / "functions_gateway.ts"),
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                    break
                except httpx.TransportError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        output = process.stdout.read() if process.stdout else ""
                        pytest.fail(f"the Deno gateway did not start: {output[-2000:]}")
                    time.sleep(0.2)
            yield f"http://127.0.0.1:{port}", target_url
        finally:
            process.terminate()
            process.wait(10)


def test_search_tasks_end_to_end_with_rls(gateway: tuple[str, str]) -> None:
    base_url, database_url = gateway
    alice, bob = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(database_url, autocommit=True) as conn:
        for owner, title, vector in (
            (alice, "alice: tune the HNSW index", _vector(0, 0.05)),
            (alice, "alice: unrelated chore", _vector(7)),
            (bob, "bob: tune the HNSW index too", _vector(0, 0.04)),
        ):
            conn.execute(
                "insert into public.tasks (user_id, title, status, embedding) values (%s, %s, 'pending', %s)",
                (owner, title, str(vector)),
            )
    project = SupabaseProject(base_url, "anon-key-for-tests", jwt_secret=SECRET, timeout=30)
    try:
        query = {"query_embedding": _vector(0), "match_threshold": 0.8, "match_count": 5}
        as_alice = FunctionsService(project, _token(alice)).invoke("search-tasks", query)
        as_bob = FunctionsService(project, _token(bob)).invoke("search-tasks", query)
        assert [r["title"] for r in as_alice["results"]] == ["alice: tune the HNSW index"]
        assert [r["title"] for r in as_bob["results"]] == ["bob: tune the HNSW index too"]  # never alice's rows
        assert as_alice["results"][0]["similarity"] > 0.99
        stranger = FunctionsService(project, _token(uuid.uuid4())).invoke("search-tasks", query)
        assert stranger == {"results": [], "count": 0}

        with pytest.raises(e.FunctionHttpError) as invalid:
            FunctionsService(project, _token(alice)).invoke("search-tasks", {"query_embedding": [1, 2, 3]})
        assert invalid.value.status == 400 and invalid.value.body["field"] == "query_embedding"  # type: ignore[index]

        forged = jwt.encode(
            user_claims(alice, issuer=f"{ISSUER_BASE}/auth/v1"), "not-the-secret-0123456789abcdef0", algorithm="HS256"
        )
        with pytest.raises(e.FunctionHttpError, match="access token was refused") as refused:
            FunctionsService(project, forged).invoke("search-tasks", query)
        assert refused.value.status == 401

        with pytest.raises(e.FunctionNotFoundError):
            FunctionsService(project, _token(alice)).invoke("no-such-function", {})
    finally:
        project.close()
