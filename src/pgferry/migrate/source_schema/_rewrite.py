"""Rewriting a dump for a Supabase target: extensions live in ``extensions`` there, usually in ``public`` on Neon."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import psycopg

from pgferry.db.quoting import quote_ident, quote_literal
from pgferry.migrate.source_schema._common import (
    _DEFAULT_PUBLIC_COMMENT,
    _PG_CATALOG,
    MANAGED_SCHEMAS,
    SchemaRewriteError,
    _connect,
)
from pgferry.migrate.source_schema._dump import dump_source_schema
from pgferry.migrate.source_schema._extensions import ExtensionMember, extension_members, extension_schemas
from pgferry.migrate.source_schema._sql import (
    _TRIVIA,
    _LexError,
    _name_of,
    _split_sql,
    _Statement,
    _string_value,
    _Token,
    _tokens,
    _words,
)

# ------------------------------------------------------------------------------------------------------
# Extensions
# ------------------------------------------------------------------------------------------------------


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
                f"extension {quote_ident(name)} already exists on the target in schema "
                f"{quote_ident(self.target_ext[name])}",
            )
        if name in self.fixed:
            # Its control file names the schema; CREATE EXTENSION creates that schema if needed.
            return f"{statement.lead}CREATE EXTENSION IF NOT EXISTS {quote_ident(name)};"
        schema = self.placement.get(name)
        if schema is None:
            return statement.text
        return f"{statement.lead}CREATE EXTENSION IF NOT EXISTS {quote_ident(name)} WITH SCHEMA {quote_ident(schema)};"

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
                out[i] = _Token(token.kind, quote_ident(target) if token.kind == "ident" else target)
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
                suffix = "".join(f", {quote_literal(schema)}" for schema in additions)
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
