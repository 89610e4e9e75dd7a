"""The realtime server's replication side: one slot, one thread, every subscriber's messages built from it.

Each batch of committed transactions (whatever has arrived, in commit order) is judged by
:class:`~pgferry.realtime.authorize.Authorizer` and turned into ``postgres_changes`` frames, each change's
``data`` serialised once per distinct column set and shared by every subscriber that sees it. A batch is confirmed
to the slot only after each of its frames has been written to its socket (or the socket is gone), so a server that
dies loses nothing: the slot hands the batch to the next start. Transactions already dispatched are skipped after
the feed reconnects (PostgreSQL restarts), so a client still connected gets no duplicates.

Must not know about the websocket transport beyond :class:`~pgferry.realtime.channels.FrameSink`.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog

from pgferry.realtime.authorize import Authorizer, Group, Image, RoleView, TableCatalog, TableResult
from pgferry.realtime.channels import Channel, FrameSink, Registry, Subscription
from pgferry.replication import Lsn, ReplicationReader, RowChange, Transaction
from pgferry.replication.follow import FollowedFeed, SlotFollower
from pgferry.sync.errors import describe_error
from pgferry.sync.session import replication_dsn

__all__ = ["ChangeFeed", "commit_timestamp"]

_log = structlog.get_logger("pgferry.realtime.feed")
_MAX_BATCH = 512
_KIND = {"insert": "INSERT", "update": "UPDATE", "delete": "DELETE"}


def commit_timestamp(moment: dt.datetime) -> str:
    """Realtime's ``commit_timestamp``: UTC to the millisecond with a trailing ``Z``."""
    utc = moment.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


class _Confirmations:
    """Batches in dispatch order; the slot is confirmed up to the last batch whose frames have all been written."""

    def __init__(self, confirm: Callable[[Lsn], None]) -> None:
        self._lock = threading.Lock()
        self._pending: deque[list[Any]] = deque()  # [end_lsn, frames outstanding]
        self._confirm = confirm

    def open(self, end_lsn: Lsn) -> list[Any]:
        entry: list[Any] = [end_lsn, 1]  # the extra 1 is released by close(): sends may finish before it
        with self._lock:
            self._pending.append(entry)
        return entry

    def add(self, entry: list[Any]) -> Callable[[], None]:
        with self._lock:
            entry[1] += 1
        return lambda: self.done(entry)

    def done(self, entry: list[Any]) -> None:
        ready: Lsn | None = None
        with self._lock:
            entry[1] -= 1
            while self._pending and self._pending[0][1] <= 0:
                ready = self._pending.popleft()[0]
        if ready is not None:
            self._confirm(ready)


@dataclass
class _TableWork:
    catalog: TableCatalog
    changes: list[tuple[str, RowChange, int | None, int | None]]  # (commit time, change, new image, old image)
    images: list[Image]
    groups: list[Group]
    members: list[list[Subscription]]  # per group, the subscriptions in the order of its filters


