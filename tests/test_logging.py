"""Logs never carry secrets: URL passwords, JWTs and secret-named fields are scrubbed by the processor."""

from __future__ import annotations

import io
from contextlib import redirect_stderr

import structlog

from pgferry.observability.logging import configure_logging, redact_text

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwicm9sZSI6InNlcnZpY2Vfcm9sZSJ9.c2lnbmF0dXJlc2lnbmF0dXJl"


def test_redact_text_hides_passwords_and_tokens() -> None:
    text = f"connecting to postgresql://postgres:pa55w0rd@db.example.supabase.co:5432/postgres with {TOKEN}"
    redacted = redact_text(text)
    assert "pa55w0rd" not in redacted and TOKEN not in redacted
    assert "postgresql://postgres:***@db.example.supabase.co:5432/postgres" in redacted


def test_log_lines_are_scrubbed() -> None:
    buffer = io.StringIO()
    with redirect_stderr(buffer):
        configure_logging("debug", json=True)
        log = structlog.get_logger()
        log.info(
            "connected",
            url="postgres://u:topsecret@host/db",
            service_role_key="sb_secret_abc123",
            authorization=f"Bearer {TOKEN}",
            table="tasks",
        )
    out = buffer.getvalue()
    for secret in ("topsecret", "sb_secret_abc123", TOKEN):
        assert secret not in out
    assert '"table": "tasks"' in out
