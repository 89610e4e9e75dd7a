"""The pgferry sync dev server against the real ElectricSQL clients, on a real PostgreSQL.

Each test starts ``pgferry sync serve`` on a fresh database (the platform schema, ``public.tasks``) and drives
node scripts in ``tests/js`` that use the published ``@electric-sql/client`` (``ShapeStream`` + ``Shape``) and
``@electric-sql/pglite-sync`` (a real PGlite). The scripts print JSON lines; the tests wait on them with
deadlines, never with sleeps. Node and npm are required (CI installs them); ``npm ci`` runs once per session.

Protocol notes for whoever debugs a failure here: ../shared/facts/electric.md and the clients' own sources in
tests/js/node_modules/@electric-sql/*/src. Every HTTP exchange the clients make is printed as a ``request``/``response``
event and included in assertion messages.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pgferry.localstack.cluster import free_port

JS_DIR = Path(__file__).parent / "js"
DEADLINE = 60.0  # PGlite (WASM) starts in ~2 s on a quiet machine, ten times that under a loaded one
SECRET = "interop-sync-secret-0123456789"  # the dev server's; clients send it as the `secret` parameter
ALICE = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
BOB = uuid.UUID("00000000-0000-4000-8000-0000000000b2")

Event = dict[str, Any]


# --------------------------------------------------------------------------------------------------------------
# node / npm


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: the sync interop tests need Node.js >= 20 and npm (CI installs them)")
    return path


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """``npm ci`` in tests/js once per session (``npm install`` if the lock file is missing)."""
    node = _tool("node")
    npm = _tool("npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        pytest.fail(f"node {version} is too old: the Electric client needs Node.js >= 20")
    marker = JS_DIR / "node_modules" / ".package-lock.json"
    lock = JS_DIR / "package-lock.json"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        command = [npm, "ci" if lock.exists() else "install", "--no-audit", "--no-fund"]
        done = subprocess.run(command, cwd=JS_DIR, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed in {JS_DIR}:\n{done.stdout}\n{done.stderr}")
    return JS_DIR / "node_modules"


class NodeScript:
    """A node script printing JSON lines; events are collected by a reader thread."""

    def __init__(self, script: str, config: dict[str, Any]) -> None:
        self.script = script
        self.config = config
        self.events: list[Event] = []
        self.stderr: list[str] = []
        self._cursor = 0
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [_tool("node"), str(JS_DIR / script), json.dumps(config)],
            cwd=JS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "noise", "line": line}
            self._queue.put(event)
        self._queue.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())

    def _drain(self, timeout: float) -> bool:
        """Move queued events into ``self.events``; False once the process has ended and all is read."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return True
        while True:
            if item is None:
                self._queue.put(None)  # keep reporting the end
                return False
            self.events.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True

    def wait_for(self, predicate: Callable[[Event], bool], what: str, timeout: float = DEADLINE) -> Event:
        """The first event from the cursor on that matches; the cursor moves past it."""
        deadline = time.monotonic() + timeout
        alive = True
        while True:
            while self._cursor < len(self.events):
                event = self.events[self._cursor]
                self._cursor += 1
                if predicate(event):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not alive:
                break
            alive = self._drain(min(remaining, 0.2))
        pytest.fail(f"{self.script}: no {what} within {timeout:.0f} s\n{self.transcript()}")

    def wait_rows(self, predicate: Callable[[list[dict[str, Any]]], bool], what: str) -> Event:
        return self.wait_for(lambda e: e["event"] == "rows" and predicate(e["rows"]), f"rows where {what}")

    def seen(self, kind: str) -> list[Event]:
        self._drain(0.01)
        return [e for e in self.events if e["event"] == kind]

    def transcript(self, limit: int = 60) -> str:
        self._drain(0.01)
        lines = [json.dumps(e)[:600] for e in self.events[-limit:]]
        tail = "\n".join(self.stderr[-20:])
        return "events (last {}):\n{}\nstderr:\n{}".format(limit, "\n".join(lines), tail)

    def stop(self, timeout: float = 10.0) -> list[Event]:
        """Ask the script to stop (it prints its final position) and wait for it."""
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        while self._drain(0.2):
            pass
        return self.events

    def errors(self) -> list[Event]:
        return self.seen("error")


