"""``examples/agent_artifacts.py --demo`` runs as documented (against the recorded contract server)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_example_service_runs_contract() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "agent_artifacts.py"), "--demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("signed in as ada@example.com (")
    assert lines[1].startswith("uploaded agent-artifacts/") and "token=…" in lines[1]
    assert lines[2] == "2 similar task(s):"
    assert "Tune the HNSW index on tasks" in lines[3]
