"""The errors pgferry's Supabase services raise on purpose: one hierarchy under :class:`pgferry.errors.PgferryError`.

Every GoTrue, Storage and Edge Functions failure a caller can act on becomes a named class here, so code can catch
``InvalidCredentialsError`` instead of parsing ``AuthApiError.code`` strings (whose presence even depends on a
response header in supabase-py). Each message is one line: what happened, the service's code and HTTP status, and
what to do. Messages never carry tokens, keys or passwords (server text is passed through
:func:`pgferry.redaction.redact_text`). Every class pickles: the message is the only positional argument and the
structured fields (``status``, ``code``, ``retry_after``, ``reasons``) are keyword arguments kept in ``__dict__``.

This module owns the classes only; deciding which class a response becomes lives next to each service
(:mod:`pgferry.supabase.auth`, :mod:`pgferry.supabase.storage`, :mod:`pgferry.supabase.functions`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pgferry.errors import PgferryError
from pgferry.redaction import redact_text

__all__ = [
    "AuthRateLimitedError",
    "AuthServiceError",
    "AuthUnavailableError",
    "BucketNotFoundError",
    "EmailNotConfirmedError",
    "FunctionHttpError",
    "FunctionNotFoundError",
    "FunctionRateLimitedError",
    "FunctionRelayError",
    "FunctionTimeoutError",
    "FunctionUnavailableError",
    "FunctionsServiceError",
    "InvalidAccessTokenError",
    "InvalidCredentialsError",
    "InvalidObjectKeyError",
    "NotSignedInError",
    "ObjectExistsError",
    "ObjectNotFoundError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "ServiceRoleKeyRefusedError",
    "SessionExpiredError",
    "SignupDisabledError",
    "StorageAccessDeniedError",
    "StorageRateLimitedError",
    "StorageServiceError",
    "StorageUnavailableError",
    "SupabaseServiceError",
    "UnsupportedMediaTypeError",
    "UntrustedTokenError",
    "UserAlreadyExistsError",
    "UserBannedError",
    "ValidationFailedError",
    "WeakPasswordError",
    "server_text",
]

_MAX_SERVER_TEXT = 200


def server_text(text: str | None) -> str:
    """A server's error text made safe for a one-line message: secrets redacted, whitespace folded, truncated."""
    if not text:
        return ""
    folded = " ".join(redact_text(str(text)).split())
    return folded if len(folded) <= _MAX_SERVER_TEXT else folded[: _MAX_SERVER_TEXT - 3] + "..."


class SupabaseServiceError(PgferryError):
    """A Supabase service (Auth, Storage, Edge Functions) refused or failed a request.

    ``status`` is the HTTP status that carried the error (Storage's meaningful status is its body's ``statusCode``;
    both are kept, see :class:`StorageServiceError`); ``code`` the service's machine-readable error code when it
    sent one (``invalid_credentials``, ``NoSuchKey``, ``BOOT_ERROR``); ``retry_after`` seconds when the service
    said when to come back.
    """

    status: int | None
    code: str | None
    retry_after: float | None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RateLimitedError(SupabaseServiceError):
    """Too many requests (HTTP 429, GoTrue's ``over_*_rate_limit``, Storage's ``SlowDown``, Functions'
    ``RATE_LIMIT_EXCEEDED``); wait ``retry_after`` seconds (when known) and try again. Service-specific subclasses
    also derive from their service's base class."""


class ServiceRoleKeyRefusedError(SupabaseServiceError):
    """A user-facing call was handed the service-role key (or a ``service_role`` JWT, or an ``sb_secret_`` key)
    as the user's token. That key bypasses row-level security; it is accepted only by the server-side constructors
    (``…Service.with_service_role``) that read it from ``SUPABASE_SERVICE_ROLE_KEY``, never from a request."""


# ---------------------------------------------------------------------------------------------------------------
# Auth (GoTrue)
# ---------------------------------------------------------------------------------------------------------------


class AuthServiceError(SupabaseServiceError):
    """Supabase Auth (GoTrue) refused or failed a request; the subclasses name the cases a caller handles."""


class InvalidCredentialsError(AuthServiceError):
    """``invalid_credentials``: unknown email, wrong password, or a user without a password."""


class EmailNotConfirmedError(AuthServiceError):
    """``email_not_confirmed`` / ``phone_not_confirmed``: the user has not followed the confirmation link yet."""


class WeakPasswordError(AuthServiceError):
    """``weak_password``: the password breaks the project's policy; ``reasons`` lists GoTrue's reasons
    (``length``, ``characters``, ``pwned``)."""

    reasons: tuple[str, ...]

    def __init__(self, message: str, *, reasons: Sequence[str] = (), **fields: object) -> None:
        super().__init__(message, **fields)  # type: ignore[arg-type]
        self.reasons = tuple(reasons)


class UserAlreadyExistsError(AuthServiceError):
    """``user_already_exists`` / ``email_exists`` / ``phone_exists``: sign in instead, or reset the password."""


class SignupDisabledError(AuthServiceError):
    """``signup_disabled`` / ``email_provider_disabled`` / ``anonymous_provider_disabled``: the project does not
    allow this way of signing up or in; change it under Authentication → Providers."""


class UserBannedError(AuthServiceError):
    """``user_banned``: the user is banned until ``banned_until``; an administrator must lift the ban."""


