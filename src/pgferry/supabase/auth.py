"""AuthService: sign users up and in through supabase-py's auth client, and trust the result only once verified.

One :class:`AuthService` (or :class:`AsyncAuthService`) is *one user's session*, like a signed-in Supabase client:
``sign_up``, ``sign_in`` (email and password), ``sign_out``, ``get_current_user``, ``refresh`` and
``on_auth_state_change``. A server acting for many users creates one per user (cheap: the HTTP pool is the
project's); instances never share a session.

What it adds to supabase-py's ``SyncGoTrueClient`` / ``AsyncGoTrueClient``:

* **Verification.** Every access token GoTrue hands out (sign-in, sign-up with autoconfirm, refresh) is verified
  by :mod:`pgferry.sync.auth` (signature by the project's HS256 secret or JWKS key with rotation, ``exp``, ``aud``,
  ``iss``, ``role=authenticated``) and its ``sub`` must be the returned user's id. A session that fails is signed
  out locally and discarded (:class:`~pgferry.supabase.errors.UntrustedTokenError`); listeners never see it.
* **Named errors.** Every GoTrue error becomes a class of :mod:`pgferry.supabase.errors` with a one-line message
  saying what to do. The code is read from the response body as sent (``code`` in the 2024-01-01 API, else
  ``error_code``, else the OAuth-style ``error_description``), not from supabase-py's ``AuthApiError.code``, which is
  ``None`` whenever the ``X-Supabase-Api-Version`` header was not echoed.
* **Refresh once.** supabase-py's background refresh timers are off (no threads per session in a server); an
  expiring session is refreshed on use, and a token GoTrue refuses is refreshed once and the call retried; a second
  refusal is a :class:`~pgferry.supabase.errors.SessionExpiredError`.
* **Events after verification.** ``on_auth_state_change`` callbacks get pgferry's :class:`AuthSession` (verified) or
  ``None``, after the call that caused the event has verified it.

An ``AuthService`` is also a :class:`~pgferry.supabase.tokens.TokenSource`, so Storage and Functions calls made
with it refresh the session when needed. It never sends the service-role key: only the anon key goes as ``apikey``.

Must not touch the database; sessions live in memory only (``persist_session=False``).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

import pydantic
import structlog
from supabase_auth import AsyncGoTrueClient, SyncGoTrueClient
from supabase_auth.errors import (
    AuthApiError,
    AuthError,
    AuthInvalidCredentialsError,
    AuthRetryableError,
    AuthSessionMissingError,
    AuthWeakPasswordError,
)
from supabase_auth.types import Session as GoTrueSession
from supabase_auth.types import User as GoTrueUser

from pgferry.supabase._http import Exchange, call_scope
from pgferry.supabase.errors import (
    AuthRateLimitedError,
    AuthServiceError,
    AuthUnavailableError,
    EmailNotConfirmedError,
    InvalidAccessTokenError,
    InvalidCredentialsError,
    NotSignedInError,
    SessionExpiredError,
    SignupDisabledError,
    UntrustedTokenError,
    UserAlreadyExistsError,
    UserBannedError,
    ValidationFailedError,
    WeakPasswordError,
    server_text,
)
from pgferry.supabase.project import SupabaseProject
from pgferry.supabase.tokens import expired_token_error, is_expired
from pgferry.sync.auth import AuthenticatedUser, InvalidTokenError, KeySetUnavailableError

__all__ = [
    "AsyncAuthService",
    "AuthEvent",
    "AuthService",
    "AuthSession",
    "SignOutScope",
    "SignUpResult",
    "User",
    "auth_error",
]

log = structlog.get_logger(__name__)

AuthEvent = str
"""``SIGNED_IN``, ``TOKEN_REFRESHED``, ``SIGNED_OUT``, ``USER_UPDATED`` (supabase-py's event names)."""
SignOutScope = Literal["global", "local", "others"]
Listener = Callable[[AuthEvent, "AuthSession | None"], None]
_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class User:
    """A Supabase Auth user as GoTrue returned it (identity fields only; metadata read-only)."""

    id: uuid.UUID
    email: str | None
    phone: str | None
    confirmed: bool
    is_anonymous: bool
    created_at: datetime | None
    app_metadata: Mapping[str, Any] = field(repr=False)
    user_metadata: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_gotrue(cls, user: GoTrueUser) -> User:
        try:
            user_id = uuid.UUID(user.id)
        except ValueError:
            raise AuthUnavailableError("Supabase Auth returned a user whose id is not a UUID; retry later") from None
        return cls(
            id=user_id,
            email=user.email or None,
            phone=user.phone or None,
            confirmed=bool(user.email_confirmed_at or user.phone_confirmed_at or user.confirmed_at),
            is_anonymous=user.is_anonymous,
            created_at=user.created_at,
            app_metadata=MappingProxyType(dict(user.app_metadata)),
            user_metadata=MappingProxyType(dict(user.user_metadata)),
        )


@dataclass(frozen=True, slots=True)
class AuthSession:
    """A signed-in user's session whose access token pgferry has verified; tokens are kept out of ``repr``."""

    user: User
    verified: AuthenticatedUser = field(repr=False)
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: int

    @property
    def user_id(self) -> uuid.UUID:
        return self.verified.user_id


@dataclass(frozen=True, slots=True)
class SignUpResult:
    """``session`` is ``None`` when the project requires email confirmation (``confirmation_required``): the user
    exists but must follow the emailed link before signing in. GoTrue answers the same way, with an obfuscated user,
    when the address already belongs to a confirmed user (so sign-up cannot be used to probe for accounts)."""

    user: User
    session: AuthSession | None

    @property
    def confirmation_required(self) -> bool:
        return self.session is None


# ---------------------------------------------------------------------------------------------------------------
# GoTrue errors
# ---------------------------------------------------------------------------------------------------------------

_SIGN_IN_AGAIN: Final = "sign in again"
_BY_CODE: Final[dict[str, tuple[type[AuthServiceError], str]]] = {
    "invalid_credentials": (
        InvalidCredentialsError,
        "sign-in refused: wrong email or password; check both, or reset the password",
    ),
    "email_not_confirmed": (
        EmailNotConfirmedError,
        "the email address is not confirmed yet; follow the link in the confirmation email (or resend it), then "
        "sign in",
    ),
    "phone_not_confirmed": (
        EmailNotConfirmedError,
        "the phone number is not confirmed yet; verify it with the code sent by SMS, then sign in",
    ),
    "weak_password": (
        WeakPasswordError,
        "the password is too weak{reasons}; choose a longer password that mixes character kinds and has not "
        "appeared in a data breach",
    ),
    "user_already_exists": (
        UserAlreadyExistsError,
        "a user with this email address is already registered; sign in instead, or reset the password",
    ),
    "email_exists": (
        UserAlreadyExistsError,
        "a user with this email address is already registered; sign in instead, or reset the password",
    ),
    "phone_exists": (
        UserAlreadyExistsError,
        "a user with this phone number is already registered; sign in instead",
    ),
    "signup_disabled": (
        SignupDisabledError,
        "sign-ups are disabled for this project; enable them under Authentication > Providers, or have an "
        "administrator create the user",
    ),
    "email_provider_disabled": (
        SignupDisabledError,
        "email and password sign-up/sign-in is disabled for this project; enable the Email provider under "
        "Authentication > Providers",
    ),
    "anonymous_provider_disabled": (
        SignupDisabledError,
        "anonymous sign-ins are disabled for this project; enable them under Authentication > Providers",
    ),
    "user_banned": (
        UserBannedError,
        "the user is banned; an administrator must lift the ban before this user can sign in",
    ),
    "validation_failed": (ValidationFailedError, "Supabase Auth refused the request as invalid; fix the input"),
    "email_address_invalid": (ValidationFailedError, "the email address is not accepted; use a valid address"),
    "email_address_not_authorized": (
        ValidationFailedError,
        "the project's email provider may not send to this address; configure custom SMTP or use an authorized address",
    ),
    "over_request_rate_limit": (
        AuthRateLimitedError,
        "too many requests to Supabase Auth from this client; wait, then retry",
    ),
    "over_email_send_rate_limit": (
        AuthRateLimitedError,
        "the project's email sending limit is reached; wait before requesting another email, or configure custom SMTP",
    ),
    "over_sms_send_rate_limit": (
        AuthRateLimitedError,
        "the project's SMS sending limit is reached; wait before requesting another code",
    ),
    "refresh_token_not_found": (
        SessionExpiredError,
        f"the session's refresh token is unknown (signed out or revoked); {_SIGN_IN_AGAIN}",
    ),
    "refresh_token_already_used": (
        SessionExpiredError,
        f"the session's refresh token was already used (another client refreshed it first); {_SIGN_IN_AGAIN}",
    ),
    "session_not_found": (SessionExpiredError, f"the session no longer exists (signed out); {_SIGN_IN_AGAIN}"),
    "session_expired": (SessionExpiredError, f"the session expired; {_SIGN_IN_AGAIN}"),
    "bad_jwt": (InvalidAccessTokenError, f"Supabase Auth refused the access token (bad or expired); {_SIGN_IN_AGAIN}"),
    "no_authorization": (
        InvalidAccessTokenError,
        f"the request carried no access token; {_SIGN_IN_AGAIN}",
    ),
    "user_not_found": (
        InvalidAccessTokenError,
        f"the access token's user no longer exists; {_SIGN_IN_AGAIN} (or sign up)",
    ),
    "unexpected_failure": (AuthUnavailableError, "Supabase Auth failed on its side; retry later"),
}
# Before error codes (and in OAuth-style bodies) only the text says what happened.
_BY_TEXT: Final = (
    ("invalid refresh token", "refresh_token_not_found"),
    ("invalid login credentials", "invalid_credentials"),
    ("email not confirmed", "email_not_confirmed"),
    ("user already registered", "user_already_exists"),
    ("signups not allowed", "signup_disabled"),
)


def _retry_after(exchange: Exchange | None) -> float | None:
    value = exchange.headers.get("retry-after") if exchange is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _body_fields(exchange: Exchange | None) -> tuple[str | None, str, dict[str, Any]]:
    """(code, message, body) from a GoTrue error body in any of its three shapes."""
    body = exchange.json() if exchange is not None else None
    if not isinstance(body, dict):
        return None, exchange.text() if exchange is not None else "", {}
    code: str | None = None
    for key in ("code", "error_code"):  # 2024-01-01 API: "code" is a string; legacy: "code" is the HTTP status
        if isinstance(body.get(key), str):
            code = body[key]
            break
    message = ""
    for key in ("msg", "message", "error_description", "error"):
        if isinstance(body.get(key), str):
            message = body[key]
            break
    if code is None and message:
        lowered = message.lower()
        code = next((c for text, c in _BY_TEXT if text in lowered), None)
    return code, message, body


def auth_error(exc: AuthError, exchange: Exchange | None, auth_url: str) -> AuthServiceError:
    """The named pgferry error for a supabase-py ``AuthError`` and the response that caused it (if any)."""
    if isinstance(exc, AuthSessionMissingError):
        return NotSignedInError("no signed-in session; call sign_in (or sign_up) first")
    if isinstance(exc, AuthInvalidCredentialsError):  # raised by supabase-py before any request
        return ValidationFailedError("an email address and a password are both required")
    status = exchange.status if exchange is not None else getattr(exc, "status", None)
    if isinstance(exc, AuthRetryableError) and (exchange is None or status == 0):
        return AuthUnavailableError(
            f"cannot reach Supabase Auth at {auth_url} ({server_text(exc.message)}); check SUPABASE_URL and the "
            "network, then retry"
        )
    code, message, body = _body_fields(exchange)
    if code is None and isinstance(exc, AuthApiError) and isinstance(exc.code, str):
        code = exc.code
    detail = f"Supabase Auth {code or 'error'}, HTTP {status}" + (f": {server_text(message)}" if message else "")
    fields: dict[str, Any] = {"status": status, "code": code, "retry_after": _retry_after(exchange)}
    if code in _BY_CODE:
        cls, text = _BY_CODE[code]
        if cls is WeakPasswordError:
            reasons = _weak_reasons(exc, body)
            text = text.format(reasons=f" ({', '.join(reasons)})" if reasons else "")
            return WeakPasswordError(f"{text} ({detail})", reasons=reasons, **fields)
        return cls(f"{text} ({detail})", **fields)
    if isinstance(exc, AuthWeakPasswordError):
        reasons = _weak_reasons(exc, body)
        text = _BY_CODE["weak_password"][1].format(reasons=f" ({', '.join(reasons)})" if reasons else "")
        return WeakPasswordError(f"{text} ({detail})", reasons=reasons, **fields)
    if status == 429:
        return AuthRateLimitedError(f"too many requests to Supabase Auth; wait, then retry ({detail})", **fields)
    if (status is not None and status >= 500) or isinstance(exc, AuthRetryableError):
        return AuthUnavailableError(f"Supabase Auth failed on its side; retry later ({detail})", **fields)
    if status in (401, 403):
        return InvalidAccessTokenError(f"Supabase Auth refused the access token; {_SIGN_IN_AGAIN} ({detail})", **fields)
    return AuthServiceError(f"Supabase Auth refused the request ({detail})", **fields)


def _weak_reasons(exc: AuthError, body: Mapping[str, Any]) -> tuple[str, ...]:
    weak = body.get("weak_password")
    reasons = weak.get("reasons") if isinstance(weak, dict) else None
    if not isinstance(reasons, list) and isinstance(exc, AuthWeakPasswordError):
        reasons = list(exc.reasons)
    return tuple(str(r) for r in reasons) if isinstance(reasons, list) else ()


def _malformed(auth_url: str) -> AuthUnavailableError:
    return AuthUnavailableError(
        f"Supabase Auth at {auth_url} answered with a body that is not a GoTrue response; check SUPABASE_URL (a proxy "
        "or a wrong URL answers like this) and retry"
    )


# ---------------------------------------------------------------------------------------------------------------
# The shared part of both services
# ---------------------------------------------------------------------------------------------------------------


class _AuthBase:
    """Session state, event queue and conversions; no I/O (the sync and async layers do that)."""

    def __init__(self, project: SupabaseProject) -> None:
        self._project = project
        self._session: AuthSession | None = None
        self._listeners: dict[int, Listener] = {}
        self._next_listener = 0
        self._pending: list[tuple[AuthEvent, GoTrueSession | None]] = []

    @property
    def project(self) -> SupabaseProject:
        return self._project

    @property
    def session(self) -> AuthSession | None:
        """The current verified session, or ``None`` when signed out."""
        return self._session

    def on_auth_state_change(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(event, session)`` after each sign-in, refresh, update and sign-out (session verified, or
        ``None`` on sign-out); returns the function that unsubscribes it."""
        key = self._next_listener
        self._next_listener += 1
        self._listeners[key] = callback

        def unsubscribe() -> None:
            self._listeners.pop(key, None)

        return unsubscribe

    def _gotrue_options(self) -> dict[str, Any]:
        # Only the public key: user calls add the user's token per request. No timers, no storage.
        return {
            "url": self._project.auth_url,
            "headers": {"apikey": self._project.anon_key},
            "auto_refresh_token": False,
            "persist_session": False,
        }

    def _queue(self, event: AuthEvent, session: GoTrueSession | None) -> None:
        self._pending.append((event, session))

    def _take(self) -> list[tuple[AuthEvent, GoTrueSession | None]]:
        pending, self._pending = self._pending, []
        return pending

    def _known_verification(self, session: GoTrueSession) -> AuthenticatedUser | None:
        """The verification of ``session``'s access token when it is the current one (a refresh can return the
        same token with a new refresh token: the new refresh token must still be adopted)."""
        if self._session is not None and self._session.access_token == session.access_token:
            return self._session.verified
        return None

    def _adopt(self, session: GoTrueSession, verified: AuthenticatedUser) -> AuthSession:
        user = User.from_gotrue(session.user)
        if verified.user_id != user.id:
            raise UntrustedTokenError(
                "Supabase Auth issued an access token for another user than the one it signed in; the session was "
                "discarded; check that SUPABASE_URL points at the project itself"
            )
        expires_at = session.expires_at or int(verified.claims.get("exp", 0))
        self._session = AuthSession(
            user=user,
            verified=verified,
            access_token=session.access_token,
            refresh_token=session.refresh_token,
            expires_at=expires_at,
        )
        return self._session

    def _deliver(self, events: list[tuple[AuthEvent, AuthSession | None]]) -> None:
        for event, session in events:
            for listener in list(self._listeners.values()):
                try:
                    listener(event, session)
                except Exception as exc:  # a listener's bug must not undo a sign-in that succeeded
                    log.warning("auth listener failed", auth_event=event, error=type(exc).__name__)

    def _require_session(self) -> AuthSession:
        if self._session is None:
            raise NotSignedInError("no signed-in session; call sign_in (or sign_up) first")
        return self._session

    def _untrusted(self, exc: Exception) -> AuthServiceError:
        if isinstance(exc, KeySetUnavailableError):
            return AuthUnavailableError(
                f"cannot verify the session's access token: {exc}; the session was discarded, sign in again once "
                "the JWKS is reachable"
            )
        reason = exc.reason if isinstance(exc, InvalidTokenError) else type(exc).__name__
        return UntrustedTokenError(
            f"Supabase Auth issued a session whose access token pgferry refuses ({reason}); the session was discarded; "
            "check that SUPABASE_JWT_SECRET / SUPABASE_JWKS_URL belong to the project at SUPABASE_URL"
        )


def _user_from(response: Any) -> GoTrueUser | None:
    user = getattr(response, "user", None)
    return user if isinstance(user, GoTrueUser) else None


# ---------------------------------------------------------------------------------------------------------------
# Sync
# ---------------------------------------------------------------------------------------------------------------


class AuthService(_AuthBase):
    """One user's Supabase Auth session, synchronous. Thread-safe (one call at a time)."""

    def __init__(self, project: SupabaseProject) -> None:
        super().__init__(project)
        self._client = SyncGoTrueClient(http_client=project.http(), **self._gotrue_options())
        self._client.on_auth_state_change(self._queue)
        self._lock = threading.RLock()

    def _call(self, fn: Callable[[], _T]) -> _T:
        with call_scope() as record:
            try:
                return fn()
            except AuthError as exc:
                raise auth_error(exc, record.last, self._project.auth_url) from exc
            except (pydantic.ValidationError, ValueError) as exc:
                raise _malformed(self._project.auth_url) from exc

    def _settle(self) -> AuthSession | None:
        """Verify the sessions supabase-py reported since the last call, adopt the last, deliver the events."""
        events: list[tuple[AuthEvent, AuthSession | None]] = []
        for event, session in self._take():
            if session is None:
                self._session = None
            elif (known := self._known_verification(session)) is not None:
                self._adopt(session, known)
            else:
                try:
                    verified = self._project.verify_sync(session.access_token)
                    self._adopt(session, verified)
                except (InvalidTokenError, KeySetUnavailableError, UntrustedTokenError) as exc:
                    self._discard()
                    raise (exc if isinstance(exc, UntrustedTokenError) else self._untrusted(exc)) from None
            events.append((event, self._session))
        self._deliver(events)
        return self._session

    def _discard(self) -> None:
        self._session = None
        try:
            self._client.sign_out({"scope": "local"})
        except Exception as exc:  # best effort: the session is dropped locally whatever the server says
            log.info("could not revoke a discarded session", error=type(exc).__name__)
        self._take()

    def sign_up(
        self, email: str, password: str, *, data: Mapping[str, Any] | None = None, redirect_to: str | None = None
    ) -> SignUpResult:
        """Create a user with email and password; ``data`` becomes ``user_metadata``."""
        options: dict[str, Any] = {}
        if data:
            options["data"] = dict(data)
        if redirect_to:
            options["email_redirect_to"] = redirect_to
        with self._lock:
            response = self._call(
                lambda: self._client.sign_up({"email": email, "password": password, "options": options})  # type: ignore[typeddict-item]
            )
            session = self._settle() if response.session else None
            user = _user_from(response)
            if user is None:
                raise _malformed(self._project.auth_url)
            return SignUpResult(user=User.from_gotrue(user), session=session)

    def sign_in(self, email: str, password: str) -> AuthSession:
        """Sign in with email and password; returns the verified session."""
        with self._lock:
            self._call(lambda: self._client.sign_in_with_password({"email": email, "password": password}))
            session = self._settle()
            if session is None:
                raise _malformed(self._project.auth_url)
            return session

    def refresh(self) -> AuthSession:
        """Exchange the refresh token for a new session now; :class:`SessionExpiredError` when it cannot be."""
        with self._lock:
            current = self._require_session()
            try:
                self._call(lambda: self._client.refresh_session(current.refresh_token))
            except (SessionExpiredError, InvalidAccessTokenError, UserBannedError) as exc:
                self._session = None
                self._take()
                if isinstance(exc, SessionExpiredError):
                    raise
                raise SessionExpiredError(f"the session could not be refreshed: {exc}", status=exc.status) from exc
            session = self._settle()
            if session is None:
                raise expired_token_error(can_refresh=True)
            return session

    def get_current_user(self) -> User:
        """The signed-in user as Supabase Auth sees it now (``GET /auth/v1/user``); an expired or refused token is
        refreshed once and the call retried."""
        with self._lock:
            self._require_session()
            try:
                response = self._call(self._client.get_user)
                self._settle()
            except InvalidAccessTokenError as first:
                self.refresh()
                try:
                    response = self._call(self._client.get_user)
                    self._settle()
                except InvalidAccessTokenError:
                    raise expired_token_error(can_refresh=True, after_refresh=True) from first
            user = _user_from(response)
            if user is None:
                raise NotSignedInError("no signed-in session; call sign_in (or sign_up) first")
            return User.from_gotrue(user)

    def sign_out(self, scope: SignOutScope = "global") -> None:
        """Revoke the session's refresh tokens (``global``: all the user's sessions, supabase-py's default;
        ``local``: this one; ``others``: all but this one) and forget it locally (except for ``others``). Access
        tokens already issued stay valid until they expire (JWTs cannot be recalled)."""
        with self._lock:
            if self._session is None:
                return
            self._call(lambda: self._client.sign_out({"scope": scope}))
            self._settle()

    # TokenSource
    def access_token(self) -> str:
        with self._lock:
            session = self._require_session()
            if is_expired(session.access_token):
                return self.refresh().access_token
            return session.access_token

    def refreshed_access_token(self) -> str | None:
        return self.refresh().access_token


# ---------------------------------------------------------------------------------------------------------------
# Async
# ---------------------------------------------------------------------------------------------------------------


class AsyncAuthService(_AuthBase):
    """One user's Supabase Auth session, for asyncio. Safe for concurrent tasks (one call at a time)."""

    def __init__(self, project: SupabaseProject) -> None:
        super().__init__(project)
        self._client = AsyncGoTrueClient(http_client=project.async_http(), **self._gotrue_options())
        self._client.on_auth_state_change(self._queue)
        self._lock = asyncio.Lock()

    async def _call(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        with call_scope() as record:
            try:
                return await fn()
            except AuthError as exc:
                raise auth_error(exc, record.last, self._project.auth_url) from exc
            except (pydantic.ValidationError, ValueError) as exc:
                raise _malformed(self._project.auth_url) from exc

    async def _settle(self) -> AuthSession | None:
        events: list[tuple[AuthEvent, AuthSession | None]] = []
        for event, session in self._take():
            if session is None:
                self._session = None
            elif (known := self._known_verification(session)) is not None:
                self._adopt(session, known)
            else:
                try:
                    verified = await self._project.verify(session.access_token)
                    self._adopt(session, verified)
                except (InvalidTokenError, KeySetUnavailableError, UntrustedTokenError) as exc:
                    await self._discard()
                    raise (exc if isinstance(exc, UntrustedTokenError) else self._untrusted(exc)) from None
            events.append((event, self._session))
        self._deliver(events)
        return self._session

    async def _discard(self) -> None:
        self._session = None
        try:
            await self._client.sign_out({"scope": "local"})
        except Exception as exc:
            log.info("could not revoke a discarded session", error=type(exc).__name__)
        self._take()

    async def sign_up(
        self, email: str, password: str, *, data: Mapping[str, Any] | None = None, redirect_to: str | None = None
    ) -> SignUpResult:
        options: dict[str, Any] = {}
        if data:
            options["data"] = dict(data)
        if redirect_to:
            options["email_redirect_to"] = redirect_to
        async with self._lock:
            response = await self._call(
                lambda: self._client.sign_up({"email": email, "password": password, "options": options})  # type: ignore[typeddict-item]
            )
            session = await self._settle() if response.session else None
            user = _user_from(response)
            if user is None:
                raise _malformed(self._project.auth_url)
            return SignUpResult(user=User.from_gotrue(user), session=session)

    async def sign_in(self, email: str, password: str) -> AuthSession:
        async with self._lock:
            await self._call(lambda: self._client.sign_in_with_password({"email": email, "password": password}))
            session = await self._settle()
            if session is None:
                raise _malformed(self._project.auth_url)
            return session

    async def refresh(self) -> AuthSession:
        async with self._lock:
            return await self._refresh_locked()

    async def _refresh_locked(self) -> AuthSession:
        current = self._require_session()
        try:
            await self._call(lambda: self._client.refresh_session(current.refresh_token))
        except (SessionExpiredError, InvalidAccessTokenError, UserBannedError) as exc:
            self._session = None
            self._take()
            if isinstance(exc, SessionExpiredError):
                raise
            raise SessionExpiredError(f"the session could not be refreshed: {exc}", status=exc.status) from exc
        session = await self._settle()
        if session is None:
            raise expired_token_error(can_refresh=True)
        return session

    async def get_current_user(self) -> User:
        async with self._lock:
            self._require_session()
            try:
                response = await self._call(self._client.get_user)
                await self._settle()
            except InvalidAccessTokenError as first:
                await self._refresh_locked()
                try:
                    response = await self._call(self._client.get_user)
                    await self._settle()
                except InvalidAccessTokenError:
                    raise expired_token_error(can_refresh=True, after_refresh=True) from first
            user = _user_from(response)
            if user is None:
                raise NotSignedInError("no signed-in session; call sign_in (or sign_up) first")
            return User.from_gotrue(user)

    async def sign_out(self, scope: SignOutScope = "global") -> None:
        async with self._lock:
            if self._session is None:
                return
            await self._call(lambda: self._client.sign_out({"scope": scope}))
            await self._settle()

    # AsyncTokenSource
    async def access_token(self) -> str:
        async with self._lock:
            session = self._require_session()
            if is_expired(session.access_token):
                return (await self._refresh_locked()).access_token
            return session.access_token

    async def refreshed_access_token(self) -> str | None:
        return (await self.refresh()).access_token
