"""Crashes and outages: kill -9 of the migrator at random points, and servers restarting mid-copy.

Both must end in the same place as an undisturbed run: every row once, verified by checksums.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
import pytest

from pgferry.db.retry import RetryPolicy
from pgferry.testing.servers import ServerPair
from tests.cli_helpers import run_pgferry
from tests.migrate_helpers import assert_same_rows, seed_source, service_for


def _done_chunks(target_url: str) -> dict[tuple[str, str, int], Any]:
    with psycopg.connect(target_url) as conn:
        if conn.execute("select to_regclass('pgferry.migration_chunks')").fetchone() == (None,):
            return {}
        return {
            (r[0], r[1], r[2]): r[3]
            for r in conn.execute(
                "select schema_name, table_name, chunk_no, copied_at from pgferry.migration_chunks where state = 'done'"
            )
        }


def _run_state(target_url: str) -> tuple[str | None, int, int]:
    """(phase, chunks done, chunks total) as persisted on the target."""
    with psycopg.connect(target_url, autocommit=True) as conn:
        if conn.execute("select to_regclass('pgferry.migration_chunks')").fetchone() == (None,):
            return None, 0, 0
        phase = conn.execute("select phase from pgferry.migration_runs order by id desc limit 1").fetchone()
        counts = conn.execute("select count(*) filter (where state = 'done'), count(*) from pgferry.migration_chunks")
        done, total = counts.fetchone() or (0, 0)
        return (phase[0] if phase else None), int(done), int(total)


def test_kill_9_at_random_points_then_resume(source_url: str, baseline_url: str) -> None:
    seed_source(source_url, scale=0.25, seed=5)
    rng = random.Random(20261125)
    run_args = ["migrate", "run", "--source", source_url, "--target", baseline_url]
    run_args += ["--jobs", "2", "--batch-rows", "400", "--json"]
    args = [sys.executable, "-m", "pgferry.cli.main", *run_args]
    # Kill points spread over the whole run: early (plan/schema/prepare), inside the copy at random
    # fractions of the chunks, and after the copy (index rebuild or verification).
    kill_points: list[tuple[str, float]] = [
        ("seconds", rng.uniform(0.2, 1.2)),
        ("fraction", rng.uniform(0.05, 0.35)),
        ("fraction", rng.uniform(0.4, 0.6)),
        ("fraction", rng.uniform(0.65, 0.95)),
        ("phase", 0.0),
    ]
    seen_done: dict[tuple[str, str, int], Any] = {}
    kills: list[str] = []
    for kind, value in kill_points:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        while process.poll() is None and time.monotonic() - started < 120:
            phase, done, total = _run_state(baseline_url)
            if kind == "seconds" and time.monotonic() - started >= value:
                break
            if kind == "fraction" and total and done >= max(1, int(total * value)) and phase == "data":
                break
            if kind == "phase" and phase in {"indexes", "sequences", "verify"}:
                break
            time.sleep(0.01)
        if process.poll() is not None:
            continue  # it finished before this kill point; later points get their chance
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        phase, done, total = _run_state(baseline_url)
        kills.append(f"{kind}:{phase}:{done}/{total}")
        current = _done_chunks(baseline_url)
        # A chunk, once committed, is never copied again: its commit time does not change.
        for key, copied_at in seen_done.items():
            assert current.get(key) == copied_at, f"chunk {key} was copied again"
        seen_done = current
    print("kill points:", kills)
    assert len(kills) >= 4, kills
    final = run_pgferry(*run_args)  # the same command, once more, uninterrupted
    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert summary["status"] == "completed"
    current = _done_chunks(baseline_url)
    for key, copied_at in seen_done.items():
        assert current.get(key) == copied_at, f"chunk {key} was copied again"
    assert_same_rows(source_url, baseline_url)  # independent of the checksum the verifier uses
    verify = run_pgferry("migrate", "verify", "--source", source_url, "--target", baseline_url, "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)["ok"] is True


def _wait_for_done_chunks(target_url: str, wanted: int, process: subprocess.Popen[bytes], timeout: float) -> int:
    """Poll the chunk states as tightly as possible; return the done count once it reaches ``wanted``."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(target_url, autocommit=True) as conn:
        while time.monotonic() < deadline and process.poll() is None:
            if conn.execute("select to_regclass('pgferry.migration_chunks')").fetchone() != (None,):
                row = conn.execute("select count(*) from pgferry.migration_chunks where state = 'done'").fetchone()
                if row is not None and row[0] >= wanted:
                    return int(row[0])
            time.sleep(0.002)
    return -1


