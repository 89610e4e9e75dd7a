"""An optional in-process cache of users' reads, invalidated by the replication feed.

A service answers the same reads again and again (a user's task list, an agent's settings) far more often than
those rows change; each answer costs a round trip and a query. The cache keeps the rows of reads a caller marks
cacheable and drops them when the tables they read change — learnt from logical replication, so a write by any
process (another service instance, PostgREST, the sync write API, psql) invalidates, not only this process's own.

The rules that keep it from serving a wrong answer:

* **Per user.** An entry is keyed by the user's verified claims, the statement and its parameters: RLS decided
  what the rows are for those claims, so another user (or the same user with other claims) never gets them.
* **Known dependencies only.** Which tables a statement reads comes from its plan (``EXPLAIN (VERBOSE)`` as the
  user, once per statement text), including tables read by RLS policies' subqueries. A statement is cached only
  when it reads at least one table, every table it reads is in the feed's publication and none is partitioned,
  a partition or an inheritance parent (which of those a plan names depends on its parameters or on children
  created later), and its plan has no function scan (a function could read tables the plan does not show) and
  no data modification; any other statement always goes to the database.
* **No lost invalidation.** A read notes its tables' generations before it runs and stores its rows only if
  none changed by the time it returns: a change committed after the read's snapshot is delivered after the
  read began, so it is either seen then or invalidates the stored entry when it arrives.
* **Only while the feed streams.** The feed uses a ``TEMPORARY`` slot (the server drops it when this process's
  connection ends, so a crashed service leaves no slot holding WAL). While it is not streaming nothing is served
  or stored; when a new stream starts — a new slot, blind to what committed in between — everything is dropped.
* **Read your writes.** Writes made through the same client drop every entry when they finish; another
  process's writes are seen after the replication lag (milliseconds on a healthy server).

The caller's part: only mark reads whose answer depends on the rows alone — not ``now()``, ``random()`` or
sequences. Owns the entries and the feed; must not decide who the user is or run statements itself (the client
passes a loader).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg
import structlog

from pgferry.replication.follow import SlotFollower
from pgferry.replication.reader import ReplicationReader, RowChange, TruncateChange

__all__ = ["DEFAULT_PUBLICATION", "CacheStats", "QueryCache", "tables_read_by_plan"]

_log = structlog.get_logger("pgferry.runtime.query_cache")

#: Statement texts whose tables are remembered; the oldest is forgotten beyond this (asked again if it comes back).
#: A service has few distinct texts, but one that formats values into its SQL would otherwise grow this forever.
MAX_PLANS = 4096
_NOT_EXPLAINED: Any = object()

DEFAULT_PUBLICATION: Final = "supabase_realtime"
"""Supabase's publication of the tables clients subscribe to; the platform's user tables are all in it."""
MAX_CACHED_ROWS: Final = 10_000
"""A read returning more rows than this is not kept: the cache is for hot small reads, not a copy of tables."""

Table = tuple[str, str]
"""``(schema, table)``."""


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    uncacheable: int
    invalidations: int
    entries: int
    streaming: bool
    streams: int
    """Streams started so far: each one after the first followed a cut (and began with an empty cache)."""


@dataclass(frozen=True)
class _Entry:
    rows: list[tuple[Any, ...]]
    tables: frozenset[Table]


def tables_read_by_plan(plan: Any) -> frozenset[Table] | None:
    """The tables an ``EXPLAIN (VERBOSE, FORMAT JSON)`` plan reads; ``None`` when the plan could read something
    it does not name (a function scan) or writes (a data-modifying statement is never a cacheable read)."""
    tables: set[Table] = set()
    stack = [plan[0]["Plan"] if isinstance(plan, list) else plan]
    while stack:
        node = stack.pop()
        kind = node.get("Node Type")
        if kind in ("Function Scan", "ModifyTable", "Table Function Scan", "Foreign Scan", "Custom Scan"):
            return None
        if "Relation Name" in node:
            tables.add((str(node.get("Schema", "")), str(node["Relation Name"])))
        stack.extend(node.get("Plans", ()))
    return frozenset(tables)


class QueryCache:
    """Rows of cacheable reads by ``(claims, statement, parameters)``; thread-safe; see the module docstring.

    ``replication_dsn`` must reach the database directly (a pooler cannot carry replication) as a role with
    REPLICATION; ``publication`` names the tables whose changes the feed sees.
    """

    def __init__(
        self,
        replication_dsn: str,
        *,
        publication: str = DEFAULT_PUBLICATION,
        max_entries: int = 10_000,
        slot_prefix: str = "pgferry_cache",
    ) -> None:
        self.publication = publication
        self.max_entries = max_entries
        self._dsn = replication_dsn
        self._slot_prefix = slot_prefix
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._by_table: dict[Table, set[Hashable]] = {}
        self._generation: dict[Table, int] = {}
        self._epoch = 0  # bumped whenever everything is dropped
        self._streaming = False
        self._streaming_event = threading.Event()
        self._streams = 0
        self._published: frozenset[Table] = frozenset()
        self._partitioned: frozenset[Table] = frozenset()
        self._plans: OrderedDict[str, frozenset[Table] | None] = OrderedDict()
        self._counts = dict.fromkeys(("hits", "misses", "uncacheable", "invalidations"), 0)
        self._follower = SlotFollower(
            replication_dsn,
            self._follow,
            thread_name="pgferry-query-cache-feed",
            log=_log,
            log_event="query_cache.feed_restart",
            describe=lambda exc: str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            on_stream=self._on_stream,
        )

    # -- life -----------------------------------------------------------------------------------------------------

    def start(self) -> QueryCache:
        self._follower.start()
        return self

    def close(self) -> None:
        self._follower.stop()
        self._set_streaming(False)

    def __enter__(self) -> QueryCache:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def streaming(self) -> bool:
        """Whether the feed is streaming, i.e. whether the cache serves at all."""
        return self._streaming

    def wait_streaming(self, timeout: float = 10.0) -> bool:
        """Wait until the feed streams (a service may start before its database); whether it does."""
        return self._streaming_event.wait(timeout)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                **self._counts, entries=len(self._entries), streaming=self._streaming, streams=self._streams
            )

    # -- reads ------------------------------------------------------------------------------------------------------

    def read(
        self,
        claims: Hashable,
        statement: str,
        params: Sequence[Any] | Mapping[str, Any],
        load: Callable[[], list[tuple[Any, ...]]],
        explain: Callable[[], Any],
    ) -> list[tuple[Any, ...]]:
        """The rows of ``statement`` for ``claims``: from the cache, or from ``load()`` (kept when allowed).

        ``claims`` identifies the user's verified claims (:func:`pgferry.runtime.scoped.claims_key`);
        ``explain()`` returns the statement's ``EXPLAIN (VERBOSE, FORMAT JSON)`` plan as that user, asked once
        per statement text.
        """
        if not self._streaming:
            return load()
        tables = self._plans.get(statement, _NOT_EXPLAINED)
        if tables is _NOT_EXPLAINED:
            tables = tables_read_by_plan(explain())
            with self._lock:
                self._plans[statement] = tables
                while len(self._plans) > MAX_PLANS:
                    self._plans.popitem(last=False)
        # None: the plan hides reads; empty: reads no table; partitions and inheritance: the tables a plan names
        # depend on the parameters (pruning) or on children created later, so it cannot name them once for all.
        if not tables or not tables <= self._published or tables & self._partitioned:
            with self._lock:
                self._counts["uncacheable"] += 1
            return load()
        key = (claims, statement, _hashable(params))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._streaming:
                self._entries.move_to_end(key)
                self._counts["hits"] += 1
                return list(entry.rows)
            self._counts["misses"] += 1
            before = self._versions(tables)
        rows = load()
        if len(rows) <= MAX_CACHED_ROWS:
            with self._lock:
                if self._versions(tables) == before and self._streaming:
                    self._store(key, _Entry(list(rows), tables))
        return rows

    def invalidate_all(self) -> None:
        """Drop every entry (after a write through this client: read your own writes)."""
        with self._lock:
            self._drop_everything()

    # -- internals ----------------------------------------------------------------------------------------------

    def _versions(self, tables: frozenset[Table]) -> tuple[int, list[int]]:
        """What must not change while a read runs for its rows to be kept (called under the lock)."""
        return self._epoch, [self._generation.get(t, 0) for t in sorted(tables)]

    def _store(self, key: Hashable, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        for table in entry.tables:
            self._by_table.setdefault(table, set()).add(key)
        while len(self._entries) > self.max_entries:
            old_key, old = self._entries.popitem(last=False)
            self._unindex(old_key, old)

    def _unindex(self, key: Hashable, entry: _Entry) -> None:
        for table in entry.tables:
            keys = self._by_table.get(table)
            if keys is not None:
                keys.discard(key)

    def _drop_everything(self) -> None:
        self._epoch += 1
        self._entries.clear()
        self._by_table.clear()

    def _invalidate(self, tables: Iterable[Table]) -> None:
        with self._lock:
            for table in tables:
                self._generation[table] = self._generation.get(table, 0) + 1
                self._counts["invalidations"] += 1
                for key in self._by_table.pop(table, ()):
                    entry = self._entries.pop(key, None)
                    if entry is not None:
                        self._unindex(key, entry)

    def _set_streaming(self, streaming: bool) -> None:
        with self._lock:
            self._streaming = streaming
            self._streams += streaming
            self._drop_everything()  # either way: what was cached may have changed unseen
        if streaming:
            self._streaming_event.set()
        else:
            self._streaming_event.clear()

    def _on_stream(self, started: bool) -> None:
        if started:
            self._published, self._partitioned = self._catalog()
        self._set_streaming(started)
        _log.info("query_cache.feed", streaming=started)

    def _catalog(self) -> tuple[frozenset[Table], frozenset[Table]]:
        """The publication's tables, and every table that is partitioned, a partition or has inheritance children."""
        with psycopg.connect(self._dsn, autocommit=True, connect_timeout=10) as conn:
            published = conn.execute(
                "select schemaname::text, tablename::text from pg_catalog.pg_publication_tables where pubname = %s",
                (self.publication,),
            ).fetchall()
            partitioned = conn.execute(
                "select n.nspname::text, c.relname::text from pg_catalog.pg_class c "
                "join pg_catalog.pg_namespace n on n.oid = c.relnamespace "
                "where c.relkind = 'p' or c.relispartition or c.relhassubclass"
            ).fetchall()
        return (
            frozenset((str(schema), str(table)) for schema, table in published),
            frozenset((str(schema), str(table)) for schema, table in partitioned),
        )

    def _follow(self, reader: ReplicationReader) -> None:
        reader.start(self._slot_prefix, [self.publication], temporary=True)
        self._follower.mark_active()
        while not self._follower.stopping:
            for txn in reader.transactions(timeout=0.5):
                touched: set[Table] = set()
                for change in txn.changes:
                    if isinstance(change, RowChange):
                        touched.add((change.schema, change.table))
                    elif isinstance(change, TruncateChange):
                        touched.update((r.schema, r.table) for r in change.relations)
                self._invalidate(touched)
                reader.confirm(txn)  # a temporary slot: nothing to keep, only to let the server free WAL
                if self._follower.stopping:
                    break


def _hashable(params: Sequence[Any] | Mapping[str, Any]) -> Hashable:
    """Parameters as a key: JSON of their text forms, so lists, dicts and UUIDs key alike (types are kept)."""
    if isinstance(params, Mapping):
        items: Any = sorted((str(k), type(v).__name__, repr(v)) for k, v in params.items())
    else:
        items = [(type(v).__name__, repr(v)) for v in params]
    return json.dumps(items)
