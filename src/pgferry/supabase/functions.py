"""FunctionsService: invoke Supabase Edge Functions as a user, over supabase-functions, with safe retries.

``invoke(name, body)`` POSTs to ``<SUPABASE_URL>/functions/v1/<name>`` with the anon key as ``apikey`` and the
*user's* access token as ``Authorization`` (so the function, and any query it forwards that token with, runs under
the user's row-level security). JSON bodies (dicts, lists) go as ``application/json``, ``str`` as ``text/plain``,
``bytes`` as ``application/octet-stream``; the answer comes back parsed as JSON (``response="json"``) or as bytes.

**Retries only where safe.** A POST to a function is not idempotent in general, so a call is repeated only when
the function certainly did not run: the connection could not be made, or the platform refused it with 429
``RATE_LIMIT_EXCEEDED`` (after ``Retry-After``). With ``idempotent=True`` the caller vouches that running twice is
harmless, and relay errors, read timeouts, 502/503/504 and ``WORKER_LIMIT``/``BOOT_ERROR`` are retried too. An
expired token is refreshed once (see :mod:`pgferry.supabase.tokens`): the gateway refused it before the function
ran, so that retry is safe.

**Errors** are read from the response as sent (:mod:`pgferry.supabase._http`): the platform's ``sb-error-code``
header (``NOT_FOUND``, ``BOOT_ERROR``, ``WORKER_LIMIT``, ``IDLE_TIMEOUT``, ``UNAUTHORIZED_*``, …) and
``x-relay-error: true``. supabase-functions 2.30 looked for ``x-relay-header`` instead, and only after a 2xx, so a
relay failure passed as success or as a plain HTTP error; pgferry checks the real header itself whatever the
library version. A function's own non-2xx answer is a :class:`~pgferry.supabase.errors.FunctionHttpError` carrying
its body (JSON or text; non-JSON bodies no longer surface as ``JSONDecodeError``).

Must not retry anything that may have run unless told it is idempotent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import httpx
from supabase_functions import AsyncFunctionsClient, FunctionRegion, SyncFunctionsClient
from supabase_functions.errors import FunctionsError

from pgferry.db.retry import RetryPolicy
from pgferry.supabase._http import CallRecord, Exchange, call_scope
from pgferry.supabase.errors import (
    FunctionHttpError,
    FunctionNotFoundError,
    FunctionRateLimitedError,
    FunctionRelayError,
    FunctionsServiceError,
    FunctionTimeoutError,
    FunctionUnavailableError,
    server_text,
)
from pgferry.supabase.project import SupabaseProject
from pgferry.supabase.tokens import (
    AsyncTokenSource,
    StaticToken,
    TokenSource,
    async_source,
    expired_token_error,
    is_expired,
    sync_source,
)

__all__ = ["AsyncFunctionsService", "FunctionsService", "ResponseType", "function_error"]

ResponseType = Literal["json", "bytes"]
Body = Mapping[str, Any] | Sequence[Any] | str | bytes | None

#: Two retries with 0.5 s, 1 s (full jitter) unless Retry-After says otherwise.
DEFAULT_RETRY: Final = RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=10.0)
_MAX_RETRY_AFTER: Final = 30.0
_RESERVED_HEADERS: Final = frozenset({"authorization", "apikey"})
_NOT_RUN: Final = frozenset({"RATE_LIMIT_EXCEEDED"})
_MAYBE_RUN_TRANSIENT: Final = frozenset({"BOOT_ERROR", "WORKER_LIMIT", "WORKER_RESOURCE_LIMIT"})
_UNAVAILABLE: Final = frozenset(
    {
        "BOOT_ERROR",
        "WORKER_ERROR",
        "WORKER_LIMIT",
        "WORKER_RESOURCE_LIMIT",
        "NOT_FOUND_FUNCTION_BLOB",
        "EDGE_FUNCTION_ERROR",
        "INVALID_RESPONSE_STATUS_CODE",
    }
)


class _Retry:
    """Internal: the attempt failed in a way the policy allows to retry; ``error`` is raised if attempts run out."""

    __slots__ = ("delay", "error")

    def __init__(self, error: FunctionsServiceError, delay: float | None = None) -> None:
        self.error = error
        self.delay = delay


def _decoded_body(exchange: Exchange) -> object:
    body = exchange.json()
    return body if body is not None else server_text(exchange.text(500))


def function_error(name: str, exchange: Exchange) -> FunctionsServiceError:
    """The named error for a function invocation's failing (or relay-flagged) response."""
    status = exchange.status
    code = exchange.headers.get("sb-error-code")
    retry_after_header = exchange.headers.get("retry-after")
    retry_after = float(retry_after_header) if retry_after_header and retry_after_header.isdigit() else None
    fields: dict[str, Any] = {"function": name, "status": status, "code": code, "retry_after": retry_after}
    body = _decoded_body(exchange)
    said = ""
    if isinstance(body, dict):
        said = next((str(body[k]) for k in ("error", "message", "msg") if isinstance(body.get(k), str)), "")
    elif isinstance(body, str):
        said = body
    detail = f"HTTP {status}" + (f", {code}" if code else "") + (f": {server_text(said)}" if said else "")
    if exchange.headers.get("x-relay-error", "").lower() == "true":
        return FunctionRelayError(
            f"Edge Function {name!r}: the platform's relay failed, whether the function ran is unknown; retry if the "
            f"call is idempotent ({detail})",
            **fields,
        )
    if code == "NOT_FOUND" or (code is None and status == 404 and not said):
        return FunctionNotFoundError(
            f"Edge Function {name!r} is not deployed to this project; deploy it (supabase functions deploy {name}) "
            f"or fix the name ({detail})",
            **fields,
        )
    if code == "RATE_LIMIT_EXCEEDED" or (code is None and status == 429 and not said):
        return FunctionRateLimitedError(
            f"Edge Function {name!r}: too many invocations, the function did not run; wait and retry ({detail})",
            **fields,
        )
    if code == "IDLE_TIMEOUT":
        return FunctionTimeoutError(
            f"Edge Function {name!r} ran past the platform's time limit and was stopped; make it faster or move the "
            f"work to a background task ({detail})",
            **fields,
        )
    if code is not None and (code in _UNAVAILABLE or code.startswith("LOAD_FUNCTION")):
        return FunctionUnavailableError(
            f"Edge Function {name!r} could not run; check its logs in the dashboard, then retry ({detail})", **fields
        )
    if code is not None and code.startswith("UNAUTHORIZED"):
        return FunctionHttpError(
            f"Edge Function {name!r}: the platform refused the user's token before running the function; sign in "
            f"again ({detail})",
            body=body,
            **fields,
        )
    if code is not None and status >= 500:
        return FunctionUnavailableError(
            f"Edge Function {name!r} failed on the platform; retry later ({detail})", **fields
        )
    return FunctionHttpError(f"Edge Function {name!r} answered with an error ({detail})", body=body, **fields)


