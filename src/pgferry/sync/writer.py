"""Applying a checked batch of mutations: one transaction, as the user, at most once per mutation id.

The order inside the transaction is the contract:

1. as the server role, look up which mutation ids were applied before (``pgferry.applied_mutations``); a replayed
   id gets its stored result back and is not applied again; an id another user applied is a 409;
2. switch to the user (:func:`pgferry.db.rls.apply_claims`: role ``authenticated`` and the verified JWT claims), so
   RLS decides every row the batch touches, exactly as it would for the same user through PostgREST;
3. apply the new mutations in order — an update reads its row ``FOR UPDATE`` and writes what the table's conflict
   policy decides (:mod:`pgferry.sync.conflicts`); the first mutation PostgreSQL refuses aborts the batch (nothing
   is written) and is reported with its field;
4. switch back to the server role (``SET LOCAL ROLE NONE``), read ``pg_current_xact_id()::xid::text`` — the 32-bit
   txid logical replication, and so the shape log's ``headers.txids``, shows for these changes — and record every
   new id with that txid and its result, the column versions written and the conflicts resolved, in the same
   transaction. Rows an update or delete touches are locked (advisory, by key, in one order) before step 2, so the
   column versions read there stay true until commit.

Two requests racing with the same id both pass step 1; the second then waits on the first's row (a lock, a key) or
on its record of the id in step 4, and once the first commits it rolls back whole and starts over, finding the id
applied: an id is applied once.

Synchronous (psycopg): the HTTP layer runs it on a worker thread. Owns the SQL of writes and the idempotency
records; must not parse request bodies (:mod:`pgferry.sync.mutations`) or speak HTTP (:mod:`pgferry.sync.write_api`).
"""

from __future__ import annotations

import json
import operator
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from pgferry.db.quoting import quote_ident
from pgferry.db.rls import apply_claims
from pgferry.errors import PgferryError
from pgferry.sync.auth import AuthenticatedUser
from pgferry.sync.conflicts import (
    ColumnLww,
    ColumnVersion,
    ConflictPolicy,
    CustomResolver,
    Decision,
    ResolvedConflict,
    UpdateContext,
)
from pgferry.sync.errors import MutationRejectedError, describe_error
from pgferry.sync.mutations import Column, Mutation, WriteTable, key_text, to_pg_text
from pgferry.sync.protocol import TableName

__all__ = [
    "BatchRejectedError",
    "BatchResult",
    "apply_batch",
    "load_write_tables",
    "purge_applied_mutations",
]

_COLUMNS_SQL: Final = """
select a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
       a.atthasdef or a.attidentity <> '', a.attgenerated = '' and a.attidentity <> 'a'
from pg_catalog.pg_attribute a
where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped
order by a.attnum
"""
_DEFAULT_POLICY: Final[ConflictPolicy] = ColumnLww()
#: JSON documents sent as one parameter (a batch's rows, its records) are encoded by msgspec: several times faster
#: than the stdlib's encoder on thousands of small objects, the same JSON.
_JSON: Final = msgspec.json.Encoder()
_MAX_ATTEMPTS: Final = 4
_PRIMARY_KEY_SQL: Final = """
select a.attname
from pg_catalog.pg_index i
cross join lateral unnest(i.indkey) with ordinality as k(attnum, position)
join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
where i.indrelid = %s::regclass and i.indisprimary
order by k.position
"""


