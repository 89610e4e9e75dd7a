"""``examples/offline_sync.py`` run unchanged against real servers: two Python clients (one offline for a while)
and a PGlite client with the official npm packages must converge with the database. The example itself is the
oracle's judge: it compares every replica with the database and exits non-zero on any difference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.write_helpers import ALICE, token_for, write_stack

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "tests" / "js"


def test_two_python_clients_and_pglite_converge(target_url: str, tmp_path: Path) -> None:
    if shutil.which("node") is None or not (JS_DIR / "node_modules" / "@electric-sql" / "pglite-sync").exists():
        pytest.fail("Node.js and the npm packages in tests/js are required: run ./run setup (npm ci in tests/js)")
    with write_stack(target_url, tmp_path / "sync") as stack:
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "offline_sync.py"),
                "--proxy",
                stack.proxy_url,
                "--database-url",
                target_url,
                "--token",
                token_for(ALICE, expires_in=600),
                "--user",
                str(ALICE),
                "--offline-seconds",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converged: 3 tasks identical in the database, A, B and PGlite" in result.stdout
    shared = next(line for line in result.stderr.splitlines() if line.startswith("shared task in the database"))
    # Per-column last-write-wins kept every client's column: A's title, B's priority, PGlite's status.
    assert "renamed by A" in shared and "'queued'" in shared and "'5'" in shared
