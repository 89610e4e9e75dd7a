"""Publications and ``pgoutput`` slots: creating them, exporting the snapshot they start at, removing them.

A logical slot is a promise by the server to keep every WAL segment from the slot's confirmed position
onwards. That is what makes resume exact, and also what makes a forgotten slot dangerous: its WAL piles
up until the disk is full. So everything here is idempotent and easy to clean up — ``drop_slot`` even
terminates the walsender still attached to the slot, because an abandoned reader would otherwise keep it
alive.

Connections: functions that read or change catalog state take an open psycopg 3 connection (autocommit
or not: each runs inside ``conn.transaction()``, a savepoint when the caller already has a transaction).
Creating a slot needs a replication connection, so :func:`create_slot` and :func:`exported_snapshot`
take a DSN and open their own. Slots belong to one database but their names are cluster-wide.

Snapshot export, and why it has to be a context manager: ``CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT``
returns the name of a snapshot that shows the database exactly as of the slot's consistent point. A bulk
copy that runs on that snapshot plus the change stream from the slot cover every row exactly once. But
the snapshot only exists while the replication connection that created it stays open *and idle*; the
next command on that connection, or closing it, destroys it. :func:`exported_snapshot` therefore keeps
the connection open for the ``with`` block. Sessions import the snapshot with
``BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '<name>'`` inside the block; once
imported, their transactions keep seeing it after the block ends, so only the *imports* must happen
inside it, not the whole copy.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg import sql

from pgferry.config import DatabaseUrl
from pgferry.db.connect import connect
from pgferry.replication._conn import ReplicationError, check_slot_name, connect_replication, conninfo
from pgferry.replication.lsn import Lsn

__all__ = [
    "SlotExistsError",
    "SlotInfo",
    "SlotNotFoundError",
    "SlotState",
    "create_slot",
    "drop_publication",
    "drop_slot",
    "ensure_publication",
    "exported_snapshot",
    "get_slot",
    "publication_tables",
    "slot_exists",
    "slot_lag_bytes",
]

_log = structlog.get_logger("pgferry.replication.slots")

OUTPUT_PLUGIN = "pgoutput"


class SlotNotFoundError(ReplicationError):
    """The named replication slot does not exist (or was dropped while a reader used it)."""


class SlotExistsError(ReplicationError):
    """A slot with this name already exists somewhere on the server (names are cluster-wide)."""


@dataclass(frozen=True)
class SlotInfo:
    """A newly created slot. Changes committed after ``consistent_point`` will be streamed from it.

    ``snapshot_name`` is set only by :func:`exported_snapshot`, and only valid inside its ``with`` block.
    """

    name: str
    consistent_point: Lsn
    snapshot_name: str | None


@dataclass(frozen=True)
class SlotState:
    """A row of ``pg_replication_slots`` for a logical slot, with LSNs parsed."""

    name: str
    plugin: str | None
    database: str | None
    active: bool
    active_pid: int | None
    restart_lsn: Lsn | None
    confirmed_flush_lsn: Lsn | None
    wal_status: str | None


def _lsn_or_none(value: object) -> Lsn | None:
    return None if value is None else Lsn.parse(str(value))


# --------------------------------------------------------------------------------------
# Publications
# --------------------------------------------------------------------------------------


def _resolve_table(conn: psycopg.Connection[Any], table: str) -> tuple[str, str]:
    """``(schema, name)`` of a table as PostgreSQL resolves ``table`` (search_path, quoting)."""
    row = conn.execute(
        "select n.nspname, c.relname, c.relkind from pg_catalog.pg_class c "
        "join pg_catalog.pg_namespace n on n.oid = c.relnamespace where c.oid = pg_catalog.to_regclass(%s)",
        [table],
    ).fetchone()
    if row is None:
        raise ReplicationError(f"cannot publish {table!r}: no such table (is the schema on the search_path?)")
    if row[2] not in ("r", "p"):
        raise ReplicationError(f"cannot publish {table!r}: only tables can be published (relkind {row[2]!r})")
    return str(row[0]), str(row[1])


def publication_tables(conn: psycopg.Connection[Any], name: str) -> list[str]:
    """``schema.table`` names a publication currently covers (empty when it does not exist)."""
    rows = conn.execute(
        "select schemaname, tablename from pg_catalog.pg_publication_tables where pubname = %s order by 1, 2",
        [name],
    ).fetchall()
    return [f"{schema}.{table}" for schema, table in rows]


def _table_list(tables: list[tuple[str, str]]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(schema, table) for schema, table in tables)


def _ensure_publication_once(
    conn: psycopg.Connection[Any], name: str, tables: Sequence[str] | None, all_tables: bool
) -> list[str]:
    with conn.transaction():
        row = conn.execute("select puballtables from pg_catalog.pg_publication where pubname = %s", [name]).fetchone()
        wanted = [_resolve_table(conn, table) for table in tables or ()]
        ident = sql.Identifier(name)
        if row is None:
            if all_tables:
                conn.execute(sql.SQL("create publication {} for all tables").format(ident))
                return []
            if wanted:
                conn.execute(sql.SQL("create publication {} for table {}").format(ident, _table_list(wanted)))
            else:
                conn.execute(sql.SQL("create publication {}").format(ident))
            return [f"{schema}.{table}" for schema, table in wanted]
        if row[0]:
            return []  # FOR ALL TABLES already covers everything, including tables created later.
        if all_tables:
            raise ReplicationError(
                f"publication {name!r} exists for a list of tables, not FOR ALL TABLES; "
                "drop it (drop_publication) and ensure it again to change that"
            )
        present = set(publication_tables(conn, name))
        missing = []
        for schema, table in wanted:
            if f"{schema}.{table}" not in present and (schema, table) not in missing:
                missing.append((schema, table))
        if missing:
            conn.execute(sql.SQL("alter publication {} add table {}").format(ident, _table_list(missing)))
        return [f"{schema}.{table}" for schema, table in missing]


def ensure_publication(
    conn: psycopg.Connection[Any],
    name: str,
    tables: Sequence[str] | None = None,
    all_tables: bool = False,
) -> list[str]:
    """Make sure publication ``name`` exists and covers ``tables`` (or all tables); return the tables added.

    Idempotent: an existing publication gets only the missing tables added, never any removed (another
    consumer may rely on them). ``tables`` are resolved like SQL names (``"tasks"``, ``"public.tasks"``,
    quoted identifiers). A publication cannot be turned into ``FOR ALL TABLES`` in place, so asking for
    that on a table-list publication raises. Two processes ensuring the same publication at once is
    handled: the loser of the race re-reads and continues.
    """
    if all_tables and tables:
        raise ValueError("pass either tables or all_tables=True, not both")
    try:
        return _ensure_publication_once(conn, name, tables, all_tables)
    except pg_errors.DuplicateObject:
        # Someone created the publication or added a table between our read and our DDL; look again.
        return _ensure_publication_once(conn, name, tables, all_tables)


def drop_publication(conn: psycopg.Connection[Any], name: str) -> bool:
    """Drop the publication if it exists; returns whether it did."""
    with conn.transaction():
        row = conn.execute("select 1 from pg_catalog.pg_publication where pubname = %s", [name]).fetchone()
        conn.execute(sql.SQL("drop publication if exists {}").format(sql.Identifier(name)))
    return row is not None


# --------------------------------------------------------------------------------------
# Slots
# --------------------------------------------------------------------------------------


def _create_command(name: str, snapshot: str) -> str:
    # The pre-15 spelling (EXPORT_SNAPSHOT / NOEXPORT_SNAPSHOT) is accepted by every supported version.
    return f"CREATE_REPLICATION_SLOT {check_slot_name(name)} LOGICAL {OUTPUT_PLUGIN} {snapshot}"


def _create(conn: psycopg.Connection[Any], name: str, snapshot: str) -> SlotInfo:
    try:
        row = conn.execute(_create_command(name, snapshot)).fetchone()
    except pg_errors.DuplicateObject as exc:
        raise SlotExistsError(
            f"replication slot {name!r} already exists on this server; drop it (drop_slot) or use another name"
        ) from exc
    if row is None:  # pragma: no cover - the server always answers with one row
        raise ReplicationError(f"CREATE_REPLICATION_SLOT {name} returned no row")
    return SlotInfo(name=str(row[0]), consistent_point=Lsn.parse(str(row[1])), snapshot_name=row[2])


def create_slot(dsn: str | DatabaseUrl, name: str) -> SlotInfo:
    """Create a permanent ``pgoutput`` slot in the DSN's database, without exporting a snapshot.

    Use this when the consumer does not need an initial copy (or already has one it can de-duplicate
    against); use :func:`exported_snapshot` when it does. Creation waits until every transaction that was
    running when it started has finished, so a long-open transaction anywhere on the server delays it.
    """
    with connect_replication(dsn) as conn:
        return _create(conn, name, "NOEXPORT_SNAPSHOT")


@contextlib.contextmanager
def exported_snapshot(dsn: str | DatabaseUrl, slot_name: str, *, drop_on_error: bool = True) -> Iterator[SlotInfo]:
    """Create slot ``slot_name`` and keep its exported snapshot alive for the ``with`` block.

    The yielded :attr:`SlotInfo.snapshot_name` can be imported by other sessions only while the block is
    running (``SET TRANSACTION SNAPSHOT`` as the first statement of a REPEATABLE READ transaction); the
    replication connection holding it is closed when the block ends, the slot itself stays. If the block
    raises, the slot is dropped by default: a slot whose snapshot was never fully used cannot be lined up
    with any copy, and would only hold WAL.
    """
    conn = connect_replication(dsn)
    try:
        info = _create(conn, slot_name, "EXPORT_SNAPSHOT")
        try:
            yield info
        except BaseException:
            if drop_on_error:
                _drop_after_failure(conn, dsn, slot_name)
            raise
    finally:
        conn.close()


def _drop_after_failure(conn: psycopg.Connection[Any], dsn: str | DatabaseUrl, name: str) -> None:
    """Best effort: the original exception matters more than a failed cleanup, which is only logged."""
    try:
        conn.execute(f"DROP_REPLICATION_SLOT {check_slot_name(name)}")
        return
    except psycopg.Error as exc:
        _log.warning("replication.slot_drop_failed", slot=name, error=str(exc).strip(), via="replication connection")
    try:
        with connect(conninfo(dsn), application_name="pgferry-replication") as plain:
            drop_slot(plain, name)
    except (psycopg.Error, ReplicationError) as exc:
        _log.warning("replication.slot_drop_failed", slot=name, error=str(exc).strip(), via="sql")


def get_slot(conn: psycopg.Connection[Any], name: str) -> SlotState | None:
    """The slot's row in ``pg_replication_slots``, or ``None``."""
    row = conn.execute(
        "select slot_name, plugin, database, active, active_pid, restart_lsn::text, confirmed_flush_lsn::text, "
        "wal_status from pg_catalog.pg_replication_slots where slot_name = %s",
        [name],
    ).fetchone()
    if row is None:
        return None
    return SlotState(
        name=str(row[0]),
        plugin=row[1],
        database=row[2],
        active=bool(row[3]),
        active_pid=row[4],
        restart_lsn=_lsn_or_none(row[5]),
        confirmed_flush_lsn=_lsn_or_none(row[6]),
        wal_status=row[7],
    )