class BatchRejectedError(PgferryError):
    """A batch the write API refuses as a whole: ``problems`` holds one :class:`MutationRejectedError` per
    mutation at fault. Nothing of the batch was written."""

    problems: tuple[MutationRejectedError, ...]

    def __init__(self, problems: Sequence[MutationRejectedError]) -> None:
        super().__init__(tuple(problems))
        self.problems = tuple(problems)

    def __str__(self) -> str:
        first = self.problems[0] if self.problems else None
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"mutations rejected, nothing written: {first}{more}"

    @property
    def status(self) -> int:
        """The HTTP status of the batch: the problems' own when they agree, else 400."""
        statuses = {problem.status for problem in self.problems}
        return statuses.pop() if len(statuses) == 1 else 400


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a client is told: the transaction's ``txid`` (of the earlier transaction when every mutation was a
    replay) and one result per mutation, in request order."""

    txid: str
    results: list[dict[str, Any]]
    #: The batch's commit position (PostgreSQL's ``X/Y`` text), see :func:`_commit_position`.
    lsn: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"txid": self.txid, "lsn": self.lsn, "results": self.results}


def load_write_tables(conn: psycopg.Connection[Any], owners: Mapping[str, str | None]) -> dict[TableName, WriteTable]:
    """Columns (with their types) and primary keys of the tables in ``owners`` (``schema.table`` -> owner column
    or None), read from the catalog; a table that does not exist or has no primary key is a one-line error."""
    tables: dict[TableName, WriteTable] = {}
    for qualified, owner in owners.items():
        schema, _, name = qualified.partition(".")
        table = TableName(schema, name)
        regclass = f"{quote_ident(schema)}.{quote_ident(name)}"
        exists = conn.execute("select pg_catalog.to_regclass(%s)", [regclass]).fetchone()
        if exists is None or exists[0] is None:
            raise PgferryError(f"write API: table {qualified} does not exist; migrate the database first")
        columns = {
            row[0]: Column(row[0], row[1], bool(row[2]), bool(row[3]), bool(row[4]))
            for row in conn.execute(_COLUMNS_SQL, [regclass])
        }
        key = tuple(row[0] for row in conn.execute(_PRIMARY_KEY_SQL, [regclass]))
        if not key:
            raise PgferryError(f"write API: table {qualified} has no primary key; it cannot take mutations")
        if owner is not None and owner not in columns:
            raise PgferryError(f"write API: table {qualified} has no owner column {owner}")
        tables[table] = WriteTable(table, columns, key, owner)
    return tables


def apply_batch(
    conn: psycopg.Connection[Any],
    user: AuthenticatedUser,
    mutations: Sequence[Mutation],
    policies: Mapping[TableName, ConflictPolicy] | None = None,
) -> BatchResult:
    """Apply ``mutations`` for ``user`` in one transaction on ``conn`` (autocommit, idle); see the module
    docstring for the steps. Updates meet the table's conflict policy (default :class:`ColumnLww`).
    :class:`BatchRejectedError` when any mutation is refused (nothing written)."""
    fast = True
    for attempt in range(_MAX_ATTEMPTS):
        last = attempt == _MAX_ATTEMPTS - 1
        try:
            return _apply_batch(conn, user, mutations, policies or {}, fast=fast)
        except _RacedError:
            continue  # another request recorded one of these ids first: this time they are replays
        except _FastPathFailedError:
            # Something in a one-statement run of inserts failed: run the batch again one statement at a time (it
            # was rolled back whole), so the refusal is pinned on its mutation and field.
            fast = False
        except BatchRejectedError:
            # A racing request with the same ids commits first, and this one trips over its rows (a key that
            # now exists): then the ids are applied, and the batch is a replay after all.
            if last or not _any_applied(conn, mutations):
                raise
    raise BatchRejectedError(
        [MutationRejectedError(None, "mutations", "the same ids are being applied by another request; retry", 409)]
    )


def _apply_batch(
    conn: psycopg.Connection[Any],
    user: AuthenticatedUser,
    mutations: Sequence[Mutation],
    policies: Mapping[TableName, ConflictPolicy],
    *,
    fast: bool,
) -> BatchResult:
    received_ms = int(time.time() * 1000)
    with conn.transaction():
        replayed = _applied_before(conn, user, mutations)
        fresh = [m for m in mutations if m.ident not in replayed] if replayed else list(mutations)
        results: dict[str, dict[str, Any]] = {}
        txid = ""
        if fresh:
            state = _ConflictState(policies, received_ms)
            state.prepare(conn, fresh)
            apply_claims(conn, user.claims)
            _apply_all(conn, user, fresh, state, results, fast=fast)
            conn.execute("set local role none")
            row = conn.execute("select pg_catalog.pg_current_xact_id()::xid::text").fetchone()
            assert row is not None
            txid = str(row[0])
            for result in results.values():
                result["txid"] = txid
            _record(conn, user, fresh, results, txid)
            state.record(conn, user)
    for ident, stored in replayed.items():
        results[ident] = {**stored, "status": "replayed"}
    if not txid:
        txid = str(results[mutations[0].ident]["txid"])
    lsn = _commit_position(conn)
    for result in results.values():
        result["lsn"] = lsn  # after the records were stored: a replay's stored result never carries an old one
    return BatchResult(txid, [results[m.ident] for m in mutations], lsn)


def _commit_position(conn: psycopg.Connection[Any]) -> str:
    """A WAL position at or after the start of the commit record of the batch just committed on ``conn`` (and of
    every earlier transaction a replayed id came from), as PostgreSQL prints an LSN.

    PostgreSQL has no function for a transaction's own commit LSN, so this reads the insert position right after the
    commit, on the same connection: the commit record ends at or before it, so it *starts* before it, at or before
    that position minus one. The minus one makes it comparable with ``global_last_seen_lsn``, which is a commit
    position too (Electric: the commit LSN of the last transaction it processed; the dev server: never past the start
    of a commit it has not processed): a sync server reporting ``global_last_seen_lsn >= lsn`` has processed the
    batch, so every change of it that belongs to a shape is in that shape's log before that up-to-date. Other
    sessions' WAL may land between the commit and the read; that only makes the bound later (conservative)."""
    row = conn.execute("select pg_catalog.pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    high, _, low = str(row[0]).partition("/")
    position = max(0, ((int(high, 16) << 32) | int(low, 16)) - 1)
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


class _ConflictState:
    """The conflict side of one batch: row locks and stored column versions read before the batch switches to
    the user's role, decisions collected while it applies, and what to record once it is back."""

    def __init__(self, policies: Mapping[TableName, ConflictPolicy], received_ms: int) -> None:
        self.policies = policies
        self.received_ms = received_ms
        self.versions: dict[tuple[str, str], dict[str, ColumnVersion]] = {}
        self.written: list[tuple[Mutation, dict[str, ColumnVersion]]] = []
        self.conflicts: list[tuple[Mutation, ResolvedConflict]] = []
        self.deleted: list[Mutation] = []

    def policy(self, table: WriteTable) -> ConflictPolicy:
        policy: ConflictPolicy = self.policies.get(table.name) or _DEFAULT_POLICY
        return policy

    def prepare(self, conn: psycopg.Connection[Any], mutations: Sequence[Mutation]) -> None:
        """Lock every updated or deleted row's key (advisory, in one order: no deadlock between batches) so the
        versions read now stay true until commit, then read the versions of the tables that keep them."""
        keyed = [m for m in mutations if m.op != "insert"]
        if not keyed:
            return
        conn.execute(
            "select pg_catalog.pg_advisory_xact_lock(h) from "
            "(select distinct pg_catalog.hashtextextended(k, 17) as h from unnest(%s::text[]) as k order by 1) s",
            [[_lock_name(m) for m in keyed]],
        )
        wanted = [m for m in keyed if m.op == "update" and self.policy(m.table).keeps_versions]
        if not wanted:
            return
        found = conn.execute(
            "select v.table_name, v.row_key, v.column_name, v.written_at, v.mutation_id "
            "from pgferry.column_versions v join unnest(%s::text[], %s::text[]) as w(t, k) "
            "on v.table_name = w.t and v.row_key = w.k",
            [[str(m.table.name) for m in wanted], [key_text(m.key) for m in wanted]],
        )
        for table_name, row_key, column, written_at, mutation_id in found:
            self.versions.setdefault((table_name, row_key), {})[column] = ColumnVersion(written_at, mutation_id)

    def stored_versions(self, mutation: Mutation) -> dict[str, ColumnVersion]:
        return self.versions.get((str(mutation.table.name), key_text(mutation.key)), {})

    def record(self, conn: psycopg.Connection[Any], user: AuthenticatedUser) -> None:
        """Store the new column versions, forget those of deleted rows, record every resolved conflict."""
        # One row per column: a batch may update the same row several times (an outbox replaying a series of
        # edits), and the version stored is the last write's; ON CONFLICT cannot touch a row twice in a statement.
        latest = {
            (str(m.table.name), key_text(m.key), column): version
            for m, versions in self.written
            for column, version in versions.items()
        }
        rows = [(*where, version.written_at, version.mutation_id) for where, version in latest.items()]
        if rows:
            conn.execute(
                "insert into pgferry.column_versions (table_name, row_key, column_name, written_at, mutation_id) "
                "select * from unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::uuid[]) "
                "on conflict (table_name, row_key, column_name) do update "
                "set written_at = excluded.written_at, mutation_id = excluded.mutation_id",
                [list(column) for column in zip(*rows, strict=True)],
            )
        if self.deleted:
            conn.execute(
                "delete from pgferry.column_versions v using unnest(%s::text[], %s::text[]) as d(t, k) "
                "where v.table_name = d.t and v.row_key = d.k",
                [[str(m.table.name) for m in self.deleted], [key_text(m.key) for m in self.deleted]],
            )
        if self.conflicts:
            conn.execute(
                "insert into pgferry.resolved_conflicts (mutation_id, user_id, table_name, row_key, columns, winner, "
                "why) select m, %s, t, k, array(select jsonb_array_elements_text(c)), w, y "
                "from unnest(%s::uuid[], %s::text[], %s::text[], %s::jsonb[], %s::text[], %s::text[]) "
                "as r(m, t, k, c, w, y)",
                [
                    user.user_id,
                    [m.ident for m, _ in self.conflicts],
                    [str(m.table.name) for m, _ in self.conflicts],
                    [key_text(m.key) for m, _ in self.conflicts],
                    [json.dumps(list(c.columns)) for _, c in self.conflicts],
                    [c.winner for _, c in self.conflicts],
                    [c.why for _, c in self.conflicts],
                ],
            )


def _lock_name(mutation: Mutation) -> str:
    return f"{mutation.table.name}/{key_text(mutation.key)}"


def _applied_before(
    conn: psycopg.Connection[Any], user: AuthenticatedUser, mutations: Sequence[Mutation]
) -> dict[str, dict[str, Any]]:
    """The batch's ids applied before (as text), with their stored results; an id another user applied is a 409."""
    rows = conn.execute(
        "select id::text, user_id, result from pgferry.applied_mutations where id = any(%s::uuid[])",
        [_uuid_array(mutations)],
    ).fetchall()
    foreign = {row[0] for row in rows if row[1] != user.user_id}
    if foreign:
        raise BatchRejectedError(
            [
                MutationRejectedError(m.ident, m.where("id"), "is already used; choose a new UUID", 409)
                for m in mutations
                if m.ident in foreign
            ]
        )
    return {row[0]: dict(row[2]) for row in rows}


def _uuid_array(mutations: Sequence[Mutation]) -> str:
    """The mutation ids as one ``uuid[]`` literal: psycopg would dump a list of UUIDs element by element in Python."""
    return "{" + ",".join([m.ident for m in mutations]) + "}"


def _any_applied(conn: psycopg.Connection[Any], mutations: Sequence[Mutation]) -> bool:
    row = conn.execute(
        "select exists (select 1 from pgferry.applied_mutations where id = any(%s::uuid[]))", [_uuid_array(mutations)]
    ).fetchone()
    return bool(row and row[0])


def _record(
    conn: psycopg.Connection[Any],
    user: AuthenticatedUser,
    fresh: Sequence[Mutation],
    results: Mapping[str, dict[str, Any]],
    txid: str,
) -> None:
    """Record the applied ids, last: a request that applied one of them meanwhile makes this insert wait for its
    commit and then fail on the key, and this batch starts over (and finds them applied) rather than apply them
    twice. A plain insert, not ``ON CONFLICT DO NOTHING``: the outcome is the same (the transaction is rolled back
    either way), without the speculative insertion that costs every row of every batch."""
    # COPY, in text format: the rows reach the table without a JSON document to take apart first (a quarter less
    # time than json_to_recordset on a batch of 2,000). A result is msgspec's JSON, which escapes every control
    # character, so a backslash is the only byte COPY's text format needs escaped.
    prefix = f"\t{user.user_id}\t{txid}\t"
    encode = _JSON.encode
    lines = [m.ident + prefix + encode(results[m.ident]).decode().replace("\\", "\\\\") + "\n" for m in fresh]
    try:
        with conn.cursor() as cursor, cursor.copy(_RECORD_COPY) as copy:
            copy.write("".join(lines))
    except pg_errors.UniqueViolation:
        raise _RacedError from None


_RECORD_COPY: Final = "copy pgferry.applied_mutations (id, user_id, txid, result) from stdin"


class _RacedError(Exception):
    """Another request recorded one of this batch's ids first; the batch starts over."""


def purge_applied_mutations(conn: psycopg.Connection[Any], retention_seconds: float, *, limit: int = 10_000) -> int:
    """Forget applied mutation ids older than the retention (a replay after that would apply again); at most
    ``limit`` rows per call so a purge never holds locks for long. Returns the rows deleted."""
    cursor = conn.execute(
        "delete from pgferry.applied_mutations where id in (select id from pgferry.applied_mutations "
        "where applied_at < now() - make_interval(secs => %s) limit %s)",
        [retention_seconds, limit],
    )
    return cursor.rowcount


# --------------------------------------------------------------------------------------------------------------
# One mutation
# --------------------------------------------------------------------------------------------------------------


class _FastPathFailedError(Exception):
    """A pipelined run of inserts failed somewhere; the batch is redone one statement at a time."""


#: Consecutive inserts into one table with the same columns are sent pipelined (one round trip for the run) when
#: the run is at least this long.
_PIPELINE_MIN_RUN: Final = 4


def _apply_all(
    conn: psycopg.Connection[Any],
    user: AuthenticatedUser,
    mutations: Sequence[Mutation],
    state: _ConflictState,
    results: dict[str, dict[str, Any]],
    *,
    fast: bool,
) -> None:
    """Apply in order. With ``fast``, runs of inserts with the same table and columns go through psycopg's
    pipelined ``executemany`` (a round trip per run, not per row: the write API's throughput is round trips);
    any failure there aborts to the exact, one-by-one path."""
    position = 0
    while position < len(mutations):
        run = _insert_run(mutations, position) if fast else []
        if len(run) >= _PIPELINE_MIN_RUN:
            _insert_pipelined(conn, user, run, results)
            position += len(run)
            continue
        mutation = mutations[position]
        results[mutation.ident] = _apply_one(conn, user, mutation, state)
        position += 1


def _insert_columns(mutation: Mutation) -> tuple[str, ...]:
    """The columns an insert writes: the row's, and the owner column (the token's user) when the row omits it."""
    names = list(mutation.values)
    owner = mutation.table.owner_column
    if owner is not None and owner not in mutation.values:
        names.append(owner)
    return tuple(names)


def _insert_run(mutations: Sequence[Mutation], start: int) -> list[Mutation]:
    """The inserts from ``start`` on into the same table naming the same set of columns (in any order: a run's
    rows are laid out by column name)."""
    first = mutations[start]
    if first.op != "insert":
        return []
    table = first.table
    columns = first.values.keys()
    end = start + 1
    while end < len(mutations):
        mutation = mutations[end]
        if mutation.op != "insert" or mutation.table is not table or mutation.values.keys() != columns:
            break
        end += 1
    return list(mutations[start:end])


def _insert_pipelined(
    conn: psycopg.Connection[Any],
    user: AuthenticatedUser,
    run: Sequence[Mutation],
    results: dict[str, dict[str, Any]],
) -> None:
    table = run[0].table
    names = _insert_columns(run[0])
    statement = sql.SQL("insert into {} ({}) values ({}) returning {}").format(
        _qualified(table),
        sql.SQL(", ").join(sql.Identifier(name) for name in names),
        sql.SQL(", ").join(_cast(table.columns[name]) for name in names),
        _returning_key(table),
    )
    try:
        if all(m.key for m in run):
            # Every key is the client's: one INSERT … SELECT FROM unnest(text[] per column), one round trip and
            # one statement for the run; the keys are known, so RETURNING's order does not matter.
            _insert_unnest(conn, table, names, _run_rows(run, names, str(user.user_id)))
            keys = [m.key for m in run]
        else:
            owner_value = str(user.user_id)
            rows = [[m.values.get(name, owner_value) for name in names] for m in run]
            keys = _insert_executemany(conn, statement, rows)
    except psycopg.Error as exc:
        raise _FastPathFailedError from exc
    if len(keys) != len(run):
        raise _FastPathFailedError
    primary_key = table.primary_key
    for mutation, key in zip(run, keys, strict=True):
        results[mutation.ident] = {
            "id": mutation.ident,
            "status": "applied",
            "op": "insert",
            "key": dict(zip(primary_key, key, strict=True)),
            "changed": True,
        }


def _insert_executemany(
    conn: psycopg.Connection[Any], statement: sql.Composable, rows: Sequence[Sequence[Any]]
) -> list[tuple[str, ...]]:
    keys: list[tuple[str, ...]] = []
    with conn.cursor() as cursor:
        cursor.executemany(statement.as_string(conn), rows, returning=True)
        while True:
            row = cursor.fetchone()
            if row is not None:
                keys.append(tuple(row))
            if not cursor.nextset():
                break
    return keys


def _insert_unnest(
    conn: psycopg.Connection[Any], table: WriteTable, names: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    # The rows travel as one JSON document (an array of arrays of text, PostgreSQL array values as their literal):
    # binding a text[] per column makes psycopg escape every element in Python, which cost more than the insert.
    statement = sql.SQL("insert into {} ({}) select {} from json_array_elements(%s::json) as u(r)").format(
        _qualified(table),
        sql.SQL(", ").join(sql.Identifier(name) for name in names),
        sql.SQL(", ").join(
            sql.SQL("(r->>{})::").format(sql.Literal(index)) + sql.SQL(table.columns[name].sql_type)
            for index, name in enumerate(names)
        ),
    )
    document = _JSON.encode(rows).decode()
    conn.execute(statement, [document])


def _run_rows(run: Sequence[Mutation], names: Sequence[str], owner_value: str) -> list[list[Any]]:
    """A run's rows for :func:`_insert_unnest`: values by column name (the owner's when the rows omit it, as
    :func:`_insert_columns` adds it last), arrays as their PostgreSQL literal. Only the array columns are looked
    at twice: a run is thousands of rows."""
    present = [name for name in names if name in run[0].values]
    owner = [owner_value] if len(present) < len(names) else []
    arrays = [i for i, name in enumerate(present) if run[0].table.columns[name].sql_type.endswith("[]")]
    if len(present) == 1:
        only = present[0]
        rows = [[m.values[only], *owner] for m in run]
    else:
        pick = operator.itemgetter(*present)
        rows = [[*pick(m.values), *owner] for m in run]
    for row in rows:
        for i in arrays:
            row[i] = _array_literal(row[i])
    return rows


def _array_literal(value: Any) -> Any:
    """A value for the JSON rows of a bulk insert: text as is, an array as its PostgreSQL literal (cast later)."""
    if not isinstance(value, list):
        return value
    parts = []
    for item in value:
        if item is None:
            parts.append("NULL")
        else:
            parts.append('"' + str(item).replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(parts) + "}"


def _apply_one(
    conn: psycopg.Connection[Any], user: AuthenticatedUser, mutation: Mutation, state: _ConflictState
) -> dict[str, Any]:
    table = mutation.table
    result: dict[str, Any] = {"id": mutation.ident, "status": "applied", "op": mutation.op}
    try:
        if mutation.op == "insert":
            key = _insert(conn, user, mutation)
            changed = True
        elif mutation.op == "update":
            key, decision = _update(conn, mutation, state)
            changed = bool(decision.values)
            state.written.append((mutation, decision.versions))
            # A later update of the same row in this batch must meet these versions, not the ones read before it.
            state.versions.setdefault((str(table.name), key_text(mutation.key)), {}).update(decision.versions)
            state.conflicts.extend((mutation, conflict) for conflict in decision.conflicts)
            if decision.conflicts:
                result["conflicts"] = [conflict.as_json() for conflict in decision.conflicts]
        else:
            key = _delete(conn, mutation)
            changed = key is not None
            state.deleted.append(mutation)
    except psycopg.Error as exc:
        raise BatchRejectedError([_problem(mutation, exc)]) from None
    if key is not None:
        result["key"] = dict(zip(table.primary_key, key, strict=True))
    # Nothing written (the server's row won, or the row was already deleted): this txid will not stream for it, so
    # the client must not wait for it before dropping its optimistic state.
    result["changed"] = changed
    return result


def _cast(column: Column) -> sql.Composable:
    """``%s::<type>``: every value is bound as text (or an array of text) and cast by PostgreSQL."""
    return sql.SQL("%s::") + sql.SQL(column.sql_type)


def _key_condition(table: WriteTable) -> sql.Composable:
    return sql.SQL(" and ").join(
        sql.SQL("{} = {}").format(sql.Identifier(name), _cast(table.columns[name])) for name in table.primary_key
    )


def _returning_key(table: WriteTable) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(name)) for name in table.primary_key)


def _qualified(table: WriteTable) -> sql.Composable:
    return sql.Identifier(table.name.schema, table.name.name)


def _insert(conn: psycopg.Connection[Any], user: AuthenticatedUser, mutation: Mutation) -> tuple[str, ...] | None:
    table = mutation.table
    values = dict(mutation.values)
    if table.owner_column is not None and table.owner_column not in values:
        values[table.owner_column] = str(user.user_id)  # the token's user owns what it creates, unless it says
    names = list(values)
    statement = sql.SQL("insert into {} ({}) values ({}) returning {}").format(
        _qualified(table),
        sql.SQL(", ").join(sql.Identifier(name) for name in names),
        sql.SQL(", ").join(_cast(table.columns[name]) for name in names),
        _returning_key(table),
    )
    row = conn.execute(statement, [values[name] for name in names]).fetchone()
    return tuple(row) if row is not None else None


def _update(
    conn: psycopg.Connection[Any], mutation: Mutation, state: _ConflictState
) -> tuple[tuple[str, ...], Decision]:
    """Lock and read the row as the user (RLS: another user's row is not found), let the table's policy decide,
    write what it decided."""
    table = mutation.table
    client = {name: value for name, value in mutation.values.items() if name not in table.primary_key}
    if not client:
        problem = MutationRejectedError(mutation.ident, mutation.where("row"), "names no column to change")
        raise BatchRejectedError([problem])
    policy = state.policy(table)
    server, changed, updated_at = _current_row(conn, mutation, client, full=isinstance(policy, CustomResolver))
    context = UpdateContext(
        client=client,
        base=mutation.base,
        server=server,
        changed=changed,
        versions=state.stored_versions(mutation),
        written_at=mutation.written_at if mutation.written_at is not None else state.received_ms,
        mutation_id=mutation.id,
        row_updated_at=updated_at,
    )
    decision = policy.decide(context)
    values = dict(decision.values)
    if decision.json_values:
        values = _resolver_values(values, mutation)
    if values:
        names = list(values)
        statement = sql.SQL("update {} set {} where {}").format(
            _qualified(table),
            sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(n), _cast(table.columns[n])) for n in names),
            _key_condition(table),
        )
        conn.execute(statement, [values[name] for name in names] + list(mutation.key))
    return mutation.key, decision


