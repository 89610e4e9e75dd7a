"""Verifying Supabase Auth access tokens, for the shape proxy (and anything else that must know *who* asks).

Electric applies no row-level security, so the proxy in front of it is the only place where a request becomes a
user; a bug here leaks every tenant's rows. Verification is therefore deliberately narrow:

* the algorithm is chosen by *configuration*, never by the token: HS256 only when the project's legacy JWT secret
  is configured, RS256/ES256 only with keys from the project's JWKS, and an asymmetric key is never used as an
  HMAC secret (the classic RS/HS confusion attack); ``alg: none`` is never accepted;
* signature, ``exp``/``nbf``/``iat`` (with a small leeway for clock skew between servers), ``aud`` ==
  ``authenticated`` and, when the Supabase URL is known, ``iss`` == ``<SUPABASE_URL>/auth/v1`` are all checked;
* only *user* tokens pass: ``role`` must be ``authenticated``. The legacy ``anon`` and ``service_role`` keys are
  JWTs signed with the same secret; accepting them here would let anyone holding the public anon key in, and a
  service-role token has no user to scope rows to;
* ``sub`` must be a UUID, because it becomes the value of the ownership predicate the proxy adds.

Errors carry a short *public* reason (safe to send back in a 401 and to log), never the token or the secret.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import httpx
import jwt

from pgferry.config import Settings
from pgferry.errors import ConfigError, PgferryError

__all__ = [
    "API_ROLES",
    "AUDIENCE",
    "USER_ROLE",
    "AuthenticatedUser",
    "ExpiredTokenError",
    "InvalidTokenError",
    "KeySetUnavailableError",
    "MissingTokenError",
    "NotAUserTokenError",
    "TokenVerifier",
    "bearer_token",
]

AUDIENCE: Final = "authenticated"
USER_ROLE: Final = "authenticated"
#: The roles Supabase's API keys and tokens carry (the public key, signed-in users, the server-only key).
API_ROLES: Final = frozenset({"anon", "authenticated", "service_role"})

#: Seconds of clock skew tolerated on ``exp``/``nbf``/``iat``. Small on purpose: it only absorbs drift between the
#: Auth server's clock and ours, it must not noticeably extend a token's life.
DEFAULT_LEEWAY: Final = 10.0
#: How long fetched JWKS keys are trusted before they are fetched again (Supabase rotates keys rarely and publishes
#: the next key ahead of use, so minutes are fine).
DEFAULT_JWKS_TTL: Final = 600.0
#: Minimum seconds between two fetches caused by an unknown ``kid``: without it, a client sending random ``kid``s
#: would turn every request into a request to the Auth server.
DEFAULT_JWKS_MIN_REFETCH: Final = 10.0

_ASYMMETRIC: Final = {"RS256": "RSA", "ES256": "EC"}
_HMAC: Final = "HS256"
_MAX_TOKEN_LENGTH: Final = 16 * 1024


class InvalidTokenError(PgferryError):
    """The request's bearer token does not identify a user; answer 401.

    ``reason`` is short, fixed text chosen here (never derived from the token), so it is safe in a response body,
    a ``WWW-Authenticate`` header and a log line.
    """

    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid access token: {self.reason}"


class MissingTokenError(InvalidTokenError):
    """No ``Authorization: Bearer`` header at all; separate so the 401 can omit ``error=invalid_token``
    (RFC 6750 §3.1: a request without credentials gets a bare challenge)."""


class ExpiredTokenError(InvalidTokenError):
    """The token was valid but has expired: the client should refresh its session, not log the user out."""


class NotAUserTokenError(InvalidTokenError):
    """A correctly signed token that is not a signed-in user's (an ``anon`` or ``service_role`` key)."""


class KeySetUnavailableError(PgferryError):
    """The JWKS endpoint could not be fetched or parsed: the server cannot verify *anyone* right now.

    Not an :class:`InvalidTokenError` on purpose: answering 401 would make clients discard good sessions, while
    this is our outage (the proxy answers 503).
    """


