"""Creating shapes on a bounded pool of their own, so no request can starve the others.

A new shape costs database work: validation (a plan of the where clause) and a snapshot that may read the whole
table. Run on the event loop's default executor, a handful of expensive requests used to hold every thread of it
and every other request, new shapes of other users included, waited behind them. Here that work runs on a
dedicated pool of ``workers`` threads; at most ``max_waiting`` creations queue for it (more are answered 503 with
``Retry-After``), the server holds at most ``max_shapes`` shapes (429), and each snapshot page runs under the
per-shape statement timeout (:attr:`ShapeManager.snapshot_timeout_ms`, a 400 when exceeded). Per-user limits
belong to the proxy, which knows the users (:mod:`pgferry.sync.limits`).

Two requests for the same new shape share one creation. A request whose client hangs up does not cancel a
creation others may be waiting for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pgferry.sync.errors import ShapeUnavailableError, TooManyRequestsError
from pgferry.sync.protocol import ShapeDefinition
from pgferry.sync.session import connect_sql
from pgferry.sync.shapes import Shape, ShapeManager, snapshot_failure
from pgferry.sync.tables import ServedTables

__all__ = ["ShapeCreator"]

T = TypeVar("T")
_ALIGN_WAIT = 2.0  # seconds a request waits for a freshly published table before it is told to retry


class ShapeCreator:
    def __init__(
        self,
        url: str,
        manager: ShapeManager,
        tables: ServedTables,
        *,
        workers: int = 4,
        max_waiting: int = 16,
        max_shapes: int = 1000,
    ) -> None:
        self._url = url
        self._manager = manager
        self._tables = tables
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pgferry-shape")  # see close()
        self._max_waiting = max_waiting
        self._max_shapes = max_shapes
        self._creating: dict[ShapeDefinition, asyncio.Future[Shape]] = {}

    def close(self) -> None:
        """Drop queued work; a running snapshot stops at its next page (:meth:`ShapeManager.close`), so the
        process does not wait for it at exit."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def in_progress(self) -> int:
        return len(self._creating)

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    async def get_or_create(self, definition: ShapeDefinition) -> Shape:
        """The live shape for ``definition``, created if needed; returns once a new shape's snapshot has written
        its first page (so an error in the snapshot query is still a 400), not when it has finished."""
        existing = self._manager.current(definition)
        if existing is not None:
            return existing
        self._tables.check(definition.table)
        future = self._creating.get(definition)
        if future is None:
            if len(self._creating) >= self._max_waiting:
                raise ShapeUnavailableError(
                    "table", "too many shapes are being created right now; retry", retry_after=2
                )
            if self._manager.count() >= self._max_shapes:
                raise TooManyRequestsError(
                    "table", f"this server already holds its maximum of {self._max_shapes} shapes", retry_after=30
                )
            future = asyncio.ensure_future(self._create(definition))
            self._creating[definition] = future
            future.add_done_callback(lambda done: self._finished(definition, done))
        return await asyncio.shield(future)

    def _finished(self, definition: ShapeDefinition, done: asyncio.Future[Shape]) -> None:
        self._creating.pop(definition, None)
        if not done.cancelled():
            done.exception()  # retrieved here: every waiter may have hung up, and nobody else would

    async def _create(self, definition: ShapeDefinition) -> Shape:
        await self._wait_aligned(definition)
        table, clause = await self._run(lambda: self._manager.validate(definition))
        shape, created = self._manager.register(definition, table, clause)
        if created:
            self._pool.submit(self._manager.take_snapshot, shape)
        await _first_rows(shape)
        if shape.snapshot_error is not None:
            raise snapshot_failure(shape.snapshot_error, timeout_ms=self._manager.snapshot_timeout_ms)
        return shape

    async def _wait_aligned(self, definition: ShapeDefinition) -> None:
        """Wait (briefly) until no transaction that may have written before the table joined the publication is
        still running; then tell the client to retry rather than hold a request open indefinitely."""

        if self._tables.known_aligned(definition.table):
            return

        def aligned() -> bool:
            with connect_sql(self._url, statement_timeout_ms=5000) as conn:
                return self._tables.aligned(conn, definition.table)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ALIGN_WAIT
        while not await self._run(aligned):
            if loop.time() >= deadline:
                raise ShapeUnavailableError(
                    "table",
                    f"{definition.table} joined replication while transactions were open; the first snapshot waits "
                    "until they end. Retry",
                    retry_after=1,
                )
            await asyncio.sleep(0.1)


async def _first_rows(shape: Shape) -> None:
    while not shape.first_rows.is_set():
        event = shape.changed_event()
        if shape.first_rows.is_set():
            break
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=0.5)