def _current_row(
    conn: psycopg.Connection[Any], mutation: Mutation, client: Mapping[str, Any], *, full: bool
) -> tuple[dict[str, Any], frozenset[str], int | None]:
    """The row now (all columns as text, arrays as lists of text, when ``full``), which written columns differ
    from the client's base (``IS DISTINCT FROM``, by type), and ``updated_at`` in ms. Locked ``FOR UPDATE``."""
    table = mutation.table
    shown = list(table.columns) if full else []
    compared = [name for name in client if mutation.base is not None and name in mutation.base]
    items: list[sql.Composable] = [sql.SQL("true")]
    params: list[Any] = []
    for name in shown:
        suffix = "::text[]" if table.columns[name].sql_type.endswith("[]") else "::text"
        items.append(sql.Identifier(name) + sql.SQL(suffix))
    for name in compared:
        items.append(sql.SQL("{} is distinct from {}").format(sql.Identifier(name), _cast(table.columns[name])))
        params.append(mutation.base[name] if mutation.base is not None else None)
    has_updated_at = "updated_at" in table.columns
    if has_updated_at:
        items.append(sql.SQL("(extract(epoch from {}) * 1000)::bigint").format(sql.Identifier("updated_at")))
    statement = sql.SQL("select {} from {} where {} for update").format(
        sql.SQL(", ").join(items), _qualified(table), _key_condition(table)
    )
    row = conn.execute(statement, params + list(mutation.key)).fetchone()
    if row is None:
        raise BatchRejectedError([_not_found(mutation)])
    values = list(row[1:])
    server = dict(zip(shown, values[: len(shown)], strict=True))
    flags = values[len(shown) : len(shown) + len(compared)]
    changed = frozenset(name for name, flag in zip(compared, flags, strict=True) if flag)
    updated_at = int(values[-1]) if has_updated_at and values[-1] is not None else None
    return server, changed, updated_at


