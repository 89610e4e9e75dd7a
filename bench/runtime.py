"""Benchmark the runtime data layer: pooled RLS-scoped point queries per second, and durable-queue replay rate.

Run from the project root::

    .venv/bin/python bench/runtime.py                       # 30 s of point queries, 20,000 queued writes
    .venv/bin/python bench/runtime.py --seconds 5 --writes 2000      # a quick look

What is measured
----------------
A throwaway server with the platform schema gets ``--rows`` tasks (no embeddings) owned by ``--users`` users.

1. **RLS-scoped point queries**, two ways: ``transaction`` (``with client.user_transaction(user) as conn``: BEGIN,
   claims, query, COMMIT, four round trips) and ``query`` (``client.query(user, sql, params)``: the claims and the
   statement as one message, one implicit transaction, from statements prepared once per session in direct
   mode). ``--processes`` load processes (separate processes, so Python's GIL is not the limit being
   measured), each with its own ``create_database_client`` pool (``--pool`` connections, direct mode) and
   ``--threads`` threads. Every query is what a service does per request: a pooled connection, a
   transaction as a user whose token was verified (``SET LOCAL ROLE authenticated`` + claims, one statement),
   ``select … from public.tasks where id = $1`` of one of that user's tasks (RLS applies), commit. Queries per
   second over ``--seconds`` after a warm-up, summed over processes; per-query latency percentiles. The server,
   the load processes and anything else on the machine share its CPUs (the load average is recorded).
2. **Durable queue replay.** ``--writes`` operations (an insert into ``public.tasks`` as the user, each with its
   idempotency key) are put in the on-disk queue, as during an outage; then ``sync_queued_operations`` applies them
   (batches of ``--batch``: one message and one transaction each, idempotency keys recorded, the next batch
   rendered while the database applies the current one). Writes per
   second of the replay; the table is then checked to hold every write exactly once.

Targets (issue 14): ≥ 5,000 point queries/s on 2 cores; replay ≥ 5,000 writes/s. Output:
``bench/results/runtime-<date>.json`` and a summary on stdout.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from runtime_common import (  # bench/ is on sys.path when a benchmark runs as a script
    SECRET,
    SUPABASE_URL,
    anon_key,
    machine,
    say,
    summarize_ms,
    throwaway_server,
    token_for,
    write_results,
)

from pgferry.config import load_settings
from pgferry.runtime.client import create_database_client
from pgferry.runtime.queue import Operation
from pgferry.runtime.resilience import ResilientDatabase

SEED = """
insert into public.tasks (user_id, title, status, priority)
select ('6f1c2d4e-0000-4000-8000-' || lpad(to_hex(n %% %(users)s), 12, '0'))::uuid, 'task ' || n,
       (array['pending', 'running', 'completed'])[1 + n %% 3], n %% 5
