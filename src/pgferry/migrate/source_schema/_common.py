"""Shared by the schema steps: Supabase-managed schemas, the errors, and connections that never echo a password."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgferry.db.connect import connect
from pgferry.errors import PgferryError
from pgferry.redaction import redact_text

MANAGED_SCHEMAS: frozenset[str] = frozenset(
    {
        # Supabase platform services (supabase/postgres init scripts and the services' own migrations).
        "auth",  # Supabase Auth (GoTrue)
        "storage",  # Supabase Storage
        "realtime",  # Realtime: messages, subscriptions
        "_realtime",  # Realtime's tenant metadata on self-hosted stacks
        "extensions",  # where Supabase installs extensions
        "graphql",  # pg_graphql
        "graphql_public",  # pg_graphql's public entry point
        "vault",  # supabase_vault
        "pgsodium",  # pgsodium (and its key tables)
        "pgsodium_masks",  # pgsodium's generated masking views
        "net",  # pg_net
        "cron",  # pg_cron
        "supabase_functions",  # database webhooks
        "supabase_migrations",  # `supabase db push` bookkeeping
        "pgbouncer",  # the pooler's auth function
        "_analytics",  # Logflare on self-hosted stacks
        "pgtle",  # pg_tle
        "_supavisor",  # Supavisor on self-hosted stacks
        "pgferry",  # pgferry's own state and Alembic version table
        # PostgreSQL's own.
        "information_schema",
        "pg_catalog",
        "pg_toast",
    }
)
"""Schemas that belong to Supabase or PostgreSQL, never dumped from the source nor created on the target.

On a real Supabase project each of these exists already and is owned by a platform role; a Neon database
that happens to have one (an app that mimicked Supabase's ``auth.users``, say) must not be able to
overwrite it. ``pgferry`` is here because it holds the migration's own state.
"""

SERVER_MANAGED_COLUMN_OPTIONS: frozenset[str] = frozenset({"pg_attver"})
"""Column options (``attoptions``) a server sets on its own, which must not travel with the schema.

The Debian PostgreSQL 15 build used on this team's machines stamps every column with ``pg_attver=<n>``. Its
own pg_dump hides the option, but a newer pg_dump (the one we must use for newer sources) prints it as
``ALTER TABLE ... ALTER COLUMN ... SET (pg_attver=...)``, which every other server rejects with
``unrecognized parameter "pg_attver"`` and the same build overwrites anyway.
"""

_PG_CATALOG = "pg_catalog"
_DEFAULT_PUBLIC_COMMENT = "standard public schema"


class SchemaDumpError(PgferryError):
    """The source's schema could not be dumped (no suitable pg_dump, connection refused, pg_dump failed)."""


class SchemaRewriteError(PgferryError):
    """The dump cannot be adapted to the target without guessing (an ambiguous extension reference)."""


class SchemaApplyError(PgferryError):
    """Applying the schema to the target failed; the target was left unchanged (one transaction).

    ``statement`` is the first line of the failing statement, ``line`` where it starts in the SQL text,
    ``sqlstate`` and ``server_message`` what the server said, ``hint`` what the operator can do about it.
    """

    statement: str
    line: int
    sqlstate: str | None
    server_message: str
    hint: str

    def __init__(self, statement: str, line: int, sqlstate: str | None, server_message: str, hint: str) -> None:
        super().__init__(statement, line, sqlstate, server_message, hint)
        self.statement = statement
        self.line = line
        self.sqlstate = sqlstate
        self.server_message = server_message
        self.hint = hint

    def __str__(self) -> str:
        where = f"line {self.line}: {self.statement}" if self.statement else "the schema SQL"
        text = (
            f"applying the schema failed at {where} — {self.server_message}; {self.hint}; the schema changes "
            "were rolled back (one transaction): fix that and rerun `pgferry migrate run`"
        )
        return _one_line(text)


def _one_line(text: str) -> str:
    """PgferryError messages are printed as one line by the CLI."""
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------------
# Connections
# ------------------------------------------------------------------------------------------------------


def _password(url: str) -> str | None:
    try:
        value = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        return None
    return str(value) if value else None


def _scrub(text: str, url: str) -> str:
    """``text`` with the URL's password removed, however it got there; first line only."""
    lines = [line.strip() for line in redact_text(text, _password(url)).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _connect(url: str, error: type[PgferryError], side: str) -> psycopg.Connection[Any]:
    try:
        return connect(url, application_name="pgferry-schema")
    except psycopg.Error as exc:
        raise error(f"cannot connect to the {side} database: {_scrub(str(exc), url)}") from exc


def _server_major(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select current_setting('server_version_num')::int").fetchone()
    assert row is not None
    return int(row[0]) // 10000
