"""Electric insert messages built by the server from the text of a plain ``COPY (SELECT col, …) TO STDOUT``.

Why: building each message's JSON inside PostgreSQL (``row_to_json`` and text concatenation) made PostgreSQL
spend about three times its plain ``COPY`` time on a snapshot, on one core, while the server's process waited.
Plain COPY text is nearly JSON already, so the server can finish the job on the other core, in bulk, and
the two run as a pipeline. The conversion runs in C where ``setup.py`` could build ``pgferry.sync._copyjson``
(one pass over a block, without the GIL, output joined as a log segment wants it); the Python below is the
fallback and the reference the C code is tested against (``ACCELERATED`` says which one runs).

COPY's text format escapes a value as JSON does, with a few exceptions that this module handles:

* ``\\\\ \\b \\f \\n \\r \\t`` mean what they mean in a JSON string, so they are kept as they are;
* a double quote is not escaped by COPY: every ``"`` becomes ``\\"`` (one ``bytes.replace`` per block);
* a field that is exactly ``\\N`` is NULL: the fields are framed in quotes per block and ``"\\N"`` becomes
  ``null`` (COPY writes a backslash in a value as ``\\\\``, so a value never reads ``\\N`` unframed);
* ``\\v`` (JSON has no such escape) and raw control characters (COPY passes 0x01-0x1f other than those above
  through as they are; JSON needs ``\\u00XX``) are rare: a line that has one is converted field by field
  exactly (:func:`decode_field` then :func:`json.dumps`), as the live path encodes values.

The column names and the fixed parts of the message are a bytes template per shape; the row's key comes
from PostgreSQL as one more column (``"schema"."table"/"pk"`` with ``/`` doubled, see
:func:`pgferry.sync.protocol.row_key`) because the key is JSON inside a JSON string. The output is byte for
byte what ``json.dumps(message, separators=(",", ":"), ensure_ascii=False)`` gives for the same values, which is
what the live path sends (:func:`pgferry.sync.protocol.encode_message`). The client encoding must be UTF-8.

This module knows nothing about connections, shapes' storage or HTTP.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable, Sequence
from operator import methodcaller

__all__ = ["ACCELERATED", "MessageTemplate", "accelerated", "decode_field"]

_convert_block_c: Callable[[bytes, tuple[bytes, ...], bytes, tuple[int, ...]], tuple[bytes, bytes]] | None
try:  # the same conversion in C (setup.py builds it when a compiler is there), one pass without the GIL
    from pgferry.sync._copyjson import convert_block as _convert_block_c
except ImportError:  # pragma: no cover - an install without a C compiler
    _convert_block_c = None

#: Whether blocks are converted by the C extension (``pgferry.sync._copyjson``): about ten times faster per row
#: than the Python path below, which stays as the fallback and as the reference the tests compare it with.
ACCELERATED: bool = _convert_block_c is not None

# Bytes COPY may leave raw in a value that JSON must escape (tab and newline are the format's own delimiters).
_RAW_CONTROL = bytes(b for b in range(0x20) if b not in (0x09, 0x0A))
_COPY_ESCAPES = {
    ord("b"): b"\b",
    ord("f"): b"\f",
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("v"): b"\v",
}
_SPLIT_FIELDS = methodcaller("split", b"\t")


def decode_field(field: bytes) -> str | None:
    """One COPY text field as the value it stands for (``None`` for ``\\N``): the exact, slow decoder."""
    if field == b"\\N":
        return None
    if b"\\" not in field:
        return field.decode()
    out = bytearray()
    position = 0
    while True:
        backslash = field.find(b"\\", position)
        if backslash < 0 or backslash + 1 >= len(field):
            out += field[position:]
            break
        out += field[position:backslash]
        code = field[backslash + 1]
        out += _COPY_ESCAPES.get(code, bytes((code,)))  # \\ and any other escaped byte stand for themselves
        position = backslash + 2
    return out.decode()


def accelerated() -> bool:
    """Whether the C converter runs (read at call time: the tests turn it off)."""
    return _convert_block_c is not None


class MessageTemplate:
    """Converts blocks of COPY text lines (``key, value1, …, valueN``, or only the values with ``key_built``)
    into encoded insert messages."""

    def __init__(
        self,
        columns: Sequence[str],
        key_prefix: str,
        pk_indexes: Sequence[int],
        headers: dict[str, object],
        *,
        key_built: bool = False,
    ) -> None:
        """``columns`` in the order the query selects them (after the key column); ``key_prefix`` is
        ``"schema"."table"/``; ``pk_indexes`` locate the key columns among ``columns``. ``key_built``: the lines
        hold only the values and the key is built here from the primary key's (as
        :func:`pgferry.sync.protocol.row_key` does), so that PostgreSQL does not concatenate it for every row."""
        self.columns = tuple(columns)
        self._key_prefix = key_prefix
        self._pk_indexes = tuple(pk_indexes)
        self._headers = headers
        self.key_built = key_built
        # The key as the C converter starts it: the JSON string's quote and the prefix's JSON-escaped text.
        self._key_head = ('"' + json.dumps(key_prefix, ensure_ascii=False)[1:-1]).encode() if key_built else b""

        def encode(value: object) -> str:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

        # The fixed pieces around the key and each value: the C converter's template, and (joined with %s) the
        # Python one's.
        pieces = ['{"key":', ',"value":{']
        for index, name in enumerate(self.columns):
            pieces[-1] += ("," if index else "") + encode(name) + ":"
            pieces.append("")
        pieces[-1] += '},"headers":' + encode(headers) + "}"
        self._parts = tuple(piece.encode() for piece in pieces)
        self._template = b"%s".join(part.replace(b"%", b"%%") for part in self._parts)
        self._format = self._template.__mod__

    @property
    def parts(self) -> tuple[bytes, ...]:
        """The fixed pieces around the key and each value, as the C converter takes them."""
        return self._parts

    @property
    def key_head(self) -> bytes:
        """How the C converter starts a key it builds (empty: the key is the lines' first field)."""
        return self._key_head

    @property
    def pk_fields(self) -> tuple[int, ...]:
        """The primary key's fields among the values, for a key the C converter builds."""
        return self._pk_indexes if self.key_built else ()

    def convert(self, block: bytes, *, accelerated: bool = ACCELERATED) -> list[bytes]:
        """Messages for a block of whole COPY lines (each ending in ``\\n``); ``accelerated=False`` takes the
        Python path even where the C one is built (the tests compare the two)."""
        if not block:
            return []
        if accelerated and _convert_block_c is not None:
            plain, lengths = self.convert_joined(block)
            messages, start = [], 0
            for length in lengths:
                messages.append(plain[start : start + length])
                start += length + 1
            return messages
        if self.key_built:  # the fast path frames the key field the query sends; without one, line by line
            return [self.exact(line) for line in block.removesuffix(b"\n").split(b"\n")]
        if len(block.translate(None, _RAW_CONTROL)) == len(block) and b"\\v" not in block:
            return self._fast(block)
        out: list[bytes] = []
        for line in block[:-1].split(b"\n"):
            if len(line.translate(None, _RAW_CONTROL)) == len(line) and b"\\v" not in line:
                out.extend(self._fast(line + b"\n"))
            else:
                out.append(self.exact(line))
        return out

    def convert_joined(self, block: bytes) -> tuple[bytes, array[int]]:
        """The messages for a block of whole COPY lines joined by commas (a shape log segment's plain form) and
        their lengths: in C, no Python object per row."""
        if _convert_block_c is not None:
            plain, raw_lengths = _convert_block_c(block, self._parts, self._key_head, self.pk_fields)
            lengths = array("q")
            lengths.frombytes(raw_lengths)
            return plain, lengths
        messages = self.convert(block)
        return b",".join(messages), array("q", map(len, messages))

    def _fast(self, block: bytes) -> list[bytes]:
        # Every field framed in quotes; a framed ``\N`` (only NULL reads so, see the module doc) is null.
        framed = b'"' + block.replace(b'"', b'\\"').replace(b"\t", b'"\t"').replace(b"\n", b'"\n"')
        framed = framed.replace(b'"\\N"', b"null")
        lines = framed.split(b"\n")
        lines.pop()  # the opening quote after the last newline
        return list(map(self._format, map(tuple, map(_SPLIT_FIELDS, lines))))

    def exact(self, line: bytes) -> bytes:
        """One line, decoded field by field and encoded as the live path encodes a message."""
        fields = line.split(b"\t")
        values = [decode_field(f) for f in (fields if self.key_built else fields[1:])]
        if len(values) != len(self.columns):
            raise ValueError(f"a COPY line has {len(values)} values, expected {len(self.columns)}")
        parts = [
            '"' + ("_" if values[i] is None else str(values[i]).replace("/", "//")) + '"' for i in self._pk_indexes
        ]
        message = {
            "key": self._key_prefix + "/".join(parts),
            "value": dict(zip(self.columns, values, strict=True)),
            "headers": self._headers,
        }
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
