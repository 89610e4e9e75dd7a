"""Who may see which replicated row: RLS evaluated by PostgreSQL, in batches, on the rows as the WAL has them.

Supabase Realtime re-reads each changed row by key once per subscriber (and skips deletes). Here a batch of
transactions costs a fixed number of round trips whatever the number of subscribers:

1. the batch's row images (new rows, and old rows of updates and deletes) are copied, as the server printed
   them, into a temporary table shaped like the published table (one per table, per connection);
2. each value is rendered as JSON by PostgreSQL (``to_jsonb``, exactly what Realtime's ``realtime.cast`` does);
3. for every distinct set of claims (one per token, shared by all channels that use it) the transaction switches
   to the claims' role with ``request.jwt.claims`` set (:func:`pgferry.db.rls.apply_claims`, as PostgREST does)
   and selects the staged rows through the table's *own* SELECT policies: permissive ones ORed, restrictive ones
   ANDed, only those that apply to the role, none at all when RLS is off for the table or the role bypasses it
   (``BYPASSRLS``, or the owner without ``FORCE``). The same statement evaluates every subscription's filter on
   the visible rows. All of this is sent in one pipeline; the transaction is rolled back.

Columns the role may not SELECT (``has_column_privilege``) never leave this module's results: callers get, per
role, the readable columns. Policies and privileges are read from the catalog and cached for
:data:`CATALOG_TTL` seconds, so a policy change takes effect within that time.

Must not know about websockets, channels or the wire format; it decides visibility and renders values, nothing
else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from psycopg import sql

from pgferry.db.quoting import quote_ident
from pgferry.db.rls import apply_claims
from pgferry.errors import PgferryError
from pgferry.realtime.filters import Filter, render_filters
from pgferry.sync.session import connect_sql

__all__ = [
    "CATALOG_TTL",
    "Authorizer",
    "FilterCheckError",
    "Group",
    "Image",
    "RoleView",
    "TableCatalog",
    "TableResult",
]

CATALOG_TTL: Final = 2.0
_ROW: Final = "__pgferry_row"
_STATEMENT_TIMEOUT_MS: Final = 10_000

RowValues = Mapping[str, str | None]


class FilterCheckError(PgferryError):
    """A subscription refused at subscribe time (unknown or unreadable column, a value of the wrong type, a table
    outside the publication); the message is what the client is told."""


@dataclass(frozen=True, slots=True)
class TableCatalog:
    """A published table's columns in order, their types, its primary key and RLS flags."""

    oid: int
    schema: str
    name: str
    columns: tuple[str, ...]
    types: Mapping[str, str]  # format_type(), for casts
    typnames: Mapping[str, str]  # pg_type.typname, for the payload's ``columns``
    primary_key: tuple[str, ...]
    rls: bool
    force_rls: bool


@dataclass(frozen=True, slots=True)
class RoleView:
    """What one role may see of one table: readable columns, and the rows (``predicate`` SQL over the table's
    columns; ``None`` = every row; ``visible`` False = none at all)."""

    visible: bool
    columns: tuple[str, ...]
    predicate: str | None


@dataclass(frozen=True, slots=True)
class Image:
    """One row image to judge: ``values`` as PostgreSQL text; ``present`` names the columns the WAL carried
    (a key-only old row, or an unchanged TOASTed value, lacks the others)."""

    values: RowValues
    present: frozenset[str]


@dataclass(frozen=True, slots=True)
class Group:
    """Subscribers sharing one set of verified claims: ``filters`` has one entry per subscription to judge."""

    claims: Mapping[str, Any]
    filters: Sequence[tuple[Filter, ...]]

    @property
    def role(self) -> str:
        return str(self.claims.get("role"))


@dataclass
class TableResult:
    """For one table's images: ``json[i]`` maps column → JSON text of image ``i``; ``matches[g][i]`` is, for group
    ``g`` and a visible image ``i``, one bool per subscription filter (an image absent from ``matches[g]`` is not
    visible to that group); ``views[g]`` is the group's role view."""

    json: list[dict[str, str]]
    matches: list[dict[int, list[bool]]] = field(default_factory=list)
    views: list[RoleView] = field(default_factory=list)


