"""Dumping the source's schema with ``pg_dump --schema-only``, Supabase-managed schemas left out."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgferry.db.programs import PostgresProgramError, find_pg_tool, program_major
from pgferry.db.quoting import quote_ident
from pgferry.migrate.source_schema._common import (
    MANAGED_SCHEMAS,
    SERVER_MANAGED_COLUMN_OPTIONS,
    SchemaDumpError,
    _connect,
    _scrub,
    _server_major,
)
from pgferry.migrate.source_schema._extensions import extension_schemas
from pgferry.migrate.source_schema._sql import _TRIVIA, _name_of, _split_sql, _Statement, _Token, _words

# ------------------------------------------------------------------------------------------------------
# Dumping the source
# ------------------------------------------------------------------------------------------------------


def _dump_pattern(pattern: str) -> str:
    """A shell-style ``schema.table`` glob (as ``--tables`` takes) as an exact pg_dump pattern.

    pg_dump folds unquoted pattern text to lower case, so literal runs are double-quoted (``"app"."Order"``)
    and only ``*``, ``?`` and ``[...]`` stay unquoted. A table pattern without a schema matches any schema.
    """

    def part(text: str) -> str:
        out, literal, i = [], "", 0
        while i < len(text):
            char = text[i]
            if char in "*?[":
                if literal:
                    out.append(quote_ident(literal))
                    literal = ""
                if char == "[":
                    close = text.find("]", i + 1)
                    close = len(text) - 1 if close < 0 else close
                    cls = text[i : close + 1]
                    out.append("[^" + cls[2:] if cls.startswith("[!") else cls)  # fnmatch negation
                    i = close + 1
                    continue
                out.append(char)
            else:
                literal += char
            i += 1
        if literal:
            out.append(quote_ident(literal))
        return "".join(out)

    schema, dot, name = pattern.partition(".")
    return f"{part(schema)}.{part(name)}" if dot else part(pattern)


def _table_pattern(pattern: str) -> str:
    return _dump_pattern(pattern if "." in pattern else f"*.{pattern}")


def _strip_server_managed_options(statement: _Statement) -> str | None:
    """``statement`` without server-managed column options; ``None`` when nothing would be left of it."""
    sig = statement.significant
    if _words(sig, 2) != ["alter", "table"] or not any(t.kind == "word" and t.text.lower() == "column" for t in sig):
        return statement.text
    tokens = list(statement.tokens)
    # The option list is the parenthesised group right after the last SET.
    set_at = max((i for i, t in enumerate(tokens) if t.kind == "word" and t.text.lower() == "set"), default=-1)
    open_at = next((i for i in range(set_at + 1, len(tokens)) if tokens[i].text == "("), -1)
    if set_at < 0 or open_at < 0:
        return statement.text
    depth, close_at = 0, -1
    options: list[list[_Token]] = []
    current: list[_Token] = []
    for i in range(open_at + 1, len(tokens)):
        token = tokens[i]
        if token.text == "(":
            depth += 1
        elif token.text == ")":
            if depth == 0:
                close_at = i
                break
            depth -= 1
        if token.text == "," and depth == 0:
            options.append(current)
            current = []
        else:
            current.append(token)
    if close_at < 0:
        return statement.text
    options.append(current)
    kept: list[str] = []
    for option in options:
        first = next((t for t in option if t.kind not in _TRIVIA), None)
        name = _name_of(first) if first is not None else None
        if name not in SERVER_MANAGED_COLUMN_OPTIONS:
            kept.append("".join(t.text for t in option).strip())
    if len(kept) == len(options):
        return statement.text
    if not kept:
        return None
    inner = ", ".join(kept)
    return "".join(t.text for t in tokens[: open_at + 1]) + inner + "".join(t.text for t in tokens[close_at:])


_DEFINING_WORDS = frozenset(
    {"table", "view", "sequence", "type", "domain", "function", "procedure", "aggregate", "index"}
)


def _schemas_missing_create(statements: Sequence[_Statement]) -> list[str]:
    """Schemas that objects are created in without a ``CREATE SCHEMA`` in the dump (``-t`` dumps)."""
    created: set[str] = set()
    used: dict[str, None] = {}
    for statement in statements:
        sig = statement.significant
        words = _words(sig, 4)
        if words[:2] == ["create", "schema"]:
            name = _name_of(sig[2]) if len(sig) > 2 else None
            if name:
                created.add(name)
            continue
        if not words or words[0] != "create":
            continue
        # CREATE [UNLOGGED|MATERIALIZED|...] <kind> "schema"."name"
        for i in range(1, min(len(sig) - 2, 5)):
            if sig[i].kind == "word" and sig[i].text.lower() in _DEFINING_WORDS and sig[i].text.lower() != "index":
                if sig[i + 2].text == ".":
                    schema = _name_of(sig[i + 1])
                    if schema:
                        used.setdefault(schema)
                break
    return [s for s in used if s not in created and s != "public"]


def dump_source_schema(
    source_url: str,
    *,
    schemas: Sequence[str] | None = None,
    tables: Sequence[str] | None = None,
    exclude_tables: Sequence[str] | None = None,
) -> str:
    """The source's schema as plain SQL from ``pg_dump --schema-only``, ready for :func:`rewrite_for_target`.

    ``schemas`` are schema names, ``tables`` and ``exclude_tables`` shell-style globs on ``schema.table``
    (or on the bare table name, in any schema), the same filters ``pgferry migrate`` takes. Supabase-managed
    schemas are always excluded. Owners, privileges, publications, subscriptions, security labels and
    tablespaces are left out: they name roles and server resources that do not exist on the target, and
    Supabase grants its API roles through default privileges instead. Comments are kept.

    The server's major version is read first so that a pg_dump at least as new is used. The password is
    passed in the environment, never on the command line, and never appears in an error message.
    """
    conn = _connect(source_url, SchemaDumpError, "source")
    with conn:
        major = _server_major(conn)
        extensions = sorted(extension_schemas(conn))
    try:
        pg_dump = find_pg_tool("pg_dump", major)
    except PostgresProgramError as exc:
        raise SchemaDumpError(str(exc)) from exc
    tool_major = program_major(str(pg_dump)) or major
    try:
        params = conninfo_to_dict(source_url)
    except psycopg.Error as exc:
        raise SchemaDumpError("the source URL is not a valid PostgreSQL connection string") from exc
    env = dict(os.environ)
    password = params.pop("password", None)
    if password:
        env["PGPASSWORD"] = str(password)
    params.setdefault("connect_timeout", "10")
    params.setdefault("application_name", "pgferry-schema-dump")
    args = [
        str(pg_dump),
        "--schema-only",
        "--no-owner",
        "--no-privileges",
        "--no-publications",
        "--no-subscriptions",
        "--no-security-labels",
        "--no-tablespaces",
        "--quote-all-identifiers",
        "--encoding=UTF8",
    ]
    args += [f"--exclude-schema={quote_ident(name)}" for name in sorted(MANAGED_SCHEMAS)]
    args += [f"--schema={_dump_pattern(name)}" for name in schemas or ()]
    args += [f"--table={_table_pattern(name)}" for name in tables or ()]
    args += [f"--exclude-table={_table_pattern(name)}" for name in exclude_tables or ()]
    if (schemas or tables) and tool_major >= 14:
        # With -n/-t pg_dump leaves out every extension; the objects it does dump may need them.
        args += [f"--extension={quote_ident(name)}" for name in extensions if name != "plpgsql"]
    args.append(f"--dbname={make_conninfo('', **params)}")
    try:
        out = subprocess.run(args, capture_output=True, env=env, check=False)
    except OSError as exc:
        raise SchemaDumpError(f"could not run {pg_dump}: {exc.strerror}") from exc
    if out.returncode != 0:
        stderr = out.stderr.decode("utf-8", "replace")
        message = next((ln for ln in stderr.splitlines() if "error" in ln.lower()), stderr)
        raise SchemaDumpError(
            f"pg_dump {tool_major} failed on the source: {_scrub(message, source_url) or 'no message'}"
        )
    text = out.stdout.decode("utf-8")
    statements = _split_sql(text)
    pieces: list[str] = []
    for statement in statements:
        kept = _strip_server_managed_options(statement)
        pieces.append(statement.lead if kept is None else kept)
    if tables:
        missing = _schemas_missing_create(statements)
        if missing:
            header = "".join(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(s)};\n" for s in missing)
            # pg_dump -t never emits CREATE SCHEMA; put the schemas right after the SET header.
            first_ddl = next(
                (
                    i
                    for i, st in enumerate(statements)
                    if st.significant and not st.is_meta and _words(st.significant, 1)[0] not in ("set", "select")
                ),
                len(statements),
            )
            pieces.insert(first_ddl, "\n\n" + header)
    return "".join(pieces)
