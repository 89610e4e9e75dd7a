"""Opening a PostgreSQL connection: one function, one set of timeouts, for every part of pgferry.

Each capability used to call ``psycopg.connect`` with its own ideas of timeouts (none, 3 s, 10 s), so a
server that accepted TCP and never answered hung some commands forever while others gave up at once. Here
every connection gets a connect timeout, TCP keepalives (a dead peer behind a NAT is noticed in about a
minute, not hours) and an ``application_name`` that says which part of pgferry opened it, which is what an
operator sees in ``pg_stat_activity`` and on Supabase's dashboard. Replication connections
(:mod:`pgferry.replication._conn`) build on the same :data:`CONNECT_PARAMS`.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg

__all__ = ["CONNECT_PARAMS", "connect"]

CONNECT_PARAMS: Final[dict[str, Any]] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
"""libpq parameters every pgferry connection uses unless the caller's URL or arguments say otherwise."""


def connect(
    url: str, *, application_name: str = "pgferry", autocommit: bool = True, **params: Any
) -> psycopg.Connection[Any]:
    """A new connection to ``url``; ``params`` (libpq keywords) override :data:`CONNECT_PARAMS`."""
    return psycopg.connect(
        url, autocommit=autocommit, application_name=application_name, **{**CONNECT_PARAMS, **params}
    )
