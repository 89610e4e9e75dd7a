"""Benchmark pgferry's dev sync server (ElectricSQL's HTTP Shape API) from a client's side of the socket.

Run from the project root::

    .venv/bin/python bench/sync.py                       # 100k rows, 10,000 live clients, 300 changes
    .venv/bin/python bench/sync.py --rows 20000 --clients 1000 --where-shapes 20 --changes 100   # a quick look

What is measured
----------------
One throwaway PostgreSQL server (``wal_level=logical``, fsync on unless ``--pg-fsync-off``: commit latency is
part of what is measured, and the sync server cannot see a commit before its WAL is flushed) gets a database with
the platform schema (``prepare_target_database``: the Supabase baseline plus pgferry's migrations) and ``--rows``
rows in ``public.tasks`` from one ``insert … select generate_series`` (titles, descriptions of 0 to 700 characters,
tags, jsonb metadata, statuses, priorities, dates; embeddings only with ``--embeddings``, because 1536 floats as
text would make the table ten times larger than the rest and change what is measured). The sync server runs in
its own process (``python -m pgferry sync serve``), so the load generator here does not share its GIL; both run
on the same machine, so on 2 cores they share the CPUs, and so does any other work (the load average is
recorded).

1. **Initial sync.** Raw reader processes (``http.client`` on one keep-alive connection, the body decompressed (gzip
   inflated with ISA-L) and its rows counted by their ``{"key":`` marker, never parsed as JSON: the reader must not
   be the bottleneck) page through the ``tasks`` shape from ``offset=-1`` to the response with
   ``electric-up-to-date``: first a fresh shape (the server snapshots the table while the first pages are served),
   then the materialised shape to a second client (gzip, identity and zstd, each read ``--materialised-passes``
   times one after another by one reader, figures over all passes), then ``--readers`` readers at once (gzip
   and identity), and a second fresh shape read as identity. Each reports rows/s, MB/s of decoded JSON, bytes per
   row and the server's CPU (``/proc/<pid>/stat``) per row and as a share of one core. The anchor, in the same run:
   ``COPY (select * from tasks) TO STDOUT`` as text through psycopg, the fastest of three runs. The same
   for two tables of data the server was not tuned on, both with random UUID keys: ``--small-rows`` (2M) rows of
   ~64 bytes and ``--vector-rows`` (20k) rows with a 1536-d pgvector column, each read as a fresh shape against
   its own COPY. The server's background work (it makes a snapshot's zstd frames after the snapshot) is waited
   out before each phase and before each COPY.
2. **Commit-to-client latency.** One live client long-polls the shape in a thread; the main thread commits
   ``--changes`` single-row transactions (alternately an insert of a new row and an update of an existing one)
   on its own autocommit connection, ``--spacing`` apart (uniform in the range), and records the time from just
   after ``commit`` returns to the arrival of the live response carrying that row id. Then the same back to back
   (``burst``), where the queueing of the feed shows.
3. **Concurrent live clients.** ``--clients`` long-polls on raw asyncio sockets, held by ``--client-processes``
   processes (the body is searched for the row id instead of being parsed), all wait on the ``tasks`` shape.
   Once the server's ``pgferry_sync_live_clients`` gauge shows all of them, ``--fanout-rounds`` single-row
   commits a second apart each go to every client; the time from commit to each delivery is recorded
   (``time.monotonic()``, comparable across processes on Linux). Variant: ``--where-shapes`` distinct shapes
   (``where=priority = $1`` with a distinct value each, empty at first) with ten clients each; one transaction
   inserts one row per shape (every client gets exactly its row), then one single-row transaction reaches one
   shape's clients (the cost of the other shapes' where clauses on every transaction shows here).

The server's RSS (``VmRSS`` of its process, sampled every 50 ms, plus ``VmHWM``) and CPU time are recorded per
phase. Targets from issue 16, printed PASS/FAIL: a fresh shape's initial sync at ≥ 0.5x the COPY rate; a
materialised shape to a second client at ≥ 200 MB/s of decoded JSON with the server under 20% of one core;
10,000 live clients under 1 GB RSS, each getting a commit within 2 s; commit-to-client p50 ≤ 10 ms and p99 ≤ 50
ms under that load (and for one live client).

Output: ``bench/results/sync-<YYYY-MM-DD>[-<tag>].json``, a summary table on stdout, the results block of the
``bench/sync.py`` section of ``bench/README.md``. The server process, the PostgreSQL server and every temporary
directory are removed on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from readme_sections import replace_block  # bench/ is on sys.path when a benchmark runs as a script
from rich.console import Console
from rich.table import Table

from pgferry.localstack.binaries import find_install
from pgferry.localstack.cluster import ClusterSettings, PostgresCluster, free_port, runnable_install, service_user
from pgferry.localstack.databases import create_database
from pgferry.localstack.stack import prepare_target_database
from pgferry.sync.tables import default_served_tables

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
README_START = "<!-- sync-results:start -->"
README_END = "<!-- sync-results:end -->"

# Issue 16's targets.
TARGET_FRESH_COPY_RATIO = 0.5  # fresh-shape initial sync rate / COPY TO STDOUT rate of the same rows
TARGET_MATERIALISED_MB_S = 200.0  # decoded JSON to a second client
TARGET_MATERIALISED_CPU = 0.20  # of one core, while serving it
TARGET_P50_MS = 10.0  # commit to client, under the live-client load
TARGET_P99_MS = 50.0
TARGET_CLIENTS = 10_000
TARGET_DELIVERY_S = 2.0  # every live client has the committed change within this
TARGET_RSS_BYTES = 1 << 30

HOST = "127.0.0.1"


class BenchError(RuntimeError):
    """A phase could not be measured (the server failed, a client never got its change, ...)."""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: with a few hundred samples, interpolating would invent values nobody saw."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summarize_ms(seconds: Sequence[float]) -> dict[str, Any]:
    if not seconds:
        return {"count": 0}
    ms = [s * 1000 for s in seconds]
    return {
        "count": len(ms),
        "min_ms": round(min(ms), 2),
        "p50_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


# --- the server process --------------------------------------------------------------------------------------


def _proc_status(pid: int, field_name: str) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` in bytes (the process may be gone: then ``None``)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process: how much of the 2 cores the server itself used in a phase."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples the server's RSS every 50 ms in a thread, so a short peak (a fan-out) is not missed between
    the points where the phases read it."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _proc_status(self.pid, "VmRSS")
            if rss is None:
                return
            self.samples.append((time.perf_counter(), rss))
            self._stop.wait(self.interval)

    def now(self) -> int:
        return _proc_status(self.pid, "VmRSS") or 0

    def peak_since(self, since: float) -> int:
        return max((rss for t, rss in list(self.samples) if t >= since), default=self.now())


@dataclass
class SyncServer:
    """``python -m pgferry sync serve`` in its own process (and session, so a Ctrl-C here does not race our
    own orderly stop of it)."""

    database_url: str
    data_dir: Path
    log_path: Path
    live_timeout: float
    extra_tables: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        command = [
            str(Path(sys.executable).with_name("pgferry")), "sync", "serve",  # the CLI the README documents
            "--database-url", self.database_url,
            "--host", HOST,
            "--port", str(self.port),
            "--data-dir", str(self.data_dir),
            "--live-timeout", str(self.live_timeout),
            "--insecure",  # loopback only, for the length of the run: the benchmark measures sync, not auth
        ]  # fmt: skip
        if self.extra_tables:  # --table replaces the default list (the platform's tables): name them too
            for table in (*(str(t) for t in default_served_tables()), *self.extra_tables):
                command += ["--table", table]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"sync server exited {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v1/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise BenchError(f"sync server not healthy after {timeout:.0f}s: {self.log_tail()}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: the feed stops after the txn in hand
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:].strip()
        except FileNotFoundError:
            return ""

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus metrics as ``{name{labels}: value}``."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out


# --- the database --------------------------------------------------------------------------------------------

SEED_SQL = """
insert into public.tasks (user_id, title, description, status, priority, tags, metadata, embedding, due_at,
                          completed_at, created_at, updated_at)
