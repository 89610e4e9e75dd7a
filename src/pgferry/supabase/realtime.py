"""RealtimeService: a user's ``postgres_changes`` subscriptions over supabase-py's ``realtime`` client (asyncio).

``subscribe_to_table(table, callback)`` and ``subscribe_to_changes(table, filter, callback)`` join a channel of
their own on one socket per service (``<SUPABASE_URL>/realtime/v1``, the anon key as ``apikey``, the user's access
token as the channel's ``access_token``), so Realtime — Supabase's, or ``pgferry realtime serve`` — lets RLS decide
what the user receives. Callbacks (plain functions or coroutines) get a typed :class:`ChangeEvent`. The same code
runs against hosted Supabase and the local stack.

What it does about supabase-py's known defects (``../shared/facts/realtime.md``):

* **subscribed ≠ receiving**: ``subscribe()`` returns on the join reply, before Supabase has created the
  subscription; the service waits for the ``system`` "Subscribed to PostgreSQL" message, and raises
  :class:`RealtimeSubscribeError` with the server's reason (a bad filter, a table outside the publication) instead
  of leaving the channel in ERRORED with a rejoin timer that can never succeed;
* **one channel per topic**: ``client.channel(topic)`` hands back an existing channel for a repeated topic, and
  a second ``subscribe()`` on it raises; every subscription gets its own topic;
* **a raising callback kills the listener** (#1134, #1299: the client calls callbacks inside its receive loop):
  callbacks run in tasks of their own and their exceptions are logged;
* **giving up on reconnect**: the client stops after ``max_retries`` failed connects and its channels stay dead
  (realtime-py #213, #258); a supervisor notices a socket that has been down for ``reconnect_after`` seconds,
  builds a new client and resubscribes everything;
* **token expiry**: the client never refreshes a token itself; the service refreshes it (an
  :class:`~pgferry.supabase.auth.AsyncAuthService` or any :class:`~pgferry.supabase.tokens.AsyncTokenSource`)
  ``refresh_margin`` seconds before ``exp`` and pushes it with ``set_auth``; a token it cannot refresh is reported
  once to ``on_error`` (delivery stops at expiry, as Realtime does);
* **``errors`` as a list** (supabase-py#107, typed ``str`` before 2.31, dropping the whole message): the installed
  client (≥ 2.34) accepts lists; :class:`ChangeEvent` always exposes a tuple.

Not solved here (documented): changes committed while the socket is down and the *server* kept running are not
replayed — Realtime has no resume position. The service-role key is refused as a user's token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import structlog
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates

from pgferry.supabase.errors import SupabaseServiceError
from pgferry.supabase.project import SupabaseProject, unverified_claims
from pgferry.supabase.tokens import AsyncTokenSource, StaticToken, async_source

__all__ = [
    "ChangeCallback",
    "ChangeEvent",
    "Column",
    "RealtimeService",
    "RealtimeServiceError",
    "RealtimeSubscribeError",
    "Subscription",
]

_log = structlog.get_logger("pgferry.supabase.realtime")

EventType = Literal["INSERT", "UPDATE", "DELETE"]
ListenEvent = Literal["*", "INSERT", "UPDATE", "DELETE"]
SUBSCRIBE_TIMEOUT: Final = 15.0


class RealtimeServiceError(SupabaseServiceError):
    """Realtime refused or failed something the service was asked to do."""


class RealtimeSubscribeError(RealtimeServiceError):
    """A subscription Realtime would not set up; the message carries the server's reason (one line)."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One ``postgres_changes`` message: ``record`` is the new row (inserts, updates), ``old_record`` the previous
    one (updates, deletes; what Realtime sends of it), values as JSON (numbers, booleans, nested JSON, text)."""

    schema: str
    table: str
    type: EventType
    commit_timestamp: dt.datetime | None
    columns: tuple[Column, ...]
    record: Mapping[str, Any] | None
    old_record: Mapping[str, Any] | None
    errors: tuple[str, ...]

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ChangeEvent:
        data = payload["data"]
        stamp = data.get("commit_timestamp")
        errors = data.get("errors")
        return cls(
            schema=str(data["schema"]),
            table=str(data["table"]),
            type=str(getattr(data["type"], "value", data["type"])).upper(),  # type: ignore[arg-type]
            commit_timestamp=dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None,
            columns=tuple(Column(str(c["name"]), str(c["type"])) for c in data.get("columns") or ()),
            record=data.get("record"),
            old_record=data.get("old_record"),
            errors=() if not errors else (errors,) if isinstance(errors, str) else tuple(str(e) for e in errors),
        )


ChangeCallback = Callable[[ChangeEvent], Awaitable[None] | None]


@dataclass(eq=False)
class Subscription:
    """What :meth:`RealtimeService.unsubscribe` takes; ``topic`` is the channel's own topic."""

    table: str
    schema: str
    event: ListenEvent
    filter: str | None
    callback: ChangeCallback
    topic: str
    channel: AsyncRealtimeChannel | None = field(default=None, repr=False)


