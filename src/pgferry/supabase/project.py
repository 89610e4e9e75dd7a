"""One Supabase project as pgferry's services see it: its URLs, keys, token verification and shared HTTP clients.

A :class:`SupabaseProject` is built once per process (usually :meth:`SupabaseProject.from_settings`) and handed to
every :class:`~pgferry.supabase.auth.AuthService`, :class:`~pgferry.supabase.storage.StorageService` and
:class:`~pgferry.supabase.functions.FunctionsService`. It owns:

* the public ``anon`` (publishable) key, sent as ``apikey`` with every user request;
* the **service-role key**, read from ``SUPABASE_SERVICE_ROLE_KEY`` only. Only the ``with_service_role``
  constructors, which server code calls explicitly, ever send it; user-facing calls refuse it as a user token
  (:func:`refuse_privileged_token`), so a client cannot smuggle it in through a request;
* token verification through :mod:`pgferry.sync.auth` (HS256 secret and/or JWKS with rotation), for async callers
  directly and for sync callers through a private event-loop thread (the verifier's JWKS cache and lock belong to
  one loop);
* one cookie-less ``httpx`` client per flavour (:mod:`pgferry.supabase._http`), shared by all services and users.

Must not hold any user's token: sessions live in ``AuthService`` instances, tokens are passed per service.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from typing import Any, Final, Self, TypeVar

import httpx

from pgferry.config import Settings
from pgferry.errors import ConfigError
from pgferry.supabase._http import new_async_client, new_sync_client
from pgferry.supabase.errors import ServiceRoleKeyRefusedError
from pgferry.sync.auth import AuthenticatedUser, TokenVerifier

__all__ = ["DEFAULT_TIMEOUT", "SupabaseProject", "refuse_privileged_token", "unverified_claims"]

DEFAULT_TIMEOUT: Final = 30.0
_T = TypeVar("_T")


def unverified_claims(token: str) -> dict[str, Any] | None:
    """A JWT's payload *without* verifying it, or ``None`` when the token is not a JWT.

    Only for decisions that fail closed (refusing a service-role token, noticing that a token has already
    expired); never for deciding who a user is.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def refuse_privileged_token(token: str, service_role_key: str | None = None) -> None:
    """Raise :class:`ServiceRoleKeyRefusedError` when ``token`` is a service-role credential: the configured key
    itself, any ``sb_secret_…`` key, or any JWT whose ``role`` claim is ``service_role``."""
    if service_role_key and hmac.compare_digest(token.encode(), service_role_key.encode()):
        raise ServiceRoleKeyRefusedError(
            "refused the service-role key as a user's token: user calls take the user's access token; server code "
            "that must bypass row-level security uses the with_service_role constructor"
        )
    claims = unverified_claims(token)
    if token.startswith("sb_secret_") or (claims is not None and claims.get("role") == "service_role"):
        raise ServiceRoleKeyRefusedError(
            "refused a service-role token as a user's token: user calls take the user's access token; server code "
            "that must bypass row-level security uses the with_service_role constructor"
        )


