"""Joined channels and their postgres_changes subscriptions, shared by the websocket side and the feed thread.

The event loop adds and removes subscriptions; the feed thread takes a snapshot of the candidates for a table
under the registry's lock once per batch. A channel's claims and expiry are replaced as a whole (one attribute
assignment), so the feed thread always sees a consistent pair. Must not touch the database or the socket.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pgferry.realtime.filters import Filter
from pgferry.realtime.protocol import Binding, Vsn, encode

__all__ = ["Channel", "FrameSink", "Registry", "Subscription", "Token"]


class FrameSink(Protocol):
    """Where a channel's frames go: a socket's ordered writer. ``enqueue`` runs on ``loop``'s thread only; the feed
    thread hands a whole batch over with one ``loop.call_soon_threadsafe`` (one wake-up per batch, not per frame).
    ``on_sent`` is called once every frame of the call has been written, or will never be."""

    loop: asyncio.AbstractEventLoop

    def enqueue(self, frames: list[str], on_sent: Callable[[], None] | None) -> None: ...


@dataclass(frozen=True, slots=True)
class Token:
    """Verified claims of the token a channel acts with; ``exp`` in Unix seconds."""

    claims: Mapping[str, Any]
    key: str
    exp: float

    @property
    def role(self) -> str:
        return str(self.claims.get("role"))

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.exp


@dataclass(eq=False)
class Channel:
    """One joined topic on one socket (``sink``)."""

    topic: str
    join_ref: str | None
    vsn: Vsn
    token: Token
    sink: FrameSink
    subscriptions: list[Subscription] = field(default_factory=list)
    closed: bool = False

    def __post_init__(self) -> None:
        # The part of every postgres_changes frame that does not depend on the change, built once.
        self._prefix, self._suffix = encode(self.vsn, self.topic, "postgres_changes", "\x00", None).split("\x00")

    @property
    def name(self) -> str:
        return self.topic.removeprefix("realtime:")

    def change_frame(self, payload_json: str) -> str:
        """A ``postgres_changes`` frame of this channel (``ref`` null) around an already serialised payload."""
        return self._prefix + payload_json + self._suffix

    @property
    def frame_head(self) -> str:
        return self._prefix

    @property
    def frame_tail(self) -> str:
        """What follows a payload's ``data`` when the payload is ``{"ids": […], "data": …}``."""
        return "}" + self._suffix

    def receives(self, now: float) -> bool:
        return not self.closed and not self.token.expired(now)


@dataclass(eq=False)
class Subscription:
    channel: Channel
    binding: Binding
    filters: tuple[Filter, ...]
    active: bool = False

    @property
    def frame_head(self) -> str:
        """The start of this subscription's frames up to ``"data":`` when it is its channel's only binding."""
        head = self.__dict__.get("_frame_head")
        if head is None:
            head = self.__dict__["_frame_head"] = (
                self.channel.frame_head + '{"ids":[' + str(self.binding.id) + '],"data":'
            )
        return str(head)

    def wants(self, kind: str) -> bool:
        return self.binding.event == "*" or self.binding.event == kind


class Registry:
    """Subscriptions by ``(schema, table)`` (either may be ``*``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_table: dict[tuple[str, str], dict[int, Subscription]] = {}
        self.count = 0

    def add(self, subscription: Subscription) -> None:
        key = (subscription.binding.schema, subscription.binding.table)
        with self._lock:
            self._by_table.setdefault(key, {})[id(subscription)] = subscription
            self.count += 1

    def remove(self, subscription: Subscription) -> None:
        key = (subscription.binding.schema, subscription.binding.table)
        with self._lock:
            found = self._by_table.get(key)
            if found is not None and found.pop(id(subscription), None) is not None:
                self.count -= 1
                if not found:
                    del self._by_table[key]

    def candidates(self, schema: str, table: str) -> list[Subscription]:
        with self._lock:
            out: list[Subscription] = []
            for key in ((schema, table), (schema, "*"), ("*", table), ("*", "*")):
                found = self._by_table.get(key)
                if found:
                    out.extend(found.values())
            return out
