"""Applying schema SQL to the target in one transaction, statement by statement, naming the one that fails."""

from __future__ import annotations

import re
from collections.abc import Sequence

import psycopg

from pgferry.migrate.source_schema._common import SchemaApplyError, _connect, _one_line, _scrub, _server_major
from pgferry.migrate.source_schema._sql import _LexError, _name_of, _split_sql, _Statement, _Token, _words

# ------------------------------------------------------------------------------------------------------
# Applying
# ------------------------------------------------------------------------------------------------------

_SKIPPED_META = frozenset({"\\restrict", "\\unrestrict"})


def _hint(sqlstate: str | None, message: str, source_major: int | None, target_major: int) -> str:
    text = message.lower()
    if sqlstate == "42704" and "role" in text:
        return (
            "pgferry dumps with --no-owner --no-privileges, so the role comes from a policy (TO ...) or a "
            "function body; create the role on the target or change the policy on the source"
        )
    if sqlstate == "42501" and "owner of extension" in text:
        return (
            "the extension already exists on the target under another owner (Supabase manages extensions); "
            "check that it lives in the same schema on both sides or remove its statements from the dump"
        )
    if sqlstate == "42501":
        return (
            "the target user lacks a privilege; Supabase-managed schemas (auth, storage, ...) cannot be "
            "changed, exclude those objects from the migration"
        )
    if sqlstate in ("42P07", "42710", "42723", "42P06", "42P16") or "already exists" in text:
        return (
            "the object already exists on the target: drop it there, or create the missing tables on the "
            "target yourself so that the schema phase has nothing to add (pgferry then copies into them)"
        )
    if "extension" in text and ("not available" in text or "control file" in text):
        return "install or enable that extension on the target (Supabase: Database > Extensions), then rerun"
    if sqlstate in ("42883", "42704", "3F000", "42P01"):
        return (
            "something the statement refers to is missing on the target, often an extension object in "
            "another schema or an object in a schema pgferry does not copy"
        )
    if sqlstate in ("42601", "22023") and source_major and source_major > target_major:
        return (
            f"the target runs PostgreSQL {target_major} and the source {source_major}: the dump uses "
            "syntax or settings the older target does not know"
        )
    return "fix the object on the source or the target and rerun"


def _set_parameter(sig: Sequence[_Token]) -> str | None:
    """The parameter a top-level ``SET name = value`` sets (``None`` for anything else)."""
    if len(sig) >= 2 and _words(sig, 1) == ["set"]:
        if sig[1].kind == "word" and sig[1].text.lower() in ("local", "session"):
            return _name_of(sig[2]) if len(sig) > 2 else None
        return _name_of(sig[1])
    return None


def _dump_source_major(text: str) -> int | None:
    match = re.search(r"^-- Dumped from database version (\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def apply_schema_sql(target_url: str, sql: str, *, dry_run: bool = False) -> None:
    """Run schema SQL (a pg_dump script) on the target in one transaction; all or nothing.

    psycopg rather than psql: each statement is sent on its own, so a failure names its statement and the
    server's own message. Handled on the way: psql's ``\\restrict``/``\\unrestrict`` lines (new pg_dump
    versions wrap scripts in them) are skipped, any other meta-command is refused, and ``SET`` of a
    parameter the target does not know (``transaction_timeout`` from pg_dump 17+ on an older target) is
    skipped instead of aborting the transaction. The session settings the dump makes (an empty
    ``search_path`` among them) end with the connection. ``dry_run`` rolls the transaction back at the
    end: ``plan`` uses it to find conflicts before ``run`` writes anything.
    """
    try:
        statements = _split_sql(sql)
    except _LexError as exc:
        raise SchemaApplyError("", 0, None, f"the schema SQL cannot be parsed: {exc}", "regenerate the dump") from exc
    source_major = _dump_source_major(sql)
    conn = _connect(target_url, SchemaApplyError, "target")
    with conn:
        target_major = _server_major(conn)
        known = {str(name) for (name,) in conn.execute("select name from pg_settings").fetchall()}
        current: _Statement | None = None
        try:
            with conn.transaction(force_rollback=dry_run):
                for current in statements:
                    sig = current.significant
                    if not sig:
                        continue
                    if current.is_meta:
                        command = sig[0].text.split()[0]
                        if command in _SKIPPED_META:
                            continue
                        raise SchemaApplyError(
                            current.first_line,
                            current.line,
                            None,
                            f"psql meta-command {command} in the schema SQL",
                            "pgferry applies plain SQL only; remove it",
                        )
                    parameter = _set_parameter(sig)
                    if parameter is not None and "." not in parameter and parameter.lower() not in known:
                        continue
                    conn.execute(current.body.encode())
        except psycopg.Error as exc:
            diag = exc.diag
            lines = str(exc).splitlines()
            message = _one_line(diag.message_primary or (lines[0] if lines else type(exc).__name__))
            statement = current.first_line if current is not None else ""
            line = current.line if current is not None else 0
            raise SchemaApplyError(
                _scrub(statement, target_url),
                line,
                diag.sqlstate,
                _scrub(message, target_url),
                _hint(diag.sqlstate, message, source_major, target_major),
            ) from exc
