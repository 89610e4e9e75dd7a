"""runtime applied operations

The runtime's durable write queue (:mod:`pgferry.runtime.queue`, replayed by
:meth:`pgferry.runtime.resilience.ResilientDatabase.sync_queued_operations`) applies each operation exactly once:
its idempotency key is recorded here in the same transaction as the write, so a retry after a lost commit
acknowledgement, or a replay after a crash, finds the key and writes nothing.

This table used to be created by the runtime on first use. A migration owns it now: a service's login role should
not need CREATE on the database, and a schema object that appears at run time is one ``pgferry doctor`` and the
migration history cannot account for. ``if not exists`` keeps databases that already have it as they are.

In ``pgferry``, not ``public`` (Supabase exposes ``public`` through its REST API); ``anon`` and ``authenticated``
get no privilege on it: keys are recorded as the server role before the transaction switches to the user.

Revision ID: 20261130000300
Revises: 20261130000200
Create Date: 2026-11-30 14:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "20261130000300"
down_revision: str | None = "20261130000200"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("create schema if not exists pgferry")
    op.execute(
        """
create table if not exists pgferry.applied_operations (
  key uuid primary key,
  applied_at timestamptz not null default now()
)
"""
    )
    op.execute("revoke all on table pgferry.applied_operations from public")


def downgrade() -> None:
    op.execute("drop table pgferry.applied_operations")
