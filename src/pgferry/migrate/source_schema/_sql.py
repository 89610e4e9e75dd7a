"""A small SQL lexer: enough of PostgreSQL's (and psql's) rules to split a dump into statements and to find
identifiers outside string literals and comments."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

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


def _string_value(token: _Token) -> str | None:
    if token.kind != "string" or token.text[:1] in "eE":
        return None
    return token.text[1:-1].replace("''", "'")


def _words(sig: Sequence[_Token], count: int) -> list[str]:
    return [t.text.lower() if t.kind == "word" else "" for t in sig[:count]]
