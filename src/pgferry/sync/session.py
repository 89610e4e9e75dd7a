"""SQL sessions of the dev sync server: how values print, and how long one statement may run.

Both the snapshot connection and the replication stream must print values the same way, or a row's text in the
snapshot would differ from the same row's text in the log; every connection the server opens uses these settings.
Every connection also has a statement timeout, so no shape (however its where clause is written) can hold a
database core or a server thread for long: the budget is part of the cost limits of the Shape API.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgferry.db.connect import connect
from pgferry.replication._conn import conninfo

__all__ = ["SESSION_SETTINGS", "connect_sql", "session_options"]

SESSION_SETTINGS: dict[str, str] = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
}
DEFAULT_STATEMENT_TIMEOUT_MS = 30_000


def session_options() -> str:
    return " ".join(f"-c {name}={value.replace(' ', '')}" for name, value in SESSION_SETTINGS.items())


def replication_dsn(url: str) -> str:
    """``url`` as a replication-reader conninfo with :data:`SESSION_SETTINGS`, so values arriving by replication
    print exactly as the SQL sessions print them (the sync and Realtime feeds both need that)."""
    params = conninfo_to_dict(conninfo(url))
    params["options"] = session_options()
    return make_conninfo("", **params)


def connect_sql(url: str, *, statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS) -> psycopg.Connection[Any]:
    conn = connect(url, application_name="pgferry-sync", options=session_options())
    conn.execute(f"set statement_timeout = {int(statement_timeout_ms)}")
    return conn
