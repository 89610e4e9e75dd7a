"""Benchmark pgferry's Realtime server (``postgres_changes``, RLS on) from the client side of the websocket.

Run from the project root::

    .venv/bin/python bench/realtime.py                                   # the issue's targets
    .venv/bin/python bench/realtime.py --changes 100 --rows 2000 --idle 2000   # a quick look

What is measured
----------------
One throwaway PostgreSQL server (``wal_level=logical``; fsync on unless ``--pg-fsync-off``) gets the platform
schema (the Supabase baseline plus pgferry's migrations: RLS on ``tasks`` with the owner policy, REPLICA IDENTITY
FULL, the ``supabase_realtime`` publication). ``pgferry realtime serve`` runs in its own process; the clients
are minimal websocket clients (vsn 1.0.0 frames, exactly what supabase-py sends; frames parsed in bulk) in this
process, each joined with its user's signed access token. Both run on the same machine and share its CPUs (load average
recorded).

1. **Commit → subscriber latency.** One subscriber (user 0); ``--changes`` single-row inserts of that user's tasks,
   ``--spacing`` apart, each timed from just after ``commit`` returns to the arrival of the frame carrying that row
   id. Then the same back to back (``burst``).
2. **Throughput with RLS.** ``--subscribers`` sockets (default 1,000) across ``--users`` users (default 100: ten
   subscribers each, every one a socket of its own with one channel on ``public.tasks``). A writer thread commits
   ``--rows`` inserts as fast as it can, in transactions of ``--rows-per-txn`` rows spread over all users; each
   row must reach exactly its owner's subscribers. Delivered messages per second = messages received by all
   clients ÷ (first commit → last message). Every client checks it got exactly the rows of its own user (the
   frames are parsed after the clock stops).
3. **Idle subscribers** (run before phase 2). ``--idle`` sockets (default 10,000), each joined to a channel and
   sending heartbeats; the server's RSS (``VmRSS``) once all are joined, and one change then still reaches its
   owner's subscribers.

Targets from the issue, printed PASS/FAIL: p50 ≤ 20 ms and p99 ≤ 100 ms (spaced); ≥ 20,000 delivered
messages/s with 1,000 subscribers across 100 users; 10,000 idle subscribers under 1 GB RSS. Supabase's published
ceiling with RLS is a few thousand messages/s (``../shared/facts/realtime.md``).

Output: ``bench/results/realtime-<YYYY-MM-DD>.json``, a summary on stdout, and the results block of the
``bench/realtime.py`` section of ``bench/README.md``. Servers and temporary directories are removed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
from readme_sections import replace_block  # bench/ is on sys.path when a benchmark runs as a script
from sync import (  # the sync benchmark's server-side helpers: one way to start PostgreSQL and watch a process
    HOST,
    BenchError,
    Database,
    RssSampler,
    _cpu_seconds,
    raise_fd_limit,
    say,
    sigterm_as_interrupt,
    summarize_ms,
)

from pgferry.db.rls import user_claims
from pgferry.localstack.cluster import free_port

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
README_START = "<!-- realtime-results:start -->"
README_END = "<!-- realtime-results:end -->"

TARGET_P50_MS = 20.0
TARGET_P99_MS = 100.0
TARGET_MESSAGES_PER_SECOND = 20_000
TARGET_IDLE = 10_000
TARGET_RSS_BYTES = 1 << 30
JWT_SECRET = "bench-realtime-jwt-secret-" + uuid.uuid4().hex


def user_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012x}"


def token(n: int) -> str:
    return jwt.encode(user_claims(user_id(n), ttl_seconds=6 * 3600), JWT_SECRET, algorithm="HS256")


def anon_key() -> str:
    now = int(time.time())
    return jwt.encode({"iss": "supabase", "role": "anon", "iat": now, "exp": now + 6 * 3600}, JWT_SECRET, "HS256")


@dataclass
class RealtimeServer:
    database_url: str
    data_dir: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def query(self) -> str:
        return f"apikey={anon_key()}&vsn=1.0.0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        profile = os.environ.get("PGFERRY_BENCH_PROFILE")  # a cProfile output path: where the server's time goes
        command = [
            sys.executable, *(["-m", "cProfile", "-o", profile] if profile else []),
            "-m", "pgferry", "realtime", "serve", "--database-url", self.database_url,
            "--host", HOST, "--port", str(self.port), "--data-dir", str(self.data_dir),
            "--slot", f"bench_realtime_{self.port}", "--resume-grace", "0",
        ]  # fmt: skip
        env = {**os.environ, "SUPABASE_JWT_SECRET": JWT_SECRET, "SUPABASE_JWKS_URL": "", "SUPABASE_URL": ""}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"realtime server exited {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(f"http://{HOST}:{self.port}/realtime/v1/health", timeout=2)
                if response.status_code == 200 and response.json().get("status") == "active":
                    return
            time.sleep(0.1)
        raise BenchError(f"realtime server not active after {timeout:.0f}s: {self.log_tail()}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:].strip()
        except FileNotFoundError:
            return ""


# --- clients -------------------------------------------------------------------------------------------------


class _RawWebSocket(asyncio.Protocol):
    """A minimal websocket client (RFC 6455: handshake, masked text frames out, unmasked frames in, pong) that
    parses frames in bulk as bytes arrive: with a thousand sockets in one Python process, the ``websockets``
    package's per-message machinery would make the load generator, not the server, the bottleneck."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.handshaken = False
        self.messages: asyncio.Queue[bytes] | None = asyncio.Queue()  # until the join is done
        self.frames: list[tuple[float, bytes]] = []
        self.keep = False
        self.count = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError("closed during the handshake"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.handshaken:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            self.handshaken = True
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                self.upgraded.set_exception(ConnectionError(head.decode(errors="replace")))
                return
            self.upgraded.set_result(None)
        buf = self.buffer
        now = time.perf_counter()
        offset = 0
        while len(buf) - offset >= 2:
            opcode = buf[offset] & 0x0F
            length = buf[offset + 1] & 0x7F
            head = 2
            if length == 126:
                if len(buf) - offset < 4:
                    break
                length = int.from_bytes(buf[offset + 2 : offset + 4], "big")
                head = 4
            elif length == 127:
                if len(buf) - offset < 10:
                    break
                length = int.from_bytes(buf[offset + 2 : offset + 10], "big")
                head = 10
            if len(buf) - offset < head + length:
                break
            payload = bytes(buf[offset + head : offset + head + length])
            offset += head + length
            if opcode == 1:
                if payload.startswith(b'{"topic":"phoenix"'):
                    continue  # a heartbeat reply
                self.count += 1
                if self.messages is not None:
                    self.messages.put_nowait(payload)
                elif self.keep:
                    self.frames.append((now, payload))
            elif opcode == 9:
                self._send(0xA, payload)
            elif opcode == 8:
                self.closed = True
        del buf[:offset]

    def _send(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = bytes([0x80 | opcode, 0x80 | length])
        elif length < 65536:
            header = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
        else:
            header = bytes([0x80 | opcode, 0x80 | 127]) + length.to_bytes(8, "big")
        key = (mask * (length // 4 + 1))[:length]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")
        self.transport.write(header + mask + masked)

    def send_text(self, text: str) -> None:
        self._send(1, text.encode())

    def heartbeat(self) -> None:
        """Every 20 s, as supabase-py does every 25 s: the server drops a socket silent for a minute."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        self.send_text('{"topic":"phoenix","event":"heartbeat","payload":{},"ref":null}')
        asyncio.get_running_loop().call_later(20, self.heartbeat)


class Client:
    """One socket, one channel on public.tasks as one user; frames kept raw (parsed only after the clock stops)."""

    def __init__(self, user: int) -> None:
        self.user = user
        self.protocol: _RawWebSocket | None = None

    @property
    def count(self) -> int:
        return self.protocol.count if self.protocol is not None else 0

    @property
    def frames(self) -> list[tuple[float, bytes]]:
        return self.protocol.frames if self.protocol is not None else []

    async def open(self, port: int, query: str, topic: str) -> None:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_RawWebSocket, HOST, port)
        self.protocol = protocol
        key = base64.b64encode(os.urandom(16)).decode()
        assert protocol.transport is not None
        protocol.transport.write(
            (
                f"GET /realtime/v1/websocket?{query} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await asyncio.wait_for(protocol.upgraded, 60)
        join = {
            "topic": f"realtime:{topic}",
            "event": "phx_join",
            "ref": "1",
            "join_ref": "1",
            "payload": {
                "config": {"postgres_changes": [{"event": "*", "schema": "public", "table": "tasks"}]},
                "access_token": token(self.user),
            },
        }
        protocol.send_text(json.dumps(join))
        assert protocol.messages is not None
        while True:  # the reply, then the system message: subscribed before anything is committed
            frame = json.loads(await asyncio.wait_for(protocol.messages.get(), 60))
            if frame["event"] == "system":
                if frame["payload"]["status"] != "ok":
                    raise BenchError(f"subscription refused: {frame['payload']}")
                break
            if frame["event"] == "phx_reply" and frame["payload"]["status"] != "ok":
                raise BenchError(f"join refused: {frame['payload']}")
        protocol.count = 0
        asyncio.get_running_loop().call_later(20, protocol.heartbeat)

    def listen(self, keep: bool) -> None:
        assert self.protocol is not None
        self.protocol.keep = keep
        self.protocol.messages = None

    async def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()


async def open_clients(server: RealtimeServer, users: Sequence[int], *, concurrency: int = 64) -> list[Client]:
    clients = [Client(user) for user in users]
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int, client: Client) -> None:
        async with gate:
            await client.open(server.port, server.query, f"tasks-{index}")

    await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    return clients


def insert_rows(url: str, users: Sequence[int], *, per_txn: int) -> tuple[float, list[str]]:
    """Commit one row per entry of ``users`` (that user's task), ``per_txn`` rows per transaction; returns the
    time of the first commit and the row ids in order."""
    ids: list[str] = []
    first = 0.0
    with psycopg.connect(url, autocommit=True) as conn:
        for start in range(0, len(users), per_txn):
            chunk = users[start : start + per_txn]
            rows = conn.execute(
                "insert into public.tasks (user_id, title) select u::uuid, 'bench ' || u from unnest(%s::text[]) u "
                "returning id::text",
                [[user_id(u) for u in chunk]],
            ).fetchall()
            if not first:
                first = time.perf_counter()
            ids.extend(str(r[0]) for r in rows)
    return first, ids


def _postgres_cpu(db: Database) -> float | None:
    """CPU of every process of the PostgreSQL server (postmaster and its children: backends, walsender, ...)."""
    assert db.cluster is not None
    try:
        postmaster = int((db.cluster.datadir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    total = _cpu_seconds(postmaster) or 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- phases --------------------------------------------------------------------------------------------------


async def latency(server: RealtimeServer, db_url: str, changes: int, spacing: tuple[float, float]) -> dict[str, Any]:
    [client] = await open_clients(server, [0])
    client.listen(keep=True)
    results: dict[str, Any] = {}
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            for label, gap in (("spaced", spacing), ("burst", (0.0, 0.0))):
                committed: dict[str, float] = {}
                client.frames.clear()
                for n in range(changes):
                    row = conn.execute(
                        "insert into public.tasks (user_id, title) values (%s, %s) returning id::text",
                        [user_id(0), f"latency {label} {n}"],
                    ).fetchone()
                    assert row is not None
                    committed[str(row[0])] = time.perf_counter()
                    if gap[1]:
                        await asyncio.sleep(random.uniform(*gap))
                    else:
                        await asyncio.sleep(0)
                deadline = time.monotonic() + 30
                while len(client.frames) < changes and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                seen = {}
                for at, text in list(client.frames):
                    frame = json.loads(text)
                    if frame["event"] == "postgres_changes":
                        seen[frame["payload"]["data"]["record"]["id"]] = at
                missing = [i for i in committed if i not in seen]
                if missing:
                    raise BenchError(f"{len(missing)} of {changes} changes never reached the subscriber ({label})")
                results[label] = summarize_ms([seen[i] - committed[i] for i in committed])
    finally:
        await client.close()
    return results


async def throughput(
    server: RealtimeServer, db: Database, subscribers: int, users: int, rows: int, per_txn: int
) -> dict[str, Any]:
    db_url = db.url
    owners = [n % users for n in range(subscribers)]
    opened = time.perf_counter()
    clients = await open_clients(server, owners)
    join_seconds = time.perf_counter() - opened
    for client in clients:
        client.listen(keep=True)
    per_user = {u: owners.count(u) for u in range(users)}
    writes = [random.randrange(users) for _ in range(rows)]
    expected = sum(per_user[u] for u in writes)
    cpu_before = _cpu_seconds(server.pid)
    clients_cpu_before = _own_cpu()
    pg_cpu_before = _postgres_cpu(db)
    done = asyncio.get_running_loop().create_future()
    first_commit: list[float] = []

    def write() -> None:
        try:
            start, ids = insert_rows(db_url, writes, per_txn=per_txn)
            first_commit.append(start)
            done.get_loop().call_soon_threadsafe(done.set_result, ids)
        except Exception as exc:  # reported by the awaiting side
            done.get_loop().call_soon_threadsafe(done.set_exception, exc)

    threading.Thread(target=write, daemon=True).start()
    ids: list[str] = await done
    written = time.perf_counter()
    deadline = time.monotonic() + 120
    while sum(c.count for c in clients) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    received = sum(c.count for c in clients)
    last = max((c.frames[-1][0] for c in clients if c.frames), default=time.perf_counter())
    elapsed = last - first_commit[0]
    cpu_after = _cpu_seconds(server.pid)
    clients_cpu = _own_cpu() - clients_cpu_before
    pg_cpu_after = _postgres_cpu(db)
    # Correctness, after the clock: each client got exactly its own user's rows, each once.
    by_user: dict[int, set[str]] = {}
    for uid, owner in zip(ids, writes, strict=True):
        by_user.setdefault(owner, set()).add(uid)
    wrong = 0
    for client in clients:
        got = [json.loads(text)["payload"]["data"]["record"]["id"] for _, text in client.frames]
        if sorted(got) != sorted(by_user.get(client.user, set())):
            wrong += 1
    for client in clients:
        await client.close()
    return {
        "subscribers": subscribers,
        "users": users,
        "rows": rows,
        "rows_per_transaction": per_txn,
        "expected_messages": expected,
        "received_messages": received,
        "clients_with_wrong_rows": wrong,
        "join_seconds": round(join_seconds, 2),
        "write_seconds": round(written - first_commit[0], 3),
        "seconds": round(elapsed, 3),
        "messages_per_second": round(received / elapsed) if elapsed > 0 else None,
        "server_cpu_seconds": None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 2),
        "load_generator_cpu_seconds": round(clients_cpu, 2),
        "postgres_cpu_seconds": None
        if pg_cpu_before is None or pg_cpu_after is None
        else round(pg_cpu_after - pg_cpu_before, 2),
    }


async def idle(server: RealtimeServer, db_url: str, count: int, sampler: RssSampler) -> dict[str, Any]:
    rss_before = sampler.now()
    opened = time.perf_counter()
    clients = await open_clients(server, [n % 100 for n in range(count)], concurrency=128)
    join_seconds = time.perf_counter() - opened
    await asyncio.sleep(2)
    rss = sampler.now()
    for client in clients:
        client.listen(keep=False)
    _, [row] = await asyncio.to_thread(insert_rows, db_url, [7], per_txn=1)
    owners = [c for c in clients if c.user == 7]
    deadline = time.monotonic() + 60
    while any(c.count == 0 for c in owners) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    reached = sum(1 for c in owners if c.count)
    others = sum(c.count for c in clients if c.user != 7)
    for client in clients:
        await client.close()
    return {
        "subscribers": count,
        "join_seconds": round(join_seconds, 1),
        "rss_bytes_before": rss_before,
        "rss_bytes": rss,
        "rss_bytes_per_subscriber": round((rss - rss_before) / count) if count else None,
        "change_reached_owner_subscribers": f"{reached}/{len(owners)}",
        "messages_to_other_users": others,
        "row": row,
    }


# --- report --------------------------------------------------------------------------------------------------


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    results = report["results"]
    out = []
    spaced = results.get("latency", {}).get("spaced", {})
    if spaced:
        out.append({"what": "commit → subscriber p50 (spaced)", "value": spaced["p50_ms"], "target": TARGET_P50_MS,
                    "met": spaced["p50_ms"] <= TARGET_P50_MS})  # fmt: skip
        out.append({"what": "commit → subscriber p99 (spaced)", "value": spaced["p99_ms"], "target": TARGET_P99_MS,
                    "met": spaced["p99_ms"] <= TARGET_P99_MS})  # fmt: skip
    flow = results.get("throughput")
    if flow:
        ok = flow["messages_per_second"] is not None and flow["messages_per_second"] >= TARGET_MESSAGES_PER_SECOND
        ok = ok and flow["clients_with_wrong_rows"] == 0 and flow["received_messages"] == flow["expected_messages"]
        out.append({"what": "delivered messages/s, RLS on", "value": flow["messages_per_second"],
                    "target": TARGET_MESSAGES_PER_SECOND, "met": ok})  # fmt: skip
    rest = results.get("idle")
    if rest:
        ok = rest["subscribers"] >= TARGET_IDLE and rest["rss_bytes"] < TARGET_RSS_BYTES
        out.append({"what": "idle subscribers, server RSS bytes", "value": rest["rss_bytes"],
                    "target": TARGET_RSS_BYTES, "met": ok})  # fmt: skip
    return out


def readme_block(report: dict[str, Any]) -> str:
    results = report["results"]
    machine = report["machine"]
    lines = [
        README_START,
        f"### Latest results ({report['date']})",
        "",
        f"`.venv/bin/python {report['command']}`",
        "",
        f"PostgreSQL {report.get('postgres', '?')}, 2 CPUs shared by the server, PostgreSQL, the load generator and "
        f"other work: 1-minute load average {machine['loadavg_1m_at_start']} at start, "
        f"{machine.get('loadavg_1m_at_end', '?')} at end. Full data: `bench/results/{report['results_file']}`.",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
    ]
    for item in report["targets"]:
        met = "yes" if item["met"] else "no"
        lines.append(f"| {item['what']} (target {item['target']:,}) | {item['value']:,} | {met} |")
    lines += ["", "| measurement | result |", "|---|---|"]
    for label, values in results.get("latency", {}).items():
        lines.append(
            f"| commit → subscriber, {label} | p50 {values['p50_ms']} ms, p95 {values['p95_ms']}, "
            f"p99 {values['p99_ms']}, max {values['max_ms']} ({values['count']} changes) |"
        )
    flow = results.get("throughput")
    if flow:
        per_message = (flow["server_cpu_seconds"] or 0) / max(1, flow["received_messages"]) * 1e6
        lines.append(
            f"| throughput, {flow['subscribers']} subscribers / {flow['users']} users, RLS on | "
            f"{flow['received_messages']:,} of {flow['expected_messages']:,} messages in {flow['seconds']} s "
            f"({flow['messages_per_second']:,}/s), wrong rows at {flow['clients_with_wrong_rows']} clients; "
            f"CPU: server {flow['server_cpu_seconds']} s ({per_message:.0f} µs/message), PostgreSQL "
            f"{flow['postgres_cpu_seconds']} s, load generator {flow['load_generator_cpu_seconds']} s |"
        )
    rest = results.get("idle")
    if rest:
        lines.append(
            f"| idle subscribers | {rest['subscribers']:,} joined in {rest['join_seconds']} s; server RSS "
            f"{rest['rss_bytes'] / 2**20:.0f} MiB ({rest['rss_bytes_per_subscriber']:,} B each beyond "
            f"{rest['rss_bytes_before'] / 2**20:.0f} MiB); a change then reached "
            f"{rest['change_reached_owner_subscribers']} owner subscribers, {rest['messages_to_other_users']} others |"
        )
    lines += [README_END]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--changes", type=int, default=300, help="single-row commits per latency variant")
    parser.add_argument("--spacing", type=float, nargs=2, default=(0.02, 0.05), help="seconds between commits")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--rows", type=int, default=20_000, help="rows inserted in the throughput phase")
    parser.add_argument("--rows-per-txn", type=int, default=50)
    parser.add_argument("--idle", type=int, default=10_000, help="idle subscribers (0: skip)")
    parser.add_argument("--pg-bindir", default=None)
    parser.add_argument("--pg-fsync-off", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not write results or the README block")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--tag", default="", help="results file realtime-<date>-<tag>.json; README block untouched")
    return parser.parse_args(argv)


async def run_phases(args: argparse.Namespace, server: RealtimeServer, db: Database, report: dict[str, Any]) -> None:
    sampler = RssSampler(server.pid).start()
    try:
        say("latency")
        report["results"]["latency"] = await latency(server, db.url, args.changes, tuple(args.spacing))
        if args.idle:  # before the throughput phase, so its RSS starts from a server that has not buffered 200k frames
            say(f"idle: {args.idle} subscribers")
            report["results"]["idle"] = await idle(server, db.url, args.idle, sampler)
        say(f"throughput: {args.subscribers} subscribers, {args.users} users, {args.rows} rows")
        report["results"]["throughput"] = await throughput(
            server, db, args.subscribers, args.users, args.rows, args.rows_per_txn
        )
        report["results"]["server_peak_rss_bytes"] = max((r for _, r in sampler.samples), default=0)
    finally:
        sampler.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    date = dt.date.today().isoformat()
    report: dict[str, Any] = {
        "benchmark": "realtime",
        "date": date,
        "command": " ".join(["bench/realtime.py", *(sys.argv[1:] if argv is None else argv)]),
        "results_file": f"realtime-{date}{'-' + args.tag if args.tag else ''}.json",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        },
        "parameters": vars(args) | {"server": "pgferry realtime serve in its own process; minimal websocket clients"},
        "results": {},
    }
    raise_fd_limit(max(args.idle, args.subscribers))  # each process holds one end of every socket
    base = Path(os.environ.get("PGFERRY_TEST_TMPDIR", tempfile.gettempdir()))
    root = Path(tempfile.mkdtemp(prefix="pgferry-bench-realtime-", dir=base))
    root.chmod(0o755)
    db = Database(root, args.pg_bindir, fsync=not args.pg_fsync_off)
    server: RealtimeServer | None = None
    started = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            say("starting PostgreSQL")
            db.start()
            report["postgres"] = db.version
            server = RealtimeServer(db.url, root / "realtime", root / "realtime.log")
            server.start()
            asyncio.run(run_phases(args, server, db, report))
    except KeyboardInterrupt:
        say("interrupted: servers stopped, files removed")
        return 130
    finally:
        if server is not None:
            server.stop()
        db.destroy()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    report["timestamp"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report["targets"] = targets(report)
    print(json.dumps({"targets": report["targets"], "results": report["results"]}, indent=2))
    if not args.no_write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / report["results_file"]
        path.write_text(json.dumps(report, indent=2) + "\n")
        if not args.tag:
            replace_block(README, README_START, README_END, readme_block(report))
        say(f"wrote {path.relative_to(BENCH_DIR.parent)} and the realtime block of bench/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
