"""realtime publication

Tables that clients follow join ``supabase_realtime``. Mutable tables get ``REPLICA IDENTITY FULL`` so update
and delete events carry the old row: Supabase Realtime needs it to deliver the old record and to check RLS
on it, and Electric needs it to tell when a row leaves a filtered shape. ``observability_events`` is
insert-only, so its primary key is identity enough. ``execution_snapshots`` is too large to stream.

Revision ID: 20261125000300
Revises: 20261125000200
Create Date: 2026-11-25 10:46:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "20261125000300"
down_revision: str | None = "20261125000200"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FULL_IDENTITY = (
    "environments",
    "tasks",
    "agent_executions",
    "agent_memory",
    "workflows",
    "workflow_executions",
)
PUBLISHED = (*FULL_IDENTITY, "observability_events")


def upgrade() -> None:
    for table in FULL_IDENTITY:
        op.execute(f"alter table public.{table} replica identity full")
    for table in PUBLISHED:
        # A project may already publish a table by hand; adding it twice is an error, so check first.
        op.execute(
            f"""
            do $$
            begin
              if not exists (
                select 1 from pg_publication_tables
                where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = '{table}'
              ) then
                alter publication supabase_realtime add table public.{table};
              end if;
            end
            $$
            """
        )


def downgrade() -> None:
    for table in PUBLISHED:
        op.execute(
            f"""
            do $$
            begin
              if exists (
                select 1 from pg_publication_tables
                where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = '{table}'
              ) then
                alter publication supabase_realtime drop table public.{table};
              end if;
            end
            $$
            """
        )
    for table in FULL_IDENTITY:
        op.execute(f"alter table public.{table} replica identity default")
