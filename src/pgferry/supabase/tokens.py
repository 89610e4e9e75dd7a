"""Where a service gets the user's access token from, and the one rule for expired tokens.

Storage and Functions act *as a user*: every request carries that user's access token, so row-level security (on
``storage.objects``, in the function's queries) decides what the call may touch. The token comes from a
:class:`TokenSource`:

* a plain string (a backend forwarding the token of the request it serves) becomes a :class:`StaticToken`, which
  cannot be refreshed;
* an :class:`~pgferry.supabase.auth.AuthService` / :class:`~pgferry.supabase.auth.AsyncAuthService` (a Python client
  signed in as the user) can refresh its session.

**The rule** (issue 15's "an expired token is refreshed once and the call retried, or the error says so"): a token
whose ``exp`` has passed is refreshed *before* the call when its source can, else the call fails at once with
:class:`~pgferry.supabase.errors.SessionExpiredError` saying so; a call the server refuses because the token
expired meanwhile is retried exactly once with a refreshed token. A second refusal is a ``SessionExpiredError``.

Must not perform HTTP itself; the services do.
"""

from __future__ import annotations

import time
from typing import Final, Protocol, runtime_checkable

from pgferry.supabase.errors import SessionExpiredError
from pgferry.supabase.project import unverified_claims

__all__ = [
    "AsyncTokenSource",
    "StaticToken",
    "TokenSource",
    "expired_token_error",
    "is_expired",
]

#: Seconds before ``exp`` at which a token already counts as expired (a request in flight must not outlive it).
EXPIRY_MARGIN: Final = 10


@runtime_checkable
class TokenSource(Protocol):
    """A synchronous source of one user's access token."""

    def access_token(self) -> str:
        """A token that has not expired (refreshed first if the source can and must)."""
        ...

    def refreshed_access_token(self) -> str | None:
        """A newly refreshed token, or ``None`` when this source cannot refresh."""
        ...


@runtime_checkable
class AsyncTokenSource(Protocol):
    """An asynchronous source of one user's access token."""

    async def access_token(self) -> str: ...

    async def refreshed_access_token(self) -> str | None: ...


class StaticToken:
    """A token handed over as is (e.g. from the ``Authorization`` header of a request being served): it is used
    until it expires and cannot be refreshed. Works as both a sync and an async source."""

    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        token = token.strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        self._token = token

    def __repr__(self) -> str:
        return "StaticToken(<redacted>)"

    def token(self) -> str:
        if is_expired(self._token):
            raise expired_token_error(can_refresh=False)
        return self._token


class _StaticSync:
    __slots__ = ("_static",)

    def __init__(self, static: StaticToken) -> None:
        self._static = static

    def access_token(self) -> str:
        return self._static.token()

    def refreshed_access_token(self) -> str | None:
        return None


class _StaticAsync:
    __slots__ = ("_static",)

    def __init__(self, static: StaticToken) -> None:
        self._static = static

    async def access_token(self) -> str:
        return self._static.token()

    async def refreshed_access_token(self) -> str | None:
        return None


def sync_source(token: str | StaticToken | TokenSource) -> TokenSource:
    """The :class:`TokenSource` for what a caller passed."""
    if isinstance(token, str):
        token = StaticToken(token)
    if isinstance(token, StaticToken):
        return _StaticSync(token)
    return token


def async_source(token: str | StaticToken | AsyncTokenSource) -> AsyncTokenSource:
    """The :class:`AsyncTokenSource` for what a caller passed."""
    if isinstance(token, str):
        token = StaticToken(token)
    if isinstance(token, StaticToken):
        return _StaticAsync(token)
    return token


def is_expired(token: str, *, margin: float = EXPIRY_MARGIN, now: float | None = None) -> bool:
    """Whether the token's own ``exp`` claim has passed (or will within ``margin`` seconds). Tokens that are not
    JWTs or carry no ``exp`` are not considered expired here; the server decides about them."""
    claims = unverified_claims(token)
    exp = claims.get("exp") if claims else None
    if not isinstance(exp, int | float):
        return False
    return float(exp) <= (time.time() if now is None else now) + margin


def expired_token_error(*, can_refresh: bool, after_refresh: bool = False) -> SessionExpiredError:
    """The :class:`SessionExpiredError` for a token that expired, saying what the caller must do."""
    if after_refresh:
        message = (
            "the user's access token was refused again after one refresh; the session is no longer valid: sign in again"
        )
    elif can_refresh:
        message = "the user's session expired and could not be refreshed: sign in again"
    else:
        message = (
            "the user's access token has expired and pgferry cannot refresh a token it was handed: the client must "
            "refresh its session (supabase auth refresh) and retry the request with the new token"
        )
    return SessionExpiredError(message, status=401, code="token_expired")


__all__ += ["EXPIRY_MARGIN", "async_source", "sync_source"]
