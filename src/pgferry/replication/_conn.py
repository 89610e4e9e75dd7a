"""Opening replication connections, and the names that go into replication commands.

Why psycopg 3 and not psycopg2's ``LogicalReplicationConnection``: psycopg2 consumes the server's
keepalives itself and, when they arrive, moves its flush position forward on its own (to the keepalive's
WAL end) and sends it — the reader would no longer be the one deciding what is confirmed, and it cannot
see the keepalives to decide better. psycopg 3's high-level API has no replication support, but a
``replication=database`` connection runs replication commands through the simple query protocol like any
query, and its libpq layer (``conn.pgconn``) exposes exactly the COPY BOTH primitives the stream needs
(``get_copy_data``, ``put_copy_data``, ``flush``, ``consume_input``). That keeps every byte of feedback
under our control, keeps the errors psycopg 3 errors (so :func:`pgferry.db.retry.classify_error` applies
unchanged), is fully typed, and adds no dependency.
"""

from __future__ import annotations

import re
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgferry.config import DatabaseUrl
from pgferry.db.connect import CONNECT_PARAMS
from pgferry.db.quoting import quote_ident, quote_literal
from pgferry.errors import PgferryError

__all__ = [
    "ReplicationError",
    "check_slot_name",
    "connect_replication",
    "conninfo",
    "publication_names_option",
]

# ReplicationSlotValidateName(): lower-case letters, digits and underscores, at most NAMEDATALEN - 1.
_SLOT_NAME_RE: Final = re.compile(r"^[a-z0-9_]{1,63}$")

# Defaults that make a dead peer noticeable on a connection that may sit idle for hours. A value given in
# the URL wins. keepalives cover an idle socket; tcp_user_timeout covers unacknowledged writes (feedback).
_STREAM_DEFAULTS: Final[dict[str, Any]] = {
    "application_name": "pgferry-replication",
    # On top of pgferry's connection defaults (keepalives): a stream that stops being acknowledged by the
    # network is given up after a minute, so the reader reconnects instead of waiting on a dead socket.
    "tcp_user_timeout": 60_000,
}


class ReplicationError(PgferryError):
    """A replication slot, publication or stream is not in a state pgferry can work with."""


def check_slot_name(name: str) -> str:
    """Validate a slot name the way PostgreSQL does, so it can be spliced into replication commands.

    Replication commands take no bind parameters, so names are checked instead of quoted.
    """
    if not _SLOT_NAME_RE.match(name):
        raise ReplicationError(
            f"invalid replication slot name {name!r}: use 1-63 lower-case letters, digits and underscores"
        )
    return name


def publication_names_option(names: list[str]) -> str:
    """pgoutput's ``publication_names`` value: a comma-separated list of (double-quoted) identifiers."""
    if not names:
        raise ReplicationError("at least one publication name is needed to stream changes")
    idents = ",".join(quote_ident(name) for name in names)
    return quote_literal(idents)


def conninfo(dsn: str | DatabaseUrl) -> str:
    """A libpq connection string from the URLs the rest of pgferry accepts.

    ``postgresql+psycopg://`` and ``postgres://`` URLs are normalised by :class:`DatabaseUrl` (which also
    insists on a host and database name); ``key=value`` strings pass through to libpq unchanged.
    """
    if isinstance(dsn, DatabaseUrl):
        return dsn.get_secret_value()
    if "://" in dsn:
        return DatabaseUrl(dsn).get_secret_value()
    return dsn


def connect_replication(dsn: str | DatabaseUrl, *, connect_timeout: float = 10.0) -> psycopg.Connection[Any]:
    """A ``replication=database`` connection (walsender in database mode) with client encoding UTF-8.

    Such a connection runs replication commands and plain SQL (simple protocol only: no bind parameters).
    """
    params = conninfo_to_dict(conninfo(dsn))
    params.setdefault("connect_timeout", max(1, round(connect_timeout)))
    for key, value in {**CONNECT_PARAMS, **_STREAM_DEFAULTS}.items():
        params.setdefault(key, value)
    params["replication"] = "database"
    params["client_encoding"] = "UTF8"
    return psycopg.connect(make_conninfo("", **params), autocommit=True)
