"""Quoting identifiers and string literals for SQL text that is not sent through psycopg's ``sql`` module.

Where a query is built for psycopg, ``psycopg.sql.Identifier`` and ``sql.Literal`` do this (and know the
connection's encoding). Some SQL is text first: a schema dump being rewritten, a where clause rendered from an
AST for an HTTP upstream, a table name in a URL. These two functions are the only other place quoting is done.
"""

from __future__ import annotations

__all__ = ["quote_ident", "quote_literal"]


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted identifier (always quoted: case and reserved words stay as they are)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """``value`` as a standard string constant (``standard_conforming_strings = on``, PostgreSQL's default)."""
    return "'" + value.replace("'", "''") + "'"
