"""The local replica on PostgreSQL: the same contract as the SQLite :class:`~pgferry.client.replica.LocalReplica`,
in any database a ``postgresql://`` URL names, with the synced columns in their native types.

Why: an agent that already runs next to a PostgreSQL (or wants SQL with real types, indexes and extensions over
its synced data) gets the replica there instead of in a SQLite file. Everything lives in one schema
(``pgferry_replica`` unless the URL carries ``?replica_schema=name``):

- ``"_synced_<name>"`` and ``"<name>"`` per shape, like the SQLite replica (the server's state as of the stored
  offset; what the application reads, pending local writes replayed over it), but typed: ``uuid``, ``jsonb``,
  arrays (``text[]``, ``int4[]`` …), ``timestamptz``, ``numeric`` … as the stream's schema says, ``vector`` when the
  pgvector extension is installed in that database (else the vector's text, exact). Types it does not know (enums,
  domains, extension types) are kept as their text, so nothing is lost. Values go in and come out as PostgreSQL's
  text form (the session runs in UTC with ISO dates, as the server renders them), so reads through
  :mod:`pgferry.client.values` give the same Python values as the SQLite replica.
- ``_pgferry_shapes`` (offset, handle, schema), ``_pgferry_outbox``, ``_pgferry_seen_txids`` and
  ``_pgferry_rejected``: the same bookkeeping, durable in the database, and the same settling of acknowledged items
  (by txid, or by commit position against ``global_last_seen_lsn``: see :mod:`pgferry.client.replica`). Changes
  and the new offset/handle commit in **one** PostgreSQL transaction at each up-to-date boundary; changes staged
  before it sit in a TEMP table, so a crash leaves neither staged rows nor a moved offset.

Synchronous (psycopg 3, one connection behind a lock); the async client calls it on a worker thread. Owns the
PostgreSQL storage of a replica; must not do HTTP.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pgferry.client._shape_base import Change, ShapeBatch, lsn_number
from pgferry.client.replica import OutboxItem, Rejection, ShapeSchemas
from pgferry.client.values import parse_value

__all__ = ["DEFAULT_SCHEMA", "PostgresReplica", "StagedChangesLost"]

DEFAULT_SCHEMA: Final = "pgferry_replica"

_META: Final = """
create table if not exists _pgferry_shapes (
  name text primary key, source_table text not null, "offset" text not null, handle text, schema jsonb not null
);
create table if not exists _pgferry_outbox (
  seq bigint generated always as identity primary key,
  mutation_id text not null unique,
  shape text not null,
  op text not null,
  row_key text not null,
  row jsonb not null,
  base jsonb,
  written_at bigint not null,
  state text not null default 'pending',
  txid bigint,
  lsn bigint
);
-- a replica from before items carried their commit position
alter table _pgferry_outbox add column if not exists lsn bigint;
create index if not exists _pgferry_outbox_key on _pgferry_outbox (shape, row_key);
create index if not exists _pgferry_outbox_state on _pgferry_outbox (state, txid);
create table if not exists _pgferry_seen_txids (txid bigint primary key, seen_at double precision not null);
create table if not exists _pgferry_rejected (
  mutation_id text primary key, shape text not null, op text not null, row jsonb not null,
  field text, problem text not null, status integer not null, rejected_at double precision not null
)
"""

#: Stream txids remembered for matching acknowledgements that arrive after the change itself.
_SEEN_TXIDS_KEPT: Final = 100_000

#: Above this many changes at one boundary the visible table is rebuilt whole rather than by key.
_REBUILD_BY_KEY_UP_TO: Final = 10_000

#: Column types kept natively (the stream's type names are PostgreSQL's own); anything else is stored as text.
_NATIVE: Final = frozenset(
    {
        "int2",
        "int4",
        "int8",
        "float4",
        "float8",
        "numeric",
        "bool",
        "text",
        "varchar",
        "uuid",
        "json",
        "jsonb",
        "timestamptz",
        "timestamp",
        "date",
        "time",
        "timetz",
        "interval",
        "bytea",
        "inet",
        "cidr",
        "macaddr",
    }
)

Op = Literal["insert", "update", "delete"]


class StagedChangesLost(psycopg.OperationalError):
    """The connection to the replica's database was lost between staging and applying: the staged changes are
    gone, so the boundary cannot be applied; the stream must start again from the stored position."""


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def _split_url(url: str) -> tuple[str, str]:
    """The connection URL without ``replica_schema`` (libpq would refuse it), and that schema."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "replica_schema"), DEFAULT_SCHEMA)
    rest = urlencode([(k, v) for k, v in query if k != "replica_schema"])
    return urlunsplit(parts._replace(query=rest)), schema


