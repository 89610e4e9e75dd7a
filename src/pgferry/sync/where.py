"""The ``where`` clause of Electric's Shape API: parsed by us, never pasted into SQL.

A client sends ``where=<SQL boolean expression>`` and ``params[n]=...`` for ``$n``. The text is hostile until
proven otherwise, so it is tokenized and parsed here (a recursive-descent parser for the subset of PostgreSQL
expression syntax Electric accepts: see Electric's ``known_functions.ex`` and ``parser.ex``, which its docs
name as the source of truth) into an AST of frozen dataclasses. SQL only ever comes back out of the AST:
identifiers quoted, literals escaped, every operator parenthesised. A string that is not in the subset, or is
too large or too deep, raises :class:`~pgferry.sync.errors.WhereClauseError` (``At location N: ...``) and
nothing else: no other exception, no quadratic or exponential path, no unbounded recursion.

Choices that follow Electric rather than PostgreSQL, so a shape that works on the dev server works on Electric:
functions are an allow-list of Electric's (no ``now()``, ``random()``, aggregates, or ``coalesce``); casts go
only to the scalar types Electric supports (no ``timetz``, no user types, which could run user cast functions);
``$n`` values are untyped constants, as Electric binds them (psycopg sends ``str`` as ``unknown`` too).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias, TypeGuard

from psycopg import sql

from pgferry.db.quoting import quote_ident
from pgferry.sync.errors import ProtocolError, WhereClauseError, echo

__all__ = [
    "MAX_COST", "MAX_DEPTH", "MAX_EXPONENT", "MAX_LENGTH", "MAX_NODES", "MAX_PARAM", "MAX_PARAM_LENGTH", "AnyAll",
    "ArrayExpr", "Between", "Binary", "BoolOp", "Boolean", "Cast", "Column", "FuncCall", "InList", "IsDistinct",
    "IsTest", "Node", "Not", "Null", "Number", "Param", "String", "TypeName", "Unary", "WhereClause",
    "check_params", "children", "parse_params", "parse_where", "render_sql", "render_text", "walk",
]  # fmt: skip

MAX_LENGTH = 4096  # characters of where text
MAX_DEPTH = 64  # levels of the AST
MAX_NODES = 500  # AST nodes
MAX_PARAM = 100  # highest $n
MAX_PARAM_LENGTH = 4096  # characters of one $n value
# The cost budget: what one row's evaluation may cost, whatever the planner does. Comparisons, AND/OR and
# additions are cheap whatever the values; what grows with the values is multiplying numerics (digits add up),
# concatenating strings or arrays (copies grow) and powers (digits multiply), so those are counted and capped.
MAX_COST = 16
MAX_EXPONENT = 64  # the exponent of ^ must be a number literal within +-64
_MAX_NUMBER_CHARS = 40  # digits of a number literal (a 4000-digit numeric makes every product expensive)
_MAX_NUMBER_EXPONENT = 400  # e+NNN of a number literal: 1e308 (float8's range) fits, 1e100000 does not
_COST = {"*": 1, "||": 1, "^": 8}
_COSTLY_FUNCTIONS = {"array_cat": 1, "array_append": 1, "array_prepend": 1}
# Recursion guard of the parser itself, in nested parse_expr calls. Redundant parentheses cost a level without
# adding AST depth, and render_text adds up to three per AST level, so this stays above 3 * MAX_DEPTH (our own
# output always parses again) while keeping Python's stack far from its limit however the input is shaped.
_MAX_PARSE_DEPTH = 256
_MAX_ARRAY_DIMS = 6

# ---------------------------------------------------------------------------------------------------------------
# AST. ``pos`` is the 0-based offset in the where text (of the operator for operator nodes), for error messages
# of later stages (unknown column, type errors); it is left out of equality so trees compare by structure.


@dataclass(frozen=True, slots=True)
class Column:
    name: str  # after case folding
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Param:
    number: int
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Number:
    text: str  # as written (digits, '.', exponent): PostgreSQL types it by its form (int4, int8, numeric)
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class String:
    value: str  # an untyped ('unknown') constant, as in PostgreSQL
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Boolean:
    value: bool
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Null:
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class TypeName:
    name: str  # canonical, from the allow-list: "int4", "varchar", "timestamptz", "character", ...
    modifiers: tuple[int, ...] = ()
    array_dims: int = 0


@dataclass(frozen=True, slots=True)
class Cast:
    """``x::t``, ``CAST(x AS t)`` and typed literals (``date '2024-01-01'`` is ``'2024-01-01'::date``)."""

    expr: Node
    type: TypeName
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Unary:
    op: str  # "-" or "+"
    operand: Node
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Binary:
    op: str  # "=", "<>", "<", "+", "||", "@>", "LIKE", "NOT ILIKE", ... ("!=" is stored as "<>")
    left: Node
    right: Node
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class BoolOp:
    op: str  # "AND" or "OR"; nested runs of the same operator are flattened (both are associative)
    args: tuple[Node, ...]
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Not:
    arg: Node
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class IsTest:
    arg: Node
    test: str  # "NULL", "TRUE", "FALSE" or "UNKNOWN"
    negated: bool
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class IsDistinct:
    left: Node
    right: Node
    negated: bool  # IS NOT DISTINCT FROM
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class InList:
    arg: Node
    items: tuple[Node, ...]
    negated: bool
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Between:
    arg: Node
    low: Node
    high: Node
    negated: bool
    symmetric: bool
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class AnyAll:
    """``left op ANY (right)`` / ``ALL``; ``SOME`` is stored as ``ANY``."""

    left: Node
    op: str
    quantifier: str
    right: Node
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class ArrayExpr:
    items: tuple[Node, ...]  # nested ``[...]`` inside ARRAY[...] are ArrayExpr items too (same meaning)
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class FuncCall:
    name: str
    args: tuple[Node, ...]
    pos: int = field(default=0, compare=False)


Node: TypeAlias = (
    Column | Param | Number | String | Boolean | Null | Cast | Unary | Binary | BoolOp | Not | IsTest
    | IsDistinct | InList | Between | AnyAll | ArrayExpr | FuncCall
)  # fmt: skip


@dataclass(frozen=True)
class WhereClause:
    text: str  # the original text
    node: Node  # AST root
    columns: frozenset[str]  # column names referenced (after case folding)
    params: frozenset[int]  # $n numbers referenced


def children(node: Node) -> tuple[Node, ...]:
    """The direct sub-expressions of ``node``, left to right (the order they are rendered in)."""
    match node:
        case Cast(expr=e) | Unary(operand=e) | Not(arg=e) | IsTest(arg=e):
            return (e,)
        case Binary(left=a, right=b) | IsDistinct(left=a, right=b) | AnyAll(left=a, right=b):
            return (a, b)
        case BoolOp(args=args) | ArrayExpr(items=args) | FuncCall(args=args):
            return args
        case InList(arg=a, items=items):
            return (a, *items)
        case Between(arg=a, low=lo, high=hi):
            return (a, lo, hi)
        case _:
            return ()


def walk(node: Node) -> Iterator[Node]:
    """Every node, pre-order, left to right; iterative so no tree shape can exhaust the stack."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(children(current)))


