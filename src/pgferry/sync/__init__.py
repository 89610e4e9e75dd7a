"""ElectricSQL sync: the HTTP Shape protocol, the dev sync server and the authorizing shape proxy.

The public API (the CLI's ``pgferry sync serve`` / ``proxy`` are thin layers over it)::

    from pgferry.sync import ProxyConfig, SyncServerConfig, TokenVerifier, create_proxy_app, create_sync_app

    sync_app = create_sync_app(SyncServerConfig(database_url=url, data_dir=path, secret=electric_secret))
    proxy_app = create_proxy_app(
        ProxyConfig(upstream="http://127.0.0.1:3000", verifier=TokenVerifier(jwt_secret=jwt_secret),
                    electric_secret=electric_secret)
    )
    # both are ASGI apps: uvicorn.run(proxy_app, …), or mount them in your own Starlette/FastAPI app

:class:`SyncServer` and :class:`ShapeProxy` are the same apps as objects (their HTTP handlers are methods), for
callers that want to reach their parts. Every client mistake is a :class:`ProtocolError` (a 4xx in Electric's
JSON error body); every configuration mistake a :class:`~pgferry.errors.ConfigError`.

The modules behind it:

- :mod:`~pgferry.sync.protocol` — offsets, shape definitions, messages and headers (pure).
- :mod:`~pgferry.sync.where` — the where-clause subset: parsed into an AST, rendered back, never pasted.
- :mod:`~pgferry.sync.shapes`, :mod:`~pgferry.sync.store`, :mod:`~pgferry.sync.feed`,
  :mod:`~pgferry.sync.server` — the dev server: shapes from a snapshot plus the replication stream, logs on disk.
- :mod:`~pgferry.sync.auth`, :mod:`~pgferry.sync.proxy` — Supabase token verification and the proxy that scopes
  every shape to its user before it reaches Electric (or the dev server).
- :mod:`~pgferry.sync.write_api`, :mod:`~pgferry.sync.mutations`, :mod:`~pgferry.sync.writer` — the write API
  (``POST /v1/mutations``): batches checked, applied in one transaction as the user, once per mutation id, and
  answered with the txid the shape log shows. The proxy serves it when given a :class:`WriteApiConfig`;
  :func:`create_write_app` mounts it alone.
- :mod:`~pgferry.sync.errors` — the sync layer's errors (token errors live with the verifier in ``auth``).

Names are imported on first use (PEP 562), so ``import pgferry.sync.auth`` (used by ``pgferry.supabase``) does not
load the servers. Must not touch migrations or the schema: sync reads the platform's tables, it never defines
them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgferry.sync.auth import (
        AuthenticatedUser,
        ExpiredTokenError,
        InvalidTokenError,
        KeySetUnavailableError,
        MissingTokenError,
        NotAUserTokenError,
        TokenVerifier,
    )
    from pgferry.sync.errors import (
        ForbiddenShapeError,
        MutationRejectedError,
        ProtocolError,
        ShapeUnavailableError,
        SyncDatabaseError,
        TooManyRequestsError,
        UnauthorizedError,
        UnsupportedFeatureError,
        WhereClauseError,
    )
    from pgferry.sync.feed import check_sync_database
    from pgferry.sync.limits import UserLimits
    from pgferry.sync.proxy import ProxyConfig, ShapeProxy, TableRule, create_proxy_app, parse_column_rules
    from pgferry.sync.server import SyncServer, SyncServerConfig, create_sync_app
    from pgferry.sync.tables import default_served_tables
    from pgferry.sync.write_api import WriteApi, WriteApiConfig, create_write_app
    from pgferry.sync.writer import BatchRejectedError

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "AuthenticatedUser": "pgferry.sync.auth",
    "ExpiredTokenError": "pgferry.sync.auth",
    "InvalidTokenError": "pgferry.sync.auth",
    "KeySetUnavailableError": "pgferry.sync.auth",
    "MissingTokenError": "pgferry.sync.auth",
    "NotAUserTokenError": "pgferry.sync.auth",
    "TokenVerifier": "pgferry.sync.auth",
    "ForbiddenShapeError": "pgferry.sync.errors",
    "ProtocolError": "pgferry.sync.errors",
    "ShapeUnavailableError": "pgferry.sync.errors",
    "SyncDatabaseError": "pgferry.sync.errors",
    "TooManyRequestsError": "pgferry.sync.errors",
    "UnauthorizedError": "pgferry.sync.errors",
    "UnsupportedFeatureError": "pgferry.sync.errors",
    "WhereClauseError": "pgferry.sync.errors",
    "check_sync_database": "pgferry.sync.feed",
    "UserLimits": "pgferry.sync.limits",
    "ProxyConfig": "pgferry.sync.proxy",
    "ShapeProxy": "pgferry.sync.proxy",
    "TableRule": "pgferry.sync.proxy",
    "create_proxy_app": "pgferry.sync.proxy",
    "parse_column_rules": "pgferry.sync.proxy",
    "SyncServer": "pgferry.sync.server",
    "SyncServerConfig": "pgferry.sync.server",
    "create_sync_app": "pgferry.sync.server",
    "default_served_tables": "pgferry.sync.tables",
    "MutationRejectedError": "pgferry.sync.errors",
    "BatchRejectedError": "pgferry.sync.writer",
    "WriteApi": "pgferry.sync.write_api",
    "WriteApiConfig": "pgferry.sync.write_api",
    "create_write_app": "pgferry.sync.write_api",
}

__all__ = [
    "AuthenticatedUser",
    "BatchRejectedError",
    "ExpiredTokenError",
    "ForbiddenShapeError",
    "InvalidTokenError",
    "KeySetUnavailableError",
    "MissingTokenError",
    "MutationRejectedError",
    "NotAUserTokenError",
    "ProtocolError",
    "ProxyConfig",
    "ShapeProxy",
    "ShapeUnavailableError",
    "SyncDatabaseError",
    "SyncServer",
    "SyncServerConfig",
    "TableRule",
    "TokenVerifier",
    "TooManyRequestsError",
    "UnauthorizedError",
    "UnsupportedFeatureError",
    "UserLimits",
    "WhereClauseError",
    "WriteApi",
    "WriteApiConfig",
    "check_sync_database",
    "create_proxy_app",
    "create_sync_app",
    "create_write_app",
    "default_served_tables",
    "parse_column_rules",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pgferry.sync' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
