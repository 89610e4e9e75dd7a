"""What the source holds: the tables to move, their columns, keys, sizes and sequences.

Read from ``pg_catalog`` only, never from ``information_schema`` (which hides objects the connecting role
does not own and is slow on large catalogs). Everything here is a plain value so plans and state can be
serialised, compared between source and target, and shown to the operator.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgferry.migrate.source_schema import MANAGED_SCHEMAS

FIRST_NORMAL_OID = 16384
"""OIDs below this belong to built-in objects, identical on every PostgreSQL server."""


@dataclass(frozen=True)
class Column:
    name: str
    type_sql: str
    type_oid: int
    generated: bool
    identity: str  # '' | 'a' (always) | 'd' (by default)
    binary_safe: bool
    not_null: bool


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    row_estimate: int
    total_bytes: int
    heap_bytes: int
    partition_of: str | None = None
    table_bytes: int = 0
    """Heap and out-of-line (TOAST) values, without indexes: what a copy moves."""

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def copy_columns(self) -> tuple[str, ...]:
        """Columns COPY can write: generated columns are recomputed by the target."""
        return tuple(c.name for c in self.columns if not c.generated)

    @property
    def binary_copy(self) -> bool:
        """Whether binary COPY is safe: arrays and composites of non-built-in types embed server OIDs."""
        return all(c.binary_safe for c in self.columns if not c.generated)

    @property
    def avg_row_bytes(self) -> float:
        return self.total_bytes / self.row_estimate if self.row_estimate > 0 else 0.0


@dataclass(frozen=True)
class SequenceInfo:
    schema: str
    name: str
    last_value: int | None
    is_called: bool
    owned_by: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class TableFilter:
    """``--schemas`` / ``--tables`` / ``--exclude-tables``; patterns are shell globs on ``schema.table``."""

    schemas: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    exclude_tables: tuple[str, ...] = ()

    def _matches(self, patterns: Sequence[str], schema: str, name: str) -> bool:
        for pattern in patterns:
            target = f"{schema}.{name}" if "." in pattern else name
            if fnmatch.fnmatchcase(target, pattern):
                return True
        return False

    def includes(self, schema: str, name: str) -> bool:
        if schema in MANAGED_SCHEMAS:
            return False
        if self.schemas and schema not in self.schemas:
            return False
        if self.tables and not self._matches(self.tables, schema, name):
            return False
        return not self._matches(self.exclude_tables, schema, name)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "schemas": list(self.schemas),
            "tables": list(self.tables),
            "exclude_tables": list(self.exclude_tables),
        }


_TABLES_SQL = """
select c.oid, n.nspname, c.relname,
       greatest(c.reltuples, 0)::bigint,
       pg_total_relation_size(c.oid), pg_relation_size(c.oid),
       case when c.relispartition then (select pn.nspname || '.' || p.relname from pg_inherits i
            join pg_class p on p.oid = i.inhparent join pg_namespace pn on pn.oid = p.relnamespace
            where i.inhrelid = c.oid) end,
       c.reltuples < 0, pg_table_size(c.oid)
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
where c.relkind = 'r'
  and n.nspname not in ('pg_catalog', 'information_schema')
  and n.nspname not like 'pg\\_%'
order by n.nspname, c.relname
"""

_COLUMNS_SQL = """
select a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid, a.attgenerated <> '', a.attidentity,
       a.attnotnull, t.typtype, t.typcategory, coalesce(et.oid, 0), coalesce(bt.typtype, '')