@pytest.fixture
def clients(node_modules: Path) -> Iterator[Callable[[str, dict[str, Any]], NodeScript]]:
    started: list[NodeScript] = []

    def start(script: str, config: dict[str, Any]) -> NodeScript:
        client = NodeScript(script, config)
        started.append(client)
        return client

    yield start
    for client in started:
        client.stop()


# --------------------------------------------------------------------------------------------------------------
# the dev server


def _pgferry_command() -> list[str]:
    if importlib.util.find_spec("pgferry.__main__") is not None:
        return [sys.executable, "-m", "pgferry"]
    script = Path(sys.executable).parent / "pgferry"
    if not script.exists():
        pytest.fail(f"neither `python -m pgferry` nor {script} is available")
    return [str(script)]


@dataclass
class DevServer:
    database_url: str
    data_dir: Path
    tables: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def shape_url(self) -> str:
        return f"{self.base}/v1/shape"

    def start(self) -> None:
        self.log_path = self.data_dir.parent / f"server-{self.port}-{time.monotonic_ns()}.log"
        command = [
            *_pgferry_command(),
            "sync",
            "serve",
            "--database-url",
            self.database_url,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        for table in self.tables:
            command += ["--table", table]
        command += self.extra_args
        env = {**os.environ, "ELECTRIC_SECRET": SECRET}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"pgferry sync serve exited with {self.proc.returncode}:\n{self.log()}")
            if self.health() == 200:
                return
            time.sleep(0.1)
        pytest.fail(f"pgferry sync serve not healthy within {DEADLINE:.0f} s:\n{self.log()}")

    def health(self) -> int | None:
        try:
            return httpx.get(f"{self.base}/v1/health", timeout=2).status_code
        except httpx.HTTPError:
            return None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-4000:]

    def request(self, method: str, query: str) -> int:
        return httpx.request(method, f"{self.shape_url}?{query}&secret={SECRET}", timeout=10).status_code


@pytest.fixture
def server(target_url: str, tmp_path: Path) -> Iterator[DevServer]:
    dev = DevServer(database_url=target_url, data_dir=tmp_path / "sync-data")
    dev.start()
    yield dev
    dev.stop()


# --------------------------------------------------------------------------------------------------------------
# rows in PostgreSQL


def insert_task(url: str, title: str, *, user_id: uuid.UUID = ALICE, status: str = "pending", priority: int = 0) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "insert into public.tasks (user_id, title, status, priority, tags, metadata)"
            " values (%s, %s, %s, %s, %s, %s) returning id",
            (user_id, title, status, priority, ["a", "b c"], json.dumps({"k": [1, 2]})),
        ).fetchone()
    assert row is not None
    return str(row[0])


def execute(url: str, statement: str, params: tuple[Any, ...] = ()) -> int:
    """Run one statement in its own transaction; returns its transaction id."""
    with psycopg.connect(url) as conn:
        conn.execute(statement, params)
        row = conn.execute("select pg_current_xact_id()::text").fetchone()
        conn.commit()
    assert row is not None
    return int(row[0])


def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(row["id"]): row for row in rows}


def titles(rows: list[dict[str, Any]]) -> set[str]:
    return {str(row["title"]) for row in rows}


def shape_config(server: DevServer, **extra: Any) -> dict[str, Any]:
    return {"url": server.shape_url, "table": "tasks", "secret": SECRET, **extra}


def assert_no_errors(client: NodeScript) -> None:
    assert client.errors() == [], client.transcript()


