-- Local seed data (`supabase db reset` runs it after the migrations; tests/test_seed_sql.py applies it to
-- pgferry's local target). Two users with one small, complete set of rows each, so a developer can sign in
-- as either and see RLS keep them apart. Fixed ids keep it re-runnable.

insert into auth.users (instance_id, id, aud, role, email, encrypted_password, email_confirmed_at,
                        raw_app_meta_data, raw_user_meta_data, created_at, updated_at)
values
  ('00000000-0000-0000-0000-000000000000', '11111111-1111-4111-8111-111111111111', 'authenticated',
   'authenticated', 'ada@example.test', '', now(), '{"provider":"email","providers":["email"]}', '{}', now(), now()),
  ('00000000-0000-0000-0000-000000000000', '22222222-2222-4222-8222-222222222222', 'authenticated',
   'authenticated', 'grace@example.test', '', now(), '{"provider":"email","providers":["email"]}', '{}', now(), now())
on conflict (id) do nothing;

insert into public.environments (id, user_id, name, github_repository, github_branch, settings)
values
  ('a1000000-0000-4000-8000-000000000001', '11111111-1111-4111-8111-111111111111', 'web app',
   'ada/web-app', 'main', '{"runtime": "node20", "timeout_s": 900}'),
  ('b2000000-0000-4000-8000-000000000001', '22222222-2222-4222-8222-222222222222', 'compiler',
   'grace/cobol-next', 'develop', '{"runtime": "python3.12"}')
on conflict (id) do nothing;

insert into public.tasks (id, user_id, environment_id, title, description, status, priority, tags)
values
  ('a1000000-0000-4000-8000-000000000002', '11111111-1111-4111-8111-111111111111',
   'a1000000-0000-4000-8000-000000000001', 'Add dark mode', 'Respect prefers-color-scheme.', 'running', 2,
   '{ui,frontend}'),
  ('b2000000-0000-4000-8000-000000000002', '22222222-2222-4222-8222-222222222222',
   'b2000000-0000-4000-8000-000000000001', 'Fix the parser', 'PERFORM VARYING loops mis-nest.', 'pending', 1,
   '{bug}')
on conflict (id) do nothing;

insert into public.agent_executions (id, user_id, task_id, environment_id, agent_name, model, status, inputs,
                                     outputs, started_at, completed_at, duration_ms, prompt_tokens,
                                     completion_tokens, total_tokens, cost_usd)
values
  ('a1000000-0000-4000-8000-000000000003', '11111111-1111-4111-8111-111111111111',
   'a1000000-0000-4000-8000-000000000002', 'a1000000-0000-4000-8000-000000000001', 'coder', 'gpt-4.1',
   'succeeded', '{"prompt": "add a theme toggle"}', '{"files_changed": 3}', now() - interval '5 minutes',
   now() - interval '2 minutes', 180000, 5120, 830, 5950, 0.041250)
on conflict (id) do nothing;

insert into public.observability_events (user_id, execution_id, event_type, severity, message, data, trace_id,
                                         span_id)
select '11111111-1111-4111-8111-111111111111', 'a1000000-0000-4000-8000-000000000003', 'llm.call', 'info',
       'model call finished', '{"latency_ms": 2300}', '4bf92f3577b34da6a3ce929d0e0e4736', '00f067aa0ba902b7'
where not exists (select 1 from public.observability_events where trace_id = '4bf92f3577b34da6a3ce929d0e0e4736');

insert into public.agent_memory (id, user_id, agent_name, memory_type, content, importance)
values
  ('a1000000-0000-4000-8000-000000000004', '11111111-1111-4111-8111-111111111111', 'coder', 'semantic',
   'The web app uses Tailwind; prefer utility classes over new CSS files.', 0.8)
on conflict (id) do nothing;

insert into public.workflows (id, user_id, environment_id, name, definition)
values
  ('a1000000-0000-4000-8000-000000000005', '11111111-1111-4111-8111-111111111111',
   'a1000000-0000-4000-8000-000000000001', 'review and merge',
   '{"steps": [{"id": "review", "agent": "reviewer"}, {"id": "merge", "agent": "coder", "after": ["review"]}]}')
on conflict (id) do nothing;

insert into public.workflow_executions (id, user_id, workflow_id, status, trigger, step_results)
values
  ('a1000000-0000-4000-8000-000000000006', '11111111-1111-4111-8111-111111111111',
   'a1000000-0000-4000-8000-000000000005', 'succeeded', 'webhook', '[{"step": "review", "ok": true}]')
on conflict (id) do nothing;

insert into public.execution_snapshots (id, user_id, execution_id, sequence, label, state, size_bytes)
values
  ('a1000000-0000-4000-8000-000000000007', '11111111-1111-4111-8111-111111111111',
   'a1000000-0000-4000-8000-000000000003', 0, 'after planning', '{"plan": ["edit theme.ts", "add toggle"]}', 42)
on conflict (id) do nothing;
