"""What bench/vector.py and bench/runtime.py share: a throwaway server with the platform schema, stats, results.

The server is a fresh cluster (``fsync = off``: the data is disposable and the benchmarks measure queries, not
disk flushes; ``synchronous_commit`` stays on) with the Supabase baseline and pgferry's migrations, removed on exit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jwt
import psycopg

from pgferry.db.rls import user_claims
from pgferry.localstack.binaries import find_install
from pgferry.localstack.cluster import ClusterSettings, PostgresCluster, free_port, runnable_install, service_user
from pgferry.localstack.databases import create_database
from pgferry.localstack.stack import prepare_target_database

RESULTS = Path(__file__).resolve().parent / "results"
SECRET = "bench-jwt-secret-0123456789abcdefghijkl"  # noqa: S105 (throwaway local server)
SUPABASE_URL = "http://127.0.0.1:54321"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p95_ms": round(percentile(ms, 95), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def token_for(user_id: str) -> str:
    return jwt.encode(user_claims(user_id, issuer=f"{SUPABASE_URL}/auth/v1"), SECRET, algorithm="HS256")


def anon_key() -> str:
    now = int(time.time())
    return jwt.encode({"role": "anon", "iss": "supabase", "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


@contextlib.contextmanager
def throwaway_server(
    bindir: str | None, *, shared_buffers: str = "512MB", extra_conf: str = ""
) -> Iterator[tuple[str, str, PostgresCluster]]:
    """``(database url, server version, cluster)`` of a fresh server with the platform schema; removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="pgferry-bench-"))
    root.chmod(0o755)
    user = service_user()
    install = runnable_install(find_install(bindir), user, Path(tempfile.gettempdir()) / "pgferry-pginstall")
    cluster = PostgresCluster(install, root / "pg", user=user)
    try:
        cluster.init(ClusterSettings(port=free_port(), shared_buffers=shared_buffers))
        with (cluster.datadir / "postgresql.conf").open("a") as conf:
            conf.write("fsync = off\nfull_page_writes = off\n" + extra_conf)
        cluster.start()
        url = create_database(cluster, "bench_runtime")
        prepare_target_database(url)
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("select current_setting('server_version')").fetchone()
        yield url, str(row[0]) if row else "", cluster
    finally:
        cluster.destroy()
        shutil.rmtree(root, ignore_errors=True)


def write_results(name: str, report: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