def change_messages(client: NodeScript) -> list[dict[str, Any]]:
    return [m for e in client.seen("batch") for m in e["messages"] if "key" in m]


# --------------------------------------------------------------------------------------------------------------
# ShapeStream + Shape


def test_initial_snapshot(target_url: str, server: DevServer, clients: Callable[..., NodeScript]) -> None:
    first = insert_task(target_url, "first", priority=3)
    second = insert_task(target_url, "second")
    client = clients("shape-stream.mjs", shape_config(server))
    event = client.wait_rows(lambda rows: len(rows) == 2, "both rows are there")
    rows = by_id(event["rows"])
    assert set(rows) == {first, second}
    row = rows[first]
    # Values are parsed by the types in electric-schema: int4 -> number, text[] -> array, jsonb -> object.
    assert row["title"] == "first"
    assert row["priority"] == 3
    assert row["tags"] == ["a", "b c"]
    assert row["metadata"] == {"k": [1, 2]}
    assert row["status"] == "pending"
    assert row["user_id"] == str(ALICE)
    assert row["description"] is None
    assert event["handle"], "the client must know the shape handle"
    # Electric's key format: "schema"."table"/"pk".
    keys = {m["key"] for m in change_messages(client)}
    assert keys == {f'"public"."tasks"/"{first}"', f'"public"."tasks"/"{second}"'}
    assert {m["headers"]["operation"] for m in change_messages(client)} == {"insert"}
    assert_no_errors(client)


def test_live_insert_update_delete(target_url: str, server: DevServer, clients: Callable[..., NodeScript]) -> None:
    keep = insert_task(target_url, "keep")
    client = clients("shape-stream.mjs", shape_config(server))
    client.wait_rows(lambda rows: titles(rows) == {"keep"}, "the snapshot arrived")

    added = insert_task(target_url, "added live", priority=7)
    event = client.wait_rows(lambda rows: titles(rows) == {"keep", "added live"}, "the live insert arrived")
    assert by_id(event["rows"])[added]["priority"] == 7

    execute(target_url, "update public.tasks set title = 'renamed', status = 'running' where id = %s", (added,))
    event = client.wait_rows(lambda rows: titles(rows) == {"keep", "renamed"}, "the live update arrived")
    updated = by_id(event["rows"])[added]
    assert updated["status"] == "running"
    assert updated["priority"] == 7, "an update without the column must keep the old value (partial update merge)"

    execute(target_url, "delete from public.tasks where id = %s", (keep,))
    event = client.wait_rows(lambda rows: titles(rows) == {"renamed"}, "the live delete arrived")
    operations = [m["headers"]["operation"] for m in change_messages(client)]
    assert operations == ["insert", "insert", "update", "delete"], client.transcript()
    assert_no_errors(client)


def test_live_change_carries_txid(target_url: str, server: DevServer, clients: Callable[..., NodeScript]) -> None:
    """The write path waits for its own txid: a change must carry the writing transaction's id."""
    client = clients("shape-stream.mjs", shape_config(server))
    client.wait_for(lambda e: e["event"] == "rows", "the first up-to-date")
    task_id = str(uuid.uuid4())
    xid = execute(
        target_url,
        "insert into public.tasks (id, user_id, title) values (%s, %s, 'with txid')",
        (task_id, ALICE),
    )
    client.wait_rows(lambda rows: titles(rows) == {"with txid"}, "the insert arrived")
    (message,) = [m for m in change_messages(client) if m["key"].endswith(f'/"{task_id}"')]
    assert xid in message["headers"].get("txids", []), message
    assert_no_errors(client)


