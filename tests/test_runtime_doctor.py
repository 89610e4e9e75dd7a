"""``pgferry doctor`` on real servers: green on a healthy database, and each fault it reports is fixed by its fix.

The faults are made for real (RLS switched off, a table taken out of the publication, an inactive replication slot
holding WAL, a transaction pooler behind a URL that looks direct); the oracle for the printed fixes is running
them and seeing the doctor green again.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from tests.cli_helpers import run_pgferry

ENV = {"PGFERRY_DB_MODE": "auto", "SUPABASE_DB_URL": "", "SUPABASE_POOLER_URL": ""}


def _doctor(url: str, *args: str, **env: str) -> tuple[int, dict[str, Any]]:
    result = run_pgferry("doctor", "--database-url", url, "--json", *args, env={**ENV, **env})
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def _problems(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["status"] == "problem"]


def test_healthy_database_is_green(target_url: str) -> None:
    code, report = _doctor(target_url)
    assert code == 0 and report["ok"], report
    checks = {f["check"] for f in report["findings"]}
    assert checks == {"connectivity", "extensions", "rls", "publication", "pooler", "replication"}
    human = run_pgferry("doctor", "--database-url", target_url, env=ENV)
    assert human.returncode == 0 and human.stdout.rstrip().endswith("no problems found"), human.stdout


def test_each_fault_is_reported_with_a_fix_that_fixes_it(target_url: str) -> None:
    slot = f"doctor_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(target_url, autocommit=True) as conn:
        conn.execute("alter table public.workflows disable row level security")
        conn.execute("alter publication supabase_realtime drop table public.agent_memory")
        conn.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        try:
            conn.execute("create table public.doctor_ballast (v text)")
            conn.execute("alter table public.doctor_ballast enable row level security")
            conn.execute("create policy ballast on public.doctor_ballast for select using (true)")
            conn.execute("insert into public.doctor_ballast select repeat('x', 1000) from generate_series(1, 3000)")
            code, report = _doctor(target_url, "--max-retained-wal-mb", "1")
            assert code == 1 and not report["ok"]
            problems = {p["check"]: p for p in _problems(report)}
            assert sorted(problems) == ["publication", "replication", "rls"], problems
            assert problems["rls"]["message"].startswith("public.workflows has row-level security off")
            assert problems["publication"]["message"].startswith("supabase_realtime lacks agent_memory:")
            assert problems["replication"]["message"].startswith(f"inactive logical slot {slot} retains ")
            for fix in (p["fix"] for p in problems.values()):
                statement = fix.split("if it is abandoned: ")[-1].split(" (then")[0]
                conn.execute(statement)
            code, report = _doctor(target_url, "--max-retained-wal-mb", "1")
            assert code == 0, _problems(report)
        finally:
            conn.execute(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = %s", (slot,)
            )


def test_transaction_pooler_behind_a_direct_looking_url_is_a_problem(
    target_url: str, pgbouncer: Callable[..., str]
) -> None:
    pooled = pgbouncer(target_url)
    code, report = _doctor(pooled)
    [problem] = _problems(report)
    assert code == 1 and problem["check"] == "pooler" and "PGFERRY_DB_MODE=transaction" in problem["fix"]
    code, report = _doctor(pooled, PGFERRY_DB_MODE="transaction")
    assert code == 0, _problems(report)


def test_unreachable_database_is_one_problem_saying_what_to_check(blank_url: str) -> None:
    code, report = _doctor("postgresql://postgres@127.0.0.1:1/postgres")
    [finding] = report["findings"]
    assert code == 1 and finding["check"] == "connectivity" and finding["status"] == "problem"
    assert "check host, port" in finding["fix"]


def test_missing_pgvector_and_platform_tables_on_a_blank_database(blank_url: str) -> None:
    code, report = _doctor(blank_url)
    checks = {p["check"] for p in _problems(report)}
    assert code == 1 and {"extensions", "publication"} <= checks, report
