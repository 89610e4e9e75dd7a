"""The README's "From Python" example runs as written, against real servers, and its objects behave."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from pgferry.migrate import (
    Migration,
    MigrationInterruptedError,
    MigrationOptions,
    PlanBlockedError,
    SameDatabaseError,
    VerificationFailedError,
)
from pgferry.migrate.verify import VerificationReport
from tests.migrate_helpers import assert_same_rows, seed_source

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    text = README.read_text()
    section = text[text.index("**From Python.**") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README lost its Python example"
    return match.group(1)


def test_the_readme_example_migrates(source_url: str, baseline_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    seed_source(source_url, scale=0.02)
    namespace: dict[str, Any] = {"neon_url": source_url, "supabase_url": baseline_url}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    printed = capsys.readouterr().out
    assert "phase data" in printed and "rows" in printed
    assert printed.strip().splitlines()[-1].startswith("True {'run': 1, 'phase': 'complete'")
    assert isinstance(namespace["migration"], Migration)
    assert_same_rows(source_url, baseline_url)


def test_errors_travel_across_processes() -> None:
    """Every error of pgferry.migrate pickles with its message and what it carries."""
    report = VerificationReport(unverified_tables=["public.tasks"])
    for error in (
        SameDatabaseError("the source and the target are the same database"),
        PlanBlockedError("nothing was written: x"),
        VerificationFailedError("verification failed: y", report),
        MigrationInterruptedError("data phase stopped: z", phase="data", side="target", sqlstate="23514"),
    ):
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
        assert type(copy) is type(error) and str(copy) == str(error)
        assert "\n" not in str(copy)
    interrupted = pickle.loads(pickle.dumps(MigrationInterruptedError("m", phase="data", side="target")))  # noqa: S301
    assert (interrupted.phase, interrupted.side) == ("data", "target")
    failed = pickle.loads(pickle.dumps(VerificationFailedError("v", report)))  # noqa: S301
    assert failed.report is not None and failed.report.unverified_tables == ["public.tasks"]


def test_options_hide_the_password_and_parse_strings() -> None:
    options = MigrationOptions(
        source_url="postgresql://u:hunter2@neon.example/db",  # type: ignore[arg-type]
        target_url="postgresql://postgres:hunter3@db.example.supabase.co:5432/postgres",  # type: ignore[arg-type]
    )
    assert "hunter2" not in repr(options) and "hunter3" not in str(options.as_dict())
    assert options.source_url.get_secret_value().endswith("hunter2@neon.example/db")
