"""The source's extensions: where each lives, and which names in a dump belong to one (from ``pg_depend``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg


def extension_schemas(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """Installed extensions and the schema each lives in."""
    rows = conn.execute(
        "select e.extname, n.nspname from pg_extension e join pg_namespace n on n.oid = e.extnamespace"
    ).fetchall()
    return {str(name): str(schema) for name, schema in rows}


@dataclass(frozen=True)
class ExtensionMember:
    """A schema-qualified object that belongs to an extension (``pg_depend.deptype = 'e'``).

    ``kind`` is ``type``, ``function``, ``operator``, ``opclass``, ``opfamily``, ``relation``, ``collation``,
    ``ts_config`` or ``ts_dict``. ``shared`` is true when an object that is *not* part of the extension has
    the same schema and name (a user function overloading an extension function, a table named like one),
    so that a textual reference could mean either.
    """

    extension: str
    kind: str
    schema: str
    name: str
    shared: bool = False


_MEMBERS_SQL = """
with named(classid, oid, kind, nsp, name) as (
    select 'pg_type'::regclass, oid, 'type', typnamespace, typname from pg_type
    union all select 'pg_proc'::regclass, oid, 'function', pronamespace, proname from pg_proc
    union all select 'pg_operator'::regclass, oid, 'operator', oprnamespace, oprname from pg_operator
    union all select 'pg_opclass'::regclass, oid, 'opclass', opcnamespace, opcname from pg_opclass
    union all select 'pg_opfamily'::regclass, oid, 'opfamily', opfnamespace, opfname from pg_opfamily
    union all select 'pg_class'::regclass, oid, 'relation', relnamespace, relname from pg_class
    union all select 'pg_collation'::regclass, oid, 'collation', collnamespace, collname from pg_collation
    union all select 'pg_ts_config'::regclass, oid, 'ts_config', cfgnamespace, cfgname from pg_ts_config
    union all select 'pg_ts_dict'::regclass, oid, 'ts_dict', dictnamespace, dictname from pg_ts_dict
),
direct as (
    select d.classid, d.objid, e.extname
    from pg_depend d join pg_extension e on d.refclassid = 'pg_extension'::regclass and d.refobjid = e.oid
    where d.deptype = 'e'
),
-- Array types, row types and multiranges are created with their member and belong to it too.
members as (
    select classid, objid, extname from direct
    union
    select d.classid, d.objid, m.extname
    from pg_depend d join direct m on d.refclassid = m.classid and d.refobjid = m.objid
    where d.deptype in ('i', 'a')
)
select m.extname, o.kind, n.nspname, o.name::text,
       exists (
           select 1 from named x
           where x.nsp = o.nsp and x.name = o.name and (x.kind = 'operator') = (o.kind = 'operator')
             and not exists (select 1 from members y where y.classid = x.classid and y.objid = x.oid)
       )
from members m
join named o on o.classid = m.classid and o.oid = m.objid
join pg_namespace n on n.oid = o.nsp
"""


def extension_members(conn: psycopg.Connection[Any]) -> frozenset[ExtensionMember]:
    """Every schema-qualified object that belongs to an installed extension (run on the source)."""
    return frozenset(
        ExtensionMember(str(ext), str(kind), str(schema), str(name), bool(shared))
        for ext, kind, schema, name, shared in conn.execute(_MEMBERS_SQL).fetchall()
    )
