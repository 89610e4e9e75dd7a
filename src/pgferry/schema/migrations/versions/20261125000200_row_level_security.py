"""row level security

Every platform table is owned by a user: RLS on, and four policies per table that let an authenticated user
see and change only rows whose ``user_id`` is their own. Policies call ``(select auth.uid())`` so PostgreSQL
evaluates it once per statement instead of once per row (Supabase's RLS performance guidance).

Foreign keys are checked without RLS, so ownership of ``user_id`` alone would let a user attach a row to
someone else's parent (a task in another tenant's environment). The insert/update checks therefore also
require that every referenced parent row belongs to the same user.

``anon`` gets no policy and so sees nothing; ``service_role`` has BYPASSRLS.

Revision ID: 20261125000200
Revises: 20261125000100
Create Date: 2026-11-25 10:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "20261125000200"
down_revision: str | None = "20261125000100"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWNER = "(select auth.uid()) = user_id"

# table -> [(fk column, parent table)] whose ownership an insert or update must prove.
PARENTS: dict[str, list[tuple[str, str]]] = {
    "environments": [],
    "tasks": [("environment_id", "environments")],
    "agent_executions": [("task_id", "tasks"), ("environment_id", "environments")],
    "observability_events": [("execution_id", "agent_executions")],
    "agent_memory": [],
    "workflows": [("environment_id", "environments")],
    "workflow_executions": [("workflow_id", "workflows")],
    "execution_snapshots": [("execution_id", "agent_executions")],
}


def _write_check(table: str) -> str:
    clauses = [OWNER]
    for column, parent in PARENTS[table]:
        clauses.append(
            f"({column} is null or exists (select 1 from public.{parent} p "
            f"where p.id = {column} and p.user_id = (select auth.uid())))"
        )
    return " and ".join(clauses)


def upgrade() -> None:
    for table in PARENTS:
        op.execute(f"alter table public.{table} enable row level security")
        op.execute(f"grant select, insert, update, delete on table public.{table} to authenticated")
        op.execute(f"grant all on table public.{table} to service_role")
        check = _write_check(table)
        op.execute(
            f'create policy "{table}: owner can select" on public.{table} for select to authenticated using ({OWNER})'
        )
        op.execute(
            f'create policy "{table}: owner can insert" on public.{table} '
            f"for insert to authenticated with check ({check})"
        )
        op.execute(
            f'create policy "{table}: owner can update" on public.{table} '
            f"for update to authenticated using ({OWNER}) with check ({check})"
        )
        op.execute(
            f'create policy "{table}: owner can delete" on public.{table} for delete to authenticated using ({OWNER})'
        )
    # The identity sequence behind observability_events.id is needed for inserts as the user.
    op.execute("grant usage, select on sequence public.observability_events_id_seq to authenticated, service_role")


def downgrade() -> None:
    for table in PARENTS:
        for action in ("select", "insert", "update", "delete"):
            op.execute(f'drop policy if exists "{table}: owner can {action}" on public.{table}')
        op.execute(f"alter table public.{table} disable row level security")
