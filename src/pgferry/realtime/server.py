"""The Realtime websocket server: Supabase's ``/realtime/v1/websocket`` for ``postgres_changes``, as an ASGI app.

Owns the socket side: the handshake (API key from ``apikey``/``x-api-key``, verified by
:class:`pgferry.sync.auth.TokenVerifier`; refusals are HTTP responses with Supabase's ``{"error": …}`` bodies),
``phx_join`` (bindings echoed with ids, each subscription checked against the publication and the role before the
reply), ``heartbeat``, ``access_token``, ``phx_leave``, token expiry, one ordered writer per socket, and which
subscriptions were alive before a restart (the feed waits for them to rejoin, up to ``resume_grace`` seconds, so a
reconnecting client misses nothing the slot kept). Visibility and payloads are :mod:`pgferry.realtime.feed`'s and
:mod:`pgferry.realtime.authorize`'s; this module never reads a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psycopg
import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from pgferry.errors import ConfigError
from pgferry.realtime.authorize import Authorizer, FilterCheckError, claims_key
from pgferry.realtime.channels import Channel, Registry, Subscription, Token
from pgferry.realtime.feed import ChangeFeed
from pgferry.realtime.filters import FilterError, parse_filter
from pgferry.realtime.protocol import Binding, FrameError, Vsn, decode_frame, encode, parse_bindings, system_payload
from pgferry.replication import create_slot, get_slot
from pgferry.sync.auth import ExpiredTokenError, InvalidTokenError, KeySetUnavailableError, TokenVerifier
from pgferry.sync.session import connect_sql
from pgferry.sync.store import write_json_atomic

__all__ = ["PUBLICATION", "RealtimeServerConfig", "create_realtime_app"]

_log = structlog.get_logger("pgferry.realtime.server")

PUBLICATION: Final = "supabase_realtime"
DEFAULT_SLOT: Final = "pgferry_realtime"
_REMEMBER_FOR: Final = 600.0  # a subscription gone longer than this is not waited for after a restart
_MAX_QUEUED: Final = 20_000


@dataclass(frozen=True)
class RealtimeServerConfig:
    """``verifier`` checks every API key and access token; ``data_dir`` keeps which subscriptions were alive, so a
    restarted server waits (at most ``resume_grace`` seconds) for them before it reads the slot again."""

    database_url: str
    verifier: TokenVerifier
    data_dir: Path
    slot: str = DEFAULT_SLOT
    publication: str = PUBLICATION
    resume_grace: float = 15.0
    idle_timeout: float = 60.0
    extra: Mapping[str, Any] = field(default_factory=dict)


def _token_error(exc: InvalidTokenError) -> tuple[str, str]:
    """(Realtime's join error code, its message) for a refused token."""
    if isinstance(exc, ExpiredTokenError):
        return "InvalidJWTToken", "Token has expired"
    if "lacks the" in exc.reason:
        return "InvalidJWTToken", "Fields `role` and `exp` are required in JWT"
    if exc.reason == "bad token signature":
        return "JwtSignatureError", "Failed to validate JWT signature"
    if exc.reason in ("malformed token", "token too large", "token algorithm not accepted"):
        return "MalformedJWT", "The token provided is not a valid JWT"
    return "Unauthorized", f"You do not have permissions to read from this Channel topic: {exc.reason}"


def _token(claims: Mapping[str, Any]) -> Token:
    return Token(claims, claims_key(claims), float(claims.get("exp", 0)))


class _Memory:
    """Which subscriptions were alive lately (``<data_dir>/subscriptions.json``), written every second."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._path = data_dir / "subscriptions.json"
        self.seen: dict[str, float] = {}
        if self._path.exists():
            with contextlib.suppress(ValueError, OSError):
                stored = json.loads(self._path.read_text())
                self.seen = {str(k): float(v) for k, v in stored.items()}
        cutoff = time.time() - _REMEMBER_FOR
        self.expected = {key for key, when in self.seen.items() if when >= cutoff}
        self._dirty = False
        self._connected: dict[str, int] = {}

    def joined(self, key: str) -> None:
        self._connected[key] = self._connected.get(key, 0) + 1
        self.seen[key] = time.time()
        self.expected.discard(key)
        self._dirty = True

    def left(self, key: str, *, forget: bool) -> None:
        count = self._connected.get(key, 0) - 1
        if count <= 0:
            self._connected.pop(key, None)
            if forget:
                self.seen.pop(key, None)
            else:
                self.seen[key] = time.time()
        self._dirty = True

    def flush(self) -> None:
        now = time.time()
        for key in self._connected:
            self.seen[key] = now
        if not self._dirty and not self._connected:
            return
        self.seen = {k: v for k, v in self.seen.items() if v >= now - _REMEMBER_FOR}
        write_json_atomic(self._path, self.seen)
        self._dirty = False


def _subscription_key(claims: Mapping[str, Any], topic: str, bindings: list[Binding]) -> str:
    who = claims.get("sub") or claims.get("role")
    return f"{who}|{topic}|{','.join(str(b.id) for b in sorted(bindings, key=lambda b: b.id))}"


_RAW_SEND: Final = "pgferry.realtime.send"


class _KeepRawSend:
    """ASGI middleware: keeps the server's own ``send`` of a websocket in the scope, for :func:`_coalescing_writer`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope[_RAW_SEND] = send
        await self.app(scope, receive, send)


def _coalescing_writer(raw_send: Any) -> Callable[[list[str]], Awaitable[None]] | None:
    """Writes a socket's frames of a batch with one ``transport.write`` under uvicorn's ``websockets-sansio``
    protocol (the default with websockets ≥ 13); ``None`` under any other server or protocol, which then gets one
    ASGI ``websocket.send`` per frame.

    Why: on loopback a send system call costs as much as everything else a message needs, and a subscriber usually
    has several frames in a batch. This reaches into the protocol object behind uvicorn's ``send`` — the same three
    steps its ``send`` takes (wait until writable, ``conn.send_text``, ``transport.write`` of ``data_to_send``),
    once per batch instead of per frame — so it checks every attribute it uses and falls back when one is missing.
    """
    protocol: Any = getattr(raw_send, "__self__", None)
    conn: Any = getattr(protocol, "conn", None)
    transport: Any = getattr(protocol, "transport", None)
    writable: Any = getattr(protocol, "writable", None)
    if (
        protocol is None
        or type(protocol).__name__ != "WebSocketsSansIOProtocol"
        or not callable(getattr(conn, "send_text", None))
        or not callable(getattr(conn, "data_to_send", None))
        or not callable(getattr(transport, "write", None))
        or not isinstance(writable, asyncio.Event)
        or not hasattr(protocol, "disconnected")
        or not hasattr(protocol, "close_sent")
    ):
        return None

    async def write(frames: list[str]) -> None:
        await writable.wait()
        if protocol.disconnected or protocol.close_sent or transport.is_closing():
            raise ConnectionError("websocket closed")
        for frame in frames:
            conn.send_text(frame.encode())
        transport.write(b"".join(conn.data_to_send()))

    return write


class _Socket:
    """One client connection: its channels and its writer (frames go out in the order they are queued)."""

    def __init__(self, websocket: WebSocket, vsn: Vsn, token: Token, loop: asyncio.AbstractEventLoop) -> None:
        self.websocket = websocket
        self._write_many = _coalescing_writer(websocket.scope.get(_RAW_SEND))
        self.vsn: Vsn = vsn
        self.token = token
        self.loop = loop
        self.channels: dict[str, tuple[Channel, str]] = {}  # topic -> (channel, memory key)
        # Expiry timers by topic, cancelled when the channel goes: a timer would otherwise keep a closed socket alive
        # until its token's exp (hours).
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.queue: asyncio.Queue[tuple[list[str], Callable[[], None] | None] | None] = asyncio.Queue()
        self.queued = 0
        self.closed = False

    def push(self, frame: str) -> None:
        """Queue a reply or system frame (event loop thread)."""
        self.enqueue([frame], None)

    def enqueue(self, frames: list[str], on_sent: Callable[[], None] | None) -> None:
        """Queue frames in order (event loop thread); ``on_sent`` once they are written or never will be."""
        if self.closed:
            if on_sent is not None:
                on_sent()
            return
        if self.queued >= _MAX_QUEUED:
            # A client this far behind would only fall further: drop it, it reconnects and rejoins.
            _log.warning("realtime.slow_client_dropped", queued=self.queued)
            self.closed = True
            self.queue.put_nowait(None)
            if on_sent is not None:
                on_sent()
            return
        self.queued += len(frames)
        self.queue.put_nowait((frames, on_sent))

    def reply(self, topic: str, ref: str | None, join_ref: str | None, status: str, response: Any) -> None:
        payload = json.dumps({"status": status, "response": response})
        self.push(encode(self.vsn, topic, "phx_reply", payload, ref, join_ref))

    def system(self, topic: str, extension: str, status: str, message: str) -> None:
        name = topic.removeprefix("realtime:")
        self.push(encode(self.vsn, topic, "system", system_payload(name, extension, status, message), None))

    async def writer(self) -> None:
        while True:
            item = await self.queue.get()
            if item is None:
                break
            frames, on_sent = item
            try:
                if self._write_many is not None:
                    await self._write_many(frames)
                else:
                    for frame in frames:
                        await self.websocket.send({"type": "websocket.send", "text": frame})
            except Exception:
                self.closed = True
                if on_sent is not None:
                    on_sent()
                break
            self.queued -= len(frames)
            if on_sent is not None:
                on_sent()
        self.closed = True
        with contextlib.suppress(Exception):
            await self.websocket.close()
        while not self.queue.empty():  # frames that will never be written still release their batch
            rest = self.queue.get_nowait()
            if rest is not None and rest[1] is not None:
                rest[1]()


def check_realtime_database(url: str, publication: str) -> None:
    """Fail in one line on a database the server could only fail on later."""
    with connect_sql(url) as conn:
        row = conn.execute("show wal_level").fetchone()
        if row is None or row[0] != "logical":
            raise ConfigError(
                "--database-url",
                f"the database runs with wal_level = {row[0] if row else '?'}; Realtime reads logical replication: "
                "ALTER SYSTEM SET wal_level = logical and restart PostgreSQL",
            )
        found = conn.execute("select 1 from pg_catalog.pg_publication where pubname = %s", [publication]).fetchone()
        if found is None:
            raise ConfigError(
                "--database-url",
                f"publication {publication} does not exist; run `pgferry db upgrade` (it creates it) or "
                f"CREATE PUBLICATION {publication} FOR TABLE …",
            )


def create_realtime_app(config: RealtimeServerConfig) -> Starlette:
    registry = Registry()
    memory = _Memory(config.data_dir)
    ready = threading.Event()
    checker = Authorizer(config.database_url)
    checker_lock = threading.Lock()
    holder: dict[str, Any] = {}

    def prepare() -> None:
        check_realtime_database(config.database_url, config.publication)
        with connect_sql(config.database_url) as conn:
            existing = get_slot(conn, config.slot)
        if existing is None:
            _log.info("realtime.creating_slot", slot=config.slot)
            create_slot(config.database_url, config.slot)
            memory.expected.clear()  # nothing was kept for anyone: no reason to wait

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await asyncio.to_thread(prepare)
        feed = ChangeFeed(config.database_url, registry, slot=config.slot, publication=config.publication, ready=ready)
        holder["feed"] = feed
        feed.start()
        started = time.monotonic()

        async def housekeeping() -> None:
            while True:
                if not ready.is_set() and (not memory.expected or time.monotonic() - started >= config.resume_grace):
                    if memory.expected:
                        _log.info("realtime.resume_without", missing=len(memory.expected))
                    ready.set()
                await asyncio.to_thread(memory.flush)
                await asyncio.sleep(0.05 if not ready.is_set() else 1.0)

        task = asyncio.create_task(housekeeping())
        _log.info("realtime.server_started", slot=config.slot, waiting_for=len(memory.expected))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await asyncio.to_thread(feed.stop)
            await asyncio.to_thread(memory.flush)
            checker.close()

    async def health(_request: Request) -> Response:
        feed: ChangeFeed | None = holder.get("feed")
        status = feed.status if feed is not None else "starting"
        body: dict[str, Any] = {"status": status, "subscriptions": registry.count, "resumed": ready.is_set()}
        if feed is not None and feed.last_error and status != "active":
            body["error"] = feed.last_error
        # Starting (or waiting for earlier subscribers to rejoin) is healthy: clients may connect and join now.
        return JSONResponse(body, status_code=503 if status in ("reconnecting", "stopped") else 200)

    async def deny(websocket: WebSocket, status: int, message: str) -> None:
        try:
            await websocket.send_denial_response(JSONResponse({"error": message}, status_code=status))
        except RuntimeError:  # the ASGI server cannot send an HTTP response here: close instead
            await websocket.close(code=1008, reason=message[:120])

    async def verify(token: str) -> Mapping[str, Any]:
        return await config.verifier.verify_api_token(token)

    def check_bindings(token: Token, bindings: list[Binding]) -> list[tuple[Binding, Any, str | None]]:
        """Each binding's parsed filters, or the system error text that refuses it (Realtime's messages)."""
        out: list[tuple[Binding, Any, str | None]] = []
        with checker_lock:
            try:
                published = checker.published_tables(config.publication)
            except psycopg.Error:
                checker.reset()
                published = checker.published_tables(config.publication)
            for binding in bindings:
                try:
                    filters = parse_filter(binding.filter) if binding.filter else ()
                except FilterError as exc:
                    out.append((binding, (), f"Error parsing `filter` params: {exc}"))
                    continue
                tables = [
                    oid
                    for (schema, table), oid in published.items()
                    if binding.schema in ("*", schema) and binding.table in ("*", table)
                ]
                reason = None
                if not tables:
                    reason = "table is not in publication " + config.publication
                elif filters and len(tables) != 1:
                    reason = "a filter needs one table, not a wildcard"
                else:
                    try:
                        for oid in tables if filters else ():
                            checker.check_subscription(token.role, oid, filters)
                    except FilterCheckError as exc:
                        reason = str(exc)
                    except psycopg.Error:
                        checker.reset()
                        reason = "the database could not check the subscription; try again"
                if reason is not None:
                    shown = f"[{binding.filter}]" if binding.filter else "[]"
                    out.append(
                        (
                            binding,
                            filters,
                            "Unable to subscribe to changes with given parameters. Please check Realtime is enabled "
                            f"for the given connect parameters: [event: {binding.event}, schema: {binding.schema}, "
                            f"table: {binding.table}, filters: {shown}]: {reason}",
                        )
                    )
                else:
                    out.append((binding, filters, None))
        return out

    def leave(sock: _Socket, topic: str, *, forget: bool) -> None:
        timer = sock.timers.pop(topic, None)
        if timer is not None:
            timer.cancel()
        found = sock.channels.pop(topic, None)
        if found is None:
            return
        channel, key = found
        channel.closed = True
        for subscription in channel.subscriptions:
            registry.remove(subscription)
        memory.left(key, forget=forget)

    def schedule_expiry(sock: _Socket, channel: Channel) -> None:
        token = channel.token

        def expired() -> None:
            if channel.token is token and not channel.closed:
                ago = max(0, int(time.time() - token.exp))
                sock.system(channel.topic, "system", "error", f"Token has expired {ago} seconds ago")

        delay = max(0.0, token.exp - time.time())
        previous = sock.timers.pop(channel.topic, None)
        if previous is not None:
            previous.cancel()
        sock.timers[channel.topic] = sock.loop.call_later(delay, expired)

    async def join(
        sock: _Socket, topic: str, payload: Mapping[str, Any], ref: str | None, join_ref: str | None
    ) -> None:
        if not topic.startswith("realtime:"):
            sock.reply(topic, ref, join_ref, "error", {"reason": "unmatched topic"})
            return
        if topic == "realtime:":
            sock.reply(topic, ref, join_ref, "error", {"reason": "TopicNameRequired: You must provide a topic name"})
            return
        raw_token = payload.get("access_token") or payload.get("user_token")
        token = sock.token
        if isinstance(raw_token, str) and raw_token and not raw_token.startswith("sb_"):
            try:
                token = _token(await verify(raw_token))
            except InvalidTokenError as exc:
                code, message = _token_error(exc)
                sock.reply(topic, ref, join_ref, "error", {"reason": f"{code}: {message}"})
                return
            except KeySetUnavailableError:
                sock.reply(topic, ref, join_ref, "error", {"reason": "UnableToConnectToProject: keys unavailable"})
                return
        if token.expired():
            sock.reply(topic, ref, join_ref, "error", {"reason": "InvalidJWTToken: Token has expired"})
            return
        try:
            bindings = parse_bindings(payload.get("config"))
        except FrameError as exc:
            sock.reply(topic, ref, join_ref, "error", {"reason": f"InvalidJoinPayload: {exc}"})
            return
        leave(sock, topic, forget=False)  # a second join of a topic replaces the first (Phoenix does the same)
        channel = Channel(topic, join_ref, sock.vsn, token, sock)
        checked = await asyncio.to_thread(check_bindings, token, bindings) if bindings else []
        key = _subscription_key(token.claims, topic, bindings)
        sock.channels[topic] = (channel, key)
        errors = []
        for binding, filters, error in checked:
            subscription = Subscription(channel, binding, filters, active=error is None)
            channel.subscriptions.append(subscription)
            if error is None:
                registry.add(subscription)
            else:
                errors.append(error)
        memory.joined(key)
        reply = {"postgres_changes": [{**b.raw, "id": b.id} for b in bindings]}
        sock.reply(topic, ref, join_ref, "ok", reply)
        schedule_expiry(sock, channel)
        if errors:
            sock.system(topic, "postgres_changes", "error", errors[0])
        elif bindings:
            sock.system(topic, "postgres_changes", "ok", "Subscribed to PostgreSQL")

    async def refresh(sock: _Socket, topic: str, payload: Mapping[str, Any]) -> None:
        found = sock.channels.get(topic)
        raw = payload.get("access_token")
        if found is None or not isinstance(raw, str) or not raw or raw.startswith("sb_"):
            return  # Realtime ignores null, repeated and sb_ keys
        channel = found[0]
        try:
            token = _token(await verify(raw))
        except (InvalidTokenError, KeySetUnavailableError) as exc:
            message = _token_error(exc)[1] if isinstance(exc, InvalidTokenError) else "keys unavailable"
            sock.system(topic, "system", "error", message)
            sock.push(encode(sock.vsn, topic, "phx_close", "{}", None))
            leave(sock, topic, forget=True)
            return
        if token.key == channel.token.key:
            return
        if token.role != channel.token.role:
            # A different role may see different tables and columns: check the subscriptions again.
            bindings = [s.binding for s in channel.subscriptions]
            checked = await asyncio.to_thread(check_bindings, token, bindings)
            for subscription, (_, _, error) in zip(channel.subscriptions, checked, strict=True):
                subscription.active = subscription.active and error is None
        channel.token = token
        schedule_expiry(sock, channel)

    async def handle(sock: _Socket, text: str) -> None:
        try:
            frame = decode_frame(text, sock.vsn)
        except FrameError as exc:
            sock.reply("phoenix", None, None, "error", {"reason": f"malformed message: {exc}"})
            return
        if frame.topic == "phoenix" and frame.event == "heartbeat":
            sock.reply("phoenix", frame.ref, None, "ok", {})
        elif frame.event == "phx_join":
            await join(sock, frame.topic, frame.payload, frame.ref, frame.join_ref)
        elif frame.topic not in sock.channels:
            sock.reply(frame.topic, frame.ref, frame.join_ref, "error", {"reason": "unmatched topic"})
        elif frame.event == "phx_leave":
            leave(sock, frame.topic, forget=True)
            sock.reply(frame.topic, frame.ref, frame.join_ref, "ok", {})
        elif frame.event == "access_token":
            await refresh(sock, frame.topic, frame.payload)
        # broadcast and presence are not served: ignored, as Realtime ignores events it does not know

    async def websocket_endpoint(websocket: WebSocket) -> None:
        raw = websocket.headers.get("x-api-key") or websocket.query_params.get("apikey")
        vsn_text = websocket.query_params.get("vsn") or "1.0.0"
        if vsn_text not in ("1.0.0", "2.0.0"):
            await deny(websocket, 400, f"unsupported vsn {vsn_text[:20]!r}: use 1.0.0 or 2.0.0")
            return
        if not raw:
            await deny(websocket, 401, "API key is missing")
            return
        try:
            token = _token(await verify(raw))
        except InvalidTokenError as exc:
            await deny(websocket, 401, _token_error(exc)[1])
            return
        except KeySetUnavailableError:
            await deny(websocket, 500, "Error connecting to Realtime")
            return
        await websocket.accept()
        vsn: Vsn = "2.0.0" if vsn_text == "2.0.0" else "1.0.0"
        sock = _Socket(websocket, vsn, token, asyncio.get_running_loop())
        writer = asyncio.create_task(sock.writer())
        try:
            while not sock.closed:
                try:
                    message = await asyncio.wait_for(websocket.receive(), timeout=config.idle_timeout)
                except TimeoutError:
                    break  # no heartbeat for a minute: the client is gone (Realtime drops it too)
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None and message.get("bytes") is not None:
                    text = message["bytes"].decode("utf-8", "replace")
                await handle(sock, text or "")
        except WebSocketDisconnect:
            pass
        finally:
            for topic in list(sock.channels):
                leave(sock, topic, forget=False)
            sock.closed = True
            sock.queue.put_nowait(None)
            with contextlib.suppress(BaseException):
                await writer

    routes = [
        WebSocketRoute("/realtime/v1/websocket", websocket_endpoint),
        WebSocketRoute("/socket/websocket", websocket_endpoint),
        Route("/realtime/v1/health", health),
    ]
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(_KeepRawSend)])
