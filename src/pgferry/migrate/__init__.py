"""Migration engine: Neon (any PostgreSQL) to Supabase: plan, schema, data, verification, rollback.

Owns moving data and proving it arrived; must not hold runtime or sync code, and never writes to the
source. The CLI (``pgferry migrate …``) is a thin layer over this API::

    from pgferry.migrate import Migration, MigrationOptions

    migration = Migration(
        MigrationOptions(source_url=parse_database_url(neon), target_url=parse_database_url(supabase), jobs=2),
        reporter=my_reporter,            # any object with the ProgressReporter methods, or None
    )
    plan = migration.plan()              # validate and estimate, nothing written
    summary = migration.run()            # run, or resume an interrupted run
    report = migration.verify()          # compare both sides now
    migration.status(); migration.rollback()
"""

from pgferry.migrate.catalog import TableFilter
from pgferry.migrate.engine import (
    PHASES,
    Migration,
    MigrationStatus,
    MigrationSummary,
    NullReporter,
    ProgressReporter,
    TableMetrics,
)
from pgferry.migrate.errors import (
    MigrationError,
    MigrationInterruptedError,
    NothingToRollBackError,
    PlanBlockedError,
    SameDatabaseError,
    ServerUnreachableError,
    VerificationFailedError,
)
from pgferry.migrate.options import MigrationOptions, OnError, SchemaFrom
from pgferry.migrate.plan import MigrationPlan, Problem, TablePlan
from pgferry.migrate.rollback import RollbackReport, RollbackStep
from pgferry.migrate.verify import TableCheck, VerificationReport

__all__ = [
    "PHASES",
    "Migration",
    "MigrationError",
    "MigrationInterruptedError",
    "MigrationOptions",
    "MigrationPlan",
    "MigrationStatus",
    "MigrationSummary",
    "NothingToRollBackError",
    "NullReporter",
    "OnError",
    "PlanBlockedError",
    "Problem",
    "ProgressReporter",
    "RollbackReport",
    "RollbackStep",
    "SameDatabaseError",
    "SchemaFrom",
    "ServerUnreachableError",
    "TableCheck",
    "TableFilter",
    "TableMetrics",
    "TablePlan",
    "VerificationFailedError",
    "VerificationReport",
]