select
    ('00000000-0000-4000-8000-' || lpad(to_hex(g % 50), 12, '0'))::uuid,
    initcap((array['fix', 'write', 'review', 'deploy', 'refactor', 'investigate', 'summarize', 'plan'])[1 + g % 8])
        || ' ' || (array['the login flow', 'billing webhooks', 'the search index', 'flaky CI job',
                         'onboarding docs', 'rate limiter', 'agent memory store', 'nightly export'])[1 + (g / 8) % 8]
        || ' #' || g,
    case when g % 4 = 0 then null
         else repeat('The agent should check the logs, reproduce the failure and propose a patch; ', 1 + g % 9)
              || md5(g::text) end,
    (array['pending', 'queued', 'running', 'completed', 'failed', 'cancelled'])[1 + g % 6],
    g % 6,
    (array['backend', 'api', 'frontend', 'ui', 'infra', 'ci', 'docs', 'embeddings'])[1 + g % 8:g % 8 + g % 4]
        || case when g % 7 = 0 then array['urgent'] else '{}'::text[] end,
    jsonb_build_object(
        'source', (array['api', 'slack', 'github', 'cli', 'web'])[1 + g % 5],
        'topic', (array['auth', 'billing', 'search', 'ci', 'docs'])[1 + g % 5],
        'estimate', jsonb_build_object('points', (array[1, 2, 3, 5, 8, 13])[1 + g % 6],
                                       'confidence', round((g % 1000) / 1000.0, 3)))
        || case when g % 3 = 0
                then jsonb_build_object('links', jsonb_build_array(jsonb_build_object(
                     'kind', 'issue', 'url', 'https://github.com/acme/app/issues/' || g % 5000)))
                else '{}'::jsonb end,
    {embedding},
    case when g % 5 < 2 then now() + (g % 30) * interval '1 day' end,
    case when g % 6 = 3 then now() - (g % 14) * interval '1 day' end,
    now() - (g % 365) * interval '1 day' - (g % 86400) * interval '1 second',
    now() - (g % 30) * interval '1 day'
from generate_series(1, {rows}) as g
"""

EMBEDDING_SQL = "(select array_agg(random()::real)::extensions.vector from generate_series(1, 1536) where g > 0)"

# Data shapes the server was not tuned on (the seed's tasks are ~1 KB rows): millions of small rows and wide vector
# rows, both with random UUID keys. Each gets a fresh shape read against its own COPY floor.
OTHER_SHAPES_SQL = {
    "small_rows": (
        "create table public.bench_small_rows (id uuid primary key default gen_random_uuid(),"
        " account_id integer not null, amount numeric(12, 2) not null, paid boolean not null,"
        " created_at timestamptz not null);"
        " insert into public.bench_small_rows (account_id, amount, paid, created_at)"
        " select g % 5000, (g % 100000) / 100.0, g % 3 = 0, now() - g * interval '1 second'"
        " from generate_series(1, {rows}) as g"
    ),
    "vector_rows": (
        "create table public.bench_vector_rows (id uuid primary key default gen_random_uuid(),"
        " content text not null, embedding extensions.vector(1536) not null);"
        " insert into public.bench_vector_rows (content, embedding)"
        " select 'memory ' || g || ': ' || md5(g::text),"
        " (select array_agg(random()::real)::extensions.vector from generate_series(1, 1536) where g > 0)"
        " from generate_series(1, {rows}) as g"
    ),
}


def _analyzed_table_stats(conn: psycopg.Connection[Any], table: str) -> dict[str, int]:
    """``vacuum analyze`` a freshly seeded table (``table`` is one of this file's names), then its row count, total
    size and average row size."""
    conn.execute(f"vacuum analyze {table}".encode())
    count, size, avg_width = conn.execute(
        f"select count(*), pg_total_relation_size('{table}'),"
        f" (select avg(pg_column_size(t.*))::int from {table} t) from {table}".encode()
    ).fetchone() or (0, 0, 0)
    return {"rows": int(count), "table_bytes": int(size), "avg_row_bytes": int(avg_width or 0)}


@dataclass
class Database:
    """One throwaway PostgreSQL server with one database holding the platform schema and the seeded tasks."""

    root: Path
    bindir: str | None
    fsync: bool
    cluster: PostgresCluster | None = None
    url: str = ""
    version: str = ""
    install_label: str = ""

    def start(self) -> None:
        user = service_user()
        install = runnable_install(find_install(self.bindir), user, Path(tempfile.gettempdir()) / "pgferry-pginstall")
        self.install_label = install.label
        self.cluster = PostgresCluster(install, self.root / "pg", user=user)
        self.cluster.init(ClusterSettings(port=free_port()))
        if not self.fsync:
            # synchronous_commit stays on: the feed reads only flushed WAL, so a deferred flush would add up to
            # wal_writer_delay to every commit-to-client time.
            with (self.cluster.datadir / "postgresql.conf").open("a") as conf:
                conf.write("fsync = off\nfull_page_writes = off\n")
        self.cluster.start()
        self.url = create_database(self.cluster, "bench_sync")
        prepare_target_database(self.url)
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute("select current_setting('server_version')").fetchone()
            self.version = str(row[0]) if row else ""

    def destroy(self) -> None:
        if self.cluster is not None:
            self.cluster.destroy()

    def seed(self, rows: int, *, embeddings: bool) -> dict[str, Any]:
        started = time.perf_counter()
        query = SEED_SQL.replace("{embedding}", EMBEDDING_SQL if embeddings else "null").replace("{rows}", str(rows))
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(query.encode())  # built from the constants above and an int: no parameters
            stats = _analyzed_table_stats(conn, "public.tasks")
        return {**stats, "embeddings": embeddings, "seed_seconds": round(time.perf_counter() - started, 3)}

    def seed_other_shape(self, name: str, rows: int) -> dict[str, Any]:
        """One of ``OTHER_SHAPES_SQL``'s tables with ``rows`` rows (its name is ``bench_<name>``)."""
        started = time.perf_counter()
        table = f"public.bench_{name}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(OTHER_SHAPES_SQL[name].replace("{rows}", str(rows)).encode())  # constants and an int
            stats = _analyzed_table_stats(conn, table)
        return {"table": table, **stats, "seed_seconds": round(time.perf_counter() - started, 3)}

    def copy_floor(self, table: str, rows: int, runs: int = 3) -> dict[str, Any]:
        """``COPY (select * from <table>) TO STDOUT`` as text: the rows out of PostgreSQL and nothing else. The
        fastest of ``runs`` (one run varied from 0.26 to 0.49 s on the same 100k rows): the peer at its best."""
        times = []
        size = 0
        for _ in range(runs):
            started = time.perf_counter()
            size = 0
            with (
                psycopg.connect(self.url, autocommit=True) as conn,
                conn.cursor() as cur,
                cur.copy(f"copy (select * from {table}) to stdout".encode()) as copy,
            ):
                for data in copy:
                    size += len(data)
            times.append(time.perf_counter() - started)
        seconds = min(times)
        return {
            "seconds": round(seconds, 4),
            "bytes": size,
            "runs_seconds": [round(t, 4) for t in times],
            "rows_per_second": round(rows / seconds),
            "bytes_per_row": round(size / rows),
        }

    def sample_ids(self, count: int) -> list[str]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute("select id::text from public.tasks order by random() limit %s", [count]).fetchall()
        return [str(r[0]) for r in rows]


# --- 1. initial sync -----------------------------------------------------------------------------------------


def initial_sync(base_url: str, params: dict[str, str], *, encoding: str = "gzip") -> dict[str, Any]:
    """Page through a shape from ``offset=-1`` to up-to-date as ``@electric-sql/client`` does; JSON parsed.

    The time spent parsing JSON here is reported apart (``client_parse_seconds``): requests are sequential, so
    the wall time is the server's time plus this client's, and only the first is the server's to improve."""
    requests = 0
    parse = 0.0
    rows = 0
    wire = 0
    decoded = 0
    first_response = 0.0
    with httpx.Client(base_url=base_url, headers={"accept-encoding": encoding}, timeout=600) as client:
        query = {**params, "offset": "-1"}
        started = time.perf_counter()
        while True:
            response = client.get("/v1/shape", params=query)
            if response.status_code != 200:
                raise BenchError(f"initial sync: HTTP {response.status_code}: {response.text[:500]}")
            parsing = time.perf_counter()
            messages = response.json()
            parse += time.perf_counter() - parsing
            requests += 1
            if requests == 1:
                first_response = time.perf_counter() - started
            wire += response.num_bytes_downloaded
            decoded += len(response.content)
            rows += sum(1 for m in messages if "key" in m)
            if messages and messages[-1].get("headers", {}).get("control") == "up-to-date":
                break
            query = {
                **params,
                "offset": response.headers["electric-offset"],
                "handle": response.headers["electric-handle"],
            }
        seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 4),
        "first_response_seconds": round(first_response, 4),
        "client_parse_seconds": round(parse, 4),
        "accept_encoding": encoding,
        "rows": rows,
        "rows_per_second": round(rows / seconds) if seconds else None,
        "requests": requests,
        "wire_bytes": wire,
        "json_bytes": decoded,
        "content_encoding": response.headers.get("content-encoding", "identity"),
        "handle": response.headers["electric-handle"],
        "offset": response.headers["electric-offset"],
    }


