"""``pgferry doctor``: check a Supabase database for the platform and say how to fix what is wrong."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from pgferry.cli.common import database_url, settings
from pgferry.runtime.doctor import DEFAULT_MAX_RETAINED_WAL, diagnose

_MARK = {"ok": "ok  ", "warning": "warn", "problem": "FAIL"}


def doctor(
    database_url_option: Annotated[
        str | None,
        typer.Option("--database-url", help="PostgreSQL URL; defaults to SUPABASE_DB_URL.", show_default=False),
    ] = None,
    max_retained_wal_mb: Annotated[
        int, typer.Option(help="An inactive replication slot retaining more WAL than this (MB) is a problem.")
    ] = DEFAULT_MAX_RETAINED_WAL >> 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
) -> None:
    """Connectivity, pgvector, RLS on every public table, realtime publication, pooler mode, replication slots and
    their retained WAL. Prints each finding with its fix; exits 1 when any check finds a problem."""
    cfg = settings()
    url = database_url(database_url_option, env_name="SUPABASE_DB_URL", fallback=cfg.supabase_db_url)
    findings = diagnose(url.get_secret_value(), declared=cfg.db_mode, max_retained_wal=max_retained_wal_mb << 20)
    problems = [f for f in findings if f.status == "problem"]
    if as_json:
        typer.echo(json.dumps({"ok": not problems, "findings": [f.as_dict() for f in findings]}, indent=2))
    else:
        for finding in findings:
            typer.echo(f"{_MARK[finding.status]} {finding.check}: {finding.message}")
            if finding.fix and finding.status != "ok":
                typer.echo(f"     fix: {finding.fix}")
        typer.echo(f"{len(problems)} problem(s) found" if problems else "no problems found")
    if problems:
        raise typer.Exit(1)
