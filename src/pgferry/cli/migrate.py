"""``pgferry migrate``: plan, run, verify, roll back and watch a Neon → Supabase move."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pgferry.cli.common import database_url, settings
from pgferry.migrate import Migration, MigrationOptions, MigrationSummary, TableFilter, VerificationReport
from pgferry.migrate.plan import MigrationPlan

app = typer.Typer(help="Move the data: plan | run | verify | rollback | status.", no_args_is_help=True)
console = Console()

SourceOption = Annotated[
    str | None, typer.Option("--source", help="Source URL (default NEON_DATABASE_URL).", show_default=False)
]
TargetOption = Annotated[
    str | None, typer.Option("--target", help="Target URL (default SUPABASE_DB_URL).", show_default=False)
]
# Ranges are checked by MigrationOptions (one line naming the option), not by typer (a boxed usage screen).
JobsOption = Annotated[int, typer.Option("--jobs", "-j", help="Parallel copy workers (and index builds), 1-64.")]
TablesOption = Annotated[list[str] | None, typer.Option("--tables", help="Only these tables (glob, schema.table).")]
ExcludeOption = Annotated[list[str] | None, typer.Option("--exclude-tables", help="Skip these tables (glob).")]
SchemasOption = Annotated[list[str] | None, typer.Option("--schemas", help="Only these schemas.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output: one JSON document on stdout.")]
SchemaFromOption = Annotated[str, typer.Option(help="pgferry (the platform's migrations) | source")]
BatchRowsOption = Annotated[int | None, typer.Option(help="Rows per chunk, at least 1 (default: ~64 MB chunks).")]


def _migration(
    source: str | None,
    target: str | None,
    *,
    reporter: Any = None,
    tables: list[str] | None = None,
    exclude: list[str] | None = None,
    schemas: list[str] | None = None,
    **options: Any,
) -> Migration:
    cfg = settings()
    source_url = database_url(source, env_name="NEON_DATABASE_URL", fallback=cfg.neon_database_url, option="--source")
    target_url = database_url(target, env_name="SUPABASE_DB_URL", fallback=cfg.supabase_db_url, option="--target")
    return Migration(
        MigrationOptions(
            source_url=source_url,
            target_url=target_url,
            table_filter=TableFilter(tuple(schemas or ()), tuple(tables or ()), tuple(exclude or ())),
            **options,
        ),
        reporter,
    )


def print_plan(plan: MigrationPlan) -> None:
    console.print(
        f"source: PostgreSQL {plan.source.version}, database {plan.source.database}, "
        f"{plan.source.size_bytes / 1e6:,.1f} MB"
    )
    console.print(
        f"target: PostgreSQL {plan.target.version}, database {plan.target.database}, "
        f"{plan.target.size_bytes / 1e6:,.1f} MB"
    )
    table = Table(
        title=f"plan: {len(plan.tables)} tables, {plan.total_rows:,} rows, "
        f"{plan.total_bytes / 1e6:,.1f} MB, {plan.sequences} sequences, "
        f"schema from {plan.schema_from}, about {plan.estimated_seconds:.0f}s with {plan.jobs} jobs"
    )
    for column in ("table", "rows (est.)", "size", "chunks", "key", "on target"):
        table.add_column(column, overflow="fold")
    for t in plan.tables:
        table.add_row(t.table, f"{t.rows:,}", f"{t.bytes / 1e6:,.1f} MB", str(t.chunks), t.key, t.target)
    console.print(table)
    colours = {"error": "red", "warning": "yellow", "info": "dim"}
    for problem in plan.problems:
        fix = f" — {problem.fix}" if problem.fix else ""
        console.print(f"[{colours[problem.severity]}]{problem.severity}[/]: {problem.message}{fix}")
    console.print("[green]ready to run[/]" if not plan.errors else f"[red]{len(plan.errors)} blocking problem(s)[/]")


def print_verification(report: VerificationReport) -> None:
    table = Table(title="verification (every table read once on each server, compared bucket by bucket)")
    for column in ("table", "rows", "buckets", "seconds", "result"):
        table.add_column(column)
    for check in sorted(report.tables, key=lambda c: c.table):
        table.add_row(
            check.table,
            f"{check.source_rows:,}",
            str(check.buckets),
            f"{check.seconds:.1f}",
            "[green]identical[/]"
            if check.ok
            else f"[red]DIFFERENT: {len(check.differing_buckets)} bucket(s), target {check.target_rows:,} rows[/]",
        )
    console.print(table)
    for check in report.differing_tables:
        console.print(f"[red]mismatch[/]: {check.describe()}")
        for example in check.examples[1:]:
            console.print(f"  {example}")
    lagging = report.lagging_sequences
    console.print(f"sequences: {len(report.sequences) - len(lagging)}/{len(report.sequences)} at or beyond the source")
    for line in report.problems()[len(report.differing_tables) :]:
        console.print(f"[red]{line}[/]")
    console.print("[bold green]verification passed[/]" if report.ok else "[bold red]verification FAILED[/]")


def print_summary(summary: MigrationSummary) -> None:
    table = Table(title=f"migration run {summary.run_id}: {summary.status}{' (resumed)' if summary.resumed else ''}")
    for column in ("table", "rows", "MB", "copy seconds", "state"):
        table.add_column(column)
    for t in summary.tables:
        table.add_row(t.table, f"{t.rows:,}", f"{t.bytes / 1e6:,.1f}", f"{t.seconds:.2f}", t.state)
    console.print(table)
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in summary.phase_seconds.items())
    data = summary.as_dict()
    console.print(f"phases: {phases}; total {summary.total_seconds:.1f}s")
    if data["rows_per_second"]:
        console.print(
            f"throughput: {data['rows_per_second']:,.0f} rows/s, "
            f"{data['bytes_per_second'] / 1e6:,.1f} MB/s; retries: {summary.retries}"
        )
    for table_name in summary.skipped_tables:
        console.print(f"[red]skipped[/]: {table_name} (see errors below)")
    for error in summary.errors:
        console.print(f"[red]error[/] [{error['phase']}] {error['table'] or ''} {error['message']}")


@app.command()
def plan(
    source: SourceOption = None,
    target: TargetOption = None,
    jobs: JobsOption = 2,
    tables: TablesOption = None,
    exclude_tables: ExcludeOption = None,
    schemas: SchemasOption = None,
    schema_from: SchemaFromOption = "pgferry",
    batch_rows: BatchRowsOption = None,
    online: Annotated[bool, typer.Option(help="Also check what following the source needs.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Validate and estimate; changes nothing anywhere."""
    migration = _migration(
        source,
        target,
        jobs=jobs,
        tables=tables,
        exclude=exclude_tables,
        schemas=schemas,
        schema_from=schema_from,
        batch_rows=batch_rows,
        online=online,
    )
    result = migration.plan()
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2, default=str))
    else:
        print_plan(result)
    if result.errors:
        raise typer.Exit(1)