# --- raw readers in their own processes ---------------------------------------------------------------------


def read_shape(port: int, query: str, encoding: str, start_at: float | None = None, passes: int = 1) -> dict[str, Any]:
    """Page through a shape from ``offset=-1`` to the response carrying ``electric-up-to-date``, as a client does,
    but raw: ``http.client`` on one keep-alive connection, the body decompressed and its rows counted by
    ``{"key":`` markers, never parsed as JSON. Runs in a reader process of its own (``_reader``), so the figure is
    the server's, not a Python JSON parser's. gzip is inflated with ISA-L (``isal``, zlib's format at about three
    times its speed; zlib where it is missing): the reader shares the 2 CPUs with the server and PostgreSQL, and
    zlib's inflate of 100k rows (~0.2 s) was the largest single CPU cost of a fresh-shape run. ``start_at``
    (``time.monotonic()``, system-wide on Linux) lines up concurrent readers. ``passes``: read the whole shape that
    many times, one after another (clients 2 to 1 + passes of a materialised shape): a single 0.2 s read left the
    server's CPU share to the 10 ms resolution of ``/proc/<pid>/stat``."""
    import http.client
    import io
    import zlib

    inflate: Any = zlib
    with contextlib.suppress(ImportError):
        from isal import isal_zlib as inflate

    if start_at is not None:
        time.sleep(max(0.0, start_at - time.monotonic()))
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    requests = rows = wire = decoded = 0
    first_response = 0.0
    encodings: set[str] = set()
    first_target = target = f"/v1/shape?{query}&offset=-1"
    started = time.monotonic()
    while True:
        conn.request("GET", target, headers={"accept-encoding": encoding})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise BenchError(f"reader: HTTP {response.status}: {body[:300]!r}")
        requests += 1
        if requests == 1:
            first_response = time.monotonic() - started
        wire += len(body)
        content_encoding = response.getheader("content-encoding", "identity")
        encodings.add(content_encoding)
        if content_encoding == "gzip":
            body = inflate.decompress(body, 31)
        elif content_encoding == "zstd":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True)
            body = reader.read()  # a page is several frames (one per stored segment)
        elif content_encoding != "identity":
            raise BenchError(f"reader: unexpected content-encoding {content_encoding}")
        decoded += len(body)
        rows += body.count(b'{"key":')
        handle = response.getheader("electric-handle")
        offset = response.getheader("electric-offset")
        if response.getheader("electric-up-to-date") is not None:
            passes -= 1
            if passes <= 0:
                break
            target = first_target
            continue
        target = f"/v1/shape?{query}&offset={offset}&handle={handle}"
    ended = time.monotonic()
    conn.close()
    seconds = ended - started
    return {
        "started": started,
        "ended": ended,
        "seconds": round(seconds, 4),
        "first_response_seconds": round(first_response, 4),
        "accept_encoding": encoding,
        "content_encodings": sorted(encodings),
        "rows": rows,
        "rows_per_second": round(rows / seconds) if seconds else None,
        "requests": requests,
        "wire_bytes": wire,
        "json_bytes": decoded,
        "json_mb_per_second": round(decoded / seconds / 1e6, 1) if seconds else None,
        "handle": handle,
        "offset": offset,
    }


