"""Long-polls that notice when their client hangs up: shared by the dev server and the proxy.

Both hold a request open for up to Electric's live timeout before any response header exists. Starlette only
watches for a disconnect once the response body starts, so without this an abandoned request would keep its
slot (and, in the proxy, its upstream connection) for the whole timeout and hold up a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from starlette.requests import Request

__all__ = ["Raced", "unless_client_leaves"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Raced(Generic[T]):
    """How the race ended; ``value`` is set when ``outcome`` is ``done``."""

    outcome: Literal["done", "disconnected", "timeout"]
    value: T | None = None


async def unless_client_leaves(request: Request, work: Awaitable[T], *, timeout: float | None = None) -> Raced[T]:
    """Await ``work`` unless the client disconnects or ``timeout`` passes first; then ``work`` is cancelled."""

    async def hang_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    left = asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait({task, left}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
    if task.done():
        return Raced("done", task.result())
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # nobody wants its result or its error now
        await task
    return Raced("disconnected" if left.done() and not left.cancelled() else "timeout")