def _resolver_values(values: Mapping[str, Any], mutation: Mutation) -> dict[str, Any]:
    """A custom resolver's JSON values converted like a client's; the key is never changed by a resolver."""
    table = mutation.table
    converted: dict[str, Any] = {}
    for name, value in values.items():
        if name in table.primary_key:
            continue
        column = table.columns.get(name)
        if column is None:
            raise PgferryError(f"the conflict resolver of {table.name} returned an unknown column {name!r}")
        converted[name] = to_pg_text(value, column.sql_type, mutation.ident, mutation.where(f"row.{name}"))
    return converted


def _delete(conn: psycopg.Connection[Any], mutation: Mutation) -> tuple[str, ...] | None:
    """A delete of a row that is already gone is applied (there is nothing left to delete): a client that was
    offline while another deleted the row must not be stuck on it."""
    table = mutation.table
    statement = sql.SQL("delete from {} where {} returning {}").format(
        _qualified(table), _key_condition(table), _returning_key(table)
    )
    row = conn.execute(statement, list(mutation.key)).fetchone()
    return tuple(row) if row is not None else None


def _not_found(mutation: Mutation) -> MutationRejectedError:
    return MutationRejectedError(
        mutation.ident, mutation.where("row"), f"no row of yours in {mutation.table.name} has this key", 404
    )