def run_readers(
    server: SyncServer, query: str, encoding: str, count: int, rows_expected: int, *, passes: int = 1
) -> dict[str, Any]:
    """``count`` reader processes (``python bench/sync.py _reader``) reading the whole shape at once; the server's
    CPU (``/proc/<pid>/stat``) over the phase gives its cost per row and per MB."""
    idle_wait = wait_server_idle(server)
    start_at = time.monotonic() + 0.5 + 0.1 * count  # after every interpreter has started
    args = json.dumps(
        {"port": server.port, "query": query, "encoding": encoding, "start_at": start_at, "passes": passes}
    )
    cpu0 = _cpu_seconds(server.pid) or 0.0
    procs = [
        subprocess.Popen([sys.executable, __file__, "_reader", args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(count)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise BenchError(f"reader failed: {err.decode(errors='replace')[-2000:]}")
        outs.append(json.loads(out))
    cpu = (_cpu_seconds(server.pid) or 0.0) - cpu0
    seconds = max(o["ended"] for o in outs) - min(o["started"] for o in outs)
    rows = sum(o["rows"] for o in outs)
    decoded = sum(o["json_bytes"] for o in outs)
    result: dict[str, Any] = {
        "readers": count,
        "accept_encoding": encoding,
        "content_encodings": sorted({e for o in outs for e in o["content_encodings"]}),
        "seconds": round(seconds, 4),
        "rows": rows,
        "rows_per_second": round(rows / seconds) if seconds else None,
        "json_mb_per_second": round(decoded / seconds / 1e6, 1) if seconds else None,
        "wire_bytes": sum(o["wire_bytes"] for o in outs),
        "json_bytes": decoded,
        "json_bytes_per_row": round(decoded / rows) if rows else None,
        "server_cpu_seconds": round(cpu, 3),
        "server_cpu_share_of_one_core": round(cpu / seconds, 3) if seconds else None,
        "server_cpu_us_per_row": round(cpu / rows * 1e6, 2) if rows else None,
        "per_reader": [{k: v for k, v in o.items() if k not in ("started", "ended")} for o in outs],
        "waited_for_idle_server_seconds": idle_wait,
    }
    if count == 1:
        result["first_response_seconds"] = outs[0]["first_response_seconds"]
        result["requests"] = outs[0]["requests"]
        result["handle"] = outs[0]["handle"]
        result["offset"] = outs[0]["offset"]
    result["passes"] = passes
    bad = [o["rows"] for o in outs if o["rows"] != rows_expected * passes]
    if bad:
        result["problem"] = f"readers got {bad} rows in {passes} pass(es), the table has {rows_expected}"
    return result


def shape_head(base_url: str, params: dict[str, str]) -> dict[str, Any]:
    """Handle and offset of the end of a shape's log (``offset=now``): where a client that is up to date resumes."""
    response = httpx.get(base_url + "/v1/shape", params={**params, "offset": "now"}, timeout=60)
    if response.status_code != 200:
        raise BenchError(f"offset=now: HTTP {response.status_code}: {response.text[:300]}")
    return {"handle": response.headers["electric-handle"], "offset": response.headers["electric-offset"]}


# --- 2. commit-to-client latency -----------------------------------------------------------------------------


class LivePoller:
    """One live client in a thread: long-polls and stamps the arrival of every row id it sees (first time)."""

    def __init__(self, base_url: str, handle: str, offset: str, table: str = "tasks") -> None:
        self.base_url = base_url
        self.table = table
        self.handle = handle
        self.offset = offset
        self.seen: dict[str, float] = {}
        self.responses = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="live-poller", daemon=True)

    def start(self) -> LivePoller:
        self._thread.start()
        return self

    def _run(self) -> None:
        cursor = ""
        try:
            with httpx.Client(base_url=self.base_url, headers={"accept-encoding": "gzip"}, timeout=60) as client:
                while not self._stop.is_set():
                    response = client.get(
                        "/v1/shape",
                        params={
                            "table": self.table,
                            "offset": self.offset,
                            "handle": self.handle,
                            "live": "true",
                            "cursor": cursor,
                        },
                    )
                    arrived = time.perf_counter()
                    if response.status_code != 200:
                        self.error = f"HTTP {response.status_code}: {response.text[:300]}"
                        return
                    self.responses += 1
                    for message in response.json():
                        row_id = (message.get("value") or {}).get("id")
                        if row_id is not None:
                            with self._lock:
                                self.seen.setdefault(row_id, arrived)
                    self.offset = response.headers["electric-offset"]
                    cursor = response.headers.get("electric-cursor", "")
        except Exception as exc:  # reported with the phase, never swallowed
            self.error = f"{type(exc).__name__}: {exc}"

    def arrival(self, row_id: str) -> float | None:
        with self._lock:
            return self.seen.get(row_id)

    def stop(self, wake: Callable[[], None]) -> None:
        self._stop.set()
        wake()  # a change ends the long-poll in hand, so the thread sees the flag now, not after live_timeout
        self._thread.join(30)


def _touch(conn: psycopg.Connection[Any], row_id: str, table: str = "tasks") -> None:
    column = "priority" if table == "tasks" else "name"
    conn.execute(f"update public.{table} set {column} = {column} where id = %s", [row_id])


# A new row per probe commit, on the table the probe's shape follows.
_PROBE_INSERTS = {
    "tasks": "insert into public.tasks (id, user_id, title, tags, metadata) values"
    " (%s, '00000000-0000-4000-8000-000000000001', %s, '{bench}', '{\"source\": \"bench\"}')",
    "environments": "insert into public.environments (id, user_id, name) values"
    " (%s, '00000000-0000-4000-8000-000000000001', %s)",
}


def commit_latency(
    db: Database,
    server: SyncServer,
    shape: dict[str, Any],
    update_ids: list[str],
    *,
    changes: int,
    spacing: tuple[float, float] | None,
    table: str = "tasks",
) -> dict[str, Any]:
    """``changes`` single-row commits, each timed from just after commit returned to its live arrival. On
    ``tasks``: alternately an insert and an update; on ``environments`` (the probe of phase 3): inserts."""
    poller = LivePoller(server.url, shape["handle"], shape["offset"], table).start()
    time.sleep(0.3)  # let the first live request reach the server
    commits: list[tuple[str, str, float]] = []  # (row id, operation, committed at)
    rng = random.Random(7)
    with psycopg.connect(db.url, autocommit=True) as conn:
        started = time.perf_counter()
        for i in range(changes):
            if table == "environments" or i % 2 == 0 or not update_ids:
                row_id = str(uuid.uuid4())
                conn.execute(_PROBE_INSERTS[table], [row_id, f"latency probe {i}"])
                operation = "insert"
            else:
                row_id = update_ids.pop()
                conn.execute(
                    "update public.tasks set priority = priority + 1, status = 'running' where id = %s", [row_id]
                )
                operation = "update"
            commits.append((row_id, operation, time.perf_counter()))
            if spacing is not None:
                time.sleep(rng.uniform(*spacing))
        commit_seconds = time.perf_counter() - started
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(poller.arrival(r) is None for r, _o, _t in commits):
            if poller.error:
                break
            time.sleep(0.01)
        poller.stop(lambda: _touch(conn, commits[0][0], table))
    latencies: list[float] = []
    by_op: dict[str, list[float]] = {"insert": [], "update": []}
    missing = 0
    for row_id, operation, committed in commits:
        arrived = poller.arrival(row_id)
        if arrived is None:
            missing += 1
            continue
        latencies.append(arrived - committed)
        by_op[operation].append(arrived - committed)
    return {
        "spacing_seconds": list(spacing) if spacing else None,
        "commits": len(commits),
        "commit_phase_seconds": round(commit_seconds, 3),
        "received": len(latencies),
        "missing": missing,
        "live_responses": poller.responses,
        "poller_error": poller.error,
        **summarize_ms(latencies),
        "by_operation": {op: summarize_ms(values) for op, values in by_op.items()},
    }


# --- 3. concurrent live clients ------------------------------------------------------------------------------


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: a thousand httpx clients in one event loop
    would cost more CPU than the server answering them, and this benchmark must measure the server."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 24)

    async def get(self, target: str) -> tuple[int, dict[str, str], bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(f"GET {target} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n\r\n".encode())
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        else:
            body = await self.reader.read()
        return status, headers, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class FanoutState:
    markers: list[bytes | None]
    received: list[float | None]
    responses: int = 0
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)
    stop: bool = False


async def _live_client(
    index: int,
    port: int,
    query: str,
    handle: str,
    offset: str,
    state: FanoutState,
    connect_gate: asyncio.Semaphore,
) -> None:
    conn = RawHttp(HOST, port)
    async with connect_gate:
        await conn.connect()
    cursor = ""
    try:
        while not state.stop:
            target = f"/v1/shape?{query}&offset={offset}&handle={handle}&live=true&cursor={cursor}"
            try:
                status, headers, body = await conn.get(target)
            except (asyncio.IncompleteReadError, ConnectionError):
                if state.stop:
                    return
                state.reconnects += 1
                conn.close()
                await conn.connect()
                continue
            arrived = time.monotonic()
            state.responses += 1
            if status != 200:
                state.errors.append(f"client {index}: HTTP {status}: {body[:200]!r}")
                return
            marker = state.markers[index]
            if marker is not None and state.received[index] is None and marker in body:
                state.received[index] = arrived
            offset = headers["electric-offset"]
            cursor = headers.get("electric-cursor", "")
    finally:
        conn.close()


async def live_worker(port: int, assignments: list[list[str]]) -> None:
    """A live-client process (``python bench/sync.py _live``): one raw keep-alive long-poll per assignment
    (query, handle, offset). Commands arrive as JSON lines on stdin (``markers``, ``received``, ``stop``) and are
    answered on stdout; arrival times are ``time.monotonic()``, comparable with the main process's on Linux."""
    count = len(assignments)
    state = FanoutState(markers=[None] * count, received=[None] * count)
    gate = asyncio.Semaphore(64)
    tasks = [asyncio.create_task(_live_client(i, port, *assignments[i], state, gate)) for i in range(count)]
    try:
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                break
            command = json.loads(line)
            if command["cmd"] == "markers":
                state.markers = [m.encode() if m is not None else None for m in command["markers"]]
                state.received = [None] * count
                answer: dict[str, Any] = {"ok": True}
            elif command["cmd"] == "received":
                answer = {
                    "received": state.received,
                    "responses": state.responses,
                    "reconnects": state.reconnects,
                    "errors": state.errors[:10],
                    "error_count": len(state.errors),
                }
            else:
                break
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        state.stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class LiveClients:
    """``clients`` long-polls spread over ``processes`` live-client processes, so that ten thousand of them are
    not limited by one Python event loop on the client side (client i lives in process i % processes)."""

    def __init__(self, port: int, assignments: list[tuple[str, str, str]], processes: int) -> None:
        self.count = len(assignments)
        self.processes = max(1, min(processes, self.count))
        self.procs: list[subprocess.Popen[str]] = []
        for w in range(self.processes):
            mine = [list(a) for a in assignments[w :: self.processes]]
            proc = subprocess.Popen(
                [sys.executable, __file__, "_live", str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(mine) + "\n")  # thousands of handles: too long for a command line
            proc.stdin.flush()
            self.procs.append(proc)

    def _ask(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for proc, command in zip(self.procs, commands, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(command) + "\n")
            proc.stdin.flush()
        answers = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise BenchError(f"live-client process exited {proc.poll()}")
            answers.append(json.loads(line))
        return answers

    def set_markers(self, markers: list[str | None]) -> None:
        self._ask([{"cmd": "markers", "markers": markers[w :: self.processes]} for w in range(self.processes)])

    def received(self) -> tuple[list[float | None], dict[str, Any]]:
        answers = self._ask([{"cmd": "received"}] * self.processes)
        merged: list[float | None] = [None] * self.count
        for w, answer in enumerate(answers):
            merged[w :: self.processes] = answer["received"]
        stats = {
            "responses": sum(a["responses"] for a in answers),
            "reconnects": sum(a["reconnects"] for a in answers),
            "errors": [e for a in answers for e in a["errors"]][:10],
            "error_count": sum(a["error_count"] for a in answers),
        }
        return merged, stats

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def wait_server_idle(server: SyncServer, timeout: float = 60.0) -> float:
    """Wait until the server uses under 5% of a core over 300 ms (it makes a snapshot's zstd frames in the
    background after the snapshot, at low priority): no phase is measured while that work is still running, nor
    is the COPY floor. Returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        before = _cpu_seconds(server.pid) or 0.0
        time.sleep(0.3)
        if (_cpu_seconds(server.pid) or 0.0) - before < 0.015:
            break
    return round(time.perf_counter() - started, 2)


def _wait_for_gauge(server: SyncServer, level: int, timeout: float, *, below: bool = False) -> tuple[float, float]:
    """Poll ``pgferry_sync_live_clients`` until it reaches ``level`` (or falls to it, with ``below``); returns
    (value, seconds waited)."""
    started = time.perf_counter()
    value = 0.0
    while time.perf_counter() - started < timeout:
        value = server.metrics().get("pgferry_sync_live_clients", 0.0)
        if (value <= level) if below else (value >= level):
            break
        time.sleep(0.2)
    return value, time.perf_counter() - started


def _insert_rows(url: str, rows: list[tuple[str, int]]) -> float:
    """Insert ``(id, priority)`` rows in one transaction; returns ``time.monotonic()`` just after the commit."""
    with psycopg.connect(url) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "insert into public.tasks (id, user_id, title, priority) values"
                " (%s, '00000000-0000-4000-8000-000000000002', 'fan-out probe', %s)",
                rows,
            )
        conn.commit()
        return time.monotonic()


def _fanout_round(
    db: Database,
    live: LiveClients,
    markers: list[str | None],
    rows: list[tuple[str, int]],
    timeout: float,
) -> tuple[dict[str, Any], list[float]]:
    """Commit ``rows`` in one transaction and wait until every client with a marker has seen it; returns the
    round's summary and each delivery time (seconds from commit)."""
    live.set_markers(markers)
    clients = [i for i, m in enumerate(markers) if m is not None]
    committed = _insert_rows(db.url, rows)
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.05)
        received, _stats = live.received()
        if all(received[i] is not None for i in clients) or time.monotonic() > deadline:
            break
    got = [received[i] - committed for i in clients if received[i] is not None]  # type: ignore[operator]
    summary = {
        "clients": len(clients),
        "rows_in_transaction": len(rows),
        "received": len(got),
        "first_ms": round(min(got) * 1000, 1) if got else None,
        "p50_ms": round(percentile(got, 50) * 1000, 1) if got else None,
        "p99_ms": round(percentile(got, 99) * 1000, 1) if got else None,
        "all_ms": round(max(got) * 1000, 1) if len(got) == len(clients) else None,
    }
    return summary, got


def fanout(
    db: Database,
    server: SyncServer,
    rss: RssSampler,
    *,
    clients: int,
    shapes: list[tuple[str, str, str]],
    live_timeout: float,
    processes: int,
    rounds: int,
    probe_changes: int = 0,
) -> dict[str, Any]:
    """``clients`` live long-polls spread round robin over ``shapes`` (query, handle, offset), held by
    ``processes`` client processes; ``rounds`` one-row commits (one second apart) each reach all of them.
    With ``probe_changes``, first, while all of them wait: the commit-to-client latency of one more live client
    on another table (``environments``), whose commits none of the waiting clients' shapes select — the latency
    a client sees while the server holds that many live requests, apart from the cost of answering them all."""
    # Long-polls whose clients went away (an earlier phase) stay in the gauge until live_timeout: wait them out,
    # or the gauge would report clients that are not ours.
    stale, stale_wait = _wait_for_gauge(server, 0, timeout=live_timeout + 10, below=True)
    idle_rss = rss.now()
    cpu_before = _cpu_seconds(server.pid) or 0.0
    phase_start = time.perf_counter()
    live = LiveClients(server.port, [shapes[i % len(shapes)] for i in range(clients)], processes)
    gauge, ramp = _wait_for_gauge(server, clients, timeout=max(60.0, clients / 50))
    waiting_rss = rss.now()
    result: dict[str, Any] = {
        "clients": clients,
        "client_processes": live.processes,
        "shapes": len(shapes),
        "live_gauge_seen": gauge,
        "all_waiting": gauge >= clients,
        "ramp_up_seconds": round(ramp, 2),
        "stale_waiters_at_start": {"gauge_after_wait": stale, "seconds_waited": round(stale_wait, 2)},
        "rss_idle_before_bytes": idle_rss,
        "rss_with_clients_waiting_bytes": waiting_rss,
        "rss_per_waiting_client_bytes": round((waiting_rss - idle_rss) / clients) if clients else None,
    }
    result_rounds: dict[str, Any] = {}
    try:
        if probe_changes:
            probe = commit_latency(
                db, server, shape_head(server.url, {"table": "environments"}), [], changes=probe_changes,
                spacing=(0.02, 0.05), table="environments",
            )  # fmt: skip
            probe["live_gauge_after"] = server.metrics().get("pgferry_sync_live_clients")
            result["probe_latency_while_all_wait"] = probe
        if len(shapes) == 1:
            deliveries: list[float] = []
            for n in range(rounds):
                row_id = str(uuid.uuid4())
                summary, got = _fanout_round(db, live, [row_id] * clients, [(row_id, 0)], timeout=60)
                result_rounds["one_row_to_all" if n == 0 else f"one_row_to_all_{n + 1}"] = summary
                deliveries += got
                _wait_for_gauge(server, clients, timeout=30)
                time.sleep(1.0)
            result["all_deliveries"] = {"rounds": rounds, **summarize_ms(deliveries)}
        else:
            # One row per shape (priority = the shape's value), one transaction: every client gets exactly its row.
            ids = [str(uuid.uuid4()) for _ in shapes]
            values = [int(urllib.parse.parse_qs(q)["params[1]"][0]) for q, _h, _o in shapes]
            markers: list[str | None] = [ids[i % len(shapes)] for i in range(clients)]
            result_rounds["one_row_per_shape_one_transaction"], _ = _fanout_round(
                db, live, markers, list(zip(ids, values, strict=True)), timeout=60
            )
            _wait_for_gauge(server, clients, timeout=30)
            one = str(uuid.uuid4())
            markers = [one if i % len(shapes) == 0 else None for i in range(clients)]
            result_rounds["one_row_to_one_shape"], _ = _fanout_round(db, live, markers, [(one, values[0])], timeout=60)
    finally:
        result["rss_peak_bytes"] = rss.peak_since(phase_start)
        result["server_cpu_seconds"] = round((_cpu_seconds(server.pid) or 0.0) - cpu_before, 2)
        try:
            _received, stats = live.received()
        except BenchError as exc:
            stats = {"responses": 0, "reconnects": 0, "errors": [str(exc)], "error_count": 1}
        live.close()
    time.sleep(0.5)
    # Our sockets are closed now; a server that noticed would show (about) zero here.
    result["live_gauge_0_5s_after_clients_disconnected"] = server.metrics().get("pgferry_sync_live_clients")
    result["rounds"] = result_rounds
    result.update(stats)
    result["live_timeout_seconds"] = live_timeout
    return result


def create_where_shapes(server: SyncServer, count: int) -> tuple[list[tuple[str, str, str]], float]:
    """``count`` distinct shapes ``where=priority = $1`` (values no seeded row has: each starts empty)."""
    shapes: list[tuple[str, str, str]] = []
    started = time.perf_counter()
    for i in range(count):
        params = {"table": "tasks", "where": "priority = $1", "params[1]": str(1000 + i)}
        synced = initial_sync(server.url, params)
        shapes.append((urllib.parse.urlencode(params), synced["handle"], synced["offset"]))
    return shapes, time.perf_counter() - started


# --- reporting -----------------------------------------------------------------------------------------------


def mb(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.0f} MiB"


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("PASS" if ok else "FAIL")


def _fresh_target(name: str, floor: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """A fresh shape's rows/s against its COPY floor's; a read that got the wrong row count fails it."""
    ratio = fresh["rows_per_second"] / floor["rows_per_second"]
    return {
        "name": name,
        "target": f">= {TARGET_FRESH_COPY_RATIO}x COPY's rows/s",
        "value": f"{ratio:.2f}x ({fresh['rows_per_second']:,} vs {floor['rows_per_second']:,} rows/s)",
        "pass": ratio >= TARGET_FRESH_COPY_RATIO and not fresh.get("problem"),
    }


def _latency_target(name: str, summary: dict[str, Any], detail: str, missing: int | None = 0) -> dict[str, Any]:
    p50, p99 = summary["p50_ms"], summary["p99_ms"]
    return {
        "name": name,
        "target": f"p50 <= {TARGET_P50_MS:.0f} ms, p99 <= {TARGET_P99_MS:.0f} ms",
        "value": f"p50 {p50:,.1f} ms, p99 {p99:,.1f} ms{detail}",
        "pass": p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS and missing == 0,
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    res = report["results"]
    out: list[dict[str, Any]] = []
    init = res.get("initial_sync", {})
    floor, fresh = init.get("copy_floor"), init.get("fresh")
    if floor and fresh and fresh.get("rows_per_second"):
        out.append(_fresh_target("fresh-shape initial sync vs COPY TO STDOUT", floor, fresh))
    for key, coding in (("materialised_zstd", "zstd"), ("materialised", "gzip")):
        second = init.get(key)
        if not second:
            continue
        rate, cpu = second["json_mb_per_second"], second["server_cpu_share_of_one_core"]
        out.append({
            "name": f"materialised shape to a 2nd client ({coding})",
            "target": f">= {TARGET_MATERIALISED_MB_S:.0f} MB/s JSON, server CPU <= {TARGET_MATERIALISED_CPU:.0%}",
            "value": f"{rate} MB/s, server CPU {cpu:.0%} of a core",
            "pass": rate >= TARGET_MATERIALISED_MB_S and cpu <= TARGET_MATERIALISED_CPU,
        })  # fmt: skip
    for name, entry in res.get("other_data_shapes", {}).items():
        if entry["fresh"].get("rows_per_second"):
            data = entry["data"]
            rows, what = f"{data['rows']:,}", name.replace("_", " ")
            label = f"fresh-shape initial sync vs COPY, {rows} {what} (~{data['avg_row_bytes']} B)"
            out.append(_fresh_target(label, entry["copy_floor"], entry["fresh"]))
    same = res.get("fanout", {}).get("same_shape")
    if same is not None:
        rounds = same["rounds"].values()
        slowest = max((r["all_ms"] if r["all_ms"] is not None else float("inf") for r in rounds), default=None)
        ok = (
            same["clients"] >= TARGET_CLIENTS
            and same["all_waiting"]
            and all(r["received"] == r["clients"] for r in rounds)
            and same["rss_peak_bytes"] < TARGET_RSS_BYTES
            and slowest is not None
            and slowest <= TARGET_DELIVERY_S * 1000
        )
        out.append({
            "name": "live clients on one process",
            "target": f">= {TARGET_CLIENTS:,}, all get a commit within {TARGET_DELIVERY_S:.0f} s, RSS < 1 GiB",
            "value": f"{int(same['live_gauge_seen']):,} waiting; slowest round all in {slowest:,.0f} ms; "
            f"peak {mb(same['rss_peak_bytes'])}",
            "pass": ok,
        })  # fmt: skip
        deliveries = same.get("all_deliveries", {})
        if deliveries.get("count"):
            out.append(_latency_target(f"commit-to-client under that load ({deliveries['count']:,} deliveries)",
                                       deliveries, ""))  # fmt: skip
        probe = same.get("probe_latency_while_all_wait", {})
        if probe.get("count"):
            name = f"commit-to-client while {same['clients']:,} live clients wait (a probe on another table)"
            out.append(_latency_target(name, probe, f" ({probe['count']} commits)", missing=probe.get("missing")))
    spaced = res.get("latency", {}).get("spaced", {})
    if spaced.get("count"):
        p50, p99 = spaced.get("p50_ms"), spaced.get("p99_ms")
        out.append({
            "name": "commit-to-client, one live client (spaced)",
            "target": f"p50 <= {TARGET_P50_MS:.0f} ms, p99 <= {TARGET_P99_MS:.0f} ms",
            "value": f"p50 {p50:.1f} ms, p99 {p99:.1f} ms",
            "pass": p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS and spaced.get("missing") == 0,
        })  # fmt: skip
    return out


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(measurement, result, detail) rows: the same table on the terminal and in the README."""
    rows: list[tuple[str, str, str]] = []
    res = report["results"]
    init = res.get("initial_sync", {})
    floor = init.get("copy_floor")
    if floor:
        detail = f"{floor['seconds']:.2f}s, {floor['bytes'] / 1e6:.1f} MB text, {floor['bytes_per_row']} B/row"
        rows.append(("COPY (select * from tasks) TO STDOUT", f"{floor['rows_per_second']:,} rows/s", detail))
    labels = {"fresh": "fresh shape", "fresh_identity": "fresh shape, identity", "materialised": "2nd client",
              "materialised_identity": "2nd client, identity", "materialised_zstd": "2nd client, zstd"}  # fmt: skip
    for key, entry in init.items():
        if not isinstance(entry, dict) or "readers" not in entry:
            continue
        label = labels.get(key, key.replace("materialised_", "materialised, ").replace("_", " "))
        ratio = f"{entry['rows_per_second'] / floor['rows_per_second']:.2f}x COPY; " if floor else ""
        first = f"first response {entry['first_response_seconds']:.2f}s, " if "first_response_seconds" in entry else ""
        rows.append((
            f"initial sync, {label}", f"{entry['rows_per_second']:,} rows/s",
            f"{ratio}{entry['json_mb_per_second']} MB/s JSON ({entry['json_bytes_per_row']} B/row), "
            f"{entry['readers']} reader(s), {entry['seconds']:.2f}s, {first}{entry['wire_bytes'] / 1e6:.1f} MB on the "
            f"wire ({'/'.join(entry['content_encodings'])}); server CPU {entry['server_cpu_seconds']}s = "
            f"{entry['server_cpu_us_per_row']} µs/row, {entry['server_cpu_share_of_one_core']:.0%} of a core",
        ))  # fmt: skip
    for key, entry in res.get("latency", {}).items():
        if entry.get("count"):
            rows.append((
                f"commit→client latency, {key}", f"p50 {entry['p50_ms']:.1f} ms",
                f"p95 {entry['p95_ms']:.1f}, p99 {entry['p99_ms']:.1f}, max {entry['max_ms']:.1f} ms; "
                f"{entry['received']}/{entry['commits']} received",
            ))  # fmt: skip
    for key, entry in res.get("fanout", {}).items():
        deliveries = entry.get("all_deliveries", {})
        if deliveries.get("count"):
            rows.append((
                f"fan-out {key}: every delivery", f"p50 {deliveries['p50_ms']:,.1f} ms",
                f"p99 {deliveries['p99_ms']:,.1f}, max {deliveries['max_ms']:,.1f} ms over {deliveries['count']:,} "
                f"deliveries in {deliveries['rounds']} rounds",
            ))  # fmt: skip
        for name, rnd in entry.get("rounds", {}).items():
            rows.append((
                f"fan-out {key}: {name}",
                "—" if rnd.get("all_ms") is None else f"all in {rnd['all_ms']:,.0f} ms",
                f"{rnd['received']}/{rnd['clients']} clients (of {entry['clients']} on {entry['shapes']} shapes), "
                f"first {rnd['first_ms']} ms, p50 {rnd['p50_ms']} ms",
            ))  # fmt: skip
        rows.append((
            f"fan-out {key}: server RSS", mb(entry["rss_peak_bytes"]) + " peak",
            f"idle {mb(entry['rss_idle_before_bytes'])}, {int(entry['live_gauge_seen'])} waiting "
            f"{mb(entry['rss_with_clients_waiting_bytes'])} ({entry['rss_per_waiting_client_bytes']:,} B each); "
            f"ramp-up {entry['ramp_up_seconds']}s; "
            f"server CPU {entry['server_cpu_seconds']}s",
        ))  # fmt: skip
    return rows


def print_summary(report: dict[str, Any]) -> None:
    console = Console()
    table = Table(title=f"pgferry sync server benchmark ({report['date']})", show_lines=False)
    table.add_column("measurement")
    table.add_column("result", justify="right")
    table.add_column("detail")
    for row in summary_rows(report):
        table.add_row(*row)
    console.print(table)
    checks = Table(title="targets from the issue")
    checks.add_column("target")
    checks.add_column("wanted")
    checks.add_column("measured")
    checks.add_column("")
    for entry in report["targets"]:
        value = entry["value"]
        shown = f"{value:,}" if isinstance(value, int | float) else str(value)
        checks.add_row(entry["name"], entry["target"], shown, verdict(entry["pass"]))
    console.print(checks)
    for problem in report["problems"]:
        console.print(f"[red]problem:[/red] {problem}")


def readme_block(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        README_START,
        f"### Latest results ({report['date']})",
        "",
        f"`.venv/bin/python {report['command'].strip()}`",
        "",
        f"PostgreSQL {report['postgres_version']} ({report['postgres_install']}, fsync "
        f"{'on' if report['parameters']['pg_fsync'] else 'off'}), {report['data']['rows']:,} task rows "
        f"({report['data']['table_bytes'] / 1e6:,.0f} MB, "
        f"embeddings {'on' if report['data']['embeddings'] else 'off'}), "
        f"{machine['cpu_count']} CPUs shared by the server, the load generator and PostgreSQL; 1-minute load average "
        f"{machine['loadavg_1m_at_start']} at start, {machine['loadavg_1m_at_end']} at end. "
        f"Full data: `bench/results/{report['results_file']}`.",
        "",
        "| target | wanted | measured | |",
        "|---|---|---|---|",
    ]
    for entry in report["targets"]:
        value = entry["value"]
        shown = f"{value:,}" if isinstance(value, int | float) else str(value)
        lines.append(f"| {entry['name']} | {entry['target']} | {shown} | {verdict(entry['pass'])} |")
    lines += ["", "| measurement | result | detail |", "|---|---:|---|"]
    lines += [f"| {m} | {r} | {d} |" for m, r, d in summary_rows(report)]
    lines += [f"- problem: {problem}" for problem in report["problems"]]
    lines.append(README_END)
    return "\n".join(lines)


def write_readme(block: str) -> None:
    replace_block(README, README_START, README_END, block)


# --- main ----------------------------------------------------------------------------------------------------


def raise_fd_limit(clients: int) -> dict[str, int]:
    """Each live client holds a socket here and one in the server (which inherits this limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = clients + 512
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise BenchError(f"need {needed} file descriptors for {clients} clients, the hard limit is {hard}")
    return {"soft": soft, "hard": hard}


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGINT, always) unwind like Ctrl-C: the ``finally`` blocks stop the servers, remove the files."""

    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    # A shell starting us in the background sets SIGINT to "ignore", and Python then keeps it that way.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000, help="rows in tasks (default 100000)")
    parser.add_argument("--clients", type=int, default=10_000, help="concurrent live clients (default 10000)")
    parser.add_argument("--client-processes", type=int, default=4, help="processes holding the live clients (4)")
    parser.add_argument("--fanout-rounds", type=int, default=5, help="commits delivered to all live clients (5)")
    parser.add_argument("--where-shapes", type=int, default=100, help="distinct where shapes, 10 clients each (100)")
    parser.add_argument("--readers", type=int, default=4, help="concurrent raw readers of the materialised shape (4)")
    parser.add_argument("--fresh-encoding", default="gzip", help="accept-encoding of the fresh-shape reader (gzip)")
    parser.add_argument(
        "--fresh-where-variant", action=argparse.BooleanOptionalAction, default=True,
        help="also time a second fresh shape read with accept-encoding identity",
    )  # fmt: skip
    parser.add_argument("--changes", type=int, default=300, help="single-row commits for latency (default 300)")
    parser.add_argument("--spacing-ms", default="20,50", help="range of the pause between commits (default 20,50)")
    parser.add_argument("--no-burst", action="store_true", help="skip the back-to-back latency variant")
    parser.add_argument("--no-where-shapes", action="store_true", help="skip the clients/10 distinct shapes variant")
    parser.add_argument("--embeddings", action="store_true", help="fill tasks.embedding (1536 floats) too")
    parser.add_argument(
        "--small-rows",
        type=int,
        default=2_000_000,
        help="rows of a ~60-byte-row table read as a fresh shape against its COPY (2000000; 0: skip)",
    )
    parser.add_argument(
        "--vector-rows",
        type=int,
        default=20_000,
        help="rows of a 1536-d vector table read as a fresh shape against its COPY (20000; 0: skip)",
    )
    parser.add_argument(
        "--materialised-passes", type=int, default=5,
        help="whole reads of the materialised shape, one after another, per measurement (5)",
    )  # fmt: skip
    parser.add_argument("--initial-only", action="store_true", help="only phase 1 (initial sync); no live phases")
    parser.add_argument("--live-timeout", type=float, default=20.0, help="the server's long-poll timeout (s)")
    parser.add_argument("--pg-bindir", default=None, help="PostgreSQL bin directory (default: embedded or env)")
    parser.add_argument("--pg-fsync-off", action="store_true", help="fsync = off on PostgreSQL (not the default)")
    parser.add_argument("--keep", action="store_true", help="leave PostgreSQL, the server and files (prints where)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no JSON and no README block")
    parser.add_argument("--tag", default="", help="results file sync-<date>-<tag>.json (default sync-<date>.json)")
    args = parser.parse_args(argv)
    low, _, high = args.spacing_ms.partition(",")
    args.spacing = (float(low) / 1000, float(high or low) / 1000)
    if args.rows < 1 or args.clients < 1 or args.changes < 1:
        parser.error("--rows, --clients and --changes must be positive")
    return args


def other_shapes(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The ``OTHER_SHAPES_SQL`` tables this run seeds, with their row counts (0 skips one)."""
    wanted = (("small_rows", args.small_rows), ("vector_rows", args.vector_rows))
    return [(name, count) for name, count in wanted if count > 0]


def run(args: argparse.Namespace, root: Path, report: dict[str, Any]) -> None:
    results: dict[str, Any] = report["results"]
    problems: list[str] = report["problems"]
    db = Database(root, args.pg_bindir, fsync=not args.pg_fsync_off)
    server: SyncServer | None = None
    rss: RssSampler | None = None
    try:
        say(f"starting PostgreSQL in {root} ...")
        db.start()
        report["postgres_version"] = db.version
        report["postgres_install"] = db.install_label
        say(f"seeding {args.rows:,} tasks ...")
        report["data"] = db.seed(args.rows, embeddings=args.embeddings)
        say(f"seeded: {report['data']}")
        other_data: dict[str, dict[str, Any]] = {}
        for name, count in other_shapes(args):  # before the server starts: --table needs the tables to exist
            say(f"seeding {count:,} {name.replace('_', ' ')} ...")
            other_data[name] = db.seed_other_shape(name, count)
        update_ids = db.sample_ids(args.changes * (1 if args.no_burst else 2))

        report["machine"]["nofile_limit"] = raise_fd_limit(args.clients)  # inherited by the server and clients
        extra_tables = [data["table"] for data in other_data.values()]
        server = SyncServer(db.url, root / "sync-data", root / "sync-server.log", args.live_timeout, extra_tables)
        say(f"starting the sync server on {server.url} ...")
        server.start()
        rss = RssSampler(server.pid).start()
        results["rss_after_start_bytes"] = rss.now()

        rows_total = report["data"]["rows"]
        say("1. initial sync: COPY floor, fresh shape, second client (raw reader processes) ...")
        floor = db.copy_floor("public.tasks", rows_total)
        query = "table=tasks"
        initial: dict[str, Any] = {"copy_floor": floor}
        results["initial_sync"] = initial
        initial["fresh"] = run_readers(server, query, args.fresh_encoding, 1, rows_total)
        passes = args.materialised_passes
        initial["materialised"] = run_readers(server, query, "gzip", 1, rows_total, passes=passes)
        initial["materialised_identity"] = run_readers(server, query, "identity", 1, rows_total, passes=passes)
        initial["materialised_zstd"] = run_readers(server, query, "zstd", 1, rows_total, passes=passes)
        if args.readers > 1:
            initial[f"materialised_{args.readers}_readers_gzip"] = run_readers(
                server, query, "gzip", args.readers, rows_total
            )
            initial[f"materialised_{args.readers}_readers_identity"] = run_readers(
                server, query, "identity", args.readers, rows_total
            )
        if args.fresh_where_variant:
            # A fresh shape again (a where clause every row passes makes it a new shape of the same rows).
            fresh_again = "table=tasks&where=priority+%3E%3D+0"
            initial["fresh_identity"] = run_readers(server, fresh_again, "identity", 1, rows_total)
        for key, entry in initial.items():
            if isinstance(entry, dict) and entry.get("problem"):
                problems.append(f"initial sync {key}: {entry['problem']}")
        if initial["fresh"].get("handle") != initial["materialised"].get("handle"):
            problems.append("the second client got a different handle for the same shape")
        initial["rss_after_bytes"] = rss.now()
        fresh, second = initial["fresh"], initial["materialised"]
        say(f"   COPY {floor['seconds']:.2f}s; fresh {fresh['seconds']:.2f}s ({fresh['rows_per_second']:,} rows/s); "
            f"second {second['seconds']:.2f}s ({second['json_mb_per_second']} MB/s JSON, server CPU "
            f"{second['server_cpu_share_of_one_core']} of a core)")  # fmt: skip
        other: dict[str, Any] = {}
        results["other_data_shapes"] = other
        for name, data in other_data.items():
            wait_server_idle(server)
            entry_floor = db.copy_floor(data["table"], data["rows"])
            entry_fresh = run_readers(server, f"table=bench_{name}", args.fresh_encoding, 1, data["rows"])
            other[name] = {"data": data, "copy_floor": entry_floor, "fresh": entry_fresh}
            if entry_fresh.get("problem"):
                problems.append(f"initial sync {name}: {entry_fresh['problem']}")
            say(f"   {name}: COPY {entry_floor['seconds']:.2f}s ({entry_floor['rows_per_second']:,} rows/s); fresh "
                f"{entry_fresh['seconds']:.2f}s ({entry_fresh['rows_per_second']:,} rows/s, "
                f"{entry_fresh['json_mb_per_second']} MB/s JSON)")  # fmt: skip
        if args.initial_only:
            return
        shape = shape_head(server.url, {"table": "tasks"})
        wait_server_idle(server)

        latency: dict[str, Any] = {}
        results["latency"] = latency
        say(f"2. commit-to-client latency: {args.changes} commits {args.spacing_ms} ms apart ...")
        latency["spaced"] = commit_latency(db, server, shape, update_ids, changes=args.changes, spacing=args.spacing)
        say(f"   {json.dumps({k: v for k, v in latency['spaced'].items() if k.endswith('_ms')})}")
        if not args.no_burst:
            say(f"   burst: {args.changes} commits back to back ...")
            latency["burst"] = commit_latency(db, server, shape, update_ids, changes=args.changes, spacing=None)
            say(f"   {json.dumps({k: v for k, v in latency['burst'].items() if k.endswith('_ms')})}")
        for key, entry in latency.items():
            if entry.get("missing") or entry.get("poller_error"):
                problems.append(f"latency {key}: {entry['missing']} changes never arrived; {entry['poller_error']}")

        head = shape_head(server.url, {"table": "tasks"})  # the offset after the latency commits
        fan: dict[str, Any] = {}
        results["fanout"] = fan
        say(f"3. {args.clients} live clients on one shape ...")
        fan["same_shape"] = fanout(
            db, server, rss, clients=args.clients, shapes=[("table=tasks", head["handle"], head["offset"])],
            live_timeout=args.live_timeout, processes=args.client_processes, rounds=args.fanout_rounds,
            probe_changes=min(args.changes, 200),
        )  # fmt: skip
        probe = fan["same_shape"].get("probe_latency_while_all_wait", {})
        say(f"   probe on another table while all {args.clients} wait: "
            f"{json.dumps({k: v for k, v in probe.items() if k.endswith('_ms')})}")  # fmt: skip
        if probe.get("missing") or probe.get("poller_error"):
            problems.append(f"probe latency: {probe.get('missing')} never arrived; {probe.get('poller_error')}")
        say(f"   {json.dumps(fan['same_shape']['rounds'])}; peak RSS {mb(fan['same_shape']['rss_peak_bytes'])}")
        if not args.no_where_shapes and args.where_shapes > 0:
            count = args.where_shapes
            say(f"   {count} distinct where shapes, {args.clients} clients ...")
            shapes, created = create_where_shapes(server, count)
            fan["distinct_shapes"] = fanout(
                db, server, rss, clients=min(args.clients, count * 10), shapes=shapes,
                live_timeout=args.live_timeout, processes=args.client_processes, rounds=1,
            )  # fmt: skip
            fan["distinct_shapes"]["shape_creation_seconds"] = round(created, 2)
            # Every transaction on tasks now runs the where clause of each of those shapes: how much does the
            # plain shape's latency pay for them? (Their departed long-polls are waited out first.)
            _wait_for_gauge(server, 0, timeout=args.live_timeout + 10, below=True)
            extra = min(args.changes, 100)
            say(f"   latency again with {count} where shapes on the table: {extra} commits ...")
            key = f"spaced_with_{count}_where_shapes"
            latency[key] = commit_latency(
                db, server, shape_head(server.url, {"table": "tasks"}), db.sample_ids(extra), changes=extra,
                spacing=args.spacing,
            )  # fmt: skip
            say(f"   {json.dumps({k: v for k, v in latency[key].items() if k.endswith('_ms')})}")
            if latency[key].get("missing") or latency[key].get("poller_error"):
                problems.append(
                    f"latency {key}: {latency[key]['missing']} never arrived; {latency[key]['poller_error']}"
                )
            say(f"   {json.dumps(fan['distinct_shapes']['rounds'])}; "
                f"peak RSS {mb(fan['distinct_shapes']['rss_peak_bytes'])}")  # fmt: skip
        for key, entry in fan.items():
            if not entry["all_waiting"]:
                problems.append(f"fan-out {key}: the live gauge reached {entry['live_gauge_seen']:.0f} of "
                                f"{entry['clients']} clients")  # fmt: skip
            for name, rnd in entry["rounds"].items():
                if rnd["received"] != rnd["clients"]:
                    problems.append(f"fan-out {key} {name}: {rnd['received']} of {rnd['clients']} clients got it")
            if entry["error_count"]:
                problems.append(f"fan-out {key}: {entry['error_count']} client errors, e.g. {entry['errors'][:2]}")

        metrics = server.metrics()
        results["server_metrics"] = {
            k: v for k, v in metrics.items()
            if k.startswith(("pgferry_sync_commit_to_response", "pgferry_sync_requests", "pgferry_sync_shapes",
                             "pgferry_sync_log_bytes", "pgferry_sync_transactions"))
        }  # fmt: skip
        results["rss_at_end_bytes"] = rss.now()
        results["rss_hwm_bytes"] = _proc_status(server.pid, "VmHWM")
    except Exception:
        if server is not None:
            tail = server.log_tail()
            if tail:
                say(f"sync server log (tail):\n{tail}")
        raise
    finally:
        if rss is not None:
            rss.stop()
        if args.keep:
            say(f"--keep: PostgreSQL at {db.url}, sync server at {server.url if server else '—'}, files in {root}")
        else:
            if server is not None:
                server.stop()
            db.destroy()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "_reader":  # one raw reader process (run_readers)
        spec = json.loads(argv[1])
        print(json.dumps(read_shape(spec["port"], spec["query"], spec["encoding"], spec["start_at"], spec["passes"])))
        return 0
    if argv and argv[0] == "_live":  # one live-client process (LiveClients): its assignments on stdin
        asyncio.run(live_worker(int(argv[1]), json.loads(sys.stdin.readline())))
        return 0
    args = parse_args(argv)
    date = dt.date.today().isoformat()
    results_file = f"sync-{date}-{args.tag}.json" if args.tag else f"sync-{date}.json"
    report: dict[str, Any] = {
        "benchmark": "sync",
        "date": date,
        "command": " ".join(["bench/sync.py", *argv]),
        "results_file": results_file,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        },
        "parameters": {
            "rows": args.rows,
            "clients": args.clients,
            "changes": args.changes,
            "spacing_ms": [round(s * 1000) for s in args.spacing],
            "live_timeout_seconds": args.live_timeout,
            "embeddings": args.embeddings,
            "small_rows": args.small_rows,
            "vector_rows": args.vector_rows,
            "pg_fsync": not args.pg_fsync_off,
            "client_processes": args.client_processes,
            "readers": args.readers,
            "server": "pgferry sync serve (the venv's console script), own process; initial sync read by raw "
            "http.client reader processes (no JSON parsing), live clients held by --client-processes processes",
        },
        "results": {},
        "problems": [],
    }
    base = Path(os.environ.get("PGFERRY_TEST_TMPDIR", tempfile.gettempdir()))
    root = Path(tempfile.mkdtemp(prefix="pgferry-bench-sync-", dir=base))
    root.chmod(0o755)  # the PostgreSQL server may run as another account
    started = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            run(args, root, report)
    except KeyboardInterrupt:
        say("interrupted: servers stopped, files removed")
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    report["timestamp"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report["targets"] = targets(report)
    print_summary(report)
    if not args.no_write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / results_file
        path.write_text(json.dumps(report, indent=2) + "\n")
        write_readme(readme_block(report))
        say(f"wrote {path.relative_to(BENCH_DIR.parent)} and the sync results block of bench/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