def _encode(body: Body, headers: dict[str, str]) -> str | bytes | None:
    if body is None or isinstance(body, str | bytes):
        if isinstance(body, str):
            headers.setdefault("Content-Type", "text/plain")
        elif isinstance(body, bytes):
            headers.setdefault("Content-Type", "application/octet-stream")
        return body
    headers.setdefault("Content-Type", "application/json")
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


class _FunctionsBase:
    def __init__(
        self,
        project: SupabaseProject,
        *,
        timeout: float | None,
        retry: RetryPolicy,
        region: str | None,
        service_role: bool,
    ) -> None:
        self._project = project
        self._timeout = timeout
        self._retry = retry
        self._region = FunctionRegion(region) if region else None
        self._service_role = service_role

    def _client_headers(self, token: str) -> dict[str, str]:
        if self._service_role:
            key = self._project.service_role_key()
            return {"apikey": key, "Authorization": f"Bearer {key}"}
        self._project.refuse_privileged(token)
        return {"apikey": self._project.anon_key, "Authorization": f"Bearer {token}"}

    def _options(self, body: Body, headers: Mapping[str, str] | None) -> dict[str, Any]:
        extra = dict(headers or {})
        if any(key.lower() in _RESERVED_HEADERS for key in extra):
            raise ValueError("invoke headers must not set Authorization or apikey; the service sets them")
        encoded = _encode(body, extra)
        options: dict[str, Any] = {"headers": extra, "method": "POST", "responseType": "bytes"}
        if encoded is not None:
            options["body"] = encoded
        if self._region is not None:
            options["region"] = self._region
        return options

    def _classify(
        self, name: str, record: CallRecord, exc: Exception | None, idempotent: bool
    ) -> FunctionsServiceError | _Retry:
        """The error for a failed attempt, wrapped in :class:`_Retry` when another attempt is safe."""
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
            error: FunctionsServiceError = FunctionTimeoutError(
                f"Edge Function {name!r} did not answer within the timeout ({type(exc).__name__}); it may have run; "
                "raise the timeout or retry if the call is idempotent",
                function=name,
            )
            return _Retry(error) if idempotent else error
        if isinstance(exc, httpx.TransportError):
            error = FunctionUnavailableError(
                f"cannot reach Edge Functions at {self._project.functions_url} ({type(exc).__name__}); check "
                "SUPABASE_URL and the network",
                function=name,
            )
            not_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
            return _Retry(error) if not_sent or idempotent else error
        exchange = record.last
        if exchange is None:
            return FunctionsServiceError(
                f"Edge Function {name!r} failed without a response; retry later", function=name
            )
        error = function_error(name, exchange)
        if error.code in _NOT_RUN or isinstance(error, FunctionRateLimitedError):
            return _Retry(error, delay=error.retry_after)
        if idempotent and (
            isinstance(error, FunctionRelayError)
            or error.code in _MAYBE_RUN_TRANSIENT
            or (error.code is None and error.status in (502, 503, 504))
        ):
            return _Retry(error, delay=error.retry_after)
        return error

    def _delay(self, attempt: int, retry: _Retry) -> float:
        if retry.delay is not None:
            return min(retry.delay, _MAX_RETRY_AFTER)
        return self._retry.delay(attempt)

    @staticmethod
    def _token_refused(error: FunctionsServiceError, token: str) -> bool:
        return error.status == 401 and (is_expired(token, margin=0) or "expired" in str(error).lower())

    @staticmethod
    def _result(name: str, content: bytes, response: ResponseType) -> Any:
        if response == "bytes":
            return content
        try:
            return json.loads(content) if content else None
        except (ValueError, UnicodeDecodeError):
            raise FunctionHttpError(
                f"Edge Function {name!r} answered 2xx with a body that is not JSON; call with response='bytes'",
                function=name,
                body=server_text(content.decode("utf-8", "replace")[:500]),
            ) from None


