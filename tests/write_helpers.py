"""Helpers for the write-path tests: tokens, a proxy with the write API in front of a real dev sync server."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt

from pgferry.sync import ProxyConfig, SyncServerConfig, TokenVerifier, WriteApiConfig, create_proxy_app, create_sync_app
from pgferry.testing.asgi import ServedApp

JWT_SECRET = "write-path-test-jwt-secret-with-32-characters"
SYNC_SECRET = "write-path-sync-secret-0123456789"
SUPABASE_URL = "http://127.0.0.1:54321"
ALICE = uuid.UUID("00000000-0000-4000-8000-00000000a11c")
BOB = uuid.UUID("00000000-0000-4000-8000-000000000b0b")


def token_for(user: uuid.UUID, *, role: str = "authenticated", expires_in: int = 600) -> str:
    now = int(time.time())
    claims = {
        "sub": str(user),
        "role": role,
        "aud": "authenticated",
        "iss": f"{SUPABASE_URL}/auth/v1",
        "iat": now,
        "exp": now + expires_in,
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def verifier() -> TokenVerifier:
    return TokenVerifier(jwt_secret=JWT_SECRET, supabase_url=SUPABASE_URL)


@dataclass
class WriteStack:
    """A dev sync server (Electric stand-in) on a real database, and the proxy serving shapes and mutations."""

    database_url: str
    sync_url: str
    proxy_url: str

    def post(self, mutations: list[dict[str, Any]], user: uuid.UUID = ALICE, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {token_for(user)}", **kwargs.pop("headers", {})}
        return httpx.post(
            f"{self.proxy_url}/v1/mutations", json={"mutations": mutations}, headers=headers, timeout=30, **kwargs
        )

    def shape(self, user: uuid.UUID = ALICE, **params: Any) -> httpx.Response:
        query = {"table": "tasks", "offset": "-1", **{k: str(v) for k, v in params.items()}}
        return httpx.get(
            f"{self.proxy_url}/v1/shape",
            params=query,
            headers={"authorization": f"Bearer {token_for(user)}"},
            timeout=30,
        )


@contextlib.contextmanager
def write_stack(
    database_url: str, data_dir: Path, *, live_timeout: float = 2, **write_options: Any
) -> Iterator[WriteStack]:
    sync_config = SyncServerConfig(
        database_url=database_url, data_dir=data_dir, live_timeout=live_timeout, secret=SYNC_SECRET
    )
    with ServedApp(create_sync_app(sync_config)) as sync:
        proxy_config = ProxyConfig(
            upstream=sync.url,
            verifier=verifier(),
            electric_secret=SYNC_SECRET,
            write=WriteApiConfig(database_url=database_url, verifier=verifier(), **write_options),
        )
        with ServedApp(create_proxy_app(proxy_config)) as proxy:
            yield WriteStack(database_url, sync.url, proxy.url)


def mutation(op: str, row: dict[str, Any], *, table: str = "public.tasks", **extra: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "op": op, "table": table, "row": row, **extra}
