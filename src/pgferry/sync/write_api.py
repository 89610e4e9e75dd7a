"""The write API: ``POST /v1/mutations``, served by the shape proxy or mounted as an ASGI app of its own.

Electric has no write path; this is pgferry's. A client (the Python outbox, a browser with TanStack DB's Electric
collection, any HTTP client) sends a batch of mutations with the user's Supabase access token::

    POST /v1/mutations
    Authorization: Bearer <access token>
    {"mutations": [{"id": "<uuid>", "op": "update", "table": "public.tasks",
                    "row": {"id": "…", "status": "done"}, "written_at": 1796032800000}]}

and gets ``{"txid": "<xid>", "lsn": "<X/Y>", "results": [{"id": "…", "status": "applied", "op": "update", "key": {…},
"changed": true, "txid": "<xid>", "lsn": "<X/Y>", "conflicts": [...]?}]}``: the batch was applied in one transaction
as that user (RLS decides), and the shape log shows its changes with ``headers.txids == [<xid>]``, so the client drops
its optimistic state when that txid streams in. ``lsn`` is the batch's commit position (at or after the start of its
commit record; :func:`pgferry.sync.writer._commit_position`): a change no shape of the client holds never streams
in, so the client also drops its optimistic state once an ``up-to-date`` of the table's shape carries
``global_last_seen_lsn >= lsn`` (the server has processed the commit by then).
An update that meets a concurrent change is resolved by the table's conflict policy (:mod:`pgferry.sync.conflicts`:
last-write-wins per column by default, per row on ``updated_at``, or a custom resolver); every resolved conflict is
recorded and listed in the result, and ``"changed": false`` says the mutation wrote nothing (the server's row won,
or a deleted row was already gone), so the client must not wait for its txid in the stream.
A mutation id seen before is not applied again (``"status": "replayed"``, with the stored result), for as long as
:attr:`WriteApiConfig.retention_seconds` (7 days by default; a client must deliver its outbox within that time).
A batch with any problem is refused whole — nothing written — with one error per mutation at fault, each naming its
field: ``{"message": …, "errors": [{"id": …, "field": "mutations[1].row.priority", "problem": …, "status": 400}]}``.
Statuses: 400 malformed or wrong type, 401 token, 403 table not writable or RLS refused the row, 404 no row of
yours with that key, 409 key exists / id used by another user, 413 too large, 415 not JSON, 503 database down.

Owns HTTP for writes and the connection pool; the checks live in :mod:`pgferry.sync.mutations`, the SQL in
:mod:`pgferry.sync.writer`. Must not touch the shape protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import psycopg
import structlog
from psycopg.pq import TransactionStatus
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgferry.db.connect import connect
from pgferry.errors import ConfigError
from pgferry.sync.auth import AuthenticatedUser, TokenVerifier
from pgferry.sync.conflicts import ConflictPolicy
from pgferry.sync.errors import MutationRejectedError, is_connection_error
from pgferry.sync.mutations import Mutation, WriteTable, parse_mutations
from pgferry.sync.protocol import TableName, parse_table_name
from pgferry.sync.responses import authenticate, json_error
from pgferry.sync.writer import BatchRejectedError, BatchResult, apply_batch, load_write_tables, purge_applied_mutations

__all__ = [
    "DEFAULT_RETENTION_SECONDS",
    "MAX_BODY_BYTES",
    "WriteApi",
    "WriteApiConfig",
    "create_write_app",
    "default_write_tables",
]

log = structlog.get_logger("pgferry.sync.write_api")

#: How long applied mutation ids are remembered (a replay after that applies again).
DEFAULT_RETENTION_SECONDS: Final = 7 * 24 * 3600.0
#: Largest request body accepted (413 beyond).
MAX_BODY_BYTES: Final = 8 << 20
_PURGE_INTERVAL: Final = 60.0
_JSON: Final = msgspec.json.Encoder()
#: Bodies are decoded by msgspec first (in C, several times faster than ``json.loads`` on a batch of thousands of
#: mutations: a drain's write API shares its cores with PostgreSQL); the same objects for any JSON both accept.
_DECODE: Final = msgspec.json.decode


def default_write_tables() -> dict[str, str | None]:
    """The platform's user-owned tables (``pgferry.schema.models``), each owned by its ``user_id`` column."""
    from pgferry.schema.models import Base

    return {
        f"{table.schema or 'public'}.{table.name}": "user_id"
        for table in Base.metadata.sorted_tables
        if "user_id" in table.columns
    }


