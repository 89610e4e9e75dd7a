"""Prometheus metrics for long-running pgferry work.

A migration of a large database runs for hours; operators watch it from dashboards, not terminals. Each
metrics object owns its registry, so several migrations (or tests) in one process never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


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
