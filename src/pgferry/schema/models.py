"""The platform's eight tables as SQLAlchemy 2 typed models.

These models are what application code queries with and what the migrations are checked against
(``tests/test_migrations.py`` fails when the two drift). They describe the portable part of the schema, the
part that exists on Neon and Supabase alike; Supabase-only behaviour (RLS policies, the realtime publication,
``match_*`` functions, HNSW indexes) lives in the migrations, because SQLAlchemy has no vocabulary for it.

``user_id`` deliberately has no foreign key to ``auth.users``: during a move the rows arrive before the
users are imported into Supabase Auth, and a Neon database has no ``auth`` schema at all. Ownership is
enforced by RLS on ``user_id``, which is indexed on every table because every policy filters on it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

EMBEDDING_DIMENSIONS = 1536

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dict[str, Any]: JSONB,
        uuid.UUID: UUID(as_uuid=True),
        dt.datetime: DateTime(timezone=True),
    }


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(primary_key=True, server_default=text("gen_random_uuid()"))


def _user_id() -> Mapped[uuid.UUID]:
    return mapped_column(nullable=False, index=True)


def _created_at() -> Mapped[dt.datetime]:
    return mapped_column(nullable=False, server_default=text("now()"))


def _updated_at() -> Mapped[dt.datetime]:
    """Maintained by the ``set_updated_at`` trigger, so sync conflict resolution can trust it."""
    return mapped_column(nullable=False, server_default=text("now()"))


def _jsonb(default: str = "'{}'::jsonb") -> Mapped[dict[str, Any]]:
    return mapped_column(JSONB, nullable=False, server_default=text(default))


class Environment(Base):
    """Where agents run: a GitHub repository and branch plus runtime settings."""

    __tablename__ = "environments"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_id()
    name: Mapped[str] = mapped_column(Text, nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    github_repository: Mapped[str | None] = mapped_column(Text)
    github_branch: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'main'"))
    github_installation_id: Mapped[int | None] = mapped_column(BigInteger)
    settings: Mapped[dict[str, Any]] = _jsonb()
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'active'"))
    created_at: Mapped[dt.datetime] = _created_at()
    updated_at: Mapped[dt.datetime] = _updated_at()

    __table_args__ = (
        CheckConstraint("status in ('active', 'paused', 'archived')", name="status"),
        CheckConstraint(
            "github_repository is null or github_repository ~ '^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$'",
            name="github_repository",
        ),
        UniqueConstraint("user_id", "name"),
    )


class Task(Base):
    """A unit of work for agents; the embedding powers "similar tasks" search."""

    __tablename__ = "tasks"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_id()
    environment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("environments.id", ondelete="SET NULL"), index=True
    )
    title: Mapped[str] = mapped_column(Text, nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'pending'"))
    priority: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    tags: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, server_default=text("'{}'::text[]"))
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    embedding: Mapped[list[float] | None] = mapped_column(Vector(EMBEDDING_DIMENSIONS))
    due_at: Mapped[dt.datetime | None] = mapped_column()
    completed_at: Mapped[dt.datetime | None] = mapped_column()
    created_at: Mapped[dt.datetime] = _created_at()
    updated_at: Mapped[dt.datetime] = _updated_at()

    __table_args__ = (
        CheckConstraint(
            "status in ('pending', 'queued', 'running', 'completed', 'failed', 'cancelled')", name="status"
        ),
        Index("ix_tasks_user_id_status_created_at", "user_id", "status", "created_at"),
    )


class AgentExecution(Base):
    """One run of an agent on a task: what went in, what came out, how long and how much it cost."""

    __tablename__ = "agent_executions"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_id()
    task_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    environment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("environments.id", ondelete="SET NULL"), index=True
    )
    agent_name: Mapped[str] = mapped_column(Text, nullable=False)
    model: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'queued'"))
    inputs: Mapped[dict[str, Any]] = _jsonb()
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime | None] = mapped_column()
    completed_at: Mapped[dt.datetime | None] = mapped_column()
    duration_ms: Mapped[int | None] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    total_tokens: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(14, 6), nullable=False, server_default=text("0"))
    created_at: Mapped[dt.datetime] = _created_at()
    updated_at: Mapped[dt.datetime] = _updated_at()

    __table_args__ = (
        CheckConstraint(
            "status in ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'timeout')", name="status"
        ),
        CheckConstraint("prompt_tokens >= 0 and completion_tokens >= 0 and total_tokens >= 0", name="tokens"),
        CheckConstraint("cost_usd >= 0", name="cost"),
        Index("ix_agent_executions_user_id_created_at", "user_id", "created_at"),
    )


class ObservabilityEvent(Base):
    """Append-only telemetry from agent runs, correlated by trace and span ids.

    A bigint identity key rather than a uuid: this is the highest-volume table and is read in insertion
    order; rows are never updated, so it carries no ``updated_at``.
    """

    __tablename__ = "observability_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    user_id: Mapped[uuid.UUID] = _user_id()
    execution_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agent_executions.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(Text, nullable=False)
    severity: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'info'"))
    message: Mapped[str] = mapped_column(Text, nullable=False)
    data: Mapped[dict[str, Any]] = _jsonb()
    trace_id: Mapped[str | None] = mapped_column(String(32))
    span_id: Mapped[str | None] = mapped_column(String(16))
    parent_span_id: Mapped[str | None] = mapped_column(String(16))
    occurred_at: Mapped[dt.datetime] = mapped_column(nullable=False, server_default=text("now()"))
    created_at: Mapped[dt.datetime] = _created_at()

    __table_args__ = (
        CheckConstraint("severity in ('debug', 'info', 'warning', 'error', 'critical')", name="severity"),
        Index("ix_observability_events_execution_id_occurred_at", "execution_id", "occurred_at"),
        Index("ix_observability_events_trace_id", "trace_id"),
        Index("ix_observability_events_user_id_occurred_at", "user_id", "occurred_at"),
    )


class AgentMemory(Base):
    """What agents remember between runs; searched by embedding and ranked by importance."""

    __tablename__ = "agent_memory"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_id()
    agent_name: Mapped[str] = mapped_column(Text, nullable=False)
    memory_type: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'episodic'"))
    content: Mapped[str] = mapped_column(Text, nullable=False)
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    importance: Mapped[float] = mapped_column(Float, nullable=False, server_default=text("0.5"))
    embedding: Mapped[list[float] | None] = mapped_column(Vector(EMBEDDING_DIMENSIONS))
    access_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    last_accessed_at: Mapped[dt.datetime | None] = mapped_column()
    expires_at: Mapped[dt.datetime | None] = mapped_column()
    created_at: Mapped[dt.datetime] = _created_at()
    updated_at: Mapped[dt.datetime] = _updated_at()

    __table_args__ = (
        CheckConstraint("memory_type in ('episodic', 'semantic', 'procedural', 'working')", name="memory_type"),
        CheckConstraint("importance >= 0 and importance <= 1", name="importance"),
        CheckConstraint("access_count >= 0", name="access_count"),
        Index("ix_agent_memory_user_id_agent_name", "user_id", "agent_name"),
    )


class Workflow(Base):
    """A reusable, versioned graph of agent steps."""

    __tablename__ = "workflows"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_id()
    environment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("environments.id", ondelete="SET NULL"), index=True
    )
    name: Mapped[str] = mapped_column(Text, nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    definition: Mapped[dict[str, Any]] = _jsonb()
    version: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("1"))
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    created_at: Mapped[dt.datetime] = _created_at()
    updated_at: Mapped[dt.datetime] = _updated_at()

    __table_args__ = (
        CheckConstraint("version >= 1", name="version"),
        UniqueConstraint("user_id", "name", "version"),
    )


class WorkflowExecution(Base):
    """One run of a workflow, with the result of each step."""

    __tablename__ = "workflow_executions"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_id()
    workflow_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workflows.id", ondelete="CASCADE"), nullable=False, index=True
    )
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'pending'"))
    trigger: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'manual'"))
    inputs: Mapped[dict[str, Any]] = _jsonb()
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    step_results: Mapped[dict[str, Any]] = _jsonb("'[]'::jsonb")
    current_step: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime | None] = mapped_column()
    completed_at: Mapped[dt.datetime | None] = mapped_column()
    created_at: Mapped[dt.datetime] = _created_at()
    updated_at: Mapped[dt.datetime] = _updated_at()

    __table_args__ = (
        CheckConstraint(
            "status in ('pending', 'running', 'paused', 'succeeded', 'failed', 'cancelled')", name="status"
        ),
        CheckConstraint("trigger in ('manual', 'schedule', 'webhook', 'api')", name="trigger"),
    )


class ExecutionSnapshot(Base):
    """A checkpoint of an agent's state during an execution, so a run can be resumed or replayed.

    ``state`` is large JSON; ``blob`` holds binary artifacts (compressed context, files) and is what makes
    rows of several MB on this table.
    """

    __tablename__ = "execution_snapshots"

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_id()
    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("agent_executions.id", ondelete="CASCADE"), nullable=False
    )
    sequence: Mapped[int] = mapped_column(Integer, nullable=False)
    label: Mapped[str | None] = mapped_column(Text)
    state: Mapped[dict[str, Any]] = _jsonb()
    blob: Mapped[bytes | None] = mapped_column(LargeBinary)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    created_at: Mapped[dt.datetime] = _created_at()
    updated_at: Mapped[dt.datetime] = _updated_at()

    __table_args__ = (
        UniqueConstraint("execution_id", "sequence"),
        CheckConstraint("sequence >= 0", name="sequence"),
    )


PLATFORM_TABLES: tuple[str, ...] = (
    "environments",
    "tasks",
    "agent_executions",
    "observability_events",
    "agent_memory",
    "workflows",
    "workflow_executions",
    "execution_snapshots",
)
"""In foreign-key order: a table's parents come before it."""

USER_OWNED_TABLES: tuple[str, ...] = PLATFORM_TABLES
"""Every platform table is owned by a user and protected by RLS on ``user_id``."""

UPDATED_AT_TABLES: tuple[str, ...] = tuple(t for t in PLATFORM_TABLES if t != "observability_events")
"""Tables whose ``updated_at`` the database maintains (everything that can change after insert)."""

REALTIME_TABLES: tuple[str, ...] = (
    "environments",
    "tasks",
    "agent_executions",
    "observability_events",
    "agent_memory",
    "workflows",
    "workflow_executions",
)
"""Tables in ``supabase_realtime``. Snapshots are fetched on demand, not streamed: they are too large."""
