"""A hostile signed-in user against the proxy and the dev sync server, on real servers (issue 10).

Each attack is made the way a user with a valid token could make it; each must fail cleanly (a 4xx with Electric's
JSON error body, never a 500 or a traceback) and must not slow anyone else down: while it runs, a second user's
live change still reaches that user within a second, and neither health nor logs ever show that user's values.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest

from pgferry.sync.auth import TokenVerifier
from pgferry.sync.limits import UserLimits
from pgferry.sync.proxy import ProxyConfig, create_proxy_app
from pgferry.sync.server import SyncServerConfig, create_sync_app
from pgferry.testing.asgi import ServedApp
from tests.sync_helpers import Later

JWT_SECRET = "abuse-test-jwt-secret-with-at-least-32-characters"
SYNC_SECRET = "abuse-test-sync-secret-0123456789"
SUPABASE_URL = "http://127.0.0.1:54321"
ALICE = uuid.UUID("00000000-0000-4000-8000-0000000a11ce")  # the attacker
BOB = uuid.UUID("00000000-0000-4000-8000-000000000b0b")  # everyone else
CAROL = uuid.UUID("00000000-0000-4000-8000-0000000ca201")
BOB_SECRET_TITLE = "bob's private plan 4711"
FLOW_LIMIT = 1.0  # seconds: the bound for another user's live change while an attack runs


def token(user: uuid.UUID) -> str:
    now = int(time.time())
    claims = {
        "sub": str(user),
        "role": "authenticated",
        "aud": "authenticated",
        "iss": f"{SUPABASE_URL}/auth/v1",
        "iat": now,
        "exp": now + 600,
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


@dataclass
class Stack:
    """The dev server behind the proxy, as `pgferry dev up` runs them; ``db`` is an autocommit connection."""

    url: str
    data_dir: Path
    db: psycopg.Connection[Any]
    sync: ServedApp
    proxy: ServedApp

    def get(self, user: uuid.UUID, timeout: float = 30, **params: str) -> httpx.Response:
        query = {"table": "tasks", "offset": "-1", **params}
        headers = {"authorization": f"Bearer {token(user)}"}
        return httpx.get(self.proxy.url + "/v1/shape", params=query, headers=headers, timeout=timeout)

    def direct(self, method: str = "GET", **params: str) -> httpx.Response:
        return httpx.request(method, self.sync.url + "/v1/shape", params={"table": "tasks", **params}, timeout=30)

    def add(self, user: uuid.UUID, title: str, **values: Any) -> None:
        columns = {"user_id": user, "title": title, **values}
        names = ", ".join(columns)
        marks = ", ".join(["%s"] * len(columns))
        self.db.execute(f"insert into tasks ({names}) values ({marks})", list(columns.values()))


def _sync_app(url: str, data_dir: Path, **options: Any) -> ServedApp:
    config = SyncServerConfig(database_url=url, data_dir=data_dir, secret=SYNC_SECRET, live_timeout=5, **options)
    return ServedApp(create_sync_app(config))


@contextlib.contextmanager
def running(url: str, data_dir: Path, **options: Any) -> Iterator[Stack]:
    verifier = TokenVerifier(jwt_secret=JWT_SECRET, supabase_url=SUPABASE_URL)
    limits = UserLimits(max_shapes=5, max_concurrent_snapshots=2)
    with psycopg.connect(url, autocommit=True) as db, _sync_app(url, data_dir, **options) as sync:
        proxy_config = ProxyConfig(upstream=sync.url, verifier=verifier, electric_secret=SYNC_SECRET, limits=limits)
        with ServedApp(create_proxy_app(proxy_config)) as proxy:
            yield Stack(url, data_dir, db, sync, proxy)


@pytest.fixture
def stack(target_url: str, tmp_path: Path) -> Iterator[Stack]:
    with running(target_url, tmp_path / "sync") as running_stack:
        yield running_stack


class Follower:
    """A user following their shape through the proxy, live."""

    def __init__(self, stack: Stack, user: uuid.UUID) -> None:
        self.stack = stack
        self.user = user
        first = stack.get(user)
        assert first.status_code == 200, first.text
        while "electric-up-to-date" not in first.headers:
            first = self._next(first, live=False)
        self.last = first

    def _next(self, last: httpx.Response, *, live: bool) -> httpx.Response:
        params = {"offset": last.headers["electric-offset"], "handle": last.headers["electric-handle"]}
        if live:
            params.update(live="true", cursor=last.headers.get("electric-cursor", ""))
        response = self.stack.get(self.user, **params)
        assert response.status_code == 200, response.text
        return response

    def change_arrives(self, title: str) -> float:
        """Commit a row for this user while a live request waits; seconds from commit to its arrival."""
        waiting = Later(lambda: self._next(self.last, live=True))
        time.sleep(0.2)  # the long-poll is waiting
        started = time.monotonic()
        self.stack.add(self.user, title)
        response = waiting.result()
        elapsed = time.monotonic() - started
        titles = [m["value"]["title"] for m in response.json() if "key" in m]
        assert titles == [title], response.text
        self.last = response
        return elapsed


def assert_flows(bob: Follower, title: str) -> None:
    elapsed = bob.change_arrives(title)
    assert elapsed < FLOW_LIMIT, f"bob's change took {elapsed:.2f} s while the attack ran"


def assert_clean_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    body: dict[str, Any] = response.json()
    assert body["message"] and "Traceback" not in response.text
    return body


# --------------------------------------------------------------------------------------------------------------
# 1. Poison shapes


def test_a_poison_where_clause_never_stalls_anyone_and_leaks_no_values(
    target_url: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A clause that fails on other users' rows: through the proxy the owner term guards it, so it never meets
    them; sent straight to the sync server (no owner term), the failing shape is invalidated and nobody else
    notices. The feed never stops, health never shows a value, and a restart brings nothing back."""
    data_dir = tmp_path / "sync"
    with running(target_url, data_dir) as stack:
        stack.add(ALICE, "alice's row")
        stack.add(BOB, BOB_SECRET_TITLE)
        bob = Follower(stack, BOB)
        poison = f"1 / CAST((\"user_id\" = '{ALICE}') AS int4) = 1"
        alice = stack.get(ALICE, where=poison)
        assert alice.status_code == 200, alice.text
        assert [m["value"]["title"] for m in alice.json() if "key" in m] == ["alice's row"]
        cast_title = stack.get(ALICE, where='CAST("title" AS int4) > 0')  # fails on her own row: her problem
        assert "invalid text representation" in assert_clean_error(cast_title, 400)["errors"]["where"][0]
        assert_flows(bob, "bob after the poison shape")

        # Straight to the sync server (no owner term to guard it), a clause that fails only on Carol's rows: the
        # shape is created while she has none, then fails on her first one; it alone is invalidated.
        carol = Follower(stack, CAROL)
        carol_poison = f"1 / CAST((\"user_id\" <> '{CAROL}') AS int4) = 1"
        direct = stack.direct(where=carol_poison, offset="-1", secret=SYNC_SECRET)
        assert direct.status_code == 200, direct.text
        assert_flows(carol, BOB_SECRET_TITLE)  # the poison shape fails on this row; Carol gets it anyway
        assert_flows(bob, "bob after the failing shape")
        # Its handle is gone; the shape cannot be made again now that Carol has a row: a 400 naming the condition,
        # never the value (Electric answers 409 + a new handle; there is no new shape to point to).
        gone = stack.direct(
            where=carol_poison,
            offset=direct.headers["electric-offset"],
            handle=direct.headers["electric-handle"],
            secret=SYNC_SECRET,
        )
        assert "division by zero" in assert_clean_error(gone, 400)["errors"]["where"][0]
        again = stack.direct(where=carol_poison, offset="-1", secret=SYNC_SECRET)
        assert "division by zero" in assert_clean_error(again, 400)["errors"]["where"][0]
        assert BOB_SECRET_TITLE not in again.text
        health = httpx.get(stack.sync.url + "/v1/health")
        assert health.json() == {"status": "active"}
    with running(target_url, data_dir) as stack:  # the guarded poison shape is still on disk
        bob = Follower(stack, BOB)
        assert_flows(bob, "bob after a restart")
    logs = capfd.readouterr()
    assert BOB_SECRET_TITLE not in logs.out + logs.err
    assert "Traceback" not in logs.out + logs.err


