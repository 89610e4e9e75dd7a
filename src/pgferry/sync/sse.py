"""Live mode over server-sent events (``live_sse=true``), as Electric serves it.

The official client asks for it with ``liveSse: true`` once it is up to date: ``live=true&live_sse=true`` (and the
deprecated ``experimental_live_sse=true``) with ``Accept: text/event-stream``. Electric then keeps the response
open and writes each message of the shape log as one event (``data: <json>\\n\\n``), an ``up-to-date`` control
message carrying ``global_last_seen_lsn`` after every complete batch, and a ``: keep-alive`` comment when nothing
happened for a while; it ends the stream after a timeout (or when the shape goes away) and the client reconnects.

The client takes its next offset from that ``up-to-date``: ``<global_last_seen_lsn>_0`` (``getOffset`` in its
helpers). This server only sends ``up-to-date`` after complete transactions and reads ``<lsn>_0`` as "after all
of that transaction" (:func:`pgferry.sync.store.normalise_offset`), so a reconnect neither skips nor repeats.
Errors that Electric would send as a status (409 for a rotated shape) cannot be sent once the stream has begun:
the stream ends and the reconnect gets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from pgferry.sync import protocol as p
from pgferry.sync.shapes import Shape
from pgferry.sync.store import normalise_offset

__all__ = ["KEEPALIVE", "sse_events"]

KEEPALIVE = b": keep-alive\n\n"


def _event(message: bytes) -> bytes:
    return b"data: " + message + b"\n\n"


async def sse_events(
    shape: Shape,
    offset: p.LogOffset,
    *,
    global_lsn: Callable[[], int],
    max_bytes: int,
    duration: float,
    keepalive: float,
    on_change: Callable[[Shape], None] = lambda _shape: None,
) -> AsyncIterator[bytes]:
    """The events of ``shape`` after ``offset`` for ``duration`` seconds (then the client reconnects)."""
    position = normalise_offset(offset)
    deadline = time.monotonic() + duration
    last_write = time.monotonic()
    while not shape.gone:
        event = shape.changed_event()  # taken before reading the log, so a change in between still wakes us
        seen = global_lsn()  # read before the log: never ahead of a change the client has not been sent
        chunk = shape.log.read_after(position, max_bytes=max_bytes)
        if chunk.messages and chunk.last_offset is not None:
            body = b"".join(_event(message) for message in chunk.messages)
            position = chunk.last_offset
            if chunk.at_end:
                lsn = max(seen, position.tx)
                body += _event(p.encode_message(p.control_message("up-to-date", global_last_seen_lsn=str(lsn))))
            on_change(shape)
            last_write = time.monotonic()
            yield body
            continue
        now = time.monotonic()
        if now >= deadline:
            return
        wait = min(deadline - now, max(0.0, keepalive - (now - last_write)))
        if wait <= 0:
            last_write = now
            yield KEEPALIVE
            continue
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=wait)