@dataclass(frozen=True, slots=True)
class AuthenticatedUser:
    """A verified user: ``user_id`` is the token's ``sub``; ``claims`` are all verified claims (read-only)."""

    user_id: uuid.UUID
    claims: Mapping[str, Any]


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value; :class:`MissingTokenError` /
    :class:`InvalidTokenError` otherwise. Only the header is accepted: tokens in URLs end up in access logs and
    caches."""
    if authorization is None or not authorization.strip():
        raise MissingTokenError("missing bearer token")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidTokenError("authorization header must be 'Bearer <token>'")
    return token


@dataclass
class _KeyCache:
    """Keys by ``kid`` from the last JWKS fetch, and when it happened (monotonic seconds)."""

    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    fetched_at: float | None = None


class TokenVerifier:
    """Checks Supabase access tokens against the project's legacy HS256 secret and/or its JWKS.

    One instance is shared by all requests of a server: it caches the JWKS (``jwks_ttl`` seconds) and refetches
    once when a token names a ``kid`` it does not know (key rotation), at most every ``jwks_min_refetch`` seconds.
    """

    def __init__(
        self,
        *,
        jwt_secret: str | None = None,
        jwks_url: str | None = None,
        supabase_url: str | None = None,
        leeway: float = DEFAULT_LEEWAY,
        jwks_ttl: float = DEFAULT_JWKS_TTL,
        jwks_min_refetch: float = DEFAULT_JWKS_MIN_REFETCH,
        http_timeout: float = 5.0,
    ) -> None:
        if not jwt_secret and not jwks_url:
            raise ConfigError(
                "SUPABASE_JWT_SECRET",
                "is not set and neither is SUPABASE_JWKS_URL; set one to verify users' access tokens (the JWT "
                "secret from the project's API settings, or https://<project-ref>.supabase.co/auth/v1/.well-known/"
                "jwks.json)",
            )
        self._secret = jwt_secret or None
        self._jwks_url = jwks_url or None
        self._issuer = f"{supabase_url.rstrip('/')}/auth/v1" if supabase_url else None
        self._leeway = leeway
        self._jwks_ttl = jwks_ttl
        self._jwks_min_refetch = jwks_min_refetch
        self._http_timeout = http_timeout
        self._cache = _KeyCache()
        self._lock: asyncio.Lock | None = None
        self._client: httpx.AsyncClient | None = None
        algorithms = []
        if self._secret:
            algorithms.append(_HMAC)
        if self._jwks_url:
            algorithms.extend(_ASYMMETRIC)
        self.algorithms: tuple[str, ...] = tuple(algorithms)

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> TokenVerifier:
        """The verifier for the configured project (``SUPABASE_JWT_SECRET``, ``SUPABASE_JWKS_URL``,
        ``SUPABASE_URL`` for the issuer); :class:`ConfigError` naming both variables when neither is set."""
        secret = settings.supabase_jwt_secret.get_secret_value() if settings.supabase_jwt_secret else None
        return cls(
            jwt_secret=secret, jwks_url=settings.supabase_jwks_url, supabase_url=settings.supabase_url, **options
        )

    @property
    def issuer(self) -> str | None:
        return self._issuer

    async def aclose(self) -> None:
        """Close the HTTP client used for JWKS fetches (if one was opened)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ----------------------------------------------------------------------------------------------------------
    # Verification
    # ----------------------------------------------------------------------------------------------------------

    async def verify_header(self, authorization: str | None) -> AuthenticatedUser:
        """Verify the token of an ``Authorization`` header value."""
        return await self.verify(bearer_token(authorization))

    async def verify(self, token: str) -> AuthenticatedUser:
        """The user a token identifies; :class:`InvalidTokenError` (or a subclass) when it does not, and
        :class:`KeySetUnavailableError` when the JWKS is needed but cannot be fetched."""
        return self._user(await self._claims(token, user=True))

    async def verify_api_token(self, token: str, *, roles: frozenset[str] = API_ROLES) -> Mapping[str, Any]:
        """The verified claims of a token that acts for *any* Supabase API role, as Realtime accepts them: the
        public ``anon`` key and ``service_role`` keys as well as users' access tokens.

        Same algorithm rules and signature check as :meth:`verify`; ``role`` (one of ``roles``) and ``exp`` are
        required. A user's token (role ``authenticated``) must also pass everything :meth:`verify` checks (audience,
        issuer, a UUID ``sub``); the project's API keys carry neither audience nor the Auth server's issuer, so those
        checks apply to user tokens only. The caller decides what the role may do (Realtime lets PostgreSQL's RLS
        decide, as the role)."""
        claims = await self._claims(token, user=False)
        role = claims.get("role")
        if role not in roles:
            raise NotAUserTokenError(f"token role must be one of {', '.join(sorted(roles))}")
        if role == USER_ROLE:
            return (await self.verify(token)).claims
        return _freeze(claims)

    async def _claims(self, token: str, *, user: bool) -> dict[str, Any]:
        """Signature and time claims checked, with the key the configuration (never the token) allows; ``user``
        adds audience, issuer and ``sub``/``aud`` as required claims, else ``role`` is required."""
        if len(token) > _MAX_TOKEN_LENGTH:
            raise InvalidTokenError("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidTokenError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            # Covers "none", HS256 when only the JWKS is configured, and anything exotic.
            raise InvalidTokenError("token algorithm not accepted")
        key: Any
        if alg == _HMAC:
            key = self._secret
        else:
            key = await self._jwks_key(header.get("kid"), alg)
        return self._decode(token, key, alg, user=user)

    def _decode(self, token: str, key: Any, alg: str, *, user: bool) -> dict[str, Any]:
        checks: dict[str, Any] = (
            {"audience": AUDIENCE, "issuer": self._issuer, "options": {"require": ["exp", "sub", "aud"]}}
            if user
            else {"options": {"require": ["exp", "role"], "verify_aud": False}}
        )
        checks["options"]["verify_signature"] = True
        try:
            claims: dict[str, Any] = jwt.decode(token, key, algorithms=[alg], leeway=self._leeway, **checks)
        except jwt.ExpiredSignatureError:
            raise ExpiredTokenError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidTokenError("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise InvalidTokenError("wrong token audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidTokenError("wrong token issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidTokenError(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise InvalidTokenError("bad token signature") from None
        except jwt.PyJWTError:
            raise InvalidTokenError("malformed token") from None
        if user and self._issuer is None and "iss" not in claims:
            # Without a configured issuer PyJWT checks nothing; a Supabase token always has one, so its absence
            # means the token was minted by something else that happens to share the secret.
            raise InvalidTokenError("token lacks the 'iss' claim")
        return claims

    @staticmethod
    def _user(claims: dict[str, Any]) -> AuthenticatedUser:
        role = claims.get("role")
        if role != USER_ROLE:
            raise NotAUserTokenError("token is not a signed-in user's (role must be 'authenticated')")
        sub = claims.get("sub")
        try:
            user_id = uuid.UUID(sub) if isinstance(sub, str) else None
        except ValueError:
            user_id = None
        if user_id is None:
            raise InvalidTokenError("token subject is not a user id")
        return AuthenticatedUser(user_id=user_id, claims=_freeze(claims))

    # ----------------------------------------------------------------------------------------------------------
    # JWKS
    # ----------------------------------------------------------------------------------------------------------

    async def _jwks_key(self, kid: object, alg: str) -> jwt.PyJWK:
        if kid is not None and not isinstance(kid, str):
            raise InvalidTokenError("malformed token key id")
        now = time.monotonic()
        cache = self._cache
        if cache.fetched_at is None or now - cache.fetched_at > self._jwks_ttl:
            await self._refresh(force=True)
        key = self._pick(kid, alg)
        fetched_at = self._cache.fetched_at
        if key is None and fetched_at is not None and time.monotonic() - fetched_at >= self._jwks_min_refetch:
            # Perhaps the keys rotated since the last fetch: look once more, unless we just did.
            await self._refresh(force=False)
            key = self._pick(kid, alg)
        if key is None:
            raise InvalidTokenError("token signed with an unknown key")
        return key

    def _pick(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        keys = self._cache.keys
        if kid is None:
            # Tokens without a kid are only unambiguous when the set holds exactly one usable key.
            candidates = [key for key in keys.values() if _key_fits(key, alg)]
            return candidates[0] if len(candidates) == 1 else None
        key = keys.get(kid)
        if key is None or not _key_fits(key, alg):
            return None
        return key

    async def _refresh(self, *, force: bool) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        started = time.monotonic()
        async with self._lock:
            fetched_at = self._cache.fetched_at
            if fetched_at is not None and fetched_at >= started:
                return  # another request refreshed while we waited for the lock
            if not force and fetched_at is not None and started - fetched_at < self._jwks_min_refetch:
                return
            self._cache = _KeyCache(keys=await self._fetch(), fetched_at=time.monotonic())

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        assert self._jwks_url is not None
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._http_timeout, follow_redirects=False)
        try:
            response = await self._client.get(self._jwks_url, headers={"accept": "application/json"})
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KeySetUnavailableError(
                f"cannot fetch the JWKS from SUPABASE_JWKS_URL: {type(exc).__name__}"
            ) from None
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise KeySetUnavailableError("SUPABASE_JWKS_URL did not answer with a JWKS document ({'keys': [...]})")
        keys: dict[str, jwt.PyJWK] = {}
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            if entry.get("kty") not in _ASYMMETRIC.values():
                continue  # symmetric ("oct") keys in a public JWKS would be a misconfiguration; never use them
            try:
                key = jwt.PyJWK.from_dict(entry)
            except jwt.PyJWTError:
                continue  # a key type this server cannot use must not break the others
            keys[str(entry.get("kid", f"#{index}"))] = key
        return keys


def _key_fits(key: jwt.PyJWK, alg: str) -> bool:
    """Whether ``key`` may verify a token whose header says ``alg``: same key type, and the same algorithm when
    the JWK pins one (so an RSA key published for RS256 cannot be used for RS512, nor an EC key for RS256)."""
    # PyJWK infers ``algorithm_name`` from the key when the JWK has no ``alg`` (RSA → RS256, P-256 → ES256).
    return _ASYMMETRIC.get(alg) == key.key_type and key.algorithm_name == alg


def _freeze(claims: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(claims))