class PostgresReplica(ShapeSchemas):
    """``PostgresReplica("postgresql://…")``. Thread-safe: one connection behind a lock."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        self._conninfo, from_url = _split_url(url)
        self.path = url
        self.namespace = schema or from_url
        self._lock = threading.RLock()
        #: Shapes with a typed staging table (TEMP, this connection's) and its columns.
        self._staging: dict[str, list[str]] = {}
        #: Shapes with staged changes of any kind, and those whose staged changes a lost connection took along.
        self._staged: set[str] = set()
        self._lost: set[str] = set()
        self._closed = False
        self._processed: dict[str, int] = {}
        self._conn = self._connect()
        with self._lock:
            self._schemas: dict[str, dict[str, Any]] = {
                name: schema for name, schema in self._connection().execute("select name, schema from _pgferry_shapes")
            }

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._conninfo, autocommit=True, application_name="pgferry-replica")
        # The server renders values in UTC with ISO dates; so must the replica, or text would not round-trip.
        conn.execute("set timezone to 'UTC'")
        conn.execute("set datestyle to 'ISO, MDY'")
        conn.execute("set intervalstyle to 'postgres'")
        conn.execute("set extra_float_digits to 1")
        with conn.transaction():
            conn.execute(sql.SQL("create schema if not exists {}").format(_ident(self.namespace)))
            conn.execute(sql.SQL("set search_path to {}, public").format(_ident(self.namespace)))  # query() sees shapes
            for statement in _META.split(";"):
                if statement.strip():
                    conn.execute(statement)
        found = conn.execute("select oid::regtype::text from pg_type where typname = 'vector' limit 1").fetchone()
        self._vector_type: str | None = str(found[0]) if found else None
        # Staged changes of a boundary that has not come yet; TEMP, so they end with the connection (a crash).
        conn.execute(
            "create temp table if not exists _pgferry_staged (seq bigint generated always as identity primary "
            "key, shape text not null, key text not null, op text not null, value jsonb not null, "
            "txids bigint[] not null)"
        )
        return conn

    def _connection(self) -> psycopg.Connection[Any]:
        """The connection, opened again if the server dropped it (a restart, an idle timeout): the replica lives in
        a database that may be across a network. Its TEMP tables went with the old connection, so shapes that had
        staged changes are marked lost: their :meth:`apply` refuses until :meth:`discard_staged` (the client then
        restarts the stream from the stored position), so an offset is never stored without its staged rows."""
        with self._lock:
            if (self._conn.closed and not self._closed) or self._conn.broken:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
                self._lost |= self._staged
                self._staged.clear()
                self._staging.clear()
                self._conn = self._connect()
            return self._conn

    def _read(self, query: Any, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Rows of a read, tried once more on a new connection when the server dropped the old one: a read
        stages nothing, so it can simply be repeated (a write's transaction is not: it raises)."""
        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    cursor = conn.execute(query, params)
                    return cursor.fetchall() if cursor.description else []
                except psycopg.OperationalError:
                    if attempt == 2 or not conn.broken:
                        raise
            raise AssertionError("unreachable")

    # -- transactions ---------------------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                yield conn

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._conn.close()

    def _table(self, name: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(_ident(self.namespace), _ident(name))

    def column_type(self, entry: Mapping[str, Any]) -> str:
        """The PostgreSQL type a column of the stream's schema is stored as here."""
        type_name = str(entry.get("type", "text"))
        if type_name == "vector":
            return self._vector_type if self._vector_type and not entry.get("dims") else "text"
        if type_name not in _NATIVE:
            return "text"  # enums, domains, extension types: their text, exactly as the server sent it
        return f"{type_name}[]" if entry.get("dims") else type_name

    def _cast(self, name: str, column: str) -> sql.Composable:
        return sql.SQL(self.column_type(self._schemas[name][column]))

    # -- shapes ---------------------------------------------------------------------------------------------------

    def position(self, name: str) -> tuple[str, str | None] | None:
        """The stored ``(offset, handle)`` of a shape, to resume its stream; ``None`` if never synced."""
        found = self._read('select "offset", handle from _pgferry_shapes where name = %s', [name])
        return (str(found[0][0]), found[0][1]) if found else None

    def stage(
        self,
        name: str,
        changes: Sequence[Change],
        *,
        schema: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> None:
        """Park changes of a long stretch before the next up-to-date (a large snapshot) in a TEMP table, not in
        memory; the next :meth:`apply` moves them in, in its one transaction. Invisible until then, gone after a
        crash (the offset did not move either).

        With the shape's ``schema`` (the stream's), inserts go by COPY into a typed TEMP table of their own
        (``_pgferry_stage_<name>``, PostgreSQL parsing each value once), so :meth:`apply` moves a staged snapshot
        into the synced table with one statement; an update or delete is kept as JSON beside them, in order.
        ``replace`` (the next apply resets the shape) is accepted for the SQLite replica's interface and changes
        nothing here: a staged snapshot is moved in with one statement either way."""
        del replace
        schema = schema or self._schemas.get(name)
        if not schema:
            with (
                self._transaction() as conn,
                conn.cursor() as cursor,
                cursor.copy("copy _pgferry_staged (shape, key, op, value, txids) from stdin") as copy,
            ):
                for c in changes:
                    copy.write_row((name, c.key, c.operation, Jsonb(dict(c.value)), list(c.txids)))
            self._staged.add(name)
            return
        with self._transaction() as conn:
            columns = self._staging.get(name)
            table = sql.Identifier(f"_pgferry_stage_{name}")
            if columns is None:
                columns = list(schema)
                typed = sql.SQL(", ").join(
                    sql.SQL("{} {}").format(_ident(c), sql.SQL(self.column_type(schema[c]))) for c in columns
                )
                conn.execute(
                    sql.SQL(
                        "create temp table {} (_seq bigint generated always as identity primary key, "
                        '_op text not null, _key text collate "C" not null, _txids bigint[] not null, '
                        "_value jsonb, {})"
                    ).format(table, typed)
                )
            names = sql.SQL(", ").join(_ident(c) for c in ("_op", "_key", "_txids", "_value", *columns))
            nulls = (None,) * len(columns)
            with (
                conn.cursor() as cursor,
                cursor.copy(sql.SQL("copy pg_temp.{} ({}) from stdin").format(table, names)) as copy,
            ):
                for c in changes:
                    if c.operation == "insert":
                        copy.write_row(("insert", c.key, list(c.txids), None, *(c.value.get(k) for k in columns)))
                    else:
                        copy.write_row((c.operation, c.key, list(c.txids), Jsonb(dict(c.value)), *nulls))
        self._staging[name] = columns  # the table exists (committed) from here on
        self._staged.add(name)

    def _apply_typed_stage(
        self,
        conn: psycopg.Connection[Any],
        name: str,
        touched: set[str],
        txids: set[int],
        *,
        already: int,
    ) -> int:
        """Move the typed staging table's rows into the synced table, in order, and drop it. Only inserts (a
        snapshot): one ``insert … select distinct on (_key)`` (the last insert of a key wins); otherwise replayed
        change by change through :meth:`_apply_changes`."""
        staged_columns = self._staging.get(name)
        if staged_columns is None:
            return 0
        table = sql.Identifier(f"_pgferry_stage_{name}")
        columns = list(self._schemas[name])
        row = conn.execute(
            sql.SQL("select count(*), coalesce(bool_or(_op <> 'insert'), false) from pg_temp.{}").format(table)
        ).fetchone()
        count, mixed = (int(row[0]), bool(row[1])) if row else (0, False)
        if count and not mixed:
            common = [c for c in staged_columns if c in columns]
            listed = sql.SQL(", ").join(_ident(c) for c in ("_key", *common))
            sets = sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(_ident(c)) for c in columns)
            conn.execute(
                sql.SQL(
                    "insert into {} ({}) select distinct on (_key) {} from pg_temp.{} order by _key, _seq desc "
                    "on conflict (_key) do update set {}"
                ).format(self._table(f"_synced_{name}"), listed, listed, table, sets)
            )
            txids.update(
                t for (t,) in conn.execute(sql.SQL("select distinct unnest(_txids) from pg_temp.{}").format(table))
            )
            if already + count <= _REBUILD_BY_KEY_UP_TO:
                touched.update(k for (k,) in conn.execute(sql.SQL("select _key from pg_temp.{}").format(table)))
        elif count:
            listed = sql.SQL(", ").join(sql.SQL("{}::text").format(_ident(c)) for c in staged_columns)
            with conn.cursor(name="pgferry_typed_stage") as cursor:
                cursor.itersize = 2000
                cursor.execute(
                    sql.SQL("select _op, _key, _txids, _value, {} from pg_temp.{} order by _seq").format(listed, table)
                )
                from_disk = (
                    Change(
                        key,
                        op,
                        value if op != "insert" else dict(zip(staged_columns, rest, strict=True)),
                        tuple(found),
                    )
                    for op, key, found, value, *rest in cursor
                )
                self._apply_changes(conn, name, from_disk, touched, txids, already=already)
        conn.execute(sql.SQL("drop table pg_temp.{}").format(table))
        return count

    def stage_pages(
        self, name: str, pages: Sequence[ShapeBatch], *, schema: Mapping[str, Any] | None = None, replace: bool = False
    ) -> None:
        """:meth:`stage` for the changes of whole pages, in order (decoded here: on the caller's thread)."""
        self.stage(name, [change for page in pages for change in page.decoded()], schema=schema, replace=replace)

    def discard_staged(self, name: str) -> None:
        """Forget staged changes (the shape must be refetched)."""
        with self._transaction() as conn:
            conn.execute("delete from _pgferry_staged where shape = %s", [name])
            conn.execute(sql.SQL("drop table if exists pg_temp.{}").format(sql.Identifier(f"_pgferry_stage_{name}")))
        self._staging.pop(name, None)
        self._staged.discard(name)
        self._lost.discard(name)

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
        """Apply the changes gathered up to an up-to-date boundary (staged ones first), with the new position, in
        one transaction; ``reset`` replaces the shape's rows (after a must-refetch). Returns the txids seen, and
        settles the outbox items they acknowledge and those committed at or before ``processed_lsn`` (the
        up-to-date's ``global_last_seen_lsn``). Raises :class:`StagedChangesLost` when a lost connection took
        this shape's staged changes along (the stream must restart from the stored position)."""
        with self._lock:
            self._connection()
            if name in self._lost:
                raise StagedChangesLost(f"the staged changes of {name} were lost with the replica's connection")
        with self._transaction() as conn:
            if schema is not None and (reset or dict(schema) != self._schemas.get(name)):
                self._ensure_tables(conn, name, dict(schema))
            synced = self._table(f"_synced_{name}")
            if reset:
                conn.execute(sql.SQL("delete from {}").format(synced))
            touched: set[str] = set()
            txids: set[int] = set()
            with conn.cursor(name="pgferry_staged") as staged:
                staged.itersize = 2000
                staged.execute(
                    "select key, op, value, txids from _pgferry_staged where shape = %s order by seq", [name]
                )
                from_disk = (Change(k, o, v, tuple(t)) for k, o, v, t in staged)
                count = self._apply_changes(conn, name, from_disk, touched, txids)
            conn.execute("delete from _pgferry_staged where shape = %s", [name])
            count += self._apply_typed_stage(conn, name, touched, txids, already=count)
            count += self._apply_changes(conn, name, changes, touched, txids, already=count)
            conn.execute(
                'insert into _pgferry_shapes (name, source_table, "offset", handle, schema) '
                "values (%s, %s, %s, %s, %s) on conflict (name) do update set "
                '"offset" = excluded."offset", handle = excluded.handle, schema = excluded.schema',
                [name, source_table, offset, handle, Jsonb(self._schemas[name])],
            )
            if txids:
                now = time.time()
                with conn.cursor() as cursor:
                    cursor.executemany(
                        "insert into _pgferry_seen_txids (txid, seen_at) values (%s, %s) on conflict do nothing",
                        [(t, now) for t in txids],
                    )
                conn.execute(
                    "delete from _pgferry_seen_txids where seen_at < "
                    "(select seen_at from _pgferry_seen_txids order by seen_at desc offset %s limit 1)",
                    [_SEEN_TXIDS_KEPT],
                )
            settled = self._drop_seen(conn, name, processed_lsn)
            if reset:  # every acknowledged write is in the new snapshot or its log so far (see replica.py)
                conn.execute("delete from _pgferry_outbox where shape = %s and state = 'sent'", [name])
            if reset or count > _REBUILD_BY_KEY_UP_TO:
                self._rebuild_all(conn, name)
            else:
                self._rebuild(conn, name, touched | settled)
        self._staging.pop(name, None)  # committed: the typed staging table was dropped with it
        self._staged.discard(name)
        self._record_processed(name, processed_lsn)
        return txids

    def _ensure_tables(self, conn: psycopg.Connection[Any], name: str, schema: dict[str, Any]) -> None:
        """Create (or, when the server's columns changed, recreate) the shape's two tables, typed."""
        old = self._schemas.get(name)
        synced, visible = self._table(f"_synced_{name}"), self._table(name)
        if old is not None and old != schema:
            conn.execute(sql.SQL("drop table if exists {}").format(synced))
            conn.execute(sql.SQL("drop table if exists {}").format(visible))
        self._schemas[name] = schema
        columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(_ident(c), sql.SQL(self.column_type(entry))) for c, entry in schema.items()
        )
        conn.execute(
            sql.SQL('create table if not exists {} (_key text collate "C" primary key, {})').format(synced, columns)
        )
        conn.execute(
            sql.SQL(
                'create table if not exists {} (_key text collate "C" primary key, '
                "_pending integer not null default 0, {})"
            ).format(visible, columns)
        )

    def _apply_changes(
        self,
        conn: psycopg.Connection[Any],
        name: str,
        changes: Iterable[Change],
        touched: set[str],
        txids: set[int],
        *,
        already: int = 0,
    ) -> int:
        """Apply changes in order. A run of inserts with the same columns goes in by COPY into a typed TEMP table
        and one upsert (a snapshot is all inserts; PostgreSQL parses each value's text as its column's type);
        updates and deletes one by one between runs. Collects touched keys (up to the limit) and txids."""
        columns = list(self._schemas[name])
        known = set(columns)
        synced = self._table(f"_synced_{name}")
        run: dict[str, list[str | None]] = {}
        run_columns: tuple[str, ...] | None = None
        count = 0
        incoming = sql.Identifier(f"_pgferry_in_{name}")
        created = False

        def flush() -> None:
            nonlocal created
            if not run or run_columns is None:
                run.clear()
                return
            if not created:  # only when there are inserts: a live boundary of updates needs no DDL
                conn.execute(sql.SQL("drop table if exists pg_temp.{}").format(incoming))
                conn.execute(sql.SQL("create temp table {} (like {}) on commit drop").format(incoming, synced))
                created = True
            names = sql.SQL(", ").join(_ident(c) for c in ("_key", *run_columns))
            with conn.cursor() as cursor:
                with cursor.copy(sql.SQL("copy pg_temp.{} ({}) from stdin").format(incoming, names)) as copy:
                    for key, values in run.items():
                        copy.write_row([key, *values])
                # Like SQLite's insert or replace: an insert replaces the whole row (columns it lacks are NULL).
                every = sql.SQL(", ").join(_ident(c) for c in ("_key", *columns))
                sets = sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(_ident(c)) for c in columns)
                cursor.execute(
                    sql.SQL("insert into {} ({}) select {} from pg_temp.{} on conflict (_key) do update set {}").format(
                        synced, every, every, incoming, sets
                    )
                )
                cursor.execute(sql.SQL("truncate pg_temp.{}").format(incoming))
            run.clear()

        for change in changes:
            count += 1
            if already + count <= _REBUILD_BY_KEY_UP_TO:
                touched.add(change.key)
            txids.update(change.txids)
            if change.operation == "insert":
                present = tuple(c for c in change.value if c in known)
                if present != run_columns or len(run) >= 5000:
                    flush()
                    run_columns = present
                run.pop(change.key, None)  # one row per key in an upsert; the later insert wins
                run[change.key] = [change.value[c] for c in present]
                continue
            flush()
            if change.operation == "delete":
                conn.execute(sql.SQL("delete from {} where _key = %s").format(synced), [change.key])
                continue
            present_columns = [c for c in change.value if c in known]
            if present_columns:
                sets = sql.SQL(", ").join(
                    sql.SQL("{} = %s::{}").format(_ident(c), self._cast(name, c)) for c in present_columns
                )
                conn.execute(
                    sql.SQL("update {} set {} where _key = %s").format(synced, sets),
                    [*(change.value[c] for c in present_columns), change.key],
                )
        flush()
        return count

    # -- reading ----------------------------------------------------------------------------------------------------

    def rows(self, name: str, *, typed: bool = True, synced: bool = False) -> list[dict[str, Any]]:
        """Every visible row (synced with pending local writes over it; ``synced=True``: the server's state only),
        typed by the shape's schema unless ``typed=False`` (PostgreSQL text), like the SQLite replica."""
        schema = self.schema(name)
        if not schema:
            return []
        table = self._table(f"_synced_{name}" if synced else name)
        listed = sql.SQL(", ").join(sql.SQL("{}::text").format(_ident(c)) for c in schema)
        found = self._read(sql.SQL("select {} from {} order by _key").format(listed, table))
        result = []
        for row in found:
            values = dict(zip(schema, row, strict=True))
            result.append({c: parse_value(v, schema[c]) for c, v in values.items()} if typed else values)
        return result

    def query(self, sql_text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only SQL query on the replica (psycopg placeholders, ``%s``; native values). The shapes'
        tables are on the search path by their names."""
        return self._read(sql_text.encode(), params or None)

    def pending_keys(self, name: str) -> set[str]:
        return {r[0] for r in self._read(sql.SQL("select _key from {} where _pending > 0").format(self._table(name)))}

    # -- local writes and the outbox ------------------------------------------------------------------------------

    def source_table(self, name: str) -> str | None:
        """The ``schema.table`` shape ``name`` was synced from (``None``: never synced)."""
        source = self._read("select source_table from _pgferry_shapes where name = %s", [name])
        return str(source[0][0]) if source else None

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
        transaction. Returns the mutation id."""
        if name not in self._schemas:
            raise KeyError(f"{name} is not synced yet; call setup_sync and wait for it first")
        mutation_id = str(uuid.uuid4())
        key = self.key_of(name, text_row)
        written_at = written_at if written_at is not None else int(time.time() * 1000)
        with self._transaction() as conn:
            base = self._visible(conn, name, key)
            conn.execute(
                "insert into _pgferry_outbox (mutation_id, shape, op, row_key, row, base, written_at) "
                "values (%s, %s, %s, %s, %s, %s, %s)",
                [
                    mutation_id,
                    name,
                    op,
                    key,
                    Jsonb({"text": dict(text_row), "json": dict(json_row)}),
                    Jsonb(base) if base is not None else None,
                    written_at,
                ],
            )
            self._overlay(conn, name, key, op, text_row)
        return mutation_id

    def _visible(self, conn: psycopg.Connection[Any], name: str, key: str) -> dict[str, Any] | None:
        schema = self._schemas[name]
        listed = sql.SQL(", ").join(sql.SQL("{}::text").format(_ident(c)) for c in schema)
        row = conn.execute(
            sql.SQL("select {} from {} where _key = %s").format(listed, self._table(name)), [key]
        ).fetchone()
        return dict(zip(schema, row, strict=True)) if row else None

    def _overlay(
        self, conn: psycopg.Connection[Any], name: str, key: str, op: str, text_row: Mapping[str, str | None]
    ) -> None:
        table = self._table(name)
        if op == "delete":
            conn.execute(sql.SQL("delete from {} where _key = %s").format(table), [key])
            return
        columns = [c for c in text_row if c in self._schemas[name]]
        exists = conn.execute(sql.SQL("select 1 from {} where _key = %s").format(table), [key]).fetchone()
        if exists or op == "update":
            if exists and columns:
                sets = sql.SQL(", ").join(
                    sql.SQL("{} = %s::{}").format(_ident(c), self._cast(name, c)) for c in columns
                )
                conn.execute(
                    sql.SQL("update {} set {}, _pending = _pending + 1 where _key = %s").format(table, sets),
                    [*(text_row[c] for c in columns), key],
                )
            return
        names = sql.SQL(", ").join(_ident(c) for c in ("_key", "_pending", *columns))
        marks = sql.SQL(", ").join(
            [sql.SQL("%s"), sql.SQL("1"), *(sql.SQL("%s::{}").format(self._cast(name, c)) for c in columns)]
        )
        conn.execute(
            sql.SQL("insert into {} ({}) values ({})").format(table, names, marks),
            [key, *(text_row[c] for c in columns)],
        )

    def outbox(self, *, state: str | None = None, limit: int = 1000, after: int = 0) -> list[OutboxItem]:
        """Outbox items in order (all, or those in ``state``), from sequence number ``after`` on (exclusive)."""
        where, params = ("where seq > %s and state = %s", [after, state]) if state else ("where seq > %s", [after])
        found = self._read(
            "select seq, mutation_id, shape, op, row, base, written_at, state, txid, lsn "
            f"from _pgferry_outbox {where} order by seq limit %s",
            [*params, limit],
        )
        return [
            OutboxItem(seq, mid, shape, op, row["json"], base, written, st, txid, lsn)
            for seq, mid, shape, op, row, base, written, st, txid, lsn in found
        ]

    def count_outbox(self, *, state: str | None = None) -> int:
        """How many outbox items there are (in ``state``): a count, not the items (cheap to poll)."""
        where, params = ("where state = %s", [state]) if state else ("", [])
        found = self._read(f"select count(*) from _pgferry_outbox {where}", params)
        return int(found[0][0]) if found else 0

    def acknowledge(self, results: Iterable[Mapping[str, Any]], *, followed: Container[str] | None = None) -> None:
        """Record the write API's results: items become ``sent`` with their txid and commit position, or are dropped
        at once when they changed nothing, their txid already streamed in, their shape's last applied up-to-date was
        past their commit, or their shape is not in ``followed`` (``None``: all), as in the SQLite replica."""
        results = list(results)
        with self._transaction() as conn:
            txids = sorted({int(r["txid"]) for r in results if r.get("txid")})
            seen = {
                row[0] for row in conn.execute("select txid from _pgferry_seen_txids where txid = any(%s)", [txids])
            }
            shapes: dict[str, str] = {}
            if followed is not None or self._processed:
                shapes = dict(
                    conn.execute(
                        "select mutation_id, shape from _pgferry_outbox where mutation_id = any(%s)",
                        [[str(r["id"]) for r in results]],
                    ).fetchall()
                )
            sent: list[tuple[int | None, int | None, str]] = []
            touched: dict[str, set[str]] = {}
            for result in results:
                txid = int(result["txid"]) if result.get("txid") else None
                lsn = lsn_number(result.get("lsn"))
                shape = shapes.get(str(result["id"]))
                if (
                    result.get("changed") is not False
                    and txid not in seen
                    and (shape is None or not self._settles_on_acknowledgement(shape, lsn, followed))
                ):
                    sent.append((txid, lsn, result["id"]))
                    continue
                item = conn.execute(
                    "delete from _pgferry_outbox where mutation_id = %s returning shape, row_key", [result["id"]]
                ).fetchone()
                if item is not None:
                    touched.setdefault(item[0], set()).add(item[1])
            with conn.cursor() as cursor:
                cursor.executemany(
                    "update _pgferry_outbox set state = 'sent', txid = %s, lsn = %s where mutation_id = %s", sent
                )
            for name, keys in touched.items():
                self._rebuild(conn, name, keys)

    def reject(self, problems: Iterable[Mapping[str, Any]]) -> list[Rejection]:
        """Drop rejected mutations and roll their optimistic state back; the rejections are kept and returned."""
        rejected: list[Rejection] = []
        with self._transaction() as conn:
            touched: dict[str, set[str]] = {}
            for problem in problems:
                item = conn.execute(
                    "delete from _pgferry_outbox where mutation_id = %s returning shape, op, row, row_key",
                    [problem.get("id")],
                ).fetchone()
                if item is None:
                    continue
                shape, op, row, key = item
                conn.execute(
                    "insert into _pgferry_rejected values (%s, %s, %s, %s, %s, %s, %s, %s) "
                    "on conflict (mutation_id) do update set problem = excluded.problem",
                    [
                        problem["id"],
                        shape,
                        op,
                        Jsonb(row),
                        problem.get("field"),
                        str(problem.get("problem", "")),
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
                        row["json"],
                        problem.get("field"),
                        str(problem.get("problem", "")),
                        int(problem.get("status", 400)),
                    )
                )
            for name, keys in touched.items():
                self._rebuild(conn, name, keys)
        return rejected

    def rejections(self) -> list[Rejection]:
        found = self._read(
            "select mutation_id, shape, op, row, field, problem, status from _pgferry_rejected order by rejected_at"
        )
        return [Rejection(m, s, o, r["json"], f, p, st) for m, s, o, r, f, p, st in found]

    # -- rebuilding visible rows --------------------------------------------------------------------------------------

    def _drop_seen(self, conn: psycopg.Connection[Any], name: str, processed_lsn: int | None = None) -> set[str]:
        """Drop the shape's sent items whose txid streamed in or whose commit the up-to-date being applied is past."""
        found = conn.execute(
            "delete from _pgferry_outbox where shape = %s and state = 'sent' "
            "and (txid in (select txid from _pgferry_seen_txids) or lsn <= %s::bigint) returning row_key",
            [name, processed_lsn],
        ).fetchall()
        return {r[0] for r in found}

    def _copy_synced(self, conn: psycopg.Connection[Any], name: str, keys: list[str] | None) -> None:
        columns = sql.SQL(", ").join(_ident(c) for c in self._schemas[name])
        visible, synced = self._table(name), self._table(f"_synced_{name}")
        if keys is None:
            conn.execute(sql.SQL("delete from {}").format(visible))
            conn.execute(
                sql.SQL("insert into {} (_key, _pending, {}) select _key, 0, {} from {}").format(
                    visible, columns, columns, synced
                )
            )
            return
        conn.execute(sql.SQL("delete from {} where _key = any(%s)").format(visible), [keys])
        conn.execute(
            sql.SQL("insert into {} (_key, _pending, {}) select _key, 0, {} from {} where _key = any(%s)").format(
                visible, columns, columns, synced
            ),
            [keys],
        )

    def _rebuild(self, conn: psycopg.Connection[Any], name: str, keys: Iterable[str]) -> None:
        """Visible rows of ``keys`` = synced row + the key's remaining outbox items replayed in order."""
        wanted = sorted(set(keys))
        if not wanted:
            return
        self._copy_synced(conn, name, wanted)
        for op, key, row in conn.execute(
            "select op, row_key, row from _pgferry_outbox where shape = %s and row_key = any(%s) order by seq",
            [name, wanted],
        ).fetchall():
            self._overlay(conn, name, key, op, row["text"])

    def _rebuild_all(self, conn: psycopg.Connection[Any], name: str) -> None:
        self._copy_synced(conn, name, None)
        for op, key, row in conn.execute(
            "select op, row_key, row from _pgferry_outbox where shape = %s order by seq", [name]
        ).fetchall():
            self._overlay(conn, name, key, op, row["text"])
