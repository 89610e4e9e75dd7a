"""``ShapeStream``: the synchronous twin of :class:`~pgferry.client.shape_async.AsyncShapeStream` (httpx.Client,
``time.sleep``), for scripts, threads and agents without an event loop. Same protocol base, same behaviour.

Owns blocking I/O of the stream; the protocol decisions are :mod:`pgferry.client._shape_base`'s.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import TracebackType

import httpx

from pgferry.client._shape_base import ShapeBatch, ShapeOptions, ShapeState, retry_after
from pgferry.client.errors import ClientClosedError
from pgferry.client.shape_async import DEFAULT_BACKOFF, HeadersArg
from pgferry.db.retry import RetryPolicy

__all__ = ["ShapeStream"]


class ShapeStream:
    """``for batch in ShapeStream(url, ShapeOptions("tasks"), headers=...)``; see the async twin."""

    def __init__(
        self,
        url: str,
        options: ShapeOptions,
        *,
        headers: HeadersArg = None,
        offset: str = "-1",
        handle: str | None = None,
        client: httpx.Client | None = None,
        backoff: RetryPolicy = DEFAULT_BACKOFF,
        timeout: float = 60.0,
        defer_decoding: bool = False,
    ) -> None:
        self.url = url if url.rstrip("/").endswith("/v1/shape") else url.rstrip("/") + "/v1/shape"
        self.state = ShapeState(options, offset=offset, handle=handle, defer_decoding=defer_decoding)
        self._headers = headers
        self._own_client = client is None
        self._client = client or httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0))
        self._backoff = backoff
        self._closed = threading.Event()

    @property
    def offset(self) -> str:
        return self.state.offset

    @property
    def handle(self) -> str | None:
        return self.state.handle

    def _current_headers(self) -> dict[str, str]:
        headers = self._headers() if callable(self._headers) else self._headers
        return dict(headers or {})

    def fetch(self) -> ShapeBatch | None:
        """One request (retried until it gets an answer): the batch, or ``None`` after a live timeout."""
        while True:
            if self._closed.is_set():
                raise ClientClosedError("the shape stream is closed")
            try:
                response = self._client.get(
                    self.url, params=self.state.request_params(), headers=self._current_headers()
                )
            except httpx.TransportError:
                self._closed.wait(self._backoff.delay(self.state.on_failure()))
                continue
            if self.state.should_retry(response.status_code):
                wait = retry_after(response.headers)
                self._closed.wait(wait if wait is not None else self._backoff.delay(self.state.on_failure()))
                continue
            return self.state.on_response(response.status_code, response.headers, response.content)

    def batches(self) -> Iterator[ShapeBatch]:
        while not self._closed.is_set():
            try:
                batch = self.fetch()
            except ClientClosedError:
                return
            if batch is None:
                continue
            yield batch
            if batch.up_to_date and not self.state.options.live:
                return

    def __iter__(self) -> Iterator[ShapeBatch]:
        return self.batches()

    def close(self) -> None:
        """Stop the stream (from any thread: a waiting backoff ends at once; a running long-poll ends with its
        request)."""
        self._closed.set()
        if self._own_client:
            self._client.close()

    def __enter__(self) -> ShapeStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
