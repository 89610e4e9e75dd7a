"""Benchmark the write path and the Python client: pgferry's write API, outbox, SQLite replica.

Run from the project root::

    .venv/bin/python bench/write.py                         # 100k rows synced, 200 writes, 10k outbox items
    .venv/bin/python bench/write.py --replica-rows 1000000  # the 1M-row replica memory target
    .venv/bin/python bench/write.py --replica-rows 100000 --pg-replica   # also into a PostgreSQL replica
    .venv/bin/python bench/write.py --replica-rows 20000 --embeddings    # wide rows: each with a 1536-d vector

What is measured
----------------
One throwaway PostgreSQL server (fsync on) gets the platform schema and ``--rows`` tasks (``bench/sync.py``'s
seed: 50 users). Every server runs in its own process, started with the CLI the README documents: the dev sync
server (``python -m pgferry sync serve --insecure``) and the proxy with the write API in front of it
(``python -m pgferry sync proxy --upstream … --database-url …``, the token secret from ``SUPABASE_JWT_SECRET``).
The clients measured run in a child process of their own (``--child-sync``, ``--child-writes``), so this process
only starts, waits and reports.

1. **Initial sync into SQLite**, in a child process (so its RSS is the client's alone): an
   ``ElectricSupabaseClient`` syncs the whole ``tasks`` table from the dev server into a fresh SQLite file and is
   timed from ``setup_sync`` to its return (up to date, applied, committed). The shape is materialised first by
   one plain HTTP client (its time, the server's snapshot included, is ``server_snapshot_seconds``), as a CDN or
   a second user would find it: the figure is the client's rate, not the dev server's snapshot rate. Its peak RSS
   (``ru_maxrss``) is reported; with ``--replica-rows 1000000`` this is the "1M replica rows under 300 MB" target.
   With ``--pg-replica`` the same client syncs again into a ``postgresql://`` replica: a fresh database on the
   same server (``PostgresReplica``, native column types), timed the same way. ``--embeddings`` seeds every
   task with its 1536-d embedding (the rows the generator otherwise leaves without one: ~19 KB of JSON each), a
   shape the replica was not tuned on; MB/s of the shape's JSON is reported beside rows/s.
2. **Local write → visible on another client** (child process). Two clients of one user (about ``rows/50`` rows
   each) through the proxy; client A updates a task ``--writes`` times, ``--spacing`` apart; the time from A's
   ``update`` returning (the write is in A's replica and outbox) to the new title being in B's replica is recorded.
3. **Outbox drain** (same child process). Client A's sender is pointed at a closed port, ``--outbox`` inserts are
   written locally, then the sender is pointed back at the proxy; the time until every item is acknowledged by the
   write API gives mutations per second (in the sender's batches, ``batch_size`` in the JSON).

Targets from issue 12, printed PASS/FAIL: write → visible p50 ≤ 50 ms, p99 ≤ 200 ms; outbox drain ≥ 10,000
mutations/s; initial sync into SQLite ≥ 50,000 rows/s; 1M replica rows under 300 MB RSS.

Output: ``bench/results/write-<YYYY-MM-DD>.json`` and a summary on stdout. Servers and temporary directories are
removed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt

from pgferry.client import ClientConfig, ElectricSupabaseClient
from pgferry.localstack.cluster import free_port

# The servers' side (bench/sync.py's Database and SyncServer, the proxy) is imported in run() only: the child
# process that measures the client's memory must not carry it.

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
JWT_SECRET = "bench-write-jwt-secret-with-at-least-32-chars"  # noqa: S105 - a throwaway server's
SUPABASE_URL = "http://127.0.0.1:54321"
USER = uuid.UUID("00000000-0000-4000-8000-000000000001")

TARGET_P50_MS = 50.0
TARGET_P99_MS = 200.0
TARGET_DRAIN_PER_SECOND = 10_000
TARGET_SYNC_ROWS_PER_SECOND = 50_000
TARGET_RSS_BYTES = 300 << 20


def token() -> str:
    now = int(time.time())
    claims = {
        "sub": str(USER),
        "role": "authenticated",
        "aud": "authenticated",
        "iss": f"{SUPABASE_URL}/auth/v1",
        "iat": now,
        "exp": now + 7200,
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


# -- 1. initial sync, in a child process ------------------------------------------------------------------------


async def child_sync(url: str, path: str) -> dict[str, Any]:
    client = ElectricSupabaseClient()
    await client.initialize(ClientConfig(url=url, replica_path=path))
    started = time.perf_counter()
    await client.setup_sync(["tasks"])
    seconds = time.perf_counter() - started
    assert client.replica is not None
    rows = client.replica.query('select count(*) from "tasks"')[0][0]
    await client.close()
    return {
        "rows": rows,
        "seconds": round(seconds, 3),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def materialise(sync_url: str) -> tuple[float, int]:
    """Page through the whole ``tasks`` shape once, as a first client would, so the server's snapshot of it exists;
    returns the seconds it took (the server's snapshot included) and the bytes of JSON it is."""
    started = time.perf_counter()
    params = {"table": "public.tasks", "offset": "-1"}
    json_bytes = 0
    while True:
        response = httpx.get(f"{sync_url}/v1/shape", params=params, timeout=120)
        response.raise_for_status()
        json_bytes += len(response.content)
        if "electric-up-to-date" in response.headers:
            return time.perf_counter() - started, json_bytes
        params = {
            "table": "public.tasks",
            "offset": response.headers["electric-offset"],
            "handle": response.headers["electric-handle"],
        }


def initial_sync(sync_url: str, root: Path, replica_url: str | None = None) -> dict[str, Any]:
    """Into a fresh SQLite file, or into the PostgreSQL database ``replica_url`` (``--pg-replica``)."""
    path = root / f"replica-{uuid.uuid4().hex[:8]}.db"
    output = subprocess.run(
        [sys.executable, __file__, "--child-sync", sync_url, replica_url or str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(output.stdout.strip().splitlines()[-1])
    result["rows_per_second"] = round(result["rows"] / result["seconds"])
    if replica_url is None:
        result["replica_file_bytes"] = path.stat().st_size
    return result


# -- 2. and 3. through the proxy --------------------------------------------------------------------------------


async def start_client(url: str) -> ElectricSupabaseClient:
    client = ElectricSupabaseClient()
    await client.initialize(ClientConfig(url=url, access_token=token))
    await client.setup_sync(["tasks"])
    return client


async def write_to_visible(proxy_url: str, writes: int, spacing: float) -> dict[str, Any]:
    a = await start_client(proxy_url)
    b = await start_client(proxy_url)
    assert b.replica is not None
    task_id = str(a.query("tasks")[0]["id"])
    key = b.replica.key_of("tasks", {"id": task_id})
    latencies: list[float] = []
    for n in range(writes):
        title = f"bench write {n} {uuid.uuid4().hex[:6]}"
        await a.update("tasks", {"id": task_id, "title": title})
        written = time.perf_counter()
        while True:
            found = b.replica.query('select title from "_synced_tasks" where _key = ?', [key])
            if found and found[0][0] == title:
                latencies.append(time.perf_counter() - written)
                break
            if time.perf_counter() - written > 10:
                raise RuntimeError(f"write {n} never reached the other client")
            await asyncio.sleep(0.0005)
        await asyncio.sleep(spacing)
    await a.close()
    await b.close()
    from sync import summarize_ms

    return summarize_ms(latencies)


async def outbox_drain(proxy_url: str, items: int) -> dict[str, Any]:
    client = await start_client(proxy_url)
    sender = client._sender
    assert sender is not None and client.replica is not None
    sender.url = "http://127.0.0.1:9/v1/mutations"
    started = time.perf_counter()
    for n in range(items):
        await client.insert("tasks", {"id": str(uuid.uuid4()), "user_id": USER, "title": f"outbox item {n}"})
    local_seconds = time.perf_counter() - started
    sender.url = f"{proxy_url}/v1/mutations"
    sender.retry_now()
    started = time.perf_counter()
    while client.replica.count_outbox(state="pending"):
        await asyncio.sleep(0.005)
    drain_seconds = time.perf_counter() - started
    await client.close()
    return {
        "items": items,
        "local_writes_per_second": round(items / local_seconds),
        "drain_seconds": round(drain_seconds, 3),
        "drained_per_second": round(items / drain_seconds),
        "batch_size": sender.batch_size,
    }


async def child_writes(proxy_url: str, writes: int, spacing: float, items: int) -> dict[str, Any]:
    """Phases 2 and 3 in the client's own process."""
    return {
        "write_to_visible_ms": await write_to_visible(proxy_url, writes, spacing),
        "outbox": await outbox_drain(proxy_url, items),
    }


def client_writes(proxy_url: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child-writes", proxy_url]
    command += ["--writes", str(args.writes), "--spacing", str(args.spacing), "--outbox", str(args.outbox)]
    output = subprocess.run(command, capture_output=True, text=True)
    if output.returncode != 0:
        raise RuntimeError(f"the client process failed: {output.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(output.stdout.strip().splitlines()[-1])
    return result


@dataclass
class Proxy:
    """``python -m pgferry sync proxy`` with the write API, in its own process and session (as a user starts it:
    the README's command, the token secret from the environment, run from a directory without a ``.env``)."""

    upstream: str
    database_url: str
    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        command = [
            sys.executable, "-m", "pgferry", "sync", "proxy",
            "--upstream", self.upstream,
            "--database-url", self.database_url,
            "--port", str(self.port),
            "--log-level", "warning",
        ]  # fmt: skip
        env = {
            **os.environ,
            "SUPABASE_JWT_SECRET": JWT_SECRET,
            "SUPABASE_URL": SUPABASE_URL,
            "PGFERRY_HOME": str(self.root / "home"),
        }
        env.pop("ELECTRIC_SECRET", None)
        self.log_path = self.root / "proxy.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                # Any answer means it listens (an unauthenticated request is a 401).
                httpx.post(self.url + "/v1/mutations", json={}, timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"proxy not listening after {timeout:.0f}s")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- the run ------------------------------------------------------------------------------------------------------


def warm_up(sync_url: str) -> None:
    """Wait until the server serves ``tasks`` (after a start it answers 503 until the table is ready), with an
    empty shape, so the timed sync measures syncing and not the server's start."""
    params = {"table": "tasks", "offset": "-1", "where": "priority = -1"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if httpx.get(f"{sync_url}/v1/shape", params=params, timeout=30).status_code == 200:
            return
        time.sleep(0.5)
    raise RuntimeError("the sync server never served tasks")


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from sync import Database, SyncServer  # bench/ is on sys.path when a benchmark runs as a script

    database = Database(root, os.environ.get("PGFERRY_PG_BINDIR"), fsync=True)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": os.getloadavg()},
    }
    server = None
    proxy = None
    try:
        database.start()
        report["postgres"] = database.version
        report["seed"] = database.seed(args.replica_rows or args.rows, embeddings=args.embeddings)
        server = SyncServer(database.url, root / "sync", root / "sync.log", live_timeout=20.0)
        server.start()
        warm_up(server.url)
        snapshot_seconds, json_bytes = materialise(server.url)
        report["server_snapshot_seconds"] = round(snapshot_seconds, 3)
        report["shape_json_bytes"] = json_bytes
        print("initial sync into SQLite ...", file=sys.stderr)
        report["initial_sync"] = initial_sync(server.url, root)
        report["initial_sync"]["json_mb_per_second"] = round(json_bytes / report["initial_sync"]["seconds"] / 1e6, 1)
        if report["initial_sync"]["rows"] != report["seed"]["rows"]:
            raise RuntimeError(f"the replica holds {report['initial_sync']['rows']} rows of {report['seed']['rows']}")
        if args.pg_replica:
            from pgferry.localstack.databases import create_database

            assert database.cluster is not None
            print("initial sync into a PostgreSQL replica ...", file=sys.stderr)
            replica_url = create_database(database.cluster, "bench_replica")
            report["initial_sync_postgres"] = initial_sync(server.url, root, replica_url)
            if report["initial_sync_postgres"]["rows"] != report["seed"]["rows"]:
                raise RuntimeError(f"the PostgreSQL replica holds {report['initial_sync_postgres']['rows']} rows")
        if args.replica_rows:
            return report
        proxy = Proxy(server.url, database.url, root)
        proxy.start()
        print("write -> visible on another client, then outbox drain ...", file=sys.stderr)
        report.update(client_writes(proxy.url, args))
    finally:
        if proxy is not None:
            proxy.stop()
        if server is not None:
            server.stop()
        database.destroy()
    report["machine"]["load_after"] = os.getloadavg()
    return report


def verdicts(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    out: list[tuple[str, str, bool]] = []
    sync = report["initial_sync"]
    out.append(
        (
            "initial sync into SQLite",
            f"{sync['rows_per_second']:,} rows/s ({sync['rows']:,} rows)",
            sync["rows_per_second"] >= TARGET_SYNC_ROWS_PER_SECOND,
        )
    )
    out.append(
        (
            "client RSS after sync",
            f"{sync['max_rss_bytes'] / 2**20:.0f} MiB for {sync['rows']:,} rows",
            sync["max_rss_bytes"] < TARGET_RSS_BYTES,
        )
    )
    if "initial_sync_postgres" in report:
        into_pg = report["initial_sync_postgres"]
        out.append(
            (
                "initial sync into a PostgreSQL replica (same server)",
                f"{into_pg['rows_per_second']:,} rows/s ({into_pg['rows']:,} rows)",
                into_pg["rows_per_second"] >= TARGET_SYNC_ROWS_PER_SECOND,
            )
        )
    if "write_to_visible_ms" in report:
        lat = report["write_to_visible_ms"]
        out.append(
            (
                "write -> visible on another client",
                f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms",
                lat["p50_ms"] <= TARGET_P50_MS and lat["p99_ms"] <= TARGET_P99_MS,
            )
        )
        drain = report["outbox"]
        out.append(
            (
                "outbox drain",
                f"{drain['drained_per_second']:,} mutations/s",
                drain["drained_per_second"] >= TARGET_DRAIN_PER_SECOND,
            )
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--replica-rows", type=int, default=0, help="only the initial sync, of this many rows")
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--spacing", type=float, default=0.03)
    parser.add_argument("--outbox", type=int, default=10_000)
    parser.add_argument(
        "--pg-replica", action="store_true", help="also sync into a PostgreSQL replica (a database on the same server)"
    )
    parser.add_argument(
        "--embeddings",
        action="store_true",
        help="seed every task with its 1536-d embedding (wide vector rows, ~19 KB of JSON each); use with --rows",
    )
    parser.add_argument("--child-sync", nargs=2, metavar=("URL", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--child-writes", metavar="PROXY_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_sync:
        print(json.dumps(asyncio.run(child_sync(*args.child_sync))))
        return 0
    if args.child_writes:
        print(json.dumps(asyncio.run(child_writes(args.child_writes, args.writes, args.spacing, args.outbox))))
        return 0
    with tempfile.TemporaryDirectory(prefix="pgferry-bench-write-") as directory:
        report = run(args, Path(directory))
    report["verdicts"] = [{"what": w, "measured": m, "met": ok} for w, m, ok in verdicts(report)]
    RESULTS_DIR.mkdir(exist_ok=True)
    rows_tag = "-1m" if args.replica_rows == 1_000_000 else f"-{args.replica_rows // 1000}k"
    suffix = (
        (rows_tag if args.replica_rows else "")
        + ("-pg-replica" if args.pg_replica else "")
        + ("-vectors" if args.embeddings else "")
    )
    path = RESULTS_DIR / f"write-{dt.date.today().isoformat()}{suffix}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    for what, measured, ok in verdicts(report):
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {measured}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
