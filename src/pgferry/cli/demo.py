"""``pgferry demo``: the whole local job in one command, for newcomers and CI smoke runs."""

from __future__ import annotations

from typing import Annotated

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from pgferry.cli.common import settings, stack
from pgferry.cli.dev import print_status
from pgferry.localstack.stack import DEFAULT_SOURCE_PORT, DEFAULT_TARGET_PORT
from pgferry.schema.models import PLATFORM_TABLES

console = Console()


def demo(
    scale: Annotated[float, typer.Option(help="Data volume; 1.0 is about 100 MB.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Random seed of the sample data.")] = 42,
    source_port: Annotated[int, typer.Option(help="TCP port of the source server.")] = DEFAULT_SOURCE_PORT,
    target_port: Annotated[int, typer.Option(help="TCP port of the target server.")] = DEFAULT_TARGET_PORT,
) -> None:
    """Start the local stack, apply the schemas and seed the source ("Neon") with sample data."""
    from pgferry.testing.data import TestDataManager  # numpy and the generator load only for the demo

    cfg = settings()
    local = stack(cfg.home)
    with console.status("starting local servers and applying schemas"):
        servers = local.up(
            source_port=source_port,
            target_port=target_port,
            bindir=str(cfg.pg_bindir) if cfg.pg_bindir else None,
        )
    print_status(servers, as_json=False)
    source_url = local.url("source")
    manager = TestDataManager(source_url, seed=seed)
    manager.create_environment()
    with console.status(f"seeding the source at scale {scale}"):
        manager.cleanup()
        report = manager.seed(scale)
    table = Table(title=f"source seeded in {report.duration_seconds:.1f}s ({report.total_bytes / 1e6:.1f} MB)")
    table.add_column("table")
    table.add_column("rows", justify="right")
    with psycopg.connect(source_url) as conn:
        for name in PLATFORM_TABLES:
            row = conn.execute(f"select count(*) from public.{name}").fetchone()
            table.add_row(name, f"{row[0] if row else 0:,}")
    console.print(table)
    target_url = local.url("target")
    with psycopg.connect(target_url) as conn:
        rls = conn.execute(
            "select count(*) filter (where relrowsecurity), count(*) from pg_class "
            "where relnamespace = 'public'::regnamespace and relkind = 'r'"
        ).fetchone()
    console.print(
        f"target ready: {rls[0] if rls else 0}/{rls[1] if rls else 0} public tables with row level security; "
        f"next: migrate {source_url} -> {target_url}"
    )
