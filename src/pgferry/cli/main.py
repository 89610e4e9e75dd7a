"""Entry point: ``pgferry dev …``, ``pgferry db …``, ``pgferry migrate …``, ``pgferry sync …``, ``pgferry demo``."""

from __future__ import annotations

import os

import typer

from pgferry.cli import db as db_commands
from pgferry.cli import demo as demo_commands
from pgferry.cli import dev as dev_commands
from pgferry.cli import migrate as migrate_commands
from pgferry.cli import sync as sync_commands
from pgferry.cli.errors import run_reporting_errors
from pgferry.observability.logging import configure_logging

app = typer.Typer(
    name="pgferry",
    help="Move the agent platform's database from Neon to Supabase and run its data layer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(dev_commands.app, name="dev")
app.add_typer(db_commands.app, name="db")
app.add_typer(migrate_commands.app, name="migrate")
app.add_typer(sync_commands.sync_app, name="sync")
app.command("demo")(demo_commands.demo)


def run() -> None:
    # Logs go to stderr, secrets scrubbed, so stdout stays the command's output (one JSON document with --json).
    configure_logging(os.environ.get("PGFERRY_LOG_LEVEL", "warning"))
    run_reporting_errors(app)


if __name__ == "__main__":
    run()