# ---------------------------------------------------------------------------------------------------------------
# Tables of the supported subset

# Electric's function allow-list (known_functions.ex) with arities. Its type-input functions (``int4('1')``)
# are left out: a cast says the same thing and is the documented form.
_FUNCTIONS: dict[str, tuple[int, ...]] = {
    "lower": (1,),
    "upper": (1,),
    "justify_days": (1,),
    "justify_hours": (1,),
    "justify_interval": (1,),
    "timezone": (2,),
    "array_cat": (2,),
    "array_prepend": (2,),
    "array_append": (2,),
    "array_ndims": (1,),
}
_NONDETERMINISTIC = frozenset(
    {"now", "random", "clock_timestamp", "statement_timestamp", "transaction_timestamp", "timeofday", "gen_random_uuid",
     "uuid_generate_v4", "nextval", "currval", "lastval", "setval", "txid_current", "pg_sleep"}
)  # fmt: skip
_AGGREGATES = frozenset(
    {"count", "sum", "avg", "min", "max", "array_agg", "string_agg", "bool_and", "bool_or", "every"}
)

# Type names (unquoted, folded) -> canonical name. Only the scalar types Electric evaluates (plus the SQL
# spellings of them): a cast to any other type could call a user-defined cast or input function.
_TYPES: dict[str, str] = {
    "bool": "bool", "boolean": "bool", "int2": "int2", "smallint": "int2", "int4": "int4", "int": "int4",
    "integer": "int4", "int8": "int8", "bigint": "int8", "float4": "float4", "real": "float4", "float8": "float8",
    "numeric": "numeric", "decimal": "numeric", "dec": "numeric", "text": "text", "varchar": "varchar",
    "bpchar": "bpchar", "uuid": "uuid", "date": "date", "interval": "interval", "timestamptz": "timestamptz",
}  # fmt: skip
_TYPE_WORDS = frozenset(_TYPES) | {"double", "character", "char", "time", "timestamp", "float", "timetz"}
_TYPES_WITH_MODIFIERS = frozenset(
    {"varchar", "character", "bpchar", "numeric", "time", "timestamp", "timestamptz", "interval"}
)

# PostgreSQL's reserved keywords and type/function-name keywords: never a column when unquoted.
_RESERVED = frozenset(
    {"all", "analyse", "analyze", "and", "any", "array", "as", "asc", "asymmetric", "both", "case", "cast", "check",
     "collate", "column", "constraint", "create", "current_catalog", "current_date", "current_role", "current_time",
     "current_timestamp", "current_user", "default", "deferrable", "desc", "distinct", "do", "else", "end", "except",
     "false", "fetch", "for", "foreign", "from", "grant", "group", "having", "in", "initially", "intersect", "into",
     "lateral", "leading", "limit", "localtime", "localtimestamp", "not", "null", "offset", "on", "only", "or",
     "order", "placing", "primary", "references", "returning", "select", "session_user", "some", "symmetric",
     "system_user", "table", "then", "to", "trailing", "true", "union", "unique", "user", "using", "variadic", "when",
     "where", "window", "with", "authorization", "binary", "collation", "concurrently", "cross", "current_schema",
     "freeze", "full", "ilike", "inner", "is", "isnull", "join", "left", "like", "natural", "notnull", "outer",
     "overlaps", "right", "similar", "tablesample", "verbose", "values", "exists"}
)  # fmt: skip
_NONDETERMINISTIC_WORDS = frozenset(
    {"current_date", "current_time", "current_timestamp", "localtime", "localtimestamp", "current_user",
     "current_role", "session_user", "system_user", "user", "current_catalog", "current_schema"}
)  # fmt: skip

