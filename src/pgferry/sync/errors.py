"""Errors of the sync layer: what a client did wrong (400) and what Python cannot decide (fall back to SQL).

:class:`ProtocolError` is an *expected* failure caused by the HTTP client, so it is a
:class:`~pgferry.errors.PgferryError`: one line, actionable, never echoing secrets. It also carries what the
HTTP layer needs to answer with, an HTTP status and a JSON body shaped like Electric's own error body
(``{"message": "Invalid request", "errors": {"<field>": ["<problem>"]}}``, see Electric's
``Electric.Shapes.Api.Response.invalid_request/2``), so the dev server and the proxy render client mistakes the
same way Electric does and ``@electric-sql/client`` surfaces them the same way (as a ``FetchError`` whose
``json`` is that body).
"""

from __future__ import annotations

import re
from typing import Any

import psycopg

from pgferry.errors import PgferryError

__all__ = [
    "ForbiddenShapeError",
    "MutationRejectedError",
    "ProtocolError",
    "ShapeUnavailableError",
    "SyncDatabaseError",
    "TooManyRequestsError",
    "UnauthorizedError",
    "UnsupportedFeatureError",
    "WhereClauseError",
    "describe_error",
    "echo",
    "is_connection_error",
]

_ECHO_LIMIT = 80


def echo(text: str, limit: int = _ECHO_LIMIT) -> str:
    """Render client-supplied text for an error message: repr-quoted (so it stays on one line and control or
    invisible characters are visible as escapes) and cut to ``limit`` characters so a hostile 8 KiB where
    clause does not end up in logs verbatim."""
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


class ProtocolError(PgferryError):
    """A request the Shape API must refuse with a 4xx; ``field`` names the query parameter at fault.

    ``str(err)`` is ``"<field>: <problem>"`` on one line (the PgferryError contract); :meth:`body` is the JSON
    body to send, in Electric's shape, so clients cannot tell pgferry's 400s from Electric's.
    """

    status: int = 400
    field: str
    problem: str

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.field = field
        # One line, always: the CLI and log lines rely on it, and a client could smuggle newlines in.
        self.problem = " ".join(problem.split())

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"

    def body(self) -> dict[str, Any]:
        """The JSON-able response body, mirroring Electric's ``{"message", "errors"}`` error body."""
        return {"message": "Invalid request", "errors": {self.field: [self.problem]}}

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` for the retryable statuses)."""
        return {}


class _RetryableError(ProtocolError):
    """A request that is fine but cannot be served now; ``retry_after`` (seconds) becomes ``Retry-After``, which
    the official client honours before retrying (it retries 429 and 5xx on its own)."""

    message: str = "Service unavailable"

    def __init__(self, field: str, problem: str, *, retry_after: int = 1) -> None:
        super().__init__(field, problem)
        self.retry_after = max(1, int(retry_after))

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "errors": {self.field: [self.problem]}}

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)}


class ShapeUnavailableError(_RetryableError):
    """503: the shape cannot be created yet (its table is still being prepared for replication, or every
    snapshot worker is busy); nothing is wrong with the request."""

    status = 503


class TooManyRequestsError(_RetryableError):
    """429: a configured limit (shapes, concurrent snapshots) is reached; retry after the given time."""

    status = 429
    message = "Too many requests"


class UnauthorizedError(ProtocolError):
    """401: the request lacks the server's secret (Electric: ``secret`` / ``api_secret`` query parameter)."""

    status = 401

    def body(self) -> dict[str, Any]:
        return {"message": "Unauthorized", "errors": {self.field: [self.problem]}}


class ForbiddenShapeError(ProtocolError):
    """A well-formed shape request for something this user may not read (a table or column outside the
    allow-list); answered 403 so a developer can tell "not allowed" from "malformed"."""

    status = 403

    def body(self) -> dict[str, Any]:
        return {"message": "Forbidden", "errors": {self.field: [self.problem]}}


class UnsupportedFeatureError(ProtocolError):
    """A well-formed request for a part of the Electric protocol pgferry does not implement (yet).

    Separate from a plain :class:`ProtocolError` so a caller (or a test) can tell "you sent garbage" from "this
    server cannot do that", and the message always says "not supported" so a developer does not hunt for a typo.
    """


class WhereClauseError(ProtocolError):
    """The ``where`` clause (or its ``params``) is malformed, too large, or outside the supported subset.

    ``position`` is the 0-based character offset of the problem in the where string when known; the message
    starts with ``At location N:`` like Electric's parser errors, so the client-side developer can find it.
    """

    position: int | None

    def __init__(self, problem: str, position: int | None = None, field: str = "where") -> None:
        if position is not None:
            problem = f"At location {position}: {problem}"
        super().__init__(field, problem)
        self.position = position


class MutationRejectedError(PgferryError):
    """One mutation of a write batch that cannot be applied: ``field`` is its path in the request body
    (``mutations[2].row.priority``), ``mutation_id`` the client's id (``None`` when the mutation has no valid id),
    ``status`` the HTTP status it calls for (400 malformed, 403 not allowed, 404 no such row of yours, 409 conflict
    with an existing row, 413 too large). The write API answers a batch with any of these with every problem and
    writes nothing."""

    mutation_id: str | None
    field: str
    problem: str
    status: int

    def __init__(self, mutation_id: str | None, field: str, problem: str, status: int = 400) -> None:
        problem = " ".join(problem.split())
        super().__init__(mutation_id, field, problem, status)
        self.mutation_id = mutation_id
        self.field = field
        self.problem = problem
        self.status = status

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"

    def as_json(self) -> dict[str, Any]:
        """The problem as it appears in the response's ``errors`` list."""
        return {"id": self.mutation_id, "field": self.field, "problem": self.problem, "status": self.status}


def is_connection_error(exc: BaseException) -> bool:
    """Whether a database error means the connection (or the server) went away, rather than this statement
    failing: those are retried by reconnecting; statement failures are the statement's (the shape's) problem."""
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    return state is None or state.startswith(("08", "57P", "53"))


def _words(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


def describe_error(exc: BaseException) -> str:
    """One line about ``exc`` that never carries a row value, for health, logs and other users' eyes.

    PostgreSQL's messages for data errors quote the value that failed (``invalid input syntax for type
    integer: "<someone's title>"``), so a database error is described by its condition (the error class name
    as words, e.g. ``division by zero``) and SQLSTATE only. Connection errors say nothing about rows and keep
    their first line, because that is what an operator needs ("connection refused").
    """
    if isinstance(exc, psycopg.Error):
        if exc.sqlstate is None:  # lost or refused connection: libpq's own text, no row data in it
            text = str(exc).strip()
            return text.splitlines()[0] if text else type(exc).__name__
        return f"{_words(type(exc).__name__)} (SQLSTATE {exc.sqlstate})"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SyncDatabaseError(PgferryError):
    """The database cannot feed a sync server (no logical replication, or a role without the right to use it)."""
