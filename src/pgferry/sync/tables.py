"""Which tables the dev sync server serves, and whether each is ready to be snapshotted.

The server serves an allow-list of tables (by default the platform's own, from :mod:`pgferry.schema.models`),
never one in pgferry's state schema or in Supabase's ``auth``/``storage`` (and other service) schemas, whatever
the configuration says. Every allowed table is prepared *at server start* (publication membership and
``REPLICA IDENTITY FULL``, through :func:`pgferry.replication.publish_tables`), so a shape request never runs
DDL or waits for a lock: a request used to run ``ALTER TABLE … REPLICA IDENTITY FULL`` and queued every writer
of the table behind it while any transaction on the table was open.

A table that joined the publication is only snapshotted once every transaction that was running at the join
has ended (:func:`pgferry.replication.passed_horizon`): such a transaction may have written rows before the join,
which the stream will never carry, so the snapshot has to see them. Until then, and while a table's preparation
waits for a lock, shape requests on it are answered 503 with ``Retry-After``, which the official client retries.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import psycopg
import structlog

from pgferry.errors import ConfigError
from pgferry.replication import ReplicationError, passed_horizon, publish_tables
from pgferry.sync.errors import ProtocolError, ShapeUnavailableError
from pgferry.sync.protocol import TableName, parse_table_name

__all__ = ["FORBIDDEN_SCHEMAS", "ServedTables", "default_served_tables"]

_log = structlog.get_logger("pgferry.sync.tables")

#: Never served, whatever the configuration: pgferry's own state, Supabase's services, PostgreSQL's catalogs.
FORBIDDEN_SCHEMAS = frozenset(
    {
        "pgferry", "auth", "storage", "realtime", "_realtime", "vault", "extensions", "graphql", "graphql_public",
        "supabase_functions", "supabase_migrations", "net", "cron", "pgsodium", "pgsodium_masks", "pgbouncer",
        "_analytics", "information_schema", "pg_catalog", "pg_toast",
    }
)  # fmt: skip
_LOCK_TIMEOUT_MS = 200
_RETRY_SECONDS = 5.0


def default_served_tables() -> tuple[TableName, ...]:
    """The platform's tables (every table of :mod:`pgferry.schema.models`)."""
    from pgferry.schema.models import Base

    return tuple(TableName(table.schema or "public", table.name) for table in Base.metadata.sorted_tables)


def _forbidden(table: TableName) -> bool:
    return table.schema in FORBIDDEN_SCHEMAS or table.schema.startswith("pg_")


class ServedTables:
    """The allow-list and each table's readiness. Thread-safe: preparation runs in a background thread."""

    def __init__(self, tables: Iterable[TableName | str]) -> None:
        names: list[TableName] = []
        for entry in tables:
            try:
                name = entry if isinstance(entry, TableName) else parse_table_name(entry)
            except ProtocolError:
                raise ConfigError("--table", f"{entry!r} is not a table name like public.tasks") from None
            if _forbidden(name):
                raise ConfigError("--table", f"{name} is in schema {name.schema!r}, which the sync server never serves")
            if name not in names:
                names.append(name)
        if not names:
            raise ConfigError("--table", "the sync server needs at least one table to serve")
        self.names = tuple(names)
        self._lock = threading.Lock()
        self._pending: dict[str, str] = {str(name): "not prepared yet" for name in names}
        self._horizon: dict[str, int] = {}
        self._aligned: set[str] = set()

    # -- preparation (server start, then a background retry while anything is pending) -------------------------

    def prepare(self, conn: psycopg.Connection[Any], publication: str) -> None:
        """Publish what is still pending; raise :class:`ConfigError` for an allowed table that does not exist."""
        with self._lock:
            wanted = [name for name in self.names if str(name) in self._pending]
        if not wanted:
            return
        try:
            result = publish_tables(
                conn, publication, [f'"{n.schema}"."{n.name}"' for n in wanted], lock_timeout_ms=_LOCK_TIMEOUT_MS
            )
        except ReplicationError as exc:
            if "no such table" in str(exc):
                raise ConfigError("--table", f"{exc}; create it before starting the sync server") from None
            raise
        with self._lock:
            for name in wanted:
                key = str(name)
                self._horizon[key] = max(self._horizon.get(key, 0), result.horizon)
                self._aligned.discard(key)
                if key in result.pending:
                    self._pending[key] = result.pending[key]
                else:
                    self._pending.pop(key, None)
        for key, reason in result.pending.items():
            _log.warning(
                "sync.table_not_ready", table=key, reason=reason, retry_seconds=_RETRY_SECONDS,
                hint="shape requests on it get 503 until REPLICA IDENTITY FULL can be set",
            )  # fmt: skip

    @property
    def pending(self) -> dict[str, str]:
        with self._lock:
            return dict(self._pending)

    def retry_until_ready(self, connect: Any, publication: str, stop: threading.Event) -> None:
        """Retry pending tables every few seconds until none is left or ``stop`` is set (a background thread)."""
        while self.pending and not stop.wait(_RETRY_SECONDS):
            try:
                with connect() as conn:
                    self.prepare(conn, publication)
            except (psycopg.Error, ReplicationError) as exc:
                _log.warning("sync.table_prepare_failed", error=type(exc).__name__)

    # -- the request path -----------------------------------------------------------------------------------

    def check(self, table: TableName) -> None:
        """400 for a table this server does not serve; 503 (retry) for one not prepared yet."""
        if table not in self.names:
            raise ProtocolError("table", f"{str(table)!r} is not served by this sync server (not in its table list)")
        reason = self.pending.get(str(table))
        if reason is not None:
            raise ShapeUnavailableError(
                "table", f"{table} is being prepared for replication ({reason}); retry", retry_after=5
            )

    def known_aligned(self, table: TableName) -> bool:
        with self._lock:
            return str(table) in self._aligned

    def aligned(self, conn: psycopg.Connection[Any], table: TableName) -> bool:
        """Whether every transaction that was running when ``table`` joined the publication has ended."""
        key = str(table)
        with self._lock:
            if key in self._aligned:
                return True
            horizon = self._horizon.get(key, 0)
        if not passed_horizon(conn, horizon):
            return False
        with self._lock:
            self._aligned.add(key)
        return True
