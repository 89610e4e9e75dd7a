"""``pgferry db``: the platform schema on any PostgreSQL."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated

import typer

from pgferry.cli.common import database_url, settings
from pgferry.schema import migrator
from pgferry.supabase.baseline import apply_local_baseline

app = typer.Typer(help="Platform schema: migrations, Supabase SQL files, local baseline.", no_args_is_help=True)

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option("--database-url", help="PostgreSQL URL; defaults to SUPABASE_DB_URL.", show_default=False),
]


@app.command()
def upgrade(
    database_url_option: DatabaseUrlOption = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Apply pgferry's migrations (tables, RLS, realtime publication, vector search)."""
    url = database_url(database_url_option, env_name="SUPABASE_DB_URL", fallback=settings().supabase_db_url)
    before = migrator.current_revision(url.get_secret_value())
    after = migrator.upgrade(url.get_secret_value(), revision)
    if before == after:
        typer.echo(f"{url}: already at {after}")
    else:
        typer.echo(f"{url}: upgraded {before or 'empty'} -> {after}")


@app.command()
def current(database_url_option: DatabaseUrlOption = None) -> None:
    """Print the migration revision a database is at."""
    url = database_url(database_url_option, env_name="SUPABASE_DB_URL", fallback=settings().supabase_db_url)
    typer.echo(migrator.current_revision(url.get_secret_value()) or "none")


@app.command()
def baseline(database_url_option: DatabaseUrlOption = None) -> None:
    """Make a LOCAL PostgreSQL look like Supabase (roles, auth schema, publication). Refuses real projects."""
    url = database_url(database_url_option, env_name="SUPABASE_DB_URL", fallback=settings().supabase_db_url)
    applied = apply_local_baseline(url.get_secret_value())
    typer.echo(f"{url}: baseline {'applied' if applied else 'already present'}")


@app.command("emit-sql")
def emit_sql(
    out: Annotated[Path, typer.Option(help="Supabase CLI migrations directory.")] = Path("supabase/migrations"),
    check: Annotated[bool, typer.Option(help="Fail if the files differ from the migrations; write nothing.")] = False,
) -> None:
    """Write the migrations as plain SQL files in the Supabase CLI layout."""
    if not check:
        for path in migrator.write_sql_migrations(out):
            typer.echo(f"wrote {path}")
        return
    problems: list[str] = []
    wanted = {m.filename: m.sql for m in migrator.render_sql_migrations()}
    present = {p.name: p.read_text() for p in out.glob("*.sql")} if out.exists() else {}
    for name in sorted(set(wanted) | set(present)):
        if name not in present:
            problems.append(f"missing {out / name}")
        elif name not in wanted:
            problems.append(f"{out / name} has no Alembic revision")
        elif present[name] != wanted[name]:
            diff = difflib.unified_diff(present[name].splitlines(), wanted[name].splitlines(), lineterm="", n=1)
            problems.append(f"{out / name} differs:\n" + "\n".join(list(diff)[:40]))
    if problems:
        typer.echo("\n".join(problems), err=True)
        typer.echo("run `pgferry db emit-sql` to regenerate", err=True)
        raise typer.Exit(1)
    typer.echo(f"{out}: {len(wanted)} files match the Alembic revisions")
