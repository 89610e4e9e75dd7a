"""A small platform service: sign a user in, store an agent execution's artifact, search the user's tasks.

    python examples/agent_artifacts.py --demo     # against pgferry's recorded Supabase contract server (loopback)
    SUPABASE_URL=… SUPABASE_ANON_KEY=… SUPABASE_JWT_SECRET=… (or SUPABASE_JWKS_URL=…) \
    EMAIL=… PASSWORD=… python examples/agent_artifacts.py   # against a real project with search-tasks deployed

With ``--demo`` Supabase Auth, Storage and the functions gateway are pgferry's stand-in replaying their documented
responses (``pgferry.testing.supabase_contract``), with ``search-tasks`` answering a recorded result; tokens are
still signed and verified for real. ``tests/test_supabase_example.py`` runs this file that way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from contextlib import ExitStack

from pgferry.config import load_settings
from pgferry.errors import PgferryError
from pgferry.supabase.auth import AuthService
from pgferry.supabase.functions import FunctionsService
from pgferry.supabase.project import SupabaseProject
from pgferry.supabase.storage import StorageService

BUCKET = "agent-artifacts"
DIMENSIONS = 1536


def run(project: SupabaseProject, email: str, password: str) -> None:
    auth = AuthService(project)
    session = auth.sign_in(email, password)  # the access token is verified before we get it
    print(f"signed in as {session.user.email} ({session.user_id})")

    execution_id = uuid.uuid4()
    artifact = json.dumps({"execution_id": str(execution_id), "status": "completed", "tokens": 1234}).encode()
    storage = StorageService(project, auth)  # the user's token: Storage's policies decide
    path = f"{session.user_id}/executions/{execution_id}.json"
    stored = storage.upload(BUCKET, path, artifact, content_type="application/json")
    link = storage.create_signed_url(BUCKET, path, expires_in=600)
    print(f"uploaded {stored.key} ({len(artifact)} bytes); signed link valid 10 minutes: {link.split('?')[0]}?token=…")

    query = [0.0] * DIMENSIONS
    query[0] = 1.0  # in a real service: the embedding of the user's search text
    found = FunctionsService(project, auth, timeout=20).invoke(
        "search-tasks", {"query_embedding": query, "match_threshold": 0.5, "match_count": 5}
    )
    print(f"{found['count']} similar task(s):")
    for task in found["results"]:
        print(f"  {task['similarity']:.3f}  {task['title']}  [{task['status']}]")
    auth.sign_out()


def demo() -> None:
    from pgferry.testing.supabase_contract import ContractServer, Reply

    server = ContractServer(jwt_secret="demo-jwt-secret-0123456789abcdefghijkl")  # noqa: S106 (loopback demo)
    server.add_user("ada@example.com", "correct horse battery")
    server.add_bucket(BUCKET)
    # The answer search-tasks gives (shape: supabase/functions/search-tasks/handler.ts), recorded.
    server.functions["search-tasks"] = lambda _request: Reply(
        200,
        {
            "results": [
                {
                    "id": str(uuid.uuid4()),
                    "title": "Tune the HNSW index on tasks",
                    "description": None,
                    "status": "running",
                    "environment_id": None,
                    "similarity": 0.912,
                },
                {
                    "id": str(uuid.uuid4()),
                    "title": "Backfill task embeddings",
                    "description": None,
                    "status": "pending",
                    "environment_id": None,
                    "similarity": 0.874,
                },
            ],
            "count": 2,
        },
    )
    with ExitStack() as stack:
        stack.enter_context(server.serve())
        project = stack.enter_context(SupabaseProject(server.url, server.anon_key, jwt_secret=server.jwt_secret))
        run(project, "ada@example.com", "correct horse battery")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="use the recorded contract server on loopback")
    args = parser.parse_args()
    try:
        if args.demo:
            demo()
        else:
            with SupabaseProject.from_settings(load_settings()) as project:
                run(project, os.environ["EMAIL"], os.environ["PASSWORD"])
    except PgferryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