_OR, _AND, _NOT, _IS, _CMP, _LIKE, _OTHER, _ADD, _MUL, _EXP, _UNARY = range(1, 12)  # PostgreSQL's precedence
_OP_PREC = {
    "=": _CMP, "<>": _CMP, "<": _CMP, "<=": _CMP, ">": _CMP, ">=": _CMP, "+": _ADD, "-": _ADD,
    "*": _MUL, "/": _MUL, "%": _MUL, "^": _EXP,
    "||": _OTHER, "@>": _OTHER, "<@": _OTHER, "&&": _OTHER, "&": _OTHER, "|": _OTHER, "#": _OTHER,
}  # fmt: skip

# ---------------------------------------------------------------------------------------------------------------
# Tokenizer (PostgreSQL's scan.l rules, cut down)

_WS = " \t\n\r\f\v"
_OP_CHARS = frozenset("+-*/<>=~!@#%^&|`?")
_OP_SPECIAL = frozenset("~!@#%^&|`?")  # an operator containing one of these keeps a trailing + or -
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_FOLD = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)  # PostgreSQL folds ASCII only
_MAX_IDENT_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL would silently truncate longer names


def _ident_start(c: str) -> bool:
    return c == "_" or ("a" <= c <= "z") or ("A" <= c <= "Z") or ord(c) >= 0x80


def _ident_char(c: str) -> bool:
    return _ident_start(c) or ("0" <= c <= "9") or c == "$"


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # "ident" (unquoted, folded), "qident", "string", "number", "param", "op", "punct", "eof"
    value: str
    pos: int
    end: int


def _check_ident(name: str, pos: int) -> None:
    if len(name.encode()) > _MAX_IDENT_BYTES:
        raise WhereClauseError(f"identifier is longer than {_MAX_IDENT_BYTES} bytes", pos)


def _check_number(literal: str, pos: int) -> None:
    """Part of the cost budget: a number literal stays small, so no product or power of it gets huge."""
    if len(literal) > _MAX_NUMBER_CHARS:
        raise WhereClauseError(f"number literal longer than {_MAX_NUMBER_CHARS} characters", pos)
    exponent = literal.lower().partition("e")[2]
    if exponent and abs(int(exponent)) > _MAX_NUMBER_EXPONENT:
        raise WhereClauseError(f"number literal exponent beyond +-{_MAX_NUMBER_EXPONENT}", pos)


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _WS:
            i += 1
            continue
        start = i
        if c == "'" or c == '"':
            parts: list[str] = []
            j = i + 1
            while True:
                k = text.find(c, j)
                if k < 0:
                    what = "string constant" if c == "'" else "quoted identifier"
                    raise WhereClauseError(f"unterminated {what}", start)
                parts.append(text[j:k])
                if text.startswith(c, k + 1):  # doubled quote: an escaped quote
                    parts.append(c)
                    j = k + 2
                    continue
                i = k + 1
                break
            value = "".join(parts)
            if c == '"':
                if not value:
                    raise WhereClauseError("zero-length quoted identifier", start)
                _check_ident(value, start)
            toks.append(_Tok("string" if c == "'" else "qident", value, start, i))
        elif _ident_start(c):
            j = i + 1
            while j < n and _ident_char(text[j]):
                j += 1
            word = text[i:j].translate(_FOLD)
            if j < n and text[j] == "'" and word in ("e", "b", "x", "n"):
                raise WhereClauseError(f"{text[i:j]}'...' string constants are not supported; use '...'", start)
            if word == "u" and text.startswith("&", j):
                raise WhereClauseError("U&'...' Unicode escapes are not supported", start)
            _check_ident(word, start)
            toks.append(_Tok("ident", word, start, j))
            i = j
        elif "0" <= c <= "9" or (c == "." and i + 1 < n and "0" <= text[i + 1] <= "9"):
            m = _NUMBER.match(text, i)
            assert m is not None  # a digit, or '.' and a digit, always matches
            i = m.end()
            if i < n and _ident_char(text[i]):
                raise WhereClauseError("trailing junk after numeric literal", start)
            _check_number(m.group(), start)
            toks.append(_Tok("number", m.group(), start, i))
        elif c == "$":
            j = i + 1
            while j < n and "0" <= text[j] <= "9":
                j += 1
            digits = text[i + 1 : j]
            if not digits:
                raise WhereClauseError("dollar-quoted strings are not supported; use '...'", start)
            if j < n and _ident_char(text[j]):
                raise WhereClauseError("trailing junk after parameter", start)
            if len(digits) > 3 or not 1 <= int(digits) <= MAX_PARAM:
                raise WhereClauseError(f"parameters are numbered from $1 to ${MAX_PARAM}, not {text[i:j]}", start)
            toks.append(_Tok("param", str(int(digits)), start, j))
            i = j
        elif c in "()[],":
            toks.append(_Tok("punct", c, start, i + 1))
            i += 1
        elif c == ":" and text.startswith("::", i):
            toks.append(_Tok("punct", "::", start, i + 2))
            i += 2
        elif c in _OP_CHARS:
            j = i
            while j < n and text[j] in _OP_CHARS:
                j += 1
            run = text[i:j]
            comment = min((k for k in (run.find("--"), run.find("/*")) if k >= 0), default=-1)
            if comment >= 0:
                raise WhereClauseError("comments are not allowed in a where clause", i + comment)
            if len(run) > 1 and run[-1] in "+-" and not _OP_SPECIAL.intersection(run):
                run = run.rstrip("+-") or run[0]  # 'a=-1' is '=' then '-1', as in PostgreSQL
            op = "<>" if run == "!=" else run
            if op not in _OP_PREC:
                raise WhereClauseError(f"operator {echo(run)} is not supported", start)
            toks.append(_Tok("op", op, start, i + len(run)))
            i += len(run)
        elif c == ";":
            raise WhereClauseError("a where clause is one expression: ';' is not allowed", start)
        elif c == ".":
            raise WhereClauseError("qualified names (a.b) are not supported; name the column alone", start)
        else:
            raise WhereClauseError(f"unexpected character {echo(c)}", start)
    toks.append(_Tok("eof", "", n, n))
    return toks