from pg_attribute a
join pg_type t on t.oid = a.atttypid
left join pg_type et on et.oid = t.typelem and t.typcategory = 'A'
left join pg_type bt on bt.oid = t.typbasetype and t.typtype = 'd'
where a.attrelid = %s and a.attnum > 0 and not a.attisdropped
order by a.attnum
"""

_PK_SQL = """
select array_agg(a.attname order by k.ord)
from pg_constraint con
cross join lateral unnest(con.conkey) with ordinality as k(attnum, ord)
join pg_attribute a on a.attrelid = con.conrelid and a.attnum = k.attnum
where con.conrelid = %s and con.contype = 'p'
"""


def _binary_safe(typtype: str, category: str, elem_oid: int, base_typtype: str) -> bool:
    if typtype == "c" or base_typtype == "c":
        return False  # record_send writes each field's type OID
    return not (category == "A" and elem_oid >= FIRST_NORMAL_OID)  # array_send writes the element OID


def list_tables(conn: psycopg.Connection[Any], table_filter: TableFilter | None = None) -> list[Table]:
    """Ordinary tables and leaf partitions the filter selects (partitioned parents hold no rows)."""
    table_filter = table_filter or TableFilter()
    tables: list[Table] = []
    rows = conn.execute(_TABLES_SQL).fetchall()
    for oid, schema, name, estimate, total, heap, parent, never_analyzed, table_bytes in rows:
        if not table_filter.includes(schema, name):
            continue
        columns = tuple(
            Column(
                name=r[0],
                type_sql=r[1],
                type_oid=r[2],
                generated=r[3],
                identity=r[4],
                binary_safe=_binary_safe(r[6], r[7], r[8], r[9]),
                not_null=r[5],
            )
            for r in conn.execute(_COLUMNS_SQL, (oid,))
        )
        pk_row = conn.execute(_PK_SQL, (oid,)).fetchone()
        primary_key = tuple(pk_row[0]) if pk_row and pk_row[0] else ()
        if never_analyzed or (estimate == 0 and heap > 0):
            # reltuples is -1 (or 0) until the first VACUUM/ANALYZE; estimates drive chunking, so count.
            counted = conn.execute(
                psycopg.sql.SQL("select count(*) from {}.{}").format(
                    psycopg.sql.Identifier(schema), psycopg.sql.Identifier(name)
                )
            ).fetchone()
            estimate = int(counted[0]) if counted else 0
        tables.append(
            Table(
                schema=schema,
                name=name,
                columns=columns,
                primary_key=primary_key,
                row_estimate=int(estimate),
                total_bytes=int(total),
                heap_bytes=int(heap),
                partition_of=parent,
                table_bytes=int(table_bytes),
            )
        )
    return tables


def column_types(conn: psycopg.Connection[Any], schema: str, table: str) -> dict[str, str]:
    """Column name → ``format_type`` of a table's live columns (empty when the table does not exist)."""
    qualified = psycopg.sql.SQL("{}.{}").format(psycopg.sql.Identifier(schema), psycopg.sql.Identifier(table))
    rows = conn.execute(
        "select a.attname, format_type(a.atttypid, a.atttypmod) from pg_attribute a "
        "where a.attrelid = to_regclass(%s) and a.attnum > 0 and not a.attisdropped",
        (qualified.as_string(conn),),
    ).fetchall()
    return {str(name): str(type_sql) for name, type_sql in rows}


def get_table(conn: psycopg.Connection[Any], schema: str, name: str) -> Table | None:
    for table in list_tables(conn, TableFilter(schemas=(schema,), tables=(f"{schema}.{name}",))):
        if table.name == name:
            return table
    return None


_SEQUENCES_SQL = """
select n.nspname, c.relname,
       (select d.refobjid::regclass::text || '.' || a.attname
          from pg_depend d join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
         where d.objid = c.oid and d.classid = 'pg_class'::regclass and d.deptype in ('a', 'i') limit 1)
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relkind = 'S' and n.nspname not in ('pg_catalog', 'information_schema')
order by 1, 2
"""


def list_sequences(conn: psycopg.Connection[Any], schemas: Sequence[str] | None = None) -> list[SequenceInfo]:
    """Sequences with their current position (as the caller's snapshot sees it)."""
    found: list[SequenceInfo] = []
    for schema, name, owned_by in conn.execute(_SEQUENCES_SQL).fetchall():
        if schema in MANAGED_SCHEMAS or (schemas and schema not in schemas):
            continue
        row = conn.execute(
            psycopg.sql.SQL("select last_value, is_called from {}.{}").format(
                psycopg.sql.Identifier(schema), psycopg.sql.Identifier(name)
            )
        ).fetchone()
        assert row is not None
        found.append(SequenceInfo(schema, name, int(row[0]), bool(row[1]), owned_by))
    return found


@dataclass
class ServerInfo:
    version: str
    version_num: int
    database: str
    size_bytes: int
    system_identifier: str
    extensions: dict[str, str] = field(default_factory=dict)
    available_extensions: set[str] = field(default_factory=set)
    wal_level: str = ""
    is_superuser: bool = False

    @property
    def major(self) -> int:
        return self.version_num // 10000


def server_info(conn: psycopg.Connection[Any]) -> ServerInfo:
    row = conn.execute(
        "select current_setting('server_version'), current_setting('server_version_num')::int, "
        "current_database(), pg_database_size(current_database()), "
        "current_setting('wal_level'), "
        "(select rolsuper from pg_roles where rolname = current_user)"
    ).fetchone()
    assert row is not None
    try:
        with conn.transaction():
            ident = conn.execute("select system_identifier::text from pg_control_system()").fetchone()
        system_identifier = str(ident[0]) if ident else ""
    except psycopg.errors.InsufficientPrivilege:
        system_identifier = ""  # managed services (Neon, Supabase) do not grant pg_control_system()
    extensions = {
        name: schema
        for name, schema in conn.execute(
            "select e.extname, n.nspname from pg_extension e join pg_namespace n on n.oid = e.extnamespace"
        )
    }
    available = {r[0] for r in conn.execute("select name from pg_available_extensions")}
    return ServerInfo(
        version=str(row[0]).split(" ")[0],
        version_num=int(row[1]),
        database=str(row[2]),
        size_bytes=int(row[3]),
        system_identifier=system_identifier,
        wal_level=str(row[4]),
        is_superuser=bool(row[5]),
        extensions=extensions,
        available_extensions=available,
    )
