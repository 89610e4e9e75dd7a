"""Deterministic, realistic platform data for pgferry's demo, tests and benchmarks.

A migration tool is only as trustworthy as the data it was tested with. Toy rows hide exactly the things
that break moves: 1536-dimension vectors stored out of line, multi-megabyte rows, jsonb with unicode,
numerics whose scale must survive, NULLs everywhere a column allows them, foreign keys that have to be
loaded in order. :class:`TestDataManager` produces all of that for the eight platform tables, the same bytes
for the same seed on any server, so a test can seed a source and a target independently and expect
:func:`pgferry.db.checksum.compare_tables` to call them identical.

Design choices, and why:

* Every table draws from its own random stream (``numpy`` ``Generator`` seeded with ``(seed, table)``), so
  changing how one table is generated does not reshuffle the others and break unrelated expectations.
* Timestamps are laid out relative to a fixed anchor instant rather than ``now()``; "the past 90 days" of a
  run today and a run next week must be the same rows, or determinism across runs is lost.
* Rows are loaded with binary ``COPY``, the vectors dumped straight from ``float32`` arrays, because the
  benchmarks seed hundreds of megabytes and text formatting of floats would dominate the run.
* Every child row belongs to the same user as its parent. Supabase RLS filters on ``user_id``, so data that
  mixed owners across a foreign key would make RLS tests pass or fail for the wrong reason.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from pgvector.psycopg.vector import register_vector_info
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter
from psycopg.types import TypeInfo

from pgferry.db.checksum import TableDiff, compare_tables
from pgferry.db.connect import connect
from pgferry.errors import PgferryError
from pgferry.schema.models import EMBEDDING_DIMENSIONS, PLATFORM_TABLES
from pgferry.schema.neon import create_neon_schema, neon_schema_exists

__all__ = ["BASE_COUNTS", "DatasetComparison", "SeedReport", "TestDataError", "TestDataManager"]

BASE_COUNTS: dict[str, int] = {
    "users": 10,
    "environments": 40,
    "workflows": 100,
    "tasks": 4000,
    "agent_executions": 8000,
    "workflow_executions": 1500,
    "observability_events": 40000,
    "agent_memory": 4000,
    "execution_snapshots": 300,
}
"""Rows at ``scale=1.0`` (about 100 MB on disk, most of it embeddings and snapshots)."""

DEFAULT_ANCHOR = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
"""The instant generated history ends at; fixed so that a seed means the same rows on every day."""

USER_NAMESPACE = uuid.UUID("6f1c1a52-58f4-4d4e-9a53-1e3b0c7a9d10")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
US_PER_SECOND = 1_000_000
US_PER_DAY = 86_400 * US_PER_SECOND
HISTORY_DAYS = 90
N_TOPICS = 8
EMBEDDING_BATCH = 1024
HUGE_SNAPSHOT_BLOB_BYTES = 4 * 1024 * 1024
LARGE_STATE_MIN_BYTES = 120 * 1024

Float32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class TestDataError(PgferryError):
    """Test data could not be generated or loaded as asked (for example, the tables already hold rows)."""

    __test__ = False


@dataclass(frozen=True)
class SeedReport:
    """What ``seed()`` loaded, and how fast: benchmarks compare runs by ``megabytes_per_second``."""

    rows: dict[str, int]
    total_bytes: int
    duration_seconds: float
    users: int

    @property
    def megabytes_per_second(self) -> float:
        return self.total_bytes / 1_000_000 / self.duration_seconds if self.duration_seconds > 0 else 0.0


@dataclass(frozen=True)
class DatasetComparison:
    """Per-table verdicts for two databases; ``describe()`` is meant for assertion messages."""

    tables: list[TableDiff]

    @property
    def identical(self) -> bool:
        return all(diff.matches for diff in self.tables)

    @property
    def different_tables(self) -> list[str]:
        return [diff.table for diff in self.tables if not diff.matches]

    def describe(self) -> str:
        head = (
            "datasets are identical"
            if self.identical
            else (f"datasets differ in {len(self.different_tables)} table(s): {', '.join(self.different_tables)}")
        )
        return "\n".join([head, *(f"  {diff.describe()}" for diff in self.tables)])


# --- vocabulary -----------------------------------------------------------------------------------------

TOPICS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "database",
        ("migrate", "index", "optimise", "partition", "vacuum", "replicate"),
        ("the tasks table", "slow vector search", "connection pooling", "the nightly backup", "jsonb columns"),
        ("postgres", "sql", "performance", "migration"),
    ),
    (
        "frontend",
        ("redesign", "fix", "refactor", "animate", "localise"),
        ("the settings page", "dark mode", "the task board", "keyboard shortcuts", "the onboarding flow"),
        ("react", "css", "a11y", "ui"),
    ),
    (
        "infra",
        ("deploy", "scale", "harden", "containerise", "monitor"),
        ("the worker fleet", "the staging cluster", "terraform modules", "the CI runners", "egress proxies"),
        ("kubernetes", "terraform", "ci", "ops"),
    ),
    (
        "ml",
        ("evaluate", "fine-tune", "embed", "benchmark", "distil"),
        ("the ranking model", "prompt templates", "the eval dataset", "retrieval quality", "the reranker"),
        ("llm", "embeddings", "evals", "rag"),
    ),
    (
        "security",
        ("rotate", "audit", "lock down", "review", "patch"),
        ("API keys", "row level security", "JWT validation", "dependency CVEs", "service-role access"),
        ("security", "auth", "rls", "compliance"),
    ),
    (
        "testing",
        ("stabilise", "parallelise", "extend", "speed up", "triage"),
        ("flaky integration tests", "coverage reports", "fixtures", "the e2e suite", "snapshot tests"),
        ("tests", "qa", "flaky", "coverage"),
    ),
    (
        "docs",
        ("write", "update", "translate", "proofread", "restructure"),
        ("the API reference", "the changelog", "the quick-start", "runbooks", "architecture notes"),
        ("docs", "writing", "onboarding"),
    ),
    (
        "billing",
        ("reconcile", "meter", "invoice", "forecast", "refund"),
        ("token usage", "Stripe webhooks", "monthly invoices", "cost dashboards", "free-tier limits"),
        ("billing", "stripe", "finance", "usage"),
    ),
)
GENERIC_TAGS = ("urgent", "backlog", "customer", "tech-debt", "q4", "needs-review", "blocked", "quick-win")
WORDS = (
    "agent",
    "context",
    "retry",
    "token",
    "window",
    "vector",
    "plan",
    "step",
    "tool",
    "result",
    "cache",
    "latency",
    "budget",
    "trace",
    "span",
    "memory",
    "summary",
    "branch",
    "commit",
    "review",
    "deploy",
    "query",
    "index",
    "schema",
    "policy",
    "user",
    "session",
    "prompt",
    "output",
    "error",
    "timeout",
    "stream",
    "chunk",
    "score",
    "rank",
    "filter",
    "batch",
    "queue",
    "worker",
    "lease",
    "checkpoint",
)
UNICODE_SNIPPETS = (
    "✅ erledigt",
    "🚀 déploiement lancé",
    "任务已完成 等待审核",
    "Ошибка: соединение сброшено",
    "データベースの移行が完了しました",
    "تم حفظ الذاكرة بنجاح",
    "Ελέγχθηκε η κατάσταση",
    "naïve café résumé — “quoted”",
    "👩‍💻 pair-programming session",
    "🔥🔥 hot path 🔥",
    "नमस्ते दुनिया",
    "한국어 요약 생성",
    "עברית: בדיקה עברה",
    "family 👨‍👩‍👧‍👦 emoji ZWJ",
    "Zürich · Kraków · İstanbul",
)
AGENT_NAMES = ("planner", "coder", "reviewer", "researcher", "tester", "deployer", "summariser")
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "claude-haiku-4", "llama-3.1-70b", "mistral-large")
PRICES_PER_MTOKEN = {  # (prompt, completion) in micro-dollars per token
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-haiku-4": (0.8, 4.0),
    "llama-3.1-70b": (0.6, 0.8),
    "mistral-large": (2.0, 6.0),
}
TOOLS = ("web_search", "code_interpreter", "file_read", "file_write", "sql_query", "github_pr", "shell")
EVENT_TYPES = (
    "agent.start",
    "agent.end",
    "llm.request",
    "llm.response",
    "tool.call",
    "tool.result",
    "memory.write",
    "memory.read",
    "log",
    "error",
)
EVENT_WEIGHTS = (0.06, 0.06, 0.17, 0.17, 0.16, 0.16, 0.05, 0.07, 0.07, 0.03)
SEVERITIES = ("debug", "info", "warning", "error", "critical")

TASK_STATUSES = (
    ("pending", 0.15),
    ("queued", 0.08),
    ("running", 0.07),
    ("completed", 0.55),
    ("failed", 0.1),
    ("cancelled", 0.05),
)
EXEC_STATUSES = (
    ("queued", 0.04),
    ("running", 0.05),
    ("succeeded", 0.7),
    ("failed", 0.11),
    ("cancelled", 0.05),
    ("timeout", 0.05),
)
WF_STATUSES = (
    ("pending", 0.05),
    ("running", 0.06),
    ("paused", 0.04),
    ("succeeded", 0.7),
    ("failed", 0.1),
    ("cancelled", 0.05),
)
WF_TRIGGERS = (("manual", 0.3), ("schedule", 0.4), ("webhook", 0.2), ("api", 0.1))
ENV_STATUSES = (("active", 0.8), ("paused", 0.15), ("archived", 0.05))
MEMORY_TYPES = (("episodic", 0.45), ("semantic", 0.3), ("procedural", 0.15), ("working", 0.1))

# --- table layouts: COPY column order and the binary types the values are dumped as ---------------------

COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "environments": (
        ("id", "uuid"),
        ("user_id", "uuid"),
        ("name", "text"),
        ("description", "text"),
        ("github_repository", "text"),
        ("github_branch", "text"),
        ("github_installation_id", "int8"),
        ("settings", "jsonb"),
        ("status", "text"),
        ("created_at", "timestamptz"),
        ("updated_at", "timestamptz"),
    ),
    "workflows": (
        ("id", "uuid"),
        ("user_id", "uuid"),
        ("environment_id", "uuid"),
        ("name", "text"),
        ("description", "text"),
        ("definition", "jsonb"),
        ("version", "int4"),
        ("is_active", "bool"),
        ("created_at", "timestamptz"),
        ("updated_at", "timestamptz"),
    ),
    "tasks": (
        ("id", "uuid"),
        ("user_id", "uuid"),
        ("environment_id", "uuid"),
        ("title", "text"),
        ("description", "text"),
        ("status", "text"),
        ("priority", "int4"),
        ("tags", "text[]"),
        ("metadata", "jsonb"),
        ("embedding", "vector"),
        ("due_at", "timestamptz"),
        ("completed_at", "timestamptz"),
        ("created_at", "timestamptz"),
        ("updated_at", "timestamptz"),
    ),
    "agent_executions": (
        ("id", "uuid"),
        ("user_id", "uuid"),
        ("task_id", "uuid"),
        ("environment_id", "uuid"),
        ("agent_name", "text"),
        ("model", "text"),
        ("status", "text"),
        ("inputs", "jsonb"),
        ("outputs", "jsonb"),
        ("error", "text"),
        ("started_at", "timestamptz"),
        ("completed_at", "timestamptz"),
        ("duration_ms", "int8"),
        ("prompt_tokens", "int4"),
        ("completion_tokens", "int4"),
        ("total_tokens", "int4"),
        ("cost_usd", "numeric"),
        ("created_at", "timestamptz"),
        ("updated_at", "timestamptz"),
    ),
    "observability_events": (
        ("id", "int8"),
        ("user_id", "uuid"),
        ("execution_id", "uuid"),
        ("event_type", "text"),
        ("severity", "text"),
        ("message", "text"),
        ("data", "jsonb"),
        ("trace_id", "varchar"),
        ("span_id", "varchar"),
        ("parent_span_id", "varchar"),
        ("occurred_at", "timestamptz"),
        ("created_at", "timestamptz"),
    ),
    "agent_memory": (
        ("id", "uuid"),
        ("user_id", "uuid"),
        ("agent_name", "text"),
        ("memory_type", "text"),
        ("content", "text"),
        ("metadata", "jsonb"),
        ("importance", "float8"),
        ("embedding", "vector"),
        ("access_count", "int4"),
        ("last_accessed_at", "timestamptz"),
        ("expires_at", "timestamptz"),
        ("created_at", "timestamptz"),
        ("updated_at", "timestamptz"),
    ),
    "workflow_executions": (
        ("id", "uuid"),
        ("user_id", "uuid"),
        ("workflow_id", "uuid"),
        ("status", "text"),
        ("trigger", "text"),
        ("inputs", "jsonb"),
        ("outputs", "jsonb"),
        ("step_results", "jsonb"),
        ("current_step", "text"),
        ("error", "text"),
        ("started_at", "timestamptz"),
        ("completed_at", "timestamptz"),
        ("created_at", "timestamptz"),
        ("updated_at", "timestamptz"),
    ),
    "execution_snapshots": (
        ("id", "uuid"),
        ("user_id", "uuid"),
        ("execution_id", "uuid"),
        ("sequence", "int4"),
        ("label", "text"),
        ("state", "jsonb"),
        ("blob", "bytea"),
        ("size_bytes", "int8"),
        ("created_at", "timestamptz"),
        ("updated_at", "timestamptz"),
    ),
}
assert set(COLUMNS) == set(PLATFORM_TABLES)

GENERATION_ORDER: tuple[str, ...] = (
    "environments",
    "workflows",
    "tasks",
    "agent_executions",
    "observability_events",
    "agent_memory",
    "workflow_executions",
    "execution_snapshots",
)
"""Parents before children, like ``PLATFORM_TABLES``, but in the order the generators depend on each other."""


def scaled_counts(scale: float, users: int | None = None) -> dict[str, int]:
    """Rows per table for ``scale``: never zero, and every user owns at least one environment."""
    if scale <= 0:
        raise TestDataError(f"scale must be positive, got {scale}")
    counts = {name: max(1, round(base * scale)) for name, base in BASE_COUNTS.items()}
    counts["users"] = users if users is not None else max(2, counts["users"])
    if counts["users"] < 1:
        raise TestDataError(f"users must be at least 1, got {users}")
    counts["environments"] = max(counts["environments"], counts["users"])
    return counts


# --- generation -----------------------------------------------------------------------------------------


def _to_dt(us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=us)


def _weighted(rng: _Rng, options: Sequence[tuple[str, float]], n: int) -> list[str]:
    names = [name for name, _ in options]
    weights = np.array([w for _, w in options], dtype=np.float64)
    picks = rng.np.choice(len(names), size=n, p=weights / weights.sum())
    return [names[i] for i in picks.tolist()]


def _uuids(rng: _Rng, n: int) -> list[uuid.UUID]:
    raw = rng.bytes(16 * n)
    return [uuid.UUID(bytes=raw[i * 16 : (i + 1) * 16], version=4) for i in range(n)]


def _hex_ids(rng: _Rng, n: int, chars: int) -> list[str]:
    raw = rng.bytes(n * chars // 2).hex()
    return [raw[i * chars : (i + 1) * chars] for i in range(n)]


class _Rng:
    """A numpy ``Generator`` plus a pooled fast path for scalar draws.

    Row loops need a handful of scalar choices per row; numpy's per-call overhead on scalar draws is a few
    microseconds, which at benchmark scale made Python generation the bottleneck. Scalars here are carved
    out of blocks of uniforms drawn in bulk, still fully determined by the seed. ``np`` is the underlying
    generator for array draws.
    """

    POOL = 1 << 16

    def __init__(self, generator: np.random.Generator) -> None:
        self.np = generator
        self._pool: list[float] = []
        self._next = 0

    def u(self) -> float:
        """Uniform in [0, 1)."""
        if self._next >= len(self._pool):
            self._pool = self.np.random(self.POOL).tolist()
            self._next = 0
        value = self._pool[self._next]
        self._next += 1
        return value

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi)."""
        return lo + int(self.u() * (hi - lo))

    def ints(self, lo: int, hi: int, k: int) -> list[int]:
        return [lo + int(self.u() * (hi - lo)) for _ in range(k)]

    def pick(self, options: Sequence[Any]) -> Any:
        return options[int(self.u() * len(options))]

    def bytes(self, n: int) -> bytes:
        return self.np.bytes(n)


