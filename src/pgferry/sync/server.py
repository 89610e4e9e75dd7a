"""The dev sync server: Electric's HTTP Shape API (``GET /v1/shape``) over pgferry's own replication feed.

It exists so that a developer, CI and the tests have a real Electric-protocol endpoint on one machine; the
official ``@electric-sql/client`` and ``@electric-sql/pglite-sync`` run against it unchanged (see the interop
tests). Production points the proxy at real Electric instead.

Request handling follows Electric's ``Electric.Shapes.Api``: the first request (``offset=-1``) creates or reuses
the shape and serves its log from the start; later requests page through the log by ``offset`` + ``handle``;
``live=true`` long-polls until the log grows or ``live_timeout`` passes and always ends with ``up-to-date``
(``live_sse=true`` streams instead: :mod:`pgferry.sync.sse`); an unknown or rotated handle is a 409 carrying the
current handle and a ``must-refetch`` body; a bad definition is a 400 with Electric's JSON error body and never
reaches SQL unparsed.

Like Electric, it requires its secret (``secret=`` or the older ``api_secret=`` query parameter) on every shape
request unless started explicitly insecure; it serves only its table allow-list (:mod:`pgferry.sync.tables`) and
answers browsers only from configured origins. Shape creation runs on a bounded pool of its own
(:mod:`pgferry.sync.creation`).

Owns HTTP, headers, caching and metrics. Must not know how shapes are stored or fed (shapes/feed modules).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware, GZipResponder, IdentityResponder
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pgferry.errors import ConfigError
from pgferry.sync import protocol as p
from pgferry.sync.creation import ShapeCreator
from pgferry.sync.errors import ProtocolError, UnauthorizedError, UnsupportedFeatureError
from pgferry.sync.feed import ReplicationFeed, prepare_server_state
from pgferry.sync.longpoll import unless_client_leaves
from pgferry.sync.session import connect_sql
from pgferry.sync.shapes import DEFAULT_SNAPSHOT_TIMEOUT_MS, SNAPSHOT_SEGMENT_BYTES, Shape, ShapeManager
from pgferry.sync.sse import sse_events
from pgferry.sync.store import SegmentRun, normalise_offset
from pgferry.sync.tables import ServedTables, default_served_tables
from pgferry.sync.where import parse_params
from pgferry.sync.wire import choose_encoding, gzip_body, zstd_body

__all__ = ["MAX_QUERY_LENGTH", "SyncServer", "SyncServerConfig", "create_sync_app"]

_log = structlog.get_logger("pgferry.sync.server")

_AFTER_SNAPSHOT = p.LogOffset(0, 2**62)  # "0_inf"
#: Characters of query string accepted (a where clause is at most 4096, each of up to 100 params at most 4096;
#: real requests are far below this). Longer is a 414, before anything is parsed.
MAX_QUERY_LENGTH = 32 * 1024
#: Bodies smaller than this go out uncompressed (gzip's framing would outweigh its gain).
GZIP_MINIMUM_SIZE = 1024


@dataclass(frozen=True)
class SyncServerConfig:
    """The dev server's settings. ``secret`` is required unless ``insecure`` (Electric's ``ELECTRIC_SECRET`` /
    ``ELECTRIC_INSECURE``); ``tables`` is the allow-list (default: the platform's tables); ``allow_origins`` the
    browser origins CORS admits (default none: browsers talk to the proxy, not to this server)."""

    database_url: str
    data_dir: Path
    secret: str | None = field(default=None, repr=False)
    insecure: bool = False
    tables: tuple[str | p.TableName, ...] = field(default_factory=default_served_tables)
    live_timeout: float = 20.0
    sse_timeout: float = 60.0
    sse_keepalive: float = 21.0
    max_chunk_bytes: int = 4 << 20
    allow_origins: tuple[str, ...] = ()
    allow_shape_deletion: bool = True
    snapshot_workers: int = 4
    max_waiting_creations: int = 16
    max_shapes: int = 1000
    snapshot_timeout_ms: int = DEFAULT_SNAPSHOT_TIMEOUT_MS

    def __post_init__(self) -> None:
        if not self.insecure and not self.secret:
            raise ConfigError(
                "ELECTRIC_SECRET",
                "the sync server needs a secret that every request must carry (set ELECTRIC_SECRET, at least 16 "
                "characters), or --insecure to serve without one (local experiments only)",
            )
        if self.secret is not None and self.insecure:
            raise ConfigError("--insecure", "give either a secret or --insecure, not both")
        if self.secret is not None and len(self.secret) < 16:
            raise ConfigError("ELECTRIC_SECRET", "must be at least 16 characters")
        if self.snapshot_workers < 1 or self.max_shapes < 1 or self.max_waiting_creations < 1:
            raise ConfigError("--snapshot-workers", "limits must be at least 1")


class _Metrics:
    def __init__(self, manager: ShapeManager, feed_lag: Any) -> None:
        self.registry = CollectorRegistry()
        self.shapes = Gauge("pgferry_sync_shapes", "Shapes with a log", registry=self.registry)
        self.shapes.set_function(lambda: len(manager.shapes()))
        self.log_bytes = Gauge("pgferry_sync_log_bytes", "Bytes of shape logs on disk", registry=self.registry)
        self.log_bytes.set_function(lambda: sum(s.log.size_bytes for s in manager.shapes()))
        self.live_clients = Gauge(
            "pgferry_sync_live_clients", "Live requests waiting for changes", registry=self.registry
        )
        self.lag = Gauge(
            "pgferry_sync_replication_lag_bytes", "WAL not yet confirmed by the sync feed", registry=self.registry
        )
        self.lag.set_function(lambda: float(feed_lag() or 0))
        self.transactions = Gauge(
            "pgferry_sync_transactions_applied", "Replicated transactions applied", registry=self.registry
        )
        self.transactions.set_function(lambda: manager.transactions_applied)
        self.requests = Counter(
            "pgferry_sync_requests", "Shape requests by status", ["status", "live"], registry=self.registry
        )
        self.commit_to_response = Histogram(
            "pgferry_sync_commit_to_response_seconds",
            "Time from a transaction's commit to a live response carrying it",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )


def _error(err: ProtocolError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers={"cache-control": "no-store", **err.headers()})


def _check_secret(request: Request, secret: str | None) -> None:
    """Electric's check: the ``secret`` (or legacy ``api_secret``) query parameter must equal the server's."""
    if secret is None:
        return
    given = request.query_params.get("secret") or request.query_params.get("api_secret") or ""
    if not hmac.compare_digest(given.encode(), secret.encode()):
        raise UnauthorizedError("secret", "a valid secret is required (query parameter secret)")


def _flag(value: str | None, field: str) -> bool:
    if value is None or value == "false":
        return False
    if value == "true":
        return True
    raise ProtocolError(field, "must be true or false")


def _definition(request: Request) -> p.ShapeDefinition:
    query = request.query_params
    table = p.parse_table_name(query.get("table"))
    where = query.get("where")
    if where is not None and where.strip() == "":
        where = None
    params = parse_params(query.multi_items())
    columns_text = query.get("columns")
    columns = p.parse_columns(columns_text) if columns_text is not None else None
    replica = p.parse_replica(query.get("replica"))
    log_mode = query.get("log")
    if log_mode not in (None, "full"):
        raise UnsupportedFeatureError("log", f"log={log_mode[:20]!r} is not supported by this server (use full)")
    for key in query:
        if key.startswith("subset__"):
            raise UnsupportedFeatureError(key, "subset snapshots are not supported by this server")
    return p.ShapeDefinition(table, where, tuple(sorted(params.items())), columns, replica)


def _cursor(requested: str | None, live_timeout: float) -> str:
    """Electric's live cache buster: the current long-poll interval, always ahead of what the client sent."""
    interval = max(1, int(live_timeout))
    value = int(time.time()) // interval * interval
    if requested is not None and requested.isdigit() and int(requested) >= value:
        value = int(requested) + interval
    return str(value)


class SyncServer:
    """The dev server as an object: its parts (served tables, shape manager, creation pool, metrics, the feed once
    started) are attributes, and every HTTP handler is a method, so each step of serving a shape has a name.

    ``SyncServer(config).app()`` (or :func:`create_sync_app`) is the ASGI app; the feed starts and stops with the
    app's lifespan."""

    def __init__(self, config: SyncServerConfig) -> None:
        self.config = config
        self.tables = ServedTables(config.tables)
        self.manager = ShapeManager(
            config.database_url,
            config.data_dir,
            snapshot_timeout_ms=config.snapshot_timeout_ms,
            # Several segments to a page, so a page boundary is always a segment boundary near max_chunk_bytes.
            segment_bytes=min(SNAPSHOT_SEGMENT_BYTES, max(16 * 1024, config.max_chunk_bytes // 4)),
        )
        self.creator = ShapeCreator(
            config.database_url,
            self.manager,
            self.tables,
            workers=config.snapshot_workers,
            max_waiting=config.max_waiting_creations,
            max_shapes=config.max_shapes,
        )
        self.feed: ReplicationFeed | None = None
        self._stop_preparing = threading.Event()
        self.metrics = _Metrics(self.manager, self._feed_lag)

    def _feed_lag(self) -> int | None:
        return self.feed.lag_bytes() if self.feed is not None else None

    # -- lifecycle ------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """Prepare the publication and slot, load the shapes kept on disk, start the feed and the thread that
        keeps retrying tables whose identity could not be set yet; stop all of it on shutdown."""
        config = self.config
        state = await asyncio.to_thread(
            prepare_server_state, config.database_url, config.data_dir, self.tables, self.manager
        )
        # The slot's confirmed position: everything before it was applied (and a commit may start right at it).
        self.manager.processed_lsn = max(0, state.start_lsn - 1)
        loaded = await asyncio.to_thread(self.manager.load, lambda definition: definition.table in self.tables.names)
        self.manager.bind_loop(asyncio.get_running_loop())
        feed = ReplicationFeed(config.database_url, self.manager, state)
        self.feed = feed
        feed.start()
        self._start_table_preparer(state.publication)
        _log.info(
            "sync.server_started",
            slot=state.slot,
            shapes_loaded=loaded,
            data_dir=str(config.data_dir),
            tables=len(self.tables.names),
            tables_pending=sorted(self.tables.pending),
            secret_required=config.secret is not None,
        )
        try:
            yield
        finally:
            self._stop_preparing.set()
            self.manager.close()  # first: running snapshots stop at their next page
            self.creator.close()
            await asyncio.to_thread(feed.stop)

    def _start_table_preparer(self, publication: str) -> None:
        database_url = self.config.database_url
        preparer = threading.Thread(
            target=self.tables.retry_until_ready,
            args=(lambda: connect_sql(database_url), publication, self._stop_preparing),
            name="pgferry-sync-tables",
            daemon=True,
        )
        preparer.start()

    # -- small endpoints ------------------------------------------------------------------------------------

    async def health(self, _request: Request) -> Response:
        """The feed's status (a condition, never a row value) and the tables still waiting to be prepared."""
        feed = self.feed
        status = feed.status if feed is not None else "starting"
        body: dict[str, Any] = {"status": "active" if status == "active" else status}
        if feed is not None and feed.last_error and status != "active":
            body["error"] = feed.last_error  # describe_error(): a condition, never a row value
        pending = self.tables.pending if feed is not None else {}
        if pending:
            body["tables_pending"] = sorted(pending)
        return JSONResponse(body, status_code=200 if status == "active" else 503)

    async def metrics_endpoint(self, _request: Request) -> Response:
        data = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    # -- /v1/shape --------------------------------------------------------------------------------------------

    async def shape_endpoint(self, request: Request) -> Response:
        """Every outcome is a response with a JSON body (a client mistake in Electric's error shape, anything
        unexpected one log line and a 500), counted by status."""
        live = request.query_params.get("live") == "true"
        response: Response
        try:
            if len(request.url.query) > MAX_QUERY_LENGTH:
                response = JSONResponse(
                    {"message": "URI too long", "errors": {"query": [f"longer than {MAX_QUERY_LENGTH} characters"]}},
                    status_code=414,
                    headers={"cache-control": "no-store"},
                )
            else:
                _check_secret(request, self.config.secret)
                if request.method == "DELETE":
                    response = await self.delete_shape(request)
                else:
                    response = await self.get_shape(request)
        except ProtocolError as err:
            response = _error(err)
        except Exception as exc:  # never a traceback to the client: one line in the log, a JSON 500
            _log.error("sync.request_failed", error=type(exc).__name__)
            response = JSONResponse(
                {"message": "Internal server error"}, status_code=500, headers={"cache-control": "no-store"}
            )
        self.metrics.requests.labels(status=str(response.status_code), live=str(live).lower()).inc()
        return response

    async def delete_shape(self, request: Request) -> Response:
        """``DELETE /v1/shape`` by handle or by definition: its clients get ``must-refetch`` next."""
        if not self.config.allow_shape_deletion:
            return JSONResponse({"message": "shape deletion is disabled"}, status_code=405)
        handle = request.query_params.get("handle")
        if handle:
            deleted = await asyncio.to_thread(self.manager.delete, handle)
        else:
            shape = self.manager.current(_definition(request))
            deleted = shape is not None and await asyncio.to_thread(self.manager.delete, shape.handle)
        if not deleted:
            return JSONResponse({"message": "Shape not found"}, status_code=404)
        return Response(status_code=202)

    async def must_refetch(self, definition: p.ShapeDefinition) -> Response:
        """409 with the current handle of ``definition`` (created if needed) and a ``must-refetch`` body."""
        shape = await self.creator.get_or_create(definition)
        return Response(
            p.encode_messages([p.control_message("must-refetch")]),
            status_code=409,
            media_type="application/json",
            headers={p.HANDLE_HEADER: shape.handle, "cache-control": "public, max-age=60, must-revalidate"},
        )

    async def get_shape(self, request: Request) -> Response:
        """``GET /v1/shape``: read the request, find the shape, then serve a page of its log — while its
        snapshot is still being written, at a fixed offset, as a stream, or waiting for the log to grow."""
        shape_request = _ShapeRequest.read(request)
        definition = shape_request.definition
        shape = await self._resolve_shape(shape_request)
        if shape is None:
            return await self.must_refetch(definition)
        partial = await self._wait_for_snapshot(shape, shape_request, request)
        if partial is not None:
            return partial
        if shape.gone:
            return await self.must_refetch(definition)
        self._check_offset_in_bounds(shape, shape_request.offset)

        offset = shape_request.offset
        if offset == "now":
            return self._respond(
                shape,
                [],
                shape.log.last_offset or _AFTER_SNAPSHOT,
                at_end=True,
                request=request,
                live=shape_request.live,
                requested="now",
                global_lsn=self.manager.processed_lsn,
            )
        assert isinstance(offset, p.LogOffset)
        if shape_request.sse:
            return self._stream(shape, offset, request)
        return await self._serve_log(shape, shape_request, request)

    async def _resolve_shape(self, shape_request: _ShapeRequest) -> Shape | None:
        """The shape the request is for; ``None`` when its handle is unknown or belongs to another definition
        (the client must refetch)."""
        if shape_request.handle is None:
            return await self.creator.get_or_create(shape_request.definition)
        known = self.manager.get(shape_request.handle)
        if known is None or known.definition != shape_request.definition:
            return None
        return known

    async def _wait_for_snapshot(self, shape: Shape, shape_request: _ShapeRequest, request: Request) -> Response | None:
        """Serve full pages of a snapshot that is still being written; wait for the rest (never an empty
        non-live answer: the client's fast-loop guard would take that for a broken server). ``None`` once the
        snapshot is complete."""
        offset = shape_request.offset
        while shape.snapshotting:
            event = shape.changed_event()
            if not shape.snapshotting:
                break
            if isinstance(offset, p.LogOffset):
                encoding, fallback = _encodings(request)
                run = shape.log.read_segments(
                    offset,
                    max_bytes=self.config.max_chunk_bytes,
                    encoding=encoding,
                    plain_below=GZIP_MINIMUM_SIZE,
                    fallback=fallback,
                )
                if run is not None and not run.at_end:  # a full page: more of the snapshot follows it
                    return self._respond_page(
                        shape, _page(run, None), request=request, live=shape_request.live,
                        requested=str(offset),
                    )  # fmt: skip
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=1.0)
        return None

    def _check_offset_in_bounds(self, shape: Shape, offset: p.LogOffset | Literal["now"]) -> None:
        """Only offsets this server handed out (or an SSE client derived from an up-to-date) are valid;
        answering a future one with up-to-date would make pglite-sync record that position and drop every real
        change below it (Electric: 400 too)."""
        if not isinstance(offset, p.LogOffset) or offset == p.BEFORE_ALL or offset == _AFTER_SNAPSHOT:
            return
        last_offset = shape.log.last_offset or p.LogOffset(0, 0)
        beyond = offset.tx > max(last_offset.tx, self.manager.processed_lsn) or (
            offset.tx == last_offset.tx and offset.op > last_offset.op
        )
        if beyond:
            raise ProtocolError("offset", "out of bounds for this shape")

    async def _serve_log(self, shape: Shape, shape_request: _ShapeRequest, request: Request) -> Response:
        """A page of the log after the requested offset; a live request with nothing new waits for the log to
        grow (or ``live_timeout``) first."""
        offset = shape_request.offset
        assert isinstance(offset, p.LogOffset)
        position = normalise_offset(offset)
        event = shape.changed_event()  # taken before reading the log, so a change in between still wakes us
        global_lsn = self.manager.processed_lsn  # read before the log: see the up-to-date note in _respond
        stored = self._serve_segments(shape, shape_request, request, position, global_lsn)
        if stored is not None:
            return stored
        chunk = shape.log.read_after(position, max_bytes=self.config.max_chunk_bytes)
        if shape_request.live and not chunk.messages:
            self.metrics.live_clients.inc()
            try:
                waited = await unless_client_leaves(request, event.wait(), timeout=self.config.live_timeout)
                if waited.outcome == "disconnected":
                    return Response(status_code=499)  # nobody is listening; uvicorn drops it
            finally:
                self.metrics.live_clients.dec()
            if shape.gone:
                return await self.must_refetch(shape_request.definition)
            global_lsn = self.manager.processed_lsn
            stored = self._serve_segments(shape, shape_request, request, position, global_lsn)
            if stored is not None:
                self._observe_commit(shape)
                return stored
            chunk = shape.log.read_after(position, max_bytes=self.config.max_chunk_bytes)
            if chunk.messages:
                self._observe_commit(shape)
        if chunk.last_offset is not None:
            end = chunk.last_offset
        elif offset == p.BEFORE_ALL:
            end = _AFTER_SNAPSHOT
        else:
            end = offset
        return self._respond(
            shape,
            chunk.messages,
            end,
            at_end=chunk.at_end,
            request=request,
            live=shape_request.live,
            requested=str(offset),
            global_lsn=global_lsn,
        )

    def _observe_commit(self, shape: Shape) -> None:
        if shape.last_commit_ts is not None:
            self.metrics.commit_to_response.observe(max(0.0, time.time() - shape.last_commit_ts))

    def _serve_segments(
        self,
        shape: Shape,
        shape_request: _ShapeRequest,
        request: Request,
        position: p.LogOffset,
        global_lsn: int,
    ) -> Response | None:
        """The page after ``position`` from stored segments, when ``position`` is a segment boundary (every offset
        this server hands out is) and something follows it; ``None`` otherwise."""
        encoding, fallback = _encodings(request)
        # Every long-poll on a shape wakes for the same change and asks for the same page: the first builds it,
        # the others reuse its bytes (keyed by everything the body depends on).
        key = (position, len(shape.log), encoding, global_lsn)
        cached = shape.live_page if shape_request.live else None
        if cached is not None and cached[0] == key:
            page = cached[1]
        else:
            run = shape.log.read_segments(
                position,
                max_bytes=self.config.max_chunk_bytes,
                encoding=encoding,
                plain_below=GZIP_MINIMUM_SIZE,
                fallback=fallback,
            )
            if run is None:
                return None
            page = _page(run, self._up_to_date(run.last_offset, global_lsn) if run.at_end else None)
            if shape_request.live:
                shape.live_page = (key, page)
        return self._respond_page(
            shape, page, request=request, live=shape_request.live, requested=str(shape_request.offset)
        )

    def _stream(self, shape: Shape, offset: p.LogOffset, request: Request) -> Response:
        """``live_sse``: an event stream of the shape's log (see :mod:`pgferry.sync.sse`)."""
        metrics = self.metrics
        config = self.config
        manager = self.manager

        def observed(streamed: Shape) -> None:
            if streamed.last_commit_ts is not None:
                metrics.commit_to_response.observe(max(0.0, time.time() - streamed.last_commit_ts))

        async def events() -> AsyncIterator[bytes]:
            metrics.live_clients.inc()
            try:
                async for chunk in sse_events(
                    shape,
                    offset,
                    global_lsn=lambda: manager.processed_lsn,
                    max_bytes=config.max_chunk_bytes,
                    duration=config.sse_timeout,
                    keepalive=config.sse_keepalive,
                    on_change=observed,
                ):
                    yield chunk
            finally:
                metrics.live_clients.dec()

        headers = {
            p.HANDLE_HEADER: shape.handle,
            p.OFFSET_HEADER: str(offset),  # the client moves on only with each up-to-date's global_last_seen_lsn
            p.CURSOR_HEADER: _cursor(request.query_params.get("cursor"), config.live_timeout),
            "cache-control": "no-cache",
            "x-accel-buffering": "no",  # a buffering reverse proxy would hold every event back
        }
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    def _headers(
        self,
        shape: Shape,
        end: p.LogOffset,
        *,
        at_end: bool,
        request: Request,
        live: bool,
        requested: str,
    ) -> dict[str, str]:
        """Electric's response headers for a page of ``shape`` ending at ``end``."""
        end_text = "0_inf" if end == _AFTER_SNAPSHOT else str(end)
        headers = {
            p.HANDLE_HEADER: shape.handle,
            p.OFFSET_HEADER: end_text,
            "etag": f'"{shape.handle}:{requested}:{end_text}"',
        }
        if at_end:
            headers[p.UP_TO_DATE_HEADER] = ""
        if live:
            headers[p.CURSOR_HEADER] = _cursor(request.query_params.get("cursor"), self.config.live_timeout)
            headers["cache-control"] = p.LIVE_CACHE_CONTROL
        else:
            headers[p.SCHEMA_HEADER] = shape.schema_header()
            if requested == "-1":
                headers["cache-control"] = p.NON_LIVE_CACHE_CONTROL
            else:
                headers["cache-control"] = p.UP_TO_DATE_CACHE_CONTROL
        return headers

    @staticmethod
    def _up_to_date(end: p.LogOffset, global_lsn: int) -> bytes:
        """``up-to-date`` carries ``global_last_seen_lsn`` that is never ahead of a change the client has not been
        sent (read before the log), which pglite-sync relies on to tell replays from new changes."""
        seen = max(global_lsn, end.tx if end != _AFTER_SNAPSHOT else 0)
        return p.encode_message(p.control_message("up-to-date", global_last_seen_lsn=str(seen)))

    def _respond(
        self,
        shape: Shape,
        messages: list[bytes],
        end: p.LogOffset,
        *,
        at_end: bool,
        request: Request,
        live: bool,
        requested: str,
        global_lsn: int,
    ) -> Response:
        """Build the body from stored message bytes (the gzip middleware compresses it on the way out)."""
        parts = list(messages)
        if at_end:
            parts.append(self._up_to_date(end, global_lsn))
        body = b"[" + b",".join(parts) + b"]"
        headers = self._headers(shape, end, at_end=at_end, request=request, live=live, requested=requested)
        if not live and request.headers.get("if-none-match") == headers["etag"]:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    def _respond_page(self, shape: Shape, page: _Page, *, request: Request, live: bool, requested: str) -> Response:
        """A page made of stored segments, sent as stored: the same headers, offsets and ETag as :meth:`_respond`
        would give for the same messages."""
        headers = self._headers(
            shape, page.last_offset, at_end=page.at_end, request=request, live=live, requested=requested
        )
        if not live and request.headers.get("if-none-match") == headers["etag"]:
            return Response(status_code=304, headers=headers)
        if page.content_encoding is not None:
            headers["content-encoding"] = page.content_encoding
            headers["vary"] = "Accept-Encoding"
        return Response(page.body, media_type="application/json", headers=headers)

    # -- the app ----------------------------------------------------------------------------------------------

    def app(self) -> Starlette:
        """The Starlette app: routes, gzip (level 1: level 9 costs 6x the CPU), CORS for configured origins."""
        routes = [
            Route("/v1/shape", self.shape_endpoint, methods=["GET", "DELETE"]),
            Route("/v1/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
        ]
        middleware = [Middleware(_NegotiatedGZip, minimum_size=GZIP_MINIMUM_SIZE, compresslevel=1)]
        if self.config.allow_origins:
            middleware.insert(0, _cors(self.config.allow_origins))
        app = Starlette(routes=routes, middleware=middleware, lifespan=self.lifespan)
        app.state.server = self
        app.state.manager = self.manager
        app.state.metrics = self.metrics
        app.state.tables = self.tables
        return app


@dataclass(frozen=True, slots=True)
class _Page:
    """A page's body as it goes on the wire (gzip, zstd or identity), with what its headers need."""

    body: bytes
    content_encoding: str | None
    last_offset: p.LogOffset
    at_end: bool


def _encodings(request: Request) -> tuple[str, str]:
    """The coding to answer ``request`` with, and the one to use instead while a run's zstd frames are not made
    yet (gzip when the client accepts it, else identity; the header is parsed again only for a zstd client)."""
    accept = request.headers.get("accept-encoding")
    encoding = choose_encoding(accept)
    return encoding, choose_encoding(accept, ("gzip",)) if encoding == "zstd" else encoding


def _page(run: SegmentRun, up_to_date: bytes | None) -> _Page:
    """The body of ``run`` (ended by ``up_to_date`` when given) in the coding it was read in (``run.encoding``):
    gzip is the stored deflate pieces framed as one gzip member, zstd the stored frames one after another; bodies
    under the middleware's threshold go out uncompressed, as they always did."""
    encoding = run.encoding
    tail = b"," + up_to_date + b"]" if up_to_date is not None else b"]"
    at_end = up_to_date is not None
    if run.plain_bytes + len(tail) + 1 >= GZIP_MINIMUM_SIZE:
        if encoding == "gzip":
            return _Page(gzip_body(run.deflated, tail), "gzip", run.last_offset, at_end)
        if encoding == "zstd":
            return _Page(zstd_body(run.zstd, tail), "zstd", run.last_offset, at_end)
    return _Page(b"[" + b",".join(run.plain) + tail, None, run.last_offset, at_end)  # plain read for small runs


@dataclass(frozen=True)
class _ShapeRequest:
    """A ``GET /v1/shape`` request's parameters, checked: the definition, the offset, the handle and the mode."""

    definition: p.ShapeDefinition
    offset: p.LogOffset | Literal["now"]
    handle: str | None
    live: bool
    sse: bool

    @classmethod
    def read(cls, request: Request) -> _ShapeRequest:
        query = request.query_params
        definition = _definition(request)
        offset = p.parse_offset(query.get("offset"))
        live = _flag(query.get("live"), "live")
        sse = live and (
            _flag(query.get("live_sse"), "live_sse") or _flag(query.get("experimental_live_sse"), "live_sse")
        )
        handle = query.get("handle") or None
        if offset != p.BEFORE_ALL and offset != "now" and handle is None:
            raise ProtocolError("handle", "can't be blank when offset != -1 (send the electric-handle you received)")
        if live and (offset == p.BEFORE_ALL):
            raise ProtocolError("live", "can't be true with offset=-1 (fetch the snapshot first)")
        return cls(definition, offset, handle, live, sse)


def create_sync_app(config: SyncServerConfig) -> Starlette:
    """The dev server's ASGI app (``SyncServer(config).app()``); serve it with uvicorn or mount it."""
    return SyncServer(config).app()


def _cors(origins: Iterable[str]) -> Middleware:
    """CORS for the configured origins only: GET (reads) and the headers a shape client reads. Never DELETE from
    a browser: deleting shapes is an operator's action."""
    return Middleware(
        CORSMiddleware,
        allow_origins=list(origins),
        allow_methods=["GET", "OPTIONS"],
        allow_headers=["Content-Type"],
        expose_headers=list(p.ELECTRIC_HEADERS),
    )


class _NegotiatedGZip(GZipMiddleware):
    """Starlette's gzip middleware, choosing gzip by :func:`~pgferry.sync.wire.choose_encoding` (q-values: a
    client sending ``gzip;q=0`` gets identity) instead of a substring test, so that it agrees with the encoding
    the shape endpoint chose for the stored segments it sends (responses that carry a ``content-encoding`` pass
    through untouched)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        accept = None
        for name, value in scope.get("headers", ()):
            if name == b"accept-encoding":
                accept = value.decode("latin-1")
        responder: Any
        if choose_encoding(accept, ("gzip",)) == "gzip":  # responses from stored zstd frames pass through
            responder = GZipResponder(
                self.app,
                self.minimum_size,
                compresslevel=self.compresslevel,
                thread_minimum_size=self.thread_minimum_size,
                exclude_content_types=self.exclude_content_types,
            )
        else:
            responder = IdentityResponder(self.app, self.minimum_size, exclude_content_types=self.exclude_content_types)
        await responder(scope, receive, send)