@pytest.mark.parametrize("crash_after_chunk", [1, 6, 13])
def test_target_crash_right_after_a_chunk_commits_loses_nothing(
    server_pair: ServerPair, source_url: str, baseline_url: str, crash_after_chunk: int
) -> None:
    """The moment a chunk shows as done, the target crashes (``-m immediate``); the copy must still be exact.

    A chunk committed without waiting for its WAL flush vanishes in crash recovery together with its
    done-marker. The run must notice before it leaves the data phase and copy it again, and a rerun must
    not resume into a verification that can never pass.
    """
    seed_source(source_url, scale=0.1, seed=17)
    run_args = ["migrate", "run", "--source", source_url, "--target", baseline_url, "--jobs", "2"]
    run_args += ["--batch-rows", "150", "--json"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pgferry.cli.main", *run_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        seen = _wait_for_done_chunks(baseline_url, crash_after_chunk, process, timeout=120)
        assert seen >= crash_after_chunk, "the run ended before the crash point"
        server_pair.target.stop(mode="immediate")
        server_pair.target.start()
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    first_ok = process.returncode == 0
    final = run_pgferry(*run_args)  # the same command again: resumes, or reports the completed run
    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert summary["status"] == "completed", summary
    assert first_ok, "the interrupted run itself should survive a target restart and finish"
    assert_same_rows(source_url, baseline_url)


class _RestartServersMidCopy:
    """A progress reporter that restarts the source, then the target, while chunks are being copied."""

    def __init__(self, pair: ServerPair) -> None:
        self.pair = pair
        self.chunks = 0
        self.restarted: list[str] = []
        self.lock = threading.Lock()

    def phase(self, name: str) -> None:
        pass

    def table_started(self, table: str, rows_estimate: int, rows_done: int) -> None:
        pass

    def bytes_copied(self, table: str, nbytes: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def chunk_done(self, table: str, rows: int, nbytes: int) -> None:
        with self.lock:
            self.chunks += 1
            if self.chunks == 5:
                self.pair.source.restart()
                self.restarted.append("source")
            elif self.chunks == 15:
                self.pair.target.restart()
                self.restarted.append("target")


def test_source_and_target_restart_mid_copy(server_pair: ServerPair, source_url: str, baseline_url: str) -> None:
    seed_source(source_url, scale=0.1, seed=9)
    reporter = _RestartServersMidCopy(server_pair)
    service = service_for(
        source_url,
        baseline_url,
        jobs=2,
        batch_rows=200,
        reporter=reporter,
        retry_policy=RetryPolicy(max_attempts=12, base_delay=0.2, max_delay=2.0),
    )
    summary = service.run()
    assert reporter.restarted == ["source", "target"]
    assert summary.status == "completed"
    assert summary.verification is not None and summary.verification.ok
    assert service.retries >= 1
    assert_same_rows(source_url, baseline_url)


def test_cli_plan_status_verify_rollback(source_url: str, baseline_url: str) -> None:
    seed_source(source_url, scale=0.01)
    plan = run_pgferry("migrate", "plan", "--source", source_url, "--target", baseline_url, "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["ok"] is True
    none = run_pgferry("migrate", "status", "--target", baseline_url, "--json")
    assert json.loads(none.stdout) == {"run": None}
    run = run_pgferry("migrate", "run", "--source", source_url, "--target", baseline_url)
    assert run.returncode == 0, run.stderr
    assert "verification passed" in run.stdout
    status = json.loads(run_pgferry("migrate", "status", "--target", baseline_url, "--json").stdout)
    assert status["status"] == "completed" and status["phase"] == "complete"
    assert status["tables_completed"] == status["tables_total"] == 8
    assert status["records_migrated"] > 0 and status["errors"] == []
    with psycopg.connect(baseline_url) as conn:  # make the target differ, verify must say where
        conn.execute(
            "update public.tasks set title = 'changed' where id = (select id from public.tasks order by id limit 1)"
        )
    verify = run_pgferry("migrate", "verify", "--source", source_url, "--target", baseline_url)
    assert verify.returncode == 1 and "public.tasks" in verify.stdout and "DIFFERENT" in verify.stdout
    rollback = run_pgferry("migrate", "rollback", "--source", source_url, "--target", baseline_url, "--json")
    assert rollback.returncode == 0, rollback.stderr
    assert json.loads(rollback.stdout)["ok"] is True
    with psycopg.connect(baseline_url) as conn:
        assert conn.execute("select to_regclass('public.tasks')").fetchone() == (None,)


def test_cli_errors_are_one_line(source_url: str) -> None:
    missing = run_pgferry("migrate", "plan", "--source", source_url, env={"SUPABASE_DB_URL": ""})
    assert missing.returncode == 2 and "--target" in missing.stderr and len(missing.stderr.splitlines()) == 1
    wrong = run_pgferry("migrate", "plan", "--source", source_url, "--target", "postgresql://x:pw@127.0.0.1:1/db")
    assert wrong.returncode == 2 and "cannot connect" in wrong.stderr and "pw@" not in wrong.stderr
