"""Running the platform migrations: against a live database, or as SQL files for the Supabase CLI.

Alembic is the engine; the revisions under ``migrations/versions`` are the source of truth. Revision ids are
Supabase CLI timestamps, so revision ``20261125000100`` is ``supabase/migrations/20261125000100_<slug>.sql``
and the two layouts can be mapped to each other without a lookup table.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import Script, ScriptDirectory

from pgferry.db.connect import connect
from pgferry.errors import PgferryError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class SchemaMigrationError(PgferryError):
    """The platform's schema migrations could not be applied."""


class NotSupabaseError(SchemaMigrationError):
    """The database lacks what Supabase provides (``auth`` schema, API roles, realtime publication)."""


def sqlalchemy_url(url: str) -> str:
    """The same URL with the psycopg 3 driver named, as SQLAlchemy needs it."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+psycopg://", url)


def alembic_config(url: str | None = None, *, stdout: io.StringIO | None = None) -> Config:
    cfg = Config(stdout=stdout) if stdout is not None else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def revisions() -> list[Script]:
    """All revisions, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return list(reversed(list(script.walk_revisions())))


def check_supabase_prerequisites(conninfo: str) -> None:
    """Fail early, in words, when the target cannot take the migrations."""
    with connect(conninfo, application_name="pgferry-schema", autocommit=False) as conn:
        missing: list[str] = []
        if conn.execute("select 1 from pg_namespace where nspname = 'auth'").fetchone() is None:
            missing.append("schema auth")
        roles = {
            r[0]
            for r in conn.execute(
                "select rolname from pg_roles where rolname in ('anon', 'authenticated', 'service_role')"
            )
        }
        missing += [f"role {r}" for r in ("anon", "authenticated", "service_role") if r not in roles]
        if conn.execute("select 1 from pg_publication where pubname = 'supabase_realtime'").fetchone() is None:
            missing.append("publication supabase_realtime")
        if missing:
            raise NotSupabaseError(
                f"the database is not a Supabase database (missing {', '.join(missing)}); "
                "for a local server apply the stand-in first with `pgferry db baseline --database-url …`"
            )
        available = conn.execute("select 1 from pg_available_extensions where name = 'vector'").fetchone()
        if available is None:
            raise NotSupabaseError(
                "the pgvector extension is not available on this server; on Supabase it always is, "
                "locally install pgvector (scripts/install-pgvector-pg15.sh) or use the embedded server"
            )


def upgrade(conninfo: str, revision: str = "head") -> str | None:
    """Apply migrations up to ``revision``; returns the revision the database ends at."""
    check_supabase_prerequisites(conninfo)
    command.upgrade(alembic_config(conninfo), revision)
    return current_revision(conninfo)


def downgrade(conninfo: str, revision: str) -> str | None:
    command.downgrade(alembic_config(conninfo), revision)
    return current_revision(conninfo)


def current_revision(conninfo: str) -> str | None:
    with connect(conninfo, application_name="pgferry-schema", autocommit=False) as conn:
        exists = conn.execute("select to_regclass('pgferry.alembic_version')").fetchone()
        if exists is None or exists[0] is None:
            return None
        row = conn.execute("select version_num from pgferry.alembic_version").fetchone()
        return None if row is None else str(row[0])


@dataclass(frozen=True)
class SqlMigration:
    """One revision rendered as a Supabase CLI migration file."""

    filename: str
    sql: str


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def render_sql_migrations() -> list[SqlMigration]:
    """Every revision as the SQL Alembic would run for it, in Supabase CLI naming."""
    rendered: list[SqlMigration] = []
    for rev in revisions():
        buffer = io.StringIO()
        cfg = alembic_config("postgresql://localhost/offline", stdout=buffer)
        cfg.output_buffer = buffer
        start = rev.down_revision if isinstance(rev.down_revision, str) else "base"
        command.upgrade(cfg, f"{start}:{rev.revision}", sql=True)
        title = (rev.doc or rev.revision).splitlines()[0]
        header = (
            f"-- {title}\n"
            f"-- Generated by `pgferry db emit-sql` from revision {rev.revision}; do not edit by hand.\n"
            "-- The Alembic revision is the source of truth; tests/test_migrations.py checks they agree.\n\n"
        )
        rendered.append(SqlMigration(f"{rev.revision}_{_slug(title)}.sql", header + buffer.getvalue()))
    return rendered


def write_sql_migrations(directory: Path) -> list[Path]:
    """Write the rendered files into ``directory`` (``supabase/migrations``), replacing stale ones."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = render_sql_migrations()
    names = {m.filename for m in wanted}
    for stale in directory.glob("*.sql"):
        if stale.name not in names:
            stale.unlink()
    written = []
    for migration in wanted:
        path = directory / migration.filename
        path.write_text(migration.sql)
        written.append(path)
    return written
