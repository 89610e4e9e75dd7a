"""A second data shape for the benchmarks, one that pgferry's own test-data generator never produces.

``pgferry.sampledata.TestDataManager`` writes rows in the order it generates them, with a few thousand
rows per table and an integer key on the events table. Real platforms look different, and a tool tuned on
its own generator can look fast for the wrong reasons. This shape is what a user's database of the same
schema tends to be after a year in production:

* **random UUID v4 keys on every table** (``gen_random_uuid()``, the events table's ``bigint`` identity
  replaced by a ``uuid``): key order has nothing to do with physical order, so anything that walks a table
  in key ranges reads its heap at random;
* **millions of small rows** in ``observability_events`` (1.6 million at ``scale=1``, about 250 bytes each),
  where per-row overheads dominate;
* **wide vector rows**: 60,000 1536-dimension embeddings (``tasks`` and ``agent_memory``), each behind an
  HNSW index, where per-byte costs and index builds dominate. Embeddings cluster by topic (32 centres plus
  noise), as real ones do; uniformly random vectors are HNSW's worst case and would make every method's time
  mostly the same two index builds;
* a few thousand snapshots with 10-60 kB JSON states and binary blobs (out-of-line TOAST values).

Everything is generated inside PostgreSQL with ``generate_series`` (``setseed`` makes the non-key values
repeatable; keys come from ``gen_random_uuid()`` and differ from run to run, as they would). At ``scale=1``
the database is about 1.2 GB with its indexes.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg

COUNTS: dict[str, int] = {
    "environments": 400,
    "workflows": 1_000,
    "tasks": 30_000,
    "agent_memory": 30_000,
    "agent_executions": 160_000,
    "workflow_executions": 20_000,
    "observability_events": 1_600_000,
    "execution_snapshots": 3_000,
}
"""Rows at ``scale=1``."""

USERS = 200

_STEPS: tuple[tuple[str, str], ...] = (
    (
        "environments",
        """
        insert into public.environments (id, user_id, name, description, github_repository, github_branch,
            github_installation_id, settings, status, created_at, updated_at)
        select gen_random_uuid(), pgferry_bench_user(i), 'env-' || i, 'environment ' || md5(i::text),
               'org' || (i % 37) || '/repo-' || i, 'main', 1000000 + i,
               jsonb_build_object('region', 'eu-' || (i % 3), 'replicas', i % 5, 'flags', jsonb_build_array(i % 2 = 0)),
               (array['active', 'paused', 'archived'])[1 + i % 3],
               now() - (i || ' minutes')::interval, now() - (i || ' seconds')::interval
        from generate_series(1, %(n)s) as i
        """,
    ),
    (
        "workflows",
        """
        insert into public.workflows (id, user_id, environment_id, name, description, definition, version,
            is_active, created_at, updated_at)
        select gen_random_uuid(), e.user_id, e.id, 'workflow ' || i, repeat('step ', 1 + i % 20),
               jsonb_build_object('steps', (select jsonb_agg(jsonb_build_object('name', 'step' || s, 'timeout', s * 10))
                                            from generate_series(1, 1 + i % 8) s)),
               1 + i % 4, i % 7 <> 0, now() - (i || ' hours')::interval, now()
        from generate_series(1, %(n)s) as i
        join pgferry_bench_environments e on e.n = 1 + i %% {count_environments}
        """,
    ),
    (
        "tasks",
        """
        insert into public.tasks (id, user_id, environment_id, title, description, status, priority, tags,
            metadata, embedding, due_at, completed_at, created_at, updated_at)
        select gen_random_uuid(), e.user_id, e.id, 'task ' || i || ' ' || md5(i::text),
               repeat('Investigate the failing build and report. ', 1 + i % 6),
               (array['pending', 'queued', 'running', 'completed', 'failed', 'cancelled'])[1 + i % 6],
               i % 5, array['t' || (i % 11), 'area-' || (i % 4)],
               jsonb_build_object('source', 'api', 'attempt', i % 3, 'labels', jsonb_build_array('x', i % 9)),
               pgferry_bench_vector(i), now() + (i % 30 || ' days')::interval,
               case when i % 6 = 3 then now() end, now() - (i || ' seconds')::interval, now()
        from generate_series(1, %(n)s) as i
        join pgferry_bench_environments e on e.n = 1 + i %% {count_environments}
        """,
    ),
    (
        "agent_memory",
        """
        insert into public.agent_memory (id, user_id, agent_name, memory_type, content, metadata, importance,
            embedding, access_count, last_accessed_at, expires_at, created_at, updated_at)
        select gen_random_uuid(), pgferry_bench_user(i), 'agent-' || (i % 12),
               (array['episodic', 'semantic', 'procedural', 'working'])[1 + i % 4],
               'The user prefers ' || md5(i::text) || ' when deploying to ' || (i % 9),
               jsonb_build_object('turn', i % 100), random(), pgferry_bench_vector(i), i % 50,
               now() - (i % 1000 || ' minutes')::interval, null, now() - (i || ' seconds')::interval, now()
        from generate_series(1, %(n)s) as i
        """,
    ),
    (
        "agent_executions",
        """
        insert into public.agent_executions (id, user_id, task_id, environment_id, agent_name, model, status,
            inputs, outputs, error, started_at, completed_at, duration_ms, prompt_tokens, completion_tokens,
            total_tokens, cost_usd, created_at, updated_at)
        select gen_random_uuid(), t.user_id, t.id, t.environment_id, 'agent-' || (i % 12),
               (array['gpt-4.1', 'claude-sonnet', 'llama-3'])[1 + i % 3],
               (array['queued', 'running', 'succeeded', 'failed', 'cancelled', 'timeout'])[1 + i % 6],
               jsonb_build_object('prompt', 'Summarise ' || md5(i::text), 'temperature', (i % 10) / 10.0),
               case when i % 6 = 2 then jsonb_build_object('answer', repeat('ok ', i % 40)) end,
               case when i % 6 = 3 then 'upstream timeout after ' || (i % 90) || 's' end,
               now() - (i || ' seconds')::interval, now() - ((i - 5) || ' seconds')::interval,
               (i * 37) % 90000, i % 4000, i % 800, i % 4000 + i % 800, ((i % 1000) / 997.0)::numeric(14, 6),
               now() - (i || ' seconds')::interval, now()
        from generate_series(1, %(n)s) as i
        join pgferry_bench_tasks t on t.n = 1 + i %% {count_tasks}
        """,
    ),
    (
        "workflow_executions",
        """
        insert into public.workflow_executions (id, user_id, workflow_id, status, trigger, inputs, outputs,
            step_results, current_step, error, started_at, completed_at, created_at, updated_at)
        select gen_random_uuid(), w.user_id, w.id,
               (array['pending', 'running', 'paused', 'succeeded', 'failed', 'cancelled'])[1 + i % 6],
               (array['manual', 'schedule', 'webhook', 'api'])[1 + i % 4],
               jsonb_build_object('run', i), case when i % 2 = 0 then jsonb_build_object('ok', true) end,
               jsonb_build_array(jsonb_build_object('step', 1, 'ms', i % 500)), 'step' || (i % 5),
               null, now() - (i || ' minutes')::interval, null, now() - (i || ' minutes')::interval, now()
        from generate_series(1, %(n)s) as i
        join pgferry_bench_workflows w on w.n = 1 + i %% {count_workflows}
        """,
    ),
    (
        "observability_events",
        """
        insert into public.observability_events (id, user_id, execution_id, event_type, severity, message, data,
            trace_id, span_id, parent_span_id, occurred_at, created_at)
        select gen_random_uuid(), x.user_id, x.id,
               (array['llm.call', 'tool.call', 'step.start', 'step.end', 'log'])[1 + i % 5],
               (array['debug', 'info', 'info', 'info', 'warning', 'error'])[1 + i % 6],
               'event ' || i || ' of execution',
               jsonb_build_object('ms', i % 977, 'tokens', i % 311),
               md5(x.id::text), substr(md5(i::text), 1, 16), null,
               now() - (i || ' milliseconds')::interval, now() - (i || ' milliseconds')::interval
        from generate_series(1, %(n)s) as i
        join pgferry_bench_agent_executions x
          on x.n = 1 + i %% {count_agent_executions}
        """,
    ),
    (
        "execution_snapshots",
        """
        insert into public.execution_snapshots (id, user_id, execution_id, sequence, label, state, blob,
            size_bytes, created_at, updated_at)
        select gen_random_uuid(), x.user_id, x.id, 0, 'checkpoint ' || i,
               (select jsonb_object_agg('k' || k, md5((i * 1000 + k)::text)) from generate_series(1, 300 + i % 1500) k),
               decode(repeat(md5(i::text), 100 + i % 400), 'hex'), 0,
               now() - (i || ' minutes')::interval, now()
        from generate_series(1, %(n)s) as i
        join pgferry_bench_agent_executions x on x.n = i
        """,
    ),
)

_HELPERS = """
create or replace function pgferry_bench_user(i bigint) returns uuid language sql immutable as
$$ select (lpad(to_hex(1 + i %% {users}), 8, '0') || '-0000-4000-8000-000000000000')::uuid $$;
create temporary table pgferry_bench_topics as
  select t as topic, array(select (random() * 2 - 1)::real from generate_series(1, 1536)) as centre
  from generate_series(0, 31) t;