def _problem(mutation: Mutation, exc: psycopg.Error) -> MutationRejectedError:
    """A PostgreSQL refusal as a problem with a field. PostgreSQL's own message is not passed on: for data errors it
    quotes values, and a constraint's name says more than enough."""
    ident = mutation.ident
    diag = exc.diag
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return MutationRejectedError(ident, mutation.where("row"), "row-level security does not allow this row", 403)
    if isinstance(exc, pg_errors.UniqueViolation):
        return MutationRejectedError(
            ident, mutation.where("row"), f"a row with this key already exists ({diag.constraint_name})", 409
        )
    if isinstance(exc, pg_errors.NotNullViolation):
        return MutationRejectedError(ident, mutation.where(f"row.{diag.column_name}"), "must not be null")
    if isinstance(exc, pg_errors.ForeignKeyViolation):
        return MutationRejectedError(
            ident, mutation.where("row"), f"refers to a row that does not exist ({diag.constraint_name})"
        )
    if isinstance(exc, pg_errors.CheckViolation):
        return MutationRejectedError(ident, mutation.where("row"), f"breaks the check {diag.constraint_name}")
    if exc.sqlstate is not None and exc.sqlstate.startswith("22"):
        return MutationRejectedError(
            ident, mutation.where("row"), f"holds a value PostgreSQL rejects: {_condition(exc)}"
        )
    if exc.sqlstate is not None and exc.sqlstate.startswith(("23", "42")):
        return MutationRejectedError(ident, mutation.where("row"), f"cannot be applied: {_condition(exc)}")
    raise exc


def _condition(exc: psycopg.Error) -> str:
    return describe_error(exc)
