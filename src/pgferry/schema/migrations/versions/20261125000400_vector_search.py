"""vector search

HNSW indexes (cosine) on both embedding columns and the ``match_tasks`` / ``match_agent_memory`` functions
that PostgREST (``supabase.rpc``) and SQL callers use. The functions are SECURITY INVOKER (the default), so RLS decides
which rows they can return: a user only ever matches their own tasks and memories.

An index scan on HNSW returns its ``ef_search`` nearest candidates and only then applies filters, so with
RLS and a threshold a plain scan can return fewer than ``match_count`` rows. pgvector 0.8 iterative scans
keep searching until enough rows pass the filters; ``strict_order`` keeps results sorted by distance. The
settings are attached to the functions so callers get correct results without knowing any of this.

Revision ID: 20261125000400
Revises: 20261125000300
Create Date: 2026-11-25 10:47:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "20261125000400"
down_revision: str | None = "20261125000300"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MATCH_TASKS = """
create or replace function public.match_tasks(
  query_embedding vector(1536),
  match_threshold double precision,
  match_count integer
)
returns table (
  id uuid,
  title text,
  description text,
  status text,
  environment_id uuid,
  similarity double precision
)
language sql
stable
set search_path = public, extensions, pg_temp
set hnsw.ef_search = 100
set hnsw.iterative_scan = strict_order
as $$
  select t.id, t.title, t.description, t.status, t.environment_id,
         1 - (t.embedding <=> query_embedding) as similarity
  from public.tasks t
  where t.embedding <=> query_embedding < 1 - match_threshold
  order by t.embedding <=> query_embedding asc, t.id
  limit least(match_count, 200)
$$
"""

MATCH_AGENT_MEMORY = """
create or replace function public.match_agent_memory(
  query_embedding vector(1536),
  match_threshold double precision,
  match_count integer,
  filter_agent_name text default null
)
returns table (
  id uuid,
  agent_name text,
  memory_type text,
  content text,
  importance double precision,
  similarity double precision
)
language sql
stable
set search_path = public, extensions, pg_temp
set hnsw.ef_search = 100
set hnsw.iterative_scan = strict_order
as $$
  select m.id, m.agent_name, m.memory_type, m.content, m.importance,
         1 - (m.embedding <=> query_embedding) as similarity
  from public.agent_memory m
  where m.embedding <=> query_embedding < 1 - match_threshold
    and (filter_agent_name is null or m.agent_name = filter_agent_name)
    and (m.expires_at is null or m.expires_at > now())
  order by m.embedding <=> query_embedding asc, m.id
  limit least(match_count, 200)
$$
"""


def upgrade() -> None:
    op.execute("create index ix_tasks_embedding_hnsw on public.tasks using hnsw (embedding vector_cosine_ops)")
    op.execute(
        "create index ix_agent_memory_embedding_hnsw on public.agent_memory using hnsw (embedding vector_cosine_ops)"
    )
    op.execute(MATCH_TASKS)
    op.execute(MATCH_AGENT_MEMORY)
    for fn in (
        "public.match_tasks(vector, double precision, integer)",
        "public.match_agent_memory(vector, double precision, integer, text)",
    ):
        op.execute(f"revoke execute on function {fn} from public, anon")
        op.execute(f"grant execute on function {fn} to authenticated, service_role")


def downgrade() -> None:
    op.execute("drop function if exists public.match_agent_memory(vector, double precision, integer, text)")
    op.execute("drop function if exists public.match_tasks(vector, double precision, integer)")
    op.execute("drop index if exists public.ix_agent_memory_embedding_hnsw")
    op.execute("drop index if exists public.ix_tasks_embedding_hnsw")