def test_where_with_params(target_url: str, server: DevServer, clients: Callable[..., NodeScript]) -> None:
    insert_task(target_url, "alice low", priority=1)
    insert_task(target_url, "alice high", priority=3)
    insert_task(target_url, "bob high", user_id=BOB, priority=5)
    config = shape_config(server, where="user_id = $1 and priority >= $2", params=[str(ALICE), "2"])
    client = clients("shape-stream.mjs", config)
    client.wait_rows(lambda rows: titles(rows) == {"alice high"}, "only alice's high-priority row")
    first_url = client.seen("request")[0]["url"]
    assert "params%5B1%5D=" in first_url, first_url  # the client sends params[1]=..., params[2]=...

    insert_task(target_url, "bob live", user_id=BOB, priority=9)
    insert_task(target_url, "alice live", priority=9)
    event = client.wait_rows(lambda rows: "alice live" in titles(rows), "the matching live insert")
    assert titles(event["rows"]) == {"alice high", "alice live"}
    assert_no_errors(client)


def test_column_subset(target_url: str, server: DevServer, clients: Callable[..., NodeScript]) -> None:
    task = insert_task(target_url, "narrow", priority=2)
    client = clients("shape-stream.mjs", shape_config(server, columns=["id", "title", "status"]))
    event = client.wait_rows(lambda rows: len(rows) == 1, "the snapshot")
    assert set(event["rows"][0]) == {"id", "title", "status"}

    # A change to a column outside the shape must not add that column (or break anything).
    execute(target_url, "update public.tasks set priority = 9 where id = %s", (task,))
    execute(target_url, "update public.tasks set title = 'narrower' where id = %s", (task,))
    event = client.wait_rows(lambda rows: titles(rows) == {"narrower"}, "the title update")
    assert set(event["rows"][0]) == {"id", "title", "status"}
    for message in change_messages(client):
        assert set(message["value"]) <= {"id", "title", "status"}, message
    assert_no_errors(client)


def test_row_leaves_and_reenters_filtered_shape(
    target_url: str, server: DevServer, clients: Callable[..., NodeScript]
) -> None:
    moving = insert_task(target_url, "moving")
    insert_task(target_url, "staying")
    client = clients("shape-stream.mjs", shape_config(server, where="status = 'pending'"))
    client.wait_rows(lambda rows: titles(rows) == {"moving", "staying"}, "both pending rows")

    execute(target_url, "update public.tasks set status = 'running' where id = %s", (moving,))
    client.wait_rows(lambda rows: titles(rows) == {"staying"}, "the row that no longer matches is gone")
    left = [m for m in change_messages(client) if m["key"].endswith(f'/"{moving}"')][-1]
    assert left["headers"]["operation"] == "delete", left

    execute(target_url, "update public.tasks set status = 'pending', title = 'back' where id = %s", (moving,))
    event = client.wait_rows(lambda rows: titles(rows) == {"back", "staying"}, "the row moved back in")
    # A row moving in arrives whole (an insert), not as a partial update of a row the client doesn't have.
    assert by_id(event["rows"])[moving]["priority"] == 0
    assert_no_errors(client)


def test_resume_after_client_restart(target_url: str, server: DevServer, clients: Callable[..., NodeScript]) -> None:
    insert_task(target_url, "before")
    first = clients("shape-stream.mjs", shape_config(server))
    event = first.wait_rows(lambda rows: titles(rows) == {"before"}, "the snapshot")
    offset, handle = event["offset"], event["handle"]
    first.stop()
    assert_no_errors(first)

    later = insert_task(target_url, "while the client was away")
    second = clients("shape-stream.mjs", shape_config(server, offset=offset, handle=handle))
    event = second.wait_rows(lambda rows: len(rows) >= 1, "the changes since the stored offset")
    # The new Shape starts empty and only receives what happened after `offset`: no refetch, no old rows.
    assert titles(event["rows"]) == {"while the client was away"}, second.transcript()
    assert second.seen("must-refetch") == []
    assert {m["key"] for m in change_messages(second)} == {f'"public"."tasks"/"{later}"'}
    first_request = second.seen("request")[0]["url"]
    assert f"handle={handle}" in first_request and "offset=-1" not in first_request, first_request
    assert_no_errors(second)


