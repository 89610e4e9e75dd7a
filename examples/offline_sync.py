"""Two Python clients and one PGlite client edit the same tasks, one Python client offline for a while; every
replica must end identical to the database. Exits 0 when they converge, 1 (with the differences) when not.

Run on the local stack::

    pgferry dev up
    .venv/bin/python examples/offline_sync.py

(``--proxy``, ``--database-url`` and ``--token`` point it elsewhere; by default it asks ``pgferry dev status`` and
``pgferry dev token``.) The PGlite client is ``tests/js/pglite-writer.mjs`` with the official npm packages
(``@electric-sql/pglite``, ``@electric-sql/pglite-sync``; ``./run setup`` installs them): it reads through the proxy
and writes through the write API, as a browser would.

What happens:

1. client A creates a task; A and B sync it;
2. B goes offline (its outbox cannot reach the server) and edits the task's priority and adds a task of its own;
   A renames the task meanwhile; PGlite starts, adds a task and sets the shared task's status;
3. B comes back: its outbox drains; per-column last-write-wins keeps A's title, B's priority and PGlite's status;
4. the database, A, B and PGlite are compared row by row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg

from pgferry.client import ClientConfig, ElectricSupabaseClient

JS = Path(__file__).resolve().parent.parent / "tests" / "js" / "pglite-writer.mjs"
DEFAULT_USER = "6f1c2d4e-0000-4000-8000-000000000001"
COLUMNS = ("id", "title", "status", "priority")


def from_dev_stack(args: argparse.Namespace) -> None:
    """Fill in what was not given from ``pgferry dev status`` / ``pgferry dev token``."""
    pgferry = [sys.executable, "-m", "pgferry"]
    if args.proxy is None or args.database_url is None:
        status = json.loads(
            subprocess.run([*pgferry, "dev", "status", "--json"], capture_output=True, text=True, check=True).stdout
        )
        args.proxy = args.proxy or status["proxy"]
        args.database_url = args.database_url or status["target"]
    if args.token is None:
        args.token = subprocess.run(
            [*pgferry, "dev", "token", "--user", args.user], capture_output=True, text=True, check=True
        ).stdout.strip()


def rows_of(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return sorted(tuple(str(row[c]) for c in COLUMNS) for row in rows)


def database_rows(url: str, user: str) -> list[tuple[str, ...]]:
    with psycopg.connect(url) as conn:
        found = conn.execute("select id, title, status, priority from tasks where user_id = %s", [user])
        return sorted(tuple(str(v) for v in row) for row in found)


async def settle(clients: list[ElectricSupabaseClient], url: str, user: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        expected = await asyncio.to_thread(database_rows, url, user)
        if all(c.pending() == 0 and rows_of(c.query("tasks")) == expected for c in clients):
            return
        await asyncio.sleep(0.1)


async def main(args: argparse.Namespace) -> int:
    run = uuid.uuid4().hex[:6]
    config = ClientConfig(url=args.proxy, access_token=args.token)
    a, b = ElectricSupabaseClient(), ElectricSupabaseClient()
    for client in (a, b):
        await client.initialize(config)
        await client.setup_sync(["tasks"])

    shared = str(uuid.uuid4())
    await a.insert("tasks", {"id": shared, "user_id": uuid.UUID(args.user), "title": f"{run}: shared", "priority": 1})
    await settle([a, b], args.database_url, args.user)
    existing = len(a.query("tasks"))

    assert b._sender is not None
    online_url = b._sender.url
    b._sender.url = "http://127.0.0.1:9/v1/mutations"  # B is offline: its writes wait in its outbox
    await b.update("tasks", {"id": shared, "priority": 5})
    await b.insert("tasks", {"id": str(uuid.uuid4()), "user_id": uuid.UUID(args.user), "title": f"{run}: made offline"})
    await a.update("tasks", {"id": shared, "title": f"{run}: renamed by A"})

    env = {
        **os.environ,
        "TOKEN": args.token,
        "PROXY_URL": args.proxy,
        "TASK_ID": shared,
        "RUN": run,
        "EXPECT_ROWS": str(existing + 2),
    }
    node = shutil.which("node")
    if node is None:
        print("offline_sync: node is not installed (the PGlite client needs Node.js 20+)", file=sys.stderr)
        return 1
    pglite = await asyncio.create_subprocess_exec(node, str(JS), env=env, stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(args.offline_seconds)
    print(f"B was offline with {b.pending()} pending writes; back online", file=sys.stderr)
    b._sender.url = online_url
    b._sender.retry_now()
    await settle([a, b], args.database_url, args.user)

    out, _ = await asyncio.wait_for(pglite.communicate(), 120)
    final = (
        json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {"event": "error", "message": "no output"}
    )
    await settle([a, b], args.database_url, args.user)
    expected = await asyncio.to_thread(database_rows, args.database_url, args.user)
    replicas = {"A": rows_of(a.query("tasks")), "B": rows_of(b.query("tasks"))}
    if final.get("event") == "final":
        replicas["PGlite"] = rows_of(final["rows"])
    else:
        print(f"PGlite client failed: {final.get('message')}", file=sys.stderr)
    await a.close()
    await b.close()

    shared_row = next((r for r in expected if r[0] == shared), None)
    print(f"shared task in the database: {shared_row}", file=sys.stderr)
    differing = {name: rows for name, rows in replicas.items() if rows != expected}
    if differing or "PGlite" not in replicas:
        for name, rows in differing.items():
            print(f"{name} differs from the database:\n  replica  {rows}\n  database {expected}", file=sys.stderr)
        return 1
    print(f"converged: {len(expected)} tasks identical in the database, A, B and PGlite")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--proxy", help="the shape proxy with the write API [default: the dev stack's]")
    parser.add_argument("--database-url", help="the database behind it, to compare with [default: the dev stack's]")
    parser.add_argument("--token", help="the user's access token [default: pgferry dev token --user USER]")
    parser.add_argument("--user", default=DEFAULT_USER)
    parser.add_argument("--offline-seconds", type=float, default=3.0)
    arguments = parser.parse_args()
    from_dev_stack(arguments)
    raise SystemExit(asyncio.run(main(arguments)))
