"""The migration engine end to end on real servers: exact copy, verification, plan, errors, rollback."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgferry.migrate import MigrationInterruptedError, PlanBlockedError
from pgferry.migrate.source_schema import take_inventory
from pgferry.schema.models import PLATFORM_TABLES
from tests.migrate_helpers import assert_same_rows, seed_source, service_for


def _schema_objects(url: str) -> tuple[list[Any], list[Any]]:
    with psycopg.connect(url) as conn:
        constraints = conn.execute(
            "select conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid) from pg_constraint "
            "where connamespace = 'public'::regnamespace order by 1, 2"
        ).fetchall()
        indexes = conn.execute(
            "select tablename, indexname, indexdef from pg_indexes where schemaname = 'public' order by 1, 2"
        ).fetchall()
    return constraints, indexes


def test_platform_migration_is_exact_and_verified(source_url: str, baseline_url: str, target_url: str) -> None:
    manager = seed_source(source_url)
    service = service_for(source_url, baseline_url, jobs=2, batch_rows=300)
    summary = service.run()
    assert summary.status == "completed"
    assert summary.verification is not None and summary.verification.ok
    assert_same_rows(source_url, baseline_url)  # row by row, independent of the verifier's digests
    comparison = manager.compare_with(baseline_url)
    assert comparison.identical, comparison.describe()
    assert {t.table for t in summary.tables} == {f"public.{t}" for t in PLATFORM_TABLES}
    assert sum(t.rows for t in summary.tables) == sum(d.source.row_count for d in comparison.tables)
    with psycopg.connect(baseline_url) as conn:
        # Indexes (HNSW too), keys and RLS are all back after the load.
        indexes = {r[0] for r in conn.execute("select indexname from pg_indexes where schemaname = 'public'")}
        assert {"ix_tasks_embedding_hnsw", "ix_agent_memory_embedding_hnsw", "pk_tasks"} <= indexes
        assert conn.execute(
            "select count(*) from pg_constraint where contype = 'f' and connamespace = 'public'::regnamespace"
        ).fetchone() == (7,)
        assert conn.execute(
            "select bool_and(relrowsecurity) from pg_class where relkind = 'r' and "
            "relnamespace = 'public'::regnamespace"
        ).fetchone() == (True,)
        # The identity sequence continues after the copied ids.
        new_id = conn.execute(
            "insert into public.observability_events (user_id, event_type, message) "
            "values (gen_random_uuid(), 'x', 'y') returning id"
        ).fetchone()
        top = conn.execute("select max(id) from public.observability_events where event_type <> 'x'").fetchone()
        assert new_id is not None and top is not None and new_id[0] > top[0]
        conn.rollback()
    # Every key, constraint and index the migrations define is back, exactly (target_url is a fresh migrate).
    assert _schema_objects(baseline_url) == _schema_objects(target_url)
    # Running again is harmless: the completed run is reported, nothing is copied twice.
    again = service_for(source_url, baseline_url).run()
    assert again.run_id == summary.run_id
    assert manager.compare_with(baseline_url).identical


def test_plan_reports_and_changes_nothing(source_url: str, baseline_url: str) -> None:
    seed_source(source_url, scale=0.01)
    with psycopg.connect(baseline_url) as conn:
        before = take_inventory(conn)
    plan = service_for(source_url, baseline_url).plan()
    assert not plan.errors, plan.problems
    assert {t.table for t in plan.tables} == {f"public.{t}" for t in PLATFORM_TABLES}
    assert plan.total_rows > 0 and plan.estimated_seconds > 0
    assert all(t.target == "created by schema phase" for t in plan.tables)
    with psycopg.connect(baseline_url) as conn:
        assert take_inventory(conn) == before
        assert conn.execute("select to_regnamespace('pgferry')").fetchone() == (None,)


def test_target_with_rows_blocks_the_run_before_anything_is_written(source_url: str, target_url: str) -> None:
    seed_source(source_url, scale=0.01)
    with psycopg.connect(target_url) as conn:
        conn.execute("insert into public.environments (user_id, name) values (gen_random_uuid(), 'already here')")
    with pytest.raises(PlanBlockedError, match="already has rows") as raised:
        service_for(source_url, target_url).run()
    assert "nothing was written" in str(raised.value)
    with psycopg.connect(target_url) as conn:
        assert conn.execute("select to_regclass('pgferry.migration_runs')").fetchone() == (None,)
        assert conn.execute("select count(*) from public.tasks").fetchone() == (0,)


def test_missing_column_on_target_blocks_the_run(source_url: str, target_url: str) -> None:
    seed_source(source_url, scale=0.01)
    with psycopg.connect(target_url) as conn:
        conn.execute("alter table public.tasks drop column due_at")
    plan = service_for(source_url, target_url).plan()
    assert any("public.tasks.due_at" in p.message and p.severity == "error" for p in plan.errors)


def test_rollback_returns_a_fresh_target_to_its_previous_state(source_url: str, baseline_url: str) -> None:
    manager = seed_source(source_url, scale=0.01)
    source_before = manager.compare_with(source_url)  # digests of the source, to prove it is untouched
    with psycopg.connect(baseline_url) as conn:
        before = take_inventory(conn)
    service_for(source_url, baseline_url).run()
    report = service_for(source_url, baseline_url).rollback()
    assert report.ok, report.steps
    with psycopg.connect(baseline_url) as conn:
        assert take_inventory(conn) == before
        assert conn.execute("select to_regnamespace('pgferry')").fetchone() == (None,)
    assert [d.source.digest for d in manager.compare_with(source_url).tables] == [
        d.source.digest for d in source_before.tables
    ]


def test_rollback_keeps_a_pre_existing_schema(source_url: str, target_url: str) -> None:
    seed_source(source_url, scale=0.01)
    with psycopg.connect(target_url) as conn:
        before = take_inventory(conn)
        indexes_before = sorted(
            r[0] for r in conn.execute("select indexdef from pg_indexes where schemaname = 'public'")
        )
        revision = conn.execute("select version_num from pgferry.alembic_version").fetchone()
    service_for(source_url, target_url).run()
    report = service_for(source_url, target_url).rollback()
    assert report.ok
    with psycopg.connect(target_url) as conn:
        assert take_inventory(conn) == before
        assert (
            sorted(r[0] for r in conn.execute("select indexdef from pg_indexes where schemaname = 'public'"))
            == indexes_before
        )
        assert conn.execute("select version_num from pgferry.alembic_version").fetchone() == revision
        for table in PLATFORM_TABLES:
            assert conn.execute(f"select count(*) from public.{table}").fetchone() == (0,)
        assert conn.execute("select to_regclass('pgferry.migration_runs')").fetchone() == (None,)


def test_skip_table_policy_reports_the_skipped_table(source_url: str, target_url: str) -> None:
    seed_source(source_url, scale=0.01)
    with psycopg.connect(target_url) as conn:
        # A constraint every source row violates: the copy of this table fails, fatally.
        conn.execute("alter table public.workflows add constraint reject_all check (version < 0) not valid")
    summary = service_for(source_url, target_url, on_error="skip-table", verify=False).run()
    assert summary.status == "completed" and "verify" not in summary.phase_seconds  # --no-verify ends the run
    assert summary.skipped_tables == ["public.workflows"]
    assert any(e["table"] == "public.workflows" and e["sqlstate"] == "23514" for e in summary.errors)
    with psycopg.connect(target_url) as conn:
        assert conn.execute("select count(*) from public.workflows").fetchone() == (0,)
        assert conn.execute("select count(*) > 0 from public.tasks").fetchone() == (True,)


def test_stop_policy_stops_and_resume_finishes(source_url: str, target_url: str) -> None:
    manager = seed_source(source_url, scale=0.01)
    with psycopg.connect(target_url) as conn:
        conn.execute("alter table public.workflows add constraint reject_all check (version < 0) not valid")
    with pytest.raises(MigrationInterruptedError, match="reject_all") as stopped:
        service_for(source_url, target_url, batch_rows=50).run()
    assert isinstance(stopped.value.__cause__, psycopg.errors.CheckViolation)
    # One line: the phase, the step, the server, the cause, and that a rerun resumes.
    message = str(stopped.value)
    assert "\n" not in message and message.startswith("data phase stopped (copy public.workflows chunk")
    assert "on the target" in message and "[23514]" in message and "resumes" in message
    with psycopg.connect(target_url) as conn:
        status = conn.execute("select status from pgferry.migration_runs").fetchone()
        assert status == ("failed",)
        conn.execute("alter table public.workflows drop constraint reject_all")
    summary = service_for(source_url, target_url, batch_rows=50).run()
    assert summary.status == "completed" and summary.resumed
    assert manager.compare_with(target_url).identical


def test_prometheus_metrics_follow_the_run(source_url: str, baseline_url: str) -> None:
    import urllib.request

    from pgferry.localstack.cluster import free_port

    seed_source(source_url, scale=0.01)
    service = service_for(source_url, baseline_url, batch_rows=500)
    port = free_port()
    service.metrics.serve(port)
    summary = service.run()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    rows = service.metrics.registry.get_sample_value("pgferry_migrate_rows_total", {"table": "public.tasks"})
    tasks = next(t for t in summary.tables if t.table == "public.tasks")
    assert rows == tasks.rows > 0
    assert 'pgferry_migrate_phase{phase="complete"} 1.0' in body
    assert "pgferry_migrate_chunk_seconds_count" in body


def test_rollback_policy_undoes_a_failed_run(source_url: str, baseline_url: str) -> None:
    seed_source(source_url, scale=0.01)
    with psycopg.connect(baseline_url) as conn:
        before = take_inventory(conn)
    with psycopg.connect(source_url) as conn:
        # A value the target's schema (pgferry's CHECK on workflows.version) will refuse: a fatal error.
        conn.execute("alter table public.workflows drop constraint ck_workflows_version")
        conn.execute("update public.workflows set version = 0 where ctid = (select min(ctid) from public.workflows)")
    with pytest.raises(MigrationInterruptedError, match="rolled back") as stopped:
        service_for(source_url, baseline_url, on_error="rollback").run()
    assert isinstance(stopped.value.__cause__, psycopg.errors.CheckViolation)
    with psycopg.connect(baseline_url) as conn:
        assert take_inventory(conn) == before
        assert conn.execute("select to_regnamespace('pgferry')").fetchone() == (None,)


def test_verification_notices_a_missing_key_or_index(source_url: str, baseline_url: str) -> None:
    seed_source(source_url, scale=0.01)
    service = service_for(source_url, baseline_url)
    assert service.run().verification.ok  # type: ignore[union-attr]
    with psycopg.connect(baseline_url) as conn:
        conn.execute("alter table public.workflows drop constraint uq_workflows_user_id_name_version")
        conn.execute("drop index public.ix_tasks_embedding_hnsw")
    report = service.verify()
    assert not report.ok
    assert any("uq_workflows_user_id_name_version" in m for m in report.missing_objects)
    assert any("ix_tasks_embedding_hnsw" in m for m in report.missing_objects)
