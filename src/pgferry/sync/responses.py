"""JSON error responses shared by the proxy's HTTP endpoints (shapes and mutations).

Every refusal is a JSON body with ``no-store`` caching and ``Vary: Authorization`` (an answer belongs to the user
whose token was sent), and a refused token is a 401 with a ``WWW-Authenticate`` challenge that says why
(:func:`authenticate`: the token is verified by :mod:`pgferry.sync.auth`, never just decoded). Owns the shape of
those responses; must not know what the endpoints do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse

from pgferry.sync.auth import (
    AuthenticatedUser,
    InvalidTokenError,
    KeySetUnavailableError,
    MissingTokenError,
    TokenVerifier,
)

__all__ = ["authenticate", "json_error", "unauthorized"]

log = structlog.get_logger("pgferry.sync.responses")


def json_error(status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> JSONResponse:
    merged = {"cache-control": "no-store", "vary": "Authorization", **(headers or {})}
    return JSONResponse(dict(body), status_code=status, headers=merged)


def unauthorized(exc: InvalidTokenError) -> JSONResponse:
    challenge = 'Bearer realm="pgferry"'
    if not isinstance(exc, MissingTokenError):
        description = exc.reason.replace('"', "'").replace("\\", "")
        challenge += f', error="invalid_token", error_description="{description}"'
    body = {"message": "Unauthorized", "errors": {"authorization": [exc.reason]}}
    return json_error(401, body, {"www-authenticate": challenge})


async def authenticate(verifier: TokenVerifier, request: Request) -> AuthenticatedUser | JSONResponse:
    """The verified user of the request's bearer token, or the response refusing it: 401 for a bad token, 503 when
    the key set cannot be fetched (our outage: clients must not discard good sessions for it)."""
    try:
        return await verifier.verify_header(request.headers.get("authorization"))
    except InvalidTokenError as exc:
        log.info("request refused", reason=exc.reason, status=401, path=request.url.path)
        return unauthorized(exc)
    except KeySetUnavailableError as exc:
        log.warning("cannot verify tokens", problem=str(exc))
        body = {"message": "Service unavailable", "errors": {"authorization": ["cannot verify tokens now"]}}
        return json_error(503, body, {"retry-after": "5"})
