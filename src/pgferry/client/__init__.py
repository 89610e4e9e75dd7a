"""pgferry's Python sync client: Electric's Shape protocol, a local replica (SQLite or PostgreSQL), optimistic
writes and an outbox.

The public API::

    from pgferry.client import AsyncShapeStream, ShapeStream, ShapeOptions, ElectricSupabaseClient, ClientConfig

    async with AsyncShapeStream("http://127.0.0.1:54351", ShapeOptions("tasks"), headers=auth) as stream:
        async for batch in stream:          # ShapeBatch: changes, offset, handle, up_to_date, must_refetch
            ...
    for batch in ShapeStream(url, ShapeOptions("tasks", live=False), headers=auth):   # the blocking twin
        ...

- :mod:`~pgferry.client.shape_async` / :mod:`~pgferry.client.shape` — the stream, async and blocking, over one
  protocol base (:mod:`~pgferry.client._shape_base`, psycopg 3's pattern); works against Electric, pgferry's dev
  server and the proxy alike.
- :mod:`~pgferry.client.replica` — the SQLite replica (values kept in PostgreSQL's text form, applied atomically
  with the offset at up-to-date boundaries), the optimistic overlay and the durable outbox;
  :mod:`~pgferry.client.replica_pg` the same on any PostgreSQL database, typed natively;
  :mod:`~pgferry.client.replicas` the interface both keep and ``open_replica(url_or_path)``.
- :mod:`~pgferry.client.outbox` — delivery of the outbox to the write API (``POST /v1/mutations``).
- :mod:`~pgferry.client.electric` — ``ElectricSupabaseClient``, the seed's interface over all of it.
- :mod:`~pgferry.client.values` — PostgreSQL text values to Python and back.

Needs ``httpx`` (``pip install 'pgferry[client]'``). Must not import the server side (``pgferry.sync``).
"""

from __future__ import annotations

from pgferry.client._shape_base import Change, RowValues, ShapeBatch, ShapeOptions
from pgferry.client.electric import ClientConfig, ConnectionState, ElectricSupabaseClient
from pgferry.client.errors import ClientClosedError, ShapeRequestError
from pgferry.client.outbox import OutboxSender, SendOutcome
from pgferry.client.replica import LocalReplica, OutboxItem, Rejection
from pgferry.client.replicas import Replica, open_replica
from pgferry.client.shape import ShapeStream
from pgferry.client.shape_async import AsyncShapeStream

__all__ = [
    "AsyncShapeStream",
    "Change",
    "ClientClosedError",
    "ClientConfig",
    "ConnectionState",
    "ElectricSupabaseClient",
    "LocalReplica",
    "OutboxItem",
    "OutboxSender",
    "Rejection",
    "Replica",
    "RowValues",
    "SendOutcome",
    "ShapeBatch",
    "ShapeOptions",
    "ShapeRequestError",
    "ShapeStream",
    "open_replica",
]
