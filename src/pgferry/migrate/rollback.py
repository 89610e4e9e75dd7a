"""RollbackPlan: return the target to what it was before the migration, verifying every step.

What pgferry created is removed: the schema phase recorded the target's objects before it ran, so the
objects that appeared since (tables, types, functions, schemas, extensions) are exactly the ones to drop,
and pgferry's own migrations are first downgraded to the revision the target had. Tables that existed before
were empty (``plan`` refuses to load into a table with rows), so they are emptied and get back any index or
constraint the load had dropped. Finally the migration state itself goes. The source is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from pgferry.migrate import state as st
from pgferry.migrate.deferred import pending_deferred, restore_one

if TYPE_CHECKING:
    from pgferry.migrate.engine import MigrationService


class RollbackError(Exception):
    pass


@dataclass
class RollbackStep:
    name: str
    detail: str
    verified: bool


@dataclass
class RollbackReport:
    run_id: int | None
    steps: list[RollbackStep] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(step.verified for step in self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "ok": self.ok, "steps": [s.__dict__ for s in self.steps]}


def rollback(service: MigrationService, run_id: int | None = None) -> RollbackReport:
    from pgferry.migrate import source_schema
    from pgferry.migrate.engine import MigrationError
    from pgferry.schema import migrator

    target_url = service.options.target_url.get_secret_value()
    with service.connect_target() as target:
        run = st.latest_run(target)
        if run is None or (run_id is not None and run.id != run_id):
            raise MigrationError("no migration recorded on the target, so there is nothing to roll back")
        if run.status == "rolled_back":
            return RollbackReport(run.id, [RollbackStep("nothing to do", "already rolled back", True)])
        report = RollbackReport(run.id)
        migrated = [
            (r[0], r[1], bool(r[2]))
            for r in target.execute(
                "select schema_name, table_name, target_existed from pgferry.migration_tables where run_id = %s",
                (run.id,),
            )
        ]
    preexisting = [(schema, table) for schema, table, existed in migrated if existed]

    # 1. Every table the migration loaded: emptied, with the indexes and keys the load dropped put back.
    #    Pre-existing tables must end like this; tables the migration created are dropped later, but their
    #    schema objects must be complete first (a migration downgrade drops indexes by name).
    with service.connect_target() as target:
        present = [
            (schema, table)
            for schema, table, _ in migrated
            if target.execute("select to_regclass(%s)", (_qualified(target, schema, table),)).fetchone() != (None,)
        ]
        if present:
            # One statement for all of them: they reference each other, and TRUNCATE checks foreign keys
            # against the set it empties (no CASCADE, so a table outside the migration is never touched).
            target.execute(
                sql.SQL("truncate {}").format(
                    sql.SQL(", ").join(
                        sql.SQL("{}.{}").format(sql.Identifier(s), sql.Identifier(t)) for s, t in present
                    )
                )
            )
        for schema, table in present:
            if (schema, table) not in preexisting:
                continue
            remaining = target.execute(
                sql.SQL("select count(*) from {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
            ).fetchone()
            report.steps.append(
                RollbackStep(f"empty {schema}.{table}", "it was empty before the migration", remaining == (0,))
            )
        for obj in pending_deferred(target, run.id):
            if (obj.schema, obj.table) in present:
                restore_one(target, run.id, obj)
        left = [o for o in pending_deferred(target, run.id) if (o.schema, o.table) in present]
        report.steps.append(
            RollbackStep("restore indexes and constraints dropped for the load", f"{len(left)} not restored", not left)
        )

    # 2. pgferry's own migrations back to where the target was.
    if run.options.get("schema_from") == "pgferry" and run.inventory_before is not None:
        before_rev = run.alembic_revision_before
        if migrator.current_revision(target_url) != before_rev:
            migrator.downgrade(target_url, before_rev or "base")
        now_rev = migrator.current_revision(target_url)
        report.steps.append(
            RollbackStep("downgrade pgferry migrations", f"revision {now_rev or 'none'}", now_rev == before_rev)
        )

    # 3. Everything else that appeared since the schema phase.
    if run.inventory_before is not None:
        before = source_schema.SchemaInventory(frozenset((k, i) for k, i in run.inventory_before))
        with service.connect_target() as target:
            after = source_schema.take_inventory(target)
            statements = source_schema.drop_statements(before, after)
            with target.transaction():
                for statement in statements:
                    target.execute(statement.encode())
            final = source_schema.take_inventory(target)
        extra = sorted(final.objects - before.objects)
        report.steps.append(
            RollbackStep(
                "drop objects created by the migration",
                f"{len(statements)} statements; {len(extra)} objects left",
                not extra,
            )
        )

    # 4. The migration's own bookkeeping.
    with service.connect_target() as target:
        if run.state_schema_created:
            # The schema did not exist before this run: all of it (state and Alembic's version table) is ours.
            target.execute("drop schema pgferry cascade")
        else:
            for table in st.STATE_TABLES:
                target.execute(sql.SQL("drop table if exists pgferry.{} cascade").format(sql.Identifier(table)))
        gone = not st.state_exists(target)
        report.steps.append(RollbackStep("remove migration state", "schema pgferry state tables dropped", gone))
    if not report.ok:
        failed = [s.name for s in report.steps if not s.verified]
        raise MigrationError(f"rollback could not verify: {', '.join(failed)}; the target needs a manual look")
    return report


def _qualified(conn: psycopg.Connection[Any], schema: str, table: str) -> str:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table)).as_string(conn)
