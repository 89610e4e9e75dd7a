"""Benchmark the online migration: apply rate, lag under a steady write load, cut-over downtime, reverse lag.

Run from the project root::

    .venv/bin/python bench/online.py                      # the reference run (about 3 minutes)
    .venv/bin/python bench/online.py --backlog 50000 --duration 10 --no-write     # a quick look

What is measured, on one throwaway server pair (``ServerPair``: fsync off on both, loopback TCP), with the
exact commands a user runs (``pgferry migrate run --online``, ``pgferry migrate cutover``, ``pgferry migrate
finish``) in their own processes:

``apply rate``
    The follower is paused (SIGSTOP) while the source commits a backlog of small-row changes (inserts, then
    updates, then deletes of ``observability_events`` rows, 1,000 rows per statement), then resumed; the rate
    is the backlog divided by the time until the target's ``migration_streams.changes_applied`` has grown by
    it. pgcopydb's follow applies 350 to 1,500 statements/s on one connection (``../shared/facts/migration.md``).
``lag under load``
    A generator commits ``--rate`` row changes per second for ``--duration`` seconds (one transaction every
    100 ms: inserts and updates of small rows) plus a probe row every 100 ms; a watcher on the target times
    each probe from its commit on the source to its arrival on the target (p50, p99, max).
``cut-over downtime``
    ``pgferry migrate cutover --json`` while the generator keeps writing: the downtime pgferry reports (fence
    to switch, verification of both servers included) and the command's wall time.
``reverse lag``
    After the cut-over, probes written on the target every 100 ms, timed until they arrive on the source.

Targets (issue 11): apply ≥ 20,000 row changes/s; lag < 1 s at 5,000 changes/s; downtime < 2 s; reverse lag
< 1 s. Output: ``bench/results/online-<date>.json`` and a summary on stdout. The machine's load average is
recorded, since other work on a 2-core machine slows every figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from pgferry.localstack.binaries import find_install
from pgferry.sampledata import TestDataManager
from pgferry.testing.servers import NEON_TEMPLATE, SUPABASE_TEMPLATE, ServerPair

RESULTS = Path(__file__).resolve().parent / "results"


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def pgferry(*args: str, env: dict[str, str]) -> list[str]:
    exe = Path(sys.executable).with_name("pgferry")
    return [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "pgferry.cli.main"]), *args]


def applied(target: str) -> int:
    with psycopg.connect(target, autocommit=True) as conn:
        row = conn.execute(
            "select coalesce(sum(changes_applied), 0) from pgferry.migration_streams where direction = 'forward'"
        ).fetchone()
    return int(row[0]) if row else 0


def phase(target: str) -> str | None:
    with psycopg.connect(target, autocommit=True) as conn:
        if conn.execute("select to_regclass('pgferry.migration_runs')").fetchone() == (None,):
            return None
        row = conn.execute("select phase from pgferry.migration_runs order by id desc limit 1").fetchone()
    return None if row is None else str(row[0])


def wait(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.01)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


class Probes:
    """Probe rows written on one side and timed until they show up on the other."""

    def __init__(self, origin: str, destination: str, prefix: str) -> None:
        self.origin, self.destination, self.prefix = origin, destination, prefix
        self.sent: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def send(self, conn: psycopg.Connection[Any], n: int) -> None:
        name = f"{self.prefix}-{n}"
        conn.execute("insert into public.environments (user_id, name) values (gen_random_uuid(), %s)", (name,))
        self.sent[name] = time.monotonic()

    def watch(self) -> None:
        with psycopg.connect(self.destination, autocommit=True) as conn:
            while not self.stop.is_set() or len(self.seen) < len(self.sent):
                rows = conn.execute(
                    "select name from public.environments where name like %s", (f"{self.prefix}-%",)
                ).fetchall()
                now = time.monotonic()
                for (name,) in rows:
                    self.seen.setdefault(name, now)
                if self.stop.is_set() and time.monotonic() - max(self.sent.values(), default=now) > 30:
                    break
                time.sleep(0.005)

    def latencies(self) -> list[float]:
        return sorted(self.seen[k] - self.sent[k] for k in self.sent if k in self.seen)


def summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {
        "n": len(values),
        "p50": round(statistics.median(values), 4),
        "p99": round(values[min(len(values) - 1, int(len(values) * 0.99))], 4),
        "max": round(values[-1], 4),
    }


def sustained_load(source: str, rate: int, duration: float, probes: Probes) -> dict[str, Any]:
    """``rate`` row changes/s in 10 transactions per second, with a probe each; returns what it achieved."""
    per_tick = max(2, rate // 10)
    inserts = per_tick // 2
    started = time.monotonic()
    changes = 0
    with psycopg.connect(source, autocommit=True) as conn:
        tick = 0
        while time.monotonic() - started < duration:
            with conn.transaction():
                conn.execute(
                    "insert into public.observability_events (user_id, event_type, message) "
                    "select gen_random_uuid(), 'load', 'tick ' || g from generate_series(1, %s) g",
                    (inserts,),
                )
                updated = conn.execute(
                    "update public.observability_events set severity = 'debug' where id in (select id from "
                    "public.observability_events where event_type = 'load' order by id desc limit %s)",
                    (per_tick - inserts,),
                ).rowcount
                probes.send(conn, tick)
            changes += inserts + updated + 1
            tick += 1
            time.sleep(max(0.0, started + tick * 0.1 - time.monotonic()))
    seconds = time.monotonic() - started
    return {"changes": changes, "seconds": round(seconds, 2), "changes_per_second": round(changes / seconds)}


def backlog(source: str, total: int) -> int:
    """``total`` row changes, as fast as the source takes them: a third inserts, updates, deletes."""
    third = total // 3
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("create temporary table ids (id bigint)")
        for start in range(0, third, 1000):
            conn.execute(
                "with new as (insert into public.observability_events (user_id, event_type, message) "
                "select gen_random_uuid(), 'backlog', 'row ' || g from generate_series(1, %s) g returning id) "
                "insert into ids select id from new",
                (min(1000, third - start),),
            )
        ids = [r[0] for r in conn.execute("select id from ids order by id")]
        for i in range(0, len(ids), 1000):
            conn.execute(
                "update public.observability_events set message = message || '!' where id = any(%s)",
                (ids[i : i + 1000],),
            )
        for i in range(0, len(ids), 1000):
            conn.execute("delete from public.observability_events where id = any(%s)", (ids[i : i + 1000],))
    return 3 * len(ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backlog", type=int, default=300_000, help="row changes in the apply-rate backlog")
    parser.add_argument("--rate", type=int, default=5_000, help="row changes per second of the sustained load")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of sustained load")
    parser.add_argument("--pg-bindir", default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    pair = ServerPair(find_install(args.pg_bindir))
    say(f"starting servers ({pair.install.label})")
    pair.start()
    result: dict[str, Any] = {
        "benchmark": "online",
        "date": dt.date.today().isoformat(),
        "command": "bench/online.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_1m_start": os.getloadavg()[0],
        },
        "postgres": pair.install.label,
    }
    run: subprocess.Popen[bytes] | None = None
    try:
        _, source = pair.clone(pair.source, NEON_TEMPLATE, "osrc")
        _, target = pair.clone(pair.target, SUPABASE_TEMPLATE, "otgt")
        TestDataManager(source, seed=3).seed(0.02)
        env = {**os.environ, "NEON_DATABASE_URL": source, "SUPABASE_DB_URL": target}
        say("pgferry migrate run --online")
        log = open(Path(pair.root) / "run.log", "wb")  # noqa: SIM115 - lives as long as the process
        run = subprocess.Popen(pgferry("migrate", "run", "--online", env=env), env=env, stdout=log, stderr=log)
        wait(lambda: phase(target) == "follow", 300, "the follow")
        time.sleep(1)

        say(f"apply rate: pausing the follower, committing {args.backlog:,} row changes on the source")
        run.send_signal(signal.SIGSTOP)
        before = applied(target)
        made = backlog(source, args.backlog)
        run.send_signal(signal.SIGCONT)
        seconds = wait(lambda: applied(target) >= before + made, 600, "the backlog to be applied")
        result["apply"] = {"changes": made, "seconds": round(seconds, 3), "changes_per_second": round(made / seconds)}
        say(f"    {made:,} changes in {seconds:.2f}s: {made / seconds:,.0f}/s")

        say(f"lag: {args.rate:,} changes/s for {args.duration:.0f}s with a probe every 100 ms")
        forward = Probes(source, target, "fwd")
        watcher = threading.Thread(target=forward.watch, daemon=True)
        watcher.start()
        load = sustained_load(source, args.rate, args.duration, forward)
        forward.stop.set()
        watcher.join(60)
        result["lag"] = {"load": load, "probe_seconds": summary(forward.latencies())}
        say(f"    {load['changes_per_second']:,}/s achieved; lag {result['lag']['probe_seconds']}")

        say("cut-over under the same write load")
        stop_writes = threading.Event()
        writer_probes = Probes(source, target, "late")

        def keep_writing() -> None:
            n = 0
            while not stop_writes.is_set():
                try:
                    with psycopg.connect(source, autocommit=True) as conn:
                        while not stop_writes.is_set():
                            writer_probes.send(conn, n)
                            n += 1
                            time.sleep(0.01)
                except psycopg.Error:
                    time.sleep(0.05)

        writer = threading.Thread(target=keep_writing, daemon=True)
        writer.start()
        time.sleep(1)
        started = time.monotonic()
        cut = subprocess.run(pgferry("migrate", "cutover", "--json", env=env), env=env, capture_output=True, text=True)
        wall = time.monotonic() - started
        stop_writes.set()
        writer.join(10)
        if cut.returncode != 0:
            raise RuntimeError(f"cutover failed: {cut.stderr}")
        report = json.loads(cut.stdout)
        result["cutover"] = {"reported_downtime_seconds": report["downtime_seconds"], "command_seconds": round(wall, 3)}
        say(f"    downtime {report['downtime_seconds']:.2f}s (command {wall:.2f}s)")

        say("reverse lag: probes on the target for 10 s")
        reverse = Probes(target, source, "rev")
        watcher = threading.Thread(target=reverse.watch, daemon=True)
        watcher.start()
        with psycopg.connect(target, autocommit=True) as conn:
            for n in range(100):
                reverse.send(conn, n)
                time.sleep(0.1)
        reverse.stop.set()
        watcher.join(60)
        result["reverse_lag_seconds"] = summary(reverse.latencies())
        say(f"    {result['reverse_lag_seconds']}")
        finish = subprocess.run(pgferry("migrate", "finish", env=env), env=env, capture_output=True, text=True)
        if finish.returncode != 0:
            raise RuntimeError(f"finish failed: {finish.stderr}")
        run.wait(timeout=60)
    finally:
        if run is not None and run.poll() is None:
            run.send_signal(signal.SIGCONT)
            run.kill()
        pair.stop()
    result["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
    result["targets"] = {
        "apply_changes_per_second >= 20000": result["apply"]["changes_per_second"] >= 20_000,
        "lag p99 < 1 s at 5000/s": (result["lag"]["probe_seconds"]["p99"] or 99) < 1.0,
        "cutover downtime < 2 s": result["cutover"]["reported_downtime_seconds"] < 2.0,
        "reverse lag p99 < 1 s": (result["reverse_lag_seconds"]["p99"] or 99) < 1.0,
    }
    print(json.dumps(result, indent=2))
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"online-{result['date']}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