def test_resume_after_server_restart(target_url: str, server: DevServer, clients: Callable[..., NodeScript]) -> None:
    insert_task(target_url, "before restart")
    client = clients("shape-stream.mjs", shape_config(server))
    event = client.wait_rows(lambda rows: titles(rows) == {"before restart"}, "the snapshot")
    handle = event["handle"]

    server.stop()
    insert_task(target_url, "while the server was down")
    server.start()  # same port, same data dir
    client.wait_rows(lambda rows: "while the server was down" in titles(rows), "the change made during the outage")
    insert_task(target_url, "after restart")
    event = client.wait_rows(lambda rows: "after restart" in titles(rows), "a change after the restart")
    assert titles(event["rows"]) == {"before restart", "while the server was down", "after restart"}
    assert client.seen("must-refetch") == [], "the shape must survive a server restart"
    assert event["handle"] == handle
    assert_no_errors(client)


def test_unknown_handle_gets_409_and_client_refetches(
    target_url: str, server: DevServer, clients: Callable[..., NodeScript]
) -> None:
    insert_task(target_url, "refetched")
    client = clients("shape-stream.mjs", shape_config(server, offset="0_inf", handle="no-such-handle"))
    client.wait_for(lambda e: e["event"] == "must-refetch", "a must-refetch")
    event = client.wait_rows(lambda rows: titles(rows) == {"refetched"}, "the refetched snapshot")
    assert event["handle"] and event["handle"] != "no-such-handle"
    conflict = next(e for e in client.seen("response") if e.get("status") == 409)
    assert conflict["headers"].get("electric-handle") == event["handle"], conflict
    assert json.loads(conflict["body"]) == [{"headers": {"control": "must-refetch"}}], conflict
    assert "application/json" in conflict["headers"].get("content-type", ""), conflict
    assert_no_errors(client)


def test_deleted_shape_makes_live_client_refetch(
    target_url: str, server: DevServer, clients: Callable[..., NodeScript]
) -> None:
    insert_task(target_url, "one")
    client = clients("shape-stream.mjs", shape_config(server))
    event = client.wait_rows(lambda rows: titles(rows) == {"one"}, "the snapshot")
    old_handle = event["handle"]
    assert server.request("DELETE", f"table=tasks&handle={old_handle}") in (200, 202, 204)
    insert_task(target_url, "two")
    client.wait_for(lambda e: e["event"] == "must-refetch", "a must-refetch after the shape was deleted")
    event = client.wait_rows(lambda rows: titles(rows) == {"one", "two"}, "the rebuilt shape")
    assert event["handle"] != old_handle
    assert_no_errors(client)


def test_replica_full_sends_whole_rows_and_old_value(
    target_url: str, server: DevServer, clients: Callable[..., NodeScript]
) -> None:
    task = insert_task(target_url, "full", priority=1)
    client = clients("shape-stream.mjs", shape_config(server, replica="full"))
    client.wait_rows(lambda rows: titles(rows) == {"full"}, "the snapshot")
    execute(target_url, "update public.tasks set priority = 2 where id = %s", (task,))
    client.wait_rows(lambda rows: by_id(rows)[task]["priority"] == 2, "the update")
    (update,) = [m for m in change_messages(client) if m["headers"]["operation"] == "update"]
    assert update["value"]["title"] == "full", "replica=full updates carry the whole row"
    assert update["value"]["tags"] == ["a", "b c"]
    assert update["old_value"]["priority"] == 1, update
    assert_no_errors(client)


def test_composite_key_and_escaping(target_url: str, clients: Callable[..., NodeScript], tmp_path: Path) -> None:
    """Electric's key: every pk column in pk order, `/` inside a value doubled, `"` left alone."""
    with psycopg.connect(target_url, autocommit=True) as conn:
        conn.execute("create table public.sync_pairs (a text, b int, note text, primary key (a, b))")
        conn.execute("""insert into public.sync_pairs values ('x/y"z', 2, 'first')""")
    server = DevServer(database_url=target_url, data_dir=tmp_path / "pairs", tables=("public.sync_pairs",))
    server.start()
    try:
        _composite_key_and_escaping(target_url, server, clients)
    finally:
        server.stop()


