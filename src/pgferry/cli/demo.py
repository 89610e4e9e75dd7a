"""``pgferry demo``: the whole local job in one command, for newcomers and CI smoke runs.

Starts the local stack, seeds the "Neon" source with sample platform data, and migrates it into the
"Supabase" target with live progress, ending with the verification report. Re-running it starts over:
the previous demo migration is rolled back and the source reseeded, so the demo is always the same story.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from pgferry.cli.common import settings, stack
from pgferry.cli.dev import print_status
from pgferry.cli.migrate import print_summary, print_verification
from pgferry.cli.progress import RichReporter
from pgferry.config import parse_database_url
from pgferry.db.connect import connect
from pgferry.localstack.stack import DEFAULT_SOURCE_PORT, DEFAULT_TARGET_PORT
from pgferry.migrate import Migration, MigrationOptions

console = Console()


def demo(
    scale: Annotated[float, typer.Option(help="Data volume; 1.0 is about 130 MB.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Random seed of the sample data.")] = 42,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Parallel migration workers.")] = 2,
    source_port: Annotated[int, typer.Option(help="TCP port of the source server.")] = DEFAULT_SOURCE_PORT,
    target_port: Annotated[int, typer.Option(help="TCP port of the target server.")] = DEFAULT_TARGET_PORT,
) -> None:
    """Start the local stack, seed the source ("Neon") and migrate it into the target ("Supabase")."""
    from pgferry.migrate.state import latest_run
    from pgferry.sampledata import TestDataManager  # numpy and the generator load only for the demo

    cfg = settings()
    local = stack(cfg.home)
    with console.status("starting local servers and applying schemas"):
        servers = local.up(
            source_port=source_port,
            target_port=target_port,
            with_sync=False,
            with_pooler=False,
            bindir=str(cfg.pg_bindir) if cfg.pg_bindir else None,
        )
    print_status([server for server in servers if server.name in ("source", "target")], as_json=False)
    source_url, target_url = local.url("source"), local.url("target")
    options = MigrationOptions(
        source_url=parse_database_url(source_url, "source"),
        target_url=parse_database_url(target_url, "target"),
        jobs=jobs,
    )

    with connect(target_url) as conn:
        previous = latest_run(conn)
    if previous is not None:
        with console.status(f"rolling back the previous demo migration (run {previous.id})"):
            Migration(options).rollback()
    manager = TestDataManager(source_url, seed=seed)
    manager.create_environment()
    with console.status(f"seeding the source at scale {scale}"):
        manager.cleanup()
        report = manager.seed(scale)
    console.print(
        f"source seeded: {sum(report.rows.values()):,} rows, {report.total_bytes / 1e6:,.1f} MB "
        f"in {report.duration_seconds:.1f}s"
    )
    reporter = RichReporter(console)
    migration = Migration(options, reporter)
    with reporter:
        summary = migration.run()
    print_summary(summary)
    if summary.verification is not None:
        print_verification(summary.verification)
    console.print(
        f"\nsource: {source_url}\ntarget: {target_url}\n"
        "next: `pgferry dev psql target`, `pgferry migrate status --target …`, `pgferry dev down`"
    )
