"""``pgferry realtime``: the Supabase Realtime (``postgres_changes``) server.

``realtime_app`` is the sub-app registered as ``pgferry realtime``; the server and its ASGI stack are imported only
when ``serve`` runs, so ``pgferry --help`` and the other groups do not pay for them.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Annotated

import typer

from pgferry.cli.common import settings

__all__ = ["DEFAULT_REALTIME_PORT", "realtime_app"]

DEFAULT_REALTIME_PORT = 4000  # what Supabase's own Realtime listens on

realtime_app = typer.Typer(
    help="Supabase Realtime postgres_changes over logical replication, authorized like RLS.", no_args_is_help=True
)


@realtime_app.command()
def serve(
    database_url: Annotated[
        str | None,
        typer.Option(help="PostgreSQL to follow (wal_level=logical) [default: SUPABASE_DB_URL]."),
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")] = DEFAULT_REALTIME_PORT,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Where the server remembers live subscriptions [default: $PGFERRY_HOME/realtime/<port>]."),
    ] = None,
    slot: Annotated[str, typer.Option(help="Replication slot (kept across restarts).")] = "pgferry_realtime",
    publication: Annotated[str, typer.Option(help="Publication whose tables are served.")] = "supabase_realtime",
    resume_grace: Annotated[
        float,
        typer.Option(min=0.0, help="After a restart, seconds to wait for earlier subscribers to rejoin."),
    ] = 15.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve /realtime/v1/websocket for Supabase's clients. API keys and access tokens are verified with
    SUPABASE_JWT_SECRET or SUPABASE_JWKS_URL (issuer from SUPABASE_URL)."""
    import uvicorn

    from pgferry.config import parse_database_url
    from pgferry.realtime.server import RealtimeServerConfig, check_realtime_database, create_realtime_app
    from pgferry.sync.auth import TokenVerifier

    current = settings()
    if database_url is not None:
        url = parse_database_url(database_url)
    elif current.supabase_db_url is not None:
        url = current.supabase_db_url
    else:
        raise typer.BadParameter("give --database-url or set SUPABASE_DB_URL", param_hint="--database-url")
    config = RealtimeServerConfig(
        database_url=url.get_secret_value(),
        verifier=TokenVerifier.from_settings(current),
        data_dir=data_dir if data_dir is not None else current.home / "realtime" / str(port),
        slot=slot,
        publication=publication,
        resume_grace=resume_grace,
    )
    check_realtime_database(config.database_url, publication)  # one line now rather than a failed startup
    typer.echo(f"pgferry realtime on ws://{host}:{port}/realtime/v1/websocket (slot {slot})", err=True)
    # The feed allocates a few short-lived containers per delivered message; with CPython's default generation-0
    # threshold (700) the collector runs thousands of times a second and takes a third of the server's CPU
    # (bench/realtime.py: 36 → 24 µs of server CPU per message). Objects from start-up are frozen out of every pass.
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    uvicorn.run(create_realtime_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
