"""``ElectricSupabaseClient``: the seed's client interface in Python — a local replica that syncs both ways.

::

    client = ElectricSupabaseClient()
    await client.initialize(ClientConfig(url="http://127.0.0.1:54351", access_token=lambda: session.access_token,
                                         replica_path="agent.db"))
    await client.setup_sync(["tasks"])              # shapes through the proxy, into the SQLite replica
    rows = client.query("tasks")                    # the replica: synced rows with pending local writes over them
    await client.update("tasks", {"id": task_id, "status": "running"})    # visible now, delivered by the outbox
    client.on_conflict(lambda rejection: ...)       # a write the server refused: its local state was rolled back
    client.on_connection_state(lambda state: ...)   # "connecting" / "connected" / "disconnected"
    await client.close()

Reads come from the replica (:class:`~pgferry.client.replica.LocalReplica` on SQLite, or
:class:`~pgferry.client.replica_pg.PostgresReplica` for a ``postgresql://`` URL), fed by one
:class:`~pgferry.client.shape_async.AsyncShapeStream` per table (resumed from the stored offset after a restart);
writes go to the replica and its outbox at once and an :class:`~pgferry.client.outbox.OutboxSender` delivers them to
the write API behind the same URL; each stays pending until its stream shows it, or shows the server past its commit
(a write outside the table's shape; see :mod:`pgferry.client.replica`). A rotated shape (``must-refetch``: the
server's schema changed, or the shape was deleted) re-syncs that table and keeps the outbox; connection loss is
retried forever and reported through the connection-state callbacks; errors of the streams go to ``on_error``.

Owns the orchestration of streams, replica and sender; must not speak the protocol itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import structlog

from pgferry.client._shape_base import Change, ShapeBatch, ShapeOptions
from pgferry.client.errors import ClientClosedError, ShapeRequestError
from pgferry.client.outbox import DEFAULT_BATCH, OutboxSender
from pgferry.client.replica import Rejection
from pgferry.client.replicas import Replica, open_replica
from pgferry.client.shape_async import DEFAULT_BACKOFF, AsyncShapeStream
from pgferry.client.values import to_json_value, to_text

__all__ = ["ClientConfig", "ConnectionState", "ElectricSupabaseClient"]

log = structlog.get_logger("pgferry.client")

#: Changes held in memory before an up-to-date; beyond this many, or this many bytes of their JSON (rows with a
#: 1536-d vector are ~19 KB each: 5,000 of them held ~250 MB), they are staged in the replica file.
_STAGE_AFTER = 5_000
_STAGE_AFTER_BYTES = 8 << 20


def _changes_of(pages: Sequence[ShapeBatch]) -> list[Change]:
    """The pages' changes in order, decoding those handed on undecoded (on the calling worker thread)."""
    if len(pages) == 1:
        return pages[0].decoded()
    return [change for page in pages for change in page.decoded()]


def _stage_pages(
    replica: Replica, table: str, pages: Sequence[ShapeBatch], *, schema: Mapping[str, Any] | None, replace: bool
) -> None:
    replica.stage_pages(table, pages, schema=schema, replace=replace)


def _apply_pages(
    replica: Replica,
    table: str,
    source_table: str,
    pages: Sequence[ShapeBatch],
    *,
    offset: str,
    handle: str | None,
    schema: Mapping[str, Any] | None,
    reset: bool,
    processed_lsn: int | None,
) -> set[int]:
    return replica.apply(
        table,
        source_table,
        _changes_of(pages),
        offset=offset,
        handle=handle,
        schema=schema,
        reset=reset,
        processed_lsn=processed_lsn,
    )


ConnectionState = Literal["connecting", "connected", "disconnected"]


@dataclass(frozen=True)
class ClientConfig:
    """Where to sync from and how: ``url`` is the proxy (``/v1/shape`` and ``/v1/mutations``); ``access_token``
    the user's Supabase access token, or a callable returning the current one (called before every request);
    ``replica_path`` where the replica lives: a SQLite file (a path or ``sqlite:///path``; ``":memory:"`` for
    none) or a PostgreSQL database (``postgresql://…``, tables in schema ``pgferry_replica`` unless the URL says
    ``?replica_schema=…``); ``shape_params`` extra query parameters per
    request (a dev server's ``secret``, never needed through the proxy)."""

    url: str
    access_token: str | Callable[[], str] | None = None
    replica_path: str | Path = ":memory:"
    schema: str = "public"
    shape_params: Mapping[str, str] = field(default_factory=dict)
    batch_size: int = DEFAULT_BATCH


