"""A blocking face of :class:`pgferry.sync.auth.TokenVerifier`, for synchronous server code (Flask, workers, CLIs).

The verifier is asynchronous because fetching a JWKS is I/O, and it caches an HTTP client and a lock that belong
to one event loop. Calling ``asyncio.run(verifier.verify(token))`` per request would create a new loop each time
and break that cache, so this class runs the verifier on one private event-loop thread for its whole life.

It verifies only; it never decodes a token without checking it, and it adds no rules of its own (those live in
``pgferry.sync.auth``).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any, TypeVar

from pgferry.sync.auth import AuthenticatedUser, TokenVerifier

__all__ = ["BlockingTokenVerifier"]

T = TypeVar("T")


class BlockingTokenVerifier:
    """Verify Supabase access tokens from synchronous code; one instance per process, shared by threads."""

    def __init__(self, verifier: TokenVerifier, *, timeout: float = 15.0) -> None:
        self.verifier = verifier
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pgferry-token-verifier", daemon=True)
        self._thread.start()

    def _run(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(self._timeout)

    def verify(self, token: str) -> AuthenticatedUser:
        """The user ``token`` identifies; the verifier's :class:`~pgferry.sync.auth.InvalidTokenError` otherwise."""
        user: AuthenticatedUser = self._run(self.verifier.verify(token))
        return user

    def verify_header(self, authorization: str | None) -> AuthenticatedUser:
        """The user of an ``Authorization: Bearer …`` header value."""
        user: AuthenticatedUser = self._run(self.verifier.verify_header(authorization))
        return user

    def close(self) -> None:
        """Close the verifier's HTTP client and stop the loop thread; idempotent."""
        if self._loop.is_closed():
            return
        self._run(self.verifier.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self._timeout)
        self._loop.close()

    def __enter__(self) -> BlockingTokenVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
