"""The Supabase-compatible baseline for local PostgreSQL servers.

The migrations are written for Supabase: policies call ``auth.uid()``, grants name ``authenticated``, tables
join ``supabase_realtime``. On a local server none of that exists, so this baseline provides it first. It is
the one piece of pgferry that creates objects in ``auth``; on a real project those belong to Supabase Auth,
and touching them breaks the project. So the baseline marks the ``auth`` schema it creates and refuses to run
where an unmarked ``auth`` schema already exists.
"""

from __future__ import annotations

from importlib import resources

import psycopg

from pgferry.db.connect import connect
from pgferry.errors import PgferryError

BASELINE_MARKER = "pgferry local baseline"


class BaselineRefusedError(PgferryError):
    """The database already has a real Supabase ``auth`` schema."""


def baseline_sql() -> str:
    return resources.files("pgferry.supabase").joinpath("sql/local_baseline.sql").read_text()


def auth_schema_state(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    """``"absent"``, ``"pgferry"`` (our own baseline) or ``"supabase"`` (anything else)."""
    row = conn.execute(
        "select obj_description(oid, 'pg_namespace') from pg_namespace where nspname = 'auth'"
    ).fetchone()
    if row is None:
        return "absent"
    comment = row[0] or ""
    return "pgferry" if str(comment).startswith(BASELINE_MARKER) else "supabase"


def apply_local_baseline(conninfo: str) -> bool:
    """Apply the baseline to the database at ``conninfo``; ``False`` when it was already there.

    Runs in one transaction, so a failure leaves the database as it was.
    """
    with connect(conninfo, application_name="pgferry-baseline", autocommit=False) as conn:
        state = auth_schema_state(conn)
        if state == "supabase":
            raise BaselineRefusedError(
                "this database already has an `auth` schema that pgferry did not create, so it looks like a "
                "real Supabase project; the local baseline is only for local servers and was not applied "
                "(run `pgferry db upgrade` against it directly)"
            )
        already = state == "pgferry"
        # Roles are cluster-wide: two databases getting the baseline at once would race on CREATE ROLE.
        conn.execute("select pg_advisory_xact_lock(hashtext('pgferry.local_baseline'))")
        conn.execute(baseline_sql().encode())
    return not already
