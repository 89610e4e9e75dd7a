"""``pgferry dev``: the local stack of two real PostgreSQL servers."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pgferry.cli.common import settings, stack
from pgferry.errors import PgferryError
from pgferry.localstack.stack import (
    DEFAULT_API_PORT,
    DEFAULT_POOLER_PORT,
    DEFAULT_PROXY_PORT,
    DEFAULT_SOURCE_PORT,
    DEFAULT_SYNC_PORT,
    DEFAULT_TARGET_PORT,
    DEV_SUPABASE_URL,
    LocalStack,
    ServerStatus,
    StackState,
)

app = typer.Typer(help="Local stack: `source` stands in for Neon, `target` for Supabase.", no_args_is_help=True)
console = Console()


def print_status(servers: list[ServerStatus], *, as_json: bool, api: dict[str, str] | None = None) -> None:
    """``api``: the Supabase-style entry points (``api`` URL, ``anon_key``), added to the JSON output."""
    if as_json:
        payload: dict[str, object] = {server.name: server.url for server in servers}
        payload.update(api or {})
        payload["servers"] = [asdict(server) for server in servers]
        typer.echo(json.dumps(payload, indent=2))
        return
    table = Table(title="pgferry local stack")
    for column in ("server", "stands in for", "url", "version", "state"):
        # URLs are meant to be copied: wrap them rather than cut them with an ellipsis.
        table.add_column(column, overflow="fold", no_wrap=False)
    role = {
        "source": "Neon",
        "target": "Supabase",
        "pooler": "Supavisor 6543 (PgBouncer, transaction mode)",
        "sync": "Electric",
        "proxy": "shape proxy",
        "realtime": "Supabase Realtime",
    }
    for server in servers:
        state = "up" if server.reachable else ("starting" if server.running else "stopped")
        table.add_row(server.name, role[server.name], server.url, server.version or "-", state)
    console.print(table)


@app.command()
def up(
    source_port: Annotated[int, typer.Option(help="TCP port of the source (Neon) server.")] = DEFAULT_SOURCE_PORT,
    target_port: Annotated[int, typer.Option(help="TCP port of the target (Supabase) server.")] = DEFAULT_TARGET_PORT,
    sync_port: Annotated[int, typer.Option(help="TCP port of the dev sync server (Electric).")] = DEFAULT_SYNC_PORT,
    proxy_port: Annotated[int, typer.Option(help="TCP port of the shape proxy.")] = DEFAULT_PROXY_PORT,
    pooler_port: Annotated[
        int, typer.Option(help="TCP port of PgBouncer in transaction mode (Supavisor's 6543).")
    ] = DEFAULT_POOLER_PORT,
    api_port: Annotated[
        int, typer.Option(help="TCP port of the Supabase-style API (Realtime at /realtime/v1).")
    ] = DEFAULT_API_PORT,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Create (first run) and start both servers, apply the Neon schema and the Supabase migrations, then start
    PgBouncer in transaction mode in front of the target (Supavisor's port 6543), the dev sync server (Electric's
    Shape API on the target), the shape proxy in front of it and the Realtime server on the API port."""
    cfg = settings()
    bindir = str(cfg.pg_bindir) if cfg.pg_bindir else None
    local = stack(cfg.home)
    servers = local.up(
        source_port=source_port,
        target_port=target_port,
        bindir=bindir,
        sync_port=sync_port,
        proxy_port=proxy_port,
        pooler_port=pooler_port,
        api_port=api_port,
    )
    print_status(servers, as_json=as_json, api=_api(local))


def _api(local: LocalStack) -> dict[str, str]:
    return {"api": local.api_url(), "anon_key": local.anon_key()}


@app.command()
def down(
    destroy: Annotated[bool, typer.Option(help="Also delete the servers' data.")] = False,
) -> None:
    """Stop both servers (their data stays unless --destroy)."""
    stack().down(destroy=destroy)
    typer.echo("local stack destroyed" if destroy else "local stack stopped")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Show the servers, their URLs and whether they answer."""
    local = stack()
    print_status(local.status(), as_json=as_json, api=_api(local))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def psql(
    ctx: typer.Context,
    server: Annotated[str, typer.Argument(help="source or target")] = "target",
) -> None:
    """Open psql on a server of the stack; extra arguments go to psql."""
    local = stack()
    url = local.url(server)
    state = StackState.load(local.state_file)
    candidates = [os.path.join(state.bindir, "psql")] if state else []
    found = shutil.which("psql")
    if found:
        candidates.append(found)
    for program in candidates:
        if os.path.exists(program):
            os.execv(program, [program, url, *ctx.args])  # noqa: S606 - replace this process with psql
    raise PgferryError("psql not found: install the PostgreSQL client (apt install postgresql-client)")


@app.command()
def token(
    user: Annotated[str, typer.Option(help="The user id (a UUID) the token is for: its `sub`.")],
    expires_in: Annotated[int, typer.Option(min=1, help="Seconds until the token expires.")] = 3600,
    email: Annotated[str | None, typer.Option(help="Optional `email` claim.")] = None,
) -> None:
    """Print an access token for the local stack, signed like Supabase Auth signs one, for the shape proxy."""
    import time
    import uuid

    import jwt

    try:
        subject = str(uuid.UUID(user))
    except ValueError as exc:
        raise typer.BadParameter(
            "must be a UUID, like 6f1c2d4e-0000-4000-8000-000000000001", param_hint="--user"
        ) from exc
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": subject,
        "role": "authenticated",
        "aud": "authenticated",
        "iss": f"{DEV_SUPABASE_URL}/auth/v1",
        "iat": now,
        "exp": now + expires_in,
        "aal": "aal1",
        "session_id": str(uuid.uuid4()),
    }
    if email:
        claims["email"] = email
    typer.echo(jwt.encode(claims, stack().jwt_secret(), algorithm="HS256"))