class ChangeFeed(FollowedFeed):
    """Runs the replication reader in a thread and hands every subscriber its frames."""

    def __init__(
        self,
        url: str,
        registry: Registry,
        *,
        slot: str,
        publication: str,
        ready: threading.Event,
    ) -> None:
        self._url = url
        self._registry = registry
        self._slot = slot
        self._publication = publication
        self._dispatched = Lsn(0)
        self.delivered = 0
        self._follower = SlotFollower(
            replication_dsn(url),
            self._stream,
            thread_name="pgferry-realtime-feed",
            log=_log,
            log_event="realtime.feed_restarting",
            describe=describe_error,
            ready=ready,
        )

    # -- the loop ----------------------------------------------------------------------------------------------

    def _stream(self, reader: ReplicationReader) -> None:
        authorizer = Authorizer(self._url)
        try:
            reader.start(self._slot, [self._publication])
            confirmations = _Confirmations(reader.confirm)
            self._follower.mark_active()
            while not self._follower.stopping:
                batch = reader.next_batch(_MAX_BATCH)
                if not batch:
                    continue
                fresh = [txn for txn in batch if txn.commit_lsn > self._dispatched]
                entry = confirmations.open(batch[-1].end_lsn)
                if fresh:
                    # A failure here leaves the batch unconfirmed: the next reader gets it again from the slot.
                    self._dispatch(fresh, authorizer, confirmations, entry)
                    self._dispatched = fresh[-1].commit_lsn
                confirmations.done(entry)
        finally:
            authorizer.close()

    # -- one batch ---------------------------------------------------------------------------------------------

    def _dispatch(
        self, batch: list[Transaction], authorizer: Authorizer, confirmations: _Confirmations, entry: list[Any]
    ) -> None:
        now = time.time()
        work: dict[int, _TableWork] = {}
        for txn in batch:
            stamp = commit_timestamp(txn.commit_ts)
            for change in txn.changes:
                if not isinstance(change, RowChange):
                    continue  # TRUNCATE: Realtime sends nothing for it either
                item = work.get(change.relation.oid)
                if item is None:
                    candidates = [
                        s
                        for s in self._registry.candidates(change.schema, change.table)
                        if s.active and s.channel.receives(now)
                    ]
                    if not candidates:
                        continue
                    item = _table_work(authorizer.catalog(change.relation.oid), candidates)
                    work[change.relation.oid] = item
                new_index = old_index = None
                if change.new is not None:
                    values = dict(change.new)
                    if change.old is not None:
                        for name in change.unchanged_toast_columns:  # an untouched TOASTed value: the old one
                            if name in change.old:
                                values[name] = change.old[name]
                    new_index = len(item.images)
                    item.images.append(Image(values, frozenset(values)))
                if change.old is not None:
                    old_index = len(item.images)
                    item.images.append(Image(change.old, frozenset(change.old)))
                item.changes.append((stamp, change, new_index, old_index))
        if not work:
            return
        tables = list(work.values())
        requests = [(t.catalog, t.images, t.groups) for t in tables]
        try:
            results = authorizer.evaluate(requests)
        except psycopg.OperationalError:
            # Most often a connection from before a database restart: one fresh attempt before giving up the batch.
            authorizer.reset()
            results = authorizer.evaluate(requests)
        by_sink: dict[int, tuple[FrameSink, list[str]]] = {}
        count = 0
        for table, result in zip(tables, results, strict=True):
            for channel, frame in self._frames(table, result):
                found = by_sink.get(id(channel.sink))
                if found is None:
                    by_sink[id(channel.sink)] = (channel.sink, [frame])
                else:
                    found[1].append(frame)
                count += 1
        if by_sink:
            handover = [(sink, frames, confirmations.add(entry)) for sink, frames in by_sink.values()]
            loop = handover[0][0].loop
            loop.call_soon_threadsafe(_hand_over, handover)
        self.delivered += count

    def _frames(self, table: _TableWork, result: TableResult) -> list[tuple[Channel, str]]:
        """The frames of one table's changes, in commit order. Work is proportional to what is delivered: the
        evaluation's results are turned around into "who sees image i" once, instead of asking every subscription
        about every change."""
        out: list[tuple[Channel, str]] = []
        catalog = table.catalog
        seen_by: list[list[tuple[Subscription, int]]] = [[] for _ in table.images]
        for group, matches in enumerate(result.matches):
            members = table.members[group]
            for image, verdicts in matches.items():
                entries = seen_by[image]
                for position, passed in enumerate(verdicts):
                    if passed:
                        entries.append((members[position], group))
        for stamp, change, new_index, old_index in table.changes:
            kind = _KIND[change.kind]
            judged = old_index if change.kind == "delete" else new_index
            if judged is None:
                continue
            entries = seen_by[judged]
            if not entries:
                continue
            cache: dict[tuple[tuple[str, ...], bool], str] = {}
            per_channel: dict[int, tuple[Channel, list[int], RoleView, bool]] | None = None
            for subscription, group in entries:
                event = subscription.binding.event
                if event != "*" and event != kind:
                    continue
                channel = subscription.channel
                if len(channel.subscriptions) == 1:
                    # The common case, one binding per channel: no grouping, the frame's head is prebuilt.
                    view = result.views[group]
                    old_visible = old_index is not None and old_index in result.matches[group]
                    key = (view.columns, old_visible)
                    data = cache.get(key)
                    if data is None:
                        data = _data_json(catalog, kind, stamp, view, result, new_index, old_index, old_visible, change)
                        cache[key] = data
                    out.append((channel, "".join((subscription.frame_head, data, channel.frame_tail))))
                    continue
                if per_channel is None:
                    per_channel = {}
                found = per_channel.get(id(channel))
                if found is None:
                    old_visible = old_index is not None and old_index in result.matches[group]
                    per_channel[id(channel)] = (channel, [subscription.binding.id], result.views[group], old_visible)
                elif subscription.binding.id not in found[1]:
                    found[1].append(subscription.binding.id)
            for channel, ids, view, old_visible in (per_channel or {}).values():
                key = (view.columns, old_visible)
                data = cache.get(key)
                if data is None:
                    data = _data_json(catalog, kind, stamp, view, result, new_index, old_index, old_visible, change)
                    cache[key] = data
                payload = '{"ids":[' + ",".join(map(str, ids)) + '],"data":' + data + "}"
                out.append((channel, channel.change_frame(payload)))
        return out


