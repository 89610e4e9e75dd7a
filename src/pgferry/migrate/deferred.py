"""Indexes and key constraints: dropped before the bulk load, rebuilt in parallel after it.

Loading into a table with its indexes costs an index insertion per row per index (HNSW insertions on 1536-d
vectors are the slowest thing in the whole move); building each index once over the loaded table is far
cheaper and parallelises across tables. The definitions are saved in the state schema in the same
transaction that drops them, so a crash in between can never lose an index, and ``rollback`` can put them
back on a table that existed before the migration.

Primary keys and unique constraints are rebuilt the way pgcopydb does it: ``CREATE UNIQUE INDEX`` (which can
run alongside other index builds on the same table) and then ``ADD CONSTRAINT … USING INDEX`` (a catalog
change). Foreign keys come last, when every referenced key exists. CHECK constraints and triggers stay:
checks are cheap, and triggers do not fire under ``session_replication_role = replica``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

ORDER_INDEX = 0
ORDER_ATTACH = 1
ORDER_FOREIGN_KEY = 2


@dataclass(frozen=True)
class DeferredObject:
    schema: str
    table: str
    kind: str  # 'index' | 'attach' | 'exclusion' | 'foreign_key'
    name: str
    definition: str
    ord: int


_CONSTRAINTS_SQL = """
select con.conname, con.contype, pg_get_constraintdef(con.oid), con.condeferrable, con.condeferred,
       case when con.conindid <> 0 then pg_get_indexdef(con.conindid) end,
       case when con.conindid <> 0 then (select relname from pg_class where oid = con.conindid) end,
       exists (select 1 from pg_constraint fk where fk.contype = 'f' and fk.confrelid = con.conrelid
               and fk.conindid = con.conindid and not (fk.conrelid = any(%s::oid[])))
from pg_constraint con
where con.conrelid = %s and con.contype in ('p', 'u', 'x', 'f')
  and con.conparentid = 0  -- a partition's copy of its parent's constraint cannot be dropped on its own
order by con.conname
"""

_INDEXES_SQL = """
select c.relname, pg_get_indexdef(i.indexrelid)
from pg_index i join pg_class c on c.oid = i.indexrelid
where i.indrelid = %s
  and not exists (select 1 from pg_constraint con where con.conindid = i.indexrelid and con.conrelid = i.indrelid
                  and con.contype in ('p', 'u', 'x'))
  and not exists (select 1 from pg_inherits inh where inh.inhrelid = i.indexrelid)  -- attached to a parent's
order by c.relname
"""


def _oid(conn: psycopg.Connection[Any], schema: str, table: str) -> int:
    row = conn.execute(
        "select c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = %s and c.relname = %s",
        (schema, table),
    ).fetchone()
    if row is None:
        raise LookupError(f"{schema}.{table} does not exist on the target")
    return int(row[0])


def collect_deferrable(conn: psycopg.Connection[Any], tables: Sequence[tuple[str, str]]) -> list[DeferredObject]:
    """What to drop on the target's ``tables`` before loading them, with how to rebuild it."""
    oids = {t: _oid(conn, *t) for t in tables}
    all_oids = list(oids.values())
    found: list[DeferredObject] = []
    for (schema, table), oid in oids.items():
        qualified = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table)).as_string(conn)
        for name, contype, condef, deferrable, deferred, indexdef, indexname, pinned in conn.execute(
            _CONSTRAINTS_SQL, (all_oids, oid)
        ):
            quoted = sql.Identifier(name).as_string(conn)
            if contype == "f":
                found.append(
                    DeferredObject(
                        schema,
                        table,
                        "foreign_key",
                        name,
                        f"alter table {qualified} add constraint {quoted} {condef}",
                        ORDER_FOREIGN_KEY,
                    )
                )
            elif contype == "x":
                found.append(
                    DeferredObject(
                        schema,
                        table,
                        "exclusion",
                        name,
                        f"alter table {qualified} add constraint {quoted} {condef}",
                        ORDER_ATTACH,
                    )
                )
            elif not pinned:
                # A key referenced from a table outside the migration must stay: dropping it would need
                # CASCADE into a table pgferry does not own.
                kind_sql = "primary key" if contype == "p" else "unique"
                tail = " deferrable" + (" initially deferred" if deferred else "") if deferrable else ""
                index_quoted = sql.Identifier(indexname).as_string(conn)
                found.append(DeferredObject(schema, table, "index", indexname, indexdef, ORDER_INDEX))
                found.append(
                    DeferredObject(
                        schema,
                        table,
                        "attach",
                        name,
                        f"alter table {qualified} add constraint {quoted} {kind_sql} using index {index_quoted}{tail}",
                        ORDER_ATTACH,
                    )
                )
        for name, indexdef in conn.execute(_INDEXES_SQL, (oid,)):
            found.append(DeferredObject(schema, table, "index", name, indexdef, ORDER_INDEX))
    return found


