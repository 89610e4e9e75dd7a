"""Entry point: ``pgferry dev …``, ``db …``, ``migrate …``, ``sync …``, ``realtime …``, ``pgferry demo``,
``pgferry doctor``.

Only the command group being run is imported: each group pulls in what it needs (Alembic and SQLAlchemy for
``db``, the local stack for ``dev``, ASGI servers for ``sync``), and a ``pgferry migrate run`` should not pay
a second of start-up for the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from pgferry.observability.logging import configure_logging

if TYPE_CHECKING:
    import typer

GROUPS: dict[str, tuple[str, str]] = {
    "dev": ("pgferry.cli.dev", "app"),
    "db": ("pgferry.cli.db", "app"),
    "migrate": ("pgferry.cli.migrate", "app"),
    "sync": ("pgferry.cli.sync", "sync_app"),
    "realtime": ("pgferry.cli.realtime", "realtime_app"),
}


def build_app(argv: Sequence[str] = ()) -> typer.Typer:
    """The ``pgferry`` command with the group named in ``argv`` (every group when none or unknown)."""
    import typer

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
    known = wanted in GROUPS or wanted in ("demo", "doctor")
    for name, (module, attribute) in GROUPS.items():
        if not known or wanted == name:
            app.add_typer(getattr(_import(module, name), attribute), name=name)
    if not known or wanted == "demo":
        app.command("demo")(_import("pgferry.cli.demo", "demo").demo)
    if not known or wanted == "doctor":
        app.command("doctor")(_import("pgferry.cli.doctor", "doctor").doctor)
    return app


def _import(module: str, command: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("pgferry"):
            raise
        _missing(f"`pgferry {command}` needs the package {exc.name}")


def _missing(what: str) -> NoReturn:
    print(f"pgferry: error: {what}; install the extras: pip install 'pgferry[all]'", file=sys.stderr)
    raise SystemExit(2)


def _group() -> None:
    """Move the agent platform's database from Neon to Supabase and run its data layer."""


def run() -> None:
    # Logs go to stderr, secrets scrubbed, so stdout stays the command's output (one JSON document with --json).
    configure_logging(os.environ.get("PGFERRY_LOG_LEVEL", "warning"))
    if importlib.util.find_spec("typer") is None or importlib.util.find_spec("rich") is None:
        _missing("the pgferry command needs typer and rich")
    from pgferry.cli.errors import run_reporting_errors

    run_reporting_errors(build_app(sys.argv[1:2]))


if __name__ == "__main__":
    run()
