"""Applying a logical replication stream to another database: in commit order, batched, exactly once.

The online migration follows the source with it (source → target) and, after cut-over, keeps the source an
exact copy of the target with it (target → source). Both directions need the same three things:

* **Order.** Changes are applied in commit order, one statement per change in effect; consecutive inserts
  into one table go as one ``COPY`` (values arrive as PostgreSQL's own text, which is exactly what COPY's
  text format reads), consecutive updates and deletes of one shape as one pipelined ``executemany``.
* **Speed.** Many source transactions become one target transaction (a batch), so the target commits a few
  times a second instead of once per source transaction; statements are prepared by psycopg after a few
  uses. The session runs with ``session_replication_role = replica``: no triggers (a target's ``updated_at``
  trigger would rewrite what the source decided), no foreign-key checks (the source checked them already).
  Where the role may not set that (it is reserved to superusers, and Neon's roles are not), the user triggers
  of each table are disabled by name the first time the table is written, in the same transaction, and
  recorded by the caller (``on_triggers_disabled``) so that they can be enabled again; foreign keys are
  then checked, which commit order satisfies.
* **Exactly once.** The position of the last applied transaction (its commit LSN) is written by the caller's
  ``record`` callback *inside the same target transaction* as the changes, so after a crash anywhere the
  stream is resumed from the slot and every transaction at or below the stored position is skipped.

It must not decide what to follow or when to stop (:mod:`pgferry.migrate.online` does), nor touch slots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from psycopg import sql

from pgferry.migrate.errors import MigrationError
from pgferry.replication import Lsn, RelationInfo, RowChange, Transaction, TruncateChange

__all__ = ["ApplyResult", "ChangeApplier", "SchemaChangedError"]

log = structlog.get_logger("pgferry.migrate.apply")

SET_BASED_ROWS = 16
"""Runs of updates or deletes at least this long go as one set-based statement instead of one per row."""
MARKER_PREFIX = "pgferry"
"""Prefix of the logical decoding messages pgferry emits (``pg_logical_emit_message``) to mark a position."""


class SchemaChangedError(MigrationError):
    """The stream carries a table whose columns the other side does not have: the follow stops, loses nothing."""


@dataclass
class ApplyResult:
    """What one batch did."""

    transactions: int = 0
    changes: int = 0
    skipped: int = 0
    last: Transaction | None = None
    markers: list[str] = field(default_factory=list)


@dataclass
class _Run:
    """Consecutive changes that can go to the server as one COPY or one executemany."""

    kind: str
    table: tuple[str, str]
    columns: tuple[str, ...]
    key: tuple[str, ...]
    exact_key: bool = True
    rows: list[Sequence[str | None]] = field(default_factory=list)


def _copy_text(value: str | None) -> str:
    if value is None:
        return "\\N"
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        value = value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return value


class ChangeApplier:
    """Applies transactions to the database behind ``conn`` (autocommit; this object opens the transactions).

    ``skip_before`` maps ``schema.table`` to a position: changes of that table in transactions that
    committed before it are already in the copy (it was copied under a later snapshot) and are skipped.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        *,
        skip_before: Mapping[str, Lsn] | None = None,
        on_triggers_disabled: Callable[[psycopg.Connection[Any], str, list[str]], None] | None = None,
    ) -> None:
        self.conn = conn
        self.skip_before = dict(skip_before or {})
        self.on_triggers_disabled = on_triggers_disabled
        self._quiet_tables: set[tuple[str, str]] = set()
        self._keys: dict[tuple[str, str], tuple[str, ...]] = {}
        self._columns: dict[tuple[str, str], set[str]] = {}
        self._checked: set[tuple[int, tuple[str, ...]]] = set()
        self._checked_relations: dict[int, RelationInfo] = {}
        self._type_names: dict[tuple[str, str], dict[str, str]] = {}
        try:
            with conn.transaction():
                conn.execute("set session_replication_role = replica")
            self.disables_triggers = False
        except psycopg.errors.InsufficientPrivilege:
            if on_triggers_disabled is None:
                raise
            self.disables_triggers = True  # see the module docstring

    def apply(
        self, transactions: Iterable[Transaction], record: Callable[[psycopg.Connection[Any], ApplyResult], None]
    ) -> ApplyResult:
        """Apply ``transactions`` in one database transaction, then ``record(conn, result)`` in it too."""
        result = ApplyResult()
        with self.conn.transaction():
            run: _Run | None = None
            for txn in transactions:
                for change in txn.changes:
                    if isinstance(change, TruncateChange):
                        self._flush(run)
                        run = None
                        self._truncate(change, txn)
                        result.changes += 1
                        continue
                    if self._skipped(change, txn):
                        result.skipped += 1
                        continue
                    run = self._add(run, change)
                    result.changes += 1
                for message in txn.messages:
                    if message.prefix == MARKER_PREFIX:
                        result.markers.append(bytes(message.content).decode())
                result.transactions += 1
                result.last = txn
            self._flush(run)
            record(self.conn, result)
        return result

    # -- building runs -----------------------------------------------------------------------------------
    def _skipped(self, change: RowChange, txn: Transaction) -> bool:
        if not self.skip_before:
            return False
        floor = self.skip_before.get(change.qualified_name)
        return floor is not None and txn.commit_lsn < floor

    def _add(self, run: _Run | None, change: RowChange) -> _Run:
        table = (change.schema, change.table)
        self._check_columns(change.relation)
        if self.disables_triggers and table not in self._quiet_tables:
            self._flush(run)
            run = None
            self._disable_user_triggers(table)
        if change.kind == "insert":
            assert change.new is not None
            columns = tuple(change.new)
            values: Sequence[str | None] = tuple(change.new.values())
            key: tuple[str, ...] = ()
            exact = True
        elif change.kind == "update":
            assert change.new is not None
            key, exact = self._key(table, change.relation)
            old = change.old if change.old is not None else change.new
            columns = tuple(c for c in change.new if c not in change.unchanged_toast_columns)
            values = (*(change.new[c] for c in columns), *(old.get(k) for k in key))
        else:
            key, exact = self._key(table, change.relation)
            old = change.old or {}
            columns = ()
            values = tuple(old.get(k) for k in key)
        if run is None or (run.kind, run.table, run.columns, run.key) != (change.kind, table, columns, key):
            self._flush(run)
            run = _Run(change.kind, table, columns, key, exact)
        run.rows.append(values)
        return run

    def _disable_user_triggers(self, table: tuple[str, str]) -> None:
        """Without ``session_replication_role``: the table's enabled user triggers off, by name, recorded."""
        qualified = sql.Identifier(*table)
        names = [
            str(r[0])
            for r in self.conn.execute(
                "select tgname from pg_catalog.pg_trigger where tgrelid = to_regclass(%s) and not tgisinternal "
                "and tgenabled <> 'D' order by tgname",
                (qualified.as_string(self.conn),),
            )
        ]
        for name in names:
            self.conn.execute(sql.SQL("alter table {} disable trigger {}").format(qualified, sql.Identifier(name)))
        if names and self.on_triggers_disabled is not None:
            self.on_triggers_disabled(self.conn, f"{table[0]}.{table[1]}", names)
        self._quiet_tables.add(table)

    def _key(self, table: tuple[str, str], relation: RelationInfo) -> tuple[tuple[str, ...], bool]:
        """The target's primary key (matched with ``=``, so its index serves it), else the stream's replica
        identity (all columns with FULL, matched with ``is not distinct from`` since some may be NULL)."""
        if table not in self._keys:
            rows = self.conn.execute(
                "select a.attname from pg_catalog.pg_index i "
                "cross join lateral unnest(i.indkey) with ordinality as k(attnum, ord) "
                "join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum "
                "where i.indrelid = to_regclass(%s) and i.indisprimary order by k.ord",
                (sql.Identifier(*table).as_string(self.conn),),
            ).fetchall()
            self._keys[table] = tuple(str(r[0]) for r in rows)
        primary = self._keys[table]
        return (primary, True) if primary else (relation.key_columns, False)

    def _check_columns(self, relation: RelationInfo) -> None:
        """A column the stream has and this side lacks means the source's schema changed: stop, name it."""
        if id(relation) in self._checked_relations:  # the same RelationInfo object until the stream resends it
            return
        names = tuple(c.name for c in relation.columns)
        if (relation.oid, names) in self._checked:
            self._checked_relations[id(relation)] = relation
            return
        table = (relation.schema, relation.table)
        if table not in self._columns:
            self._columns[table] = {
                str(r[0])
                for r in self.conn.execute(
                    "select attname from pg_catalog.pg_attribute where attrelid = to_regclass(%s) "
                    "and attnum > 0 and not attisdropped",
                    (sql.Identifier(*table).as_string(self.conn),),
                )
            }
        missing = [n for n in names if n not in self._columns[table]]
        if not self._columns[table]:
            raise SchemaChangedError(
                f"{relation.qualified_name} is in the replication stream but does not exist on the other side; "
                "create it there (its schema as on the source), then rerun the same command: it resumes"
            )
        if missing:
            raise SchemaChangedError(
                f"{relation.qualified_name} has column(s) {', '.join(missing)} on the source that the other side "
                f"lacks (a schema change during the follow); add them there (alter table {relation.qualified_name} "
                "add column …), then rerun the same command: it resumes where it stopped, nothing is lost"
            )
        self._checked.add((relation.oid, names))
        self._checked_relations[id(relation)] = relation  # kept alive, so the id is never reused

    # -- sending runs ------------------------------------------------------------------------------------
    def _flush(self, run: _Run | None) -> None:
        if run is None or not run.rows:
            return
        table = sql.Identifier(*run.table)
        if run.kind == "insert":
            columns = sql.SQL(", ").join(sql.Identifier(c) for c in run.columns)
            statement = sql.SQL("copy {} ({}) from stdin").format(table, columns)
            lines = "".join("\t".join(_copy_text(v) for v in row) + "\n" for row in run.rows)
            with self.conn.cursor() as cur, cur.copy(statement) as copy:
                copy.write(lines.encode())
        elif len(run.rows) >= SET_BASED_ROWS and run.exact_key and self._scalar_types(run):
            self._set_based(run, table)
        elif run.kind == "update":
            assignments = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in run.columns)
            statement = sql.SQL("update only {} set {} where {}").format(
                table, assignments, _key_match(run.key, run.exact_key)
            )
            with self.conn.cursor() as cur:
                cur.executemany(statement, run.rows)
        else:
            statement = sql.SQL("delete from only {} where {}").format(table, _key_match(run.key, run.exact_key))
            with self.conn.cursor() as cur:
                cur.executemany(statement, run.rows)
        run.rows = []

    def _types(self, table: tuple[str, str]) -> dict[str, str]:
        if table not in self._type_names:
            self._type_names[table] = {
                str(r[0]): str(r[1])
                for r in self.conn.execute(
                    "select a.attname, format_type(a.atttypid, a.atttypmod) from pg_catalog.pg_attribute a "
                    "join pg_catalog.pg_type t on t.oid = a.atttypid where a.attrelid = to_regclass(%s) "
                    "and a.attnum > 0 and not a.attisdropped and t.typcategory <> 'A'",
                    (sql.Identifier(*table).as_string(self.conn),),
                )
            }
        return self._type_names[table]

    def _scalar_types(self, run: _Run) -> bool:
        """Whether every column of the run can travel in a text array (arrays of arrays cannot)."""
        types = self._types(run.table)
        return all(c in types for c in (*run.columns, *run.key))

    def _set_based(self, run: _Run, table: sql.Composable) -> None:
        """Many updates or deletes as one statement over ``unnest`` of text arrays cast to the column types.

        One statement per few thousand rows instead of one per row: the server plans once and the key index
        is probed in a loop. Updates of one row repeated within the run keep only the last (the run's rows all
        set the same columns, so the last one is the row's final state).
        """
        types = self._types(run.table)
        rows = run.rows
        if run.kind == "update":
            last: dict[tuple[str | None, ...], Sequence[str | None]] = {}
            width = len(run.columns)
            for row in rows:
                last[tuple(row[width:])] = row
            rows = list(last.values())
        names = [*run.columns, *run.key] if run.kind == "update" else list(run.key)
        alias = [sql.Identifier(f"v{i}") for i in range(len(names))]
        arrays = sql.SQL(", ").join(sql.SQL("%s::text[]::{}[]").format(sql.SQL(types[name])) for name in names)
        source = sql.SQL("unnest({}) as v({})").format(arrays, sql.SQL(", ").join(alias))
        offset = len(run.columns) if run.kind == "update" else 0
        match = sql.SQL(" and ").join(
            sql.SQL("t.{} = v.{}").format(sql.Identifier(k), alias[offset + i]) for i, k in enumerate(run.key)
        )
        if run.kind == "update":
            assignments = sql.SQL(", ").join(
                sql.SQL("{} = v.{}").format(sql.Identifier(c), alias[i]) for i, c in enumerate(run.columns)
            )
            statement = sql.SQL("update only {} as t set {} from {} where {}").format(table, assignments, source, match)
        else:
            statement = sql.SQL("delete from only {} as t using {} where {}").format(table, source, match)
        # Each column as one array literal built here: psycopg's array adaptation costs more per element
        # than the whole statement does on the server.
        self.conn.execute(statement, [_array_literal(column) for column in zip(*rows, strict=True)])

    def _truncate(self, change: TruncateChange, txn: Transaction) -> None:
        tables = [t for t in change.tables if not (t in self.skip_before and txn.commit_lsn < self.skip_before[t])]
        if not tables:
            return
        names = sql.SQL(", ").join(sql.Identifier(*t.split(".", 1)) for t in tables)
        restart = sql.SQL(" restart identity") if change.restart_identity else sql.SQL("")
        self.conn.execute(sql.SQL("truncate only {}{}").format(names, restart))
        log.warning("applied a TRUNCATE from the stream", tables=tables, commit_lsn=str(txn.commit_lsn))


def _array_literal(values: Iterable[str | None]) -> str:
    """A text[] literal of ``values`` (every element quoted, NULL as NULL)."""
    return (
        "{"
        + ",".join("NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
        + "}"
    )


def _key_match(key: Sequence[str], exact: bool) -> sql.Composable:
    operator = sql.SQL("=" if exact else "is not distinct from")
    return sql.SQL(" and ").join(sql.SQL("{} {} %s").format(sql.Identifier(c), operator) for c in key)