class ValidationFailedError(AuthServiceError):
    """``validation_failed``, ``email_address_invalid`` and other malformed requests: fix the input."""


class SessionExpiredError(AuthServiceError):
    """The session cannot be continued: its refresh token is unknown, already used, or its session expired or was
    revoked (``refresh_token_not_found``, ``refresh_token_already_used``, ``session_not_found``,
    ``session_expired``), or an access token was refused after one refresh. Sign in again."""


class InvalidAccessTokenError(AuthServiceError):
    """GoTrue refused the bearer token itself (``bad_jwt``, ``no_authorization``, ``user_not_found``): the token is
    malformed, signed by another project, or its user was deleted. Sign in again."""


class NotSignedInError(AuthServiceError):
    """The call needs a session and this service has none: call ``sign_in`` (or ``sign_up``) first."""


class UntrustedTokenError(AuthServiceError):
    """GoTrue issued a session whose access token pgferry's own verification (``pgferry.sync.auth``) refuses: the
    project's ``SUPABASE_JWT_SECRET`` / ``SUPABASE_JWKS_URL`` do not match the Auth server that answered, or the
    answer was not from it. The session is discarded."""


class AuthUnavailableError(AuthServiceError):
    """Auth could not be reached or failed on its side (network error, 5xx): retry later."""


class AuthRateLimitedError(AuthServiceError, RateLimitedError):
    """GoTrue's ``over_request_rate_limit``, ``over_email_send_rate_limit``, ``over_sms_send_rate_limit`` (429)."""


# ---------------------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------------------


class StorageServiceError(SupabaseServiceError):
    """The Storage API refused or failed a request.

    Storage answers almost every error with HTTP 400 and puts the meaningful status, as a *string*, in the body's
    ``statusCode``; ``status`` here is that meaningful status (an int), ``http_status`` the HTTP one. ``code`` is
    the body's ``code`` (``NoSuchKey``) when the server sent one, else its legacy ``error`` name (``not_found``).
    """

    http_status: int | None

    def __init__(self, message: str, *, http_status: int | None = None, **fields: object) -> None:
        super().__init__(message, **fields)  # type: ignore[arg-type]
        self.http_status = http_status


class ObjectNotFoundError(StorageServiceError):
    """``NoSuchKey``: no such object, or row-level security hides it from this user."""


class BucketNotFoundError(StorageServiceError):
    """``NoSuchBucket``: no such bucket, or row-level security hides it from this user."""


class ObjectExistsError(StorageServiceError):
    """``KeyAlreadyExists`` / ``Duplicate``: an object is already at that path; upload with ``upsert=True``."""


class StorageAccessDeniedError(StorageServiceError):
    """``AccessDenied`` / ``Unauthorized`` (403): the bucket's policies on ``storage.objects`` refuse this user, or
    the token itself was refused."""


class PayloadTooLargeError(StorageServiceError):
    """``EntityTooLarge`` (413): the object exceeds the bucket's or the project's size limit."""


class UnsupportedMediaTypeError(StorageServiceError):
    """``InvalidMimeType`` (415): the bucket does not allow this content type."""


class InvalidObjectKeyError(StorageServiceError):
    """``InvalidKey``/``InvalidBucketName``/``InvalidRequest`` (400): the path, bucket name or request is
    malformed."""


class StorageUnavailableError(StorageServiceError):
    """Storage could not be reached or failed on its side (5xx, 544 database timeout): retry later."""


class StorageRateLimitedError(StorageServiceError, RateLimitedError):
    """``SlowDown`` (429): Storage's database is overloaded; back off and retry."""


# ---------------------------------------------------------------------------------------------------------------
# Edge Functions
# ---------------------------------------------------------------------------------------------------------------


class FunctionsServiceError(SupabaseServiceError):
    """Invoking an Edge Function failed; ``function`` names it. ``code`` is the platform's ``sb-error-code`` header
    when it sent one."""

    function: str

    def __init__(self, message: str, *, function: str = "", **fields: object) -> None:
        super().__init__(message, **fields)  # type: ignore[arg-type]
        self.function = function


class FunctionHttpError(FunctionsServiceError):
    """The function itself answered with a non-2xx status; ``body`` holds its (decoded) body: a dict for JSON, a
    string otherwise, truncated."""

    body: object

    def __init__(self, message: str, *, body: object = None, **fields: object) -> None:
        super().__init__(message, **fields)  # type: ignore[arg-type]
        self.body = body


class FunctionNotFoundError(FunctionsServiceError):
    """``NOT_FOUND`` (404): no function of that name is deployed to the project."""


class FunctionRelayError(FunctionsServiceError):
    """The platform's relay failed between the gateway and the function (``x-relay-error: true``); whether the
    function ran is unknown, so it is retried only for calls marked idempotent."""


class FunctionUnavailableError(FunctionsServiceError):
    """The function could not run (``BOOT_ERROR`` 503, ``WORKER_LIMIT`` 546, 5xx from the platform, connection
    failure); retried when it is certain the function did not run."""


class FunctionTimeoutError(FunctionsServiceError):
    """No answer within the call's timeout (or the platform's ``IDLE_TIMEOUT``); the function may have run."""


class FunctionRateLimitedError(FunctionsServiceError, RateLimitedError):
    """``RATE_LIMIT_EXCEEDED`` (429): too many invocations; the function did not run."""
