"""write api idempotency

The write API (``POST /v1/mutations``, :mod:`pgferry.sync.write_api`) applies each client mutation at most once:
every applied mutation id is recorded here in the same transaction that applied it, with the user it belongs to,
the transaction id the shape log shows for it and the result the client was given. A retry of the same id (a
client that never saw the answer, an outbox replayed after a crash) gets that stored result back and writes
nothing. Rows older than the write API's retention (7 days by default) are deleted by the API itself.

The table lives in ``pgferry``, not ``public``: Supabase exposes ``public`` through its REST API, and clients must
not read or forge other users' mutation ids. ``anon`` and ``authenticated`` get no privilege on it; the write API
records ids as the server role, after switching back from the user's role.

Revision ID: 20261130000100
Revises: 20261125000500
Create Date: 2026-11-30 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "20261130000100"
down_revision: str | None = "20261125000500"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("create schema if not exists pgferry")
    op.execute(
        """
create table pgferry.applied_mutations (
  id uuid primary key,
  user_id uuid not null,
  txid text not null,
  result jsonb not null,
  applied_at timestamptz not null default now()
)
"""
    )
    op.execute("create index applied_mutations_applied_at on pgferry.applied_mutations (applied_at)")
    op.execute("revoke all on table pgferry.applied_mutations from public")


def downgrade() -> None:
    op.execute("drop table pgferry.applied_mutations")
