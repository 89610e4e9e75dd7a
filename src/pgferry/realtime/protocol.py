"""The Phoenix channel wire format as Supabase Realtime speaks it: frames, bindings, replies, system messages.

Owns the bytes only (see ``../shared/facts/realtime.md``): vsn 1.0.0 frames are JSON objects whose server side
carries exactly ``topic``, ``event``, ``payload``, ``ref`` (``null`` on pushes, never ``join_ref``); vsn 2.0.0 text
frames are arrays ``[join_ref, ref, topic, event, payload]``. Binding ids are stable per binding and never 0
(supabase-py ignores a falsy id). Must not know about tokens, the database or delivery.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from pgferry.errors import PgferryError

__all__ = [
    "EVENTS",
    "Binding",
    "Frame",
    "FrameError",
    "Vsn",
    "binding_id",
    "decode_frame",
    "encode",
    "parse_bindings",
    "system_payload",
]

Vsn = Literal["1.0.0", "2.0.0"]
EVENTS: Final = ("INSERT", "UPDATE", "DELETE")


class FrameError(PgferryError):
    """A client frame that is not a Phoenix message; the text says what is wrong."""


@dataclass(frozen=True, slots=True)
class Frame:
    topic: str
    event: str
    payload: Mapping[str, Any]
    ref: str | None
    join_ref: str | None


def _ref(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    raise FrameError("ref and join_ref must be strings, numbers or null")


def decode_frame(text: str | bytes, vsn: Vsn) -> Frame:
    """A client frame; :class:`FrameError` for anything else (not JSON, wrong shape, wrong types)."""
    try:
        message = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise FrameError("frame is not JSON") from None
    if vsn == "2.0.0" and isinstance(message, list):
        if len(message) != 5:
            raise FrameError("a 2.0.0 frame is [join_ref, ref, topic, event, payload]")
        join_ref, ref, topic, event, payload = message
    elif isinstance(message, dict):
        topic, event, payload = message.get("topic"), message.get("event"), message.get("payload")
        ref, join_ref = message.get("ref"), message.get("join_ref")
    else:
        raise FrameError("frame must be a JSON object with topic, event, payload and ref")
    if not isinstance(topic, str) or not isinstance(event, str):
        raise FrameError("topic and event must be strings")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise FrameError("payload must be a JSON object")
    return Frame(topic, event, payload, _ref(ref), _ref(join_ref))


def encode(vsn: Vsn, topic: str, event: str, payload_json: str, ref: str | None, join_ref: str | None = None) -> str:
    """A server frame with its payload already serialised (so one change's data is serialised once for all)."""
    ref_json = json.dumps(ref)
    if vsn == "2.0.0":
        return f"[{json.dumps(join_ref)},{ref_json},{json.dumps(topic)},{json.dumps(event)},{payload_json}]"
    return f'{{"topic":{json.dumps(topic)},"event":{json.dumps(event)},"payload":{payload_json},"ref":{ref_json}}}'


def system_payload(channel: str, extension: str, status: str, message: str) -> str:
    return json.dumps({"channel": channel, "extension": extension, "message": message, "status": status})


@dataclass(frozen=True, slots=True)
class Binding:
    """One ``config.postgres_changes`` entry: ``raw`` is echoed verbatim in the join reply (clients compare it)."""

    raw: Mapping[str, Any]
    id: int
    event: str  # INSERT, UPDATE, DELETE or *
    schema: str
    table: str  # a table name or *
    filter: str | None


def binding_id(raw: Mapping[str, Any]) -> int:
    """Stable for equal bindings (as Realtime's ``phash2``, within its 27-bit range) and never 0."""
    text = json.dumps(dict(raw), sort_keys=True, separators=(",", ":"), default=str)
    return (zlib.crc32(text.encode()) & 0x7FFFFFF) or 1


def parse_bindings(config: object) -> list[Binding]:
    """The join's bindings (``null`` entries dropped, ``null`` list = none); :class:`FrameError` on a wrong type."""
    if config is None:
        return []
    if not isinstance(config, dict):
        raise FrameError("config must be an object")
    entries = config.get("postgres_changes")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise FrameError("config.postgres_changes must be a list")
    bindings = []
    for entry in entries:
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise FrameError("each postgres_changes binding must be an object")
        for key in ("event", "schema", "table", "filter"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise FrameError(f"postgres_changes binding field {key!r} must be a string")
        event = str(entry.get("event") or "*").upper()
        if event not in EVENTS:
            event = "*"
        table = entry.get("table") or "*"
        schema = entry.get("schema") or ("public" if table != "*" else "*")
        filter_text = entry.get("filter") or None
        bindings.append(Binding(dict(entry), binding_id(entry), event, str(schema), str(table), filter_text))
    return bindings