# ---------------------------------------------------------------------------------------------------------------
# Parser: precedence climbing over PostgreSQL's operator precedence table


_NEGATABLE = ("like", "ilike", "in", "between")


def _is_bool(node: Node, op: str) -> TypeGuard[BoolOp]:
    return isinstance(node, BoolOp) and node.op == op


class _Parser:
    def __init__(self, text: str, toks: list[_Tok]) -> None:
        self.text = text
        self.toks = toks
        self.i = 0
        self.depth = 0

    # -- token helpers
    def peek(self, ahead: int = 0) -> _Tok:
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def advance(self) -> _Tok:
        tok = self.toks[self.i]
        if tok.kind != "eof":
            self.i += 1
        return tok

    def is_kw(self, word: str) -> bool:
        return self.peek().kind == "ident" and self.peek().value == word

    def is_punct(self, value: str) -> bool:
        return self.peek().kind == "punct" and self.peek().value == value

    def expect_punct(self, value: str) -> _Tok:
        if not self.is_punct(value):
            raise self.unexpected(self.peek(), f"expected {value!r}")
        return self.advance()

    def expect_kw(self, word: str) -> None:
        if not self.is_kw(word):
            raise self.unexpected(self.peek(), f"expected {word.upper()}")
        self.advance()

    def unexpected(self, tok: _Tok, hint: str = "") -> WhereClauseError:
        suffix = f" ({hint})" if hint else ""
        if tok.kind == "eof":
            return WhereClauseError(f"unexpected end of where clause{suffix}", tok.pos)
        return WhereClauseError(f"syntax error at or near {echo(self.text[tok.pos : tok.end])}{suffix}", tok.pos)

    # -- grammar
    def parse(self) -> Node:
        node = self.expr(0)
        tok = self.peek()
        if tok.kind != "eof":
            hint = "unbalanced parenthesis" if tok.value == ")" and tok.kind == "punct" else ""
            raise self.unexpected(tok, hint)
        return node

    def expr(self, min_prec: int) -> Node:
        self.depth += 1
        if self.depth > _MAX_PARSE_DEPTH:
            raise WhereClauseError("expression is nested too deeply", self.peek().pos)
        try:
            return self._expr(min_prec)
        finally:
            self.depth -= 1

    def _expr(self, min_prec: int) -> Node:
        left = self.operand()
        last_nonassoc = 0
        while True:
            tok = self.peek()
            negated = False
            if tok.kind == "op":
                prec, op = _OP_PREC[tok.value], tok.value
            elif tok.kind != "ident":
                return left
            elif tok.value in ("or", "and"):
                prec, op = (_OR if tok.value == "or" else _AND), tok.value.upper()
            elif tok.value in ("is", "isnull", "notnull"):
                prec, op = _IS, tok.value
            elif tok.value in _NEGATABLE:
                prec, op = _LIKE, tok.value
            elif tok.value == "not" and self.peek(1).kind == "ident" and self.peek(1).value in _NEGATABLE:
                prec, op, negated = _LIKE, self.peek(1).value, True
            elif tok.value in ("similar", "collate", "at", "overlaps"):
                raise WhereClauseError(f"{tok.value.upper()} is not supported", tok.pos)
            else:
                return left
            if prec < min_prec:
                return left
            if prec in (_CMP, _LIKE) and prec == last_nonassoc:
                raise WhereClauseError("comparisons cannot be chained; add parentheses", tok.pos)
            self.advance()
            if negated:
                self.advance()
            if prec in (_CMP, _LIKE):
                last_nonassoc = prec
            left = self.infix(left, op, prec, negated, tok.pos)

    def infix(self, left: Node, op: str, prec: int, negated: bool, pos: int) -> Node:
        if op in ("AND", "OR"):
            right = self.expr(prec + 1)
            args = [a for side in (left, right) for a in (side.args if _is_bool(side, op) else (side,))]
            return BoolOp(op, tuple(args), pos)
        if op in ("isnull", "notnull"):
            return IsTest(left, "NULL", op == "notnull", pos)
        if op == "is":
            is_not = self.is_kw("not")
            if is_not:
                self.advance()
            tok = self.advance()
            if tok.kind == "ident" and tok.value in ("null", "true", "false", "unknown"):
                return IsTest(left, tok.value.upper(), is_not, pos)
            if tok.kind == "ident" and tok.value == "distinct":
                self.expect_kw("from")
                return IsDistinct(left, self.expr(_IS + 1), is_not, pos)
            raise self.unexpected(tok, "supported: IS [NOT] NULL|TRUE|FALSE|UNKNOWN|DISTINCT FROM")
        if op in ("like", "ilike"):
            right = self.expr(_LIKE + 1)
            if self.is_kw("escape"):
                raise WhereClauseError("LIKE ... ESCAPE is not supported", self.peek().pos)
            return Binary(("NOT " if negated else "") + op.upper(), left, right, pos)
        if op == "in":
            self.enter()
            self.expect_punct("(")
            if self.is_punct(")"):
                raise WhereClauseError("IN () needs at least one value", self.peek().pos)
            items = [self.expr(0)]
            while self.is_punct(","):
                self.advance()
                items.append(self.expr(0))
            self.expect_punct(")")
            self.depth -= 1
            return InList(left, tuple(items), negated, pos)
        if op == "between":
            symmetric = self.is_kw("symmetric")
            if symmetric or self.is_kw("asymmetric"):
                self.advance()
            low = self.expr(_LIKE + 1)
            self.expect_kw("and")
            return Between(left, low, self.expr(_LIKE + 1), negated, symmetric, pos)
        if prec == _CMP and self.peek().kind == "ident" and self.peek().value in ("any", "some", "all"):
            quantifier = "ALL" if self.advance().value == "all" else "ANY"
            self.enter()
            self.expect_punct("(")
            right = self.expr(0)
            self.expect_punct(")")
            self.depth -= 1
            return AnyAll(left, op, quantifier, right, pos)
        return Binary(op, left, self.expr(prec + 1), pos)

    def enter(self) -> None:
        """Count a syntactic nesting level that does not pass through expr() (so cannot recurse unbounded)."""
        self.depth += 1
        if self.depth > _MAX_PARSE_DEPTH:
            raise WhereClauseError("expression is nested too deeply", self.peek().pos)

    def operand(self) -> Node:
        tok = self.peek()
        if tok.kind == "op" and tok.value in ("-", "+"):
            self.advance()
            return Unary(tok.value, self.expr(_UNARY), tok.pos)
        if tok.kind == "ident" and tok.value == "not":
            self.advance()
            return Not(self.expr(_NOT), tok.pos)
        node = self.primary()
        while True:
            if self.is_punct("::"):
                pos = self.advance().pos
                node = Cast(node, self.type_name(allow_array=True), pos)
            elif self.is_punct("["):
                raise WhereClauseError("array subscripts are not supported", self.peek().pos)
            else:
                return node

    def primary(self) -> Node:
        tok = self.advance()
        kind, value, pos = tok.kind, tok.value, tok.pos
        if kind == "number":
            return Number(value, pos)
        if kind == "string":
            return String(value, pos)
        if kind == "param":
            return Param(int(value), pos)
        if kind == "punct" and value == "(":
            node = self.expr(0)
            if self.is_punct(","):
                raise WhereClauseError("row values (a, b) are not supported", self.peek().pos)
            self.expect_punct(")")
            return node
        if kind == "qident":
            if self.is_punct("("):
                raise WhereClauseError("quoted function names are not supported", pos)
            return Column(value, pos)
        if kind != "ident":
            raise self.unexpected(tok)
        if value in ("true", "false"):
            return Boolean(value == "true", pos)
        if value == "null":
            return Null(pos)
        if value == "array":
            if self.is_punct("("):
                raise WhereClauseError("subqueries are not supported", pos)
            return self.array_body(pos)
        if value == "cast":
            self.enter()
            self.expect_punct("(")
            inner = self.expr(0)
            self.expect_kw("as")
            type_name = self.type_name(allow_array=True)
            self.expect_punct(")")
            self.depth -= 1
            return Cast(inner, type_name, pos)
        if value in _RESERVED:
            if value in ("select", "with", "values", "table", "exists"):
                raise WhereClauseError("subqueries are not supported", pos)
            if value in _NONDETERMINISTIC_WORDS:
                raise WhereClauseError(f"non-deterministic {value.upper()} is not allowed in a shape", pos)
            if value == "case":
                raise WhereClauseError("CASE expressions are not supported", pos)
            raise self.unexpected(tok)
        if value in _TYPE_WORDS and (literal := self.typed_literal(pos)) is not None:
            return literal
        if self.is_punct("("):
            return self.call(value, pos)
        return Column(value, pos)

    def typed_literal(self, pos: int) -> Cast | None:
        """``date '2024-01-01'`` and friends; None (and nothing consumed) when the type word is a column name."""
        start = self.i - 1
        self.i = start
        try:
            type_name = self.type_name(allow_array=False)
        except WhereClauseError:
            type_name = None
        if type_name is None or self.peek().kind != "string":
            self.i = start + 1
            return None
        tok = self.advance()
        return Cast(String(tok.value, tok.pos), type_name, pos)

    def call(self, name: str, pos: int) -> FuncCall:
        self.enter()
        self.expect_punct("(")
        args: list[Node] = []
        if (self.peek().kind == "op" and self.peek().value == "*") or self.is_kw("distinct") or name in _AGGREGATES:
            raise WhereClauseError("aggregate functions are not supported", pos)
        if not self.is_punct(")"):
            args.append(self.expr(0))
            while self.is_punct(","):
                self.advance()
                args.append(self.expr(0))
        self.expect_punct(")")
        self.depth -= 1
        if name in _NONDETERMINISTIC:
            raise WhereClauseError(f"non-deterministic function {name}() is not allowed in a shape", pos)
        if len(args) not in _FUNCTIONS.get(name, ()):
            raise WhereClauseError(f"unknown or unsupported function {name}/{len(args)}", pos)
        return FuncCall(name, tuple(args), pos)

    def array_body(self, pos: int) -> ArrayExpr:
        self.enter()
        self.expect_punct("[")
        items: list[Node] = []
        nested = self.is_punct("[")
        while not self.is_punct("]"):
            if items:
                self.expect_punct(",")
            if self.is_punct("[") != nested:
                raise self.unexpected(self.peek(), "mix of sub-arrays and values")
            items.append(self.array_body(self.peek().pos) if nested else self.expr(0))
        self.advance()
        self.depth -= 1
        return ArrayExpr(tuple(items), pos)

    def type_name(self, *, allow_array: bool) -> TypeName:
        tok = self.advance()
        if tok.kind != "ident":
            raise self.unexpected(tok, "expected a type name; quoted and qualified type names are not supported")
        word, name = tok.value, ""
        if word == "double":
            self.expect_kw("precision")
            name = "float8"
        elif word in ("character", "char"):
            name = "varchar" if self.is_kw("varying") else "character"
            if name == "varchar":
                self.advance()
        elif word in ("time", "timestamp", "timetz"):
            name = word
        elif word == "float":
            mods = self.modifiers()
            if len(mods) > 1 or (mods and not 1 <= mods[0] <= 53):
                raise WhereClauseError("float(p) needs a precision between 1 and 53", tok.pos)
            name = "float4" if mods and mods[0] <= 24 else "float8"
        else:
            name = _TYPES.get(word, "")
        if not name:
            raise WhereClauseError(f"type {word} is not supported", tok.pos)
        mods = self.modifiers() if word != "float" else ()
        if mods and name not in _TYPES_WITH_MODIFIERS:
            raise WhereClauseError(f"type {name} takes no modifiers", tok.pos)
        if word in ("time", "timestamp") and self.peek().kind == "ident" and self.peek().value in ("with", "without"):
            with_zone = self.advance().value == "with"
            self.expect_kw("time")
            self.expect_kw("zone")
            name = word + ("tz" if with_zone else "")
        if name == "timetz":
            raise WhereClauseError("type timetz (time with time zone) is not supported", tok.pos)
        dims = 0
        while allow_array and self.is_punct("["):
            self.advance()
            if self.peek().kind == "number" and self.peek().value.isdigit():
                self.advance()
            self.expect_punct("]")
            dims += 1
            if dims > _MAX_ARRAY_DIMS:
                raise WhereClauseError(f"arrays have at most {_MAX_ARRAY_DIMS} dimensions", tok.pos)
        return TypeName(name, mods, dims)

    def modifiers(self) -> tuple[int, ...]:
        if not self.is_punct("("):
            return ()
        self.advance()
        mods: list[int] = []
        while True:
            tok = self.advance()
            if tok.kind != "number" or not tok.value.isdigit() or len(tok.value) > 6 or len(mods) == 2:
                raise self.unexpected(tok, "type modifiers are one or two integers")
            mods.append(int(tok.value))
            if not self.is_punct(","):
                break
            self.advance()
        self.expect_punct(")")
        return tuple(mods)


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def parse_where(text: str) -> WhereClause:
    """Parse a Shape API where clause; raise :class:`WhereClauseError` for anything outside the subset."""
    if len(text) > MAX_LENGTH:
        raise WhereClauseError(f"where clause is longer than {MAX_LENGTH} characters", MAX_LENGTH)
    if (nul := text.find("\x00")) >= 0:
        raise WhereClauseError("NUL character in where clause", nul)
    try:
        text.encode()
    except UnicodeEncodeError as exc:  # lone surrogates (e.g. from a lenient URL decoder) cannot reach PostgreSQL
        raise WhereClauseError("where clause is not valid Unicode", exc.start) from None
    if not text.strip(_WS):
        raise WhereClauseError("where clause is empty", 0)
    parser = _Parser(text, _tokenize(text))
    try:
        node = parser.parse()
    except RecursionError:  # a backstop: the depth guard should always stop first, but a crash is never an answer
        raise WhereClauseError("expression is nested too deeply", parser.peek().pos) from None
    columns: set[str] = set()
    params: set[int] = set()
    count = 0
    cost = 0
    stack: list[tuple[Node, int]] = [(node, 1)]
    while stack:
        current, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise WhereClauseError(f"where clause has more than {MAX_NODES} terms", current.pos)
        if depth > MAX_DEPTH:
            raise WhereClauseError(f"where clause is nested more than {MAX_DEPTH} levels deep", current.pos)
        if isinstance(current, Column):
            columns.add(current.name)
        elif isinstance(current, Param):
            params.add(current.number)
        cost += _node_cost(current)
        if cost > MAX_COST:
            raise WhereClauseError(
                f"where clause is too expensive (more than {MAX_COST} units of * || ^ and array functions, "
                "^ counting 8)",
                current.pos,
            )
        stack.extend((child, depth + 1) for child in children(current))
    return WhereClause(text, node, frozenset(columns), frozenset(params))


