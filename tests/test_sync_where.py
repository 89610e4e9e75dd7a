"""pgferry.sync.where: the Shape API where-clause parser and its SQL renderers.

Most tests are pure. The last ones run rendered SQL on real PostgreSQL servers and check the selected rows, so
"the AST means what PostgreSQL means" is checked by PostgreSQL itself, not by our reading of its grammar.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from pgferry.sync.errors import ProtocolError, WhereClauseError
from pgferry.sync.where import (
    MAX_LENGTH,
    AnyAll,
    ArrayExpr,
    Between,
    Binary,
    Boolean,
    BoolOp,
    Cast,
    Column,
    FuncCall,
    InList,
    IsDistinct,
    IsTest,
    Not,
    Null,
    Number,
    Param,
    String,
    TypeName,
    Unary,
    WhereClause,
    check_params,
    parse_params,
    parse_where,
    render_sql,
    render_text,
    walk,
)


def sql_of(clause: WhereClause) -> str:
    return render_sql(clause, column=sql.Identifier, param=lambda n: sql.SQL(f"<{n}>")).as_string(None)


def roundtrip(text: str) -> str:
    rendered = render_text(parse_where(text))
    assert render_text(parse_where(rendered)) == rendered
    assert parse_where(rendered).node == parse_where(text).node
    return rendered


# -- precedence and structure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a OR b AND c", '("a" OR ("b" AND "c"))'),
        ("(a OR b) AND c", '(("a" OR "b") AND "c")'),
        ("a AND b OR c AND d", '(("a" AND "b") OR ("c" AND "d"))'),
        ("a OR b OR c", '("a" OR "b" OR "c")'),
        ("NOT a AND b", '((NOT "a") AND "b")'),
        ("NOT a = b", '(NOT ("a" = "b"))'),
        ("a = NOT b", '("a" = (NOT "b"))'),
        ("a = b IS NULL", '(("a" = "b") IS NULL)'),
        ("1 + 2 * 3", "(1 + (2 * 3))"),
        ("1 - 2 - 3", "((1 - 2) - 3)"),
        ("2 ^ 3 ^ 2", "((2 ^ 3) ^ 2)"),
        ("-2 ^ 2", "((-2) ^ 2)"),
        ("-x::int", '(-CAST("x" AS int4))'),
        ("a || b = c || d", '(("a" || "b") = ("c" || "d"))'),
        ("a + 1 || b", '(("a" + 1) || "b")'),
        ("a LIKE b = c", '(("a" LIKE "b") = "c")'),
        ("x=-1", '("x" = (-1))'),
        ("x<>-1 and y!=2", '(("x" <> (-1)) AND ("y" <> 2))'),
        ("a*-b", '("a" * (-"b"))'),
        ("((((a))))", '"a"'),
        ("x BETWEEN 1 AND 2 AND y", '(("x" BETWEEN 1 AND 2) AND "y")'),
    ],
)
def test_precedence(text: str, expected: str) -> None:
    assert render_text(parse_where(text)) == expected
    roundtrip(text)


def test_ast_of_every_construct() -> None:
    def node(text: str) -> object:
        return parse_where(text).node

    assert node("a OR b AND c") == BoolOp("OR", (Column("a"), BoolOp("AND", (Column("b"), Column("c")))))
    assert node("x = $1") == Binary("=", Column("x"), Param(1))
    assert node("x <> 1.5e3") == Binary("<>", Column("x"), Number("1.5e3"))
    assert node("x = 'it''s'") == Binary("=", Column("x"), String("it's"))
    assert node("x = true OR y IS NULL") == BoolOp(
        "OR", (Binary("=", Column("x"), Boolean(True)), IsTest(Column("y"), "NULL", False))
    )
    assert node("x IS NOT DISTINCT FROM NULL") == IsDistinct(Column("x"), Null(), True)
    assert node("x NOT IN (1, $2)") == InList(Column("x"), (Number("1"), Param(2)), True)
    assert node("x NOT BETWEEN SYMMETRIC 1 AND 2") == Between(Column("x"), Number("1"), Number("2"), True, True)
    assert node("x = ANY ($1)") == AnyAll(Column("x"), "=", "ANY", Param(1))
    assert node("x < SOME (y)") == AnyAll(Column("x"), "<", "ANY", Column("y"))
    assert node("x >= ALL (ARRAY[1, 2])") == AnyAll(Column("x"), ">=", "ALL", ArrayExpr((Number("1"), Number("2"))))
    assert node("t @> ARRAY[[1], [2]]") == Binary(
        "@>", Column("t"), ArrayExpr((ArrayExpr((Number("1"),)), ArrayExpr((Number("2"),))))
    )
    assert node("lower(name) ILIKE 'a%'") == Binary("ILIKE", FuncCall("lower", (Column("name"),)), String("a%"))
    assert node("name NOT LIKE 'a%'") == Binary("NOT LIKE", Column("name"), String("a%"))
    assert node("NOT x IS TRUE") == Not(IsTest(Column("x"), "TRUE", False))
    assert node("-x") == Unary("-", Column("x"))
    assert node("x::text") == Cast(Column("x"), TypeName("text"))
    assert node("CAST(x AS numeric(10, 2)[])") == Cast(Column("x"), TypeName("numeric", (10, 2), 1))
    assert node("date '2024-01-01'") == Cast(String("2024-01-01"), TypeName("date"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x::double precision", 'CAST("x" AS float8)'),
        ("x::character varying(10)", 'CAST("x" AS varchar(10))'),
        ("x::char varying", 'CAST("x" AS varchar)'),
        ("x::char(3)", 'CAST("x" AS character(3))'),
        ("x::character", 'CAST("x" AS character)'),
        ("x::timestamp with time zone", 'CAST("x" AS timestamptz)'),
        ("x::timestamp(3) with time zone", 'CAST("x" AS timestamp(3) with time zone)'),
        ("x::timestamp without time zone", 'CAST("x" AS timestamp)'),
        ("x::time(2)", 'CAST("x" AS time(2))'),
        ("x::integer[][]", 'CAST("x" AS int4[][])'),
        ("x::int[3]", 'CAST("x" AS int4[])'),
        ("x::BIGINT", 'CAST("x" AS int8)'),
        ("x::float(10)", 'CAST("x" AS float4)'),
        ("x::float", 'CAST("x" AS float8)'),
        ("x::boolean", 'CAST("x" AS bool)'),
        ("x::uuid", 'CAST("x" AS uuid)'),
        ("timestamptz '2024-01-01 00:00Z' < ts", "(CAST('2024-01-01 00:00Z' AS timestamptz) < \"ts\")"),
        ("timestamp with time zone '2024-01-01Z' < ts", "(CAST('2024-01-01Z' AS timestamptz) < \"ts\")"),
        ("interval '1 day' > i", "(CAST('1 day' AS interval) > \"i\")"),
        ("double precision '1.5' = d", "(CAST('1.5' AS float8) = \"d\")"),
        ("varchar(3) 'abcd' = v", "(CAST('abcd' AS varchar(3)) = \"v\")"),
        # type words are column names when no string follows
        ("date > '2024-01-01'", "(\"date\" > '2024-01-01')"),
        ("text = interval", '("text" = "interval")'),
        ("double = 1", '("double" = 1)'),
    ],
)
def test_types(text: str, expected: str) -> None:
    assert render_text(parse_where(text)) == expected
    roundtrip(text)


def test_case_folding_and_quoting() -> None:
    clause = parse_where('Name = 1 AND "Name" = 2 AND "a""b" = 3 AND "select" = 4 AND ÄBC = 5 AND a$b = 6')
    assert clause.columns == frozenset({"name", "Name", 'a"b', "select", "Äbc", "a$b"})
    assert render_text(clause) == (
        '(("name" = 1) AND ("Name" = 2) AND ("a""b" = 3) AND ("select" = 4) AND ("Äbc" = 5) AND ("a$b" = 6))'
    )
    roundtrip('"we ird"" col" = 1')
    assert parse_where("LOWER(X) = 'a'").node == Binary("=", FuncCall("lower", (Column("x"),)), String("a"))


def test_columns_and_params_sets() -> None:
    clause = parse_where("a = $2 OR (b = $1 AND a IN ($2, c))")
    assert clause.columns == frozenset({"a", "b", "c"})
    assert clause.params == frozenset({1, 2})
    assert clause.text == "a = $2 OR (b = $1 AND a IN ($2, c))"
    assert parse_where("x = $01").params == frozenset({1})


def test_positions_are_recorded_but_ignored_by_equality() -> None:
    node = parse_where("  abc = $1").node
    assert isinstance(node, Binary)
    assert (node.pos, node.left.pos, node.right.pos) == (6, 2, 8)
    assert node == Binary("=", Column("abc"), Param(1))
    assert [type(n).__name__ for n in walk(node)] == ["Binary", "Column", "Param"]


# -- renderers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a OR b AND NOT c",
        "x = 'it''s' AND y = '\\n' AND z LIKE '50%'",
        "x IN (1, 2.5, -3, .5, 1e10, 'a') AND y NOT IN (NULL)",
        "tags && ARRAY['a'] OR tags <@ ARRAY[$1] OR tags @> $2::text[]",
        "x = ANY ($1) AND y <> ALL (ARRAY[1, 2])",
        "ts BETWEEN timestamptz '2024-01-01Z' AND now_col - interval '1 day'",
        "x IS NOT NULL AND y IS NOT TRUE AND z IS FALSE AND w IS UNKNOWN AND v IS DISTINCT FROM 1",
        "a % 2 = 0 AND b / 2 * 3 + 4 - 5 > 0 AND c ^ 2 < 10 AND (d & 1) = 1 AND (d | 2) > (d # 3)",
        "upper(name) || '!' = $1 AND array_ndims(t) = 1 AND justify_days(i) > interval '1 month'",
        "timezone('UTC', ts) < '2024-01-01' AND array_append(t, 'x') @> array_prepend('y', array_cat(t, t))",
        '"Mixed Case" = \'x\' AND "select" = 1',
        "NOT NOT x",
        "- - 1 = +1",
        "x = $3 AND y = $1",
    ],
)
def test_render_text_round_trip(text: str) -> None:
    roundtrip(text)


def test_render_text_param_offset() -> None:
    clause = parse_where("a = $1 OR b = $2 OR c = $1")
    assert render_text(clause, param_offset=3) == '(("a" = $4) OR ("b" = $5) OR ("c" = $4))'


def test_render_sql() -> None:
    clause = parse_where("a = $2 AND lower(b) LIKE 'x%' AND c % 2 = 1 AND d IN ($1, $2) AND e = 'a\\b'")
    assert sql_of(clause) == (
        '(("a" = <2>) AND (pg_catalog.lower("b") LIKE U&\'x\\0025\') AND (pg_catalog.mod("c", 2) = 1)'
        ' AND ("d" IN (<1>, <2>)) AND ("e" = U&\'a\\\\b\'))'
    )
    calls: list[int] = []

    def param(n: int) -> sql.Composable:
        calls.append(n)
        return sql.Placeholder()

    text = render_sql(clause, column=lambda name: sql.SQL("t.") + sql.Identifier(name), param=param).as_string(None)
    assert calls == [2, 1, 2]  # each occurrence, left to right
    assert text.startswith('((t."a" = %s) AND')
    assert "%" not in text.replace("%s", "")  # nothing else psycopg could take for a placeholder


# -- hostile input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1=1) OR (true", "At location 3: syntax error at or near ')'"),
        ("'; drop table x; --", "At location 0: unterminated string constant"),
        ("x = 1; select 1", "At location 5: a where clause is one expression"),
        ("x = 1 --", "At location 6: comments are not allowed"),
        ("x = 1 /* c */", "At location 6: comments are not allowed"),
        ("x = 'abc", "unterminated string constant"),
        ('"abc = 1', "unterminated quoted identifier"),
        ('"" = 1', "zero-length quoted identifier"),
        ("x = (select 1)", "subqueries are not supported"),
        ("x IN (SELECT y FROM t)", "subqueries are not supported"),
        ("EXISTS (SELECT 1)", "subqueries are not supported"),
        ("x = ARRAY(SELECT 1)", "subqueries are not supported"),
        ("pg_sleep(10) IS NULL", "non-deterministic function pg_sleep() is not allowed"),
        ("x < now()", "non-deterministic function now() is not allowed"),
        ("x < current_timestamp", "non-deterministic CURRENT_TIMESTAMP is not allowed"),
        ("user = 'x'", "non-deterministic USER is not allowed"),
        ("count(*) > 1", "aggregate functions are not supported"),
        ("sum(x) > 1", "aggregate functions are not supported"),
        ("lower(DISTINCT x) = 'a'", "aggregate functions are not supported"),
        ("coalesce(x, 1) = 1", "unknown or unsupported function coalesce/2"),
        ("lower(x, y) = 1", "unknown or unsupported function lower/2"),
        ("set_config('a', 'b', false) = 'b'", "unknown or unsupported function set_config/3"),
        ('"lower"(x) = 1', "quoted function names are not supported"),
        ("pg_catalog.lower(x) = 'a'", "qualified names (a.b) are not supported"),
        ("t.x = 1", "qualified names"),
        ("x = $0", "At location 4: parameters are numbered from $1 to $100, not $0"),
        ("x = $101", "not $101"),
        ("x = $1a", "trailing junk after parameter"),
        ("x = $$a$$", "dollar-quoted strings are not supported"),
        ("x = $tag$a$tag$", "dollar-quoted strings are not supported"),
        ("x = E'\\x41'", "E'...' string constants are not supported"),
        ("x = B'101'", "B'...' string constants are not supported"),
        ("x = U&'\\0041'", "U&'...' Unicode escapes are not supported"),
        ("x = 0x1F", "trailing junk after numeric literal"),
        ("x = 1_000", "trailing junk after numeric literal"),
        ("x ~ 'a'", "operator '~' is not supported"),
        ("x = 1 => 2", "operator '=>' is not supported"),
        ("x @@ y", "operator '@@' is not supported"),
        ("x SIMILAR TO 'a'", "SIMILAR is not supported"),
        ("x LIKE 'a' ESCAPE '!'", "LIKE ... ESCAPE is not supported"),
        ("x COLLATE \"C\" = 'a'", "COLLATE is not supported"),
        ("CASE WHEN x THEN 1 END = 1", "CASE expressions are not supported"),
        ("x::foo", "type foo is not supported"),
        ('x::"int4"', "quoted and qualified type names are not supported"),
        ("x::timetz", "type timetz (time with time zone) is not supported"),
        ("x::time with time zone", "type timetz"),
        ("x::int(3)", "type int4 takes no modifiers"),
        ("x::float(99)", "float(p) needs a precision between 1 and 53"),
        ("a[1] = 1", "array subscripts are not supported"),
        ("(a, b) = (1, 2)", "row values (a, b) are not supported"),
        ("a = b = c", "comparisons cannot be chained"),
        ("a < b > c", "comparisons cannot be chained"),
        ("x IN ()", "IN () needs at least one value"),
        ("x IN 1", "expected '('"),
        ("x IS 1", "supported: IS [NOT] NULL|TRUE|FALSE|UNKNOWN|DISTINCT FROM"),
        ("x BETWEEN 1 OR 2", "expected AND"),
        ("x = ANY y", "expected '('"),
        ("ARRAY[[1], 2]", "mix of sub-arrays and values"),
        ("x = 'a' 'b'", "syntax error at or near \"'b'\""),
        ("x = ", "At location 4: unexpected end of where clause"),
        ("x = 1 y", "syntax error at or near 'y'"),
        ("select", "At location 0: subqueries are not supported"),
        ("from = 1", "syntax error at or near 'from'"),
        ("", "At location 0: where clause is empty"),
        (" \n\t", "where clause is empty"),
        ("x = 'a\x00'", "At location 6: NUL character in where clause"),
        ("x = '\ud800'", "At location 5: where clause is not valid Unicode"),
        ("x = \x01", "unexpected character '\\x01'"),
        ("x = {1}", "unexpected character '{'"),
        ("x : y", "unexpected character ':'"),
        ("x = `a`", "operator '`' is not supported"),
        ("a" * 64 + " = 1", "identifier is longer than 63 bytes"),
    ],
)
def test_rejected(text: str, message: str) -> None:
    with pytest.raises(WhereClauseError) as info:
        parse_where(text)
    assert message in str(info.value)
    assert info.value.field == "where"
    assert info.value.problem.startswith("At location ")
    assert info.value.position is not None


@pytest.mark.parametrize(
    "text",
    [
        "(" * 10_000 + "x" + ")" * 10_000,
        "(" * 4000 + "x",
        "-" * 4000 + "1",
        "- " * 2000 + "1",
        "NOT " * 1000 + "x",
        "ARRAY" + "[" * 4000,
        "lower(" * 600 + "x",
        "x IN (" + "1," * 2040 + "1)",
        "a OR " * 800 + "a",
        "a + " * 1000 + "a",
        "x::int" * 600,
        "'" * 4097,
        "a" * 4097,
    ],
)
def test_huge_and_deep_input_fails_fast(text: str) -> None:
    started = time.perf_counter()
    with pytest.raises(WhereClauseError) as info:
        parse_where(text)
    assert time.perf_counter() - started < 1.0
    assert info.value.position is not None


def test_limits() -> None:
    with pytest.raises(WhereClauseError, match=f"At location {MAX_LENGTH}: where clause is longer than 4096"):
        parse_where("x = 1 AND " + "a" * 4087)
    parse_where("x = '" + "a" * 4090 + "'")  # 4096 exactly is fine
    with pytest.raises(WhereClauseError, match="more than 500 terms"):
        parse_where(" OR ".join(f"x = {i}" for i in range(200)))
    parse_where(" OR ".join(f"x = {i}" for i in range(150)))
    with pytest.raises(WhereClauseError, match="nested more than 64 levels deep"):
        parse_where("x" + " + 1" * 63 + " = 1")
    deep = "x" + " + 1" * 62  # AST depth 63 under the comparison: 64 in all
    roundtrip(deep + " = 1")
    roundtrip("(" * 200 + "x" + ")" * 200)  # redundant parentheses add no depth
    roundtrip("(" * 64 + "NOT " * 62 + "x" + ")" * 64)  # rendered text nests deeper than the input: still parses


# -- params ------------------------------------------------------------------------------------------------------


def test_parse_params() -> None:
    items = [("table", "t"), ("where", "x = $1"), ("params[1]", "a"), ("params[2]", "it's"), ("paramsx", "?")]
    assert parse_params(items) == {1: "a", 2: "it's"}
    assert parse_params([("params", '{"1": "a", "2": 5, "3": true}')]) == {1: "a", 2: "5", 3: "true"}
    assert parse_params([("params", '["a", "b"]')]) == {1: "a", 2: "b"}
    assert parse_params([("subset__params", '{"1": "x"}')], name="subset__params") == {1: "x"}
    assert parse_params([]) == {}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([("params[a]", "x")], "Parameters can only use numbers as keys"),
        ([("params[]", "x")], "Parameters can only use numbers as keys"),
        ([("params[-1]", "x")], "Parameters can only use numbers as keys"),
        ([("params[0]", "x")], "parameters are numbered from 1 to 100"),
        ([("params[101]", "x")], "parameters are numbered from 1 to 100"),
        ([("params[99999999999999999999]", "x")], "parameters are numbered from 1 to 100"),
        ([("params[1]", "a"), ("params[01]", "b")], "parameter 1 is given more than once"),
        ([("params[1]", "a"), ("params", '{"1": "b"}')], "parameter 1 is given more than once"),
        ([("params", "not json")], "must be a JSON object or array"),
        ([("params", '"x"')], "must be a JSON object or array"),
        ([("params", "[" * 100_000)], "must be a JSON object or array"),
        ([("params", '{"1": null}')], "the value of parameter 1 must be a string"),
        ([("params", '{"1": ["a"]}')], "the value of parameter 1 must be a string"),
        ([("params", '{"x": "a"}')], "Parameters can only use numbers as keys"),
        ([("params[1]", "a\x00")], "contains a NUL character"),
        ([("params[1]", "\udcff")], "is not valid Unicode"),
    ],
)
def test_parse_params_rejects(items: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_params(items)
    assert info.value.field == "params"
    assert message in str(info.value)


def test_check_params() -> None:
    clause = parse_where("a = $1 OR b = $2")
    check_params(clause, {1: "x", 2: "y"})
    check_params(clause, {1: "x", 2: "y", 3: "unused"})  # Electric accepts unused values numbered without gaps
    check_params(parse_where("a = 1"), {})
    with pytest.raises(WhereClauseError, match="At location 14: parameter \\$2 was not provided") as info:
        check_params(clause, {1: "x"})
    assert info.value.field == "params"
    with pytest.raises(WhereClauseError, match="Parameters must be numbered sequentially, starting from 1"):
        check_params(clause, {1: "x", 2: "y", 4: "z"})
    with pytest.raises(WhereClauseError, match="numbered sequentially"):
        check_params(parse_where("a = $2"), {2: "x"})


# -- on a real server: the rendered SQL selects the rows PostgreSQL itself would ------------------------------------

_ROWS = [
    # id, name, n, price, active, tags, born, ts, "Mixed Case", note
    (1, "alice", 10, "9.99", True, ["a", "b"], "2024-01-01", "2024-01-01 10:00+00", "X", "50% off"),
    (2, "Bob", 20, "19.50", False, ["b"], "2024-02-15", "2024-02-15 12:00+00", "y", "it's"),
    (3, "carol", None, "0", None, [], "2023-12-31", "2023-12-31 23:59+00", None, "back\\slash"),
    (4, "dave", -5, None, True, ["c", "a"], None, None, "X", None),
    (5, "Eve", 7, "100", False, None, "2024-03-01", "2024-03-01 00:00+00", "z", "%_%"),
]
_CASES: list[tuple[str, dict[int, str], list[int]]] = [
    ("n > 5 AND active", {}, [1]),
    ("n > 5 OR active AND price < 1", {}, [1, 2, 5]),
    ("(n > 5 OR active) AND price < 10", {}, [1]),
    ("NOT active", {}, [2, 5]),
    ("active IS NOT TRUE", {}, [2, 3, 5]),
    ("active IS UNKNOWN", {}, [3]),
    ("n IS NULL OR price ISNULL", {}, [3, 4]),
    ("name = $1", {1: "Bob"}, [2]),
    ("lower(name) = lower($1)", {1: "BOB"}, [2]),
    ("upper(name) LIKE 'E%' OR name ILIKE 'a%'", {}, [1, 5]),
    ("name NOT ILIKE $1", {1: "%o%"}, [1, 4, 5]),
    ("note LIKE '%\\%%'", {}, [1, 5]),
    ("note = 'it''s' OR note = 'back\\slash'", {}, [2, 3]),
    ("note = $1", {1: "back\\slash"}, [3]),
    ("n IN (10, 20, $1)", {1: "7"}, [1, 2, 5]),
    ("n NOT IN (10, 20)", {}, [4, 5]),
    ("n BETWEEN 0 AND 10", {}, [1, 5]),
    ("n NOT BETWEEN SYMMETRIC 10 AND 0", {}, [2, 4]),
    ("n % 2 = 0 AND n / 2 * 2 = n", {}, [1, 2]),
    ("-n > 0 OR n ^ 2 = 100", {}, [1, 4]),
    ("price >= 19.5 AND price::int < 100", {}, [2]),
    ("CAST(price AS double precision) > 5e1", {}, [5]),
    ("born > date '2024-01-01'", {}, [2, 5]),
    ("born >= $1 AND born < $2", {1: "2024-01-01", 2: "2024-02-16"}, [1, 2]),
    ("born BETWEEN '2024-01-01' AND '2024-12-31'", {}, [1, 2, 5]),
    ("ts - interval '1 day' > timestamptz '2024-02-01 00:00Z'", {}, [2, 5]),
    ("ts::timestamp(0) with time zone < $1", {1: "2024-01-02 00:00+00"}, [1, 3]),
    ("tags @> ARRAY['a']", {}, [1, 4]),
    ("tags && ARRAY['b', 'c']", {}, [1, 2, 4]),
    ("tags <@ $1", {1: "{a,b,c}"}, [1, 2, 3, 4]),
    ("'a' = ANY (tags)", {}, [1, 4]),
    ("n > ALL (ARRAY[5, 9])", {}, [1, 2]),
    ("array_ndims(tags) = 1 AND array_append(tags, 'z') @> ARRAY['z', 'b']", {}, [1, 2]),
    ("\"Mixed Case\" = 'X'", {}, [1, 4]),
    ("\"Mixed Case\" IS DISTINCT FROM 'X'", {}, [2, 3, 5]),
    ('"Mixed Case" IS NOT DISTINCT FROM $1', {1: "y"}, [2]),
    ("name || '!' = 'Eve!'", {}, [5]),
    ("n::text = '10' OR name::varchar(2) = 'da'", {}, [1, 4]),
    ("id = 1 OR (id = 2 AND NOT (n = 20 OR n IS NULL)) OR id = $2 AND name = $1", {1: "Eve", 2: "5"}, [1, 5]),
]


@pytest.fixture
def where_db(blank_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(blank_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text, n int, price numeric, active bool, tags text[], "
            'born date, ts timestamptz, "Mixed Case" text, note text)'
        )
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO items VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", _ROWS)
        yield conn


def _select(conn: psycopg.Connection[tuple[object, ...]], clause: WhereClause, params: dict[int, str]) -> list[int]:
    values: list[str] = []

    def param(n: int) -> sql.Composable:
        values.append(params[n])
        return sql.Placeholder()

    where = render_sql(clause, column=lambda name: sql.SQL("i.") + sql.Identifier(name), param=param)
    query = sql.SQL("SELECT i.id FROM items AS i WHERE {} ORDER BY i.id").format(where)
    return [row[0] for row in conn.execute(query, values if values else None).fetchall()]


@pytest.mark.slow
def test_rendered_sql_selects_expected_rows(where_db: psycopg.Connection[tuple[object, ...]]) -> None:
    for text, params, expected in _CASES:
        clause = parse_where(text)
        check_params(clause, params)
        assert _select(where_db, clause, params) == expected, text
        # The canonical text means the same thing to PostgreSQL as the original.
        assert _select(where_db, parse_where(render_text(clause)), params) == expected, text
        if not params:  # and PostgreSQL's own reading of the original text agrees with ours
            rows = where_db.execute(f"SELECT id FROM items WHERE {text} ORDER BY id").fetchall()
            assert [row[0] for row in rows] == expected, text


@pytest.mark.slow
def test_hostile_values_stay_values(where_db: psycopg.Connection[tuple[object, ...]]) -> None:
    evil = "x' OR '1'='1"
    assert _select(where_db, parse_where("name = $1"), {1: evil}) == []
    assert _select(where_db, parse_where("name = 'x'' OR ''1''=''1'"), {}) == []
    assert _select(where_db, parse_where("note = '50% off'"), {}) == [1]  # '%' survives psycopg's placeholders
    where_db.execute("SET standard_conforming_strings = off")
    with pytest.raises(psycopg.Error):  # U&'...' is refused, never misread, when backslashes would be escapes
        _select(where_db, parse_where("note = 'back\\slash'"), {})
    where_db.execute("RESET standard_conforming_strings")
    assert _select(where_db, parse_where("note = 'back\\slash'"), {}) == [3]


# -- cost budget ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('("priority"::numeric + 7.5) ^ 100000 < 0', "exponent of \\^ must be a number literal"),
        ("2.5 ^ priority > 0", "exponent of \\^ must be a number literal"),
        ("x ^ $1 > 0", "exponent of \\^ must be a number literal"),
        (" OR ".join(["((x::numeric + 7.5) ^ 2) < 0"] * 3), "too expensive"),
        ("x * " * 17 + "x > 0", "too expensive"),
        ("title" + " || title" * 17 + " = ''", "too expensive"),
        ("x * 1" + "0" * 40 + " > 0", "number literal longer than 40"),
        ("x * 1e100000 > 0", "exponent beyond"),
    ],
)
def test_cost_budget_refuses_clauses_that_could_be_expensive_per_row(text: str, message: str) -> None:
    """A where clause runs on every row of a snapshot and on every changed row: what grows with the values
    (powers, products of big numbers, concatenations) is capped before anything reaches PostgreSQL."""
    with pytest.raises(WhereClauseError, match=message):
        parse_where(text)


def test_cost_budget_admits_ordinary_clauses() -> None:
    parse_where("x ^ 2 + y ^ 0.5 < 10 AND z > -3")  # two powers (8 each) fill the budget of 16
    parse_where("a * b * c > 0 AND title || '!' = $1 AND x < 1e308 AND price > 9.99")
    parse_where(" AND ".join(f"(c{i} + {i}) > 0" for i in range(60)))  # additions and comparisons are free
    with pytest.raises(WhereClauseError, match="too expensive"):
        parse_where("x ^ 2 + y ^ 0.5 + z ^ -3 < 10")


def test_param_values_are_bounded() -> None:
    parse_params([("params[1]", "x" * 4096)])
    with pytest.raises(ProtocolError, match="longer than 4096"):
        parse_params([("params[1]", "x" * 4097)])