class ElectricSupabaseClient:
    """See the module docstring. Async; one per user session."""

    def __init__(self) -> None:
        self.config: ClientConfig | None = None
        self.replica: Replica | None = None
        self._http: httpx.AsyncClient | None = None
        self._streams: dict[str, AsyncShapeStream] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._sender: OutboxSender | None = None
        self._conflict_hooks: list[Callable[[Rejection], Any]] = []
        self._state_hooks: list[Callable[[ConnectionState], Any]] = []
        self._error_hooks: list[Callable[[BaseException], Any]] = []
        self._synced: dict[str, asyncio.Event] = {}
        self._failed: dict[str, ShapeRequestError] = {}
        self.state: ConnectionState = "disconnected"

    # -- set-up ---------------------------------------------------------------------------------------------------

    async def initialize(self, config: ClientConfig) -> None:
        self.config = config
        self.replica = await asyncio.to_thread(open_replica, config.replica_path)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0))

    def _headers(self) -> dict[str, str]:
        assert self.config is not None
        token = self.config.access_token
        value = token() if callable(token) else token
        return {"authorization": f"Bearer {value}"} if value else {}

    async def setup_sync(self, tables: Sequence[str], *, wait: bool = True) -> None:
        """Start syncing ``tables`` (and delivering the outbox); with ``wait``, return once each is up to date, or
        raise the :class:`ShapeRequestError` that stopped one (a refused token, an unknown table)."""
        config, replica = self._ready()
        for table in tables:
            if table in self._streams:
                continue
            stream = await self._open_stream(table)
            self._synced[table] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._follow(table, stream), name=f"pgferry-sync-{table}"))
        if self._sender is None:
            self._sender = OutboxSender(
                replica,
                config.url,
                {name: f"{config.schema}.{name}" for name in self._streams},
                headers=self._headers,
                client=self._http,
                batch_size=config.batch_size,
                on_rejected=self._rejected,
                followed=self._streams,  # read at each acknowledgement: tables synced later count from then on
            )
            self._tasks.append(asyncio.create_task(self._sender.run(self._stop), name="pgferry-outbox"))
        else:
            self._sender.source_tables.update({name: f"{config.schema}.{name}" for name in self._streams})
        if wait:
            await asyncio.gather(*(self._synced[t].wait() for t in tables))
            for table in tables:
                if table in self._failed:
                    raise self._failed[table]

    async def _open_stream(self, table: str) -> AsyncShapeStream:
        """A stream for ``table`` from the replica's stored position (from the start if there is none)."""
        config, replica = self._ready()
        position = await asyncio.to_thread(replica.position, table)
        offset, handle = position if position is not None else ("-1", None)
        stream = AsyncShapeStream(
            config.url,
            ShapeOptions(table=f"{config.schema}.{table}", extra=dict(config.shape_params)),
            headers=self._headers,
            offset=offset,
            handle=handle,
            client=self._http,
            defer_decoding=True,  # pages of a snapshot are decoded on the thread that stores them
        )
        self._streams[table] = stream
        return stream

    async def _follow(self, table: str, stream: AsyncShapeStream) -> None:
        """Follow ``table``'s stream into the replica until closed or refused. When the replica itself fails (its
        PostgreSQL restarted or unreachable, a full disk), the error goes to ``on_error`` and the stream starts
        again from the stored position after a backoff: what was gathered or staged since is fetched again, so
        nothing is applied twice or skipped."""
        _, replica = self._ready()
        failures = 0
        while True:
            try:
                await self._follow_stream(table, stream)
                return
            except ClientClosedError:
                return
            except ShapeRequestError as exc:
                self._failed[table] = exc
                self._synced[table].set()  # a setup_sync waiting for this table raises it
                self._set_state("disconnected")
                for hook in self._error_hooks:
                    hook(exc)
                log.warning("shape stream stopped", table=table, problem=str(exc))
                return
            # The replica failed, or a deferred page carried a must-refetch (RefetchInDeferredPageError); the stream
            # itself retries its own errors forever.
            except Exception as exc:
                if self._stop.is_set():
                    return
                failures += 1
                self._set_state("disconnected")
                for hook in self._error_hooks:
                    hook(exc)
                log.warning(
                    "applying the stream failed; restarting it from its stored position", table=table, problem=str(exc)
                )
            await stream.aclose()
            while not self._stop.is_set():
                await asyncio.sleep(DEFAULT_BACKOFF.delay(failures))
                try:
                    await asyncio.to_thread(replica.discard_staged, table)
                    stream = await self._open_stream(table)
                    break
                except Exception as exc:  # still failing: keep trying, reported once per attempt
                    failures += 1
                    for hook in self._error_hooks:
                        hook(exc)
            if self._stop.is_set():
                return

    async def _follow_stream(self, table: str, stream: AsyncShapeStream) -> None:
        """Gather each response's changes; apply them with the position at every up-to-date (atomically)."""
        _, replica = self._ready()
        gathered: list[ShapeBatch] = []
        gathered_rows = gathered_bytes = 0
        reset = False
        # Staging runs on a worker thread while the next page is fetched; one at a time, in order, and finished
        # before anything else touches the staged rows. Large pages come undecoded and are decoded there too.
        staging: asyncio.Future[None] | None = None
        self._set_state("connecting")
        try:
            async for batch in stream:
                if batch.must_refetch:
                    gathered, gathered_rows, gathered_bytes, reset = [], 0, 0, True
                    if staging is not None:
                        await staging
                        staging = None
                    await asyncio.to_thread(replica.discard_staged, table)
                    log.info("shape rotated; re-syncing, outbox kept", table=table)
                    continue
                gathered.append(batch)
                gathered_rows += len(batch.changes)
                gathered_bytes += batch.size
                if not batch.up_to_date:
                    # A large snapshot: park it on disk, not in memory.
                    if gathered_rows >= _STAGE_AFTER or gathered_bytes >= _STAGE_AFTER_BYTES:
                        if staging is not None:
                            await staging
                        stage = functools.partial(
                            _stage_pages, replica, table, gathered, schema=batch.schema, replace=reset
                        )
                        staging = asyncio.ensure_future(asyncio.to_thread(stage))
                        gathered, gathered_rows, gathered_bytes = [], 0, 0
                    continue
                if staging is not None:
                    await staging
                    staging = None
                apply = functools.partial(
                    _apply_pages,
                    replica,
                    table,
                    stream.state.options.table,
                    gathered,
                    offset=batch.offset,
                    handle=batch.handle,
                    schema=batch.schema,
                    reset=reset,
                    processed_lsn=batch.global_lsn,
                )
                if reset and self._sender is not None:
                    # A reset settles the acknowledged items (the replica's docstring): none may be in flight.
                    async with self._sender.held():
                        await asyncio.to_thread(apply)
                else:
                    await asyncio.to_thread(apply)
                gathered, gathered_rows, gathered_bytes, reset = [], 0, 0, False
                self._synced[table].set()
                back_online = self.state != "connected"
                self._set_state("connected")
                if self._sender is not None:
                    if back_online:
                        self._sender.retry_now()  # the server answers again: no reason to sit out a backoff
                    else:
                        self._sender.wake.set()
        finally:
            if staging is not None:  # an error elsewhere: let the staging thread end before anyone restarts
                with contextlib.suppress(Exception):
                    await staging

    # -- reads ----------------------------------------------------------------------------------------------------

    def query(self, table: str, *, synced: bool = False) -> list[dict[str, Any]]:
        """Every row of ``table`` in the replica, typed (pending local writes included unless ``synced``)."""
        _, replica = self._ready()
        return replica.rows(table, synced=synced)

    def pending(self) -> int:
        """Local writes not yet confirmed by the stream."""
        _, replica = self._ready()
        return replica.count_outbox()

    # -- writes ---------------------------------------------------------------------------------------------------

    async def insert(self, table: str, row: Mapping[str, Any]) -> str:
        return await self._write(table, "insert", row)

    async def update(self, table: str, row: Mapping[str, Any]) -> str:
        """``row`` holds the primary key and the columns to change."""
        return await self._write(table, "update", row)

    async def delete(self, table: str, key: Mapping[str, Any]) -> str:
        return await self._write(table, "delete", key)

    async def _write(self, table: str, op: Literal["insert", "update", "delete"], row: Mapping[str, Any]) -> str:
        _, replica = self._ready()
        schema = replica.schema(table)
        unknown = sorted(set(row) - set(schema))
        if unknown:
            raise KeyError(f"{table} has no column {unknown[0]!r}")
        text_row = {c: to_text(v, schema[c]) for c, v in row.items()}
        json_row = {c: to_json_value(v, schema[c]) for c, v in row.items()}
        mutation_id = await asyncio.to_thread(replica.write, table, op, text_row, json_row)
        if self._sender is not None:
            self._sender.wake.set()
        return mutation_id

    # -- hooks ----------------------------------------------------------------------------------------------------

    def on_conflict(self, hook: Callable[[Rejection], Any]) -> None:
        """Called for every local write the server refused (its optimistic state is already rolled back)."""
        self._conflict_hooks.append(hook)

    def on_connection_state(self, hook: Callable[[ConnectionState], Any]) -> None:
        self._state_hooks.append(hook)

    def on_error(self, hook: Callable[[BaseException], Any]) -> None:
        """Called when a stream stops for good (a refused shape request: bad table, revoked token), and when the
        replica fails (the stream then starts again from the stored position, with backoff)."""
        self._error_hooks.append(hook)

    def _rejected(self, rejection: Rejection) -> None:
        for hook in self._conflict_hooks:
            hook(rejection)

    def _set_state(self, state: ConnectionState) -> None:
        if state != self.state:
            self.state = state
            for hook in self._state_hooks:
                hook(state)

    def _ready(self) -> tuple[ClientConfig, Replica]:
        if self.config is None or self.replica is None:
            raise ClientClosedError("call initialize(config) first")
        return self.config, self.replica

    async def wait_for_outbox(self, timeout: float = 30.0) -> None:
        """Wait until every local write is confirmed by the stream (or rejected)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending():
            if loop.time() > deadline:
                raise TimeoutError(f"{self.pending()} local writes still pending after {timeout} s")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        self._stop.set()
        for stream in self._streams.values():
            await stream.aclose()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._http is not None:
            await self._http.aclose()
        if self.replica is not None:
            await asyncio.to_thread(self.replica.close)
        self._set_state("disconnected")
