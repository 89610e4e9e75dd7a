"""The local replica: synced shapes in SQLite, the optimistic overlay and the durable outbox, one file.

Per shape (named after its table, e.g. ``tasks``) two tables hold the rows, every value exactly as the server sent
it (PostgreSQL's text form: uuid, jsonb, arrays, timestamps and vectors round-trip unchanged; typed reads go through
:mod:`pgferry.client.values`):

- ``"_synced_<name>"``: the server's state as of the stored offset. Changes from the stream are gathered and applied
  only at an ``up-to-date`` boundary, in **one** SQLite transaction together with the new offset and handle
  (``_pgferry_shapes``), so after a crash the replica is never ahead of or behind its offset. A ``must-refetch``
  replaces the rows in that same way once the new snapshot is up to date (no empty moment, no half state).
- ``"<name>"``: what the application reads and queries with SQL: the synced row with every pending local mutation
  replayed over it, in order. It is a **view**: the synced rows, except keys held in the overlay table
  ``"_pgferry_overlay_<name>"``, plus the overlay's rows not marked deleted. The overlay holds only keys with
  outbox items (their synced row with the items replayed over it), so a snapshot of a million rows is written
  once, not copied into a second table, and a boundary rebuilds only the keys that have local writes. A local
  write changes the overlay and enters ``_pgferry_outbox`` in one transaction. The view is read-only to the
  application: writing to it is an error, not a change the sync would silently overwrite.

Outbox items are ``pending`` (not yet acknowledged) or ``sent`` (the write API applied them in transaction
``txid``, committed at WAL position ``lsn``). An item is dropped — and its key's visible row rebuilt from the synced
row — when its txid has appeared in the stream (``_pgferry_seen_txids``, recorded at each applied boundary), at once
when the server says it changed nothing, or when it is rejected (the rejection is kept in ``_pgferry_rejected`` for
the application).

A write whose row is in no shape of this client, before and after it (a where clause the row does not match), never
shows its txid in the stream; a row that leaves a shape does (Electric sends a delete). So an item is also dropped
when an up-to-date of its shape carries ``global_last_seen_lsn`` at or past the item's ``lsn`` (:meth:`apply`'s
``processed_lsn``), or already at its acknowledgement when the last applied up-to-date did; and at once when
acknowledged for a shape the client does not follow (:meth:`acknowledge`'s ``followed``). The guarantee relied on:
the sync server has processed every transaction committed at or before ``global_last_seen_lsn`` before it sends that
up-to-date (both Electric and the dev server read it before reading the shape's log), so whatever of the write
belongs to the shape was applied with that boundary or an earlier one; the write API's ``lsn`` is at or after the
start of the write's commit record (both positions in the WAL of the one database the write API writes to and the
sync server replicates from). Dropping the item then rebuilds the visible row from the synced one, so a row outside
the shape leaves the visible table. Against Electric, ``global_last_seen_lsn`` is the commit LSN of the last
transaction it processed, so such an item settles only at an up-to-date that reports some later commit on a table
Electric syncs; the dev server also advances it over WAL that held nothing for it (keepalive positions), so there it
settles on an idle server too.

A rotated shape (``must-refetch``) would strand ``sent`` items whose change had not streamed in yet: the new
snapshot carries no txids. So the resetting :meth:`apply` (the new shape's first up-to-date) settles every ``sent``
item of the shape: each was committed before that up-to-date, so the new snapshot or the log up to it holds the
write (the client holds the outbox sender while it applies the reset, so no acknowledgement is in flight). Pending
items stay and are replayed over the new rows; rejected ones were already rolled back.

Synchronous (sqlite3, WAL); the async client calls it on a worker thread. Owns the local storage; must not do HTTP.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import structlog

from pgferry.client._shape_base import Change, RowValues, ShapeBatch, lsn_number
from pgferry.client.values import parse_value

__all__ = ["LocalReplica", "OutboxItem", "Rejection"]

log = structlog.get_logger("pgferry.client")

_META: Final = """
create table if not exists _pgferry_shapes (
  name text primary key, source_table text not null, "offset" text not null, handle text, schema text not null
);
create table if not exists _pgferry_outbox (
  seq integer primary key autoincrement,
  mutation_id text not null unique,
  shape text not null,
  op text not null,
  row_key text not null,
  row text not null,
  base text,
  written_at integer not null,
  state text not null default 'pending',
  txid integer,
  lsn integer
);
create table if not exists _pgferry_staged (
  seq integer primary key autoincrement, shape text not null, key text not null, op text not null,
  value text not null, txids text not null
);
create index if not exists _pgferry_outbox_key on _pgferry_outbox (shape, row_key);
create index if not exists _pgferry_outbox_state on _pgferry_outbox (state, txid);
create table if not exists _pgferry_seen_txids (txid integer primary key, seen_at real not null);
create table if not exists _pgferry_rejected (
  mutation_id text primary key, shape text not null, op text not null, row text not null,
  field text, problem text not null, status integer not null, rejected_at real not null
);
"""
#: Stream txids remembered for matching acknowledgements that arrive after the change itself.
_SEEN_TXIDS_KEPT: Final = 100_000

#: Above this many changes at one boundary the visible table is rebuilt whole (one statement) rather than by key.
_REBUILD_BY_KEY_UP_TO: Final = 10_000
#: Bytes the replica file's WAL is cut back to after a checkpoint (a snapshot loads into the WAL unchecked).
WAL_SIZE_LIMIT = 64 << 20
#: The outbox's stored JSON is read with msgspec (see :meth:`LocalReplica.outbox`).
_DECODE_JSON: Final = msgspec.json.decode


def _insert_rows(columns: list[str], inserts: Sequence[Change]) -> tuple[list[tuple[Any, ...]], set[int]]:
    """Inserts as rows ``(key, *values in columns' order)`` for the snapshot table, and their txids."""
    take = itemgetter(*columns)
    order = tuple(columns)
    rows: list[tuple[Any, ...]] = []
    txids: set[int] = set()
    for change in inserts:
        value = change.value
        if type(value) is RowValues and value.columns.names == order:  # decoded in this order: as it is
            rows.append((change.key, *value.row))
        elif len(columns) == 1:
            rows.append((change.key, value.get(columns[0])))
        else:
            try:
                rows.append((change.key, *take(value)))
            except KeyError:  # a row without some column (Electric's ``columns``): NULL, as the apply would
                rows.append((change.key, *(value.get(c) for c in columns)))
        if change.txids:
            txids.update(change.txids)
    return rows, txids


def _bind_null(_value: None) -> None:
    return None


# ``None`` parameters bound as NULL exactly as before, only cheaper: Python's sqlite3 binds str, int, float and bytes
# directly but passes anything else, None included, through its adapter registry, whose miss looks up
# ``PrepareProtocol.__adapt__`` and formats and discards an AttributeError each time (CPython 3.11: ~0.3 µs per NULL,
# a snapshot row of the benchmark's tasks carries ~4). A registered adapter is found at once. Left alone if an
# application registered its own for None.
if (type(None), sqlite3.PrepareProtocol) not in sqlite3.adapters:
    sqlite3.register_adapter(type(None), _bind_null)

Op = Literal["insert", "update", "delete"]


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One local mutation waiting to be delivered (or acknowledged): what the sender posts."""

    seq: int
    mutation_id: str
    shape: str
    op: Op
    row: dict[str, Any]
    base: dict[str, Any] | None
    written_at: int
    state: str
    txid: int | None
    lsn: int | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """A mutation the server refused; its optimistic state was rolled back."""

    mutation_id: str
    shape: str
    op: str
    row: dict[str, Any]
    field: str | None
    problem: str
    status: int


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _stage_table(name: str) -> str:
    """The typed staging table of a shape, unqualified (it is a TEMP table: ``temp.<this>``)."""
    return f"_pgferry_stage_{name}"


#: Prefix of the tables a whole new snapshot is loaded into before it becomes a shape's synced table.
_NEXT_PREFIX: Final = "_pgferry_next_"


def _next_table(name: str) -> str:
    """The table a shape's new snapshot is loaded into (see :meth:`LocalReplica.stage`)."""
    return _NEXT_PREFIX + name


def _key_index(name: str) -> str:
    """The unique index on ``_key`` of a synced table that started as a snapshot table (no ``primary key``)."""
    return f"_synced_{name}__key"


#: ``CREATE [UNIQUE] INDEX [IF NOT EXISTS] <name> ON <table> (`` as SQLite stores it: groups around the table.
_INDEX_ON: Final = re.compile(
    r'^(\s*create\s+(?:unique\s+)?index\s+(?:if\s+not\s+exists\s+)?(?:"(?:[^"]|"")*"|\[[^\]]*\]|`(?:[^`]|``)*`|[^\s(]+)'
    r'\s+on\s+)(?:"(?:[^"]|"")*"|\[[^\]]*\]|`(?:[^`]|``)*`|[^\s(]+)(\s*\()',
    re.IGNORECASE | re.DOTALL,
)


def _application_indexes(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    """``(name, create statement)`` of the indexes an application made on ``table`` (not the replica's own)."""
    return [
        (str(index), str(create))
        for index, create in conn.execute(
            "select name, sql from sqlite_schema where type = 'index' and tbl_name = ? and sql is not null", [table]
        )
        if not str(index).startswith("_pgferry_") and not str(index).endswith("__key")
    ]


def _recreate_indexes(conn: sqlite3.Connection, indexes: list[tuple[str, str]], table: str) -> None:
    """Create an application's indexes again on ``table`` (after the table they were on was replaced: a new
    snapshot, or the old layout's visible table). One that no longer fits (a column the server dropped) is
    skipped with a warning: a missing index costs speed, refusing the snapshot would cost the sync."""
    for index, create in indexes:
        statement = _INDEX_ON.sub(lambda m: m.group(1) + _ident(table) + m.group(2), create, count=1)
        conn.execute("savepoint _pgferry_app_index")
        try:
            conn.execute(statement)
        except sqlite3.Error as exc:
            conn.execute("rollback to _pgferry_app_index")
            log.warning("an index on the replica could not be created again", index=index, problem=str(exc))
        conn.execute("release _pgferry_app_index")


def _overlay_table(name: str) -> str:
    """The table of a shape's keys that have local writes: their visible rows (see the module docstring)."""
    return f"_pgferry_overlay_{name}"


class ShapeSchemas:
    """What both replicas know of their shapes' columns: the stream's schema per shape, and its key from it; and
    how far each shape's server had processed the WAL at its last applied up-to-date (see the module docstring)."""

    _schemas: dict[str, dict[str, Any]]
    #: ``global_last_seen_lsn`` of each shape's last applied up-to-date (in memory: the next one after a restart
    #: sets it again; until then items wait for it).
    _processed: dict[str, int]

    def _settles_on_acknowledgement(self, shape: str, lsn: int | None, followed: Container[str] | None) -> bool:
        """Whether an acknowledged item of ``shape`` committed at ``lsn`` is settled at once, with nothing to wait
        for: the client follows no stream of its shape, or that stream's last applied up-to-date was already past
        its commit (every change of it in the shape was applied then)."""
        if followed is not None and shape not in followed:
            return True
        processed = self._processed.get(shape)
        return lsn is not None and processed is not None and lsn <= processed

    def _record_processed(self, name: str, processed_lsn: int | None) -> None:
        """Remember the applied up-to-date's position (after its transaction committed)."""
        if processed_lsn is not None:
            self._processed[name] = processed_lsn

    def schema(self, name: str) -> dict[str, Any]:
        return self._schemas.get(name, {})

    def primary_key(self, name: str) -> list[str]:
        schema = self.schema(name)
        return [
            c for c, _ in sorted(((c, e["pk_index"]) for c, e in schema.items() if "pk_index" in e), key=lambda x: x[1])
        ]

    def _key_in(self, name: str, source_table: str | None, row: Mapping[str, str | None]) -> str:
        """The shape log's key of ``row`` in shape ``name`` of ``source_table`` (``schema.table``)."""
        schema, _, table = (source_table or f"public.{name}").partition(".")
        parts = [
            '"' + ("_" if row.get(c) is None else str(row[c]).replace("/", "//")) + '"' for c in self.primary_key(name)
        ]
        return f'"{schema}"."{table}"/' + "/".join(parts)


class LocalReplica(ShapeSchemas):
    """``LocalReplica(path)`` (``":memory:"`` for a throwaway one). Thread-safe: one connection behind a lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._checkpointer: threading.Thread | None = None
        self._wal_writer: threading.Thread | None = None
        with self._lock:
            if self.path != ":memory:":
                self._conn.execute("pragma journal_mode = wal")
                # A snapshot loads without checkpoints (:meth:`_load_next`), so the WAL grows to its size; once it is
                # checkpointed the file is cut back to this, not kept at the snapshot's size on disk.
                self._conn.execute(f"pragma journal_size_limit = {WAL_SIZE_LIMIT}")
            self._conn.execute(
                "pragma synchronous = normal" if self.path == ":memory:" else "pragma synchronous = full"
            )
            self._conn.executescript(_META)
            outbox_columns = {row[1] for row in self._conn.execute("pragma table_info(_pgferry_outbox)")}
            if "lsn" not in outbox_columns:  # a replica file from before items carried their commit position
                self._conn.execute("alter table _pgferry_outbox add column lsn integer")
            # Staged changes of a boundary that never committed (a crash): their offset was not stored either.
            # (Typed staging tables are TEMP tables: they end with the connection; snapshot tables do not.)
            self._conn.execute("delete from _pgferry_staged")
            leftover = self._conn.execute(
                "select name from sqlite_schema where type = 'table' and substr(name, 1, ?) = ?",
                [len(_NEXT_PREFIX), _NEXT_PREFIX],
            ).fetchall()
            for (table,) in leftover:
                self._conn.execute(f"drop table {_ident(table)}")
        # Shapes whose new snapshot is being loaded into their snapshot table: its columns, and the txids of the
        # changes in it (recorded as seen when it is applied).
        self._next: dict[str, tuple[dict[str, Any], set[int]]] = {}
        self._schemas: dict[str, dict[str, Any]] = {
            name: json.loads(schema) for name, schema in self._conn.execute("select name, schema from _pgferry_shapes")
        }
        self._processed: dict[str, int] = {}
        with self._lock:
            self._views_from_visible_tables()

    def _views_from_visible_tables(self) -> None:
        """A replica written before the visible rows became a view kept them as a full table: replace it with the
        view and the overlay, rebuilt from the outbox, in one transaction (no row is lost: the synced table and
        the outbox are the truth; the old table was derived from them)."""
        old = [
            name
            for name in self._schemas
            if self._conn.execute("select 1 from sqlite_schema where type = 'table' and name = ?", [name]).fetchone()
        ]
        if not old:
            return
        with self._transaction() as conn:
            for name in old:
                indexes = _application_indexes(conn, name)
                conn.execute(f"drop table {_ident(name)}")
                self._ensure_tables(conn, name, self._schemas[name])
                _recreate_indexes(conn, indexes, f"_synced_{name}")  # the view reads through them
                self._rebuild_all(conn, name)

    # -- transactions ---------------------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("begin immediate")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("rollback")
                raise
            self._conn.execute("commit")

    def close(self) -> None:
        self.wait_for_checkpoint()
        if self._wal_writer is not None:
            self._wal_writer.join()
        with self._lock:
            self._conn.close()

    def wait_for_checkpoint(self) -> None:
        """Wait for a background checkpoint started by a snapshot's apply (:meth:`apply`), if one is running."""
        checkpointer = self._checkpointer
        if checkpointer is not None:
            checkpointer.join()

    def _checkpoint_in_background(self) -> None:
        """Copy the WAL into the replica file on a thread of its own, on a connection of its own.

        A new snapshot reaches the file only through the WAL (:meth:`_load_next`); checkpointing it inside the
        apply's commit made every first sync wait for a second write of the whole snapshot, which durability does
        not need: the commit's fsync of the WAL already made it safe, and SQLite's WAL mode lets a checkpoint run
        beside readers and writers. ``PASSIVE``: it never blocks the replica's own connection; the next write after
        it finished resets the WAL, cut back to ``journal_size_limit``."""
        if self.path == ":memory:" or (self._checkpointer is not None and self._checkpointer.is_alive()):
            return

        def checkpoint() -> None:
            try:
                conn = sqlite3.connect(self.path, isolation_level=None)
                try:
                    conn.execute("pragma wal_checkpoint(passive)")
                finally:
                    conn.close()
            except sqlite3.Error as exc:  # the next autocheckpoint of the replica's own connection does it instead
                log.warning("background checkpoint of the replica failed", path=self.path, problem=str(exc))

        self._checkpointer = threading.Thread(target=checkpoint, name="pgferry-replica-checkpoint", daemon=True)
        self._checkpointer.start()

    # -- shapes ---------------------------------------------------------------------------------------------------

    def position(self, name: str) -> tuple[str, str | None] | None:
        """The stored ``(offset, handle)`` of a shape, to resume its stream; ``None`` if never synced."""
        with self._lock:
            row = self._conn.execute('select "offset", handle from _pgferry_shapes where name = ?', [name]).fetchone()
        return (str(row[0]), row[1]) if row else None

    def stage(
        self,
        name: str,
        changes: Sequence[Change],
        *,
        schema: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> None:
        """Park changes of a long stretch before the next up-to-date (a large snapshot) on disk, not in memory; the
        next :meth:`apply` moves them in with its own, in its one transaction. Invisible until then.

        With the shape's ``schema`` (the stream's), rows go into a typed table of their own
        (``_pgferry_stage_<name>``, a column per shape column), so :meth:`apply` copies a staged snapshot into the
        synced table with one statement instead of decoding a JSON document per row; an update or delete is kept as
        JSON beside them and replayed in order. That table is TEMP: it never reaches the replica file's journal (no
        fsync per staged page, no checkpoint copy) and vanishes with the connection, so a crash cannot leave staged
        rows behind to be applied under a later offset.

        A whole new snapshot — the shape was never applied, or ``replace`` (a must-refetch: the next apply replaces
        its rows) — goes instead into a table of its own in the replica file (``_pgferry_next_<name>``, no index:
        rows are appended as they come), which :meth:`apply` turns into the synced table by renaming it and
        indexing it once: the rows are written once, not staged, sorted and copied. Its pages are committed without
        fsync (``synchronous = normal``; the apply's commit syncs them with the rest), and a snapshot table left by a
        crash is dropped when the replica is opened, like any staged change. The first change that is not an insert
        ends the snapshot: it and everything after go to the staging table above, applied after the snapshot."""
        if schema and self._stage_next(name, changes, schema, replace=replace):
            return
        self._stage_changes(name, changes, schema)

    def _stage_changes(self, name: str, changes: Sequence[Change], schema: Mapping[str, Any] | None) -> None:
        """Stage into the typed staging table (or, without a schema, as JSON); see :meth:`stage`."""
        schema = schema or self._schemas.get(name)
        if not schema:
            with self._transaction() as conn:
                conn.executemany(
                    "insert into _pgferry_staged (shape, key, op, value, txids) values (?, ?, ?, ?, ?)",
                    [(name, c.key, c.operation, json.dumps(dict(c.value)), json.dumps(list(c.txids))) for c in changes],
                )
            return
        with self._transaction() as conn:
            table = _stage_table(name)
            columns = self._stage_columns(conn, table, list(schema))
            names = ", ".join(["_op", "_key", "_txids", "_value", *(_ident(c) for c in columns)])
            marks = ", ".join(["?"] * (len(columns) + 4))
            conn.executemany(
                f"insert into temp.{_ident(table)} ({names}) values ({marks})",
                [
                    (
                        "insert",
                        c.key,
                        ",".join(map(str, c.txids)),
                        None,
                        *(c.value.get(column) for column in columns),
                    )
                    if c.operation == "insert"
                    else (c.operation, c.key, ",".join(map(str, c.txids)), json.dumps(dict(c.value)))
                    + (None,) * len(columns)
                    for c in changes
                ],
            )

    def stage_pages(
        self, name: str, pages: Sequence[ShapeBatch], *, schema: Mapping[str, Any] | None = None, replace: bool = False
    ) -> None:
        """:meth:`stage` for the changes of whole pages, in order. A page handed on undecoded that goes into a new
        snapshot's table is decoded straight into the rows inserted (:meth:`ShapeBatch.leading_inserts`: no
        :class:`Change` per row); anything else goes through :meth:`stage` as it is. Pages are decoded outside the
        replica's lock, as before (readers and local writes wait only for the insert)."""
        columns = self._loading_next(name, schema, replace=replace) if schema else None
        if columns is None:
            self.stage(name, [c for page in pages for c in page.decoded()], schema=schema, replace=replace)
            return
        rows: list[tuple[str | None, ...]] = []
        txids: set[int] = set()
        changes: list[Change] = []
        for page in pages:
            read = None if changes else page.leading_inserts(columns)
            if read is None:
                changes.extend(page.decoded())
                continue
            page_rows, page_txids, rest = read
            rows.extend(page_rows)
            txids.update(page_txids)
            changes.extend(rest)
        with self._lock:
            if rows and self._loading_next(name, schema, replace=replace) != columns:
                # The snapshot was discarded meanwhile (a must-refetch, a failure): as if it had not been started.
                rows, changes = [], [c for page in pages for c in page.decoded()]
            if rows:
                self._load_next(lambda conn: self._insert_next(conn, name, columns, rows, txids))
            if changes:
                self.stage(name, changes, schema=schema, replace=replace)

    def _loading_next(self, name: str, schema: Mapping[str, Any] | None, *, replace: bool) -> list[str] | None:
        """The columns of the snapshot table inserts of ``name`` go into now, started if this is a whole new snapshot;
        ``None``: not a new snapshot, or it already ended (changes are staged the usual way)."""
        if not schema:
            return None
        with self._lock:
            columns = self._next_columns(name, schema, replace=replace)
            if columns is None or self._stage_columns_if_any(self._conn, _stage_table(name)) is not None:
                return None
            return columns

    def _next_columns(self, name: str, schema: Mapping[str, Any], *, replace: bool) -> list[str] | None:
        """The columns of the shape's snapshot table, created when this is a whole new snapshot (see :meth:`stage`);
        ``None``: not a new snapshot (its changes are staged the usual way)."""
        if name not in self._next:
            fresh = replace or name not in self._schemas
            if not fresh or self._stage_columns_if_any(self._conn, _stage_table(name)) is not None:
                return None
            if self._conn.execute("select 1 from _pgferry_staged where shape = ? limit 1", [name]).fetchone():
                return None
            columns = list(schema)
            with self._transaction() as conn:
                conn.execute(f"drop table if exists {_ident(_next_table(name))}")
                conn.execute(
                    f"create table {_ident(_next_table(name))} "
                    f"(_key text not null, {', '.join(f'{_ident(c)} text' for c in columns)})"
                )
            self._next[name] = (dict(schema), set())
        return list(self._next[name][0])

    def _stage_next(self, name: str, changes: Sequence[Change], schema: Mapping[str, Any], *, replace: bool) -> bool:
        """Load the leading inserts of ``changes`` into the snapshot table when this is a whole new snapshot (see
        :meth:`stage`); stage the rest the usual way. ``False``: not a new snapshot, nothing done."""
        with self._lock:
            columns = self._next_columns(name, schema, replace=replace)
            if columns is None:
                return False
            txids = self._next[name][1]
            if self._stage_columns_if_any(self._conn, _stage_table(name)) is not None:
                tail = 0  # the snapshot already ended: keep the order, stage after it
            else:
                tail = next((i for i, c in enumerate(changes) if c.operation != "insert"), len(changes))
            if tail:
                rows, txids = _insert_rows(columns, changes[:tail])
                self._load_next(lambda conn: self._insert_next(conn, name, columns, rows, txids))
        if tail < len(changes):
            self._stage_changes(name, changes[tail:], schema)
        return True

    def _load_next(self, append: Callable[[sqlite3.Connection], None]) -> None:
        """Append rows to the snapshot table (``append`` does), in one transaction committed without fsync (see
        :meth:`stage`)."""
        durable = self.path != ":memory:"
        if durable:
            self._conn.execute("pragma synchronous = normal")
            # No checkpoint while the snapshot loads: each one copied the pages just appended from the WAL into the
            # file and reset the WAL, once per thousand pages; the apply's commit (and its checkpoint) does it once.
            self._conn.execute("pragma wal_autocheckpoint = 0")
        try:
            with self._transaction() as conn:
                append(conn)
        finally:
            if durable:
                self._conn.execute("pragma synchronous = full")
                self._conn.execute("pragma wal_autocheckpoint = 1000")
        if durable:
            self._write_wal_out_in_background()

    def _write_wal_out_in_background(self) -> None:
        """Have the OS write the WAL a snapshot is being loaded into out to disk now, on a thread of its own, while
        the next pages are fetched and loaded: the apply's commit must fsync every page of the snapshot, and a
        100k-row one (~100 MB of WAL) waited ~0.1 s for that. Durability is the commit's fsync, as before; this
        only moves the disk's work earlier. Best effort: one at a time, skipped when one is still running."""
        if self._wal_writer is not None and self._wal_writer.is_alive():
            return
        wal = self.path + "-wal"

        def write_out() -> None:
            try:
                fd = os.open(wal, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:  # no WAL (yet), or a platform that cannot sync a read-only descriptor: the commit does
                pass

        self._wal_writer = threading.Thread(target=write_out, name="pgferry-replica-wal-writer", daemon=True)
        self._wal_writer.start()

    def _insert_next(
        self,
        conn: sqlite3.Connection,
        name: str,
        columns: list[str],
        rows: list[tuple[str | None, ...]],
        txids: set[int],
    ) -> None:
        """Append rows ``(key, *values in columns' order)`` to the snapshot table; their txids are recorded."""
        names = ", ".join(["_key", *(_ident(c) for c in columns)])
        marks = ", ".join(["?"] * (len(columns) + 1))
        conn.executemany(f"insert into {_ident(_next_table(name))} ({names}) values ({marks})", rows)
        self._next[name][1].update(txids)

    def _stage_columns(self, conn: sqlite3.Connection, table: str, wanted: list[str]) -> list[str]:
        """The typed staging table's columns, created with ``wanted`` when it does not exist yet."""
        found = self._stage_columns_if_any(conn, table)
        if found is not None:
            return found
        columns = ", ".join(f"{_ident(c)} text" for c in wanted)
        conn.execute(
            f"create temp table {_ident(table)} (_seq integer primary key, _op text not null, _key text not null, "
            f"_txids text not null, _value text, {columns})"
        )
        return wanted

    def discard_staged(self, name: str) -> None:
        """Forget staged changes (the shape must be refetched)."""
        with self._transaction() as conn:
            conn.execute("delete from _pgferry_staged where shape = ?", [name])
            conn.execute(f"drop table if exists temp.{_ident(_stage_table(name))}")
            conn.execute(f"drop table if exists {_ident(_next_table(name))}")
            self._next.pop(name, None)

    @contextmanager
    def _checkpointed_after_if_snapshot(self, name: str) -> Iterator[None]:
        """Around the apply of a new snapshot: commit without checkpointing the WAL it was loaded into, then start
        a background checkpoint (:meth:`_checkpoint_in_background`). Anything else: nothing."""
        if name not in self._next or self.path == ":memory:":
            yield
            return
        self._conn.execute("pragma wal_autocheckpoint = 0")
        try:
            yield
        finally:
            self._conn.execute("pragma wal_autocheckpoint = 1000")
        self._checkpoint_in_background()

    def apply(
        self,
        name: str,
        source_table: str,
        changes: Sequence[Change],
        *,
        offset: str,
        handle: str | None,
        schema: Mapping[str, Any] | None,
        reset: bool = False,
        processed_lsn: int | None = None,
    ) -> set[int]:
        """Apply the changes gathered up to an up-to-date boundary, with the new position, in one transaction;
        ``reset`` replaces the shape's rows (after a must-refetch). Returns the keys' txids seen, and settles the
        outbox items they acknowledge, and those committed at or before ``processed_lsn`` (the up-to-date's
        ``global_last_seen_lsn``; see the module docstring). A new snapshot's apply commits without checkpointing
        the WAL it was loaded into; a background checkpoint follows (:meth:`_checkpoint_in_background`)."""
        with self._lock, self._checkpointed_after_if_snapshot(name), self._transaction() as conn:
            snapshot = self._next.get(name)
            txids: set[int] = set()
            if snapshot is not None:
                next_schema, next_txids = snapshot
                if self._stage_columns_if_any(conn, _stage_table(name)) is None:
                    # The inserts gathered since the last stage still belong to the snapshot: append them too.
                    tail = next((i for i, c in enumerate(changes) if c.operation != "insert"), len(changes))
                    rows, tail_txids = _insert_rows(list(next_schema), changes[:tail])
                    self._insert_next(conn, name, list(next_schema), rows, tail_txids)  # into next_txids too
                    changes = changes[tail:]
                self._take_snapshot(conn, name, dict(schema) if schema is not None else next_schema, list(next_schema))
                txids.update(next_txids)
            elif schema is not None and (reset or dict(schema) != self._schemas.get(name)):
                self._ensure_tables(conn, name, dict(schema))
            columns = list(self._schemas[name])
            synced = _ident(f"_synced_{name}")
            if reset and snapshot is None:
                conn.execute(f"delete from {synced}")
            touched: set[str] = set()
            staged = conn.cursor().execute(
                "select key, op, value, txids from _pgferry_staged where shape = ? order by seq", [name]
            )
            from_disk = (Change(k, o, json.loads(v), tuple(json.loads(t))) for k, o, v, t in staged)
            count = self._apply_changes(conn, synced, columns, from_disk, touched, txids)
            conn.execute("delete from _pgferry_staged where shape = ?", [name])
            count += self._apply_typed_stage(conn, name, synced, columns, touched, txids, already=count)
            count += self._apply_changes(conn, synced, columns, changes, touched, txids, already=count)
            conn.execute(
                'insert into _pgferry_shapes (name, source_table, "offset", handle, schema) values (?, ?, ?, ?, ?) '
                'on conflict (name) do update set "offset" = excluded."offset", handle = excluded.handle, '
                "schema = excluded.schema",
                [name, source_table, offset, handle, json.dumps(self._schemas[name])],
            )
            if txids:
                now = time.time()
                conn.executemany(
                    "insert or ignore into _pgferry_seen_txids (txid, seen_at) values (?, ?)", [(t, now) for t in txids]
                )
                conn.execute(
                    "delete from _pgferry_seen_txids where txid not in "
                    "(select txid from _pgferry_seen_txids order by seen_at desc limit ?)",
                    [_SEEN_TXIDS_KEPT],
                )
            settled = self._drop_seen(conn, name, processed_lsn)
            if reset:  # every acknowledged write is in the new snapshot or its log so far (module docstring)
                conn.execute("delete from _pgferry_outbox where shape = ? and state = 'sent'", [name])
            if snapshot is not None or reset or count > _REBUILD_BY_KEY_UP_TO:
                self._rebuild_all(conn, name)
            else:
                self._rebuild(conn, name, touched | settled)
            if snapshot is not None:
                del self._next[name]  # under the lock: a stage for this shape now starts a new one
        self._record_processed(name, processed_lsn)  # committed: the shape holds every change up to it
        return txids

    def _take_snapshot(self, conn: sqlite3.Connection, name: str, schema: dict[str, Any], columns: list[str]) -> None:
        """Make the snapshot table (:meth:`stage`) the shape's synced table, in the apply's transaction: renamed and
        given its unique index on ``_key`` (built once, from sorted keys), or copied when the shape's columns
        changed since it was started. The visible view is recreated over it; the apply rebuilds the overlay."""
        loaded = _ident(_next_table(name))
        synced = _ident(f"_synced_{name}")
        # The view goes first: SQLite checks views that name a table when one is dropped or renamed.
        conn.execute(f"drop view if exists {_ident(name)}")
        indexes = _application_indexes(conn, f"_synced_{name}")
        conn.execute(f"drop table if exists {synced}")
        old = self._schemas.get(name)
        if old is not None and old != schema:
            conn.execute(f"drop table if exists {_ident(_overlay_table(name))}")
        self._schemas[name] = schema
        if columns != list(schema):
            self._ensure_tables(conn, name, schema)
            common = ", ".join(["_key", *(_ident(c) for c in columns if c in schema)])
            conn.execute(
                f"insert or replace into {synced} ({common}) select {common} from {loaded} order by _key, rowid"
            )
            conn.execute(f"drop table {loaded}")
            _recreate_indexes(conn, indexes, f"_synced_{name}")
            return
        conn.execute(f"alter table {loaded} rename to {synced}")
        index = f"create unique index {_ident(_key_index(name))} on {synced} (_key)"
        conn.execute("savepoint _pgferry_index")
        try:
            conn.execute(index)
        except sqlite3.IntegrityError:
            # A key twice (inserted again later in the log): the last insert wins, as applying them in order would.
            conn.execute("rollback to _pgferry_index")
            conn.execute(f"delete from {synced} where rowid not in (select max(rowid) from {synced} group by _key)")
            conn.execute(index)
        conn.execute("release _pgferry_index")
        self._ensure_tables(conn, name, schema)
        _recreate_indexes(conn, indexes, f"_synced_{name}")

    def _apply_typed_stage(
        self,
        conn: sqlite3.Connection,
        name: str,
        synced: str,
        columns: list[str],
        touched: set[str],
        txids: set[int],
        *,
        already: int,
    ) -> int:
        """Move the typed staging table's rows into the synced table, in order; drop it. Only inserts (a snapshot):
        one ``insert or replace … select``; otherwise row by row through :meth:`_apply_changes`."""
        table = "temp." + _ident(_stage_table(name))
        staged_columns = self._stage_columns_if_any(conn, _stage_table(name))
        if staged_columns is None:
            return 0
        common = [c for c in staged_columns if c in columns]
        row = conn.execute(f"select count(*), max(_op <> 'insert') from {table}").fetchone()
        count, mixed = int(row[0]), bool(row[1])
        if count and not mixed:
            names = ", ".join(["_key", *(_ident(c) for c in common)])
            # In key order (the synced table's b-tree is filled front to back, not at random places: several times
            # faster once it outgrows SQLite's page cache); within a key in log order, so the last insert wins.
            conn.execute(f"insert or replace into {synced} ({names}) select {names} from {table} order by _key, _seq")
            for (found,) in conn.execute(f"select distinct _txids from {table} where _txids <> ''"):
                txids.update(int(t) for t in found.split(","))
            if already + count <= _REBUILD_BY_KEY_UP_TO:
                touched.update(key for (key,) in conn.execute(f"select _key from {table}"))
        elif count:
            cursor = conn.cursor().execute(
                f"select _op, _key, _txids, _value, {', '.join(_ident(c) for c in staged_columns)} "
                f"from {table} order by _seq"
            )
            from_disk = (
                Change(
                    key,
                    op,
                    json.loads(value) if op != "insert" else dict(zip(staged_columns, rest, strict=True)),
                    tuple(int(t) for t in found.split(",")) if found else (),
                )
                for op, key, found, value, *rest in cursor
            )
            self._apply_changes(conn, synced, columns, from_disk, touched, txids, already=already)
        conn.execute(f"drop table {table}")
        return count

    @staticmethod
    def _stage_columns_if_any(conn: sqlite3.Connection, table: str) -> list[str] | None:
        found = [row[1] for row in conn.execute(f"pragma temp.table_info({_ident(table)})")]
        return found[5:] if found else None

    def _ensure_tables(self, conn: sqlite3.Connection, name: str, schema: dict[str, Any]) -> None:
        """Create (or, when the server's columns changed, recreate) the shape's synced and overlay tables and its
        visible view (module docstring)."""
        old = self._schemas.get(name)
        indexes: list[tuple[str, str]] = []
        if old is not None and old != schema:
            conn.execute(f"drop view if exists {_ident(name)}")
            indexes = _application_indexes(conn, f"_synced_{name}")
            conn.execute(f"drop table if exists {_ident('_synced_' + name)}")
            conn.execute(f"drop table if exists {_ident(_overlay_table(name))}")
        self._schemas[name] = schema
        # One index per table: the shape log's row key, which encodes the primary key (a second index on the key
        # columns would double the cost of every applied row). Rowid tables, not WITHOUT ROWID: rows of several
        # hundred bytes left WITHOUT ROWID pages half empty (a 100k-row replica grew from ~180 to 277 MB).
        columns = ", ".join(f"{_ident(c)} text" for c in schema)
        synced, overlay = _ident("_synced_" + name), _ident(_overlay_table(name))
        conn.execute(f"create table if not exists {synced} (_key text primary key, {columns})")
        conn.execute(
            f"create table if not exists {overlay} "
            f"(_key text primary key, _pending integer not null, _deleted integer not null, {columns})"
        )
        # Keys in the overlay are read from it alone (a pending delete hides the synced row); SQLite pushes a
        # query's conditions into both arms, so a lookup by key stays two index probes.
        names = ", ".join(_ident(c) for c in schema)
        conn.execute(
            f"create view if not exists {_ident(name)} (_key, _pending, {names}) as "
            f"select _key, 0, {names} from {synced} as s "
            f"where not exists (select 1 from {overlay} as o where o._key = s._key) "
            f"union all select _key, _pending, {names} from {overlay} where not _deleted"
        )
        _recreate_indexes(conn, indexes, f"_synced_{name}")

    def _apply_changes(
        self,
        conn: sqlite3.Connection,
        table: str,
        columns: list[str],
        changes: Iterable[Change],
        touched: set[str],
        txids: set[int],
        *,
        already: int = 0,
    ) -> int:
        """Apply changes in order; consecutive inserts with the same columns go through one ``executemany`` (a
        snapshot is all inserts). Collects touched keys (up to the rebuild-by-key limit) and txids."""
        known_columns = set(columns)
        run: list[list[str | None]] = []
        run_columns: tuple[str, ...] | None = None
        count = 0

        def flush() -> None:
            if run and run_columns is not None:
                names = ", ".join(["_key", *(_ident(c) for c in run_columns)])
                marks = ", ".join(["?"] * (len(run_columns) + 1))
                conn.executemany(f"insert or replace into {table} ({names}) values ({marks})", run)
            run.clear()

        for change in changes:
            count += 1
            if already + count <= _REBUILD_BY_KEY_UP_TO:
                touched.add(change.key)
            txids.update(change.txids)
            if change.operation == "insert":
                names = tuple(c for c in change.value if c in known_columns)
                if names != run_columns or len(run) >= 2000:
                    flush()
                    run_columns = names
                run.append([change.key, *(change.value[c] for c in names)])
                continue
            flush()
            self._apply_change(conn, table, columns, change)
        flush()
        return count

    def _apply_change(self, conn: sqlite3.Connection, table: str, columns: list[str], change: Change) -> None:
        if change.operation == "delete":
            conn.execute(f"delete from {table} where _key = ?", [change.key])
            return
        known = [c for c in change.value if c in columns]
        if change.operation == "insert":
            names = ", ".join(["_key", *(_ident(c) for c in known)])
            marks = ", ".join(["?"] * (len(known) + 1))
            conn.execute(
                f"insert or replace into {table} ({names}) values ({marks})",
                [change.key, *(change.value[c] for c in known)],
            )
            return
        if known:
            sets = ", ".join(f"{_ident(c)} = ?" for c in known)
            conn.execute(f"update {table} set {sets} where _key = ?", [*(change.value[c] for c in known), change.key])

    # -- reading ----------------------------------------------------------------------------------------------------

    def rows(self, name: str, *, typed: bool = True, synced: bool = False) -> list[dict[str, Any]]:
        """Every visible row (synced with pending local writes over it; ``synced=True``: the server's state only),
        typed by the shape's schema unless ``typed=False`` (PostgreSQL text)."""
        schema = self.schema(name)
        table = _ident(f"_synced_{name}" if synced else name)
        with self._lock:
            if name not in self._schemas:
                return []
            cursor = self._conn.execute(f"select {', '.join(_ident(c) for c in schema)} from {table} order by _key")
            found = cursor.fetchall()
        result = []
        for row in found:
            values = dict(zip(schema, row, strict=True))
            result.append({c: parse_value(v, schema[c]) for c, v in values.items()} if typed else values)
        return result

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only SQL query on the replica (values are PostgreSQL text)."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def pending_keys(self, name: str) -> set[str]:
        with self._lock:
            return {
                r[0]
                for r in self._conn.execute(
                    f"select _key from {_ident(_overlay_table(name))} where _pending > 0 and not _deleted"
                )
            }

    # -- local writes and the outbox ------------------------------------------------------------------------------

    def source_table(self, name: str) -> str | None:
        """The ``schema.table`` shape ``name`` was synced from (``None``: never synced)."""
        with self._lock:
            source = self._conn.execute("select source_table from _pgferry_shapes where name = ?", [name]).fetchone()
        return str(source[0]) if source else None

    def key_of(self, name: str, row: Mapping[str, str | None]) -> str:
        """The shape log's key for a row (``"public"."tasks"/"<id>"``), from its primary key values (text)."""
        return self._key_in(name, self.source_table(name), row)

    def write(
        self,
        name: str,
        op: Op,
        text_row: Mapping[str, str | None],
        json_row: Mapping[str, Any],
        *,
        written_at: int | None = None,
    ) -> str:
        """A local write: the visible row changes now (marked pending) and the mutation enters the outbox, in one
        transaction. ``text_row`` is the row in PostgreSQL text form (for the replica), ``json_row`` the same values
        as the write API's JSON. Returns the mutation id."""
        if name not in self._schemas:
            raise KeyError(f"{name} is not synced yet; call setup_sync and wait for it first")
        mutation_id = str(uuid.uuid4())
        key = self.key_of(name, text_row)
        written_at = written_at if written_at is not None else int(time.time() * 1000)
        with self._transaction() as conn:
            base = self._visible(conn, name, key)
            conn.execute(
                "insert into _pgferry_outbox (mutation_id, shape, op, row_key, row, base, written_at) "
                "values (?, ?, ?, ?, ?, ?, ?)",
                [
                    mutation_id,
                    name,
                    op,
                    key,
                    json.dumps({"text": dict(text_row), "json": dict(json_row)}),
                    json.dumps(base) if base is not None else None,
                    written_at,
                ],
            )
            self._overlay(conn, name, key, op, text_row)
        return mutation_id

    def _visible(self, conn: sqlite3.Connection, name: str, key: str) -> dict[str, Any] | None:
        schema = self._schemas[name]
        names = ", ".join(_ident(c) for c in schema)
        found = conn.execute(
            f"select _deleted, {names} from {_ident(_overlay_table(name))} where _key = ?", [key]
        ).fetchone()
        if found is not None:
            return None if found[0] else dict(zip(schema, found[1:], strict=True))
        row = conn.execute(f"select {names} from {_ident('_synced_' + name)} where _key = ?", [key]).fetchone()
        return dict(zip(schema, row, strict=True)) if row else None

    def _overlay(
        self, conn: sqlite3.Connection, name: str, key: str, op: str, text_row: Mapping[str, str | None]
    ) -> None:
        """Replay one local write over the key's visible row, in the overlay (a key enters it with a copy of its
        synced row, if any). An update of a row that is not visible changes nothing, as on the server."""
        overlay = _ident(_overlay_table(name))
        found = conn.execute(f"select _deleted from {overlay} where _key = ?", [key]).fetchone()
        if found is None:
            names = ", ".join(_ident(c) for c in self._schemas[name])
            copied = conn.execute(
                f"insert into {overlay} (_key, _pending, _deleted, {names}) "
                f"select _key, 0, 0, {names} from {_ident('_synced_' + name)} where _key = ?",
                [key],
            ).rowcount
            exists = copied > 0
        else:
            exists = not found[0]
        if op == "delete":
            conn.execute(
                f"insert into {overlay} (_key, _pending, _deleted) values (?, 0, 1) "
                "on conflict (_key) do update set _deleted = 1, _pending = 0",
                [key],
            )
            return
        columns = [c for c in text_row if c in self._schemas[name]]
        if exists or op == "update":
            if exists and columns:
                sets = ", ".join(f"{_ident(c)} = ?" for c in columns)
                conn.execute(
                    f"update {overlay} set {sets}, _pending = _pending + 1 where _key = ?",
                    [*(text_row[c] for c in columns), key],
                )
            return
        conn.execute(f"delete from {overlay} where _key = ?", [key])  # a pending delete, inserted again
        names = ", ".join(["_key", "_pending", "_deleted", *(_ident(c) for c in columns)])
        marks = ", ".join(["?"] * (len(columns) + 3))
        conn.execute(f"insert into {overlay} ({names}) values ({marks})", [key, 1, 0, *(text_row[c] for c in columns)])

    def outbox(self, *, state: str | None = None, limit: int = 1000, after: int = 0) -> list[OutboxItem]:
        """Outbox items in order (all, or those in ``state``), from sequence number ``after`` on (exclusive: the
        sender skips the batch whose acknowledgement is still being written)."""
        where, params = ("where seq > ? and state = ?", [after, state]) if state else ("where seq > ?", [after])
        with self._lock:
            found = self._conn.execute(
                "select seq, mutation_id, shape, op, row, base, written_at, state, txid, lsn "
                f"from _pgferry_outbox {where} order by seq limit ?",
                [*params, limit],
            ).fetchall()
        # msgspec decodes the stored JSON (the same values as json.loads) several times faster: the sender reads a
        # whole batch of items per request.
        decode = _DECODE_JSON
        return [
            OutboxItem(seq, mid, shape, op, decode(row)["json"], decode(base) if base else None, written, st, txid, lsn)
            for seq, mid, shape, op, row, base, written, st, txid, lsn in found
        ]

    def count_outbox(self, *, state: str | None = None) -> int:
        """How many outbox items there are (in ``state``): a count, not the items (cheap to poll)."""
        where, params = ("where state = ?", [state]) if state else ("", [])
        with self._lock:
            row = self._conn.execute(f"select count(*) from _pgferry_outbox {where}", params).fetchone()
        return int(row[0])

    def acknowledge(self, results: Iterable[Mapping[str, Any]], *, followed: Container[str] | None = None) -> None:
        """Record the write API's results: items become ``sent`` with their txid and commit position (``lsn``), or
        are dropped at once when they changed nothing, their txid already streamed in, their shape's last applied
        up-to-date was past their commit, or their shape is not in ``followed`` (the shapes the client streams;
        ``None``: all). See the module docstring."""
        results = list(results)
        with self._transaction() as conn:
            # A batch's results share one txid (or a few, with replays): look the txids up once, then mark the
            # items sent in one executemany; only the few that settle at once are read and rebuilt one by one.
            txids = {int(r["txid"]) for r in results if r.get("txid")}
            seen: set[int] = set()
            if txids:
                marks = ", ".join("?" * len(txids))
                seen = {
                    row[0]
                    for row in conn.execute(
                        f"select txid from _pgferry_seen_txids where txid in ({marks})", list(txids)
                    )
                }
            shapes = self._shapes_of(conn, results) if followed is not None or self._processed else {}
            sent: list[tuple[int | None, int | None, str]] = []
            touched: dict[str, set[str]] = {}
            for result in results:
                txid = int(result["txid"]) if result.get("txid") else None
                lsn = lsn_number(result.get("lsn"))
                shape = shapes.get(result["id"])
                if (
                    result.get("changed") is not False
                    and txid not in seen
                    and (shape is None or not self._settles_on_acknowledgement(shape, lsn, followed))
                ):
                    sent.append((txid, lsn, result["id"]))
                    continue
                item = conn.execute(
                    "delete from _pgferry_outbox where mutation_id = ? returning shape, row_key", [result["id"]]
                ).fetchone()
                if item is not None:
                    touched.setdefault(item[0], set()).add(item[1])
            conn.executemany("update _pgferry_outbox set state = 'sent', txid = ?, lsn = ? where mutation_id = ?", sent)
            for name, keys in touched.items():
                self._rebuild(conn, name, keys)

    def reject(self, problems: Iterable[Mapping[str, Any]]) -> list[Rejection]:
        """Drop rejected mutations and roll their optimistic state back; the rejections are kept and returned."""
        rejected: list[Rejection] = []
        with self._transaction() as conn:
            touched: dict[str, set[str]] = {}
            for problem in problems:
                item = conn.execute(
                    "select shape, op, row, row_key from _pgferry_outbox where mutation_id = ?", [problem.get("id")]
                ).fetchone()
                if item is None:
                    continue
                shape, op, row, key = item
                conn.execute("delete from _pgferry_outbox where mutation_id = ?", [problem["id"]])
                conn.execute(
                    "insert or replace into _pgferry_rejected values (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        problem["id"],
                        shape,
                        op,
                        row,
                        problem.get("field"),
                        problem.get("problem", ""),
                        int(problem.get("status", 400)),
                        time.time(),
                    ],
                )
                touched.setdefault(shape, set()).add(key)
                rejected.append(
                    Rejection(
                        problem["id"],
                        shape,
                        op,
                        json.loads(row)["json"],
                        problem.get("field"),
                        str(problem.get("problem", "")),
                        int(problem.get("status", 400)),
                    )
                )
            for name, keys in touched.items():
                self._rebuild(conn, name, keys)
        return rejected

    # -- rebuilding visible rows --------------------------------------------------------------------------------------

    @staticmethod
    def _shapes_of(conn: sqlite3.Connection, results: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        """The shape of each acknowledged item, by mutation id."""
        ids = [str(r["id"]) for r in results]
        found: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ", ".join("?" * len(part))
            found.update(
                conn.execute(f"select mutation_id, shape from _pgferry_outbox where mutation_id in ({marks})", part)
            )
        return found

    def _drop_seen(self, conn: sqlite3.Connection, name: str, processed_lsn: int | None = None) -> set[str]:
        """Drop the shape's sent items whose txid streamed in or whose commit the up-to-date being applied is past."""
        found = conn.execute(
            "select mutation_id, row_key from _pgferry_outbox where shape = ? and state = 'sent' "
            "and (txid in (select txid from _pgferry_seen_txids) or lsn <= ?)",
            [name, processed_lsn],
        ).fetchall()
        conn.executemany("delete from _pgferry_outbox where mutation_id = ?", [(r[0],) for r in found])
        return {r[1] for r in found}

    def _rebuild(self, conn: sqlite3.Connection, name: str, keys: Iterable[str]) -> None:
        """Visible rows of ``keys`` = synced row + the key's remaining outbox items replayed in order: the keys
        leave the overlay, and those with items left enter it again by replaying them."""
        # Set-based: the keys go into a temporary table, then one statement clears them from the overlay and one
        # reads the outbox items left to replay (a boundary touches thousands of keys when an outbox drains).
        conn.execute("create temp table if not exists _pgferry_keys (key text primary key)")
        conn.execute("delete from _pgferry_keys")
        conn.executemany("insert or ignore into _pgferry_keys (key) values (?)", [(key,) for key in keys])
        conn.execute(f"delete from {_ident(_overlay_table(name))} where _key in (select key from _pgferry_keys)")
        for op, key, row in conn.execute(
            "select op, row_key, row from _pgferry_outbox where shape = ? "
            "and row_key in (select key from _pgferry_keys) order by seq",
            [name],
        ).fetchall():
            self._overlay(conn, name, key, op, json.loads(row)["text"])

    def _rebuild_all(self, conn: sqlite3.Connection, name: str) -> None:
        """Visible rows = all synced rows + every remaining outbox item replayed in order: the overlay is emptied
        and refilled from the outbox (the synced rows are never copied)."""
        conn.execute(f"delete from {_ident(_overlay_table(name))}")
        pending = conn.execute(
            "select op, row_key, row from _pgferry_outbox where shape = ? order by seq", [name]
        ).fetchall()
        for op, key, row in pending:
            self._overlay(conn, name, key, op, json.loads(row)["text"])

    def rejections(self) -> list[Rejection]:
        with self._lock:
            found = self._conn.execute(
                "select mutation_id, shape, op, row, field, problem, status from _pgferry_rejected order by rejected_at"
            ).fetchall()
        return [Rejection(m, s, o, json.loads(r)["json"], f, p, st) for m, s, o, r, f, p, st in found]
