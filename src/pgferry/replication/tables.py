"""Preparing tables for a publication: membership and ``REPLICA IDENTITY FULL``, without queueing writers.

Two facts of logical decoding make *when* this happens matter to every consumer:

* a change is published only if its table was in the publication when the change was *written*: a transaction
  that wrote a row before its table joined, and commits after, streams without that row. A consumer that lines
  a snapshot up with the stream must therefore not take a snapshot of a freshly joined table until every
  transaction that was running at the join has ended. :attr:`PublishedTables.horizon` is that point: once the
  oldest running transaction id is at or past it (:func:`passed_horizon`), no such transaction is left.
* ``ALTER TABLE … REPLICA IDENTITY`` takes an ACCESS EXCLUSIVE lock. Waiting for it behind one open
  transaction queues every later reader and writer of the table behind the ALTER. So it is not even attempted
  while another session holds a lock on the table, and otherwise runs with a short ``lock_timeout``; either way
  the table is reported *pending* (to be retried later) rather than waited for.

Adding a table to a publication takes only a SHARE UPDATE EXCLUSIVE lock, which does not conflict with writers;
it gets the same short ``lock_timeout`` so that a long VACUUM cannot hold it up either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg import sql

from pgferry.replication._conn import ReplicationError
from pgferry.replication.slots import _resolve_table, publication_tables

__all__ = ["PublishedTables", "current_horizon", "passed_horizon", "publish_tables"]

_log = structlog.get_logger("pgferry.replication.tables")


@dataclass(frozen=True)
class PublishedTables:
    """What :func:`publish_tables` achieved.

    ``ready``: in the publication with REPLICA IDENTITY FULL. ``pending``: ``schema.table`` → why not (a lock
    that was not granted in time; try again later). ``horizon``: a transaction id (64-bit, as
    ``pg_current_xact_id()``); transactions below it may have written to these tables before they joined.
    """

    ready: tuple[str, ...]
    pending: dict[str, str] = field(default_factory=dict)
    horizon: int = 0


def current_horizon(conn: psycopg.Connection[Any]) -> int:
    """The next transaction id not yet assigned: every transaction running now has a lower one."""
    row = conn.execute("select pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text").fetchone()
    assert row is not None
    return int(row[0])


def passed_horizon(conn: psycopg.Connection[Any], horizon: int) -> bool:
    """Whether every transaction with an id below ``horizon`` has ended (committed or not)."""
    row = conn.execute("select pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text").fetchone()
    assert row is not None
    return int(row[0]) >= horizon


def _holders(conn: psycopg.Connection[Any], schema: str, table: str) -> list[tuple[Any, ...]]:
    """Other sessions holding a lock on the table: (pid, state, transaction start)."""
    return conn.execute(
        "select distinct a.pid, a.state, to_char(a.xact_start, 'YYYY-MM-DD HH24:MI:SS') "
        "from pg_catalog.pg_locks l join pg_catalog.pg_stat_activity a on a.pid = l.pid "
        "where l.relation = pg_catalog.to_regclass(%s) and l.granted and a.pid <> pg_catalog.pg_backend_pid() "
        "order by 1 limit 5",
        [sql.Identifier(schema, table).as_string(conn)],
    ).fetchall()


def _blockers(conn: psycopg.Connection[Any], schema: str, table: str) -> str:
    """Who holds locks on the table, for a report an operator can act on (pid, state, since when)."""
    rows = _holders(conn, schema, table)
    if not rows:
        return "a lock on the table was not granted in time"
    held = ", ".join(f"pid {pid} ({state or 'unknown'} since {since or '?'})" for pid, state, since in rows)
    return f"waiting for a lock held by {held}"


def _set_full_identity(conn: psycopg.Connection[Any], schema: str, table: str, lock_timeout_ms: int) -> str | None:
    """``REPLICA IDENTITY FULL`` unless it is already set; the reason it could not be set, or None."""
    row = conn.execute(
        "select c.relreplident from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = %s and c.relname = %s",
        [schema, table],
    ).fetchone()
    if row is not None and row[0] == "f":
        return None
    if _holders(conn, schema, table):
        # Asking for the lock now would queue every new reader and writer of the table behind the ALTER for as
        # long as the lock_timeout; a transaction that holds a lock usually keeps it longer than that anyway.
        return _blockers(conn, schema, table)
    try:
        with conn.transaction():
            conn.execute(sql.SQL("set local lock_timeout = {}").format(sql.Literal(f"{lock_timeout_ms}ms")))
            conn.execute(sql.SQL("alter table {} replica identity full").format(sql.Identifier(schema, table)))
    except pg_errors.LockNotAvailable:
        return _blockers(conn, schema, table)
    _log.info("replication.replica_identity_full", table=f"{schema}.{table}")
    return None


def publish_tables(
    conn: psycopg.Connection[Any],
    publication: str,
    tables: Sequence[str],
    *,
    lock_timeout_ms: int = 200,
    via_partition_root: bool = True,
) -> PublishedTables:
    """Make ``publication`` exist and cover ``tables`` with REPLICA IDENTITY FULL, never waiting for a lock
    longer than ``lock_timeout_ms``.

    Tables whose identity cannot be changed in time are still added to the publication (so their horizon
    starts now) and reported pending. Idempotent; never removes a table. ``conn`` must be in autocommit mode.
    """
    resolved = [_resolve_table(conn, name) for name in tables]
    pending: dict[str, str] = {}
    for schema, table in resolved:
        problem = _set_full_identity(conn, schema, table, lock_timeout_ms)
        if problem is not None:
            pending[f"{schema}.{table}"] = problem
    ident = sql.Identifier(publication)
    try:
        with conn.transaction():
            conn.execute(sql.SQL("set local lock_timeout = {}").format(sql.Literal(f"{lock_timeout_ms}ms")))
            exists = conn.execute("select 1 from pg_catalog.pg_publication where pubname = %s", [publication])
            if exists.fetchone() is None:
                option = sql.SQL(" with (publish_via_partition_root = true)") if via_partition_root else sql.SQL("")
                conn.execute(sql.SQL("create publication {}").format(ident) + option)
            present = set(publication_tables(conn, publication))
            missing = [(s, t) for s, t in resolved if f"{s}.{t}" not in present]
            if missing:
                names = sql.SQL(", ").join(sql.Identifier(s, t) for s, t in missing)
                conn.execute(sql.SQL("alter publication {} add table {}").format(ident, names))
    except pg_errors.LockNotAvailable:
        for schema, table in resolved:
            pending.setdefault(f"{schema}.{table}", "adding it to the publication " + _blockers(conn, schema, table))
    except pg_errors.DuplicateObject as exc:  # someone else added them at the same moment: look again next time
        raise ReplicationError(f"publication {publication!r} changed while tables were added; retry") from exc
    horizon = current_horizon(conn)  # read after the publication change committed
    ready = tuple(f"{s}.{t}" for s, t in resolved if f"{s}.{t}" not in pending)
    return PublishedTables(ready=ready, pending=pending, horizon=horizon)
