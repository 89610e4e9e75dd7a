"""The outbox sender: delivers the replica's pending local mutations to the write API, in order, in batches.

One batch at a time, oldest first (``POST /v1/mutations`` with the user's token): up to ``batch_size`` items and
at most :data:`MAX_BATCH_BYTES` of JSON (under the write API's 8 MiB limit, so a batch of large rows is split, not
refused). While the write API applies batch N+1, batch N's acknowledgement is written to the replica (batch N+1 is
read before that starts, skipping N's items): the replica and the server work at the same time, and order is kept
because a batch is only sent after the previous one was applied. The answer decides:

- 200: every item is acknowledged with its txid and commit position (:meth:`LocalReplica.acknowledge`); the
  optimistic state stays until that txid streams in or an up-to-date of its shape is past that position (or goes at
  once when the server changed nothing, or when the client follows no stream of its table);
- 4xx with per-mutation errors: those mutations are rejected — their optimistic state rolled back and reported to
  the application — and the rest of the batch, which the server did not write (all-or-nothing), is sent again;
- 401: the token is refreshed through the headers callable on the next attempt;
- 429, 5xx, no connection: retried with full-jitter backoff, forever: nothing is lost while the server is down,
  and a mutation id is applied at most once however often it is sent (the server keeps the ids).

Owns delivery; must not touch the stream or the replica's tables directly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx
import msgspec
import structlog

from pgferry.client.replica import OutboxItem, Rejection
from pgferry.client.replicas import Replica
from pgferry.client.shape_async import DEFAULT_BACKOFF, HeadersArg
from pgferry.client.values import parse_value, to_json_value
from pgferry.db.retry import RetryPolicy

__all__ = ["DEFAULT_BATCH", "MAX_BATCH_BYTES", "OutboxSender", "SendOutcome"]

log = structlog.get_logger("pgferry.client")

#: Items per request: large batches, because the write API's cost is mostly per request (a transaction, its
#: commit, the HTTP exchange, the scheduling of four processes on a busy machine) and the replica's per
#: acknowledgement; the write API takes at most 5,000. A 10,000-item drain ran about a third faster in batches of
#: 4,000 than of 2,000 (medians of 9 drains each, alternating, load 2.5-3); 5,000 was no better than 4,000.
DEFAULT_BATCH: Final = 4000
#: A batch's body stays under this (the write API refuses more than 8 MiB with a 413).
MAX_BATCH_BYTES: Final = 4 << 20
_RETRIED: Final = frozenset({401, 408, 429, 500, 502, 503, 504})
#: A batch's mutations are encoded by msgspec (in C): the stdlib's ``json.dumps`` per mutation was a tenth of a
#: drain's client CPU, on the same core the write API and the sync server need. Same JSON (UTF-8, not ``\u``).
_JSON: Final = msgspec.json.Encoder()
_DECODE: Final = msgspec.json.decode


def _results(response: httpx.Response) -> list[dict[str, Any]]:
    """An applied batch's results, decoded by msgspec (several times faster than ``response.json()`` on thousands
    of results, on the event loop between two batches); what msgspec refuses is left to the stdlib's parser."""
    try:
        body = _DECODE(response.content)
    except msgspec.DecodeError:
        body = response.json()
    results: list[dict[str, Any]] = body["results"]
    return results


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What one delivery round did."""

    sent: int = 0
    rejected: tuple[Rejection, ...] = ()
    retry_in: float | None = None


class OutboxSender:
    """Drains a replica's outbox (SQLite or PostgreSQL) to ``url`` (the proxy or a mounted write API;
    ``/v1/mutations`` is appended when absent). ``source_tables`` maps each shape name to its ``schema.table`` (a
    shape not in it: the one the replica recorded). ``followed``: the shapes whose streams the client follows, read
    at each acknowledgement (an item of any other shape settles on acknowledgement: nothing would ever settle it);
    ``None``: every shape is followed."""

    def __init__(
        self,
        replica: Replica,
        url: str,
        source_tables: Mapping[str, str],
        *,
        headers: HeadersArg = None,
        client: httpx.AsyncClient | None = None,
        batch_size: int = DEFAULT_BATCH,
        backoff: RetryPolicy = DEFAULT_BACKOFF,
        on_rejected: Callable[[Rejection], Any] | None = None,
        followed: Container[str] | None = None,
    ) -> None:
        self.url = url if url.rstrip("/").endswith("/v1/mutations") else url.rstrip("/") + "/v1/mutations"
        self.replica = replica
        self.source_tables = dict(source_tables)
        self.followed = followed
        self._headers = headers
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0))
        self.batch_size = batch_size
        self.backoff = backoff
        self.on_rejected = on_rejected
        self._failures = 0
        #: Set by a local write: something new to send. It ends an idle wait, never a backoff: while the server is
        #: unreachable, each offline write would otherwise cost a connection attempt and a re-read of the outbox.
        self.wake = asyncio.Event()
        self._retry = asyncio.Event()  # retry_now(): the server is known to be back; ends a backoff too
        # The acknowledgement of the last applied batch, written while the next batch is on its way, and the
        # highest sequence number it covers (its items are still "pending" in the replica until it finishes).
        self._acknowledging: asyncio.Future[None] | None = None
        self._acknowledged_up_to = 0
        # The next batch, read and encoded while the current one is applied: (the sequence number it follows, task).
        self._next: tuple[int, asyncio.Future[tuple[bytes, list[OutboxItem]]]] | None = None
        self._sending = asyncio.Lock()  # held by a send (request and answer) and by held()

    def _body(self, items: list[OutboxItem]) -> tuple[bytes, list[OutboxItem]]:
        """The request body for the leading items that fit :data:`MAX_BATCH_BYTES` (at least one), and those items."""
        encoded: list[bytes] = []
        size = 0
        for item in items:
            mutation = self._mutation(item)
            part = _JSON.encode(mutation)
            if encoded and size + len(part) + 1 > MAX_BATCH_BYTES:
                break
            encoded.append(part)
            size += len(part) + 1
        return b'{"mutations": [' + b",".join(encoded) + b"]}", items[: len(encoded)]

    def _mutation(self, item: OutboxItem) -> dict[str, Any]:
        schema = self.replica.schema(item.shape)
        mutation: dict[str, Any] = {
            "id": item.mutation_id,
            "op": item.op,
            "table": self._source_table(item.shape),
            "row": item.row,
            "written_at": item.written_at,
        }
        if item.base is not None and item.op == "update":
            mutation["base"] = {
                c: to_json_value(parse_value(v, schema[c]), schema[c])
                for c, v in item.base.items()
                if c in item.row and c in schema
            }
        return mutation

    def _source_table(self, shape: str) -> str:
        """``schema.table`` of a shape: as configured, else as the replica recorded it (an item written to a table the
        client synced before and does not follow now must still go out, or it would block every item after it)."""
        known = self.source_tables.get(shape)
        if known is None:
            known = self.replica.source_table(shape) or f"public.{shape}"
            self.source_tables[shape] = known
        return known

    def _prepare(self, after: int) -> tuple[bytes, list[OutboxItem]]:
        """Read the next batch (items after sequence number ``after``) and encode it: on a worker thread."""
        items = self.replica.outbox(state="pending", limit=self.batch_size, after=after)
        return self._body(items) if items else (b"", [])

    async def send_once(self) -> SendOutcome:
        """Send the oldest batch of pending items (nothing to do: ``SendOutcome()``)."""
        async with self._sending:
            return await self._send_once()

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """No batch in flight and every acknowledgement written while inside: a rotated shape's first up-to-date
        is applied in here, so an item is either acknowledged before it (settled by the new snapshot) or sent after
        it (its change then follows in the new shape's log)."""
        async with self._sending:
            await self.flush()
            yield

    async def _send_once(self) -> SendOutcome:
        prepared = await self._take_next()
        if prepared is None:
            prepared = await asyncio.to_thread(self._prepare, self._acknowledged_up_to)
        content, items = prepared
        if not items:
            await self.flush()
            return SendOutcome()
        headers = {"content-type": "application/json"}
        extra = self._headers() if callable(self._headers) else self._headers
        headers.update(extra or {})
        # While the write API works on this batch, the next one (the items after it) is read and encoded; it is
        # only sent once this one was applied, so the order holds.
        self._next = (items[-1].seq, asyncio.ensure_future(asyncio.to_thread(self._prepare, items[-1].seq)))
        try:
            response = await self._client.post(self.url, content=content, headers=headers)
        except httpx.TransportError:
            await self._drop_next()
            await self.flush()
            return self._retry_later()
        if response.status_code == 200:
            self._failures = 0
            results = _results(response)
            await self.flush()  # the previous batch's acknowledgement, written meanwhile
            self._acknowledging = asyncio.ensure_future(
                asyncio.to_thread(self.replica.acknowledge, results, followed=self.followed)
            )
            self._acknowledged_up_to = items[-1].seq
            return SendOutcome(sent=len(items))
        await self._drop_next()  # after a refusal the next batch is read again, from what is pending then
        await self.flush()
        if response.status_code in _RETRIED:
            return self._retry_later(response.headers.get("retry-after"))
        return await self._rejected(items, response)

    async def _take_next(self) -> tuple[bytes, list[OutboxItem]] | None:
        """The batch read ahead, if it follows the batch just applied and is not empty."""
        following = self._next
        self._next = None
        if following is None:
            return None
        after, task = following
        prepared = await task
        return prepared if after == self._acknowledged_up_to and prepared[1] else None

    async def _drop_next(self) -> None:
        following, self._next = self._next, None
        if following is not None:
            with contextlib.suppress(Exception):
                await following[1]

    async def flush(self) -> None:
        """Wait for the acknowledgement being written, if any (then every applied item is marked in the replica)."""
        acknowledging, self._acknowledging = self._acknowledging, None
        if acknowledging is not None:
            try:
                await acknowledging
            finally:
                self._acknowledged_up_to = 0

    async def _rejected(self, items: list[OutboxItem], response: httpx.Response) -> SendOutcome:
        try:
            errors = [e for e in response.json().get("errors", []) if isinstance(e, dict)]
        except ValueError:
            errors = []
        ours = {item.mutation_id for item in items}
        at_fault = [e for e in errors if e.get("id") in ours]
        if not at_fault:
            # A refusal that names no mutation (a body problem): the oldest item is the one that cannot go.
            at_fault = [
                {
                    "id": items[0].mutation_id,
                    "field": "mutations",
                    "problem": response.text[:200],
                    "status": response.status_code,
                }
            ]
        rejected = await asyncio.to_thread(self.replica.reject, at_fault)
        for rejection in rejected:
            if self.on_rejected is not None:
                self.on_rejected(rejection)
        return SendOutcome(rejected=tuple(rejected))

    def _retry_later(self, retry_after: str | None = None) -> SendOutcome:
        self._failures += 1
        delay = self.backoff.delay(self._failures)
        if retry_after is not None:
            with contextlib.suppress(ValueError):
                delay = max(0.0, min(60.0, float(retry_after)))
        return SendOutcome(retry_in=delay)

    def retry_now(self) -> None:
        """The server is reachable again (the shape stream reconnected): end any backoff and send at once."""
        self._retry.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set: send while there is something pending, sleep when idle (a local write
        sets :attr:`wake`) or backing off (only :meth:`retry_now` or the backoff's end wakes it)."""
        while not stop.is_set():
            self.wake.clear()  # before sending: a write that lands during the send must not be slept through
            self._retry.clear()
            try:
                outcome = await self.send_once()
            except Exception as exc:  # the replica failed (a batch not read, an acknowledgement not written)
                # Unacknowledged items stay pending and are sent again later: the server applies an id only once.
                log.warning("outbox: the replica failed; retrying", problem=str(exc))
                await self._drop_next()
                with contextlib.suppress(Exception):
                    await self.flush()
                outcome = self._retry_later()
            if outcome.sent or outcome.rejected:
                continue
            wake_on = [stop, self._retry] if outcome.retry_in is not None else [stop, self._retry, self.wake]
            waiters = [asyncio.ensure_future(event.wait()) for event in wake_on]
            await asyncio.wait(
                waiters,
                timeout=outcome.retry_in if outcome.retry_in is not None else 1.0,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiter in waiters:
                waiter.cancel()
        await self._drop_next()
        await self.flush()

    async def aclose(self) -> None:
        await self._drop_next()
        await self.flush()
        if self._own_client:
            await self._client.aclose()
