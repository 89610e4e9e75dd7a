"""Online migration on real servers: follow a source under a steady mixed write load, cut over, go back.

Every run is the real ``pgferry`` command in a subprocess (as a user runs it, ``kill -9`` included); the data is
judged by the sorted row-by-row oracle of both sides (``assert_same_rows``), never by pgferry's own checksums.
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
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from pgferry.testing.servers import ServerPair
from tests.cli_helpers import run_pgferry
from tests.migrate_helpers import assert_same_rows, seed_source


class WriteLoad:
    """What an application does to the source while it is being migrated, until the source stops it."""

    def __init__(self, url: str, seed: int = 1) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.done = 0
        self.refused = 0
        self.thread = threading.Thread(target=self._run, name="write-load", daemon=True)

    def __enter__(self) -> WriteLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.url, autocommit=True)
                with conn.transaction():
                    self._one(conn)
                self.done += 1
            except (psycopg.errors.ReadOnlySqlTransaction, psycopg.OperationalError, psycopg.errors.AdminShutdown):
                self.refused += 1  # fenced (read-only) or ended by the cut-over: an application would retry later
                conn = None
                time.sleep(0.05)
            time.sleep(0.002)
        if conn is not None:
            conn.close()

    def _one(self, conn: psycopg.Connection[Any]) -> None:
        choice = self.rng.random()
        user = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        if choice < 0.35:
            conn.execute(
                "insert into public.tasks (user_id, title, description, priority, tags, metadata) "
                "values (%s, %s, %s, %s, %s, %s)",
                (user, f"task {self.rng.random()}", "x" * self.rng.randint(0, 3000), self.rng.randint(0, 5),
                 ["a", "b"], json.dumps({"n": self.rng.random(), "s": "é✅\t\n\\"})),
            )  # fmt: skip
        elif choice < 0.55:
            conn.execute(
                "update public.tasks set title = title || '.', priority = priority + 1 "
                "where id = (select id from public.tasks order by random() limit 1)"
            )
        elif choice < 0.65:
            conn.execute(
                "delete from public.tasks where id = (select t.id from public.tasks t where not exists "
                "(select from public.agent_executions e where e.task_id = t.id) order by random() limit 1)"
            )
        elif choice < 0.85:
            # Several tables in one transaction.
            conn.execute(
                "insert into public.observability_events (user_id, event_type, message, data) values (%s, 'e', %s, %s)",
                (user, "m" * self.rng.randint(1, 200), json.dumps({"k": self.rng.randint(0, 9)})),
            )
            conn.execute(
                "update public.agent_memory set access_count = access_count + 1 "
                "where id = (select id from public.agent_memory order by random() limit 1)"
            )
        elif choice < 0.95:
            conn.execute(  # a large value (TOAST), unchanged by later updates of other columns
                "update public.execution_snapshots "
                "set state = jsonb_build_object('blob', repeat(md5(random()::text), 400)) "
                "where id = (select id from public.execution_snapshots order by random() limit 1)"
            )
        else:
            conn.execute(
                "delete from public.observability_events where id = (select min(id) from public.observability_events)"
            )


def _run_args(source_url: str, target_url: str) -> list[str]:
    return ["migrate", "run", "--source", source_url, "--target", target_url, "--online", "--batch-rows", "300"]


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pgferry.cli.main", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _state(target_url: str) -> dict[str, Any]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        if conn.execute("select to_regclass('pgferry.migration_streams')").fetchone() == (None,):
            return {}
        run = conn.execute("select phase, status from pgferry.migration_runs order by id desc limit 1").fetchone()
        stream = conn.execute(
            "select changes_applied from pgferry.migration_streams where direction = 'forward'"
        ).fetchone()
    return {"phase": run[0] if run else None, "applied": stream[0] if stream else 0}


def _wait(condition: Callable[[], bool], process: subprocess.Popen[str] | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"the run ended while waiting for {what}: {process.stderr.read() if process.stderr else ''}"
            )
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _slots_and_publications(url: str) -> tuple[list[str], list[str]]:
    with psycopg.connect(url, autocommit=True) as conn:
        slots = [
            r[0] for r in conn.execute("select slot_name from pg_replication_slots where slot_name like 'pgferry_%'")
        ]
        pubs = [r[0] for r in conn.execute("select pubname from pg_publication where pubname like 'pgferry_%'")]
    return slots, pubs


@pytest.fixture
def online_pair(source_url: str, target_url: str) -> Iterator[tuple[str, str]]:
    seed_source(source_url, scale=0.05, seed=21)
    yield source_url, target_url
    # Never leave a slot behind on the shared servers (they hold WAL).
    for url in (source_url, target_url):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("set default_transaction_read_only = off")
            for (slot,) in conn.execute(
                "select slot_name from pg_replication_slots where slot_name like 'pgferry_%' "
                "and database = current_database()"
            ).fetchall():
                conn.execute(
                    "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = %s "
                    "and active_pid is not null",
                    (slot,),
                )
                time.sleep(0.2)
                conn.execute("select pg_drop_replication_slot(%s)", (slot,))
            database = conn.execute("select current_database()").fetchone()
            assert database is not None
            conn.execute(f'alter database "{database[0]}" reset default_transaction_read_only')


def test_online_migration_under_writes_cutover_reverse_and_finish(online_pair: tuple[str, str]) -> None:
    source, target = online_pair
    with WriteLoad(source) as load:
        process = _start(_run_args(source, target))
        try:
            _wait(
                lambda: _state(target).get("phase") == "follow" and _state(target).get("applied", 0) > 50,
                process,
                180,
                "the follow to apply changes",
            )
            cut = run_pgferry("migrate", "cutover", "--source", source, "--target", target, "--json", "--grace", "1")
            assert cut.returncode == 0, cut.stderr
            report = json.loads(cut.stdout)
            assert report["verified"] is True and report["downtime_seconds"] < 30
        finally:
            load.stop.set()
    assert load.done > 100 and load.refused > 0  # writes ran until the fence refused them
    assert_same_rows(source, target)  # the source is fenced, the target has not been written since
    with psycopg.connect(source, autocommit=True) as conn:
        assert conn.execute("show default_transaction_read_only").fetchone() == ("on",)

    # After the cut-over, writes on the target reach the source within a second.
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("insert into public.environments (user_id, name) values (gen_random_uuid(), 'written on target')")
    deadline = time.monotonic() + 5
    arrived = None
    while time.monotonic() < deadline:
        with psycopg.connect(source, autocommit=True) as conn:
            if conn.execute("select 1 from public.environments where name = 'written on target'").fetchone():
                arrived = time.monotonic() - (deadline - 5)
                break
        time.sleep(0.02)
    assert arrived is not None and arrived < 2.0, f"a write on the target reached the source after {arrived}s"
    assert_same_rows(source, target)

    done = run_pgferry("migrate", "finish", "--source", source, "--target", target)
    assert done.returncode == 0, done.stderr
    process.wait(timeout=60)
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""
    for url in (source, target):
        assert _slots_and_publications(url) == ([], []), url


def test_rollback_after_cutover_returns_every_write_to_the_source(online_pair: tuple[str, str]) -> None:
    source, target = online_pair
    process = _start(_run_args(source, target))
    try:
        _wait(lambda: _state(target).get("phase") == "follow", process, 180, "the follow")
        cut = run_pgferry("migrate", "cutover", "--source", source, "--target", target, "--grace", "1", "--no-verify")
        assert cut.returncode == 0, cut.stderr
        with WriteLoad(target, seed=7) as load:  # the application now writes to the target
            _wait(lambda: load.done > 200, None, 60, "writes on the target")
            rollback = run_pgferry("migrate", "rollback", "--source", source, "--target", target, "--json")
        assert rollback.returncode == 0, rollback.stderr
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert_same_rows(source, target)  # every write made on the target is on the source
    with psycopg.connect(source, autocommit=True) as conn:
        assert conn.execute("show default_transaction_read_only").fetchone() == ("off",)
        conn.execute("insert into public.environments (user_id, name) values (gen_random_uuid(), 'writable again')")
    with psycopg.connect(target, autocommit=True) as conn:
        assert conn.execute("show default_transaction_read_only").fetchone() == ("on",)
    for url in (source, target):
        assert _slots_and_publications(url) == ([], []), url


@pytest.mark.parametrize("when", ["copy", "follow"])
def test_kill_9_during_an_online_run_then_the_same_command_resumes_exactly(
    online_pair: tuple[str, str], when: str
) -> None:
    source, target = online_pair
    with WriteLoad(source, seed=3) as load:
        process = _start(_run_args(source, target))
        if when == "copy":

            def copying() -> bool:
                with psycopg.connect(target, autocommit=True) as conn:
                    if conn.execute("select to_regclass('pgferry.migration_chunks')").fetchone() == (None,):
                        return False
                    row = conn.execute("select count(*) from pgferry.migration_chunks where state = 'done'").fetchone()
                    return bool(row and row[0] >= 2)

            _wait(copying, process, 180, "the copy to start")
        else:
            _wait(lambda: _state(target).get("applied", 0) > 100, process, 180, "the follow to apply changes")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        time.sleep(0.5)  # writes go on while nothing follows
        applied_before = _state(target).get("applied", 0)
        process = _start(_run_args(source, target))
        _wait(
            lambda: _state(target).get("phase") == "follow" and _state(target).get("applied", 0) > applied_before + 50,
            process,
            240,
            "the resumed follow",
        )
        cut = run_pgferry("migrate", "cutover", "--source", source, "--target", target, "--grace", "1")
        load.stop.set()
    if cut.returncode != 0:
        process.kill()
        raise AssertionError(f"{cut.stderr}\n--- the run ---\n{process.communicate()[1][-3000:]}")
    assert_same_rows(source, target)
    done = run_pgferry("migrate", "finish", "--source", source, "--target", target)
    assert done.returncode == 0, done.stderr
    process.wait(timeout=60)


def test_a_source_restart_during_follow_is_survived(server_pair: ServerPair, online_pair: tuple[str, str]) -> None:
    source, target = online_pair
    process = _start(_run_args(source, target))
    try:
        with WriteLoad(source, seed=5) as load:
            _wait(lambda: _state(target).get("applied", 0) > 50, process, 180, "the follow")
            server_pair.source.restart()
            before = _state(target)["applied"]
            _wait(lambda: _state(target).get("applied", 0) > before + 50, process, 120, "the follow after a restart")
            cut = run_pgferry("migrate", "cutover", "--source", source, "--target", target, "--grace", "1")
            load.stop.set()
        assert cut.returncode == 0, cut.stderr
        assert_same_rows(source, target)
        assert run_pgferry("migrate", "finish", "--source", source, "--target", target).returncode == 0
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_schema_change_during_follow_stops_it_by_name_and_a_rerun_resumes(online_pair: tuple[str, str]) -> None:
    source, target = online_pair
    process = _start(_run_args(source, target))
    _wait(lambda: _state(target).get("phase") == "follow", process, 180, "the follow")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("truncate public.observability_events")  # applied: a TRUNCATE is safe to follow
        conn.execute("alter table public.tasks add column note text")
        conn.execute("update public.tasks set note = 'new column' where id = (select id from public.tasks limit 1)")
    process.wait(timeout=60)
    assert process.returncode == 2
    stderr = process.stderr.read() if process.stderr else ""
    assert "public.tasks has column(s) note on the source that the other side lacks" in stderr, stderr
    assert "nothing is lost" in stderr
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("alter table public.tasks add column note text")
    process = _start(_run_args(source, target))
    _wait(
        lambda: _target_has_note(target),
        process,
        120,
        "the resumed follow to apply the update",
    )
    with psycopg.connect(target, autocommit=True) as conn:  # the TRUNCATE before it was applied too
        assert conn.execute("select count(*) from public.observability_events").fetchone() == (0,)
    cut = run_pgferry("migrate", "cutover", "--source", source, "--target", target, "--grace", "1")
    assert cut.returncode == 0, cut.stderr
    assert_same_rows(source, target)
    assert run_pgferry("migrate", "finish", "--source", source, "--target", target).returncode == 0
    process.wait(timeout=60)


def _target_has_note(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("select count(*) from public.tasks where note = 'new column'").fetchone() == (1,)


def test_plan_says_what_following_the_source_needs(source_url: str, target_url: str) -> None:
    seed_source(source_url, scale=0.01)
    role = f"noreplication_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source_url, autocommit=True) as conn:
        conn.execute("create table public.keyless (a int, b text)")
        conn.execute(f"create role {role} login")
        conn.execute(f"grant select on all tables in schema public to {role}")
    try:
        weak = source_url.replace("postgresql://postgres@", f"postgresql://{role}@")
        plan = run_pgferry("migrate", "plan", "--source", weak, "--target", target_url, "--json", "--online")
        assert plan.returncode == 1, plan.stdout + plan.stderr
        errors = [p for p in json.loads(plan.stdout)["problems"] if p["severity"] == "error"]
        assert any("cannot use logical replication (no REPLICATION)" in p["message"] for p in errors), errors
        keyless = [p for p in errors if p["table"] == "public.keyless" and "replica identity" in p["message"]]
        assert keyless and "alter table public.keyless replica identity full" in keyless[0]["fix"], errors
        assert any("cannot read every sequence" in p["message"] for p in errors), errors
        offline = run_pgferry("migrate", "plan", "--source", weak, "--target", target_url, "--json")
        assert not any("REPLICATION" in p["message"] for p in json.loads(offline.stdout)["problems"])
    finally:
        with psycopg.connect(source_url, autocommit=True) as conn:
            conn.execute(f"drop owned by {role}")
            conn.execute(f"drop role {role}")


def test_status_reports_the_streams_and_warns_about_an_unread_slot(online_pair: tuple[str, str]) -> None:
    source, target = online_pair
    process = _start(_run_args(source, target))
    _wait(lambda: _state(target).get("phase") == "follow", process, 180, "the follow")
    os.kill(process.pid, signal.SIGKILL)  # nobody reads the slot any more
    process.wait()
    time.sleep(0.5)
    status = run_pgferry("migrate", "status", "--target", target, "--json", env={"NEON_DATABASE_URL": source})
    payload = json.loads(status.stdout)
    [forward] = payload["streams"]
    assert forward["direction"] == "forward" and forward["slot_alive"] is True and forward["slot_active"] is False
    assert any("is not being read" in w and "40 hours" in w for w in payload["warnings"]), payload["warnings"]
    rollback = run_pgferry("migrate", "rollback", "--source", source, "--target", target)
    assert rollback.returncode == 0, rollback.stderr
    assert _slots_and_publications(source) == ([], [])


@pytest.fixture
def neon_like_source(online_pair: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """The source as a Neon role sees it: owns the database and its tables, has REPLICATION, is no superuser
    (so it may not set session_replication_role, which the reverse stream then does without)."""
    source, target = online_pair
    role = f"neonish_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source, autocommit=True) as conn:
        database = conn.execute("select current_database()").fetchone()
        assert database is not None
        conn.execute(f"create role {role} login replication")
        conn.execute(f'alter database "{database[0]}" owner to {role}')
        conn.execute(f"alter schema public owner to {role}")
        for (table,) in conn.execute("select tablename from pg_tables where schemaname = 'public'").fetchall():
            conn.execute(f"alter table public.{table} owner to {role}")
        conn.execute(f"grant pg_signal_backend to {role}")
    yield source.replace("postgresql://postgres@", f"postgresql://{role}@"), target


def test_reverse_stream_without_superuser_disables_and_restores_the_sources_triggers(
    neon_like_source: tuple[str, str],
) -> None:
    source, target = neon_like_source
    process = _start(_run_args(source, target))
    try:
        _wait(lambda: _state(target).get("phase") == "follow", process, 180, "the follow")
        cut = run_pgferry("migrate", "cutover", "--source", source, "--target", target, "--grace", "1")
        assert cut.returncode == 0, cut.stderr
        with psycopg.connect(target, autocommit=True) as conn:  # updated_at is decided here, on the target
            conn.execute(
                "update public.tasks set title = 'edited on the target', updated_at = '2001-01-01 00:00Z' "
                "where id = (select id from public.tasks order by id limit 1)"
            )
        _wait(lambda: _edited_on_source(source), None, 30, "the edit to reach the source")
        assert_same_rows(source, target)  # had the source's updated_at trigger fired, updated_at would differ
        assert run_pgferry("migrate", "finish", "--source", source, "--target", target).returncode == 0
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    with psycopg.connect(source, autocommit=True) as conn:
        states = conn.execute(
            "select distinct tgenabled from pg_trigger where tgrelid = 'public.tasks'::regclass and not tgisinternal"
        ).fetchall()
        assert states == [("O",)]  # enabled again
        assert conn.execute("select to_regclass('pgferry.reverse_disabled_triggers')").fetchone() == (None,)


def _edited_on_source(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("select 1 from public.tasks where title = 'edited on the target'").fetchone() is not None
