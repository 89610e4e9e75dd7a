"""Validation and planning: everything worth knowing before a byte moves, and nothing written anywhere.

``pgferry migrate plan`` and the first step of ``run`` both come through here. Problems that would lose or
duplicate data (a column the target lacks, a target table that already has rows, an extension the target
cannot install) are errors and stop ``run`` before it writes; each says how to fix it. Everything else is
reported so nobody is surprised afterwards (tables without keys, ownership that will not carry over).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import psycopg
from psycopg import sql

from pgferry.migrate.catalog import ServerInfo, Table, TableFilter, list_sequences, list_tables, server_info
from pgferry.migrate.chunks import count_chunks

__all__ = ["MigrationPlan", "Problem", "TablePlan", "build_plan", "same_database"]

Severity = Literal["error", "warning", "info"]

# Conservative planning figures for a 2-core machine on a fast network (see bench/ for measured ones).
COPY_BYTES_PER_SECOND_PER_JOB = 120e6
INDEX_SECONDS_PER_GB = 8.0
IGNORED_EXTENSIONS = {"plpgsql"}


@dataclass(frozen=True)
class Problem:
    severity: Severity
    message: str
    fix: str = ""
    table: str | None = None


@dataclass
class TablePlan:
    table: str
    rows: int
    bytes: int
    chunks: int
    key: str
    target: str  # 'exists' | 'created by schema phase' | 'missing'


@dataclass
class MigrationPlan:
    source: ServerInfo
    target: ServerInfo
    schema_from: str
    jobs: int
    tables: list[TablePlan] = field(default_factory=list)
    sequences: int = 0
    problems: list[Problem] = field(default_factory=list)
    estimated_seconds: float = 0.0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def total_rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.tables)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": {
                "version": self.source.version,
                "database": self.source.database,
                "size_bytes": self.source.size_bytes,
                "extensions": self.source.extensions,
            },
            "target": {
                "version": self.target.version,
                "database": self.target.database,
                "size_bytes": self.target.size_bytes,
                "extensions": self.target.extensions,
            },
            "schema_from": self.schema_from,
            "jobs": self.jobs,
            "tables": [asdict(t) for t in self.tables],
            "sequences": self.sequences,
            "total_rows": self.total_rows,
            "total_bytes": self.total_bytes,
            "estimated_seconds": round(self.estimated_seconds, 1),
            "problems": [asdict(p) for p in self.problems],
            "ok": not self.errors,
        }


def _target_columns(conn: psycopg.Connection[Any], schema: str, name: str) -> dict[str, tuple[str, bool, bool]] | None:
    rows = conn.execute(
        "select a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, "
        "a.atthasdef or a.attidentity <> '' or a.attgenerated <> '' "
        "from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = %s and c.relname = %s and a.attnum > 0 and not a.attisdropped",
        (schema, name),
    ).fetchall()
    if not rows:
        return None
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _normalise_type(type_sql: str) -> str:
    """Compare types without the schema an extension lives in (``public.vector`` = ``extensions.vector``)."""
    return type_sql.split(".")[-1].replace('"', "")


@dataclass
class _Context:
    """What every check may look at: both connections, the options, and the plan being filled in."""

    source: psycopg.Connection[Any]
    target: psycopg.Connection[Any]
    plan: MigrationPlan
    tables: list[Table]
    table_filter: TableFilter
    schema_from: str
    batch_rows: int | None
    resuming: bool
    online: bool = False

    def add(self, severity: Severity, message: str, fix: str = "", table: str | None = None) -> None:
        self.plan.problems.append(Problem(severity, message, fix, table))


def build_plan(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    *,
    table_filter: TableFilter,
    schema_from: str,
    jobs: int,
    batch_rows: int | None = None,
    resuming: bool = False,
    online: bool = False,
) -> MigrationPlan:
    """Every check, in the order an operator would want to read their findings."""
    plan = MigrationPlan(source=server_info(source), target=server_info(target), schema_from=schema_from, jobs=jobs)
    ctx = _Context(
        source, target, plan, list_tables(source, table_filter), table_filter, schema_from, batch_rows, resuming, online
    )
    for check in (
        _check_same_database,
        _check_tables_selected,
        _check_supabase_target,
        _check_extensions,
        _check_tables,
        _check_owners,
        _check_trigger_control,
        _check_privileges,
        _check_server_versions,
        _check_online,
    ):
        check(ctx)
    try:
        with source.transaction():
            plan.sequences = len(list_sequences(source, table_filter.schemas or None))
    except psycopg.errors.InsufficientPrivilege as exc:
        ctx.add(
            "error",
            f"the source role cannot read every sequence ({exc.diag.message_primary or exc})",
            "grant select on all sequences in schema public (and every migrated schema) to that role",
        )
    plan.estimated_seconds = _estimate_seconds(plan)
    return plan


def _estimate_seconds(plan: MigrationPlan) -> float:
    effective_jobs = max(1, min(plan.jobs, sum(t.chunks for t in plan.tables)))
    copy = plan.total_bytes / (COPY_BYTES_PER_SECOND_PER_JOB * effective_jobs)
    return copy + plan.total_bytes / 1e9 * INDEX_SECONDS_PER_GB / max(1, plan.jobs)


def _check_same_database(ctx: _Context) -> None:
    if same_database(ctx.source, ctx.target):
        ctx.add(
            "error",
            "the source and the target are the same database",
            "point --target (SUPABASE_DB_URL) at Supabase and --source (NEON_DATABASE_URL) at Neon",
        )


def _check_tables_selected(ctx: _Context) -> None:
    if not ctx.tables:
        ctx.add("error", "no tables on the source match the filters", "check --schemas/--tables/--exclude-tables")


def _check_supabase_target(ctx: _Context) -> None:
    if ctx.schema_from == "pgferry" and ctx.target.execute("select to_regnamespace('auth')").fetchone() == (None,):
        ctx.add(
            "error",
            "the target has no auth schema, so pgferry's migrations (RLS policies) cannot apply",
            "point --target at a Supabase database, or for a local server run `pgferry db baseline` first",
        )


def _check_extensions(ctx: _Context) -> None:
    source, target = ctx.plan.source, ctx.plan.target
    for ext, ext_schema in sorted(source.extensions.items()):
        if ext in IGNORED_EXTENSIONS:
            continue
        if ext in target.extensions:
            if target.extensions[ext] != ext_schema:
                ctx.add(
                    "info",
                    f"extension {ext} is in schema {ext_schema} on the source and {target.extensions[ext]} on the "
                    "target; references are rewritten",
                )
        elif ext not in target.available_extensions:
            ctx.add(
                "error",
                f"extension {ext} is used on the source but not available on the target",
                "enable it in the Supabase dashboard (Database → Extensions) or exclude the tables that need it",
            )
        else:
            ctx.add("info", f"extension {ext} will be created on the target")


def _check_tables(ctx: _Context) -> None:
    """Per table: where it will come from on the target, whether its columns fit, whether it is empty."""
    model_tables: dict[str, Any] = {}
    if ctx.schema_from == "pgferry":
        from pgferry.schema.models import Base  # SQLAlchemy loads only when pgferry's schema is the one applied

        model_tables = {t.name: t for t in Base.metadata.tables.values()}
    for table in ctx.tables:
        target_cols = _target_columns(ctx.target, table.schema, table.name)
        state = "exists" if target_cols is not None else "missing"
        if target_cols is None and ctx.schema_from == "source":
            state = "created by schema phase"
        elif target_cols is None and table.schema == "public" and table.name in model_tables:
            state = "created by schema phase"
            target_cols = {
                c.name: ("", not c.nullable, c.server_default is not None or bool(c.identity))
                for c in model_tables[table.name].columns
            }
        key = ",".join(table.primary_key) if table.primary_key else "none (verified by row hashes)"
        chunks = count_chunks(table, ctx.batch_rows)
        ctx.plan.tables.append(TablePlan(table.qualified, table.row_estimate, table.total_bytes, chunks, key, state))
        if not table.primary_key:
            ctx.add(
                "warning",
                f"{table.qualified} has no primary key: verification compares it as a multiset of rows, and "
                "online replication (later) would need REPLICA IDENTITY FULL on the source",
                table=table.qualified,
            )
        if state == "missing":
            ctx.add(
                "error",
                f"{table.qualified} does not exist on the target and pgferry's schema does not define it",
                f"use --schema-from source, or --exclude-tables {table.qualified}",
                table=table.qualified,
            )
        elif target_cols is not None:  # None: created from the source's own schema, same columns by construction
            _compare_columns(table, target_cols, ctx.plan.problems)
            if state == "exists" and not ctx.resuming:
                _check_empty(ctx, table)


def _check_empty(ctx: _Context, table: Table) -> None:
    has_rows = ctx.target.execute(
        sql.SQL("select exists (select 1 from {})").format(sql.Identifier(table.schema, table.name))
    ).fetchone()
    if has_rows and has_rows[0]:
        ctx.add(
            "error",
            f"{table.qualified} already has rows on the target; copying would duplicate them",
            f"empty it (truncate {table.qualified}) or exclude it with --exclude-tables",
            table=table.qualified,
        )


def _check_owners(ctx: _Context) -> None:
    owners = {
        r[0]
        for r in ctx.source.execute(
            "select distinct pg_get_userbyid(c.relowner) from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where c.relkind in ('r', 'p', 'v', 'm', 'S') and n.nspname not in ('pg_catalog', 'information_schema') "
            "and n.nspname not like 'pg\\_%'"
        )
    }
    foreign = sorted(owners - {r[0] for r in ctx.target.execute("select rolname from pg_roles")})
    if foreign:
        ctx.add(
            "info",
            f"objects owned by {', '.join(foreign)} on the source will be owned by the migrating role on the "
            "target (those roles do not exist there)",
        )


def _check_trigger_control(ctx: _Context) -> None:
    if not _can_disable_triggers(ctx.target):
        ctx.add(
            "error",
            "the target role cannot set session_replication_role, needed to load without firing triggers",
            "connect to the target as postgres (Supabase) or a superuser",
        )


def _check_privileges(ctx: _Context) -> None:
    ctx.plan.problems.extend(_privilege_problems(ctx.target, ctx.plan, ctx.schema_from))


def _check_online(ctx: _Context) -> None:
    """What following the source by logical replication needs, said before anything is created."""
    if not ctx.online:
        return
    if ctx.plan.source.wal_level != "logical":
        ctx.add(
            "error",
            f"logical replication is not enabled on the source (wal_level = {ctx.plan.source.wal_level})",
            "Neon: Project settings → Logical Replication → Enable (restarts its computes, cannot be undone); "
            "plain PostgreSQL: ALTER SYSTEM SET wal_level = logical and restart",
        )
    row = ctx.source.execute(
        "select rolreplication or rolsuper, current_user from pg_roles where rolname = current_user"
    ).fetchone()
    if row is not None and not row[0]:
        ctx.add(
            "error",
            f"role {row[1]} on the source cannot use logical replication (no REPLICATION)",
            "Neon: use a role created in the Console, CLI or API (they belong to neon_superuser); roles created "
            "in SQL cannot get REPLICATION there",
        )
    for table in ctx.tables:
        identity = ctx.source.execute(
            "select relreplident from pg_class where oid = to_regclass(%s)",
            (sql.Identifier(table.schema, table.name).as_string(ctx.source),),
        ).fetchone()
        if not table.primary_key and identity is not None and identity[0] not in ("f", "i"):
            ctx.add(
                "error",
                f"{table.qualified} has no primary key and no usable replica identity: its updates and deletes "
                "cannot be followed",
                f"add a primary key, or run on the source: alter table {table.qualified} replica identity full",
                table=table.qualified,
            )
    if ctx.plan.source.size_bytes > 1.5 * max(ctx.plan.target.size_bytes, 1):
        ctx.add(
            "warning",
            f"the source ({ctx.plan.source.size_bytes / 1e9:.1f} GB) is more than 1.5 times the target's database "
            "size: Supabase turns a database read-only when a load grows it that much, or at 95 % of its disk",
            "grow the disk by hand first (Supabase dashboard → Database → Settings → Disk), with room for the "
            "WAL the follow produces",
        )


def _check_server_versions(ctx: _Context) -> None:
    source, target = ctx.plan.source, ctx.plan.target
    if source.version_num < 140000:
        ctx.add(
            "warning",
            f"the source runs PostgreSQL {source.version}: before 14 a block range cannot be read on its own, so "
            "each table is copied as one chunk (no parallelism within a table)",
        )
    if target.wal_level != "logical":
        ctx.add(
            "warning",
            f"the target has wal_level = {target.wal_level}: Electric sync and Realtime need logical "
            "(every Supabase project has it)",
        )


def _compare_columns(table: Table, target_cols: dict[str, tuple[str, bool, bool]], problems: list[Problem]) -> None:
    source_cols = {c.name: c for c in table.columns}
    for name, column in source_cols.items():
        if name not in target_cols:
            problems.append(
                Problem(
                    "error",
                    f"{table.qualified}.{name} exists on the source but not on the target; its data would be lost",
                    "add the column on the target or use --schema-from source",
                    table=table.qualified,
                )
            )
            continue
        target_type = target_cols[name][0]
        if target_type and _normalise_type(target_type) != _normalise_type(column.type_sql):
            problems.append(
                Problem(
                    "error",
                    f"{table.qualified}.{name} is {column.type_sql} on the source but {target_type} on the target",
                    "align the column types before migrating",
                    table=table.qualified,
                )
            )
    for name, (_type, not_null, has_default) in target_cols.items():
        if name not in source_cols and not_null and not has_default:
            problems.append(
                Problem(
                    "error",
                    f"{table.qualified}.{name} is NOT NULL without a default on the target "
                    "and absent on the source; every row would be rejected",
                    "give it a default or make it nullable",
                    table=table.qualified,
                )
            )


def _can_disable_triggers(target: psycopg.Connection[Any]) -> bool:
    try:
        with target.transaction(force_rollback=True):
            target.execute("set local session_replication_role = replica")
        return True
    except psycopg.errors.InsufficientPrivilege:
        return False


def same_database(source: psycopg.Connection[Any], target: psycopg.Connection[Any]) -> bool:
    """Whether both connections reach one database of one cluster (migrating it onto itself would write the
    source). Managed services hide the system identifier, so a session marker is looked for as well."""
    ids = []
    for conn in (source, target):
        try:
            with conn.transaction():
                row = conn.execute(
                    "select system_identifier::text, current_database() from pg_control_system()"
                ).fetchone()
            ids.append(tuple(row) if row else None)
        except psycopg.errors.InsufficientPrivilege:
            ids.append(None)
    if ids[0] is not None and ids[1] is not None:
        return ids[0] == ids[1]
    marker = f"pgferry-same-database-probe-{uuid.uuid4().hex}"
    previous = source.execute("select current_setting('application_name')").fetchone()
    source.execute("select set_config('application_name', %s, false)", (marker,))
    try:
        row = target.execute(
            "select exists (select 1 from pg_stat_activity where application_name = %s "
            "and datname = current_database())",
            (marker,),
        ).fetchone()
        return bool(row and row[0])
    finally:
        source.execute("select set_config('application_name', %s, false)", (previous[0] if previous else "",))


def _privilege_problems(target: psycopg.Connection[Any], plan: MigrationPlan, schema_from: str) -> list[Problem]:
    """What the target role must be allowed to create: the state schema, and the schemas and tables the
    schema phase adds. Said before ``run`` writes anything, with the statement that grants it."""
    problems: list[Problem] = []
    row = target.execute(
        "select current_user, current_database(), has_database_privilege(current_database(), 'CREATE'), "
        "to_regnamespace('pgferry') is not null"
    ).fetchone()
    assert row is not None
    role, database, can_create_schema, have_state_schema = row
    grant = f"grant create on database {database} to {role}; or connect as postgres (Supabase) or a superuser"
    if not have_state_schema and not can_create_schema:
        problems.append(
            Problem(
                "error",
                f"role {role} cannot create schema pgferry on the target (it keeps the migration's state there)",
                grant,
            )
        )
    created = [t.table for t in plan.tables if t.target == "created by schema phase"]
    if schema_from == "source":
        for schema in sorted({t.split(".", 1)[0] for t in created}):
            exists = target.execute("select to_regnamespace(%s) is not null", (schema,)).fetchone()
            if exists and exists[0]:
                ok = target.execute("select has_schema_privilege(%s, 'CREATE')", (schema,)).fetchone()
                if not (ok and ok[0]):
                    problems.append(
                        Problem(
                            "error",
                            f"role {role} cannot create tables in schema {schema} on the target",
                            f"grant create on schema {schema} to {role}",
                        )
                    )
            elif not can_create_schema:
                problems.append(Problem("error", f"role {role} cannot create schema {schema} on the target", grant))
    return problems
