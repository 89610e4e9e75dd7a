"""``pgferry migrate``: plan, run, verify, roll back and watch a Neon → Supabase move."""

from __future__ import annotations

import json
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from pgferry.cli.common import database_url, settings
from pgferry.migrate import state as st
from pgferry.migrate.catalog import TableFilter
from pgferry.migrate.engine import MigrationOptions, MigrationService, MigrationSummary
from pgferry.migrate.plan import MigrationPlan
from pgferry.migrate.verify import VerificationReport

app = typer.Typer(help="Move the data: plan | run | verify | rollback | status.", no_args_is_help=True)
console = Console()

SourceOption = Annotated[
    str | None, typer.Option("--source", help="Source URL (default NEON_DATABASE_URL).", show_default=False)
]
TargetOption = Annotated[
    str | None, typer.Option("--target", help="Target URL (default SUPABASE_DB_URL).", show_default=False)
]
JobsOption = Annotated[int, typer.Option("--jobs", "-j", min=1, max=64, help="Parallel workers.")]
TablesOption = Annotated[list[str] | None, typer.Option("--tables", help="Only these tables (glob, schema.table).")]
ExcludeOption = Annotated[list[str] | None, typer.Option("--exclude-tables", help="Skip these tables (glob).")]
SchemasOption = Annotated[list[str] | None, typer.Option("--schemas", help="Only these schemas.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
SchemaFromOption = Annotated[str, typer.Option(help="pgferry (the platform's migrations) | source")]
BatchRowsOption = Annotated[int | None, typer.Option(help="Rows per chunk (default: ~64 MB).")]


def _service(
    source: str | None,
    target: str | None,
    *,
    jobs: int = 2,
    tables: list[str] | None = None,
    exclude: list[str] | None = None,
    schemas: list[str] | None = None,
    schema_from: str = "pgferry",
    batch_rows: int | None = None,
    verify: bool = True,
    on_error: str = "stop",
    reporter: Any = None,
) -> MigrationService:
    cfg = settings()
    source_url = database_url(source, env_name="NEON_DATABASE_URL", fallback=cfg.neon_database_url, option="--source")
    target_url = database_url(target, env_name="SUPABASE_DB_URL", fallback=cfg.supabase_db_url, option="--target")
    if schema_from not in ("pgferry", "source"):
        raise typer.BadParameter("must be 'pgferry' or 'source'", param_hint="--schema-from")
    if on_error not in ("stop", "skip-table", "rollback"):
        raise typer.BadParameter("must be stop, skip-table or rollback", param_hint="--on-error")
    options = MigrationOptions(
        source_url=source_url,
        target_url=target_url,
        jobs=jobs,
        table_filter=TableFilter(tuple(schemas or ()), tuple(tables or ()), tuple(exclude or ())),
        schema_from=schema_from,  # type: ignore[arg-type]
        batch_rows=batch_rows,
        verify=verify,
        on_error=on_error,  # type: ignore[arg-type]
    )
    return MigrationService(options, reporter)


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
    table = Table(title="verification (checksums computed on both servers)")
    for column in ("table", "chunks", "rows", "result"):
        table.add_column(column)
    for name, entry in sorted(report.tables().items()):
        ok = entry["mismatched_chunks"] == 0
        table.add_row(
            name,
            str(entry["chunks"]),
            f"{entry['rows']:,}",
            "[green]identical[/]" if ok else f"[red]{entry['mismatched_chunks']} chunk(s) differ[/]",
        )
    console.print(table)
    for check in report.mismatched_chunks:
        console.print(f"[red]mismatch[/]: {check.describe()}")
    lagging = report.lagging_sequences
    console.print(f"sequences: {len(report.sequences) - len(lagging)}/{len(report.sequences)} at or beyond the source")
    for seq in lagging:
        console.print(
            f"[red]sequence {seq['sequence']}[/]: target next {seq['target_next']}, source next {seq['source_next']}"
        )
    for item in report.invalid_constraints + report.missing_objects:
        console.print(f"[red]{item}[/]")
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
    as_json: JsonOption = False,
) -> None:
    """Validate and estimate; changes nothing anywhere."""
    service = _service(
        source,
        target,
        jobs=jobs,
        tables=tables,
        exclude=exclude_tables,
        schemas=schemas,
        schema_from=schema_from,
        batch_rows=batch_rows,
    )
    result = service.plan()
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
    verify: Annotated[bool, typer.Option(help="Verify checksums after the copy.")] = True,
    on_error: Annotated[str, typer.Option(help="stop | skip-table | rollback")] = "stop",
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on 127.0.0.1:PORT.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Run (or resume) the migration: schema, data, indexes, sequences, verification."""
    from pgferry.cli.progress import RichReporter

    reporter = RichReporter(Console(stderr=True)) if not as_json else None
    service = _service(
        source,
        target,
        jobs=jobs,
        tables=tables,
        exclude=exclude_tables,
        schemas=schemas,
        schema_from=schema_from,
        batch_rows=batch_rows,
        verify=verify,
        on_error=on_error,
        reporter=reporter,
    )
    if metrics_port is not None:
        service.metrics.serve(metrics_port)
    if reporter is not None:
        with reporter:
            summary = service.run()
    else:
        summary = service.run()
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), indent=2, default=str))
        return
    print_summary(summary)
    if verify:
        report = service.verify(summary.run_id)
        print_verification(report)


@app.command("verify")
def verify_command(
    source: SourceOption = None,
    target: TargetOption = None,
    jobs: JobsOption = 2,
    as_json: JsonOption = False,
) -> None:
    """Compare source and target now: per-chunk checksums, sequences, constraints."""
    service = _service(source, target, jobs=jobs)
    report = service.verify()
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        print_verification(report)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def rollback(source: SourceOption = None, target: TargetOption = None, as_json: JsonOption = False) -> None:
    """Return the target to its state before the migration (the source is never modified)."""
    from pgferry.migrate.rollback import rollback as run_rollback

    report = run_rollback(_service(source, target))
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    for step in report.steps:
        mark = "[green]✓[/]" if step.verified else "[red]✗[/]"
        console.print(f"{mark} {step.name}: {step.detail}")
    console.print("[bold green]target restored[/]" if report.ok else "[bold red]rollback incomplete[/]")


@app.command()
def status(target: TargetOption = None, as_json: JsonOption = False) -> None:
    """Show the persisted state of the latest migration (safe to run from another terminal)."""
    cfg = settings()
    target_url = database_url(target, env_name="SUPABASE_DB_URL", fallback=cfg.supabase_db_url, option="--target")
    with psycopg.connect(target_url.get_secret_value(), autocommit=True, connect_timeout=10) as conn:
        run_state = st.latest_run(conn)
        if run_state is None:
            payload: dict[str, Any] = {"run": None}
        else:
            progress = st.progress_summary(conn, run_state.id)
            elapsed = conn.execute(
                "select extract(epoch from now() - started_at) from pgferry.migration_runs where id = %s",
                (run_state.id,),
            ).fetchone()
            total_rows = sum(t["row_estimate"] for t in progress["tables"]) or 0
            seconds = float(elapsed[0]) if elapsed else 0.0
            rate = progress["rows_copied"] / seconds if seconds else 0.0
            remaining = max(0, total_rows - progress["rows_copied"])
            payload = {
                "run": run_state.id,
                "phase": run_state.phase,
                "status": run_state.status,
                "tables_total": len(progress["tables"]),
                "tables_completed": sum(
                    1 for t in progress["tables"] if t["chunks"] and t["chunks"] == t["chunks_done"]
                ),
                "chunks_total": progress["chunks_total"],
                "chunks_done": progress["chunks_done"],
                "records_migrated": progress["rows_copied"],
                "bytes_migrated": progress["bytes_copied"],
                "errors": progress["errors"],
                "estimated_seconds_remaining": round(remaining / rate, 1)
                if rate and run_state.status == "running"
                else None,
                "phase_seconds": run_state.phase_seconds,
            }
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
    for error in payload["errors"]:
        console.print(f"[red]error[/] {error['at']} [{error['phase']}] {error['table'] or ''} {error['message']}")
