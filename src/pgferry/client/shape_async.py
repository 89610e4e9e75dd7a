"""``AsyncShapeStream``: follow one shape over httpx (asyncio).

Works against Electric, pgferry's dev server and pgferry's proxy alike (same protocol). Each answer becomes a
:class:`~pgferry.client.ShapeBatch`; the caller applies batches (atomically at each ``up_to_date``) and persists
``offset`` + ``handle`` to resume later with ``AsyncShapeStream(..., offset=..., handle=...)``. Transport errors,
429 and 5xx are retried forever with full-jitter backoff (``Retry-After`` first when given): a client outlives
server restarts. ``headers`` may be a callable, called before every request, so a refreshed access token is used.

Owns asyncio I/O of the stream; the protocol decisions are :mod:`pgferry.client._shape_base`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType

import httpx

from pgferry.client._shape_base import ShapeBatch, ShapeOptions, ShapeState, retry_after
from pgferry.client.errors import ClientClosedError
from pgferry.db.retry import RetryPolicy

__all__ = ["DEFAULT_BACKOFF", "AsyncShapeStream", "HeadersArg"]

HeadersArg = Mapping[str, str] | Callable[[], Mapping[str, str]] | None
#: Backoff between failed attempts: full jitter from 0.1 s doubling to 10 s; attempts are not limited.
DEFAULT_BACKOFF = RetryPolicy(max_attempts=1_000_000, base_delay=0.1, max_delay=10.0)


class AsyncShapeStream:
    """``async for batch in AsyncShapeStream(url, ShapeOptions("tasks"), headers=...)`` until closed (or, with
    ``live=False``, until up to date). ``url`` is the service's base URL (``…/v1/shape`` is appended when absent)."""

    def __init__(
        self,
        url: str,
        options: ShapeOptions,
        *,
        headers: HeadersArg = None,
        offset: str = "-1",
        handle: str | None = None,
        client: httpx.AsyncClient | None = None,
        backoff: RetryPolicy = DEFAULT_BACKOFF,
        timeout: float = 60.0,
        defer_decoding: bool = False,
    ) -> None:
        self.url = url if url.rstrip("/").endswith("/v1/shape") else url.rstrip("/") + "/v1/shape"
        self.state = ShapeState(options, offset=offset, handle=handle, defer_decoding=defer_decoding)
        self._headers = headers
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0))
        self._backoff = backoff
        self._closed = False
        self._wake = asyncio.Event()

    @property
    def offset(self) -> str:
        return self.state.offset

    @property
    def handle(self) -> str | None:
        return self.state.handle

    def _current_headers(self) -> dict[str, str]:
        headers = self._headers() if callable(self._headers) else self._headers
        return dict(headers or {})

    async def fetch(self) -> ShapeBatch | None:
        """One request (retried until it gets an answer): the batch, or ``None`` after a live timeout."""
        while True:
            if self._closed:
                raise ClientClosedError("the shape stream is closed")
            try:
                async with self._client.stream(
                    "GET", self.url, params=self.state.request_params(), headers=self._current_headers()
                ) as response:
                    status, headers = response.status_code, response.headers
                    # Read here, not with ``response.aread()``, which also keeps the body on the response: httpx
                    # holds a response in a reference cycle (with its stream), so each page's bytes (MBs) stayed
                    # alive until the next full collection of Python's cyclic GC, which a snapshot now rarely
                    # triggers (a 1M-row initial sync peaked ~40 MiB higher).
                    body = (
                        b"" if self.state.should_retry(status) else b"".join([b async for b in response.aiter_bytes()])
                    )
            except httpx.TransportError:
                await self._sleep(self._backoff.delay(self.state.on_failure()))
                continue
            if self.state.should_retry(status):
                wait = retry_after(headers)
                await self._sleep(wait if wait is not None else self._backoff.delay(self.state.on_failure()))
                continue
            return self.state.on_response(status, headers, body)

    async def batches(self) -> AsyncIterator[ShapeBatch]:
        """Every batch until the stream is closed (or up to date, when not live)."""
        while not self._closed:
            try:
                batch = await self.fetch()
            except ClientClosedError:
                return
            if batch is None:
                continue
            yield batch
            if batch.up_to_date and not self.state.options.live:
                return

    def __aiter__(self) -> AsyncIterator[ShapeBatch]:
        return self.batches()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def aclose(self) -> None:
        self._closed = True
        self._wake.set()
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncShapeStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