class FunctionsService(_FunctionsBase):
    """Edge Functions as one user (``token``: the user's access token, a :class:`StaticToken` or an
    ``AuthService``). ``timeout`` is the default per-call timeout in seconds; ``retry`` bounds the safe retries."""

    def __init__(
        self,
        project: SupabaseProject,
        token: str | StaticToken | TokenSource,
        *,
        timeout: float | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        region: str | None = None,
    ) -> None:
        super().__init__(project, timeout=timeout, retry=retry, region=region, service_role=False)
        self._source = sync_source(token)

    @classmethod
    def with_service_role(
        cls, project: SupabaseProject, *, timeout: float | None = None, retry: RetryPolicy = DEFAULT_RETRY
    ) -> FunctionsService:
        """Server-side only: invoke functions as ``service_role`` with the key from ``SUPABASE_SERVICE_ROLE_KEY``."""
        project.service_role_key()
        service = cls.__new__(cls)
        _FunctionsBase.__init__(service, project, timeout=timeout, retry=retry, region=None, service_role=True)
        service._source = sync_source(StaticToken("service-role"))
        return service

    def invoke(
        self,
        name: str,
        body: Body = None,
        *,
        headers: Mapping[str, str] | None = None,
        response: ResponseType = "json",
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        """Invoke ``name`` and return its answer (parsed JSON, or bytes with ``response="bytes"``)."""
        options = self._options(body, headers)
        token = "" if self._service_role else self._source.access_token()
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            with call_scope(timeout if timeout is not None else self._timeout) as record:
                outcome: FunctionsServiceError | _Retry | None = None
                content = b""
                try:
                    client = SyncFunctionsClient(
                        self._project.functions_url, self._client_headers(token), http_client=self._project.http()
                    )
                    result = client.invoke(name, dict(options))
                    content = result if isinstance(result, bytes) else json.dumps(result).encode()
                    last = record.last
                    if last is not None and last.headers.get("x-relay-error", "").lower() == "true":
                        outcome = self._classify(name, record, None, idempotent)
                except (FunctionsError, httpx.HTTPError) as exc:
                    outcome = self._classify(
                        name, record, exc if isinstance(exc, httpx.HTTPError) else None, idempotent
                    )
            if outcome is None:
                return self._result(name, content, response)
            error = outcome.error if isinstance(outcome, _Retry) else outcome
            if not self._service_role and not refreshed and self._token_refused(error, token):
                fresh = self._source.refreshed_access_token()
                if fresh is None:
                    raise expired_token_error(can_refresh=False) from error
                token, refreshed = fresh, True
                continue
            if refreshed and self._token_refused(error, token):
                raise expired_token_error(can_refresh=True, after_refresh=True) from error
            if isinstance(outcome, _Retry) and attempt < self._retry.max_attempts:
                time.sleep(self._delay(attempt, outcome))
                continue
            raise error


class AsyncFunctionsService(_FunctionsBase):
    """:class:`FunctionsService` for asyncio."""

    def __init__(
        self,
        project: SupabaseProject,
        token: str | StaticToken | AsyncTokenSource,
        *,
        timeout: float | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        region: str | None = None,
    ) -> None:
        super().__init__(project, timeout=timeout, retry=retry, region=region, service_role=False)
        self._source = async_source(token)

    @classmethod
    def with_service_role(
        cls, project: SupabaseProject, *, timeout: float | None = None, retry: RetryPolicy = DEFAULT_RETRY
    ) -> AsyncFunctionsService:
        project.service_role_key()
        service = cls.__new__(cls)
        _FunctionsBase.__init__(service, project, timeout=timeout, retry=retry, region=None, service_role=True)
        service._source = async_source(StaticToken("service-role"))
        return service

    async def invoke(
        self,
        name: str,
        body: Body = None,
        *,
        headers: Mapping[str, str] | None = None,
        response: ResponseType = "json",
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        options = self._options(body, headers)
        token = "" if self._service_role else await self._source.access_token()
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            with call_scope(timeout if timeout is not None else self._timeout) as record:
                outcome: FunctionsServiceError | _Retry | None = None
                content = b""
                try:
                    client = AsyncFunctionsClient(
                        self._project.functions_url, self._client_headers(token), http_client=self._project.async_http()
                    )
                    result = await client.invoke(name, dict(options))
                    content = result if isinstance(result, bytes) else json.dumps(result).encode()
                    last = record.last
                    if last is not None and last.headers.get("x-relay-error", "").lower() == "true":
                        outcome = self._classify(name, record, None, idempotent)
                except (FunctionsError, httpx.HTTPError) as exc:
                    outcome = self._classify(
                        name, record, exc if isinstance(exc, httpx.HTTPError) else None, idempotent
                    )
            if outcome is None:
                return self._result(name, content, response)
            error = outcome.error if isinstance(outcome, _Retry) else outcome
            if not self._service_role and not refreshed and self._token_refused(error, token):
                fresh = await self._source.refreshed_access_token()
                if fresh is None:
                    raise expired_token_error(can_refresh=False) from error
                token, refreshed = fresh, True
                continue
            if refreshed and self._token_refused(error, token):
                raise expired_token_error(can_refresh=True, after_refresh=True) from error
            if isinstance(outcome, _Retry) and attempt < self._retry.max_attempts:
                await asyncio.sleep(self._delay(attempt, outcome))
                continue
            raise error