@dataclass(frozen=True)
class WriteApiConfig:
    """The write API's settings. ``database_url`` must connect as a role that may ``SET ROLE authenticated`` (on
    Supabase: ``postgres``); ``tables`` maps ``schema.table`` to its owner column (filled from the token's user
    when an insert omits it; ``None``: no owner column); ``pool_size`` connections are kept open."""

    database_url: str = field(repr=False)
    verifier: TokenVerifier
    tables: Mapping[str, str | None] = field(default_factory=default_write_tables)
    retention_seconds: float = DEFAULT_RETENTION_SECONDS
    pool_size: int = 4
    allow_origins: tuple[str, ...] = ("*",)
    #: Conflict policy per ``schema.table`` (:mod:`pgferry.sync.conflicts`); a table not named gets
    #: :class:`~pgferry.sync.conflicts.ColumnLww` (last-write-wins per column).
    conflicts: Mapping[str, ConflictPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ConfigError("--database-url", "the write API needs the database to write to (SUPABASE_DB_URL)")
        if self.pool_size < 1:
            raise ConfigError("pool_size", "must be at least 1")
        if self.retention_seconds < 60:
            raise ConfigError("retention_seconds", "must be at least 60 s (clients retry for longer than that)")
        normalised: dict[str, str | None] = {}
        for name, owner in self.tables.items():
            try:
                table = parse_table_name(name)
            except Exception:
                raise ConfigError("tables", f"{name!r} is not a table name like public.tasks") from None
            normalised[f"{table.schema}.{table.name}"] = owner
        object.__setattr__(self, "tables", normalised)
        policies: dict[str, ConflictPolicy] = {}
        for name, policy in self.conflicts.items():
            table = parse_table_name(name)
            qualified = f"{table.schema}.{table.name}"
            if qualified not in normalised:
                raise ConfigError("conflicts", f"{qualified} is not one of the write API's tables")
            policies[qualified] = policy
        object.__setattr__(self, "conflicts", policies)

    def policies(self) -> dict[TableName, ConflictPolicy]:
        """The conflict policies by table name."""
        return {parse_table_name(name): policy for name, policy in self.conflicts.items()}


class _ConnectionPool:
    """A few open connections, handed to one worker thread at a time. A connection that failed is closed and
    replaced on the next use, so a database restart costs the requests in flight, not the process."""

    def __init__(self, url: str, size: int) -> None:
        self._url = url
        self._idle: queue.LifoQueue[psycopg.Connection[Any] | None] = queue.LifoQueue()
        for _ in range(size):
            self._idle.put(None)

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._idle.get()
        try:
            if conn is None or conn.closed or conn.broken:
                conn = connect(self._url, application_name="pgferry-write", autocommit=True)
            yield conn
        except BaseException:
            if (
                conn is not None
                and not conn.closed
                and (conn.broken or conn.info.transaction_status != TransactionStatus.IDLE)
            ):
                conn.close()
            raise
        finally:
            self._idle.put(None if conn is None or conn.closed else conn)

    def close(self) -> None:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            if conn is not None:
                conn.close()


class WriteApi:
    """``POST /v1/mutations`` as an object: the pool, the tables (read from the catalog on first use) and the
    handler steps — authenticate, read the body, check it, apply it, answer."""

    def __init__(self, config: WriteApiConfig) -> None:
        self.config = config
        self.pool = _ConnectionPool(config.database_url, config.pool_size)
        self._tables: dict[TableName, WriteTable] | None = None
        self._tables_lock = threading.Lock()
        self._last_purge = 0.0
        self._policies = config.policies()

    # -- the endpoint -------------------------------------------------------------------------------------------

    async def mutations(self, request: Request) -> Response:
        """Every outcome is a JSON response: an unexpected exception is one log line and a 500."""
        try:
            return await self._mutations(request)
        except Exception as exc:
            log.error("mutation request failed", problem=type(exc).__name__)
            return json_error(500, {"message": "Internal server error"})

    async def _mutations(self, request: Request) -> Response:
        user = await authenticate(self.config.verifier, request)
        if isinstance(user, Response):
            return user
        body = await self._read_body(request)
        if isinstance(body, Response):
            return body
        try:
            # Read from the catalog once, on a worker thread; after that no thread hop per request.
            tables = self._tables if self._tables is not None else await asyncio.to_thread(self.tables)
            mutations, problems = parse_mutations(body, tables)
            if problems:
                raise BatchRejectedError(problems)
            result = await asyncio.to_thread(self._apply, user, mutations)
        except BatchRejectedError as exc:
            log.info("mutations refused", user_id=str(user.user_id), problems=len(exc.problems), status=exc.status)
            return _rejected(exc)
        except psycopg.Error as exc:
            if not is_connection_error(exc):
                raise
            log.warning("write database unavailable", problem=type(exc).__name__)
            body = {"message": "Service unavailable", "errors": {"database": ["cannot reach the database now"]}}
            return json_error(503, body, {"retry-after": "1"})
        # Encoded by msgspec: a batch's results are thousands of small objects (the stdlib's encoder was a visible
        # part of a request's CPU).
        return Response(
            _JSON.encode(result.as_json()),
            media_type="application/json",
            headers={"cache-control": "no-store", "vary": "Authorization"},
        )

    async def _read_body(self, request: Request) -> Any:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            body = {"message": "Unsupported media type", "errors": {"content-type": ["send application/json"]}}
            return json_error(415, body)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _too_large()
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                return _too_large()
        try:
            return _DECODE(data)
        except msgspec.DecodeError:
            pass
        try:
            return json.loads(data)  # what msgspec refuses (NaN, 1e400, a lone surrogate) is decided as it always was
        except ValueError:
            return json_error(400, {"message": "Invalid request", "errors": {"body": ["is not valid JSON"]}})

    # -- steps on a worker thread -----------------------------------------------------------------------------

    def tables(self) -> dict[TableName, WriteTable]:
        """The writable tables' columns and keys, read from the catalog once."""
        with self._tables_lock:
            if self._tables is None:
                with self.pool.connection() as conn:
                    self._tables = load_write_tables(conn, self.config.tables)
            return self._tables

    def _apply(self, user: AuthenticatedUser, mutations: Sequence[Mutation]) -> BatchResult:
        with self.pool.connection() as conn:
            self._purge_now_and_then(conn)
            return apply_batch(conn, user, mutations, self._policies)

    def _purge_now_and_then(self, conn: psycopg.Connection[Any]) -> None:
        now = time.monotonic()
        if now - self._last_purge < _PURGE_INTERVAL:
            return
        self._last_purge = now
        deleted = purge_applied_mutations(conn, self.config.retention_seconds)
        if deleted:
            log.info("forgot applied mutation ids", rows=deleted, retention_seconds=self.config.retention_seconds)

    # -- the app ------------------------------------------------------------------------------------------------

    def routes(self, path: str = "/v1/mutations") -> list[Route]:
        return [Route(path, self.mutations, methods=["POST"])]

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(self.pool.close)

    def app(self) -> Starlette:
        """A stand-alone ASGI app serving ``POST /v1/mutations`` (CORS for the configured origins)."""
        allow_all = "*" in self.config.allow_origins
        middleware = [
            Middleware(
                CORSMiddleware,
                allow_origins=["*"] if allow_all else list(self.config.allow_origins),
                allow_methods=["POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type"],
                max_age=600,
            )
        ]

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with self.lifespan(app):
                try:
                    yield
                finally:
                    await self.config.verifier.aclose()

        app = Starlette(routes=self.routes(), middleware=middleware, lifespan=lifespan)
        app.state.write_api = self
        return app


def _rejected(exc: BatchRejectedError) -> JSONResponse:
    body = {
        "message": "Mutations rejected; nothing was written",
        "errors": [problem.as_json() for problem in exc.problems],
    }
    return json_error(exc.status, body)


def _too_large() -> JSONResponse:
    problem = MutationRejectedError(None, "body", f"is larger than {MAX_BODY_BYTES} bytes; send smaller batches", 413)
    return _rejected(BatchRejectedError([problem]))


def create_write_app(config: WriteApiConfig) -> Starlette:
    """The write API as an ASGI app of its own (``WriteApi(config).app()``), to mount or serve anywhere."""
    return WriteApi(config).app()