def _composite_key_and_escaping(target_url: str, server: DevServer, clients: Callable[..., NodeScript]) -> None:
    client = clients("shape-stream.mjs", shape_config(server, table="public.sync_pairs"))
    event = client.wait_rows(lambda rows: len(rows) == 1, "the snapshot")
    assert event["keys"] == ['"public"."sync_pairs"/"x//y"z"/"2"'], event
    assert event["rows"] == [{"a": 'x/y"z', "b": 2, "note": "first"}]
    execute(target_url, "update public.sync_pairs set note = 'second'")
    event = client.wait_rows(lambda rows: rows[0]["note"] == "second", "the update under the same key")
    assert len(event["rows"]) == 1
    assert_no_errors(client)


def test_live_sse_with_the_official_client(target_url: str, clients: Callable[..., NodeScript], tmp_path: Path) -> None:
    """``liveSse: true``: the client follows the shape over server-sent events; each stream ends after 2 s and the
    client reconnects from the offset it derives from the last up-to-date, missing and repeating nothing."""
    server = DevServer(database_url=target_url, data_dir=tmp_path / "sse", extra_args=("--sse-timeout", "2"))
    server.start()
    try:
        first = insert_task(target_url, "first")
        client = clients("shape-stream.mjs", shape_config(server, liveSse=True))
        client.wait_rows(lambda rows: titles(rows) == {"first"}, "the snapshot")
        second = insert_task(target_url, "second")
        client.wait_rows(lambda rows: titles(rows) == {"first", "second"}, "a live insert over SSE")
        sse_requests = 0

        def second_stream(event: Event) -> bool:
            nonlocal sse_requests
            if event["event"] == "request" and "live_sse=true" in event["url"]:
                sse_requests += 1
            return sse_requests >= 2

        client.wait_for(second_stream, "the client to reconnect after its first stream ended")
        execute(target_url, "update public.tasks set title = 'second, edited' where id = %s", (second,))
        execute(target_url, "delete from public.tasks where id = %s", (first,))
        client.wait_rows(lambda rows: titles(rows) == {"second, edited"}, "the update and the delete over SSE")
        streams = [r for r in client.seen("response") if "live_sse=true" in r["url"] and "status" in r]
        assert len(streams) >= 2, client.transcript()
        assert all(r["status"] == 200 for r in streams), client.transcript()
        assert all(r["headers"]["content-type"].startswith("text/event-stream") for r in streams), streams
        changes = change_messages(client)
        inserts = [m["key"] for m in changes if m["headers"]["operation"] == "insert"]
        assert len(inserts) == len(set(inserts)) == 2, changes
        assert [m["headers"]["operation"] for m in changes[2:]] == ["update", "delete"], changes
        assert_no_errors(client)
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------------------
# pglite-sync into a real PGlite


def pglite_config(server: DevServer, data_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"url": server.shape_url, "dataDir": str(data_dir), "shapeKey": "tasks", "secret": SECRET, **extra}


