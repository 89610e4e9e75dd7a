"""platform tables

The eight tables of the agent platform, their keys and indexes, pgvector, and the trigger that keeps
``updated_at`` honest (sync conflict resolution compares it, so clients must not be able to fake it).

Revision ID: 20261125000100
Revises:
Create Date: 2026-11-25 10:39:27.628524
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects import postgresql

revision: str = "20261125000100"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPDATED_AT_TABLES = (
    "environments",
    "tasks",
    "agent_executions",
    "agent_memory",
    "workflows",
    "workflow_executions",
    "execution_snapshots",
)

# An empty search_path and qualified names: Supabase's linter flags functions with a mutable search_path.
SET_UPDATED_AT = """
create or replace function public.set_updated_at() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := pg_catalog.now();
  return new;
end
$$
"""


def upgrade() -> None:
    # Supabase installs extensions into their own schema; "if not exists" keeps an existing install.
    op.execute("create extension if not exists vector with schema extensions")
    op.create_table(
        "agent_memory",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("agent_name", sa.Text(), nullable=False),
        sa.Column("memory_type", sa.Text(), server_default=sa.text("'episodic'"), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column(
            "metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("importance", sa.Float(), server_default=sa.text("0.5"), nullable=False),
        sa.Column("embedding", Vector(1536), nullable=True),
        sa.Column("access_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_accessed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "memory_type in ('episodic', 'semantic', 'procedural', 'working')",
            name=op.f("ck_agent_memory_memory_type"),
        ),
        sa.CheckConstraint("access_count >= 0", name=op.f("ck_agent_memory_access_count")),
        sa.CheckConstraint("importance >= 0 and importance <= 1", name=op.f("ck_agent_memory_importance")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_memory")),
    )
    op.create_index(op.f("ix_agent_memory_user_id"), "agent_memory", ["user_id"], unique=False)
    op.create_index("ix_agent_memory_user_id_agent_name", "agent_memory", ["user_id", "agent_name"], unique=False)
    op.create_table(
        "environments",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("github_repository", sa.Text(), nullable=True),
        sa.Column("github_branch", sa.Text(), server_default=sa.text("'main'"), nullable=False),
        sa.Column("github_installation_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "settings",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("status", sa.Text(), server_default=sa.text("'active'"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "github_repository is null or github_repository ~ '^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$'",
            name=op.f("ck_environments_github_repository"),
        ),
        sa.CheckConstraint("status in ('active', 'paused', 'archived')", name=op.f("ck_environments_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_environments")),
        sa.UniqueConstraint("user_id", "name", name=op.f("uq_environments_user_id_name")),
    )
    op.create_index(op.f("ix_environments_user_id"), "environments", ["user_id"], unique=False)
    op.create_table(
        "tasks",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("environment_id", sa.UUID(), nullable=True),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("tags", postgresql.ARRAY(sa.Text()), server_default=sa.text("'{}'::text[]"), nullable=False),
        sa.Column(
            "metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("embedding", Vector(1536), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "status in ('pending', 'queued', 'running', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_tasks_status"),
        ),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["environments.id"],
            name=op.f("fk_tasks_environment_id_environments"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
    )
    op.create_index(op.f("ix_tasks_environment_id"), "tasks", ["environment_id"], unique=False)
    op.create_index(op.f("ix_tasks_user_id"), "tasks", ["user_id"], unique=False)
    op.create_index("ix_tasks_user_id_status_created_at", "tasks", ["user_id", "status", "created_at"], unique=False)
    op.create_table(
        "workflows",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("environment_id", sa.UUID(), nullable=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column(
            "definition",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("is_active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("version >= 1", name=op.f("ck_workflows_version")),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["environments.id"],
            name=op.f("fk_workflows_environment_id_environments"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflows")),
        sa.UniqueConstraint("user_id", "name", "version", name=op.f("uq_workflows_user_id_name_version")),
    )
    op.create_index(op.f("ix_workflows_environment_id"), "workflows", ["environment_id"], unique=False)
    op.create_index(op.f("ix_workflows_user_id"), "workflows", ["user_id"], unique=False)
    op.create_table(
        "agent_executions",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("task_id", sa.UUID(), nullable=True),
        sa.Column("environment_id", sa.UUID(), nullable=True),
        sa.Column("agent_name", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default=sa.text("'queued'"), nullable=False),
        sa.Column(
            "inputs",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("outputs", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("total_tokens", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("cost_usd", sa.Numeric(precision=14, scale=6), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "status in ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'timeout')",
            name=op.f("ck_agent_executions_status"),
        ),
        sa.CheckConstraint("cost_usd >= 0", name=op.f("ck_agent_executions_cost")),
        sa.CheckConstraint(
            "prompt_tokens >= 0 and completion_tokens >= 0 and total_tokens >= 0",
            name=op.f("ck_agent_executions_tokens"),
        ),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["environments.id"],
            name=op.f("fk_agent_executions_environment_id_environments"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_agent_executions_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_executions")),
    )
    op.create_index(op.f("ix_agent_executions_environment_id"), "agent_executions", ["environment_id"], unique=False)
    op.create_index(op.f("ix_agent_executions_task_id"), "agent_executions", ["task_id"], unique=False)
    op.create_index(op.f("ix_agent_executions_user_id"), "agent_executions", ["user_id"], unique=False)
    op.create_index(
        "ix_agent_executions_user_id_created_at", "agent_executions", ["user_id", "created_at"], unique=False
    )
    op.create_table(
        "workflow_executions",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("workflow_id", sa.UUID(), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("trigger", sa.Text(), server_default=sa.text("'manual'"), nullable=False),
        sa.Column(
            "inputs",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("outputs", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "step_results",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("current_step", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "status in ('pending', 'running', 'paused', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_workflow_executions_status"),
        ),
        sa.CheckConstraint(
            "trigger in ('manual', 'schedule', 'webhook', 'api')", name=op.f("ck_workflow_executions_trigger")
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["workflows.id"],
            name=op.f("fk_workflow_executions_workflow_id_workflows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflow_executions")),
    )
    op.create_index(op.f("ix_workflow_executions_user_id"), "workflow_executions", ["user_id"], unique=False)
    op.create_index(op.f("ix_workflow_executions_workflow_id"), "workflow_executions", ["workflow_id"], unique=False)
    op.create_table(
        "execution_snapshots",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("execution_id", sa.UUID(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("label", sa.Text(), nullable=True),
        sa.Column(
            "state",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("blob", sa.LargeBinary(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("sequence >= 0", name=op.f("ck_execution_snapshots_sequence")),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["agent_executions.id"],
            name=op.f("fk_execution_snapshots_execution_id_agent_executions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_execution_snapshots")),
        sa.UniqueConstraint("execution_id", "sequence", name=op.f("uq_execution_snapshots_execution_id_sequence")),
    )
    op.create_index(op.f("ix_execution_snapshots_user_id"), "execution_snapshots", ["user_id"], unique=False)
    op.create_table(
        "observability_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("execution_id", sa.UUID(), nullable=True),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("severity", sa.Text(), server_default=sa.text("'info'"), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column(
            "data",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("trace_id", sa.String(length=32), nullable=True),
        sa.Column("span_id", sa.String(length=16), nullable=True),
        sa.Column("parent_span_id", sa.String(length=16), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "severity in ('debug', 'info', 'warning', 'error', 'critical')",
            name=op.f("ck_observability_events_severity"),
        ),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["agent_executions.id"],
            name=op.f("fk_observability_events_execution_id_agent_executions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_observability_events")),
    )
    op.create_index(
        "ix_observability_events_execution_id_occurred_at",
        "observability_events",
        ["execution_id", "occurred_at"],
        unique=False,
    )
    op.create_index("ix_observability_events_trace_id", "observability_events", ["trace_id"], unique=False)
    op.create_index(op.f("ix_observability_events_user_id"), "observability_events", ["user_id"], unique=False)
    op.create_index(
        "ix_observability_events_user_id_occurred_at",
        "observability_events",
        ["user_id", "occurred_at"],
        unique=False,
    )
    op.execute(SET_UPDATED_AT)
    for table in UPDATED_AT_TABLES:
        op.execute(
            f"create trigger set_updated_at before update on public.{table} "
            "for each row execute function public.set_updated_at()"
        )


def downgrade() -> None:
    op.drop_index("ix_observability_events_user_id_occurred_at", table_name="observability_events")
    op.drop_index(op.f("ix_observability_events_user_id"), table_name="observability_events")
    op.drop_index("ix_observability_events_trace_id", table_name="observability_events")
    op.drop_index("ix_observability_events_execution_id_occurred_at", table_name="observability_events")
    op.drop_table("observability_events")
    op.drop_index(op.f("ix_execution_snapshots_user_id"), table_name="execution_snapshots")
    op.drop_table("execution_snapshots")
    op.drop_index(op.f("ix_workflow_executions_workflow_id"), table_name="workflow_executions")
    op.drop_index(op.f("ix_workflow_executions_user_id"), table_name="workflow_executions")
    op.drop_table("workflow_executions")
    op.drop_index("ix_agent_executions_user_id_created_at", table_name="agent_executions")
    op.drop_index(op.f("ix_agent_executions_user_id"), table_name="agent_executions")
    op.drop_index(op.f("ix_agent_executions_task_id"), table_name="agent_executions")
    op.drop_index(op.f("ix_agent_executions_environment_id"), table_name="agent_executions")
    op.drop_table("agent_executions")
    op.drop_index(op.f("ix_workflows_user_id"), table_name="workflows")
    op.drop_index(op.f("ix_workflows_environment_id"), table_name="workflows")
    op.drop_table("workflows")
    op.drop_index("ix_tasks_user_id_status_created_at", table_name="tasks")
    op.drop_index(op.f("ix_tasks_user_id"), table_name="tasks")
    op.drop_index(op.f("ix_tasks_environment_id"), table_name="tasks")
    op.drop_table("tasks")
    op.drop_index(op.f("ix_environments_user_id"), table_name="environments")
    op.drop_table("environments")
    op.drop_index("ix_agent_memory_user_id_agent_name", table_name="agent_memory")
    op.drop_index(op.f("ix_agent_memory_user_id"), table_name="agent_memory")
    op.drop_table("agent_memory")
    op.execute("drop function if exists public.set_updated_at()")
