"""PostgREST's RPC route on a real local database, for running Edge Functions end to end (tests and examples).

An Edge Function calls ``supabase.rpc('match_tasks', …)`` with the caller's token; on Supabase, PostgREST
verifies that token, switches to its role with ``request.jwt.claims`` set, and runs the function under row-level
security. PostgREST cannot run here, so this app does the same for an allow-list of functions: ``POST
/rest/v1/rpc/<function>`` with a JSON object of named arguments; the bearer token is verified by
:class:`pgferry.sync.auth.TokenVerifier` and the call runs in :func:`pgferry.db.rls.scoped_transaction`, exactly
as a PostgREST request would, against the real database with its real policies. Errors use PostgREST's body
``{"code", "details", "hint", "message"}``: 401 ``PGRST303`` "JWT expired", 401 ``PGRST301`` for other token
problems, 401 ``42501`` without a token (``anon`` may not execute the platform's functions), 404 ``PGRST202`` for
a function outside the list, 400 with the SQLSTATE for database errors.

Test tooling only: never imported by library code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from typing import Any

import psycopg
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pgferry.db.rls import scoped_transaction
from pgferry.sync.auth import ExpiredTokenError, InvalidTokenError, TokenVerifier, bearer_token

__all__ = ["rpc_app"]


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "details": None, "hint": None, "message": message}, status_code=status)


def rpc_app(database_url: str, verifier: TokenVerifier, functions: Iterable[str] = ("match_tasks",)) -> Starlette:
    """The ASGI app serving ``POST /rest/v1/rpc/<name>`` for ``functions`` in schema ``public``."""
    allowed = frozenset(functions)

    def call(name: str, args: Mapping[str, Any], claims: Mapping[str, Any]) -> list[dict[str, Any]]:
        named = sql.SQL(", ").join(sql.SQL("{} => %s").format(sql.Identifier(key)) for key in args)
        query = sql.SQL("select * from public.{}({})").format(sql.Identifier(name), named)
        values = [json.dumps(v) if isinstance(v, list) else v for v in args.values()]  # vectors as '[...]' literals
        with psycopg.connect(database_url, autocommit=True) as conn, scoped_transaction(conn, claims):
            cursor = conn.execute(query, values)
            columns = [c.name for c in cursor.description or []]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    async def rpc(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if name not in allowed:
            return _error(404, "PGRST202", f"Could not find the function public.{name} in the schema cache")
        if not request.headers.get("apikey"):
            return _error(401, "PGRST301", "No API key found in request")
        authorization = request.headers.get("authorization")
        if not authorization:
            return _error(401, "42501", f"permission denied for function {name}")
        try:
            user = await verifier.verify(bearer_token(authorization))
        except ExpiredTokenError:
            return _error(401, "PGRST303", "JWT expired")
        except InvalidTokenError as exc:
            return _error(401, "PGRST301", exc.reason)
        try:
            args = await request.json()
        except ValueError:
            return _error(400, "PGRST102", "Empty or invalid json")
        if not isinstance(args, dict):
            return _error(400, "PGRST102", "Arguments must be a JSON object")
        try:
            rows = await asyncio.to_thread(call, name, args, dict(user.claims))
        except psycopg.Error as exc:
            return _error(400, exc.sqlstate or "XX000", type(exc).__name__)
        return JSONResponse(json.loads(json.dumps(rows, default=str)))

    return Starlette(routes=[Route("/rest/v1/rpc/{name}", rpc, methods=["POST"])])