@app.command()
def run(
    source: SourceOption = None,
    target: TargetOption = None,
    jobs: JobsOption = 2,
    tables: TablesOption = None,
    exclude_tables: ExcludeOption = None,
    schemas: SchemasOption = None,
    schema_from: SchemaFromOption = "pgferry",
    batch_rows: BatchRowsOption = None,
    verify: Annotated[bool, typer.Option(help="Verify every table on both servers.")] = True,
    on_error: Annotated[str, typer.Option(help="stop | skip-table | rollback")] = "stop",
    maintenance_work_mem: Annotated[
        str, typer.Option(help="Memory per index build on the target (HNSW builds want the whole graph in it).")
    ] = "512MB",
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on 127.0.0.1:PORT.")] = None,
    online: Annotated[
        bool, typer.Option(help="After the copy, follow the source by logical replication until `cutover`.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Run (or resume) the migration: schema, data, indexes, sequences, verification."""
    from pgferry.cli.progress import RichReporter

    reporter = RichReporter(Console(stderr=True)) if not as_json else None
    migration = _migration(
        source,
        target,
        reporter=reporter,
        jobs=jobs,
        tables=tables,
        exclude=exclude_tables,
        schemas=schemas,
        schema_from=schema_from,
        batch_rows=batch_rows,
        verify=verify,
        on_error=on_error,
        maintenance_work_mem=maintenance_work_mem,
        online=online,
    )
    if metrics_port is not None:
        migration.metrics.serve(metrics_port)
    if reporter is not None:
        with reporter:
            summary = migration.run()
    else:
        summary = migration.run()
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), indent=2, default=str))
        return
    print_summary(summary)
    if summary.verification is not None:
        print_verification(summary.verification)  # the report the run stored: verified once, not twice


