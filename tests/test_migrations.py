"""One source of truth: Alembic revisions, the Supabase SQL files and the models must all agree."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, pool

from pgferry.schema import migrator
from pgferry.schema.models import REALTIME_TABLES, USER_OWNED_TABLES, Base
from pgferry.testing.servers import ServerPair
from tests.cli_helpers import run_pgferry

REPO = Path(__file__).resolve().parents[1]
SQL_DIR = REPO / "supabase" / "migrations"


def test_sql_files_are_generated_from_the_alembic_revisions() -> None:
    rendered = {m.filename: m.sql for m in migrator.render_sql_migrations()}
    committed = {p.name: p.read_text() for p in SQL_DIR.glob("*.sql")}
    assert sorted(committed) == sorted(rendered), "run `pgferry db emit-sql`"
    for name, sql in rendered.items():
        assert committed[name] == sql, f"{name} is stale: run `pgferry db emit-sql`"
    assert [m.filename.split("_")[0] for m in migrator.render_sql_migrations()] == [
        r.revision for r in migrator.revisions()
    ]


def test_emit_sql_check_command_detects_a_hand_edit(tmp_path: Path) -> None:
    out = tmp_path / "migrations"
    assert run_pgferry("db", "emit-sql", "--out", str(out)).returncode == 0
    assert run_pgferry("db", "emit-sql", "--out", str(out), "--check").returncode == 0
    victim = sorted(out.glob("*.sql"))[1]
    victim.write_text(victim.read_text().replace("enable row level security", "disable row level security", 1))
    result = run_pgferry("db", "emit-sql", "--out", str(out), "--check")
    assert result.returncode == 1
    assert victim.name in result.stderr


def _schema_dump(pair: ServerPair, url: str) -> str:
    dump = subprocess.run(
        [
            str(pair.install.program("pg_dump")),
            "--schema-only",
            "--no-owner",
            "--schema=public",
            "--schema=pgferry",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Comments and session settings differ between runs; the objects must not.
    lines = [line for line in dump.splitlines() if line and not line.startswith(("--", "\\restrict", "\\unrestrict"))]
    return "\n".join(lines)


def _catalog_facts(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        return {
            "publication": sorted(
                conn.execute(
                    "select schemaname, tablename from pg_publication_tables where pubname = 'supabase_realtime'"
                ).fetchall()
            ),
            "replica_identity": sorted(
                conn.execute(
                    "select relname, relreplident from pg_class where relnamespace = 'public'::regnamespace "
                    "and relkind = 'r'"
                ).fetchall()
            ),
            "policies": sorted(
                conn.execute(
                    "select tablename, policyname, cmd, roles::text, qual, with_check from pg_policies"
                ).fetchall()
            ),
            "version": conn.execute("select version_num from pgferry.alembic_version").fetchall(),
        }


def test_sql_files_and_alembic_build_the_same_database(server_pair: ServerPair, baseline_url: str) -> None:
    via_alembic = baseline_url
    _, via_sql = server_pair.clone(server_pair.target, "pgferry_tpl_baseline", "sqlfiles")
    migrator.upgrade(via_alembic)
    for path in sorted(SQL_DIR.glob("*.sql")):
        subprocess.run(
            [
                str(server_pair.install.program("psql")),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-f",
                str(path),
                via_sql,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    assert _schema_dump(server_pair, via_sql) == _schema_dump(server_pair, via_alembic)
    assert _catalog_facts(via_sql) == _catalog_facts(via_alembic)
    # The layouts are interchangeable: after the SQL files, Alembic has nothing left to do.
    assert migrator.current_revision(via_sql) == migrator.revisions()[-1].revision
    result = run_pgferry("db", "upgrade", "--database-url", via_sql)
    assert result.returncode == 0, result.stderr
    assert "already at" in result.stdout


def test_models_match_the_migrated_database(target_url: str) -> None:
    engine = create_engine(migrator.sqlalchemy_url(target_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "include_object": lambda obj, name, type_, reflected, compare_to: (
                        type_ != "table" or name in Base.metadata.tables
                    ),
                    # HNSW indexes are Supabase extras the models cannot express.
                    "include_name": lambda name, type_, parent: (
                        not (type_ == "index" and name is not None and name.endswith("_hnsw"))
                    ),
                },
            )
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations drifted: {diff}"


def test_downgrade_to_base_and_back(baseline_url: str) -> None:
    head = migrator.upgrade(baseline_url)
    assert migrator.downgrade(baseline_url, "base") is None
    with psycopg.connect(baseline_url) as conn:
        assert conn.execute("select to_regclass('public.tasks')").fetchone() == (None,)
        assert conn.execute(
            "select count(*) from pg_publication_tables where pubname = 'supabase_realtime'"
        ).fetchone() == (0,)
    assert migrator.upgrade(baseline_url) == head


def test_db_upgrade_command_enables_rls_everywhere(baseline_url: str) -> None:
    result = run_pgferry("db", "upgrade", "--database-url", baseline_url)
    assert result.returncode == 0, result.stderr
    assert "upgraded empty ->" in result.stdout
    with psycopg.connect(baseline_url) as conn:
        flags = dict(
            conn.execute(
                "select relname, relrowsecurity from pg_class where relnamespace = 'public'::regnamespace "
                "and relkind = 'r'"
            ).fetchall()
        )
        published = {
            r[0]
            for r in conn.execute("select tablename from pg_publication_tables where pubname = 'supabase_realtime'")
        }
    assert {t: flags.get(t) for t in USER_OWNED_TABLES} == dict.fromkeys(USER_OWNED_TABLES, True)
    assert published == set(REALTIME_TABLES)
    again = run_pgferry("db", "upgrade", "--database-url", baseline_url)
    assert again.returncode == 0 and "already at" in again.stdout


def test_db_upgrade_on_a_plain_postgres_says_what_is_missing(blank_url: str) -> None:
    result = run_pgferry("db", "upgrade", "--database-url", blank_url)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "not a Supabase database" in result.stderr
    assert "pgferry db baseline" in result.stderr
    assert "Traceback" not in result.stderr
    with psycopg.connect(blank_url) as conn:  # nothing was written
        assert conn.execute("select to_regclass('public.tasks')").fetchone() == (None,)


def test_db_upgrade_with_bad_urls_fails_in_one_line(server_pair: ServerPair) -> None:
    cases = {
        "mysql://root@localhost/app": "--database-url",
        "postgresql://postgres:hunter2@127.0.0.1:1/postgres": "cannot connect",
    }
    for url, expected in cases.items():
        result = run_pgferry("db", "upgrade", "--database-url", url)
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert expected in result.stderr
        assert "hunter2" not in result.stderr


def test_bad_environment_settings_fail_in_one_line() -> None:
    result = run_pgferry("db", "upgrade", env={"SUPABASE_URL": "not a url"})
    assert result.returncode == 2
    assert re.fullmatch(r"pgferry: error: SUPABASE_URL: .*supabase\.co.*\n", result.stderr), result.stderr
    result = run_pgferry("db", "upgrade", env={"SUPABASE_DB_URL": "postgresql://u:s3cret@/nodb"})
    assert result.returncode == 2
    assert result.stderr.startswith("pgferry: error: SUPABASE_DB_URL:")
    assert "s3cret" not in result.stderr
