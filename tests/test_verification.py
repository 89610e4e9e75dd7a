"""Verification catches every kind of difference, judged against differences the test itself made.

Each case builds the same table on the two servers of a pair, then changes the target in one precise way.
The oracle is the construction: the test knows which rows differ, so it can check that ``verify_table``
reports exactly those (count, buckets, named rows) and nothing else. The digest's own properties (sums, not
XOR; bucketing by key) get cases an alternative implementation would miss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest

from pgferry.db.checksum import ChecksumError, bucket_rows, hash_method_for, table_digests
from pgferry.migrate.verify import TableCheck, buckets_for, verify_table
from pgferry.testing.servers import ServerPair
from tests.migrate_helpers import seed_source, service_for


@pytest.fixture
def two_databases(server_pair: ServerPair) -> Iterator[tuple[str, str]]:
    """An empty database on each server of the pair (a source and a target)."""
    source_name, source = server_pair.clone(server_pair.source, None, "vsrc")
    target_name, target = server_pair.clone(server_pair.target, None, "vtgt")
    yield source, target
    server_pair.drop(server_pair.source, source_name)
    server_pair.drop(server_pair.target, target_name)


def _on_both(urls: tuple[str, str], statements: str) -> None:
    for url in urls:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(statements.encode())


def _on_target(urls: tuple[str, str], statement: str, params: tuple[object, ...] = ()) -> int:
    with psycopg.connect(urls[1], autocommit=True) as conn:
        return conn.execute(statement.encode() if not params else statement, params).rowcount


def _check(urls: tuple[str, str], table: str, keys: tuple[str, ...], rows: int = 50_000) -> TableCheck:
    return verify_table(
        lambda: psycopg.connect(urls[0], autocommit=True),
        lambda: psycopg.connect(urls[1], autocommit=True),
        "public",
        table,
        keys,
        row_estimate=rows,
    )


KEYED = """
create table public.t (id int primary key, doc jsonb, r real, d float8, n numeric, body text);
insert into public.t
  select g, jsonb_build_object('g', g, 'tags', jsonb_build_array('a', g % 7)), g / 3.0, g / 7.0, g / 9.0,
         repeat(md5(g::text), 3)
  from generate_series(1, 20000) g;
insert into public.t values (-1, '{}', 0, 0, 0, 'zero'), (-2, null, 'NaN', 'Infinity', 'NaN', null),
                            (-3, '[]', '-Infinity', '-Infinity', '1.50', repeat('x', 6 * 1024 * 1024));
