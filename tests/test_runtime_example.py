"""``examples/runtime_service.py`` runs as documented, on real servers: the direct URL and PgBouncer in front of it.

Run twice against the same database: the second run's writes are reported as duplicates and nothing doubles, each
user reads only their own three tasks, and the search finds the task whose embedding leans the queried way.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg

from tests.runtime_helpers import SECRET, SUPABASE_URL, anon_key, token_for

ROOT = Path(__file__).resolve().parents[1]
ADA = uuid.UUID("6f1c2d4e-0000-4000-8000-0000000000a1")
BOB = uuid.UUID("6f1c2d4e-0000-4000-8000-0000000000b2")


def test_the_runtime_example_service_runs(target_url: str, pgbouncer: Callable[..., str], tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PGFERRY_HOME": str(tmp_path / "home"),
        "SUPABASE_URL": SUPABASE_URL,
        "SUPABASE_ANON_KEY": anon_key(),
        "SUPABASE_JWT_SECRET": SECRET,
        "SUPABASE_DB_URL": target_url,
        "SUPABASE_POOLER_URL": pgbouncer(target_url),
        "ACCESS_TOKEN_1": token_for(ADA),
        "ACCESS_TOKEN_2": token_for(BOB),
    }
    runs = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "runtime_service.py"), "--state-dir", str(tmp_path / "state")],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        runs.append(result.stdout.splitlines())
    first, second = runs
    assert first[0] == "doctor: 0 problem(s)"
    assert first[1] == "client: transaction mode, prepared statements off"
    assert first[2] == "user 00a1: writes applied, applied, applied"
    assert second[2] == "user 00a1: writes duplicate, duplicate, duplicate"
    assert first[4] == "user 00a1: reads 3 task(s), owners ['00a1'], stale=False"
    assert first[5] == "user 00b2: reads 3 task(s), owners ['00b2'], stale=False"
    assert first[6] == "search: Tune the HNSW index on tasks (1.000)"  # the others are far below the threshold
    assert first[7] == "search (one round trip): Rotate the service-role key (1.000)"
    assert first[8] == "read cache: 2 hit(s), 3 miss(es), counts [1, 1, 1, 1] then 0"  # 2nd reads hit; a write drops
    assert first[9] == "health: ok=True, queue depth 0"
    assert first[10] == "metrics: 8 timed transaction(s), pool waiting 0"  # 6 writes, 2 reads
    with psycopg.connect(target_url) as conn:
        assert conn.execute("select count(*) from public.tasks").fetchone() == (6,)


def test_the_example_says_what_is_missing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "runtime_service.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: set ACCESS_TOKEN_1 and ACCESS_TOKEN_2 to two users' access tokens (or use --local-stack)"
    )
