"""TestDataManager and the server-side checksums it shares with the migration verifier.

The checksum tests matter beyond test data: the verifier trusts ``table_checksum`` to say "identical" only
when rows are identical and to localise a difference to a key range, so both properties are pinned here.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgferry.db.checksum import ChecksumError, TableChecksum, table_checksum
from pgferry.sampledata import BASE_COUNTS, TestDataError, TestDataManager, scaled_counts
from pgferry.schema.models import PLATFORM_TABLES

SCALE = 0.02

# (child table, fk column, parent table): every foreign key of the platform schema.
FOREIGN_KEYS = (
    ("tasks", "environment_id", "environments"),
    ("agent_executions", "task_id", "tasks"),
    ("agent_executions", "environment_id", "environments"),
    ("observability_events", "execution_id", "agent_executions"),
    ("workflows", "environment_id", "environments"),
    ("workflow_executions", "workflow_id", "workflows"),
    ("execution_snapshots", "execution_id", "agent_executions"),
)


def _scalar(conn: psycopg.Connection[Any], query: Any, *params: Any) -> Any:
    row = conn.execute(query, params or None).fetchone()
    assert row is not None
    return row[0]


def _counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {
            t: int(_scalar(conn, sql.SQL("select count(*) from {}").format(sql.Identifier("public", t))))
            for t in PLATFORM_TABLES
        }


def test_scaled_counts_never_empty_and_proportional() -> None:
    tiny = scaled_counts(0.01)
    assert all(n >= 1 for n in tiny.values())
    assert tiny["users"] >= 2
    assert tiny["environments"] >= tiny["users"]
    full = scaled_counts(1.0)
    assert full == BASE_COUNTS
    assert scaled_counts(2.0)["observability_events"] == 2 * BASE_COUNTS["observability_events"]
    assert scaled_counts(0.5, users=3)["users"] == 3
    with pytest.raises(TestDataError):
        scaled_counts(0)


def test_user_ids_are_stable_prefixes_and_depend_on_seed() -> None:
    a = TestDataManager("postgresql://unused", seed=42)
    assert a.user_ids(3) == a.user_ids(10)[:3]
    assert a.user_ids(3) == TestDataManager("postgresql://unused", seed=42).user_ids(3)
    assert set(a.user_ids(3)).isdisjoint(TestDataManager("postgresql://unused", seed=7).user_ids(3))


def test_seed_fills_every_table_with_owner_consistent_rows(source_url: str) -> None:
    manager = TestDataManager(source_url)
    manager.create_environment()  # the schema is already there: must be left alone
    report = manager.seed(SCALE)

    counts = _counts(source_url)
    assert counts == report.rows
    assert all(n > 0 for n in counts.values()), counts
    assert report.total_bytes > 0 and report.duration_seconds > 0
    assert report.users >= 2

    with psycopg.connect(source_url) as conn:
        for child, column, parent in FOREIGN_KEYS:
            broken = _scalar(
                conn,
                sql.SQL(
                    "select count(*) from {child} c left join {parent} p on p.id = c.{column}"
                    " where c.{column} is not null and (p.id is null or p.user_id <> c.user_id)"
                ).format(
                    child=sql.Identifier("public", child),
                    parent=sql.Identifier("public", parent),
                    column=sql.Identifier(column),
                ),
            )
            assert broken == 0, f"{child}.{column} -> {parent}: {broken} rows with a missing or foreign owner"

        owners: set[uuid.UUID] = set()
        for table in PLATFORM_TABLES:
            owners |= {
                r[0]
                for r in conn.execute(
                    sql.SQL("select distinct user_id from {}").format(sql.Identifier("public", table))
                )
            }
        assert owners <= set(manager.user_ids(report.users))

        for table in ("agent_executions", "workflow_executions"):
            bad = _scalar(conn, f"select count(*) from public.{table} where completed_at < started_at")
            assert bad == 0, table
        for table in PLATFORM_TABLES:
            if table != "observability_events":
                stale = _scalar(conn, f"select count(*) from public.{table} where updated_at < created_at")
                assert stale == 0, table
        assert _scalar(conn, "select bool_and(scale(cost_usd) = 6) from public.agent_executions")
        assert (
            _scalar(
                conn,
                "select count(*) from public.agent_executions where total_tokens <> prompt_tokens + completion_tokens",
            )
            == 0
        )

        # Embeddings: unit length, some NULL, similarity search meaningful (a vector's nearest neighbour
        # among the other tasks is much closer than a random pair).
        norms = conn.execute(
            "select min(vector_norm(embedding)), max(vector_norm(embedding)),"
            " count(*) filter (where embedding is null) from (select embedding from public.tasks"
            " union all select embedding from public.agent_memory) e"
        ).fetchone()
        assert norms is not None
        assert abs(norms[0] - 1) < 1e-5 and abs(norms[1] - 1) < 1e-5
        assert norms[2] > 0
        nearest, typical = conn.execute(
            "with q as (select id, embedding from public.tasks where embedding is not null limit 1)"
            " select (select min(t.embedding <=> q.embedding) from public.tasks t"
            "         where t.id <> q.id and t.embedding is not null),"
            "        (select avg(t.embedding <=> q.embedding) from public.tasks t"
            "         where t.embedding is not null)"
            " from q"
        ).fetchone() or (None, None)
        assert nearest < 0.5 < typical

        snapshots, events = "public.execution_snapshots", "public.observability_events"
        assert _scalar(conn, f"select max(octet_length(state::text)) from {snapshots}") >= 100 * 1024
        assert _scalar(conn, f"select count(*) from {snapshots} where blob is not null") > 0
        assert _scalar(conn, f"select count(*) from {events} where message ~ '[^\\x01-\\x7f]'") > 0
        assert _scalar(conn, "select count(*) from public.tasks where cardinality(tags) > 0") > 0
        assert _scalar(conn, f"select max(id) from {events}") == counts["observability_events"]
        # The identity sequence was advanced past the explicit ids, so the app can keep inserting.
        new_id = _scalar(
            conn,
            "insert into public.observability_events (user_id, event_type, message) values (%s, 'log', 'x')"
            " returning id",
            manager.user_ids(1)[0],
        )
        assert new_id == counts["observability_events"] + 1
        conn.rollback()


def test_same_seed_gives_identical_datasets_on_neon_and_supabase(source_url: str, target_url: str) -> None:
    source, target = TestDataManager(source_url, seed=42), TestDataManager(target_url, seed=42)
    assert source.seed(SCALE).rows == target.seed(SCALE).rows  # target: RLS on, realtime publication
    comparison = source.compare_with(target_url)
    assert comparison.identical, comparison.describe()
    assert [diff.table for diff in comparison.tables] == list(PLATFORM_TABLES)


def test_different_seed_gives_different_data(source_url: str, target_url: str) -> None:
    TestDataManager(source_url, seed=1).seed(SCALE)
    TestDataManager(target_url, seed=2).seed(SCALE)
    comparison = TestDataManager(source_url).compare_with(target_url)
    assert set(comparison.different_tables) == set(PLATFORM_TABLES), comparison.describe()


def test_compare_reports_exactly_the_changed_table(source_url: str, target_url: str) -> None:
    TestDataManager(source_url).seed(SCALE)
    TestDataManager(target_url).seed(SCALE)
    with psycopg.connect(target_url) as conn:
        changed = conn.execute(
            "update public.agent_memory set importance = importance / 2"
            " where id = (select min(id::text)::uuid from public.agent_memory)"
        ).rowcount
    assert changed == 1
    comparison = TestDataManager(source_url).compare_with(target_url)
    assert not comparison.identical
    assert comparison.different_tables == ["agent_memory"], comparison.describe()
    assert "agent_memory" in comparison.describe()
    memory = next(d for d in comparison.tables if d.table == "agent_memory")
    assert memory.source.row_count == memory.target.row_count  # same rows, different content


def test_chunked_checksums_cover_the_table_and_localise_a_change(source_url: str) -> None:
    TestDataManager(source_url).seed(SCALE)
    with psycopg.connect(source_url, autocommit=True) as conn:
        total = table_checksum(conn, "observability_events")
        n = total.row_count
        bounds: list[Any] = [None, n // 4, n // 2, 3 * n // 4, None]
        ranges = list(itertools.pairwise(bounds))

        def chunks() -> list[Any]:
            return [
                table_checksum(
                    conn,
                    "observability_events",
                    lower=None if lo is None else (lo,),
                    upper=None if hi is None else (hi,),
                )
                for lo, hi in ranges
            ]

        before = chunks()
        assert sum(c.row_count for c in before) == n
        assert len({c.digest for c in before}) == len(before)

        conn.execute(
            "update public.observability_events set message = message || ' (edited)' where id = %s", (n // 4 + 1,)
        )
        after = chunks()
        changed = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if b != a]
        assert changed == [1]
        assert table_checksum(conn, "observability_events").digest != total.digest

        # A composite, non-primary key works the same way (uuid keys, as on every other table).
        tasks_total = table_checksum(conn, "tasks")
        users = [r[0] for r in conn.execute("select distinct user_id from public.tasks order by 1")]
        pivot = users[len(users) // 2]
        key = ("user_id", "id")
        low = table_checksum(conn, "tasks", key_columns=key, upper=(pivot, uuid.UUID(int=0)))
        high = table_checksum(conn, "tasks", key_columns=key, lower=(pivot, uuid.UUID(int=0)))
        assert low.row_count + high.row_count == tasks_total.row_count > 0
        assert low.row_count > 0 and high.row_count > 0


def test_checksum_ignores_row_order_column_order_and_session_settings(source_url: str) -> None:
    with psycopg.connect(source_url, autocommit=True) as conn:
        conn.execute("create table public.a (k int, t timestamptz, x float8, j jsonb, b bytea)")
        conn.execute("create table public.b (b bytea, j jsonb, x float8, t timestamptz, k int)")
        rows = [
            (i, f"2026-0{1 + i % 9}-01 12:00:00+02", 0.1 * i, f'{{"i": {i}, "s": "é✅"}}', b"\x00\xff")
            for i in range(50)
        ]
        with conn.cursor() as cur:
            cur.executemany("insert into public.a (k, t, x, j, b) values (%s, %s, %s, %s, %s)", rows)
            cur.executemany("insert into public.b (k, t, x, j, b) values (%s, %s, %s, %s, %s)", list(reversed(rows)))
            cur.execute("insert into public.a (k) values (null), (null)")  # duplicates must not cancel
            cur.execute("insert into public.b (k) values (null), (null)")
        a = table_checksum(conn, "a")
        assert a.row_count == 52
        assert table_checksum(conn, "b") == TableChecksum(table="b", row_count=a.row_count, digest=a.digest)

        conn.execute("set timezone = 'Asia/Tokyo'")
        conn.execute("set extra_float_digits = -3")
        conn.execute("set bytea_output = 'escape'")
        assert table_checksum(conn, "a").digest == a.digest
        # ... and the caller's settings are untouched afterwards, even inside their own transaction.
        with conn.transaction():
            table_checksum(conn, "a")
            assert _scalar(conn, "select current_setting('TimeZone')") == "Asia/Tokyo"
        assert _scalar(conn, "select current_setting('bytea_output')") == "escape"

        conn.execute("delete from public.b where ctid = (select min(ctid) from public.b where k is null)")
        assert table_checksum(conn, "b").digest != a.digest

        with pytest.raises(ChecksumError, match="no primary key"):
            table_checksum(conn, "a", lower=(1,))
        with pytest.raises(ChecksumError, match="does not exist"):
            table_checksum(conn, "nope")
        with pytest.raises(ChecksumError, match="key has 1 columns"):
            table_checksum(conn, "a", key_columns=["k"], lower=(1, 2))
        assert table_checksum(conn, "a", key_columns=["k"], lower=(10,), upper=(20,)).row_count == 10


def test_insert_users_into_auth(source_url: str, target_url: str) -> None:
    manager = TestDataManager(target_url)
    report = manager.seed(SCALE)
    manager.insert_users_into_auth()
    manager.insert_users_into_auth()  # idempotent
    with psycopg.connect(target_url) as conn:
        users: dict[uuid.UUID, str] = dict(
            conn.execute("select id, email from auth.users where email like 'user%@example.test'").fetchall()
        )
        assert users == {uid: manager.user_email(i) for i, uid in enumerate(manager.user_ids(report.users))}
        assert _scalar(
            conn,
            "select bool_and(aud = 'authenticated' and role = 'authenticated') from auth.users"
            " where email like '%@example.test'",
        )

    # A fresh manager (no seed() in this process) finds the same users from the data.
    TestDataManager(target_url).insert_users_into_auth()
    # Neon has no auth schema: a no-op, not an error.
    TestDataManager(source_url).insert_users_into_auth()


def test_cleanup_empties_everything_and_reseeding_is_identical(source_url: str) -> None:
    manager = TestDataManager(source_url)
    manager.seed(0.01)  # the smallest scale still fills every table
    with psycopg.connect(source_url) as conn:
        first = [table_checksum(conn, t) for t in PLATFORM_TABLES]
    assert all(c.row_count > 0 for c in first)
    with pytest.raises(TestDataError, match="cleanup"):
        manager.seed(0.01)  # never appends to existing rows

    manager.cleanup()
    assert set(_counts(source_url).values()) == {0}

    manager.seed(0.01)
    with psycopg.connect(source_url) as conn:
        assert [table_checksum(conn, t) for t in PLATFORM_TABLES] == first


def test_create_environment_builds_the_schema_on_a_blank_database(blank_url: str) -> None:
    manager = TestDataManager(blank_url)
    manager.create_environment()
    manager.create_environment()
    assert set(_counts(blank_url).values()) == {0}
    assert manager.seed(0.01).rows["execution_snapshots"] >= 1


@pytest.mark.slow
def test_full_scale_has_multi_megabyte_rows(source_url: str) -> None:
    report = TestDataManager(source_url).seed(1.0)
    assert report.rows == {t: BASE_COUNTS[t] for t in PLATFORM_TABLES}
    assert report.total_bytes > 80_000_000
    with psycopg.connect(source_url) as conn:
        biggest = _scalar(
            conn,
            "select max(octet_length(state::text) + coalesce(octet_length(blob), 0)) from public.execution_snapshots",
        )
        assert biggest >= 2 * 1024 * 1024