def test_pglite_sync_and_restart_resume(
    target_url: str, server: DevServer, clients: Callable[..., NodeScript], tmp_path: Path
) -> None:
    task = insert_task(target_url, "synced", priority=4)
    insert_task(target_url, "also synced", status="running")
    data_dir = tmp_path / "pglite"
    local = clients("pglite-sync.mjs", pglite_config(server, data_dir))
    assert local.wait_for(lambda e: e["event"] == "ready", "PGlite to open")["resumeFrom"] is None
    event = local.wait_rows(lambda rows: titles(rows) == {"synced", "also synced"}, "the initial sync")
    assert by_id(event["rows"])[task]["priority"] == 4

    execute(target_url, "update public.tasks set title = 'edited', priority = 5 where id = %s", (task,))
    local.wait_rows(lambda rows: titles(rows) == {"edited", "also synced"}, "the live update in PGlite")
    execute(target_url, "delete from public.tasks where title = 'also synced'")
    event = local.wait_rows(lambda rows: titles(rows) == {"edited"}, "the live delete in PGlite")
    assert by_id(event["rows"])[task]["priority"] == 5
    local.stop()
    assert_no_errors(local)
    assert local.seen("must-refetch") == []

    insert_task(target_url, "while offline")
    again = clients("pglite-sync.mjs", pglite_config(server, data_dir))
    resume = again.wait_for(lambda e: e["event"] == "ready", "PGlite to reopen")["resumeFrom"]
    assert resume is not None and resume["offset"] != "-1", resume
    again.wait_rows(lambda rows: titles(rows) == {"edited", "while offline"}, "the change made while offline")
    assert again.seen("must-refetch") == [], again.transcript()
    first_request = again.seen("request")[0]["url"]
    assert "offset=-1" not in first_request, first_request
    assert_no_errors(again)


def test_pglite_sync_refetches_when_server_forgets_shape(
    target_url: str, server: DevServer, clients: Callable[..., NodeScript], tmp_path: Path
) -> None:
    """pglite-sync's bundled client (1.0.14) reads must-refetch from the 409 *body*: the table is rebuilt."""
    insert_task(target_url, "kept")
    data_dir = tmp_path / "pglite"
    local = clients("pglite-sync.mjs", pglite_config(server, data_dir))
    local.wait_rows(lambda rows: titles(rows) == {"kept"}, "the initial sync")
    local.stop()

    server.stop()
    shutil.rmtree(server.data_dir)  # the server loses every shape
    server.start()
    execute(target_url, "delete from public.tasks")
    insert_task(target_url, "fresh")

    again = clients("pglite-sync.mjs", pglite_config(server, data_dir))
    again.wait_for(lambda e: e["event"] == "must-refetch", "onMustRefetch")
    again.wait_rows(lambda rows: titles(rows) == {"fresh"}, "the rebuilt table")
    assert_no_errors(again)


# --------------------------------------------------------------------------------------------------------------
# raw protocol edge cases (last, so a server bug here does not hide the client tests under -x)


def test_offset_beyond_the_log_is_rejected(target_url: str, server: DevServer) -> None:
    """Electric answers 400 {"offset": ["out of bounds for this shape"]} (api.ex handle_shape_info).

    Answering 200 + up-to-date with global_last_seen_lsn = the bogus offset instead poisons pglite-sync: it stores
    that lsn as last_lsn and afterwards drops every change whose lsn is lower, silently.
    """
    insert_task(target_url, "x")
    first = httpx.get(server.shape_url, params={"table": "tasks", "offset": "-1", "secret": SECRET}, timeout=10)
    handle = first.headers["electric-handle"]
    ahead = httpx.get(
        server.shape_url,
        params={"table": "tasks", "offset": "999999999999_0", "handle": handle, "secret": SECRET},
        timeout=10,
    )
    assert ahead.status_code == 400, (ahead.status_code, dict(ahead.headers), ahead.text)


# --------------------------------------------------------------------------------------------------------------
# through the shape proxy (PGlite through the proxy: tests/test_sync_proxy_dev_server.py)

PROXY_SECRET = "interop-test-jwt-secret-with-at-least-32-characters"


def _token(user: uuid.UUID) -> str:
    import jwt

    now = int(time.time())
    claims = {"sub": str(user), "role": "authenticated", "aud": "authenticated", "iat": now, "exp": now + 600}
    claims["iss"] = "http://127.0.0.1:54321/auth/v1"
    return jwt.encode(claims, PROXY_SECRET, algorithm="HS256")