# --------------------------------------------------------------------------------------------------------------
# 2. CPU-heavy where clauses


def test_cpu_heavy_where_clauses_are_400s_and_never_starve_other_users(target_url: str, tmp_path: Path) -> None:
    heavy = " OR ".join(['(("priority"::numeric + 7.5) ^ 100000) < 0'] * 50)
    with running(target_url, tmp_path / "sync", snapshot_timeout_ms=300) as stack:
        stack.db.execute(
            "insert into tasks (user_id, title, priority) select %s, 'a' || i, i from generate_series(1, 20000) i",
            [ALICE],
        )
        stack.add(BOB, "bob's task")
        bob = Follower(stack, BOB)
        refused = stack.get(ALICE, where=heavy)
        assert "exponent of ^" in assert_clean_error(refused, 400)["errors"]["where"][0]

        # Within the cost budget but slow on 20,000 rows: the per-shape statement timeout makes it a 400; six at
        # once are two snapshots (Alice's limit) and four 429s, and Bob's new shape does not wait behind them.
        def slow(i: int) -> httpx.Response:
            where = f'("priority"::numeric + 0.1234567890123456789012345678901{i}) ^ 63.5 < 0'
            return stack.get(ALICE, where=where)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            attempts = [pool.submit(slow, i) for i in range(6)]
            time.sleep(0.1)
            started = time.monotonic()
            bobs_new_shape = stack.get(BOB, where="priority >= 0")
            bob_waited = time.monotonic() - started
            assert_flows(bob, "bob during the heavy snapshots")
            answers = [attempt.result() for attempt in attempts]
        assert bobs_new_shape.status_code == 200, bobs_new_shape.text
        assert bob_waited < 5, f"bob's new shape waited {bob_waited:.1f} s behind alice's snapshots"
        statuses = sorted(answer.status_code for answer in answers)
        assert set(statuses) <= {400, 429} and 400 in statuses and 429 in statuses, statuses
        for answer in answers:
            body = assert_clean_error(answer, answer.status_code)
            if answer.status_code == 429:
                assert int(answer.headers["retry-after"]) >= 1
            else:
                assert "statement timeout" in body["errors"]["where"][0], body