@app.command("verify")
def verify_command(
    source: SourceOption = None,
    target: TargetOption = None,
    jobs: JobsOption = 2,
    as_json: JsonOption = False,
) -> None:
    """Compare source and target now: every table on both servers, sequences, constraints."""
    report = _migration(source, target, jobs=jobs).verify()
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        print_verification(report)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def rollback(source: SourceOption = None, target: TargetOption = None, as_json: JsonOption = False) -> None:
    """Return the target to its state before the migration (the source is never modified)."""
    report = _migration(source, target).rollback()
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    for step in report.steps:
        mark = "[green]✓[/]" if step.verified else "[red]✗[/]"
        console.print(f"{mark} {step.name}: {step.detail}")
    for kept in report.kept:
        console.print(f"[yellow]kept[/] {kept} (created after the migration)")
    if report.nothing_to_do:
        console.print("[bold]nothing to roll back[/]")
    else:
        console.print("[bold green]target restored[/]" if report.ok else "[bold red]rollback incomplete[/]")


@app.command()
def cutover(
    source: SourceOption = None,
    target: TargetOption = None,
    grace: Annotated[float, typer.Option(help="Seconds open sessions get to finish before they are ended.")] = 5.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the target to catch up.")] = 120.0,
    verify: Annotated[bool, typer.Option(help="Verify both servers before announcing the switch.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Switch an online migration to the target: fence the source, catch up, verify, start the way back."""
    from pgferry.migrate.online import cutover as run_cutover

    report = run_cutover(_migration(source, target), grace=grace, timeout=timeout, verify=verify)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    console.print(
        f"[bold green]cut over[/]: writes were stopped for {report.downtime_seconds:.2f}s; the target has every "
        f"change up to {report.fence_lsn}{' and was verified' if report.verified else ''}."
    )
    console.print(f"switch the application now: DATABASE_URL={report.target_url}")
    console.print(
        "the source follows the target from now on: `pgferry migrate rollback` goes back without "
        "losing a write, `pgferry migrate finish` makes the move final"
    )


@app.command()
def finish(source: SourceOption = None, target: TargetOption = None) -> None:
    """End an online migration after its cut-over: stop the way back, remove slots and publications."""
    from pgferry.migrate.online import finish as run_finish

    run_finish(_migration(source, target))
    console.print("[bold green]migration finished[/]: the target is the primary; the source stays read-only")


@app.command()
def status(target: TargetOption = None, as_json: JsonOption = False) -> None:
    """Show the persisted state of the latest migration (safe to run from another terminal)."""
    cfg = settings()
    target_url = database_url(target, env_name="SUPABASE_DB_URL", fallback=cfg.supabase_db_url, option="--target")
    payload = Migration.status_of(target_url, cfg.neon_database_url).as_dict()
    if as_json:
        typer.echo(json.dumps(payload, indent=2, default=str))
        return
    if payload["run"] is None:
        console.print("no migration recorded on the target")
        return
    console.print(
        f"run {payload['run']}: phase [bold]{payload['phase']}[/], {payload['status']}; "
        f"tables {payload['tables_completed']}/{payload['tables_total']}, "
        f"chunks {payload['chunks_done']}/{payload['chunks_total']}, "
        f"{payload['records_migrated']:,} records migrated"
        + (
            f", about {payload['estimated_seconds_remaining']:.0f}s left"
            if payload["estimated_seconds_remaining"] is not None
            else ""
        )
    )
    for stream in payload["streams"]:
        lag = stream.get("lag_bytes")
        console.print(
            f"{stream['direction']} stream (slot {stream['slot']}): {stream['changes_applied']:,} changes applied, "
            f"applied up to {stream['applied_lsn'] or '-'}"
            + (f", {lag:,} bytes behind" if lag is not None else "")
            + (f", {stream['lag_seconds']:.1f}s behind" if stream.get("lag_seconds") else "")
        )
    for warning in payload["warnings"]:
        console.print(f"[bold red]warning[/] {warning}")
    for error in payload["errors"]:
        console.print(f"[red]error[/] {error['at']} [{error['phase']}] {error['table'] or ''} {error['message']}")