class _LoopThread:
    """A private event loop in a daemon thread, for running async verification from synchronous code (even code
    that is itself called from inside another running loop)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="pgferry-supabase-verify", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            loop = self._loop
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result(timeout)

    def stop(self, cleanup: Coroutine[Any, Any, None] | None = None) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            if cleanup is not None:
                cleanup.close()
            return
        if cleanup is not None:
            asyncio.run_coroutine_threadsafe(cleanup, loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class SupabaseProject:
    """URLs, keys, verification and HTTP clients of one project; ``close()``/``aclose()`` (or ``with``) at the end.

    ``url`` is the project's base URL (``https://<ref>.supabase.co``; the services add ``/auth/v1``,
    ``/storage/v1``, ``/functions/v1``). ``jwt_secret`` and/or ``jwks_url`` configure verification of access
    tokens; ``jwks_url`` defaults to the project's own ``/auth/v1/.well-known/jwks.json`` when no secret is given.
    ``timeout`` is the default per-request timeout; ``verifier_options`` go to
    :class:`~pgferry.sync.auth.TokenVerifier` (``leeway``, ``jwks_ttl``, ``jwks_min_refetch``).
    """

    def __init__(
        self,
        url: str,
        anon_key: str,
        *,
        service_role_key: str | None = None,
        jwt_secret: str | None = None,
        jwks_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        verifier_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError("SUPABASE_URL", "must be an http(s) URL like https://<project-ref>.supabase.co")
        if not anon_key:
            raise ConfigError("SUPABASE_ANON_KEY", "is not set; copy the project's anon (publishable) key")
        anon_claims = unverified_claims(anon_key)
        if anon_key.startswith("sb_secret_") or (anon_claims or {}).get("role") == "service_role":
            raise ConfigError(
                "SUPABASE_ANON_KEY",
                "holds the service-role key; put the anon (publishable) key here and the service-role key only in "
                "SUPABASE_SERVICE_ROLE_KEY",
            )
        self.url = url.rstrip("/")
        self._anon_key = anon_key
        self._service_role_key = service_role_key or None
        if not jwt_secret and not jwks_url:
            jwks_url = f"{self.url}/auth/v1/.well-known/jwks.json"
        self._verifier_options: dict[str, Any] = {
            "jwt_secret": jwt_secret or None,
            "jwks_url": jwks_url or None,
            "supabase_url": self.url,
            **(verifier_options or {}),
        }
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sync_http: httpx.Client | None = None
        self._async_http: httpx.AsyncClient | None = None
        self._async_verifier: TokenVerifier | None = None
        self._sync_verifier: TokenVerifier | None = None
        self._verify_loop = _LoopThread()

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout: float = DEFAULT_TIMEOUT) -> SupabaseProject:
        """The project configured by ``SUPABASE_URL``, ``SUPABASE_ANON_KEY``, ``SUPABASE_SERVICE_ROLE_KEY`` (optional,
        server-side only), ``SUPABASE_JWT_SECRET`` / ``SUPABASE_JWKS_URL``; :class:`ConfigError` naming the variable
        when one is missing."""
        if not settings.supabase_url:
            raise ConfigError("SUPABASE_URL", "is not set; use the project URL, https://<project-ref>.supabase.co")
        if settings.supabase_anon_key is None:
            raise ConfigError("SUPABASE_ANON_KEY", "is not set; copy the project's anon (publishable) key")
        service = settings.supabase_service_role_key
        secret = settings.supabase_jwt_secret
        return cls(
            settings.supabase_url,
            settings.supabase_anon_key.get_secret_value(),
            service_role_key=service.get_secret_value() if service else None,
            jwt_secret=secret.get_secret_value() if secret else None,
            jwks_url=settings.supabase_jwks_url,
            timeout=timeout,
        )

    def __repr__(self) -> str:
        return f"SupabaseProject({self.url!r}, service_role={'yes' if self._service_role_key else 'no'})"

    # -- endpoints and keys ---------------------------------------------------------------------------------------

    @property
    def auth_url(self) -> str:
        return f"{self.url}/auth/v1"

    @property
    def storage_url(self) -> str:
        return f"{self.url}/storage/v1"

    @property
    def functions_url(self) -> str:
        return f"{self.url}/functions/v1"

    @property
    def anon_key(self) -> str:
        """The public key: it identifies the project and grants nothing beyond the ``anon`` role."""
        return self._anon_key

    @property
    def has_service_role(self) -> bool:
        return self._service_role_key is not None

    def service_role_key(self) -> str:
        """The service-role key, for the server-side ``with_service_role`` constructors only; :class:`ConfigError`
        when ``SUPABASE_SERVICE_ROLE_KEY`` is not configured."""
        if self._service_role_key is None:
            raise ConfigError(
                "SUPABASE_SERVICE_ROLE_KEY",
                "is not set; server-side calls that bypass row-level security need it (never give it to a client)",
            )
        return self._service_role_key

    def refuse_privileged(self, token: str) -> None:
        """:func:`refuse_privileged_token` against this project's own service-role key as well."""
        refuse_privileged_token(token, self._service_role_key)

    # -- shared HTTP clients --------------------------------------------------------------------------------------

    def http(self) -> httpx.Client:
        with self._lock:
            if self._sync_http is None:
                self._sync_http = new_sync_client(self.timeout)
            return self._sync_http

    def async_http(self) -> httpx.AsyncClient:
        with self._lock:
            if self._async_http is None:
                self._async_http = new_async_client(self.timeout)
            return self._async_http

    # -- verification ---------------------------------------------------------------------------------------------

    async def verify(self, token: str) -> AuthenticatedUser:
        """Verify a user's access token on the caller's event loop (see :class:`pgferry.sync.auth.TokenVerifier`)."""
        if self._async_verifier is None:
            self._async_verifier = TokenVerifier(**self._verifier_options)
        return await self._async_verifier.verify(token)

    def verify_sync(self, token: str) -> AuthenticatedUser:
        """:meth:`verify` for synchronous code, on the project's private verification loop."""
        if self._sync_verifier is None:
            self._sync_verifier = TokenVerifier(**self._verifier_options)
        return self._verify_loop.run(self._sync_verifier.verify(token), timeout=self.timeout + 5)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the synchronous client and stop the verification thread (async resources: :meth:`aclose`)."""
        with self._lock:
            client, self._sync_http = self._sync_http, None
        if client is not None:
            client.close()
        verifier, self._sync_verifier = self._sync_verifier, None
        self._verify_loop.stop(verifier.aclose() if verifier is not None else None)

    async def aclose(self) -> None:
        """Close everything, async resources included."""
        with self._lock:
            client, self._async_http = self._async_http, None
        if client is not None:
            await client.aclose()
        verifier, self._async_verifier = self._async_verifier, None
        if verifier is not None:
            await verifier.aclose()
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