def _node_cost(node: Node) -> int:
    """The cost budget's price of one node (see MAX_COST); raises for a power whose exponent is not bounded."""
    if isinstance(node, Binary):
        if node.op == "^":
            exponent = node.right
            if isinstance(exponent, Unary) and isinstance(exponent.operand, Number):
                exponent = exponent.operand
            if not isinstance(exponent, Number) or abs(float(exponent.text)) > MAX_EXPONENT:
                raise WhereClauseError(
                    f"the exponent of ^ must be a number literal between -{MAX_EXPONENT} and {MAX_EXPONENT}", node.pos
                )
        return _COST.get(node.op, 0)
    if isinstance(node, FuncCall):
        return _COSTLY_FUNCTIONS.get(node.name, 0)
    return 0


# Rendering goes through a flat list of pieces, so render_sql and render_text share one traversal and params
# come out strictly left to right. A piece is SQL text we wrote ourselves, or a leaf the two renderers differ on.
_Piece: TypeAlias = str | Column | Param | String


def _type_sql(t: TypeName) -> str:
    mods = f"({','.join(map(str, t.modifiers))})" if t.modifiers else ""
    # The SQL-standard spelling always takes a precision; "timestamptz(3)" depends on the server's grammar.
    text = f"timestamp{mods} with time zone" if t.name == "timestamptz" and mods else t.name + mods
    return text + "[]" * t.array_dims


