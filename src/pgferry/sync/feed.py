"""The dev sync server's replication side: one slot, one thread, every shape fed from it.

The server owns a slot and a publication (names kept in ``<data-dir>/state.json`` so a restart resumes the same
slot). The publication and its tables are managed by :mod:`pgferry.replication` (:func:`publish_tables`), through
the server's table allow-list (:class:`~pgferry.sync.tables.ServedTables`), before the feed starts. Each committed
transaction is applied to the shape logs and fsynced *before* it is confirmed to the
server, so a crash at any point redelivers what was not stored and shapes skip what they already have.

If the slot disappeared while the server was down (dropped by an operator, or invalidated for lack of WAL), the
logs cannot be continued: every shape is cleared and clients get 409 must-refetch, exactly what Electric does.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import structlog

from pgferry.errors import ConfigError
from pgferry.replication import ReplicationReader, create_slot, get_slot, slot_lag_bytes
from pgferry.replication.follow import FollowedFeed, SlotFollower
from pgferry.sync import protocol as p
from pgferry.sync.errors import SyncDatabaseError, describe_error
from pgferry.sync.evaluate import WhereEvaluator
from pgferry.sync.session import connect_sql, replication_dsn
from pgferry.sync.shapes import ShapeManager
from pgferry.sync.store import write_json_atomic
from pgferry.sync.tables import ServedTables

__all__ = ["ReplicationFeed", "ServerState", "prepare_server_state"]

_log = structlog.get_logger("pgferry.sync.feed")
_MAX_BATCH = 256


@dataclass(frozen=True)
class ServerState:
    slot: str
    publication: str
    system_identifier: str
    database: str
    start_lsn: int


def _identity(conn: psycopg.Connection[Any]) -> tuple[str, str]:
    row = conn.execute("select system_identifier::text, current_database() from pg_catalog.pg_control_system()")
    values = row.fetchone()
    assert values is not None
    return str(values[0]), str(values[1])


def check_sync_database(url: str, tables: ServedTables | Iterable[str | p.TableName] | None = None) -> None:
    """Fail early, in one line, on a database the server could only fail on later: Electric needs the same
    (logical replication, a role that may use it); and every table to serve (a :class:`ServedTables` or the
    names a :class:`~pgferry.sync.server.SyncServerConfig` lists) must exist."""
    if tables is not None and not isinstance(tables, ServedTables):
        tables = ServedTables(tuple(tables))
    with connect_sql(url) as conn:
        _check_sync_connection(conn)
        for name in tables.names if tables is not None else ():
            row = conn.execute("select pg_catalog.to_regclass(%s)", [name.qualified]).fetchone()
            if row is None or row[0] is None:
                raise ConfigError("--table", f"table {name} does not exist; create it before starting the sync server")


def _check_sync_connection(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("show wal_level").fetchone()
    wal_level = str(row[0]) if row else "?"
    if wal_level != "logical":
        raise SyncDatabaseError(
            f"the database runs with wal_level = {wal_level}; the sync server reads logical replication: "
            "run ALTER SYSTEM SET wal_level = logical and restart PostgreSQL (Supabase and Neon: enable "
            "logical replication in the project settings)"
        )
    row = conn.execute(
        "select rolname, rolreplication or rolsuper from pg_catalog.pg_roles where rolname = current_user"
    ).fetchone()
    if row is not None and not row[1]:
        raise SyncDatabaseError(
            f"role {row[0]!r} may not use replication; connect as a role that may (on Supabase the direct "
            f"connection's postgres role) or run ALTER ROLE {row[0]} WITH REPLICATION"
        )


def prepare_server_state(
    url: str, data_dir: Path, tables: ServedTables, manager: ShapeManager | None = None
) -> ServerState:
    """Find or create the slot and publication this data directory uses (check it belongs to this database) and
    prepare the served tables for it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    state_path = data_dir / "state.json"
    conn = connect_sql(url)
    try:
        _check_sync_connection(conn)
        system_id, database = _identity(conn)
        stored: dict[str, Any] | None = json.loads(state_path.read_text()) if state_path.exists() else None
        if stored is not None and (stored.get("system_identifier"), stored.get("database")) != (system_id, database):
            _log.warning(
                "sync.data_dir_from_other_database",
                data_dir=str(data_dir),
                hint="shapes in it belong to another database; starting fresh",
            )
            stored = None
            if manager is not None:
                manager.clear()
        if stored is None:
            suffix = secrets.token_hex(4)
            stored = {
                "slot": f"pgferry_sync_{suffix}",
                "publication": f"pgferry_sync_{suffix}",
                "system_identifier": system_id,
                "database": database,
            }
        slot, publication = str(stored["slot"]), str(stored["publication"])
        tables.prepare(conn, publication)
        slot_state = get_slot(conn, slot)
    finally:
        conn.close()
    if slot_state is None:
        if manager is not None:
            manager.clear()
        _log.info("sync.creating_slot", slot=slot, note="PostgreSQL waits for every open write transaction to end")
        info = create_slot(url, slot)
        start_lsn = int(info.consistent_point)
    else:
        start_lsn = int(slot_state.confirmed_flush_lsn or 0)
    write_json_atomic(state_path, stored)
    return ServerState(slot, publication, system_id, database, start_lsn)


class ReplicationFeed(FollowedFeed):
    """Runs the replication reader in a thread and applies each transaction to the shapes."""

    def __init__(self, url: str, manager: ShapeManager, state: ServerState) -> None:
        self._url = url
        self._manager = manager
        self._state = state
        self._follower = SlotFollower(
            replication_dsn(url),
            self._stream,
            thread_name="pgferry-sync-feed",
            log=_log,
            log_event="sync.feed_restarting",
            describe=describe_error,  # never row values: health and logs are not for them
        )

    def lag_bytes(self) -> int | None:
        try:
            with connect_sql(self._url) as conn:
                return slot_lag_bytes(conn, self._state.slot)
        except Exception:  # a metric must not take the server down
            return None

    def _stream(self, reader: ReplicationReader) -> None:
        """Apply transactions in batches of whatever has arrived (group commit), confirming after each batch."""
        evaluator = WhereEvaluator(self._url)
        try:
            reader.start(self._state.slot, [self._state.publication])
            self._follower.mark_active()
            while not self._follower.stopping:
                batch = reader.next_batch(_MAX_BATCH)
                if batch:
                    self._manager.apply_transactions(batch, evaluator)
                    reader.confirm(batch[-1])
                # Every transaction the reader delivered is applied now, so a keepalive position it saw between them
                # is processed WAL: global_last_seen_lsn moves past commits that touched no shape, and while idle.
                self._manager.advance_processed(int(reader.idle_position))
        finally:
            evaluator.close()
