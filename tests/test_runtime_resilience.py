"""Resilience against a real outage: the PostgreSQL server is stopped in the middle of a stream of writes.

The test owns its server (so stopping it disturbs no other test): a cluster with the Supabase baseline and the
platform migrations, stopped with ``pg_ctl -m immediate`` (as a crash or failover would) while writes keep coming,
then started again. The oracle is the database itself afterwards: every write's row exists exactly once, and a log
row that every write appended its number to reads 0, 1, 2, … in order, without gaps or repeats.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from pgferry.db.retry import RetryPolicy
from pgferry.localstack.cluster import ClusterSettings, PostgresCluster, free_port, service_user
from pgferry.localstack.stack import prepare_target_database
from pgferry.runtime.client import create_database_client
from pgferry.runtime.errors import DatabaseUnavailableError, RuntimeSchemaError
from pgferry.runtime.queue import Operation
from pgferry.runtime.resilience import ResilientDatabase, WriteOutcome, health_check
from pgferry.testing.servers import ServerPair
from tests.runtime_helpers import settings_for, token_for

ALICE = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
BOB = uuid.UUID("00000000-0000-4000-8000-0000000000b2")
FAST = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.3, deadline=2.0)

INSERT = "insert into public.tasks (user_id, title) values (%(user)s, %(title)s)"
APPEND = "update public.tasks set description = description || %(n)s || ',' where id = %(log)s"


@pytest.fixture
def own_server(server_pair: ServerPair) -> Iterator[PostgresCluster]:
    root = Path(tempfile.mkdtemp(prefix="pgferry-outage-"))
    root.chmod(0o755)
    cluster = PostgresCluster(server_pair.install, root / "db", user=service_user())
    # Not ``fast``: with synchronous_commit off a commit is acknowledged before its WAL is written, and an immediate
    # stop loses it for real (the first version of this test found exactly that). fsync off is harmless here: the
    # server stops, the machine does not, so what was written to the OS survives.
    cluster.init(ClusterSettings(port=free_port(), shared_buffers="32MB"))
    with (cluster.datadir / "postgresql.conf").open("a") as conf:
        conf.write("fsync = off\n")
    cluster.start()
    prepare_target_database(cluster.url())
    yield cluster
    cluster.destroy()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def log_row(own_server: PostgresCluster) -> uuid.UUID:
    with psycopg.connect(own_server.url(), autocommit=True) as conn:
        row = conn.execute(
            "insert into public.tasks (user_id, title, description) values (%s, 'log', '') returning id", (ALICE,)
        ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def test_writes_through_a_server_stop_apply_once_and_in_order(
    own_server: PostgresCluster, log_row: uuid.UUID, tmp_path: Path
) -> None:
    total, stop_at, start_at = 150, 40, 100
    outcomes: list[WriteOutcome] = []
    stopped, started = threading.Event(), threading.Event()
    issued = 0

    def operator() -> None:  # stops the server while writes are in flight, later starts it again
        while issued < stop_at:
            time.sleep(0.001)
        own_server.stop(mode="immediate")
        stopped.set()
        while issued < start_at:
            time.sleep(0.001)
        own_server.start()
        started.set()

    with create_database_client(settings_for(own_server.url()), max_size=2, timeout=5) as client:
        db = ResilientDatabase(client, tmp_path / "state", write_policy=FAST, read_policy=FAST)
        alice = client.verify(token_for(ALICE))
        thread = threading.Thread(target=operator)
        thread.start()
        for n in range(total):
            issued = n
            outcomes.append(db.write(alice, Operation(INSERT, {"user": ALICE, "title": f"w{n}"})))
            outcomes.append(db.write(alice, Operation(APPEND, {"n": str(n), "log": log_row})))
        thread.join()
        assert stopped.is_set() and started.is_set()
        assert WriteOutcome.QUEUED in outcomes and WriteOutcome.APPLIED in outcomes  # the outage really happened
        assert db.queue.depth() > 0
        deadline = time.monotonic() + 60
        while db.queue.depth() and time.monotonic() < deadline:
            report = db.sync_queued_operations(batch_size=64)
            if report.remaining:
                time.sleep(0.2)
        assert db.queue.depth() == 0
        assert db.queue.dead_letters() == []
        assert health_check(client).ok
        db.close()

    with psycopg.connect(own_server.url(), autocommit=True) as conn:
        titles = conn.execute(
            "select title, count(*) from public.tasks where title like 'w%%' group by title"
        ).fetchall()
        log = conn.execute("select description from public.tasks where id = %s", (log_row,)).fetchone()
        applied = conn.execute("select count(*) from pgferry.applied_operations").fetchone()
    assert sorted(titles) == sorted((f"w{n}", 1) for n in range(total))
    assert log == ("".join(f"{n}," for n in range(total)),)
    assert applied == (2 * total,)


def test_a_lost_acknowledgement_replayed_applies_once(
    own_server: PostgresCluster, log_row: uuid.UUID, tmp_path: Path
) -> None:
    """The same operation (same key) sent again, directly and through the queue, changes nothing."""
    with create_database_client(settings_for(own_server.url())) as client:
        db = ResilientDatabase(client, tmp_path / "state", write_policy=FAST)
        alice = client.verify(token_for(ALICE))
        op = Operation(APPEND, {"n": "7", "log": log_row})
        assert db.write(alice, op) is WriteOutcome.APPLIED
        assert db.write(alice, op) is WriteOutcome.DUPLICATE
        db.queue.put(op, alice.claims)
        report = db.sync_queued_operations()
        assert (report.applied, report.duplicates, report.remaining) == (0, 1, 0)
        db.close()
    with psycopg.connect(own_server.url(), autocommit=True) as conn:
        assert conn.execute("select description from public.tasks where id = %s", (log_row,)).fetchone() == ("7,",)


def test_refused_writes_fail_now_and_queued_ones_go_to_dead_letters(
    own_server: PostgresCluster, log_row: uuid.UUID, tmp_path: Path
) -> None:
    with create_database_client(settings_for(own_server.url())) as client:
        db = ResilientDatabase(client, tmp_path / "state", write_policy=FAST)
        alice = client.verify(token_for(ALICE))
        into_bob = Operation(INSERT, {"user": BOB, "title": "not hers"})
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # RLS, not retryable: raised, not queued
            db.write(alice, into_bob)
        assert db.queue.depth() == 0
        # Accepted during an outage, refused on replay: set aside with the reason; the writes around it apply.
        first, last = Operation(APPEND, {"n": "1", "log": log_row}), Operation(APPEND, {"n": "2", "log": log_row})
        around = (first, into_bob, last)
        for op in around:
            db.queue.put(op, alice.claims)
        report = db.sync_queued_operations()
        assert (report.applied, report.dead_lettered, report.remaining) == (2, 1, 0)
        [(key, error)] = db.queue.dead_letters()
        assert key == into_bob.key and "row-level security" in error
        db.close()
    with psycopg.connect(own_server.url(), autocommit=True) as conn:
        assert conn.execute("select description from public.tasks where id = %s", (log_row,)).fetchone() == ("1,2,",)
        assert conn.execute("select count(*) from public.tasks where title = 'not hers'").fetchone() == (0,)


@pytest.mark.parametrize("endpoint", ["direct", "transaction-pooler"])
def test_replay_in_small_batches_keeps_order_and_values_exactly(
    own_server: PostgresCluster,
    log_row: uuid.UUID,
    tmp_path: Path,
    endpoint: str,
    pgbouncer: Callable[..., str],
) -> None:
    """The replay renders the next batch while the database applies the current one, with values inlined as
    literals (prepared statements where the endpoint keeps sessions). Batches of two, users interleaved, awkward
    text, and an operation missing a parameter in the middle: every other write lands once, in order, byte for
    byte, and the broken one is set aside with the reason."""
    url = own_server.url()
    settings = settings_for(url) if endpoint == "direct" else settings_for(url, supabase_pooler_url=pgbouncer(url))
    titles = ["it's", "back\\slash", "100% %(user)s", "semi; colon -- not a comment", "ünïcödé ✓", "$1 $$"]
    with create_database_client(settings) as client:
        assert client.mode == ("direct" if endpoint == "direct" else "transaction")
        db = ResilientDatabase(client, tmp_path / "state", write_policy=FAST)
        users = {ALICE: client.verify(token_for(ALICE)), BOB: client.verify(token_for(BOB))}
        broken = Operation(APPEND, {"n": "x"})  # no "log": cannot be bound
        for n, title in enumerate(titles):
            owner = ALICE if n % 2 == 0 else BOB
            db.queue.put(Operation(INSERT, {"user": owner, "title": title}), users[owner].claims)
            db.queue.put(Operation(APPEND, {"n": str(n), "log": log_row}), users[ALICE].claims)
            if n == 2:
                db.queue.put(broken, users[ALICE].claims)
        report = db.sync_queued_operations(batch_size=2)
        assert (report.applied, report.dead_lettered, report.remaining) == (2 * len(titles), 1, 0)
        [(key, error)] = db.queue.dead_letters()
        assert key == broken.key and "log" in error
        db.close()
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "select user_id, title from public.tasks where title <> 'log' order by created_at, title"
        ).fetchall()
        assert sorted(rows) == sorted((ALICE if n % 2 == 0 else BOB, t) for n, t in enumerate(titles))
        log = conn.execute("select description from public.tasks where id = %s", (log_row,)).fetchone()
        assert log == ("".join(f"{n}," for n in range(len(titles))),)


def test_a_database_without_the_idempotency_migration_is_one_clear_error(
    own_server: PostgresCluster, tmp_path: Path
) -> None:
    with psycopg.connect(own_server.url(), autocommit=True) as conn:
        conn.execute("drop table pgferry.applied_operations")
    with create_database_client(settings_for(own_server.url())) as client:
        db = ResilientDatabase(client, tmp_path / "state", write_policy=FAST)
        alice = client.verify(token_for(ALICE))
        with pytest.raises(RuntimeSchemaError, match="20261130000300") as raised:
            db.write(alice, Operation(INSERT, {"user": ALICE, "title": "needs the table"}))
        assert "\n" not in str(raised.value) and db.queue.depth() == 0  # not queued behind a broken setup
        db.close()
    with psycopg.connect(own_server.url(), autocommit=True) as conn:
        assert conn.execute("select count(*) from public.tasks where title = 'needs the table'").fetchone() == (0,)
        assert conn.execute("select to_regclass('pgferry.applied_operations')").fetchone() == (None,)  # not created


def test_reads_fall_back_to_that_users_cached_rows_marked_stale(
    own_server: PostgresCluster, log_row: uuid.UUID, tmp_path: Path
) -> None:
    query = "select id, title from public.tasks order by title"
    with create_database_client(settings_for(own_server.url()), timeout=5) as client:
        db = ResilientDatabase(client, tmp_path / "state", read_policy=FAST)
        alice, bob = client.verify(token_for(ALICE)), client.verify(token_for(BOB))
        fresh = db.read(alice, "my-tasks", query)
        assert not fresh.stale and [r["title"] for r in fresh.rows] == ["log"]
        assert db.read(bob, "my-tasks", query).rows == []  # RLS: Bob sees none of Alice's
        own_server.stop(mode="immediate")
        try:
            health = health_check(client, timeout=1)
            assert not health.ok and health.error
            stale = db.read(alice, "my-tasks", query)
            assert stale.stale and stale.as_of <= time.time()
            assert [r["title"] for r in stale.rows] == ["log"] and stale.rows[0]["id"] == str(log_row)
            assert db.read(bob, "my-tasks", query).rows == []  # Bob's own (empty) answer, never Alice's
            with pytest.raises(DatabaseUnavailableError, match="no cached result for 'other'"):
                db.read(alice, "other", query)
        finally:
            own_server.start()
        deadline = time.monotonic() + 30  # the pool reconnects in the background, with backoff and jitter
        while (again := db.read(alice, "my-tasks", query)).stale and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not again.stale
        db.close()


def test_queue_survives_a_restart_of_the_service(
    own_server: PostgresCluster, log_row: uuid.UUID, tmp_path: Path
) -> None:
    """Writes queued by one process are replayed by the next: the queue is on disk, not in memory."""
    state = tmp_path / "state"
    with create_database_client(settings_for(own_server.url())) as client:
        alice = client.verify(token_for(ALICE))
        first = ResilientDatabase(client, state)
        for n in range(5):
            first.queue.put(Operation(APPEND, {"n": str(n), "log": log_row}), alice.claims)
        first.close()
        second = ResilientDatabase(client, state)
        assert second.queue.depth() == 5
        assert second.sync_queued_operations().applied == 5
        second.close()
    assert (state / "queue.sqlite3").stat().st_mode & 0o077 == 0
    with psycopg.connect(own_server.url(), autocommit=True) as conn:
        assert conn.execute("select description from public.tasks where id = %s", (log_row,)).fetchone() == (
            "0,1,2,3,4,",
        )


def test_metrics_show_latency_pool_retries_and_queue(
    own_server: PostgresCluster, log_row: uuid.UUID, tmp_path: Path
) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    with create_database_client(settings_for(own_server.url()), max_size=2, timeout=5) as client:
        db = ResilientDatabase(client, tmp_path / "state", write_policy=FAST)
        alice = client.verify(token_for(ALICE))
        db.write(alice, Operation(APPEND, {"n": "1", "log": log_row}))
        with psycopg.connect(own_server.url(), autocommit=True) as conn:
            conn.execute("select pg_create_logical_replication_slot('metrics_slot', 'pgoutput')")
            conn.execute(
                "insert into public.tasks (user_id, title) select %s, 'wal' from generate_series(1, 500)", (ALICE,)
            )
            assert db.health_check().ok
            conn.execute("select pg_drop_replication_slot('metrics_slot')")
        own_server.stop(mode="immediate")
        try:
            assert db.write(alice, Operation(APPEND, {"n": "2", "log": log_row})) is WriteOutcome.QUEUED
            text = generate_latest(db.metrics.registry).decode()
        finally:
            own_server.start()
        db.close()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("pgferry_runtime_query_seconds_count", (("operation", "write"),))] == 2
    assert samples[("pgferry_runtime_queue_depth", ())] == 1
    assert samples[("pgferry_runtime_queued_writes_total", ())] == 1
    assert sum(v for (name, _labels), v in samples.items() if name == "pgferry_runtime_retries_total") >= 1
    assert {("pgferry_runtime_pool_connections", (("state", s),)) for s in ("in_use", "idle")} <= set(samples)
    assert ("pgferry_runtime_pool_waiting", ()) in samples
    assert samples[("pgferry_runtime_replication_slot_lag_bytes", (("slot", "metrics_slot"),))] > 0