def _pieces(node: Node, out: list[_Piece], for_psycopg: bool) -> None:
    def join(head: str, nodes: Iterable[Node], sep: str, tail: str) -> None:
        out.append(head)
        for index, child in enumerate(nodes):
            if index:
                out.append(sep)
            _pieces(child, out, for_psycopg)
        out.append(tail)

    match node:
        case Column() | Param() | String():
            out.append(node)
        case Number(text=text):
            out.append(text)
        case Boolean(value=value):
            out.append("true" if value else "false")
        case Null():
            out.append("NULL")
        case Cast(expr=e, type=t):
            join("CAST(", (e,), "", f" AS {_type_sql(t)})")
        case Unary(op=op, operand=e):
            join(f"({op}", (e,), "", ")")
        case Binary(op="%", left=a, right=b) if for_psycopg:
            # psycopg treats every '%' in a query run with parameters as a placeholder marker; mod() is the same
            # function the operator calls (int2/int4/int8/numeric), so no '%' ever reaches the query text.
            join("pg_catalog.mod(", (a, b), ", ", ")")
        case Binary(op=op, left=a, right=b):
            join("(", (a, b), f" {op} ", ")")
        case BoolOp(op=op, args=args):
            join("(", args, f" {op} ", ")")
        case Not(arg=e):
            join("(NOT ", (e,), "", ")")
        case IsTest(arg=e, test=test, negated=negated):
            join("(", (e,), "", f" IS {'NOT ' if negated else ''}{test})")
        case IsDistinct(left=a, right=b, negated=negated):
            join("(", (a, b), f" IS {'NOT ' if negated else ''}DISTINCT FROM ", ")")
        case InList(arg=e, items=items, negated=negated):
            join("(", (e,), "", f" {'NOT ' if negated else ''}IN ")
            join("(", items, ", ", "))")
        case Between(arg=e, low=lo, high=hi, negated=negated, symmetric=symmetric):
            join("(", (e,), "", f" {'NOT ' if negated else ''}BETWEEN {'SYMMETRIC ' if symmetric else ''}")
            join("", (lo, hi), " AND ", ")")
        case AnyAll(left=a, op=op, quantifier=q, right=b):
            join("(", (a,), "", f" {op} {q} ")
            join("(", (b,), "", "))")
        case ArrayExpr(items=items):
            join("ARRAY[", items, ", ", "]")
        case FuncCall(name=name, args=args):
            # Qualified for psycopg so a function planted in the search_path cannot shadow the built-in.
            join(f"{'pg_catalog.' if for_psycopg else ''}{name}(", args, ", ", ")")