def _hand_over(handover: list[tuple[FrameSink, list[str], Callable[[], None]]]) -> None:
    """On the event loop: each socket gets its frames of the batch, in commit order, with one callback."""
    for sink, frames, on_sent in handover:
        try:
            sink.enqueue(frames, on_sent)
        except Exception:  # a socket that broke meanwhile must not hold the batch back, nor the others
            on_sent()


def _table_work(catalog: TableCatalog, subscriptions: list[Subscription]) -> _TableWork:
    groups: list[Group] = []
    index: dict[str, int] = {}
    members: list[list[Subscription]] = []
    filters: list[list[Any]] = []
    for subscription in subscriptions:
        token = subscription.channel.token
        number = index.get(token.key)
        if number is None:
            number = index[token.key] = len(groups)
            filters.append([])
            members.append([])
            groups.append(Group(token.claims, filters[number]))
        members[number].append(subscription)
        filters[number].append(subscription.filters)
    return _TableWork(catalog, [], [], groups, members)


@functools.lru_cache(maxsize=4096)
def _names(columns: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Each column with its JSON key prefix (``"name":``), serialised once per column set."""
    return tuple((name, json.dumps(name) + ":") for name in columns)


@functools.lru_cache(maxsize=1024)
def _layout(
    schema: str, table: str, columns: tuple[str, ...], typnames: tuple[str, ...], readable: tuple[str, ...]
) -> tuple[tuple[str, ...], str]:
    """The columns a role sees, and the payload's fixed head (schema, table) and ``columns`` for them."""
    shown = tuple(c for c, _ in zip(columns, typnames, strict=True) if c in readable)
    types = dict(zip(columns, typnames, strict=True))
    head = f'"schema":{json.dumps(schema)},"table":{json.dumps(table)}'
    described = json.dumps([{"name": c, "type": types[c]} for c in shown])
    return shown, head + "\x00" + described


def _object(columns: tuple[str, ...], rendered: dict[str, str]) -> str:
    return "{" + ",".join(prefix + rendered[name] for name, prefix in _names(columns) if name in rendered) + "}"


def _data_json(
    catalog: TableCatalog,
    kind: str,
    stamp: str,
    view: RoleView,
    result: TableResult,
    new_index: int | None,
    old_index: int | None,
    old_visible: bool,
    change: RowChange,
) -> str:
    typnames = tuple(catalog.typnames[c] for c in catalog.columns)
    columns, fixed = _layout(catalog.schema, catalog.name, catalog.columns, typnames, view.columns)
    head, described = fixed.split("\x00")
    key = tuple(c for c in (catalog.primary_key or change.key_columns) if c in view.columns)
    parts = [head, f'"commit_timestamp":"{stamp}"', f'"type":"{kind}"', f'"columns":{described}']
    if new_index is not None:
        parts.append(f'"record":{_object(columns, result.json[new_index])}')
    if kind != "INSERT":
        if old_index is not None and old_visible:
            old = _object(columns, result.json[old_index])
        else:  # the old row is not the subscriber's to see (or was not sent): its key, as Realtime sends
            source = result.json[old_index] if old_index is not None else result.json[new_index or 0]
            old = _object(key, source)
        parts.append(f'"old_record":{old}')
    parts.append('"errors":null')
    return "{" + ",".join(parts) + "}"
