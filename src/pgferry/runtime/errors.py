"""Named errors of the runtime data layer; every message is one line that says what is wrong and what to do.

Owns only the exception classes. They carry their message in ``args`` so they pickle (a worker process can
report them), and never a token, key or password.
"""

from __future__ import annotations

from pgferry.errors import PgferryError

__all__ = [
    "DatabaseUnavailableError",
    "EndpointModeError",
    "QueueError",
    "RuntimeDataError",
    "RuntimeSchemaError",
    "SearchInputError",
    "ServiceRoleRefusedError",
]


class RuntimeDataError(PgferryError):
    """Base class of the runtime data layer's errors."""


class SearchInputError(RuntimeDataError):
    """A vector search argument is out of range (wrong dimension, threshold, count or ``ef_search``)."""


class ServiceRoleRefusedError(RuntimeDataError):
    """A client-supplied credential asked for the service role; only server code may act as it."""


class EndpointModeError(RuntimeDataError):
    """The connection mode (direct, session, transaction) cannot be determined or is not allowed here."""


class DatabaseUnavailableError(RuntimeDataError):
    """The database cannot be reached now; the caller may queue the write or read from the cache."""


class QueueError(RuntimeDataError):
    """The durable operation queue cannot store or replay an operation."""


class RuntimeSchemaError(RuntimeDataError):
    """The database lacks a pgferry migration the runtime needs (e.g. ``pgferry.applied_operations``)."""