# --------------------------------------------------------------------------------------------------------------
# 3. Long query strings


def asgi_get(app: Any, query: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """One GET /v1/shape straight into an ASGI app, as a server without a request-size limit would pass it on."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/shape",
        "raw_path": b"/v1/shape",
        "query_string": query.encode(),
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def test_long_query_strings_are_clean_4xx_never_a_500(stack: Stack, capfd: pytest.CaptureFixture[str]) -> None:
    stack.add(BOB, "bob's task")
    bob = Follower(stack, BOB)
    long_param = stack.get(ALICE, where="title = $1", **{"params[1]": "x" * 5000})
    assert "longer than 4096" in assert_clean_error(long_param, 400)["errors"]["params"][0]
    long_where = stack.get(ALICE, where="title = 'x' OR " * 400 + "true")
    assert_clean_error(long_where, 400)
    # 100,000 characters of params[1]: over the wire uvicorn refuses the request head itself (a 4xx) ...
    conn = http.client.HTTPConnection("127.0.0.1", int(stack.proxy.url.rsplit(":", 1)[1]), timeout=30)
    conn.request("GET", "/v1/shape?table=tasks&offset=-1&where=title%3D%241&params%5B1%5D=" + "x" * 100_000)
    wire = conn.getresponse()
    assert 400 <= wire.status < 500 and b"Traceback" not in wire.read(), wire.status
    conn.close()
    # ... and a server that passes it on gets a 414 JSON body from the proxy and from the sync server alone.
    query = "table=tasks&offset=-1&where=title%3D%241&params%5B1%5D=" + "x" * 100_000
    proxy_app = create_proxy_app(
        ProxyConfig(
            upstream=stack.sync.url,
            verifier=TokenVerifier(jwt_secret=JWT_SECRET, supabase_url=SUPABASE_URL),
            electric_secret=SYNC_SECRET,
        )
    )
    for app, headers in (
        (proxy_app, {"authorization": f"Bearer {token(ALICE)}"}),
        (create_sync_app(SyncServerConfig(database_url=stack.url, data_dir=stack.data_dir, secret=SYNC_SECRET)), {}),
    ):
        status, response_headers, body = asgi_get(app, query + f"&secret={SYNC_SECRET}", headers)
        assert status == 414 and response_headers["content-type"] == "application/json", (status, body[:200])
        assert json.loads(body)["message"] == "URI too long"
    assert_flows(bob, "bob after the long requests")
    logs = capfd.readouterr()
    assert "Traceback" not in logs.out + logs.err


# --------------------------------------------------------------------------------------------------------------
# 4. Shapes per user


def test_one_user_cannot_create_shapes_without_end(stack: Stack) -> None:
    stack.add(ALICE, "alice's task", priority=1)
    stack.add(BOB, "bob's task")
    bob = Follower(stack, BOB)
    for i in range(3):  # shapes the sync server refuses hold nothing and do not count
        assert_clean_error(stack.get(ALICE, where=f"priority = 'not a number {i}'"), 400)
    answers = [stack.get(ALICE, where=f"priority <> {1000 + i}") for i in range(8)]
    assert [a.status_code for a in answers[:5]] == [200] * 5
    for refused in answers[5:]:
        body = assert_clean_error(refused, 429)
        assert int(refused.headers["retry-after"]) >= 1 and "shapes" in body["errors"]["shape"][0]
    again = stack.get(ALICE, where="priority <> 1000")  # a shape she already uses is still served
    assert again.status_code == 200, again.text
    assert stack.get(BOB, where="priority <> 7").status_code == 200  # other users have their own budget
    assert_flows(bob, "bob while alice is at her limit")
    metrics = httpx.get(stack.sync.url + "/metrics").text
    assert "pgferry_sync_shapes 7.0" in metrics, metrics  # 5 of Alice's, 2 of Bob's


# --------------------------------------------------------------------------------------------------------------
# 5. The sync server itself


def test_the_sync_server_requires_its_secret_and_serves_only_its_tables(stack: Stack) -> None:
    stack.add(BOB, BOB_SECRET_TITLE)
    bob = Follower(stack, BOB)
    for params in ({}, {"secret": "wrong-secret-of-some-length"}, {"api_secret": "x"}):
        refused = stack.direct(offset="-1", **params)
        assert_clean_error(refused, 401)
        assert BOB_SECRET_TITLE not in refused.text
    handle = bob.last.headers["electric-handle"]
    assert_clean_error(stack.direct("DELETE", handle=handle), 401)
    for table in ("pgferry.alembic_version", "auth.users", "storage.objects", "pg_catalog.pg_class"):
        answer = stack.direct(table=table, offset="-1", secret=SYNC_SECRET)
        assert answer.status_code == 400, (table, answer.text)
    with stack.db.cursor() as cur:
        published = cur.execute(
            "select count(*) from pg_publication_tables where pubname like 'pgferry_sync_%%'"
            " and schemaname in ('pgferry', 'auth', 'storage')"
        ).fetchone()
        identity = cur.execute("select relreplident from pg_class where oid = 'auth.users'::regclass").fetchone()
    assert published == (0,) and identity == ("d",)
    preflight = httpx.options(
        stack.sync.url + "/v1/shape",
        headers={"origin": "https://evil.example", "access-control-request-method": "DELETE"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    assert_flows(bob, "bob after the direct requests")
    assert stack.direct(offset="-1", secret=SYNC_SECRET).status_code == 200  # the secret itself works
    assert stack.direct(offset="-1", api_secret=SYNC_SECRET).status_code == 200  # under its older name too


def test_served_tables_never_include_pgferry_or_supabase_schemas(target_url: str, tmp_path: Path) -> None:
    from pgferry.errors import ConfigError

    for table in ("pgferry.migration_runs", "auth.users", "storage.objects", "pg_catalog.pg_class"):
        with pytest.raises(ConfigError, match="never serves"):
            create_sync_app(
                SyncServerConfig(database_url=target_url, data_dir=tmp_path, secret=SYNC_SECRET, tables=(table,))
            )
    with pytest.raises(ConfigError, match="ELECTRIC_SECRET"):
        SyncServerConfig(database_url=target_url, data_dir=tmp_path)


def test_cors_of_the_sync_server_follows_its_configuration(target_url: str, tmp_path: Path) -> None:
    with _sync_app(target_url, tmp_path / "s", allow_origins=("https://app.example",)) as sync:
        allowed = httpx.options(
            sync.url + "/v1/shape",
            headers={"origin": "https://app.example", "access-control-request-method": "GET"},
        )
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        delete = httpx.options(
            sync.url + "/v1/shape",
            headers={"origin": "https://app.example", "access-control-request-method": "DELETE"},
        )
        assert delete.status_code == 400 and "DELETE" not in delete.headers.get("access-control-allow-methods", "")
        other = httpx.get(sync.url + "/v1/health", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_the_sync_server_bounds_shape_creation(target_url: str, tmp_path: Path) -> None:
    """Shapes beyond --max-shapes are a 429; while the creation queue is full, a new shape is a 503; both with
    Retry-After, and shapes that exist are still served."""
    with psycopg.connect(target_url, autocommit=True) as db:
        db.execute("insert into tasks (user_id, title) values (%s, 'x')", [ALICE])
        with _sync_app(target_url, tmp_path / "a", max_shapes=2) as sync:

            def direct(**params: str) -> httpx.Response:
                query = {"table": "tasks", "offset": "-1", "secret": SYNC_SECRET, **params}
                return httpx.get(sync.url + "/v1/shape", params=query, timeout=30)

            assert direct(where="priority > 0").status_code == 200
            assert direct(where="priority > 1").status_code == 200
            refused = direct(where="priority > 2")
            assert_clean_error(refused, 429)
            assert int(refused.headers["retry-after"]) >= 1
            assert direct(where="priority > 0").status_code == 200  # an existing shape is still served
        # A creation waiting (here: for a transaction open since tasks joined the publication) fills a queue of
        # one; the next new shape is told to come back.
        with _sync_app(target_url, tmp_path / "b", tables=("public.agent_executions",)):
            pass
        with psycopg.connect(target_url) as open_since_the_join:
            open_since_the_join.execute("insert into tasks (user_id, title) values (%s, 'y')", [ALICE])
            with _sync_app(
                target_url, tmp_path / "b", tables=("public.agent_executions", "public.tasks"), max_waiting_creations=1
            ) as sync:
                query = {"table": "tasks", "offset": "-1", "secret": SYNC_SECRET}
                first = Later(lambda: httpx.get(sync.url + "/v1/shape", params={**query, "where": "true"}, timeout=30))
                time.sleep(0.5)
                second = httpx.get(sync.url + "/v1/shape", params={**query, "where": "false"}, timeout=30)
                assert "being created" in assert_clean_error(second, 503)["errors"]["table"][0]
                assert int(second.headers["retry-after"]) >= 1
                assert first.result().status_code == 503  # it waited its 2 s and is told to retry, too


def test_simple_comparisons_guard_the_other_terms_wherever_they_are_written(stack: Stack) -> None:
    """The guard term is written last, after a term that fails on everyone else's rows. Evaluated in the order
    written (as a select list is), the clause would fail on Bob's next row and the shape would be invalidated;
    hoisted as a guard, the failing term never meets Bob's rows and the shape keeps following Alice's."""
    stack.add(ALICE, "alice 1")
    where = f"1 / CAST((user_id = '{ALICE}') AS int4) = 1 AND user_id = '{ALICE}'"
    first = stack.direct(where=where, offset="-1", secret=SYNC_SECRET)
    assert first.status_code == 200, first.text
    stack.add(BOB, BOB_SECRET_TITLE)
    stack.add(ALICE, "alice 2")
    seen: list[str] = []
    response = first
    deadline = time.monotonic() + 30
    while "alice 2" not in seen and time.monotonic() < deadline:
        response = stack.direct(
            where=where,
            offset=response.headers["electric-offset"],
            handle=response.headers["electric-handle"],
            live="true",
            secret=SYNC_SECRET,
        )
        assert response.status_code == 200, response.text  # a 409 here: the shape was invalidated
        seen += [m["value"]["title"] for m in response.json() if "key" in m]
    assert seen == ["alice 2"]