class RealtimeService:
    """One user's Realtime connection; ``await service.close()`` (or ``async with``) at the end.

    ``token``: the user's access token (a string, refreshable only by the caller) or a token source such as an
    :class:`~pgferry.supabase.auth.AsyncAuthService`. ``url`` overrides ``<project.url>/realtime/v1``.
    ``client_options`` go to ``AsyncRealtimeClient`` (``hb_interval``, ``max_retries``, ``initial_backoff``).
    ``on_error`` hears about subscriptions the server dropped and tokens that could not be refreshed.
    """

    def __init__(
        self,
        project: SupabaseProject,
        token: str | StaticToken | AsyncTokenSource,
        *,
        url: str | None = None,
        refresh_margin: float = 60.0,
        reconnect_after: float = 20.0,
        client_options: Mapping[str, Any] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self._project = project
        self._source = async_source(token)
        self._url = url or f"{project.url}/realtime/v1"
        self._refresh_margin = refresh_margin
        self._reconnect_after = reconnect_after
        self._client_options = dict(client_options or {})
        self._on_error = on_error
        self._client: AsyncRealtimeClient | None = None
        self._subscriptions: list[Subscription] = []
        self._token: str | None = None
        self._topics = itertools.count(1)
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._closed = False
        self._refresh_failed_for: str | None = None
        self.reconnects = 0

    async def __aenter__(self) -> RealtimeService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- public API ----------------------------------------------------------------------------------------------

    async def subscribe_to_table(
        self, table: str, callback: ChangeCallback, *, event: ListenEvent = "*", schema: str = "public"
    ) -> Subscription:
        """Every change to ``schema.table`` the user may see (RLS decides), delivered to ``callback``."""
        return await self._subscribe(table, None, callback, event, schema)

    async def subscribe_to_changes(
        self,
        table: str,
        filter: str,
        callback: ChangeCallback,
        *,
        event: ListenEvent = "*",
        schema: str = "public",
    ) -> Subscription:
        """Changes to rows matching ``filter`` (Realtime's grammar: ``column=op.value``, ops eq, neq, lt, lte, gt,
        gte, ``in.(a,b)``, comma = and); a filter the server refuses raises :class:`RealtimeSubscribeError`."""
        if not filter or "=" not in filter:
            raise RealtimeSubscribeError(
                f"filter {filter!r} is not column=operator.value, like status=eq.open; use subscribe_to_table for all"
            )
        return await self._subscribe(table, filter, callback, event, schema)

    async def unsubscribe(self, subscription: Subscription) -> None:
        """Leave the subscription's channel; its callback is not called again."""
        async with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)
            channel, subscription.channel = subscription.channel, None
            if channel is not None and self._client is not None:
                with contextlib.suppress(Exception):
                    await channel.unsubscribe()
                self._client._remove_channel(channel)

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(self._subscriptions)

    async def close(self) -> None:
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(BaseException):
                await self._supervisor
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    # -- internals -----------------------------------------------------------------------------------------------

    async def _current_token(self) -> str:
        token = await self._source.access_token()
        self._project.refuse_privileged(token)
        return token

    async def _ensure_client(self) -> AsyncRealtimeClient:
        if self._client is None:
            self._token = await self._current_token()
            client = AsyncRealtimeClient(self._url, self._project.anon_key, **self._client_options)
            await client.set_auth(self._token)
            await client.connect()
            self._client = client
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise())
        return self._client

    async def _subscribe(
        self, table: str, filter: str | None, callback: ChangeCallback, event: ListenEvent, schema: str
    ) -> Subscription:
        if self._closed:
            raise RealtimeServiceError("the RealtimeService is closed; create a new one")
        subscription = Subscription(table, schema, event, filter, callback, f"pgferry-{table}-{next(self._topics)}")
        async with self._lock:
            client = await self._ensure_client()
            await self._join(client, subscription)
            self._subscriptions.append(subscription)
        return subscription

    async def _join(self, client: AsyncRealtimeClient, subscription: Subscription) -> None:
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[str | None] = loop.create_future()

        def deliver(payload: Mapping[str, Any]) -> None:
            try:
                change = ChangeEvent.from_payload(payload)
            except (KeyError, TypeError, ValueError) as exc:
                _log.warning("realtime.unreadable_change", error=type(exc).__name__)
                return
            self._run(subscription.callback, change)

        def system(payload: Any) -> None:  # supabase-py hands a pydantic model here, a dict elsewhere
            if getattr(payload, "extension", None) == "postgres_changes" and not outcome.done():
                outcome.set_result(None)

        def state(status: RealtimeSubscribeStates, error: Exception | None) -> None:
            if status == RealtimeSubscribeStates.CHANNEL_ERROR and not outcome.done():
                outcome.set_result(_reason(error))
            elif status == RealtimeSubscribeStates.TIMED_OUT and not outcome.done():
                outcome.set_result("the server did not answer the join in time")
            elif status == RealtimeSubscribeStates.CLOSED and subscription in self._subscriptions:
                message = f"Realtime closed the channel of {subscription.table}; resubscribing"
                self._report(RealtimeServiceError(message))

        channel = client.channel(subscription.topic)
        channel.on_postgres_changes(
            subscription.event,  # type: ignore[arg-type]
            callback=deliver,
            table=subscription.table,
            schema=subscription.schema,
            filter=subscription.filter,
        )
        channel.on_system(system)
        await channel.subscribe(state)
        try:
            reason = await asyncio.wait_for(asyncio.shield(outcome), SUBSCRIBE_TIMEOUT)
        except TimeoutError:
            reason = "no confirmation from the server within 15 s"
        if reason is not None:
            with contextlib.suppress(Exception):
                await channel.unsubscribe()
            client._remove_channel(channel)
            raise RealtimeSubscribeError(
                f"Realtime refused the subscription to {subscription.schema}.{subscription.table}"
                + (f" with filter {subscription.filter!r}" if subscription.filter else "")
                + f": {reason}"
            )
        subscription.channel = channel

    def _run(self, callback: ChangeCallback, change: ChangeEvent) -> None:
        """Call the user's callback without letting it take the client's receive loop down."""
        try:
            result = callback(change)
        except Exception:
            _log.exception("realtime.callback_failed", table=change.table)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)

            def finished(done: asyncio.Future[Any]) -> None:
                self._tasks.discard(done)
                if not done.cancelled() and done.exception() is not None:
                    _log.error("realtime.callback_failed", table=change.table, error=repr(done.exception()))

            task.add_done_callback(finished)

    def _report(self, error: Exception) -> None:
        _log.warning("realtime.service_error", error=str(error))
        if self._on_error is not None:
            try:
                self._on_error(error)
            except Exception:
                _log.exception("realtime.on_error_failed")

    async def _supervise(self) -> None:
        """Refresh the token before it expires; rebuild the client when it has given up reconnecting."""
        down_since: float | None = None
        while not self._closed:
            await asyncio.sleep(0.5)
            try:
                await self._maybe_refresh()
                client = self._client
                if client is None:
                    if self._subscriptions:  # the last rebuild failed (the server was still down): again
                        await self._rebuild()
                    continue
                dead = [s for s in self._subscriptions if s.channel is None or s.channel.is_closed]
                if client.is_connected and not dead:
                    down_since = None
                    continue
                down_since = down_since or time.monotonic()
                if (dead and client.is_connected) or time.monotonic() - down_since >= self._reconnect_after:
                    await self._rebuild()
                    down_since = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep supervising: the next round tries again
                self._report(RealtimeServiceError(f"reconnecting to Realtime failed: {exc}"))

    async def _maybe_refresh(self) -> None:
        token = self._token
        if token is None:
            return
        claims = unverified_claims(token) or {}
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp - time.time() > self._refresh_margin:
            return
        fresh = await self._source.refreshed_access_token()
        if fresh is None or fresh == token:
            if self._refresh_failed_for != token:
                self._refresh_failed_for = token
                self._report(
                    RealtimeServiceError(
                        "the user's access token expires and cannot be refreshed here: delivery stops at its expiry; "
                        "give the service a token source that can refresh (an AsyncAuthService)"
                    )
                )
            return
        self._project.refuse_privileged(fresh)
        self._token = fresh
        if self._client is not None:
            await self._client.set_auth(fresh)

    async def _rebuild(self) -> None:
        """A new socket and every subscription joined again on it (supabase-py gives up after ``max_retries``)."""
        async with self._lock:
            old, self._client = self._client, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.close()
            client = await self._ensure_client()
            self.reconnects += 1
            for subscription in list(self._subscriptions):
                subscription.channel = None  # same topic: a restarted pgferry server waits for it to rejoin
                await self._join(client, subscription)


def _reason(error: Exception | None) -> str:
    """The server's text from supabase-py's CHANNEL_ERROR (a JSON dump of the system or reply payload)."""
    if error is None:
        return "channel error"
    text = str(error)
    with contextlib.suppress(ValueError):
        payload = json.loads(text)
        if isinstance(payload, dict):
            return str(payload.get("message") or payload.get("reason") or text)
    return text