def _string_sql(value: str) -> str:
    """A string constant that means the same whatever ``standard_conforming_strings`` is and holds no '%'.

    Plain ``'...'`` is used when it contains neither a backslash nor '%'. Otherwise ``U&'...'`` with both
    written as Unicode escapes: with standard_conforming_strings off, PostgreSQL refuses U& strings outright
    rather than reading a backslash as an escape (so a value can never end the string early), and no '%' is left
    for psycopg to take for a placeholder.
    """
    if "\\" not in value and "%" not in value:
        return "'" + value.replace("'", "''") + "'"
    escaped = value.replace("'", "''").replace("\\", "\\\\").replace("%", "\\0025")
    return "U&'" + escaped + "'"


def render_sql(
    clause: WhereClause | Node,
    *,
    column: Callable[[str], sql.Composable],
    param: Callable[[int], sql.Composable],
) -> sql.Composable:
    """The clause as psycopg SQL, fully parenthesised so precedence never depends on the surrounding query.

    ``column(name)`` renders each column reference (the caller decides qualification, e.g.
    ``sql.SQL("t.") + sql.Identifier(name)``). ``param(n)`` is called once per occurrence of ``$n``, in
    left-to-right order of the rendered SQL, so a caller returning ``sql.Placeholder()`` appends
    ``params[n]`` to its value list on each call. Literals are escaped here; the output contains no '%' of its
    own, so it runs the same with or without query parameters (a '%' in a caller's identifier is the caller's).
    Functions are ``pg_catalog``-qualified; operators and types still resolve through the search_path, so run
    it with a search_path that does not put an untrusted schema before ``pg_catalog`` (PostgreSQL's default).
    """
    pieces: list[_Piece] = []
    _pieces(clause.node if isinstance(clause, WhereClause) else clause, pieces, True)
    parts: list[sql.Composable] = []
    text: list[str] = []
    for piece in pieces:
        if isinstance(piece, str):
            text.append(piece)
            continue
        if isinstance(piece, String):
            text.append(_string_sql(piece.value))
            continue
        if text:
            parts.append(sql.SQL("".join(text)))
            text.clear()
        parts.append(column(piece.name) if isinstance(piece, Column) else param(piece.number))
    if text:
        parts.append(sql.SQL("".join(text)))
    return sql.Composed(parts)