@dataclass
class _Parents:
    """What children need to know about generated parent rows: ids, owners and timing."""

    ids: list[uuid.UUID]
    user: list[int]
    created_us: list[int]
    extra: dict[str, list[Any]] = field(default_factory=dict)


class _Generator:
    """Builds the rows of one dataset; one instance per ``seed()`` call, tables generated in FK order."""

    def __init__(
        self, seed: int, scale: float, counts: dict[str, int], user_ids: list[uuid.UUID], anchor: dt.datetime
    ) -> None:
        self.seed = seed
        self.scale = scale
        self.counts = counts
        self.user_ids = user_ids
        self.anchor_us = (anchor - EPOCH) // dt.timedelta(microseconds=1)
        self.parents: dict[str, _Parents] = {}
        centroid_rng = self.rng("topic-centroids")
        centroids = centroid_rng.np.standard_normal((N_TOPICS, EMBEDDING_DIMENSIONS))
        self.centroids = (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).astype(np.float32)
        paragraph_rng = self.rng("paragraphs")
        self.paragraphs = [self._sentence(paragraph_rng, 25, 90) for _ in range(256)]
        # Owner skew: a few heavy users, a long tail, as on a real multi-tenant platform.
        weights = 1.0 / np.arange(1, len(user_ids) + 1) ** 0.6
        self.user_weights = weights / weights.sum()

    def rng(self, stream: str) -> _Rng:
        """An independent random stream per purpose, so generators do not perturb each other."""
        key = int.from_bytes(hashlib.blake2b(stream.encode(), digest_size=8).digest(), "big")
        return _Rng(np.random.default_rng([self.seed, key]))

    # -- small building blocks --

    def _sentence(self, rng: _Rng, lo: int, hi: int) -> str:
        n = rng.randint(lo, hi + 1)
        words = [WORDS[i] for i in rng.ints(0, len(WORDS), n)]
        return " ".join(words).capitalize() + "."

    def _text(self, rng: _Rng, paragraphs: int, unicode_p: float = 0.1) -> str:
        parts = [self.paragraphs[i] for i in rng.ints(0, len(self.paragraphs), paragraphs)]
        if rng.u() < unicode_p:
            parts.insert(rng.randint(0, len(parts) + 1), UNICODE_SNIPPETS[rng.randint(0, len(UNICODE_SNIPPETS))])
        return " ".join(parts)

    def _times(self, rng: _Rng, n: int, *, days: int = HISTORY_DAYS) -> IntArray:
        return self.anchor_us - rng.np.integers(0, days * US_PER_DAY, size=n, dtype=np.int64)

    def _owners(self, rng: _Rng, n: int) -> list[int]:
        picks = rng.np.choice(len(self.user_ids), size=n, p=self.user_weights)
        return [int(u) for u in picks.tolist()]

    def _embeddings(self, rng: _Rng, topics: Sequence[int], null_p: float) -> Iterator[Float32Array | None]:
        """Unit vectors clustered around topic centroids, so nearest-neighbour search finds the topic."""
        for start in range(0, len(topics), EMBEDDING_BATCH):
            batch = np.asarray(topics[start : start + EMBEDDING_BATCH], dtype=np.int64)
            noise = rng.np.standard_normal((len(batch), EMBEDDING_DIMENSIONS), dtype=np.float32)
            spread = rng.np.uniform(0.6, 1.2, size=(len(batch), 1)).astype(np.float32)
            vectors = self.centroids[batch] + noise * (spread / np.float32(np.sqrt(EMBEDDING_DIMENSIONS)))
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            nulls = rng.np.random(len(batch)) < null_p
            for vector, is_null in zip(vectors, nulls.tolist(), strict=True):
                yield None if is_null else vector

    def _pick_owned(self, rng: _Rng, owners: Sequence[int], table: str, null_p: float) -> list[int]:
        """For each owner, one of *their* rows in ``table`` (or -1 for NULL): keeps user_id consistent."""
        by_user: dict[int, list[int]] = {}
        for index, user in enumerate(self.parents[table].user):
            by_user.setdefault(user, []).append(index)
        draws = rng.np.random(len(owners)).tolist()
        nulls = (rng.np.random(len(owners)) < null_p).tolist()
        picked: list[int] = []
        for owner, draw, is_null in zip(owners, draws, nulls, strict=True):
            candidates = by_user.get(owner)
            picked.append(-1 if is_null or not candidates else candidates[int(draw * len(candidates))])
        return picked

    # -- tables --

    def environments(self) -> Iterator[tuple[Any, ...]]:
        rng = self.rng("environments")
        n = self.counts["environments"]
        n_users = len(self.user_ids)
        owners = list(range(n_users)) + self._owners(rng, n - n_users)
        ids = _uuids(rng, n)
        created = self._times(rng, n).tolist()
        statuses = _weighted(rng, ENV_STATUSES, n)
        self.parents["environments"] = _Parents(ids, owners, created)
        orgs = ("acme", "globex", "initech", "umbrella-labs", "stark_ind", "wayne.ent")
        repos = ("agent-runtime", "web-app", "data-pipeline", "infra", "docs", "ml-evals", "billing-svc")
        for i in range(n):
            topic = TOPICS[rng.randint(0, N_TOPICS)]
            has_repo = rng.u() >= 0.15
            updated = created[i] + rng.randint(0, max(1, self.anchor_us - created[i]))
            settings = {
                "runtime": {
                    "image": str(rng.pick(["python:3.12-slim", "node:22-alpine", "ubuntu:24.04"])),
                    "cpu": int(rng.pick([1, 2, 4, 8])),
                    "memory_mb": int(rng.pick([1024, 2048, 4096, 8192])),
                    "env": {"LOG_LEVEL": str(rng.pick(["debug", "info", "warning"])), "REGION": "eu-west-1"},
                },
                "agents": {
                    "max_concurrency": rng.randint(1, 17),
                    "allowed_tools": sorted({TOOLS[k] for k in rng.ints(0, len(TOOLS), 4)}),
                    "default_model": MODELS[rng.randint(0, len(MODELS))],
                },
                "timeouts": {"step_seconds": rng.randint(30, 901), "run_minutes": rng.randint(5, 121)},
                "notifications": None if rng.u() < 0.5 else {"slack_channel": f"#{topic[0]}-agents"},
            }
            yield (
                ids[i],
                self.user_ids[owners[i]],
                f"{topic[0]}-{repos[i % len(repos)]}-{i}",
                None if rng.u() < 0.2 else self._text(rng, 1),
                f"{orgs[i % len(orgs)]}/{repos[rng.randint(0, len(repos))]}" if has_repo else None,
                str(rng.pick(["main", "develop", f"feature/{topic[0]}-{i}"])),
                rng.randint(10_000_000, 99_999_999) if has_repo else None,
                settings,
                statuses[i],
                _to_dt(created[i]),
                _to_dt(updated),
            )

    def workflows(self) -> Iterator[tuple[Any, ...]]:
        rng = self.rng("workflows")
        n = self.counts["workflows"]
        owners = self._owners(rng, n)
        envs = self._pick_owned(rng, owners, "environments", 0.1)
        ids = _uuids(rng, n)
        created = self._times(rng, n).tolist()
        env_ids = self.parents["environments"].ids
        steps_per: list[list[str]] = []
        for _ in range(n):
            k = rng.randint(2, 9)
            steps = [f"step_{j}_{AGENT_NAMES[rng.randint(0, len(AGENT_NAMES))]}" for j in range(k)]
            steps_per.append(steps)
        self.parents["workflows"] = _Parents(ids, owners, created, {"steps": steps_per})
        names = (
            "triage-issues",
            "nightly-report",
            "pr-review",
            "release-notes",
            "backfill-embeddings",
            "cost-digest",
            "incident-summary",
        )
        for i in range(n):
            steps = steps_per[i]
            definition = {
                "schema": "pgferry.workflow/v1",
                "steps": [
                    {
                        "id": step,
                        "agent": step.split("_", 2)[2],
                        "tools": sorted({TOOLS[k] for k in rng.ints(0, len(TOOLS), 2)}),
                        "retry": {"max_attempts": rng.randint(1, 5), "backoff_s": rng.pick([0.5, 1.0, 2.0])},
                        "next": steps[j + 1 : j + 2],
                    }
                    for j, step in enumerate(steps)
                ],
                "schedule": None if rng.u() < 0.5 else f"{rng.randint(0, 60)} {rng.randint(0, 24)} * * *",
                "inputs_schema": {"type": "object", "properties": {"repository": {"type": "string"}}},
            }
            updated = created[i] + rng.randint(0, max(1, self.anchor_us - created[i]))
            yield (
                ids[i],
                self.user_ids[owners[i]],
                env_ids[envs[i]] if envs[i] >= 0 else None,
                f"{names[i % len(names)]}-{i}",
                None if rng.u() < 0.3 else self._text(rng, 1),
                definition,
                rng.randint(1, 4),
                bool(rng.u() < 0.85),
                _to_dt(created[i]),
                _to_dt(updated),
            )

    def tasks(self) -> Iterator[tuple[Any, ...]]:
        rng = self.rng("tasks")
        emb_rng = self.rng("tasks-embeddings")
        n = self.counts["tasks"]
        owners = self._owners(rng, n)
        envs = self._pick_owned(rng, owners, "environments", 0.1)
        ids = _uuids(rng, n)
        created = self._times(rng, n).tolist()
        topics = rng.np.integers(0, N_TOPICS, size=n).tolist()
        statuses = _weighted(rng, TASK_STATUSES, n)
        self.parents["tasks"] = _Parents(ids, owners, created, {"env": envs})
        env_ids = self.parents["environments"].ids
        embeddings = self._embeddings(emb_rng, topics, null_p=0.08)
        for i in range(n):
            name, verbs, objects, topic_tags = TOPICS[topics[i]]
            title = f"{rng.pick(verbs).capitalize()} {rng.pick(objects)}"
            n_tags = rng.randint(0, 5)
            tags = list(dict.fromkeys(topic_tags[k] for k in rng.ints(0, len(topic_tags), min(n_tags, 3))))
            if n_tags > 3:
                tags.append(GENERIC_TAGS[rng.randint(0, len(GENERIC_TAGS))])
            completed = (
                created[i] + rng.randint(10 * 60 * US_PER_SECOND, 14 * US_PER_DAY)
                if statuses[i] == "completed"
                else None
            )
            due = None if rng.u() < 0.6 else created[i] + rng.randint(US_PER_DAY, 30 * US_PER_DAY)
            updated = max(created[i], completed or 0) + rng.randint(0, 3600 * US_PER_SECOND)
            metadata: dict[str, Any] = {
                "source": str(rng.pick(["api", "slack", "github", "cli", "web"])),
                "topic": name,
                "estimate": {"points": int(rng.pick([1, 2, 3, 5, 8, 13])), "confidence": round(rng.u(), 3)},
            }
            if rng.u() < 0.3:
                issue = rng.randint(1, 5000)
                metadata["links"] = [{"kind": "issue", "url": f"https://github.com/acme/app/issues/{issue}"}]
            if rng.u() < 0.05:
                metadata["note"] = UNICODE_SNIPPETS[rng.randint(0, len(UNICODE_SNIPPETS))]
            yield (
                ids[i],
                self.user_ids[owners[i]],
                env_ids[envs[i]] if envs[i] >= 0 else None,
                title,
                None if rng.u() < 0.25 else self._text(rng, rng.randint(1, 4)),
                statuses[i],
                rng.randint(0, 5),
                tags,
                metadata,
                next(embeddings),
                None if due is None else _to_dt(due),
                None if completed is None else _to_dt(completed),
                _to_dt(created[i]),
                _to_dt(updated),
            )

    def agent_executions(self) -> Iterator[tuple[Any, ...]]:
        rng = self.rng("agent_executions")
        n = self.counts["agent_executions"]
        tasks = self.parents["tasks"]
        n_tasks = len(tasks.ids)
        task_idx = rng.np.integers(0, n_tasks, size=n).tolist()
        no_task = (rng.np.random(n) < 0.05).tolist()
        free_owners = self._owners(rng, n)
        owners = [free_owners[i] if no_task[i] else tasks.user[task_idx[i]] for i in range(n)]
        free_envs = self._pick_owned(rng, owners, "environments", 0.3)
        ids = _uuids(rng, n)
        statuses = _weighted(rng, EXEC_STATUSES, n)
        random_created = self._times(rng, n).tolist()
        lag = rng.np.integers(0, 2 * US_PER_DAY, size=n).tolist()
        created = [
            random_created[i] if no_task[i] else min(tasks.created_us[task_idx[i]] + lag[i], self.anchor_us)
            for i in range(n)
        ]
        started: list[int | None] = []
        completed: list[int | None] = []
        trace_ids = _hex_ids(rng, n, 32)
        for i in range(n):
            if statuses[i] == "queued":
                started.append(None)
                completed.append(None)
                continue
            start = created[i] + rng.randint(0, 5 * US_PER_SECOND)
            started.append(start)
            terminal = statuses[i] != "running"
            completed.append(start + int(rng.np.lognormal(16.5, 1.2)) if terminal else None)
        self.parents["agent_executions"] = _Parents(
            ids, owners, created, {"started": started, "completed": completed, "trace": trace_ids}
        )
        task_ids, env_ids = tasks.ids, self.parents["environments"].ids
        for i in range(n):
            status = statuses[i]
            model = None if rng.u() < 0.08 else MODELS[rng.randint(0, len(MODELS))]
            agent = AGENT_NAMES[rng.randint(0, len(AGENT_NAMES))]
            if no_task[i]:
                task_id, env = None, free_envs[i]
            else:
                task_id, env = task_ids[task_idx[i]], tasks.extra["env"][task_idx[i]]
            prompt_tokens = 0 if status == "queued" else rng.randint(200, 60_000)
            completion_tokens = 0 if status in ("queued", "running") else rng.randint(20, 8_000)
            price_in, price_out = PRICES_PER_MTOKEN.get(model or "gpt-4o-mini", (0.15, 0.6))
            cost_micro = round(prompt_tokens * price_in + completion_tokens * price_out)
            inputs = {
                "prompt": self._text(rng, rng.randint(1, 4), unicode_p=0.05),
                "tools": sorted({TOOLS[k] for k in rng.ints(0, len(TOOLS), 3)}),
                "params": {
                    "temperature": float(rng.pick([0.0, 0.2, 0.7, 1.0])),
                    "max_tokens": int(rng.pick([1024, 4096, 8192])),
                },
                "context": {"attempt": rng.randint(1, 4), "parent_run": None},
            }
            outputs: dict[str, Any] | None = None
            error: str | None = None
            if status == "succeeded":
                outputs = {
                    "result": self._text(rng, rng.randint(1, 5), unicode_p=0.1),
                    "artifacts": [
                        {"path": f"src/module_{rng.randint(0, 99)}.py", "sha256": rng.bytes(32).hex()}
                        for _ in range(rng.randint(0, 4))
                    ],
                    "finish_reason": "stop",
                }
            elif status in ("failed", "timeout"):
                error = (
                    f"{status}: {UNICODE_SNIPPETS[rng.randint(0, len(UNICODE_SNIPPETS))]}"
                    if rng.u() < 0.2
                    else f"{status}: tool {TOOLS[rng.randint(0, len(TOOLS))]} exited with code {rng.randint(1, 255)}"
                )
                if rng.u() < 0.3:
                    outputs = {"partial": True, "steps_completed": rng.randint(0, 6)}
            start, end = started[i], completed[i]
            duration = None if start is None or end is None else (end - start) // 1000
            updated = max(created[i], end or start or 0)
            yield (
                ids[i],
                self.user_ids[owners[i]],
                task_id,
                env_ids[env] if env >= 0 else None,
                agent,
                model,
                status,
                inputs,
                outputs,
                error,
                None if start is None else _to_dt(start),
                None if end is None else _to_dt(end),
                duration,
                prompt_tokens,
                completion_tokens,
                prompt_tokens + completion_tokens,
                Decimal(cost_micro).scaleb(-6),
                _to_dt(created[i]),
                _to_dt(updated),
            )

    def observability_events(self) -> Iterator[tuple[Any, ...]]:
        rng = self.rng("observability_events")
        n = self.counts["observability_events"]
        execs = self.parents["agent_executions"]
        exec_idx = rng.np.integers(0, len(execs.ids), size=n).tolist()
        orphan = (rng.np.random(n) < 0.08).tolist()
        free_owners = self._owners(rng, n)
        free_times = self._times(rng, n).tolist()
        offsets = rng.np.integers(0, 120 * US_PER_SECOND, size=n).tolist()
        occurred: list[int] = []
        for i in range(n):
            if orphan[i]:
                occurred.append(free_times[i])
            else:
                e = exec_idx[i]
                base = execs.extra["started"][e] or execs.created_us[e]
                end = execs.extra["completed"][e]
                span = (end - base) if end is not None else 120 * US_PER_SECOND
                occurred.append(base + offsets[i] % max(1, span))
        order = np.argsort(np.asarray(occurred, dtype=np.int64), kind="stable").tolist()
        weights = np.asarray(EVENT_WEIGHTS) / sum(EVENT_WEIGHTS)
        types = rng.np.choice(len(EVENT_TYPES), size=n, p=weights).tolist()
        span_ids = _hex_ids(rng, n, 16)
        parent_spans = _hex_ids(rng, n, 16)
        orphan_traces = _hex_ids(rng, n, 32)
        # Per-row choices drawn as whole arrays up front: this is the largest table, and scalar draws in
        # the row loop would make generation, not the server, the bottleneck of a benchmark seed.
        severity = rng.np.choice(3, size=n, p=[0.15, 0.75, 0.10]).tolist()
        uniform = rng.np.random((n, 5)).tolist()
        picks = rng.np.integers(0, 1 << 30, size=(n, 4)).tolist()
        latency = rng.np.gamma(2, 400, size=n).tolist()
        ingest_lag = rng.np.integers(0, 2 * US_PER_SECOND, size=n).tolist()
        word_idx = rng.np.integers(0, len(WORDS), size=(n, 12)).tolist()
        for serial, i in enumerate(order, start=1):
            event_type = EVENT_TYPES[types[i]]
            u, k = uniform[i], picks[i]
            sev = SEVERITIES[3 + int(u[0] < 0.15)] if event_type == "error" else SEVERITIES[severity[i]]
            if orphan[i]:
                owner, exec_id = free_owners[i], None
                trace = None if u[1] < 0.5 else orphan_traces[i]
            else:
                owner, exec_id = execs.user[exec_idx[i]], execs.ids[exec_idx[i]]
                trace = execs.extra["trace"][exec_idx[i]]
            data: dict[str, Any] = {"seq": serial}
            if event_type.startswith("llm."):
                data.update(
                    {
                        "model": MODELS[k[0] % len(MODELS)],
                        "tokens": 10 + k[1] % 4000,
                        "latency_ms": round(latency[i], 2),
                    }
                )
            elif event_type.startswith("tool."):
                data.update(
                    {
                        "tool": TOOLS[k[0] % len(TOOLS)],
                        "ok": u[2] < 0.9,
                        "args": {"path": f"/workspace/{WORDS[k[1] % len(WORDS)]}.txt"},
                    }
                )
            elif event_type == "error":
                stack = [f"frame_{j}" for j in range(1 + k[1] % 5)]
                data.update({"exception": "TimeoutError", "stack": stack})
            if u[3] < 0.1:
                message = f"{event_type}: {UNICODE_SNIPPETS[k[2] % len(UNICODE_SNIPPETS)]}"
            else:
                words = word_idx[i][: 3 + k[3] % 10]
                message = f"{event_type} " + " ".join(WORDS[w] for w in words)
            yield (
                serial,
                self.user_ids[owner],
                exec_id,
                event_type,
                sev,
                message,
                data,
                trace,
                span_ids[i],
                None if u[4] < 0.4 else parent_spans[i],
                _to_dt(occurred[i]),
                _to_dt(occurred[i] + ingest_lag[i]),
            )

    def agent_memory(self) -> Iterator[tuple[Any, ...]]:
        rng = self.rng("agent_memory")
        emb_rng = self.rng("agent_memory-embeddings")
        n = self.counts["agent_memory"]
        owners = self._owners(rng, n)
        ids = _uuids(rng, n)
        created = self._times(rng, n).tolist()
        topics = rng.np.integers(0, N_TOPICS, size=n).tolist()
        types = _weighted(rng, MEMORY_TYPES, n)
        importance = rng.np.beta(2, 5, size=n).tolist()
        access = rng.np.poisson(3, size=n).tolist()
        embeddings = self._embeddings(emb_rng, topics, null_p=0.05)
        for i in range(n):
            last_access = None if access[i] == 0 else created[i] + rng.randint(0, max(1, self.anchor_us - created[i]))
            expires = None if rng.u() < 0.7 else self.anchor_us + rng.randint(-10 * US_PER_DAY, 60 * US_PER_DAY)
            metadata: dict[str, Any] = {
                "topic": TOPICS[topics[i]][0],
                "source": str(rng.pick(["conversation", "tool_result", "reflection", "user_feedback"])),
            }
            if rng.u() < 0.4:
                metadata["keywords"] = sorted({WORDS[k] for k in rng.ints(0, len(WORDS), 4)})
            yield (
                ids[i],
                self.user_ids[owners[i]],
                AGENT_NAMES[rng.randint(0, len(AGENT_NAMES))],
                types[i],
                self._text(rng, rng.randint(1, 3), unicode_p=0.12),
                metadata,
                float(importance[i]),
                next(embeddings),
                int(access[i]),
                None if last_access is None else _to_dt(last_access),
                None if expires is None else _to_dt(expires),
                _to_dt(created[i]),
                _to_dt(max(created[i], last_access or 0)),
            )

    def workflow_executions(self) -> Iterator[tuple[Any, ...]]:
        rng = self.rng("workflow_executions")
        n = self.counts["workflow_executions"]
        workflows = self.parents["workflows"]
        wf_idx = rng.np.integers(0, len(workflows.ids), size=n).tolist()
        ids = _uuids(rng, n)
        statuses = _weighted(rng, WF_STATUSES, n)
        triggers = _weighted(rng, WF_TRIGGERS, n)
        for i in range(n):
            w = wf_idx[i]
            steps: list[str] = workflows.extra["steps"][w]
            status = statuses[i]
            created = min(workflows.created_us[w] + rng.randint(0, 30 * US_PER_DAY), self.anchor_us)
            start = None if status == "pending" else created + rng.randint(0, 60 * US_PER_SECOND)
            terminal = status in ("succeeded", "failed", "cancelled")
            end = start + int(rng.np.lognormal(18, 1.0)) if terminal and start is not None else None
            done = len(steps) if status == "succeeded" else rng.randint(0, len(steps))
            step_results = [
                {
                    "step": steps[j],
                    "status": "succeeded",
                    "duration_ms": rng.randint(50, 120_000),
                    "output": {"summary": self._sentence(rng, 4, 14), "items": rng.randint(0, 50)},
                }
                for j in range(0 if start is None else done)
            ]
            current = steps[done] if status in ("running", "paused") and done < len(steps) else None
            yield (
                ids[i],
                self.user_ids[workflows.user[w]],
                workflows.ids[w],
                status,
                triggers[i],
                {
                    "repository": "acme/agent-runtime",
                    "since": _to_dt(created - US_PER_DAY).isoformat(),
                    "options": {"dry_run": bool(rng.u() < 0.2)},
                },
                {"report": self._text(rng, 2, unicode_p=0.1)} if status == "succeeded" else None,
                step_results,
                current,
                f"step {steps[min(done, len(steps) - 1)]} failed: exit status {rng.randint(1, 128)}"
                if status == "failed"
                else None,
                None if start is None else _to_dt(start),
                None if end is None else _to_dt(end),
                _to_dt(created),
                _to_dt(max(created, end or start or 0)),
            )

    def execution_snapshots(self) -> Iterator[tuple[Any, ...]]:
        rng = self.rng("execution_snapshots")
        n = self.counts["execution_snapshots"]
        execs = self.parents["agent_executions"]
        exec_idx = rng.np.integers(0, len(execs.ids), size=n).tolist()
        ids = _uuids(rng, n)
        huge_index = 1 if n > 1 and self.scale >= 1.0 else -1
        sequences: dict[int, int] = {}
        for i in range(n):
            e = exec_idx[i]
            sequence = sequences.get(e, 0)
            sequences[e] = sequence + 1
            large = i == 0 or rng.u() < 0.08
            huge = i == huge_index
            target = (
                1_200_000
                if huge
                else rng.randint(LARGE_STATE_MIN_BYTES, 400_000)
                if large
                else rng.randint(4_000, 40_000)
            )
            state = self._snapshot_state(rng, sequence, target)
            if huge:
                blob: bytes | None = rng.bytes(HUGE_SNAPSHOT_BLOB_BYTES)
            elif rng.u() < 0.4:
                blob = None
            else:
                blob = rng.bytes(int(min(rng.np.lognormal(10.3, 0.9), 600_000)))
            state_bytes = len(json.dumps(state).encode())
            base = execs.extra["started"][e] or execs.created_us[e]
            created = base + sequence * rng.randint(US_PER_SECOND, 60 * US_PER_SECOND)
            yield (
                ids[i],
                self.user_ids[execs.user[e]],
                execs.ids[e],
                sequence,
                None if rng.u() < 0.3 else f"checkpoint after step {sequence}",
                state,
                blob,
                state_bytes + (len(blob) if blob is not None else 0),
                _to_dt(created),
                _to_dt(created + rng.randint(0, 5 * US_PER_SECOND)),
            )

    def _snapshot_state(self, rng: _Rng, sequence: int, target_bytes: int) -> dict[str, Any]:
        """Agent state the way runtimes checkpoint it: conversation, tool cache, an opaque packed context."""
        messages: list[dict[str, Any]] = []
        size = 0
        budget = target_bytes * 2 // 3
        roles = ("system", "user", "assistant", "tool")
        while size < budget:
            content = self._text(rng, rng.randint(1, 6), unicode_p=0.05)
            messages.append({"role": roles[len(messages) % 4], "content": content, "tokens": len(content) // 4})
            size += len(content) + 40
        packed = base64.b64encode(rng.bytes(max(0, target_bytes - size) * 3 // 4)).decode()
        return {
            "version": 3,
            "sequence": sequence,
            "messages": messages,
            "tool_cache": {
                TOOLS[k]: {"hits": rng.randint(0, 100), "last": self._sentence(rng, 3, 8)}
                for k in sorted(set(rng.ints(0, len(TOOLS), 3)))
            },
            "scores": [round(float(x), 6) for x in rng.np.random(32).tolist()],
            "packed_context": packed,
        }


# --- the manager ----------------------------------------------------------------------------------------


class TestDataManager:
    """Seeds, compares and clears the platform tables of one database for tests and benchmarks."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, conninfo: str, *, seed: int = 42, anchor: dt.datetime = DEFAULT_ANCHOR) -> None:
        self.conninfo = conninfo
        self.seed_value = seed
        self.anchor = anchor
        self._seeded_users: int | None = None

    # -- identities --

    def user_ids(self, n: int) -> list[uuid.UUID]:
        """Stable per (seed, index), and ``user_ids(3)`` is a prefix of ``user_ids(10)``: tests name users."""
        return [uuid.uuid5(USER_NAMESPACE, f"{self.seed_value}:{i}") for i in range(n)]

    @staticmethod
    def user_email(index: int) -> str:
        return f"user{index}@example.test"

    # -- schema and data --

    def create_environment(self) -> None:
        """Make sure the platform tables exist, without touching a schema someone else already created."""
        if not neon_schema_exists(self.conninfo):
            create_neon_schema(self.conninfo)

    def seed(self, scale: float = 1.0, *, users: int | None = None) -> SeedReport:
        """Load ``scale`` x ``BASE_COUNTS`` rows into the empty platform tables, in one transaction.

        Refuses non-empty tables rather than appending: the same seed produces the same primary keys, and a
        half-appended dataset would make every later comparison meaningless.
        """
        counts = scaled_counts(scale, users)
        generator = _Generator(self.seed_value, scale, counts, self.user_ids(counts["users"]), self.anchor)
        rows: dict[str, int] = {}
        started = time.perf_counter()
        with connect(self.conninfo, application_name="pgferry-sampledata", autocommit=False) as conn:
            nonempty = [t for t in PLATFORM_TABLES if _has_rows(conn, t)]
            if nonempty:
                raise TestDataError(f"tables already hold rows ({', '.join(nonempty)}); call cleanup() before seed()")
            vector_oid = _register_vector(conn)
            for table in GENERATION_ORDER:
                rows[table] = _copy_rows(conn, table, getattr(generator, table)(), vector_oid)
            conn.execute(
                "select setval(pg_get_serial_sequence('public.observability_events', 'id'),"
                " coalesce(max(id), 1), max(id) is not null) from public.observability_events"
            )
            conn.commit()
            duration = time.perf_counter() - started
            total_bytes = _total_bytes(conn, PLATFORM_TABLES)
        self._seeded_users = counts["users"]
        return SeedReport(
            rows={t: rows[t] for t in PLATFORM_TABLES},
            total_bytes=total_bytes,
            duration_seconds=duration,
            users=counts["users"],
        )

    def insert_users_into_auth(self) -> None:
        """Create the seeded users in Supabase Auth, so RLS-scoped reads have real accounts to act as.

        A no-op on databases without ``auth.users`` (Neon), so callers need not know which side they hold.
        """
        with connect(self.conninfo, application_name="pgferry-sampledata", autocommit=False) as conn:
            exists = conn.execute("select to_regclass('auth.users') is not null").fetchone()
            if exists is None or not exists[0]:
                return
            n = self._seeded_users
            if n is None:
                # Every seeded user owns at least one environment, and ids are prefix-stable.
                row = conn.execute("select count(distinct user_id) from public.environments").fetchone()
                n = int(row[0]) if row is not None else 0
            created = self.anchor - dt.timedelta(days=HISTORY_DAYS + 60)
            with conn.cursor() as cur:
                cur.executemany(
                    "insert into auth.users (instance_id, id, email, aud, role, created_at, updated_at)"
                    " values ('00000000-0000-0000-0000-000000000000', %s, %s, 'authenticated',"
                    " 'authenticated', %s, %s) on conflict (id) do nothing",
                    [
                        (uid, self.user_email(i), created + dt.timedelta(hours=i), created + dt.timedelta(hours=i))
                        for i, uid in enumerate(self.user_ids(n))
                    ],
                )

    def cleanup(self) -> None:
        """Empty every platform table and reset the event id sequence, so the next seed is byte-identical."""
        with connect(self.conninfo, application_name="pgferry-sampledata", autocommit=False) as conn:
            conn.execute(
                sql.SQL("truncate table {} restart identity cascade").format(
                    sql.SQL(", ").join(sql.Identifier("public", t) for t in PLATFORM_TABLES)
                )
            )

    def compare_with(self, other_conninfo: str) -> DatasetComparison:
        """Checksum every platform table here and in ``other_conninfo`` with the verifier's own mechanism."""
        with (
            connect(self.conninfo, application_name="pgferry-sampledata", autocommit=False) as mine,
            connect(other_conninfo, application_name="pgferry-sampledata", autocommit=False) as theirs,
        ):
            return DatasetComparison(tables=compare_tables(mine, theirs, PLATFORM_TABLES))


# --- loading --------------------------------------------------------------------------------------------


def _has_rows(conn: psycopg.Connection[Any], table: str) -> bool:
    row = conn.execute(sql.SQL("select exists (select 1 from {})").format(sql.Identifier("public", table))).fetchone()
    return bool(row and row[0])


def _register_vector(conn: psycopg.Connection[Any]) -> int:
    """pgvector's binary dumper on this connection, wherever the extension lives (``public`` on Neon,
    ``extensions`` on Supabase), without relying on the search path."""
    row = conn.execute(
        "select n.nspname from pg_catalog.pg_extension e"
        " join pg_catalog.pg_namespace n on n.oid = e.extnamespace where e.extname = 'vector'"
    ).fetchone()
    if row is None:
        raise TestDataError("the vector extension is not installed; run create_environment() first")
    info = TypeInfo.fetch(conn, sql.Identifier(str(row[0]), "vector"))
    if info is None:
        raise TestDataError(f"type {row[0]}.vector not found")
    register_vector_info(conn, info)
    return int(info.oid)


def _copy_rows(conn: psycopg.Connection[Any], table: str, rows: Iterable[tuple[Any, ...]], vector_oid: int) -> int:
    layout = COLUMNS[table]
    statement = sql.SQL("copy {} ({}) from stdin (format binary)").format(
        sql.Identifier("public", table), sql.SQL(", ").join(sql.Identifier(name) for name, _ in layout)
    )
    types: list[int | str] = [vector_oid if kind == "vector" else kind for _, kind in layout]
    count = 0
    with conn.cursor() as cur, cur.copy(statement, writer=QueuedLibpqWriter(cur)) as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


def _total_bytes(conn: psycopg.Connection[Any], tables: Sequence[str]) -> int:
    row = conn.execute(
        "select coalesce(sum(pg_total_relation_size(format('public.%%I', t)::regclass)), 0)::int8"
        " from unnest(%s::text[]) as t",
        (list(tables),),
    ).fetchone()
    return int(row[0]) if row is not None else 0