def drop_deferrable(conn: psycopg.Connection[Any], run_id: int, objects: Sequence[DeferredObject]) -> None:
    """Save and drop ``objects`` in the caller's transaction (foreign keys first, plain indexes last)."""
    with conn.cursor() as cur:
        cur.executemany(
            "insert into pgferry.migration_deferred (run_id, schema_name, table_name, kind, name, definition, ord) "
            "values (%s, %s, %s, %s, %s, %s, %s) on conflict do nothing",
            [(run_id, o.schema, o.table, o.kind, o.name, o.definition, o.ord) for o in objects],
        )
    constraint_names = {(o.schema, o.table, o.name) for o in objects if o.kind != "index"}
    for kind in ("foreign_key", "exclusion", "attach", "index"):
        for obj in objects:
            if obj.kind != kind:
                continue
            table = sql.SQL("{}.{}").format(sql.Identifier(obj.schema), sql.Identifier(obj.table))
            if kind == "index":
                if (obj.schema, obj.table, obj.name) in constraint_names:
                    continue  # a key's index went with its constraint
                conn.execute(
                    sql.SQL("drop index if exists {}.{}").format(sql.Identifier(obj.schema), sql.Identifier(obj.name))
                )
            else:
                conn.execute(
                    sql.SQL("alter table {} drop constraint if exists {}").format(table, sql.Identifier(obj.name))
                )


def pending_deferred(conn: psycopg.Connection[Any], run_id: int) -> list[DeferredObject]:
    rows = conn.execute(
        "select schema_name, table_name, kind, name, definition, ord from pgferry.migration_deferred "
        "where run_id = %s and state = 'dropped' order by ord, schema_name, table_name, name",
        (run_id,),
    ).fetchall()
    return [DeferredObject(*r) for r in rows]


def restore_one(conn: psycopg.Connection[Any], run_id: int, obj: DeferredObject) -> None:
    with conn.transaction():
        exists = False
        if obj.kind == "index":
            row = conn.execute(
                "select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                "where n.nspname = %s and c.relname = %s",
                (obj.schema, obj.name),
            ).fetchone()
            exists = row is not None
        else:
            row = conn.execute(
                "select 1 from pg_constraint con join pg_class c on c.oid = con.conrelid "
                "join pg_namespace n on n.oid = c.relnamespace "
                "where n.nspname = %s and c.relname = %s and con.conname = %s",
                (obj.schema, obj.table, obj.name),
            ).fetchone()
            exists = row is not None
        if not exists:
            conn.execute(obj.definition.encode())
        conn.execute(
            "update pgferry.migration_deferred set state = 'restored' where run_id = %s and schema_name = %s "
            "and table_name = %s and kind = %s and name = %s",
            (run_id, obj.schema, obj.table, obj.kind, obj.name),
        )


def restore_deferred(
    connect: Callable[[], psycopg.Connection[Any]],
    run_id: int,
    objects: Sequence[DeferredObject],
    *,
    jobs: int,
    on_done: Callable[[DeferredObject, float], None] | None = None,
) -> None:
    """Rebuild ``objects``: index builds ``jobs`` at a time, then key attachments, then foreign keys."""

    def run(batch: Sequence[DeferredObject]) -> None:
        def work(obj: DeferredObject) -> None:
            started = time.monotonic()
            with connect() as conn:
                conn.autocommit = True
                conn.execute("set maintenance_work_mem = '512MB'")
                restore_one(conn, run_id, obj)
            if on_done is not None:
                on_done(obj, time.monotonic() - started)

        if not batch:
            return
        # Biggest first (HNSW), so the long builds start early and the small ones fill the gaps.
        ordered = sorted(batch, key=lambda o: (" hnsw " not in o.definition.lower(), o.table))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for future in [pool.submit(work, obj) for obj in ordered]:
                future.result()

    for order in (ORDER_INDEX, ORDER_ATTACH, ORDER_FOREIGN_KEY):
        batch = [o for o in objects if o.ord == order]
        if order == ORDER_INDEX:
            run(batch)
        else:
            # ALTER TABLE takes an exclusive lock per table; parallel attaches on one table would only queue.
            by_table: dict[tuple[str, str], list[DeferredObject]] = {}
            for obj in batch:
                by_table.setdefault((obj.schema, obj.table), []).append(obj)
            for group in by_table.values():
                for obj in group:
                    started = time.monotonic()
                    with connect() as conn:
                        conn.autocommit = True
                        restore_one(conn, run_id, obj)
                    if on_done is not None:
                        on_done(obj, time.monotonic() - started)