@pytest.fixture
def proxy(server: DevServer, tmp_path: Path) -> Iterator[str]:
    """``pgferry sync proxy`` in front of the dev server, as ``pgferry dev up`` runs it; yields its shape URL."""
    port = free_port()
    env = {
        **os.environ,
        "SUPABASE_JWT_SECRET": PROXY_SECRET,
        "SUPABASE_URL": "http://127.0.0.1:54321",
        "SUPABASE_JWKS_URL": "",
        "ELECTRIC_SECRET": SECRET,  # the proxy adds it to what it forwards, as `pgferry dev up` runs it
    }
    command = [*_pgferry_command(), "sync", "proxy", "--upstream", server.base, "--port", str(port)]
    with (tmp_path / "proxy.log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("pgferry sync proxy did not start:\n" + (tmp_path / "proxy.log").read_text())
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1/shape"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_two_users_through_the_proxy_each_see_only_their_own_rows(
    target_url: str, proxy: str, clients: Callable[..., NodeScript]
) -> None:
    insert_task(target_url, "alice 1", user_id=ALICE)
    insert_task(target_url, "bob 1", user_id=BOB)
    alice = clients(
        "shape-stream.mjs", {"url": proxy, "table": "tasks", "headers": {"Authorization": f"Bearer {_token(ALICE)}"}}
    )
    bob = clients(
        "shape-stream.mjs",
        {"url": proxy, "table": "tasks", "where": "true or title <> $1", "params": ["x"],
         "headers": {"Authorization": f"Bearer {_token(BOB)}"}},
    )  # fmt: skip
    alice.wait_rows(lambda rows: titles(rows) == {"alice 1"}, "alice sees her row")
    bob.wait_rows(lambda rows: titles(rows) == {"bob 1"}, "bob's where clause cannot widen his shape")
    insert_task(target_url, "bob 2", user_id=BOB)
    insert_task(target_url, "alice 2", user_id=ALICE)
    alice.wait_rows(lambda rows: titles(rows) == {"alice 1", "alice 2"}, "alice gets her live insert")
    bob.wait_rows(lambda rows: titles(rows) == {"bob 1", "bob 2"}, "bob gets his live insert")
    assert all("bob" not in str(m["value"].get("title")) for m in change_messages(alice)), alice.transcript()
    assert_no_errors(alice)
    assert_no_errors(bob)
    refused = httpx.get(proxy, params={"table": "tasks", "offset": "-1"}, timeout=10)
    assert refused.status_code == 401


def test_live_sse_through_the_proxy(target_url: str, proxy: str, clients: Callable[..., NodeScript]) -> None:
    """The proxy streams SSE through unbuffered: each user's live changes arrive over their own event stream."""
    insert_task(target_url, "alice 1", user_id=ALICE)
    insert_task(target_url, "bob 1", user_id=BOB)
    alice = clients(
        "shape-stream.mjs",
        {"url": proxy, "table": "tasks", "liveSse": True, "headers": {"Authorization": f"Bearer {_token(ALICE)}"}},
    )
    alice.wait_rows(lambda rows: titles(rows) == {"alice 1"}, "alice's snapshot")
    alice.wait_for(lambda e: e["event"] == "request" and "live_sse=true" in e["url"], "an SSE request")
    insert_task(target_url, "bob 2", user_id=BOB)
    insert_task(target_url, "alice 2", user_id=ALICE)
    alice.wait_rows(lambda rows: titles(rows) == {"alice 1", "alice 2"}, "alice's live insert over SSE")
    streams = [r for r in alice.seen("response") if "live_sse=true" in r["url"] and "status" in r]
    assert streams and streams[0]["headers"]["content-type"].startswith("text/event-stream"), streams
    assert all("bob" not in str(m["value"].get("title")) for m in change_messages(alice)), alice.transcript()
    assert_no_errors(alice)
