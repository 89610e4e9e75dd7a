"""The HTTP layer under supabase-py for pgferry's services: cookie-less clients, per-call timeouts, and a record of
what each call's responses really were.

supabase-py takes an injected ``httpx`` client; pgferry injects one built here, shared by every service instance
of a :class:`~pgferry.supabase.project.SupabaseProject` (one connection pool), and therefore shared by *users*.
Three properties follow from that and are owned here:

* **No cross-user state in the client.** No default headers (supabase-py passes ``apikey`` and ``Authorization``
  per request) and a cookie jar whose policy accepts no cookie at all, so a ``Set-Cookie`` in one user's response
  can never ride along on another user's request. Redirects are not followed: none of these APIs redirects, and a
  redirect followed to another host would carry the ``apikey`` there.
* **Per-call timeouts.** httpx reads a request's timeout from ``request.extensions``; the transport overrides it
  from the current :func:`call_scope`, so one call's timeout never changes another's on the shared client.
* **Responses as they were.** supabase-py's error objects lose information and differ between versions (GoTrue's
  error code depends on an echoed header; storage3 drops Storage's ``code``; supabase-functions once looked for
  ``x-relay-header``). The transport records, per call scope, each response's status, headers and (for errors) body,
  so the services map errors from what the server sent.

Must not know about any one service's contract; that lives in the service modules.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Final

import httpx

__all__ = [
    "CallRecord",
    "Exchange",
    "call_scope",
    "current_call",
    "new_async_client",
    "new_sync_client",
]

#: Error bodies larger than this are kept truncated (they are only ever read for a code and a message).
_MAX_ERROR_BODY: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Exchange:
    """One response a call received: ``body`` is kept for non-2xx responses only (bytes, possibly truncated)."""

    method: str
    url: str
    status: int
    headers: httpx.Headers
    body: bytes = b""

    def json(self) -> Any:
        """The body parsed as JSON, or ``None`` when it is not JSON (HTML from a proxy, plain text, empty)."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None

    def text(self, limit: int = 200) -> str:
        """The body as text, cut to ``limit`` characters."""
        return self.body.decode("utf-8", "replace")[:limit]


@dataclass(slots=True)
class CallRecord:
    """What one service call saw: its timeout (seconds, or None for the client's default) and every response."""

    timeout: float | None = None
    exchanges: list[Exchange] = field(default_factory=list)

    @property
    def last(self) -> Exchange | None:
        return self.exchanges[-1] if self.exchanges else None


_CURRENT: ContextVar[CallRecord | None] = ContextVar("pgferry_supabase_call", default=None)


@contextmanager
def call_scope(timeout: float | None = None) -> Iterator[CallRecord]:
    """Everything sent inside the ``with`` (in this thread or task) uses ``timeout`` and is recorded in the yielded
    :class:`CallRecord`. Context variables make this safe with threads and with concurrent asyncio tasks."""
    record = CallRecord(timeout=timeout)
    token = _CURRENT.set(record)
    try:
        yield record
    finally:
        _CURRENT.reset(token)


def current_call() -> CallRecord | None:
    return _CURRENT.get()


def _apply_timeout(request: httpx.Request, record: CallRecord | None) -> None:
    if record is not None and record.timeout is not None:
        request.extensions = {**request.extensions, "timeout": httpx.Timeout(record.timeout).as_dict()}


def _record(record: CallRecord | None, request: httpx.Request, response: httpx.Response, body: bytes) -> None:
    if record is not None:
        record.exchanges.append(
            Exchange(
                method=request.method,
                url=str(request.url.copy_with(query=None)),  # signed URLs carry tokens in the query
                status=response.status_code,
                headers=httpx.Headers(response.headers),
                body=body[:_MAX_ERROR_BODY],
            )
        )


class _RecordingTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        record = _CURRENT.get()
        _apply_timeout(request, record)
        response = self._inner.handle_request(request)
        body = b""
        if record is not None and response.status_code >= 300:
            body = response.read()  # cached on the response: supabase-py reads it again from there
        _record(record, request, response, body)
        return response

    def close(self) -> None:
        self._inner.close()


class _AsyncRecordingTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        record = _CURRENT.get()
        _apply_timeout(request, record)
        response = await self._inner.handle_async_request(request)
        body = b""
        if record is not None and response.status_code >= 300:
            body = await response.aread()
        _record(record, request, response, body)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def _no_cookies() -> CookieJar:
    # ``allowed_domains=[]`` makes the policy refuse every domain: nothing is ever stored, so nothing is ever sent.
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def new_sync_client(timeout: float) -> httpx.Client:
    """The shared synchronous client: no default headers, no cookies, no redirects, recording transport."""
    return httpx.Client(
        transport=_RecordingTransport(httpx.HTTPTransport(retries=0)),
        timeout=timeout,
        follow_redirects=False,
        cookies=_no_cookies(),
    )


def new_async_client(timeout: float) -> httpx.AsyncClient:
    """The shared asynchronous client, with the same properties as :func:`new_sync_client`."""
    return httpx.AsyncClient(
        transport=_AsyncRecordingTransport(httpx.AsyncHTTPTransport(retries=0)),
        timeout=timeout,
        follow_redirects=False,
        cookies=_no_cookies(),
    )