from generate_series(1, %(rows)s) as n
"""
POINT = "select id, title, status, priority from public.tasks where id = %s"


def settings_for(url: str) -> Any:
    return load_settings(
        supabase_db_url=url,
        supabase_url=SUPABASE_URL,
        supabase_anon_key=anon_key(),
        supabase_jwt_secret=SECRET,
        profile="dev",
    )


def _load_process(
    url: str,
    tasks: dict[str, list[str]],
    threads: int,
    pool: int,
    warmup: float,
    seconds: float,
    start_at: float,
    method: str,
    out: Any,
) -> None:
    with create_database_client(settings_for(url), min_size=pool, max_size=pool) as client:
        users = {user: client.verify(token_for(user)) for user in tasks}
        names = list(tasks)
        counts = [0] * threads
        latencies: list[list[float]] = [[] for _ in range(threads)]
        misses = [0] * threads

        def work(slot: int) -> None:
            rng = random.Random(slot)
            measuring_from = start_at + warmup
            until = measuring_from + seconds
            while (now := time.perf_counter()) < until:
                name = rng.choice(names)
                task = rng.choice(tasks[name])
                if method == "query":
                    rows = client.query(users[name], POINT, (task,))
                    row = rows[0] if rows else None
                else:
                    with client.user_transaction(users[name]) as conn:
                        row = conn.execute(POINT, (task,)).fetchone()
                done = time.perf_counter()
                if row is None:
                    misses[slot] += 1
                if now >= measuring_from:
                    counts[slot] += 1
                    if counts[slot] % 10 == 0:
                        latencies[slot].append(done - now)

        while time.perf_counter() < start_at:
            time.sleep(0.01)
        workers = [threading.Thread(target=work, args=(slot,)) for slot in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        out.put({"queries": sum(counts), "latencies": [x for xs in latencies for x in xs], "misses": sum(misses)})


def point_queries(url: str, args: argparse.Namespace, method: str) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("select user_id::text, id::text from public.tasks").fetchall()
    tasks: dict[str, list[str]] = {}
    for user, task in rows:
        tasks.setdefault(user, []).append(task)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.perf_counter() + 8.0  # every process connected and verified before the clock starts
    procs = [
        ctx.Process(
            target=_load_process,
            args=(url, tasks, args.threads, args.pool, args.warmup, args.seconds, start_at, method, out),
        )
        for _ in range(args.processes)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=args.warmup + args.seconds + 120) for _ in procs]
    for proc in procs:
        proc.join()
    total = sum(r["queries"] for r in results)
    return {
        "queries": total,
        "queries_per_second": round(total / args.seconds),
        "misses": sum(r["misses"] for r in results),
        "latency_sampled_1_in_10": summarize_ms([x for r in results for x in r["latencies"]]),
    }


def replay(url: str, args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="pgferry-bench-queue-"))
    with create_database_client(settings_for(url), max_size=2) as client:
        users = [client.verify(token_for(f"6f1c2d4e-0000-4000-8000-{n:012x}")) for n in range(args.users)]
        db = ResilientDatabase(client, state)
        started = time.perf_counter()
        for n in range(args.writes):
            user = users[n % len(users)]
            db.queue.put(
                Operation(
                    "insert into public.tasks (user_id, title) values (%(user)s, %(title)s)",
                    {"user": user.user_id, "title": f"queued {n}"},
                ),
                user.claims,
            )
        enqueue_seconds = time.perf_counter() - started
        started = time.perf_counter()
        report = db.sync_queued_operations(batch_size=args.batch)
        replay_seconds = time.perf_counter() - started
        db.close()
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "select count(*), count(distinct title) from public.tasks where title like 'queued %'"
        ).fetchone()
    assert row is not None
    return {
        "writes": args.writes,
        "batch": args.batch,
        "applied": report.applied,
        "dead_lettered": report.dead_lettered,
        "remaining": report.remaining,
        "rows_found": row[0],
        "distinct_rows": row[1],
        "enqueue_per_second": round(args.writes / enqueue_seconds),
        "replay_seconds": round(replay_seconds, 2),
        "replay_per_second": round(args.writes / replay_seconds),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="runtime point queries and queue replay")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pool", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--writes", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--bindir", help="PostgreSQL bin directory (default: embedded 18 or PGFERRY_PG_BINDIR)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "runtime",
        "command": "bench/runtime.py " + " ".join(argv or []),
        "machine": machine(),
        "parameters": {k: v for k, v in vars(args).items() if k != "no_write"},
    }
    with throwaway_server(args.bindir, shared_buffers="256MB") as (url, version, _cluster):
        report["server"] = {"version": version}
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SEED, {"users": args.users, "rows": args.rows})
            conn.execute("vacuum analyze public.tasks")
        for method in ("transaction", "query"):
            say(f"point queries ({method}): {args.processes} processes x {args.threads} threads, {args.seconds:g} s")
            report[f"point_queries_{method}"] = result = point_queries(url, args, method)
            say(
                f"point queries ({method}): {result['queries_per_second']:,}/s, "
                f"p50 {result['latency_sampled_1_in_10']['p50_ms']} ms"
            )
        say(f"replay: {args.writes:,} queued writes")
        report["replay"] = replay(url, args)
        say(
            f"replay: {report['replay']['replay_per_second']:,} writes/s "
            f"({report['replay']['distinct_rows']:,} distinct rows of {report['replay']['writes']:,})"
        )
    report["targets"] = {
        "point_queries_per_second >= 5000": max(
            report[f"point_queries_{method}"]["queries_per_second"] for method in ("transaction", "query")
        )
        >= 5000,
        "replay_per_second >= 5000": report["replay"]["replay_per_second"] >= 5000,
        "replay exactly once": report["replay"]["distinct_rows"] == report["replay"]["rows_found"] == args.writes,
    }
    report["loadavg_1m_at_end"] = round(__import__("os").getloadavg()[0], 2)
    if not args.no_write:
        say(f"wrote {write_results('runtime', report)}")
    for target, met in report["targets"].items():
        say(f"{'met' if met else 'NOT met'}: {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
