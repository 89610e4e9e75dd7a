"""A new user's bad day (issue 8): wrong input, servers going away, writes during an offline run, rollback.

Every case runs the real engine (mostly through the real ``pgferry`` command) against real servers, and
judges the data with the sorted row-by-row oracle, not with the checksum the verifier uses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from pgferry.errors import ConfigError
from pgferry.migrate import MigrationOptions, PlanBlockedError, SameDatabaseError, VerificationFailedError
from pgferry.migrate.source_schema import take_inventory
from pgferry.testing.servers import ServerPair
from tests.cli_helpers import run_pgferry
from tests.migrate_helpers import assert_same_rows, seed_source, service_for


def _with_password(url: str, password: str) -> str:
    """The same URL with a password in it (trust authentication ignores it; it must never be printed)."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{password}@")


def test_source_equal_to_target_is_refused_before_anything_is_written(source_url: str) -> None:
    seed_source(source_url, scale=0.01)
    with psycopg.connect(source_url) as conn:
        indexes_before = conn.execute("select count(*) from pg_indexes where schemaname = 'public'").fetchone()
    result = run_pgferry("migrate", "run", "--source", source_url, "--target", source_url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "same database" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with psycopg.connect(source_url) as conn:
        assert conn.execute("select to_regnamespace('pgferry')").fetchone() == (None,)
        assert conn.execute("select count(*) from pg_indexes where schemaname = 'public'").fetchone() == indexes_before
    plan = run_pgferry("migrate", "plan", "--source", source_url, "--target", source_url, "--json")
    assert plan.returncode == 1
    assert any("same database" in p["message"] for p in json.loads(plan.stdout)["problems"])
    with pytest.raises(SameDatabaseError):
        service_for(source_url, source_url).run()


@pytest.mark.parametrize(
    ("option", "value"),
    [("--jobs", "0"), ("--jobs", "65"), ("--batch-rows", "-5"), ("--batch-rows", "0"), ("--on-error", "ignore")],
)
def test_bad_options_get_one_line_naming_them(source_url: str, option: str, value: str) -> None:
    result = run_pgferry("migrate", "run", "--source", source_url, "--target", source_url, option, value)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pgferry: error: {option}: "), result.stderr


def test_options_are_validated_for_python_callers_too(source_url: str) -> None:
    from pgferry.config import parse_database_url

    url = parse_database_url(source_url)
    for bad in ({"jobs": 0}, {"batch_rows": -1}, {"on_error": "ignore"}, {"schema_from": "target"}):
        with pytest.raises(ConfigError):
            MigrationOptions(source_url=url, target_url=url, **bad)  # type: ignore[arg-type]


def test_connection_errors_say_which_server(source_url: str) -> None:
    unreachable = "postgresql://postgres:pw@127.0.0.1:1/nowhere"
    to_target = run_pgferry("migrate", "run", "--source", source_url, "--target", unreachable)
    assert to_target.returncode == 2 and "cannot connect to the target database" in to_target.stderr
    to_source = run_pgferry("migrate", "plan", "--source", unreachable, "--target", source_url)
    assert to_source.returncode == 2 and "cannot connect to the source database" in to_source.stderr
    assert "pw@" not in to_target.stderr + to_source.stderr


def test_plan_predicts_a_schema_conflict_and_run_writes_nothing(source_url: str, baseline_url: str) -> None:
    seed_source(source_url, scale=0.01)
    with psycopg.connect(baseline_url, autocommit=True) as conn:
        # Something the source's schema also creates, already on the target (and not with CREATE OR REPLACE).
        conn.execute(
            "create function public.set_updated_at() returns trigger language plpgsql as $$ begin return new; end $$"
        )
        before = take_inventory(conn)
    plan = service_for(source_url, baseline_url, schema_from="source").plan()
    errors = [p for p in plan.errors if "does not apply" in p.message]
    assert errors and "set_updated_at" in errors[0].message and "--schema-from target" not in errors[0].fix
    with pytest.raises(PlanBlockedError, match="nothing was written"):
        service_for(source_url, baseline_url, schema_from="source").run()
    with psycopg.connect(baseline_url) as conn:
        assert take_inventory(conn) == before
        assert conn.execute("select to_regnamespace('pgferry')").fetchone() == (None,)


@pytest.fixture
def weak_role_url(baseline_url: str) -> Iterator[str]:
    """``baseline_url`` as a login role that may connect but not create anything."""
    role = f"weak_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(baseline_url, autocommit=True) as conn:
        conn.execute(f"create role {role} login")
        conn.execute(f"grant usage on schema public, auth to {role}")
    yield baseline_url.replace("postgresql://postgres@", f"postgresql://{role}@")
    with psycopg.connect(baseline_url, autocommit=True) as conn:
        conn.execute(f"drop owned by {role}")
        conn.execute(f"drop role {role}")


def test_plan_says_what_a_role_without_create_cannot_do(source_url: str, weak_role_url: str) -> None:
    seed_source(source_url, scale=0.01)
    plan = run_pgferry("migrate", "plan", "--source", source_url, "--target", weak_role_url, "--json")
    assert plan.returncode == 1
    problems = [p for p in json.loads(plan.stdout)["problems"] if p["severity"] == "error"]
    create = [p for p in problems if "cannot create schema pgferry" in p["message"]]
    assert create and "grant create on database" in create[0]["fix"], problems
    run = run_pgferry("migrate", "run", "--source", source_url, "--target", weak_role_url)
    assert run.returncode == 2 and "nothing was written" in run.stderr


def test_json_output_is_one_document_while_retries_happen(
    server_pair: ServerPair, source_url: str, baseline_url: str
) -> None:
    seed_source(source_url, scale=0.1, seed=3)
    secret = "s3cr3t-pw"
    args = ["migrate", "run", "--source", _with_password(source_url, secret)]
    args += ["--target", _with_password(baseline_url, secret), "--batch-rows", "200", "--json"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pgferry.cli.main", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: _done_chunks(baseline_url) >= 3, process, timeout=120)
    server_pair.source.restart()  # the copy workers must retry, and say so
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    summary = json.loads(stdout)  # the whole of stdout is the document
    assert summary["status"] == "completed" and summary["retries"] >= 1
    assert "retrying" in stderr
    assert secret not in stdout + stderr
    assert_same_rows(source_url, baseline_url)


def _done_chunks(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("select to_regclass('pgferry.migration_chunks')").fetchone() == (None,):
            return 0
        row = conn.execute("select count(*) from pgferry.migration_chunks where state = 'done'").fetchone()
        return int(row[0]) if row else 0


def _wait_for(condition: object, process: subprocess.Popen[str] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended first: {process.stderr.read() if process.stderr else ''}")
        time.sleep(0.01)
    raise AssertionError("timed out")


class _RestartSourceDuringVerification:
    """Restarts the source the moment the first table has been verified (others are still being checked)."""

    def __init__(self, pair: ServerPair) -> None:
        self.pair = pair
        self.restarted = False
        self.lock = threading.Lock()

    def message(self, text: str) -> None:
        with self.lock:
            if "verified identical" in text and not self.restarted:
                self.restarted = True
                self.pair.source.restart()

    def phase(self, name: str) -> None:
        pass

    def table_started(self, table: str, rows_estimate: int, rows_done: int) -> None:
        pass

    def chunk_done(self, table: str, rows: int, nbytes: int) -> None:
        pass

    def bytes_copied(self, table: str, nbytes: int) -> None:
        pass


def test_source_restart_during_verification_is_retried(
    server_pair: ServerPair, source_url: str, baseline_url: str
) -> None:
    from pgferry.db.retry import RetryPolicy

    seed_source(source_url, scale=0.05, seed=4)
    reporter = _RestartSourceDuringVerification(server_pair)
    service = service_for(
        source_url,
        baseline_url,
        reporter=reporter,
        jobs=1,
        retry_policy=RetryPolicy(max_attempts=12, base_delay=0.2, max_delay=2.0),
    )
    summary = service.run()
    assert reporter.restarted and summary.status == "completed"
    assert summary.verification is not None and summary.verification.ok
    assert_same_rows(source_url, baseline_url)


class _WriteToSourceMidCopy:
    """Writes to the source while ``tasks`` is being copied, as an application still running would."""

    def __init__(self, source_url: str) -> None:
        self.source_url = source_url
        self.written = False
        self.lock = threading.Lock()

    def chunk_done(self, table: str, rows: int, nbytes: int) -> None:
        with self.lock:
            if table != "public.tasks" or self.written:
                return
            self.written = True
            with psycopg.connect(self.source_url, autocommit=True) as conn:
                conn.execute("update public.tasks set title = title || ' (edited)' where ctid < '(2,0)'::tid")
                conn.execute(  # a task without executions: a cascade would change other tables too
                    "delete from public.tasks where id = (select t.id from public.tasks t where not exists "
                    "(select from public.agent_executions e where e.task_id = t.id) order by t.id desc limit 1)"
                )
                conn.execute(
                    "insert into public.tasks (user_id, title) select user_id, 'late task' from public.tasks limit 3"
                )

    def phase(self, name: str) -> None:
        pass

    def table_started(self, table: str, rows_estimate: int, rows_done: int) -> None:
        pass

    def bytes_copied(self, table: str, nbytes: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def test_writes_to_the_source_during_a_run_fail_verification_and_a_rerun_repairs_them(
    source_url: str, baseline_url: str
) -> None:
    seed_source(source_url, scale=0.1, seed=8)
    writer = _WriteToSourceMidCopy(source_url)
    with pytest.raises(VerificationFailedError) as failed:
        service_for(source_url, baseline_url, reporter=writer, batch_rows=100).run()
    assert writer.written
    message = str(failed.value)
    assert "public.tasks: DIFFERENT" in message and "stop the writes, then rerun" in message
    report = failed.value.report
    assert report is not None and [t.table for t in report.differing_tables] == ["public.tasks"]
    # The writes have stopped: the same command repairs just the differing buckets and verifies again.
    summary = service_for(source_url, baseline_url, batch_rows=100).run()
    assert summary.status == "completed" and summary.resumed
    assert summary.verification is not None and summary.verification.ok
    assert_same_rows(source_url, baseline_url)
    with psycopg.connect(baseline_url) as conn:
        events = [r[0] for r in conn.execute("select message from pgferry.migration_events order by id")]
        assert any("copying" in m and "buckets again" in m for m in events), events
        # Every foreign key is back, those of the repaired table included.
        fks = conn.execute(
            "select count(*) from pg_constraint where contype = 'f' and connamespace = 'public'::regnamespace"
        ).fetchone()
        assert fks == (7,)


def test_killed_during_verification_leaves_no_query_running(source_url: str, baseline_url: str) -> None:
    seed_source(source_url, scale=0.3, seed=6)
    args = ["migrate", "run", "--source", source_url, "--target", baseline_url, "--jobs", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pgferry.cli.main", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    verifying = (
        "select count(*) from pg_stat_activity where application_name = 'pgferry-migrate' "
        "and state = 'active' and query like '%hashtextextended%'"
    )

    def active(url: str) -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(verifying).fetchone()
            return int(row[0]) if row else 0

    _wait_for(lambda: active(source_url) > 0, process, timeout=180)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (active(source_url) or active(baseline_url)):
        time.sleep(0.2)
    assert active(source_url) == 0 and active(baseline_url) == 0, "verification queries outlived pgferry"


def test_rollback_keeps_what_was_created_after_the_migration_and_is_idempotent(
    source_url: str, target_url: str
) -> None:
    seed_source(source_url, scale=0.01)
    with psycopg.connect(target_url) as conn:
        sequence_before = conn.execute(
            "select last_value, is_called from public.observability_events_id_seq"
        ).fetchone()
    service_for(source_url, target_url).run()
    with psycopg.connect(target_url, autocommit=True) as conn:
        moved = conn.execute("select last_value from public.observability_events_id_seq").fetchone()
        assert moved is not None and sequence_before is not None and moved[0] > sequence_before[0]
        # The user starts using the target: a table of their own, with rows.
        conn.execute("create table public.my_notes (id int primary key, body text)")
        conn.execute("insert into public.my_notes values (1, 'keep me')")
    first = run_pgferry("migrate", "rollback", "--source", source_url, "--target", target_url, "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["ok"] and report["kept"] == ["table public.my_notes"]
    with psycopg.connect(target_url) as conn:
        assert conn.execute("select body from public.my_notes").fetchall() == [("keep me",)]
        assert (
            conn.execute("select last_value, is_called from public.observability_events_id_seq").fetchone()
            == sequence_before
        )
        assert conn.execute("select count(*) from public.tasks").fetchone() == (0,)
    second = run_pgferry("migrate", "rollback", "--source", source_url, "--target", target_url)
    assert second.returncode == 0, second.stderr
    assert "nothing to roll back" in second.stdout
    assert (
        json.loads(run_pgferry("migrate", "rollback", "--source", source_url, "--target", target_url, "--json").stdout)[
            "nothing_to_do"
        ]
        is True
    )