create or replace function pgferry_bench_vector(i bigint) returns public.vector language sql volatile as
$$ select array(select c.centre[d] + ((random() - 0.5) * 0.6)::real from generate_series(1, 1536) d)::public.vector
   from pgferry_bench_topics c where c.topic = i %% 32 $$;
"""

_CLEANUP = """
drop function pgferry_bench_user(bigint);
drop function pgferry_bench_vector(bigint);
"""


def seed_realworld(url: str, scale: float = 1.0, *, say: Callable[[str], None] = print) -> dict[str, int]:
    """Fill the (empty, Neon-shaped) platform tables at ``url``; returns the rows per table."""
    counts = {table: max(1, int(n * scale)) for table, n in COUNTS.items()}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("select setseed(0.42)")
        # The identity key of the events table becomes a random UUID, as on most platforms that log events.
        conn.execute("alter table public.observability_events alter column id drop identity if exists")
        conn.execute("alter table public.observability_events alter column id drop default")
        conn.execute("alter table public.observability_events alter column id type uuid using gen_random_uuid()")
        conn.execute("alter table public.observability_events alter column id set default gen_random_uuid()")
        conn.execute(_HELPERS.format(users=USERS).replace("%%", "%"))
        for table, statement in _STEPS:
            say(f"  {table}: {counts[table]:,} rows")
            text = statement.replace("%(n)s", str(counts[table])).replace("%%", "%")
            for parent, n in counts.items():
                text = text.replace("{count_" + parent + "}", str(n))
            conn.execute(text.encode())
            # Numbered parents, so that children pick one by arithmetic instead of a lookup per row.
            conn.execute(
                f"create temporary table pgferry_bench_{table} as select row_number() over () as n, id, user_id, "
                + ("environment_id" if table in {"tasks", "workflows"} else "null::uuid as environment_id")
                + f" from public.{table}"
            )
            conn.execute(f"create unique index on pgferry_bench_{table} (n)")
            conn.execute(f"analyze pgferry_bench_{table}")
        conn.execute(_CLEANUP)
    return counts
