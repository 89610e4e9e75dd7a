"""Rollback: return the target to what it was before the migration, removing exactly what it created.

The schema phase records the target's objects twice: before it changes anything, and right after. What the
migration created is the difference; a rollback drops those objects only, so a table someone created on the
target after the migration stays (and is reported). pgferry's own migrations are first downgraded to the
revision the target had. Tables that existed before were empty (``plan`` refuses to load into a table with
rows), so they are emptied and get back any index or constraint the load had dropped, and the sequences
they own go back to where they were. Finally the migration state itself goes. The source is never touched.

Each step is verified, and rolling back twice is harmless: the second time there is nothing to undo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psycopg import sql

from pgferry.migrate import state as st
from pgferry.migrate.deferred import pending_deferred, restore_one
from pgferry.migrate.errors import MigrationError

if TYPE_CHECKING:
    from pgferry.migrate.engine import Migration

__all__ = ["RollbackReport", "RollbackStep", "rollback"]


@dataclass
class RollbackStep:
    name: str
    detail: str
    verified: bool


@dataclass
class RollbackReport:
    run_id: int | None
    steps: list[RollbackStep] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    """Objects created on the target after the migration's schema phase: not the migration's, so kept."""

    @property
    def ok(self) -> bool:
        return all(step.verified for step in self.steps)

    @property
    def nothing_to_do(self) -> bool:
        return self.run_id is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "ok": self.ok,
            "nothing_to_do": self.nothing_to_do,
            "steps": [s.__dict__ for s in self.steps],
            "kept": self.kept,
        }


def rollback(migration: Migration, run_id: int | None = None) -> RollbackReport:
    """Undo the latest migration on the target; a report of every step, each checked afterwards."""
    with migration.connect_target() as target:
        run = st.latest_run(target)
    if run is None or run.status == "rolled_back":
        return RollbackReport(
            None,
            [
                RollbackStep(
                    "nothing to undo",
                    "no migration is recorded on the target (none ran, or it was already rolled back)",
                    True,
                )
            ],
        )
    if run_id is not None and run.id != run_id:
        raise MigrationError(f"run {run_id} is not the latest migration on the target (run {run.id} is)")
    if run.options.get("online") and run.phase == "reverse":
        return _rollback_after_cutover(migration, run)
    report = RollbackReport(run.id)
    if run.options.get("online"):
        _drop_online_streams(migration, run, report)
    migrated = _migrated_tables(migration, run.id)
    _empty_loaded_tables(migration, run, migrated, report)
    _downgrade_pgferry_migrations(migration, run, report)
    _drop_created_objects(migration, run, report)
    _restore_sequences(migration, run, report)
    _remove_state(migration, run, report)
    if not report.ok:
        failed = [s.name for s in report.steps if not s.verified]
        raise MigrationError(f"rollback could not verify: {', '.join(failed)}; the target needs a manual look")
    return report


def _rollback_after_cutover(migration: Migration, run: st.Run) -> RollbackReport:
    """After the cut-over the source follows the target: wait for it, then make it the primary again."""
    from pgferry.migrate.online import rollback_after_cutover

    seconds = rollback_after_cutover(migration)
    return RollbackReport(
        run.id,
        [
            RollbackStep(
                "return to the source",
                f"the source caught up with every write made on the target and is writable again; the target is "
                f"read-only (writes stopped for {seconds:.1f}s); slots and publications removed",
                True,
            )
        ],
    )


def _drop_online_streams(migration: Migration, run: st.Run, report: RollbackReport) -> None:
    """An online run rolled back before its cut-over: its slot and publication on the source go first."""
    from pgferry.migrate.online import drop_forward_stream, forward_names
    from pgferry.replication import get_slot

    drop_forward_stream(migration, run.id)
    with migration.connect_source() as source:
        gone = get_slot(source, forward_names(run.id)[0]) is None
    report.steps.append(RollbackStep("drop the replication slot and publication on the source", "", gone))


def _migrated_tables(migration: Migration, run_id: int) -> list[tuple[str, str, bool]]:
    with migration.connect_target() as target:
        return [
            (str(r[0]), str(r[1]), bool(r[2]))
            for r in target.execute(
                "select schema_name, table_name, target_existed from pgferry.migration_tables where run_id = %s",
                (run_id,),
            )
        ]


def _empty_loaded_tables(
    migration: Migration, run: st.Run, migrated: list[tuple[str, str, bool]], report: RollbackReport
) -> None:
    """Every table the migration loaded: emptied, with the indexes and keys the load dropped put back.

    Pre-existing tables must end like this; tables the migration created are dropped later, but their
    schema objects must be complete first (a migration downgrade drops indexes by name).
    """
    preexisting = {(schema, table) for schema, table, existed in migrated if existed}
    with migration.connect_target() as target:
        present = [
            (schema, table)
            for schema, table, _ in migrated
            if target.execute("select to_regclass(%s)", (sql.Identifier(schema, table).as_string(target),)).fetchone()
            != (None,)
        ]
        if present:
            # One statement for all of them: they reference each other, and TRUNCATE checks foreign keys
            # against the set it empties (no CASCADE, so a table outside the migration is never touched).
            target.execute(sql.SQL("truncate {}").format(sql.SQL(", ").join(sql.Identifier(s, t) for s, t in present)))
        for schema, table in present:
            if (schema, table) not in preexisting:
                continue
            remaining = target.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(schema, table)))
            report.steps.append(
                RollbackStep(
                    f"empty {schema}.{table}", "it was empty before the migration", remaining.fetchone() == (0,)
                )
            )
        for obj in pending_deferred(target, run.id):
            if (obj.schema, obj.table) in present:
                restore_one(target, run.id, obj)
        left = [o for o in pending_deferred(target, run.id) if (o.schema, o.table) in present]
        report.steps.append(
            RollbackStep("restore indexes and constraints dropped for the load", f"{len(left)} not restored", not left)
        )


def _downgrade_pgferry_migrations(migration: Migration, run: st.Run, report: RollbackReport) -> None:
    from pgferry.schema import migrator

    if run.options.get("schema_from") != "pgferry" or run.inventory_before is None:
        return
    target_url = migration.options.target_url.get_secret_value()
    before_rev = run.alembic_revision_before
    if migrator.current_revision(target_url) != before_rev:
        migrator.downgrade(target_url, before_rev or "base")
    now_rev = migrator.current_revision(target_url)
    report.steps.append(
        RollbackStep("downgrade pgferry migrations", f"revision {now_rev or 'none'}", now_rev == before_rev)
    )


def _drop_created_objects(migration: Migration, run: st.Run, report: RollbackReport) -> None:
    """Drop what the schema phase created; keep (and report) what appeared on the target after it."""
    from pgferry.migrate import source_schema

    if run.inventory_before is None:
        return
    before = source_schema.SchemaInventory(frozenset((k, i) for k, i in run.inventory_before))
    with migration.connect_target() as target:
        now = source_schema.take_inventory(target)
        if run.inventory_after_schema is not None:
            after_schema = source_schema.SchemaInventory(frozenset((k, i) for k, i in run.inventory_after_schema))
            ours = source_schema.SchemaInventory(before.objects | (now.objects - after_schema.objects))
            report.kept = sorted(
                f"{kind} {ident}" for kind, ident in now.objects - after_schema.objects - before.objects
            )
        else:
            # A run that stopped inside its schema phase: everything that appeared since belongs to it.
            ours = before
        statements = source_schema.drop_statements(ours, now)
        with target.transaction():
            for statement in statements:
                target.execute(statement.encode())
        final = source_schema.take_inventory(target)
    left = sorted(final.objects - ours.objects)
    kept = f"; kept {len(report.kept)} created after the migration: {', '.join(report.kept)}" if report.kept else ""
    report.steps.append(
        RollbackStep(
            "drop objects created by the migration",
            f"{len(statements)} statements; {len(left)} objects left{kept}",
            not left,
        )
    )


def _restore_sequences(migration: Migration, run: st.Run, report: RollbackReport) -> None:
    """Sequences of tables that existed before the migration, back where they were."""
    if not run.sequences_before:
        return
    wrong: list[str] = []
    with migration.connect_target() as target:
        for entry in run.sequences_before:
            name = str(entry["sequence"])
            if target.execute("select to_regclass(%s)", (name,)).fetchone() == (None,):
                continue
            target.execute("select setval(%s, %s, %s)", (name, entry["last_value"], entry["is_called"]))
            row = target.execute(sql.SQL("select last_value, is_called from {}").format(sql.SQL(name))).fetchone()
            if row is None or (int(row[0]), bool(row[1])) != (int(entry["last_value"]), bool(entry["is_called"])):
                wrong.append(name)
    report.steps.append(
        RollbackStep(
            "restore sequence positions",
            f"{len(run.sequences_before)} sequences of pre-existing tables",
            not wrong,
        )
    )


def _remove_state(migration: Migration, run: st.Run, report: RollbackReport) -> None:
    with migration.connect_target() as target:
        if run.state_schema_created:
            # The schema did not exist before this run: all of it (state and Alembic's version table) is ours.
            target.execute("drop schema pgferry cascade")
        else:
            for table in st.STATE_TABLES:
                target.execute(sql.SQL("drop table if exists pgferry.{} cascade").format(sql.Identifier(table)))
        gone = not st.state_exists(target)
    report.steps.append(RollbackStep("remove migration state", "schema pgferry state tables dropped", gone))