"""


@pytest.mark.parametrize(
    ("change", "changed_key"),
    [
        ("update public.t set doc = jsonb_set(doc, '{g}', '\"x\"') where id = 777", "777"),
        ("update public.t set r = '-0' where id = -1", "-1"),  # -0 = 0 to PostgreSQL, but not the same data
        ("update public.t set d = 'NaN' where id = -2", "-2"),  # Infinity -> NaN
        ("update public.t set r = 'Infinity' where id = -3", "-3"),  # -Infinity -> Infinity
        ("update public.t set n = 1.5 where id = -3", "-3"),  # 1.50 -> 1.5: equal numerics, different scale
        # One byte in the middle of a 6 MB value.
        ("update public.t set body = overlay(body placing 'y' from 3145728 for 1) where id = -3", "-3"),
        ("delete from public.t where id = 4242", "4242"),
        ("insert into public.t (id, body) values (20001, 'extra')", "20001"),
    ],
)
def test_every_kind_of_difference_in_a_keyed_table_is_found_and_named(
    two_databases: tuple[str, str], change: str, changed_key: str
) -> None:
    _on_both(two_databases, KEYED)
    assert _check(two_databases, "t", ("id",)).ok  # identical before the change
    assert _on_target(two_databases, change) == 1
    check = _check(two_databases, "t", ("id",))
    assert not check.ok
    assert len(check.differing_buckets) == 1, check  # one row changed: one bucket, whatever the table size
    assert check.buckets == buckets_for(50_000) > 1
    assert check.examples and check.examples[0].startswith(f"key (id) = {changed_key} "), check.examples


KEYLESS = """
create table public.k (v int, label text, x real);
insert into public.k select g % 100, 'row ' || (g % 100), g % 3 from generate_series(1, 3000) g;
insert into public.k values (7, 'twin', 1), (7, 'twin', 1), (null, null, null), (null, null, null);
"""


def test_one_of_two_identical_rows_deleted_from_a_keyless_table(two_databases: tuple[str, str]) -> None:
    _on_both(two_databases, KEYLESS)
    assert _check(two_databases, "k", ()).ok
    assert (
        _on_target(
            two_databases, "delete from public.k where ctid = (select min(ctid) from public.k where label = 'twin')"
        )
        == 1
    )
    check = _check(two_databases, "k", ())
    assert (check.source_rows, check.target_rows, len(check.differing_buckets)) == (3004, 3003, 1)
    assert check.examples == ("row (label, v, x) = (twin,7,1) is on the source but not the target",)


def test_duplicates_do_not_cancel_as_they_would_with_xor(two_databases: tuple[str, str]) -> None:
    """Source {a, a, c} and target {b, b, c}: equal counts, and an XOR of row hashes would be equal too."""
    source, target = two_databases
    for url, twin in ((source, "a"), (target, "b")):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("create table public.x (v text)")
            conn.execute("insert into public.x values (%s), (%s), ('c')", (twin, twin))
    with psycopg.connect(source) as s, psycopg.connect(target) as t:
        method = hash_method_for(s, t)
        left = table_digests(s, "x", buckets=1, method=method)
        right = table_digests(t, "x", buckets=1, method=method)
    assert left.row_count == right.row_count == 3
    assert left.differing_buckets(right) == [0]
    check = _check(two_databases, "x", (), rows=3)
    assert not check.ok
    assert sorted(check.examples) == [
        "row (v) = (a) is on the source but not the target",
        "row (v) = (a) is on the source but not the target",
        "row (v) = (b) is on the target but not the source",
        "row (v) = (b) is on the target but not the source",
    ]


def test_rows_swapping_values_between_them_are_a_difference(two_databases: tuple[str, str]) -> None:
    """Per-column sums would miss two rows that trade a value; row hashes do not."""
    _on_both(
        two_databases,
        "create table public.s (id int primary key, a text, b text);"
        "insert into public.s values (1, 'x', 'p'), (2, 'y', 'q')",
    )
    _on_target(two_databases, "update public.s set b = case id when 1 then 'q' else 'p' end")
    check = _check(two_databases, "s", ("id",), rows=2)
    assert not check.ok and check.source_rows == check.target_rows == 2
    assert {e.split(" differs")[0] for e in check.examples} == {"key (id) = 1", "key (id) = 2"}


def test_bucket_rows_walk_the_same_rows_the_digests_count(two_databases: tuple[str, str]) -> None:
    """Independent of the digest: the rows listed per bucket add up to the table, each exactly once."""
    source, _ = two_databases
    _on_both(two_databases, KEYED)
    with psycopg.connect(source) as conn:
        digests = table_digests(conn, "t", key_columns=("id",), buckets=8)
        listed = {b: list(bucket_rows(conn, "t", [b], key_columns=("id",), buckets=8)) for b in range(8)}
        total = conn.execute("select count(*) from public.t").fetchone()
    assert total is not None and sum(len(rows) for rows in listed.values()) == total[0] == digests.row_count
    for bucket, rows in listed.items():
        assert len(rows) == digests.by_bucket[bucket].rows
        keys = [r[0] for r in rows]
        assert keys == sorted(keys)  # in key order, as the verifier's walk needs
    all_keys = [int(k) for rows in listed.values() for k, _, _ in rows]
    assert sorted(all_keys) == sorted(set(all_keys))
    with psycopg.connect(source) as conn, pytest.raises(ChecksumError, match="power of two"):
        table_digests(conn, "t", key_columns=("id",), buckets=6)


def _sequence_and_constraint_case(source_url: str, baseline_url: str) -> Callable[[], object]:
    seed_source(source_url, scale=0.01)
    service = service_for(source_url, baseline_url)
    assert service.run().verification.ok  # type: ignore[union-attr]
    return service.verify


def test_verification_reports_a_sequence_behind_the_source(source_url: str, baseline_url: str) -> None:
    verify = _sequence_and_constraint_case(source_url, baseline_url)
    with psycopg.connect(baseline_url, autocommit=True) as conn:
        conn.execute("select setval('public.observability_events_id_seq', 1, false)")
    report = verify()
    assert not report.ok  # type: ignore[attr-defined]
    lagging = report.lagging_sequences  # type: ignore[attr-defined]
    assert [s["sequence"] for s in lagging] == ["public.observability_events_id_seq"]
    assert lagging[0]["target_next"] == 1 and lagging[0]["source_next"] > 1
    assert any("observability_events_id_seq is behind the source" in p for p in report.problems())  # type: ignore[attr-defined]


def test_verification_reports_a_not_valid_constraint(source_url: str, baseline_url: str) -> None:
    verify = _sequence_and_constraint_case(source_url, baseline_url)
    with psycopg.connect(baseline_url, autocommit=True) as conn:
        conn.execute("alter table public.tasks add constraint positive_priority check (priority >= 0) not valid")
    report = verify()
    assert not report.ok  # type: ignore[attr-defined]
    assert report.invalid_constraints == ["public.tasks.positive_priority is not validated"]  # type: ignore[attr-defined]
    assert not report.differing_tables  # type: ignore[attr-defined]
