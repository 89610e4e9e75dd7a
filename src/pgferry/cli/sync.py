"""``pgferry sync``: the Electric side of the data layer.

``sync_app`` is the sub-app registered as ``pgferry sync``; each command is a plain ``@sync_app.command()``, so
the dev Shape server's ``serve`` joins ``proxy`` here without touching the wiring in ``main.py``.
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from pgferry.cli.common import settings

__all__ = ["DEFAULT_PROXY_PORT", "sync_app"]

DEFAULT_PROXY_PORT = 3001
DEFAULT_UPSTREAM = "http://127.0.0.1:3000"

sync_app = typer.Typer(
    help="ElectricSQL sync: the authorizing shape proxy and the dev Shape server.", no_args_is_help=True
)


def fast_uvicorn_options() -> tuple[Literal["auto", "httptools"], Literal["auto", "uvloop"]]:
    """``(http, loop)`` for uvicorn: its C HTTP parser (httptools) and libuv event loop (uvloop), named
    explicitly when installed (both are dependencies of the sync extra; uvloop has no Windows build). Every
    long-poll is a request parsed and answered by the server: with h11 and asyncio that per-request work was what
    10,000 live clients cost (the slowest fan-out round took 3.3 s); these halve it. Without them uvicorn's
    pure-Python defaults still work."""
    http: Literal["auto", "httptools"] = "httptools" if importlib.util.find_spec("httptools") else "auto"
    loop: Literal["auto", "uvloop"] = "uvloop" if importlib.util.find_spec("uvloop") else "auto"
    return http, loop


def tune_gc_for_many_connections() -> None:
    """Collect young garbage less often, and never rescan what startup built.

    Every long-poll's wake-up allocates a request, a response, tasks and futures; with CPython's default
    thresholds (700 allocations per young collection) 10,000 woken clients trigger thousands of collections, each
    also scanning the older objects the waiting clients hold. Measured with 5,000 live clients and 3 rounds (load
    ~5): 10-13 s of server CPU with the defaults, 6.4-6.8 s with these settings. ``gc.freeze()``
    moves the objects alive after startup out of the collector's sight; cycles are still collected, just in
    bigger batches."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def serve_many_connections(app: Any, host: str, port: int, log_level: str, **options: Any) -> None:
    """Run ``app`` under uvicorn as the sync server and the proxy both run: many long-polling clients per process
    (:func:`fast_uvicorn_options`, :func:`tune_gc_for_many_connections`), five seconds to shut down gracefully."""
    import uvicorn  # here, so `pgferry --help` and the other commands do not pay for it

    http, loop = fast_uvicorn_options()
    tune_gc_for_many_connections()
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, http=http, loop=loop, **options
    )


