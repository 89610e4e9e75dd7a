"""write api conflicts

State of the write API's conflict resolution (:mod:`pgferry.sync.conflicts`):

* ``pgferry.column_versions``: for per-column last-write-wins, when each column of each row was last written
  through the API (the client's write time in ms) and by which mutation (the tie-breaker);
* ``pgferry.resolved_conflicts``: every conflict the API resolved (table, row key, columns, winner, why), kept for
  operators and for applications that want to show what was overwritten.

Both live in ``pgferry`` (not exposed by Supabase's API); ``anon`` and ``authenticated`` get no privilege on them.

Revision ID: 20261130000200
Revises: 20261130000100
Create Date: 2026-11-30 10:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "20261130000200"
down_revision: str | None = "20261130000100"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
create table pgferry.column_versions (
  table_name text not null,
  row_key text not null,
  column_name text not null,
  written_at bigint not null,
  mutation_id uuid not null,
  primary key (table_name, row_key, column_name)
)
"""
    )
    op.execute(
        """
create table pgferry.resolved_conflicts (
  id bigint generated always as identity primary key,
  mutation_id uuid not null,
  user_id uuid not null,
  table_name text not null,
  row_key text not null,
  columns text[] not null,
  winner text not null,
  why text not null,
  resolved_at timestamptz not null default now()
)
"""
    )
    op.execute("create index resolved_conflicts_resolved_at on pgferry.resolved_conflicts (resolved_at)")
    op.execute("revoke all on table pgferry.column_versions, pgferry.resolved_conflicts from public")


def downgrade() -> None:
    op.execute("drop table pgferry.resolved_conflicts")
    op.execute("drop table pgferry.column_versions")
