"""What the sync server needs to know about a table: columns, types for ``electric-schema``, primary key.

Read from ``pg_catalog`` once per shape. The types are PostgreSQL's own spellings (``format_type``) so rendering a
value back into SQL (``$1::text::<type>``) is exact, and the ``electric-schema`` entries use the element type's
``typname`` as Electric does, which is what the client's parser switches on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from pgferry.sync.errors import ProtocolError
from pgferry.sync.protocol import TableName

__all__ = ["ColumnMeta", "TableInfo", "load_table_info"]


@dataclass(frozen=True, slots=True)
class ColumnMeta:
    name: str
    sql_type: str  # format_type(): safe to splice, it comes from the catalog
    type_name: str  # typname of the element type for arrays
    dims: int
    not_null: bool
    pk_index: int | None
    type_modifier: int
    category: str
    #: ``col::text`` is exactly what COPY prints for the column (its type's output function): no function cast to
    #: text (``boolean``, ``inet``, ``cidr``, ``character``, ``"char"`` and ``name`` have one) and not a domain.
    #: The snapshot then selects the column as it is, without the cast (PostgreSQL's COPY runs ~15% faster).
    text_is_output: bool = False

    def schema_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": self.type_name}
        if self.dims:
            entry["dims"] = self.dims
        if self.not_null:
            entry["not_null"] = True
        if self.pk_index is not None:
            entry["pk_index"] = self.pk_index
        if self.type_modifier >= 0:
            if self.type_name in ("varchar", "bpchar"):
                entry["max_length"] = self.type_modifier - 4
            elif self.type_name == "numeric":
                modifier = self.type_modifier - 4
                entry["precision"] = modifier >> 16
                entry["scale"] = modifier & 0xFFFF
            elif self.type_name in ("bit", "varbit"):
                entry["length"] = self.type_modifier
        return entry


@dataclass(frozen=True, slots=True)
class TableInfo:
    oid: int
    name: TableName
    columns: tuple[ColumnMeta, ...]
    primary_key: tuple[str, ...]
    kind: str

    def column(self, name: str) -> ColumnMeta:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)


_SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema", "pg_toast"})

_RESOLVE = """
select c.oid, c.relkind from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
where n.nspname = %s and c.relname = %s
"""

_COLUMNS = """
select a.attname,
       pg_catalog.format_type(a.atttypid, a.atttypmod),
       coalesce(et.typname, t.typname),
       case when t.typcategory = 'A' then greatest(a.attndims, 1) else 0 end,
       a.attnotnull,
       (select array_position(i.indkey::int2[], a.attnum) from pg_catalog.pg_index i
         where i.indrelid = a.attrelid and i.indisprimary),
       a.atttypmod,
       t.typcategory,
       t.typtype <> 'd' and not exists (
         select 1 from pg_catalog.pg_cast c
          where c.castsource = a.atttypid and c.casttarget = 'pg_catalog.text'::pg_catalog.regtype
            and c.castmethod = 'f')
from pg_catalog.pg_attribute a
join pg_catalog.pg_type t on t.oid = a.atttypid
left join pg_catalog.pg_type et on t.typcategory = 'A' and et.oid = t.typelem
where a.attrelid = %s and a.attnum > 0 and not a.attisdropped
order by a.attnum
"""


def load_table_info(conn: psycopg.Connection[Any], table: TableName) -> TableInfo:
    """Resolve ``table`` or raise a 400 naming it; tables without a primary key are refused (every message key
    is built from the key, and updates/deletes are matched by it)."""
    if table.schema in _SYSTEM_SCHEMAS or table.schema.startswith("pg_"):
        raise ProtocolError("table", f"{str(table)!r} is in a system schema; only application tables can be synced")
    row = conn.execute(_RESOLVE, [table.schema, table.name]).fetchone()
    if row is None:
        raise ProtocolError("table", f"table {str(table)!r} does not exist (check the schema and the spelling)")
    oid, kind = int(row[0]), str(row[1])
    if kind not in ("r", "p"):
        raise ProtocolError("table", f"{str(table)!r} is not a table (views and other relations cannot be synced)")
    columns = tuple(
        ColumnMeta(
            name=str(r[0]),
            sql_type=str(r[1]),
            type_name=str(r[2]),
            dims=int(r[3]),
            not_null=bool(r[4]),
            pk_index=None if r[5] is None else int(r[5]),
            type_modifier=int(r[6]),
            category=str(r[7]),
            text_is_output=bool(r[8]),
        )
        for r in conn.execute(_COLUMNS, [oid]).fetchall()
    )
    primary_key = tuple(c.name for c in sorted((c for c in columns if c.pk_index is not None), key=_pk_order))
    if not primary_key:
        raise ProtocolError("table", f"table {str(table)!r} has no primary key; add one to sync it")
    return TableInfo(oid=oid, name=table, columns=columns, primary_key=primary_key, kind=kind)


def _pk_order(column: ColumnMeta) -> int:
    return column.pk_index if column.pk_index is not None else 0
