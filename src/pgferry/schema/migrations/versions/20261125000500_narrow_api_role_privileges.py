"""narrow api role privileges

Supabase's default privileges (and the local baseline's, which copy them) grant ALL on every new table in
``public`` to ``anon`` and ``authenticated``, relying on RLS. But some table privileges ignore RLS altogether:

* ``TRUNCATE`` empties a table without looking at a policy: one signed-in user could delete every tenant's rows;
* ``TRIGGER`` lets a user attach a trigger (running their function on everyone's writes);
* ``REFERENCES`` lets a user create foreign keys onto the table, which check (and lock) rows RLS hides;
* ``MAINTAIN`` (PostgreSQL 17+) lets a user ``LOCK``, ``VACUUM FULL``, ``CLUSTER`` or ``REINDEX`` the table,
  stalling everyone.

The policies only need ``SELECT, INSERT, UPDATE, DELETE``, which RLS governs (``anon`` keeps them as on every
Supabase project: it has no policy, so it sees and changes nothing). Everything else is revoked from ``anon`` and
``authenticated`` on the platform's tables, ``UPDATE`` on the identity sequence (it allows ``setval``, which would
make everyone's next insert collide) is revoked too, and the default privileges for tables created later in
``public`` stop granting TRUNCATE, TRIGGER and REFERENCES. ``service_role`` (a server key that bypasses RLS)
keeps ALL. A project created before Supabase changed its defaults has the same wide grants;
this migration narrows them there as well.

Revision ID: 20261125000500
Revises: 20261125000400
Create Date: 2026-11-25 10:48:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "20261125000500"
down_revision: str | None = "20261125000400"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    "environments",
    "tasks",
    "agent_executions",
    "observability_events",
    "agent_memory",
    "workflows",
    "workflow_executions",
    "execution_snapshots",
)
SEQUENCE = "public.observability_events_id_seq"

# MAINTAIN only exists from PostgreSQL 17 on; the SQL files run on any version, so it is decided in the database.
REVOKE_MAINTAIN = """
do $$
begin
  if current_setting('server_version_num')::int >= 170000 then
    execute 'revoke maintain on table {tables} from anon, authenticated';
    execute 'alter default privileges in schema public revoke maintain on tables from anon, authenticated';
  end if;
end
$$
"""
GRANT_MAINTAIN = """
do $$
begin
  if current_setting('server_version_num')::int >= 170000 then
    execute 'grant maintain on table {tables} to anon, authenticated';
    execute 'alter default privileges in schema public grant maintain on tables to anon, authenticated';
  end if;
end
$$
"""


def _tables() -> str:
    return ", ".join(f"public.{table}" for table in TABLES)


def upgrade() -> None:
    tables = _tables()
    op.execute(f"revoke truncate, trigger, references on table {tables} from anon, authenticated")
    op.execute(REVOKE_MAINTAIN.format(tables=tables))
    op.execute(f"revoke update on sequence {SEQUENCE} from anon, authenticated")
    op.execute(
        "alter default privileges in schema public "
        "revoke truncate, trigger, references on tables from anon, authenticated"
    )


def downgrade() -> None:
    tables = _tables()
    op.execute(
        "alter default privileges in schema public grant truncate, trigger, references on tables to anon, authenticated"
    )
    op.execute(f"grant update on sequence {SEQUENCE} to anon, authenticated")
    op.execute(GRANT_MAINTAIN.format(tables=tables))
    op.execute(f"grant truncate, trigger, references on table {tables} to anon, authenticated")