def render_text(clause: WhereClause, *, param_offset: int = 0) -> str:
    """Canonical where text, e.g. to forward to a real Electric server.

    Identifiers are always double-quoted (so case and keywords survive), strings single-quoted with ''
    escaping, ``$n`` becomes ``$(n + param_offset)`` (to append this clause's params after others), and every
    operator is parenthesised. ``parse_where(render_text(c))`` has the same AST, so it renders the same text.
    """
    pieces: list[_Piece] = []
    _pieces(clause.node, pieces, False)
    out: list[str] = []
    for piece in pieces:
        if isinstance(piece, str):
            out.append(piece)
        elif isinstance(piece, Column):
            out.append(quote_ident(piece.name))
        elif isinstance(piece, Param):
            out.append(f"${piece.number + param_offset}")
        else:
            out.append("'" + piece.value.replace("'", "''") + "'")
    return "".join(out)


_PARAM_KEY = re.compile(r"[0-9]+")


def parse_params(items: Iterable[tuple[str, str]], *, name: str = "params") -> dict[int, str]:
    """The ``$n`` values from raw query items: ``params[1]=a&params[2]=b``.

    Also accepted: ``params=<JSON>``, an object (``{"1": "a"}``) or an array (``["a"]``, numbered from 1), which
    is how ``@electric-sql/client`` sends ``subset__params`` (pass ``name="subset__params"`` for those).
    Electric stringifies JSON numbers and booleans, and so does this. Other query items are ignored.
    Raises ProtocolError(field=name) for bad keys, numbers, duplicates, and values PostgreSQL cannot take.
    """
    result: dict[int, str] = {}

    def put(key: str, value: object) -> None:
        if not _PARAM_KEY.fullmatch(key):
            raise ProtocolError(name, "Parameters can only use numbers as keys")
        if len(key) > 3 or not 1 <= int(key) <= MAX_PARAM:
            raise ProtocolError(name, f"parameters are numbered from 1 to {MAX_PARAM}, not {echo(key)}")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int | float):
            value = json.dumps(value)
        if not isinstance(value, str):
            raise ProtocolError(name, f"the value of parameter {int(key)} must be a string")
        if "\x00" in value:
            raise ProtocolError(name, f"the value of parameter {int(key)} contains a NUL character")
        if len(value) > MAX_PARAM_LENGTH:
            raise ProtocolError(name, f"the value of parameter {int(key)} is longer than {MAX_PARAM_LENGTH} characters")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ProtocolError(name, f"the value of parameter {int(key)} is not valid Unicode") from None
        if int(key) in result:
            raise ProtocolError(name, f"parameter {int(key)} is given more than once")
        result[int(key)] = value

    prefix = name + "["
    for key, value in items:
        if key == name:
            try:
                decoded = json.loads(value)
            except (ValueError, RecursionError):
                raise ProtocolError(name, "must be a JSON object or array, or given as params[n]=value") from None
            if isinstance(decoded, list):
                for index, item in enumerate(decoded, start=1):
                    put(str(index), item)
            elif isinstance(decoded, dict):
                for json_key, item in decoded.items():
                    put(json_key, item)
            else:
                raise ProtocolError(name, "must be a JSON object or array, or given as params[n]=value")
        elif key.startswith(prefix) and key.endswith("]"):
            put(key[len(prefix) : -1], value)
    return result


def check_params(clause: WhereClause, params: Mapping[int, str]) -> None:
    """Electric's rules: params are numbered 1..n without gaps, and every ``$n`` the clause uses has a value.

    A value the clause does not use is accepted when the numbering has no gap, as Electric accepts it
    (``Electric.Shapes.Shape.Validators.validate_parameters`` checks only the keys).
    """
    if sorted(params) != list(range(1, len(params) + 1)):
        raise WhereClauseError("Parameters must be numbered sequentially, starting from 1", field="params")
    missing = clause.params - params.keys()
    if missing:
        number = min(missing)
        pos = next(node.pos for node in walk(clause.node) if isinstance(node, Param) and node.number == number)
        raise WhereClauseError(f"parameter ${number} was not provided", pos, field="params")
