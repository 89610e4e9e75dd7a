"""Prometheus metrics for long-running pgferry work.

A migration of a large database runs for hours; operators watch it from dashboards, not terminals. Each
metrics object owns its registry, so several migrations (or tests) in one process never share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class MigrationMetrics:
    """Counters and gauges of one migration run, exported with ``serve(port)``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rows = Counter("pgferry_migrate_rows", "Rows copied to the target", ["table"], registry=self.registry)
        self.bytes = Counter(
            "pgferry_migrate_bytes", "COPY bytes streamed to the target", ["table"], registry=self.registry
        )
        self.chunks = Counter(
            "pgferry_migrate_chunks", "Chunks committed on the target", ["table"], registry=self.registry
        )
        self.chunk_seconds = Histogram(
            "pgferry_migrate_chunk_seconds",
            "Time to copy one chunk",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.retries = Counter("pgferry_migrate_retries", "Retried operations", registry=self.registry)
        self.errors = Counter(
            "pgferry_migrate_errors", "Errors that stopped or skipped work", ["phase"], registry=self.registry
        )
        self.phase = Gauge(
            "pgferry_migrate_phase", "1 for the phase the migration is in", ["phase"], registry=self.registry
        )
        self.applied_changes = Counter(
            "pgferry_migrate_applied_changes",
            "Row changes applied from a replication stream (forward: to the target; reverse: to the source)",
            ["direction"],
            registry=self.registry,
        )
        self.lag_bytes = Gauge(
            "pgferry_migrate_replication_lag_bytes",
            "WAL the applier is behind its origin",
            ["direction"],
            registry=self.registry,
        )
        self.lag_seconds = Gauge(
            "pgferry_migrate_replication_lag_seconds",
            "Seconds between the origin's last commit applied and now, while a backlog is being applied",
            ["direction"],
            registry=self.registry,
        )
        self.current_phase: str | None = None

    def enter_phase(self, name: str) -> None:
        if self.current_phase is not None:
            self.phase.labels(self.current_phase).set(0)
        self.phase.labels(name).set(1)
        self.current_phase = name

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)


class _PoolCollector(Collector):
    """Reads a connection pool's statistics at scrape time, so the gauges are never stale."""

    def __init__(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        size = int(stats.get("pool_size", 0))
        idle = int(stats.get("pool_available", 0))
        family = GaugeMetricFamily("pgferry_runtime_pool_connections", "Pooled connections by state", labels=["state"])
        family.add_metric(["in_use"], max(size - idle, 0))
        family.add_metric(["idle"], idle)
        yield family
        yield GaugeMetricFamily(
            "pgferry_runtime_pool_waiting",
            "Requests waiting for a pooled connection",
            value=int(stats.get("requests_waiting", 0)),
        )


class RuntimeMetrics:
    """Metrics of the runtime data layer (``pgferry.runtime``): query latency, pool, retries, the durable queue."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.query_seconds = Histogram(
            "pgferry_runtime_query_seconds",
            "Time of one database transaction issued by the runtime layer",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry,
        )
        self.retries = Counter(
            "pgferry_runtime_retries",
            "Attempts retried after a transient database error",
            ["reason"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "pgferry_runtime_queue_depth", "Writes waiting in the durable queue", registry=self.registry
        )
        self.queued = Counter(
            "pgferry_runtime_queued_writes", "Writes put in the durable queue", registry=self.registry
        )
        self.replayed = Counter(
            "pgferry_runtime_replayed_writes", "Queued writes applied to the database", registry=self.registry
        )
        self.stale_reads = Counter(
            "pgferry_runtime_stale_reads",
            "Reads answered from the local cache while the database was unreachable",
            registry=self.registry,
        )
        self.slot_lag_bytes = Gauge(
            "pgferry_runtime_replication_slot_lag_bytes",
            "WAL retained for each replication slot (how far its consumer is behind)",
            ["slot"],
            registry=self.registry,
        )

    def watch_pool(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Export a pool's in-use / idle / waiting counts (``stats``: psycopg_pool's ``get_stats``)."""
        self.registry.register(_PoolCollector(stats))

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
