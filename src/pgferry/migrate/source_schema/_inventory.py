"""What a database contains, as ``(kind, identity)`` pairs, and the DROP statements that undo a schema phase."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import psycopg

from pgferry.migrate.source_schema._common import MANAGED_SCHEMAS

# ------------------------------------------------------------------------------------------------------
# Inventory and rollback
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaInventory:
    """The schema objects of a database, as ``(kind, identity)`` pairs, to tell what a migration added.

    Kinds: ``schema``, ``table`` (partitioned tables and partitions too), ``foreign_table``, ``sequence``,
    ``view``, ``matview``, ``type`` (enum, domain, composite, range, base), ``function``, ``procedure``,
    ``aggregate``, ``collation``, ``extension``. Identities are fully schema-qualified and quoted where
    needed, ready to be put in a ``DROP`` (functions with their argument types: ``app.f(integer)``).
    Objects that belong to an extension are represented by the extension alone; array types, row types of
    tables and multiranges are left out, as they come and go with what they belong to.
    """

    objects: frozenset[tuple[str, str]]

    def added_since(self, before: SchemaInventory) -> frozenset[tuple[str, str]]:
        return self.objects - before.objects

    def removed_since(self, before: SchemaInventory) -> frozenset[tuple[str, str]]:
        """Objects that existed in ``before`` and are gone: a rollback by dropping cannot bring them back."""
        return before.objects - self.objects


_INVENTORY_SQL = """
with nsp as (
    select n.oid, n.nspname from pg_namespace n
    where n.nspname not like 'pg\\_%%' and n.nspname <> 'information_schema'
      and n.nspname <> all(%(excluded)s)
),
members as (select classid, objid from pg_depend where deptype = 'e')
select 'schema', quote_ident(n.nspname) from nsp n
where not exists (select 1 from members m where m.classid = 'pg_namespace'::regclass and m.objid = n.oid)
union all
select case c.relkind when 'r' then 'table' when 'p' then 'table' when 'f' then 'foreign_table'
                      when 'S' then 'sequence' when 'v' then 'view' else 'matview' end,
       format('%%I.%%I', n.nspname, c.relname)
from pg_class c join nsp n on n.oid = c.relnamespace
where c.relkind in ('r', 'p', 'f', 'S', 'v', 'm')
  and not exists (select 1 from members m where m.classid = 'pg_class'::regclass and m.objid = c.oid)
union all
select 'type', format_type(t.oid, null)
from pg_type t join nsp n on n.oid = t.typnamespace
where t.typtype in ('b', 'c', 'd', 'e', 'r')
  and (t.typrelid = 0 or exists (select 1 from pg_class r where r.oid = t.typrelid and r.relkind = 'c'))
  and not exists (select 1 from pg_type a where a.typarray = t.oid)
  and not exists (select 1 from members m where m.classid = 'pg_type'::regclass and m.objid = t.oid)
union all
select case p.prokind when 'p' then 'procedure' when 'a' then 'aggregate' else 'function' end,
       p.oid::regprocedure::text
from pg_proc p join nsp n on n.oid = p.pronamespace
where not exists (select 1 from members m where m.classid = 'pg_proc'::regclass and m.objid = p.oid)
union all
select 'collation', format('%%I.%%I', n.nspname, c.collname)
from pg_collation c join nsp n on n.oid = c.collnamespace
where not exists (select 1 from members m where m.classid = 'pg_collation'::regclass and m.objid = c.oid)
union all
select 'extension', quote_ident(e.extname) from pg_extension e
"""


def take_inventory(
    conn: psycopg.Connection[Any], exclude_schemas: Collection[str] = MANAGED_SCHEMAS - {"extensions"}
) -> SchemaInventory:
    """The schema objects in ``conn``'s database, outside ``exclude_schemas`` and PostgreSQL's own.

    The default looks at every schema but the managed ones, except ``extensions``: the schema phase may
    install extensions there, and a rollback must see them. Extensions themselves are listed whatever their
    schema. ``pgferry``'s own schema is excluded, so the migration's bookkeeping never looks like a change.

    Identities are rendered with an empty ``search_path`` so that they are fully qualified whatever the
    caller's session uses; the caller's ``search_path`` is restored before returning.
    """
    with conn.transaction():
        row = conn.execute("select current_setting('search_path')").fetchone()
        previous = str(row[0]) if row else ""
        conn.execute("select set_config('search_path', '', true)")
        try:
            rows = conn.execute(_INVENTORY_SQL, {"excluded": sorted(exclude_schemas)}).fetchall()
        finally:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR:
                conn.execute("select set_config('search_path', %s, true)", (previous,))
    return SchemaInventory(frozenset((str(kind), str(identity)) for kind, identity in rows))


# (kind, DROP keyword, CASCADE). Order and CASCADE are what make a rollback work without a dependency graph:
# PostgreSQL resolves dependencies between objects named in the same DROP statement, but one statement
# takes one kind, and kinds depend on each other in cycles (a function returning SETOF a table whose
# default calls another function; a view over a materialized view over a view; a domain whose CHECK calls a
# function that takes the domain). CASCADE is used on exactly those kinds. Everything that depends on an
# object the migration created was either created by the migration too or attached to such an object
# (indexes, constraints, triggers, policies, defaults) — unless someone built on it afterwards, and then a
# rollback is expected to take that with it. Sequences, types, collations, extensions and schemas come
# last and are dropped without CASCADE: by then nothing of the migration still uses them, so anything that
# does is not ours, and failing is better than silently deleting it.
_DROP_ORDER: tuple[tuple[str, str, bool], ...] = (
    ("view", "VIEW", True),
    ("matview", "MATERIALIZED VIEW", True),
    ("foreign_table", "FOREIGN TABLE", True),
    ("table", "TABLE", True),
    ("aggregate", "AGGREGATE", True),
    ("procedure", "PROCEDURE", True),
    ("function", "FUNCTION", True),
    ("sequence", "SEQUENCE", False),
    ("type", "TYPE", False),
    ("collation", "COLLATION", False),
    ("extension", "EXTENSION", False),
    ("schema", "SCHEMA", False),
)


def drop_statements(before: SchemaInventory, after: SchemaInventory) -> list[str]:
    """``DROP`` statements that remove exactly the objects in ``after`` but not in ``before``.

    One statement per kind, in the order of ``_DROP_ORDER`` (views, materialized views, tables, routines,
    sequences, types, collations, extensions, schemas), each with ``IF EXISTS`` because an earlier drop may
    already have taken an object with it (a partition with its parent, an identity sequence with its
    table). Run them in one transaction. Objects that were in ``before`` and are gone cannot be brought
    back by dropping; see :meth:`SchemaInventory.removed_since`.
    """
    added = after.added_since(before)
    statements: list[str] = []
    known = {kind for kind, _, _ in _DROP_ORDER}
    unknown = sorted({kind for kind, _ in added if kind not in known})
    if unknown:
        raise ValueError(f"no DROP rule for inventory kinds {', '.join(unknown)}")
    for kind, keyword, cascade in _DROP_ORDER:
        names = sorted(identity for k, identity in added if k == kind)
        if names:
            statements.append(f"DROP {keyword} IF EXISTS {', '.join(names)}{' CASCADE' if cascade else ''}")
    return statements
