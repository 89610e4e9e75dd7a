"""Entry point: ``pgferry dev …``, ``pgferry db …``, ``pgferry migrate …``, ``pgferry sync …``, ``pgferry demo``.

Only the command group being run is imported: each group pulls in what it needs (Alembic and SQLAlchemy for
``db``, the local stack for ``dev``, ASGI servers for ``sync``), and a ``pgferry migrate run`` should not pay
a second of start-up for the others.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

import typer

from pgferry.cli.errors import run_reporting_errors
from pgferry.observability.logging import configure_logging

GROUPS: dict[str, tuple[str, str]] = {
    "dev": ("pgferry.cli.dev", "app"),
    "db": ("pgferry.cli.db", "app"),
    "migrate": ("pgferry.cli.migrate", "app"),
    "sync": ("pgferry.cli.sync", "sync_app"),
}


def build_app(argv: Sequence[str] = ()) -> typer.Typer:
    """The ``pgferry`` command with the group named in ``argv`` (every group when none or unknown)."""
    app = typer.Typer(
        name="pgferry",
        help="Move the agent platform's database from Neon to Supabase and run its data layer.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    # A callback keeps typer in "group" mode even when only one command is registered.
    app.callback()(_group)
    wanted = argv[0] if argv else None
    known = wanted in GROUPS or wanted == "demo"
    for name, (module, attribute) in GROUPS.items():
        if not known or wanted == name:
            app.add_typer(getattr(importlib.import_module(module), attribute), name=name)
    if not known or wanted == "demo":
        app.command("demo")(importlib.import_module("pgferry.cli.demo").demo)
    return app


def _group() -> None:
    """Move the agent platform's database from Neon to Supabase and run its data layer."""


def run() -> None:
    # Logs go to stderr, secrets scrubbed, so stdout stays the command's output (one JSON document with --json).
    configure_logging(os.environ.get("PGFERRY_LOG_LEVEL", "warning"))
    run_reporting_errors(build_app(sys.argv[1:2]))


if __name__ == "__main__":
    run()