class Authorizer:
    """One per thread (it holds a connection); reconnects lazily after the database went away. Connection errors
    are raised for the caller to retry the batch."""

    def __init__(self, url: str, *, catalog_ttl: float = CATALOG_TTL) -> None:
        self._url = url
        self._ttl = catalog_ttl
        self._conn: psycopg.Connection[Any] | None = None
        self._staging: dict[tuple[int, tuple[str, ...]], str] = {}
        self._catalogs: dict[int, tuple[float, TableCatalog]] = {}
        self._views: dict[tuple[str, int], tuple[float, RoleView]] = {}
        self._published: tuple[float, dict[tuple[str, str], int]] | None = None
        self._queries: dict[tuple[Any, ...], tuple[bytes, list[object]]] = {}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect_sql(self._url, statement_timeout_ms=_STATEMENT_TIMEOUT_MS)
            self._staging.clear()
        return self._conn

    def reset(self) -> None:
        """Forget the connection and caches (after a database error)."""
        self.close()
        self._catalogs.clear()
        self._views.clear()
        self._published = None

    # -- catalog -----------------------------------------------------------------------------------------------

    def published_tables(self, publication: str) -> dict[tuple[str, str], int]:
        """``(schema, table)`` → oid of every table in ``publication`` (cached)."""
        now = time.monotonic()
        if self._published is not None and now - self._published[0] < self._ttl:
            return self._published[1]
        rows = (
            self._connection()
            .execute(
                "select schemaname, tablename, format('%%I.%%I', schemaname, tablename)::regclass::oid::int8 "
                "from pg_catalog.pg_publication_tables where pubname = %s",
                [publication],
            )
            .fetchall()
        )
        found = {(str(r[0]), str(r[1])): int(r[2]) for r in rows}
        self._published = (now, found)
        return found

    def catalog(self, oid: int) -> TableCatalog:
        now = time.monotonic()
        cached = self._catalogs.get(oid)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        conn = self._connection()
        head = conn.execute(
            "select n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity from pg_catalog.pg_class c "
            "join pg_catalog.pg_namespace n on n.oid = c.relnamespace where c.oid = %s",
            [oid],
        ).fetchone()
        if head is None:
            raise FilterCheckError(f"table with oid {oid} no longer exists")
        columns = conn.execute(
            "select a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), t.typname, "
            "coalesce(a.attnum = any(i.indkey), false) from pg_catalog.pg_attribute a "
            "join pg_catalog.pg_type t on t.oid = a.atttypid "
            "left join pg_catalog.pg_index i on i.indrelid = a.attrelid and i.indisprimary "
            "where a.attrelid = %s and a.attnum > 0 and not a.attisdropped order by a.attnum",
            [oid],
        ).fetchall()
        catalog = TableCatalog(
            oid=oid,
            schema=str(head[0]),
            name=str(head[1]),
            columns=tuple(str(c[0]) for c in columns),
            types={str(c[0]): str(c[1]) for c in columns},
            typnames={str(c[0]): str(c[2]) for c in columns},
            primary_key=tuple(str(c[0]) for c in columns if c[3]),
            rls=bool(head[2]),
            force_rls=bool(head[3]),
        )
        self._catalogs[oid] = (now, catalog)
        return catalog

    def role_view(self, role: str, oid: int) -> RoleView:
        """The role's readable columns and the SQL of its row visibility on the table (cached)."""
        now = time.monotonic()
        cached = self._views.get((role, oid))
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        catalog = self.catalog(oid)
        conn = self._connection()
        head = conn.execute(
            "select r.rolbypassrls or r.rolsuper, pg_catalog.pg_has_role(r.oid, c.relowner, 'USAGE') "
            "from pg_catalog.pg_roles r, pg_catalog.pg_class c where r.rolname = %s and c.oid = %s",
            [role, oid],
        ).fetchone()
        if head is None:
            view = RoleView(False, (), None)
        else:
            readable = conn.execute(
                "select a.attname from pg_catalog.pg_attribute a where a.attrelid = %s and a.attnum > 0 "
                "and not a.attisdropped and pg_catalog.has_column_privilege(%s, a.attrelid, a.attnum, 'SELECT') "
                "order by a.attnum",
                [oid, role],
            ).fetchall()
            columns = tuple(str(r[0]) for r in readable)
            bypass = bool(head[0]) or (bool(head[1]) and not catalog.force_rls)
            predicate: str | None = None
            if catalog.rls and not bypass:
                policies = conn.execute(
                    "select p.polpermissive, pg_catalog.pg_get_expr(p.polqual, p.polrelid) "
                    "from pg_catalog.pg_policy p where p.polrelid = %s and p.polcmd in ('r', '*') "
                    "and p.polqual is not null and (0::oid = any(p.polroles) or exists (select 1 from "
                    "unnest(p.polroles) as pr(oid) where pg_catalog.pg_has_role(%s, pr.oid, 'USAGE'))) "
                    "order by p.polname",
                    [oid, role],
                ).fetchall()
                permissive = [f"({r[1]})" for r in policies if r[0]]
                restrictive = [f"({r[1]})" for r in policies if not r[0]]
                # PostgreSQL's rule: no permissive policy that applies means no row at all.
                parts = [f"({' or '.join(permissive)})" if permissive else "false", *restrictive]
                predicate = " and ".join(parts)
            view = RoleView(bool(columns), columns, predicate)
        self._views[(role, oid)] = (now, view)
        return view

    def check_subscription(self, role: str, oid: int, filters: tuple[Filter, ...]) -> None:
        """Realtime's subscribe-time check: each filter column exists and the role may read it; each value casts to
        the column's type. :class:`FilterCheckError` with the reason otherwise."""
        catalog = self.catalog(oid)
        view = self.role_view(role, oid)
        if not view.visible:
            raise FilterCheckError(f"role {role} may not read {catalog.schema}.{catalog.name}")
        conn = self._connection()
        for item in filters:
            if item.column not in catalog.types:
                raise FilterCheckError(f"invalid column for filter {item.column}")
            if item.column not in view.columns:
                raise FilterCheckError(f"role {role} may not read column {item.column}")
            cast = sql.SQL(catalog.types[item.column])
            for value in item.values:
                try:
                    with conn.transaction():
                        conn.execute(sql.SQL("select %s::text::{}").format(cast), [value])
                except psycopg.errors.DataError as exc:
                    detail = (exc.diag.message_primary or "invalid value").splitlines()[0]
                    raise FilterCheckError(f"{detail} (column {item.column})") from None

    # -- batches -----------------------------------------------------------------------------------------------

    def _staging_table(self, catalog: TableCatalog) -> str:
        key = (catalog.oid, catalog.columns)
        name = self._staging.get(key)
        if name is None:
            name = f"pgferry_rt_{catalog.oid}_{len(self._staging)}"
            definition = ", ".join([f"{_ROW} int4", *(f"{quote_ident(c)} {catalog.types[c]}" for c in catalog.columns)])
            conn = self._connection()
            conn.execute(f"create temporary table {name} ({definition})")
            # Read as each subscriber's role; it lives only in this session and holds nothing between batches.
            conn.execute(f"grant select on pg_temp.{name} to public")
            self._staging[key] = name
        return name

    def _group_query(
        self, catalog: TableCatalog, table: str, view: RoleView, filters: tuple[tuple[Filter, ...], ...]
    ) -> tuple[bytes, list[object]]:
        """The statement selecting the staged rows a role's policies let through, with one filter verdict per
        subscription; composed once per shape of group (most groups differ only in their claims)."""
        key = (catalog.oid, catalog.columns, table, view.predicate, filters)
        cached = self._queries.get(key)
        if cached is not None:
            return cached
        params: list[object] = []
        alias = sql.Identifier(catalog.name)

        def column(name: str) -> sql.Composable:
            return alias + sql.SQL(".") + sql.Identifier(name)

        tests = [render_filters(item, column, catalog.types.__getitem__, params) for item in filters]
        columns = sql.SQL(", ").join(sql.SQL("coalesce({}, false)").format(t) for t in tests)
        where = sql.SQL(view.predicate if view.predicate is not None else "true")
        query = sql.SQL("select {}.{}{} from pg_temp.{} as {} where {}").format(
            alias,
            sql.Identifier(_ROW),
            sql.SQL(", ") + columns if tests else sql.SQL(""),
            sql.Identifier(table),
            alias,
            where,
        )
        if len(self._queries) > 10_000:
            self._queries.clear()
        composed = (query.as_bytes(self._connection()), params)
        self._queries[key] = composed
        return composed

    def evaluate(self, requests: Sequence[tuple[TableCatalog, Sequence[Image], Sequence[Group]]]) -> list[TableResult]:
        """Judge every request's images for every group, in one transaction and one pipeline (see the module doc)."""
        conn = self._connection()
        staged = [self._staging_table(catalog) for catalog, _, _ in requests]
        results: list[TableResult] = []
        with conn.transaction(force_rollback=True):
            for (catalog, images, _), table in zip(requests, staged, strict=True):
                names = sql.SQL(", ").join(sql.Identifier(c) for c in (_ROW, *catalog.columns))
                statement = sql.SQL("copy pg_temp.{} ({}) from stdin").format(sql.Identifier(table), names)
                with conn.cursor().copy(statement) as copy:
                    for index, image in enumerate(images):
                        copy.write_row([str(index), *(image.values.get(c) for c in catalog.columns)])
            json_cursors: list[psycopg.Cursor[Any]] = []
            group_cursors: list[list[psycopg.Cursor[Any] | None]] = []
            views: list[list[RoleView]] = []
            plans: list[list[tuple[int, RoleView]]] = []
            for catalog, _, groups in requests:
                plan = []
                for group in groups:
                    plan.append((0, self.role_view(group.role, catalog.oid)))
                plans.append(plan)
            with conn.pipeline():
                for (catalog, _, _), table in zip(requests, staged, strict=True):
                    cursor = conn.cursor()
                    rendered = sql.SQL(", ").join(
                        sql.SQL("pg_catalog.to_jsonb(t.{})::text").format(sql.Identifier(c)) for c in catalog.columns
                    )
                    cursor.execute(
                        sql.SQL("select t.{}, {} from pg_temp.{} as t order by 1").format(
                            sql.Identifier(_ROW), rendered, sql.Identifier(table)
                        )
                    )
                    json_cursors.append(cursor)
                for (catalog, _, groups), table, plan in zip(requests, staged, plans, strict=True):
                    per_table: list[psycopg.Cursor[Any] | None] = []
                    table_views: list[RoleView] = []
                    for group, (_, view) in zip(groups, plan, strict=True):
                        table_views.append(view)
                        if not view.visible:
                            per_table.append(None)
                            continue
                        apply_claims(conn, group.claims)
                        query, params = self._group_query(catalog, table, view, tuple(group.filters))
                        cursor = conn.cursor()
                        cursor.execute(query, params)
                        per_table.append(cursor)
                    group_cursors.append(per_table)
                    views.append(table_views)
                conn.execute("reset role")
            for (catalog, images, _), json_cursor, per_table, table_views in zip(
                requests, json_cursors, group_cursors, views, strict=True
            ):
                rendered_rows: list[dict[str, str]] = [{} for _ in images]
                for row in json_cursor.fetchall():
                    index = int(row[0])
                    present = images[index].present
                    rendered_rows[index] = {
                        name: value
                        for name, value in zip(catalog.columns, row[1:], strict=True)
                        if name in present and value is not None
                    }
                    for name in catalog.columns:
                        if name in present and name not in rendered_rows[index]:
                            rendered_rows[index][name] = "null"
                result = TableResult(rendered_rows, views=list(table_views))
                for group_cursor in per_table:
                    matches: dict[int, list[bool]] = {}
                    if group_cursor is not None:
                        for row in group_cursor.fetchall():
                            matches[int(row[0])] = [bool(v) for v in row[1:]]
                    result.matches.append(matches)
                results.append(result)
        return results


def claims_key(claims: Mapping[str, Any]) -> str:
    """A stable text of a claims mapping: subscribers with equal keys are judged together."""
    return json.dumps(dict(claims), sort_keys=True, separators=(",", ":"), default=str)