@sync_app.command()
def proxy(
    upstream: Annotated[
        str | None,
        typer.Option(help=f"Electric's base URL [default: ELECTRIC_URL, else {DEFAULT_UPSTREAM}]."),
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")] = DEFAULT_PROXY_PORT,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    allow_origin: Annotated[
        list[str] | None,
        typer.Option("--allow-origin", help="Browser origin allowed by CORS; repeat for several [default: *]."),
    ] = None,
    columns: Annotated[
        list[str] | None,
        typer.Option(
            "--columns",
            help="Column allow-list of a table, like public.tasks=id,user_id,title (the primary key included); "
            "other columns are never selected nor filtered on. Repeat for several tables [default: all columns].",
        ),
    ] = None,
    max_shapes_per_user: Annotated[
        int, typer.Option(min=1, help="Distinct shapes one user may use (within 10 minutes); more: 429.")
    ] = 32,
    max_snapshots_per_user: Annotated[
        int, typer.Option(min=1, help="New shapes (offset=-1 requests) one user may load at once; more: 429.")
    ] = 2,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="PostgreSQL the write API (POST /v1/mutations) writes to, as each user [default: SUPABASE_DB_URL; "
            "neither: reads only]."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve /v1/shape for signed-in Supabase users: verify the token, scope the shape to the user, forward; and,
    with a database, the write API POST /v1/mutations (one transaction as the user, RLS decides)."""
    # Imported here so `pgferry --help` and the other commands do not pay for starlette/httpx.
    from pgferry.config import parse_database_url
    from pgferry.sync import (
        ProxyConfig,
        TokenVerifier,
        UserLimits,
        WriteApiConfig,
        create_proxy_app,
        parse_column_rules,
    )

    current = settings()
    write_url = parse_database_url(database_url) if database_url is not None else current.supabase_db_url
    write = (
        WriteApiConfig(database_url=write_url.get_secret_value(), verifier=TokenVerifier.from_settings(current))
        if write_url is not None
        else None
    )
    config = ProxyConfig.from_settings(
        upstream=upstream or settings().electric_url or DEFAULT_UPSTREAM,
        allow_origins=tuple(allow_origin or ("*",)),
        tables=parse_column_rules(columns or ()),
        limits=UserLimits(max_shapes=max_shapes_per_user, max_concurrent_snapshots=max_snapshots_per_user),
        write=write,
    )
    writes = f", writes on http://{host}:{port}/v1/mutations" if write is not None else " (reads only)"
    typer.echo(f"pgferry shape proxy on http://{host}:{port}/v1/shape -> {config.upstream}/v1/shape{writes}", err=True)
    serve_many_connections(create_proxy_app(config), host, port, log_level, proxy_headers=False)


@sync_app.command()
def serve(
    database_url: Annotated[
        str | None,
        typer.Option(help="PostgreSQL to sync from (wal_level=logical) [default: SUPABASE_DB_URL]."),
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")] = 3000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Where shape logs live (kept across restarts) [default: $PGFERRY_HOME/sync/<port>]."),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(help="Serve without a secret (like ELECTRIC_INSECURE): anyone who reaches the port reads."),
    ] = False,
    table: Annotated[
        list[str] | None,
        typer.Option(
            "--table", help="A table to serve, like public.tasks; repeat for several [default: the platform's]."
        ),
    ] = None,
    allow_origin: Annotated[
        list[str] | None,
        typer.Option("--allow-origin", help="Browser origin allowed by CORS; repeat for several [default: none]."),
    ] = None,
    live_timeout: Annotated[float, typer.Option(min=0.1, max=40.0, help="Seconds a live request waits.")] = 20.0,
    sse_timeout: Annotated[
        float, typer.Option(min=1.0, max=600.0, help="Seconds a live_sse stream stays open before it ends.")
    ] = 60.0,
    snapshot_workers: Annotated[
        int, typer.Option(min=1, max=64, help="Threads that create shapes (validation and snapshots).")
    ] = 4,
    max_shapes: Annotated[int, typer.Option(min=1, help="Shapes the server holds at most (more: 429).")] = 1000,
    snapshot_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds one page of a shape's snapshot may take (more: 400).")
    ] = 15.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """The dev sync server: Electric's HTTP Shape API over logical replication, for local and CI use.

    Every request must carry the secret from ELECTRIC_SECRET as the `secret` query parameter (the shape proxy
    adds it), unless --insecure."""
    from pgferry.config import parse_database_url
    from pgferry.sync import SyncServerConfig, check_sync_database, create_sync_app, default_served_tables

    current = settings()
    if database_url is not None:
        url = parse_database_url(database_url)
    elif current.supabase_db_url is not None:
        url = current.supabase_db_url
    else:
        raise typer.BadParameter("give --database-url or set SUPABASE_DB_URL", param_hint="--database-url")
    directory = data_dir if data_dir is not None else current.home / "sync" / str(port)
    secret = None if insecure or current.electric_secret is None else current.electric_secret.get_secret_value()
    config = SyncServerConfig(
        database_url=url.get_secret_value(),
        data_dir=directory,
        secret=secret or None,
        insecure=insecure,
        tables=tuple(table) if table else default_served_tables(),
        allow_origins=tuple(allow_origin or ()),
        live_timeout=live_timeout,
        sse_timeout=sse_timeout,
        snapshot_workers=snapshot_workers,
        max_shapes=max_shapes,
        snapshot_timeout_ms=int(snapshot_timeout * 1000),
    )
    # A clear one-line error now rather than a failed startup.
    check_sync_database(url.get_secret_value(), config.tables)
    typer.echo(f"pgferry sync server on http://{host}:{port}/v1/shape (shape logs in {directory})", err=True)
    serve_many_connections(create_sync_app(config), host, port, log_level)
