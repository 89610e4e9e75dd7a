"""Snapshot messages built in Python from COPY text (issue 16) are byte for byte what the live path encodes.

The snapshot reads plain ``COPY (select key, col::text, …) TO STDOUT`` and turns its text into JSON in bulk
(:mod:`pgferry.sync.copytext`), relying on COPY's escaping being nearly JSON's. Everything that could break that
shortcut is seeded here: every ASCII byte (raw control characters, ``\\v``, quotes, backslashes), values that
read like COPY's NULL marker, ``%`` (the template is a ``%`` format), slashes and quotes in keys, odd column names,
unicode, NULLs. The oracle is independent of the converter: the rows read back by psycopg as text and encoded by
the live path's own functions (:func:`~pgferry.sync.protocol.row_key`, :func:`change_message`,
:func:`encode_message`), compared with every message of the shape's stored log.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgferry.sync import copytext
from pgferry.sync.copyout import copy_functions
from pgferry.sync.copytext import ACCELERATED, MessageTemplate, decode_field
from pgferry.sync.protocol import (
    BEFORE_ALL,
    LogOffset,
    ShapeDefinition,
    TableName,
    change_message,
    encode_message,
    row_key,
)
from pgferry.sync.shapes import ShapeManager

TABLE = TableName("public", "copytext_t")
ODD = 'we%ird "col" \\ é'  # a column name with %, a quote, a backslash and unicode

VALUES: list[str | None] = [
    *(f"byte {i:02x}: <{chr(i)}>" for i in range(1, 128)),
    "\\N",
    "\\\\N",
    '"\\N"',
    "\\",
    "N",
    "ends with a backslash \\",
    '"',
    '""',
    "%s %d %%",
    "tab\tnewline\nreturn\rvtab\vformfeed\fbackspace\b",
    "unicode é ☃ 𝄞 \u2028 \u2029 \x7f",
    "",
    None,
    "x" * 5000,
]


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@pytest.fixture
def table(target_url: str) -> Iterator[str]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        conn.execute("drop table if exists copytext_t")
        conn.execute("drop domain if exists copytext_flag")
        conn.execute("create domain copytext_flag as boolean")
        conn.execute(
            f"""create table copytext_t (k text, n int, a text, j jsonb, arr text[], ts timestamptz,
                {_ident(ODD)} text, b boolean, ip inet, ch char(5), fl float8, flags boolean[], flag copytext_flag,
                primary key (k, n))"""
        )
        with conn.cursor() as cur:
            for i, value in enumerate(VALUES):
                key = f'k/{i}/"q"\\{value if value is not None and len(value) < 50 else ""}'
                cur.execute(
                    "insert into copytext_t values (%s, %s, %s, %s, %s, now() - %s * interval '1 hour', %s,"
                    " %s, %s::inet, %s, %s, %s, %s)",
                    [
                        key,
                        i,
                        value,
                        None if value is None else json.dumps({"v": value, "n": [i, None]}),
                        None if value is None else [value, None, "b"],
                        i,
                        value if i % 2 else None,
                        # Types whose ::text differs from what COPY prints (a function cast) and some that don't:
                        # the snapshot casts the former and selects the latter as they are.
                        None if i % 5 == 0 else i % 2 == 0,
                        f"10.0.{i}.1",
                        "ab" if i % 3 else None,
                        i / 3,
                        [True, None, False],
                        i % 2 == 1,
                    ],
                )
        yield target_url
        conn.execute("drop table copytext_t")
        conn.execute("drop domain copytext_flag")


def _oracle(url: str, columns: list[str]) -> list[bytes]:
    """Every row encoded by the live path's functions from psycopg's text values."""
    select = ", ".join(f"{_ident(c)}::text" for c in columns)
    options = "-c TimeZone=UTC -c DateStyle=ISO,MDY -c extra_float_digits=1 -c IntervalStyle=postgres"
    with psycopg.connect(url, options=options) as conn:
        rows = conn.execute(f"select {select} from copytext_t").fetchall()
    out = []
    for row in rows:
        value = dict(zip(columns, row, strict=True))
        message = change_message(
            key=row_key(TABLE, [value["k"], value["n"]]),
            operation="insert",
            value=value,
            relation=TABLE,
            offset=LogOffset(0, 0),
            txid=None,
        )
        out.append(encode_message(message))
    return sorted(out)


def _snapshot(url: str, tmp_path: Path, definition: ShapeDefinition, converter: str) -> list[bytes]:
    """Every message of a new shape's snapshot, as stored (tiny segments: many blocks, fast and exact mixed)."""
    manager = ShapeManager(url, tmp_path / "sync", segment_bytes=2048)
    manager.read_copy_in_c = converter == "c-reader"
    try:
        table, clause = manager.validate(definition)
        shape, _created = manager.register(definition, table, clause)
        manager.take_snapshot(shape)
        assert shape.snapshot_error is None, shape.snapshot_error
        assert shape.log.segments > 1
        messages: list[bytes] = []
        offset = BEFORE_ALL
        while True:
            chunk = shape.log.read_after(offset, max_bytes=10_000)
            if not chunk.messages:
                break
            messages.extend(chunk.messages)
            assert chunk.last_offset is not None
            offset = chunk.last_offset
        return messages
    finally:
        manager.close()


