"""Errors of the Python sync client: one line each, saying what went wrong and what to do.

Owns the client's error types only; must not import the server side.
"""

from __future__ import annotations

import json

from pgferry.errors import PgferryError

__all__ = ["ClientClosedError", "ShapeRequestError"]


class ShapeRequestError(PgferryError):
    """The sync service refused the shape request in a way retrying cannot fix (a 4xx other than 409/429): a bad
    table, where clause or column, a refused token. ``status`` is the HTTP status; the message carries the
    server's own field and problem when it sent Electric's JSON error body."""

    status: int
    problem: str

    def __init__(self, status: int, problem: str) -> None:
        problem = " ".join(problem.split())
        super().__init__(status, problem)
        self.status = status
        self.problem = problem

    def __str__(self) -> str:
        return f"shape request refused ({self.status}): {self.problem}"

    @classmethod
    def from_response(cls, status: int, body: bytes) -> ShapeRequestError:
        problem = "no details"
        try:
            parsed = json.loads(body)
            errors = parsed.get("errors") if isinstance(parsed, dict) else None
            if isinstance(errors, dict) and errors:
                field, problems = next(iter(errors.items()))
                problem = f"{field}: {problems[0] if isinstance(problems, list) and problems else problems}"
            elif isinstance(parsed, dict) and "message" in parsed:
                problem = str(parsed["message"])
        except (ValueError, TypeError, AttributeError):
            problem = body[:200].decode("utf-8", "replace") or "no details"
        if status == 401:
            problem += " (refresh the access token)"
        return cls(status, problem[:300])


class ClientClosedError(PgferryError):
    """The client (or stream) was closed; open a new one to continue."""