def slot_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    return get_slot(conn, name) is not None


def drop_slot(conn: psycopg.Connection[Any], name: str, *, timeout: float = 10.0) -> bool:
    """Drop the slot, terminating the walsender that holds it if needed; returns whether it existed.

    A terminated walsender releases its slot a few milliseconds later, and a reader that lost its
    connection is already reconnecting to take it again, so the drop is retried in a tight loop
    (terminating whichever walsender holds the slot) until ``timeout`` seconds have passed. The reader
    then fails with :class:`SlotNotFoundError` instead of reconnecting. (``pg_terminate_backend`` with a
    timeout is no help here: it polls only every 100 ms, which is plenty of time for the reader.)
    """
    deadline = time.monotonic() + timeout
    terminated: set[int] = set()
    while True:
        state = get_slot(conn, name)
        if state is None:
            return False
        try:
            with conn.transaction():
                if state.active_pid is not None and state.active_pid not in terminated:
                    conn.execute("select pg_catalog.pg_terminate_backend(%s)", [state.active_pid])
                    terminated.add(state.active_pid)
                conn.execute("select pg_catalog.pg_drop_replication_slot(%s)", [name])
            _log.info("replication.slot_dropped", slot=name, terminated_pids=sorted(terminated))
            return True
        except pg_errors.UndefinedObject:
            return False  # dropped by someone else in the meantime
        except pg_errors.ObjectInUse:
            if time.monotonic() >= deadline:
                raise ReplicationError(
                    f"replication slot {name!r} is still in use after {timeout:g}s; "
                    "check pg_stat_replication for the process holding it"
                ) from None
            time.sleep(0.002)


def slot_lag_bytes(conn: psycopg.Connection[Any], name: str) -> int:
    """Bytes of WAL the server keeps for this slot beyond what its consumer confirmed.

    This is the number to alert on: it grows while a consumer is down or not confirming, and the server
    cannot recycle that WAL. Raises :class:`SlotNotFoundError` for an unknown slot.
    """
    row = conn.execute(
        "select pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_insert_lsn(), "
        "coalesce(confirmed_flush_lsn, restart_lsn))::bigint "
        "from pg_catalog.pg_replication_slots where slot_name = %s",
        [name],
    ).fetchone()
    if row is None:
        raise SlotNotFoundError(f"replication slot {name!r} does not exist")
    return max(0, int(row[0] or 0))