@pytest.fixture(params=["c-reader", "c", "python"])
def converter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each snapshot test runs three ways: the COPY read with libpq and converted in C (what the server does
    where the extension is built), read through psycopg and converted in C, and all in Python."""
    if request.param == "python":
        monkeypatch.setattr(copytext, "_convert_block_c", None)
    elif not ACCELERATED:
        pytest.fail("pgferry.sync._copyjson is not built: `pip install -e .` needs a C compiler and Python's headers")
    return str(request.param)


def test_the_c_converter_is_built_on_this_install() -> None:
    """The fresh-snapshot speed (issue 16) depends on it; an install that silently fell back must not pass."""
    assert ACCELERATED
    assert copy_functions() is not None


def test_snapshot_messages_equal_the_live_encoding_of_every_tricky_value(
    table: str, tmp_path: Path, converter: str
) -> None:
    columns = ["k", "n", "a", "j", "arr", "ts", ODD, "b", "ip", "ch", "fl", "flags", "flag"]
    messages = _snapshot(table, tmp_path, ShapeDefinition(TABLE), converter)
    assert len(messages) == len(VALUES)
    assert sorted(messages) == _oracle(table, columns)
    for message in messages:  # valid JSON, compact, as json.dumps writes it
        assert message == json.dumps(json.loads(message), separators=(",", ":"), ensure_ascii=False).encode()


def test_selected_columns_and_where_keep_the_same_encoding(table: str, tmp_path: Path, converter: str) -> None:
    columns = ["n", ODD, "k"]
    definition = ShapeDefinition(TABLE, where="n % 3 = 0", columns=tuple(columns))
    messages = _snapshot(table, tmp_path, definition, converter)
    expected = [m for m in _oracle(table, columns) if json.loads(m)["value"]["n"] is not None]
    expected = [m for m in expected if int(json.loads(m)["value"]["n"]) % 3 == 0]
    assert sorted(messages) == expected
    assert [list(json.loads(m)["value"]) for m in messages[:1]] == [columns]


def test_the_fast_and_exact_conversions_agree_line_by_line() -> None:
    """Every line that has no raw control character and no ``\\v`` may take either path: both must agree."""
    template = MessageTemplate(["a", "b%"], '"s"."t"/', [0], {"operation": "insert", "relation": ["s", "t"]})
    fields = [  # (a, b) as COPY text; the key column is built from a as the snapshot query builds it
        (b"plain/x", b"\\N"),
        (b"\\\\N", b'"\\\\N"'),
        (b'q\\\\"', b"\\t\\n\\r\\b\\f"),
        (b"\xc3\xa9", b"%s"),
        (b"", b""),
    ]
    lines = [b'"s"."t"/"' + a.replace(b"/", b"//") + b'"\t' + a + b"\t" + b for a, b in fields]
    for line in lines:
        fast = template.convert(line + b"\n")
        assert fast == [template.exact(line)], line
        assert json.loads(fast[0])["value"]["a"] == decode_field(line.split(b"\t")[1])
    assert template.convert(b"".join(line + b"\n" for line in lines)) == [template.exact(line) for line in lines]
    assert decode_field(b"\\N") is None
    assert decode_field(b"a\\\\b\\vc\\td") == "a\\b\vc\td"


def _copy_text(value: str | None) -> bytes:
    """A value as PostgreSQL's COPY TO writes it in text format (CopyAttributeOutText): the test's own encoder,
    independent of :func:`decode_field`."""
    if value is None:
        return b"\\N"
    escapes = {"\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
    return "".join(escapes.get(ch, ch) for ch in value).encode()


def test_c_converter_output_is_json_dumps_of_the_original_values() -> None:
    """Random values of every byte class (raw control characters, COPY's escapes, quotes, backslashes, text that
    reads like ``\\N``, unicode), COPY-encoded by the test: the C converter's messages are exactly ``json.dumps``
    of the original values, and the Python path gives the same bytes."""
    if not ACCELERATED:
        pytest.fail("pgferry.sync._copyjson is not built")
    alphabet = [chr(i) for i in range(1, 128)] + ["é", "☃", "𝄞", "\u2028", "\\N", "\\", '"', "%s"]
    rng = random.Random(16)
    columns = ["k", 'c"1', "c\\2", "ç3"]
    headers = {"operation": "insert", "relation": ["s", "t"]}
    template = MessageTemplate(columns, '"s"."t"/', [0], headers)
    for _round in range(200):
        rows = []
        for _row in range(rng.randint(0, 12)):
            values = [
                None if rng.random() < 0.15 else "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
                for _ in columns
            ]
            key = '"s"."t"/' + ('"_"' if values[0] is None else '"' + values[0].replace("/", "//") + '"')
            rows.append((key, values))
        block = b"".join(b"\t".join([_copy_text(key), *map(_copy_text, values)]) + b"\n" for key, values in rows)
        expected = [
            json.dumps(
                {"key": key, "value": dict(zip(columns, values, strict=True)), "headers": headers},
                separators=(",", ":"),
                ensure_ascii=False,
            ).encode()
            for key, values in rows
        ]
        plain, lengths = template.convert_joined(block)
        assert plain == b",".join(expected)
        assert list(lengths) == [len(m) for m in expected]
        assert template.convert(block, accelerated=False) == expected

        # The key built by the converter from a two-column primary key, the lines holding only the values.
        built = MessageTemplate(columns, '"s"."t"/', [0, 2], headers, key_built=True)
        values_only = b"".join(b"\t".join(map(_copy_text, values)) + b"\n" for _key, values in rows)
        expected_built = [
            json.dumps(
                {
                    "key": '"s"."t"/'
                    + "/".join(
                        '"_"' if values[i] is None else '"' + values[i].replace("/", "//") + '"' for i in (0, 2)
                    ),
                    "value": dict(zip(columns, values, strict=True)),
                    "headers": headers,
                },
                separators=(",", ":"),
                ensure_ascii=False,
            ).encode()
            for _key, values in rows
        ]
        assert built.convert_joined(values_only)[0] == b",".join(expected_built)
        assert built.convert(values_only, accelerated=False) == expected_built


def test_c_converter_refuses_a_line_with_another_number_of_fields() -> None:
    template = MessageTemplate(["a", "b"], '"s"."t"/', [0], {"operation": "insert", "relation": ["s", "t"]})
    with pytest.raises(ValueError, match="values, expected 2"):
        template.convert_joined(b"k\ta\tb\nk\ta\n")
    with pytest.raises(ValueError, match="values, expected 2"):
        template.convert_joined(b"k\ta\tb\tc\n")
    plain, lengths = template.convert_joined(b"")
    assert (plain, len(lengths)) == (b"", 0)
    built = MessageTemplate(["a", "b"], '"s"."t"/', [1], {"operation": "insert"}, key_built=True)
    with pytest.raises(ValueError, match="has 3 values, expected 2"):
        built.convert_joined(b"a\tb\tc\n")
    assert json.loads(built.convert_joined(b"a\tb/c\n")[0])["key"] == '"s"."t"/"b//c"'


def test_c_converter_buffers_of_a_thread_are_freed_when_it_ends() -> None:
    """The converter keeps its working buffers per thread between calls (a snapshot's reader converts a block a
    hundred times per 100k rows); each snapshot has a reader thread of its own, so they must go with the thread."""
    if not ACCELERATED:
        pytest.fail("pgferry.sync._copyjson is not built")
    import threading

    template = MessageTemplate(["a", "b"], '"s"."t"/', [0], {"operation": "insert"}, key_built=True)
    block = b"".join(b"%d\t%s\n" % (i, b"x" * 2000) for i in range(2000))  # ~4 MB in, ~4 MB of JSON out

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def convert() -> None:
        template.convert_joined(block)

    for _ in range(3):  # the allocator's own high-water mark first
        worker = threading.Thread(target=convert)
        worker.start()
        worker.join()
    before = rss()
    for _ in range(40):
        worker = threading.Thread(target=convert)
        worker.start()
        worker.join()
    grown = rss() - before
    assert grown < 60 << 20, f"RSS grew by {grown >> 20} MiB over 40 threads (~12 MiB of buffers each)"
