"""A small platform service on the runtime data layer: each piece of ``pgferry.runtime`` used once, end to end.

    pgferry dev up                                        # the local stack: target, PgBouncer pooler, ...
    python examples/runtime_service.py --local-stack      # uses the stack's pooler URL and JWT secret

    SUPABASE_URL=… SUPABASE_ANON_KEY=… SUPABASE_JWT_SECRET=… SUPABASE_DB_URL=… SUPABASE_POOLER_URL=… \
    ACCESS_TOKEN_1=… ACCESS_TOKEN_2=… python examples/runtime_service.py       # any project, two users' tokens

What it does: ``pgferry doctor``'s checks on the direct URL; ``create_database_client`` (the pooler URL, so
transaction mode: no prepared statements); two users' tokens verified; each user's tasks written through
``ResilientDatabase`` with idempotency keys (run it twice: the second run reports duplicates, nothing doubles);
each user's tasks read back as that user (RLS: never the other's); ``search_tasks`` with a tuned ``ef_search`` and
``client.search_tasks`` (one round trip); the read cache (reads answered from memory until the replication feed
or a write through the client says the rows changed); the health check and a few Prometheus metrics.
``tests/test_runtime_example.py`` runs this file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pgferry.config import Settings, load_settings
from pgferry.errors import PgferryError
from pgferry.observability.logging import configure_logging
from pgferry.runtime.client import create_database_client
from pgferry.runtime.doctor import diagnose
from pgferry.runtime.queue import Operation
from pgferry.runtime.resilience import ResilientDatabase, health_check
from pgferry.runtime.search import DIMENSIONS, search_tasks

TITLES = ("Index the agent memory", "Tune the HNSW index on tasks", "Rotate the service-role key")
INSERT = "insert into public.tasks (id, user_id, title, embedding) values (%(id)s, %(user)s, %(title)s, %(embedding)s)"
NAMESPACE = uuid.UUID("6f1c2d4e-0000-4000-8000-00000000c0de")


def embedding(axis: int) -> list[float]:
    """A unit vector leaning towards one axis (a real service embeds the task's text)."""
    vector = [0.01] * DIMENSIONS
    vector[axis] = 1.0
    return vector


def local_stack_environment() -> dict[str, str]:
    """Settings and two users' tokens for `pgferry dev up`'s stack, signed with its JWT secret."""
    import jwt

    from pgferry.localstack.stack import DEV_SUPABASE_URL, LocalStack

    stack = LocalStack(load_settings().home)
    urls = {server.name: server.url for server in stack.status() if server.reachable}
    if "target" not in urls or "pooler" not in urls:
        raise SystemExit("the local stack is not up (or has no pooler): run `pgferry dev up` first")
    secret, now = stack.jwt_secret(), int(time.time())
    env = {
        "SUPABASE_URL": DEV_SUPABASE_URL,
        "SUPABASE_JWT_SECRET": secret,
        "SUPABASE_JWKS_URL": "",
        "SUPABASE_DB_URL": urls["target"],
        "SUPABASE_POOLER_URL": urls["pooler"],
        "SUPABASE_ANON_KEY": jwt.encode({"role": "anon", "iss": "supabase", "iat": now, "exp": now + 3600}, secret),
    }
    for n, user in enumerate(("6f1c2d4e-0000-4000-8000-0000000000a1", "6f1c2d4e-0000-4000-8000-0000000000b2"), 1):
        claims = {
            "sub": user,
            "role": "authenticated",
            "aud": "authenticated",
            "iss": f"{DEV_SUPABASE_URL}/auth/v1",
            "iat": now,
            "exp": now + 3600,
            "session_id": str(uuid.uuid4()),
        }
        env[f"ACCESS_TOKEN_{n}"] = jwt.encode(claims, secret)
    return env


def run(settings: Settings, tokens: list[str], state_dir: Path) -> None:
    direct = settings.supabase_db_url
    if direct is not None:
        problems = [f for f in diagnose(direct.get_secret_value()) if f.status == "problem"]
        print(f"doctor: {len(problems)} problem(s)" + "".join(f"\n  {p.check}: {p.message}" for p in problems))

    # The read cache follows the database by logical replication over the direct URL (a pooler cannot carry it).
    with create_database_client(settings, max_size=4, read_cache=direct is not None) as client:
        print(
            f"client: {client.plan.mode.value} mode, prepared statements "
            f"{'on' if client.plan.mode.allows_prepared_statements else 'off'}"
        )
        users = [client.verify(token) for token in tokens]  # signature, expiry, audience, issuer, role
        db = ResilientDatabase(client, state_dir)
        for user in users:
            outcomes = []
            for axis, title in enumerate(TITLES):
                key = uuid.uuid5(NAMESPACE, f"{user.user_id}/{title}")  # the same task twice is the same write
                params = {"id": key, "user": user.user_id, "title": title, "embedding": str(embedding(axis))}
                outcomes.append(db.write(user, Operation(INSERT, params, key=key)).value)
            print(f"user {str(user.user_id)[-4:]}: writes {', '.join(outcomes)}")
        db.sync_queued_operations()

        for user in users:
            mine = db.read(user, "my-tasks", "select user_id, title from public.tasks order by title")
            owners = {str(row["user_id"])[-4:] for row in mine.rows}
            print(
                f"user {str(user.user_id)[-4:]}: reads {len(mine.rows)} task(s), owners {sorted(owners)}, "
                f"stale={mine.stale}"
            )

        with client.user_transaction(users[0]) as conn:
            found = search_tasks(conn, embedding(1), threshold=0.5, k=2, ef_search=64)
        print("search: " + "; ".join(f"{match.title} ({match.similarity:.3f})" for match in found))
        found = client.search_tasks(users[0], embedding(2), threshold=0.5, k=2)  # one round trip, default HNSW
        print("search (one round trip): " + "; ".join(f"{match.title} ({match.similarity:.3f})" for match in found))

        if client.query_cache is not None and client.query_cache.wait_streaming(10):
            count = "select count(*) from public.tasks where title like 'Rotate%%key'"
            before = [client.query(user, count, cache=True)[0][0] for user in users for _ in range(2)]
            client.query(users[0], "update public.tasks set title = title || ' (done)' where title like 'Rotate%%'")
            after = client.query(users[0], count, cache=True)[0][0]  # the write went through this client: fresh
            stats = client.query_cache.stats()
            print(f"read cache: {stats.hits} hit(s), {stats.misses} miss(es), counts {before} then {after}")

        health = health_check(client)
        print(f"health: ok={health.ok}, queue depth {db.queue.depth()}")
        samples = [s for m in db.metrics.registry.collect() for s in m.samples]
        timed = sum(s.value for s in samples if s.name == "pgferry_runtime_query_seconds_count")
        waiting = sum(s.value for s in samples if s.name == "pgferry_runtime_pool_waiting")
        print(f"metrics: {int(timed)} timed transaction(s), pool waiting {int(waiting)}")
        db.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--local-stack", action="store_true", help="use the stack `pgferry dev up` started")
    parser.add_argument("--state-dir", type=Path, help="where the write queue and read cache live")
    args = parser.parse_args()
    configure_logging(os.environ.get("LOG_LEVEL", "warning"), json=True)  # structured logs to stderr, as a service
    try:
        if args.local_stack:
            os.environ.update(local_stack_environment())
        tokens = [os.environ.get("ACCESS_TOKEN_1", ""), os.environ.get("ACCESS_TOKEN_2", "")]
        if not all(tokens):
            print(
                "error: set ACCESS_TOKEN_1 and ACCESS_TOKEN_2 to two users' access tokens (or use --local-stack)",
                file=sys.stderr,
            )
            return 2
        state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="runtime-service-"))
        run(load_settings(), tokens, state_dir)
    except PgferryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
