"""``search_tasks`` / ``search_memory`` as the calling user, judged against exact (brute-force) search in numpy.

Real PostgreSQL with pgvector, real policies, real verified tokens; another tenant's perfect match must never
appear, and a tuned ``ef_search`` must give the same rows as the SQL functions.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from pgferry.runtime.client import create_database_client
from pgferry.runtime.errors import SearchInputError
from pgferry.runtime.scoped import query_as_user_bound, user_transaction
from pgferry.runtime.search import query_vector, search_memory, search_tasks
from pgferry.sync.auth import AuthenticatedUser
from tests.runtime_helpers import project, settings_for, token_for

ALICE = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
BOB = uuid.UUID("00000000-0000-4000-8000-0000000000b2")
DIM = 1536


def _clustered(rng: np.random.Generator, n: int, centroids: np.ndarray) -> np.ndarray:
    vectors = centroids[rng.integers(0, len(centroids), n)] + rng.normal(0, 0.35, (n, DIM)) / np.sqrt(DIM) * 4
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def _literal(vector: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


@pytest.fixture
def seeded(target_url: str) -> dict[str, Any]:
    rng = np.random.default_rng(11)
    centroids = rng.normal(size=(5, DIM))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    data: dict[str, Any] = {}
    with psycopg.connect(target_url, autocommit=True) as conn, conn.cursor() as cur:
        for user in (ALICE, BOB):
            vectors = _clustered(rng, 250, centroids)
            ids = [uuid.uuid4() for _ in vectors]
            cur.executemany(
                "insert into public.tasks (id, user_id, title, embedding) values (%s, %s, %s, %s)",
                [(i, user, f"task {n}", _literal(v)) for n, (i, v) in enumerate(zip(ids, vectors, strict=True))],
            )
            memory = _clustered(rng, 120, centroids)
            memory_ids = [uuid.uuid4() for _ in memory]
            agents = ["planner" if n % 3 else "coder" for n in range(len(memory))]
            cur.executemany(
                "insert into public.agent_memory (id, user_id, agent_name, content, embedding) "
                "values (%s, %s, %s, %s, %s)",
                [
                    (i, user, a, f"memory {n}", _literal(v))
                    for n, (i, a, v) in enumerate(zip(memory_ids, agents, memory, strict=True))
                ],
            )
            data[user] = {"tasks": (ids, vectors), "memory": (memory_ids, memory, agents)}
        cur.execute("analyze public.tasks")
        cur.execute("analyze public.agent_memory")
    data["queries"] = _clustered(rng, 4, centroids)
    return data


@pytest.fixture
def pool(target_url: str) -> Iterator[ConnectionPool[Any]]:
    with ConnectionPool(target_url, kwargs={"autocommit": True}, min_size=1, max_size=2) as pool:
        yield pool


@pytest.fixture
def users() -> Iterator[dict[uuid.UUID, AuthenticatedUser]]:
    with project() as tokens:
        yield {user: tokens.verify_sync(token_for(user)) for user in (ALICE, BOB)}


def _exact(ids: list[uuid.UUID], vectors: np.ndarray, query: np.ndarray, threshold: float, k: int) -> list[uuid.UUID]:
    v = vectors.astype(np.float64)
    q = query.astype(np.float64)
    sims = v @ q / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))
    order = sorted(range(len(ids)), key=lambda i: (-sims[i], str(ids[i])))
    return [ids[i] for i in order if sims[i] > threshold][:k]


@pytest.mark.parametrize(
    ("ef_search", "use_index"),
    [(None, False), (None, True), (60, True), (400, True), (400, False)],
    ids=["function", "function-hnsw", "ef60-hnsw", "ef400-hnsw", "ef400-planner"],
)
def test_search_tasks_equals_exact_search_for_the_caller(
    pool: ConnectionPool[Any],
    seeded: dict[str, Any],
    users: dict[uuid.UUID, AuthenticatedUser],
    ef_search: int | None,
    use_index: bool,
) -> None:
    ids, vectors = seeded[ALICE]["tasks"]
    for query in seeded["queries"]:
        for threshold, k in ((0.0, 10), (0.3, 25)):
            with user_transaction(pool, users[ALICE]) as conn:
                found = search_tasks(conn, query, threshold, k, ef_search=ef_search, use_index=use_index)
            assert [m.id for m in found] == _exact(ids, vectors, query, threshold, k)
            similarities = [m.similarity for m in found]
            assert similarities == sorted(similarities, reverse=True)
            assert all(s > threshold for s in similarities)


@pytest.mark.parametrize(("ef_search", "use_index"), [(None, False), (200, True)], ids=["function", "ef200-hnsw"])
def test_one_round_trip_search_on_the_client_equals_exact_search(
    target_url: str, seeded: dict[str, Any], ef_search: int | None, use_index: bool
) -> None:
    """``client.search_tasks`` / ``search_memory`` (claims, settings and query in one round trip) answer as the
    in-transaction functions do, as the caller only, and leave no setting on the pooled connection."""
    with create_database_client(settings_for(target_url), max_size=1) as client:
        alice, bob = client.verify(token_for(ALICE)), client.verify(token_for(BOB))
        ids, vectors = seeded[ALICE]["tasks"]
        for query in seeded["queries"]:
            found = client.search_tasks(alice, query, 0.0, 10, ef_search=ef_search, use_index=use_index)
            assert [m.id for m in found] == _exact(ids, vectors, query, 0.0, 10)
            assert all(isinstance(m.similarity, float) and isinstance(m.id, uuid.UUID) for m in found)
        stolen = client.search_tasks(bob, vectors[0], -1.0, 200, ef_search=ef_search, use_index=use_index)
        assert stolen and not {m.id for m in stolen} & set(ids)  # Alice's perfect match is not Bob's to see
        memory_ids, memory, agents = seeded[ALICE]["memory"]
        planners = [a == "planner" for a in agents]
        planner_ids = [i for i, keep in zip(memory_ids, planners, strict=True) if keep]
        recalled = client.search_memory(alice, seeded["queries"][1], 0.1, 15, agent_name="planner", ef_search=ef_search)
        assert [m.id for m in recalled] == _exact(planner_ids, memory[planners], seeded["queries"][1], 0.1, 15)
        with client.pool.connection() as conn:
            left = conn.execute(
                "select current_user, current_setting('enable_seqscan'), current_setting('hnsw.ef_search', true)"
            ).fetchone()
        assert left is not None and left[:2] == ("postgres", "on") and left[2] in (None, "40")


def test_search_never_returns_another_tenants_perfect_match(
    pool: ConnectionPool[Any], seeded: dict[str, Any], users: dict[uuid.UUID, AuthenticatedUser]
) -> None:
    alice_ids, alice_vectors = seeded[ALICE]["tasks"]
    bob_ids = set(seeded[BOB]["tasks"][0])
    for ef_search in (None, 300):
        with user_transaction(pool, users[BOB]) as conn:
            found = {m.id for m in search_tasks(conn, alice_vectors[0], -1.0, 200, ef_search=ef_search)}
        assert found and found <= bob_ids
        with user_transaction(pool, users[ALICE]) as conn:  # positive control: Alice finds it first
            top = search_tasks(conn, alice_vectors[0], 0.99, 1, ef_search=ef_search)
        assert [m.id for m in top] == [alice_ids[0]]
        assert top[0].similarity == pytest.approx(1.0, abs=1e-5)
    memory_ids = set(seeded[ALICE]["memory"][0])
    with user_transaction(pool, users[BOB]) as conn:
        assert not {m.id for m in search_memory(conn, seeded[ALICE]["memory"][1][0], -1.0, 200)} & memory_ids


@pytest.mark.parametrize("ef_search", [None, 250], ids=["function", "ef250"])
def test_search_memory_filters_by_agent_as_the_caller(
    pool: ConnectionPool[Any],
    seeded: dict[str, Any],
    users: dict[uuid.UUID, AuthenticatedUser],
    ef_search: int | None,
) -> None:
    ids, vectors, agents = seeded[ALICE]["memory"]
    planners = [a == "planner" for a in agents]
    planner_ids = [i for i, keep in zip(ids, planners, strict=True) if keep]
    for query in seeded["queries"]:
        with user_transaction(pool, users[ALICE]) as conn:
            found = search_memory(conn, query, 0.1, 15, agent_name="planner", ef_search=ef_search)
        assert [m.id for m in found] == _exact(planner_ids, vectors[planners], query, 0.1, 15)
        assert {m.agent_name for m in found} <= {"planner"}


def test_one_round_trip_search_through_pgbouncer_keeps_tenants_apart_and_leaves_nothing(
    target_url: str, seeded: dict[str, Any], pgbouncer: Callable[..., str]
) -> None:
    """The pipelined search (claims, then the query with a binary vector, behind one Sync) through a real
    transaction-mode pooler sharing one server connection: each user's answer is exactly their own exact search,
    alternating users never see each other's rows, and no role, claims, setting or prepared statement is left."""
    pooled = pgbouncer(target_url, pool_size=1)
    with create_database_client(settings_for(target_url, supabase_pooler_url=pooled), max_size=2) as client:
        assert client.mode == "transaction"
        verified = {user: client.verify(token_for(user)) for user in (ALICE, BOB)}
        for query in seeded["queries"]:
            for user in (ALICE, BOB, ALICE):
                ids, vectors = seeded[user]["tasks"]
                found = client.search_tasks(verified[user], query, 0.0, 10, ef_search=200, use_index=True)
                assert [m.id for m in found] == _exact(ids, vectors, query, 0.0, 10)
        with pytest.raises(psycopg.errors.DivisionByZero):  # an error rolls claims and settings back with it
            query_as_user_bound(client.pool, verified[ALICE], "select 1/0", (), settings={"hnsw.ef_search": "77"})
        with client.pool.connection() as conn:
            left = conn.execute(
                "select current_user, coalesce(current_setting('request.jwt.claims', true), ''), "
                "current_setting('hnsw.ef_search', true), (select count(*) from pg_prepared_statements)"
            ).fetchone()
        assert left is not None and left[:2] == ("postgres", "") and left[2] in (None, "40") and left[3] == 0


def test_threshold_applies_to_the_nearest_k_without_walking_the_scan(
    pool: ConnectionPool[Any], seeded: dict[str, Any], users: dict[uuid.UUID, AuthenticatedUser]
) -> None:
    """A threshold no row passes answers nothing, as exact search does, and the HNSW scan stops after the k
    nearest visible rows instead of walking pgvector's iterative scan to its tuple limit looking for one."""
    from pgferry.runtime.search import _TASKS_INLINE

    query = seeded["queries"][0]
    ids, vectors = seeded[ALICE]["tasks"]
    assert _exact(ids, vectors, query, 0.999, 10) == []
    with user_transaction(pool, users[ALICE]) as conn:
        assert search_tasks(conn, query, 0.999, 10, ef_search=40, use_index=True) == []
        plan = conn.execute(
            "explain (analyze, format json) " + _TASKS_INLINE,
            {"q": query_vector(query), "threshold": 0.999, "k": 10},
            prepare=False,
        ).fetchone()
    assert plan is not None
    root = plan[0][0]["Plan"]
    scans = [node for node in _nodes(root, "Index Scan") if node["Index Name"] == "ix_tasks_embedding_hnsw"]
    assert len(scans) == 1 and scans[0]["Actual Rows"] == 10  # exactly k visible rows read, then none passed
    exact = [node for node in _nodes(root, "Index Scan") if node["Index Name"] != "ix_tasks_embedding_hnsw"]
    assert all(node["Actual Loops"] == 0 for node in exact)  # the exact fallback never ran: k were found


def test_a_tiny_tenant_the_hnsw_scan_gives_up_on_gets_the_exact_answer(
    target_url: str, seeded: dict[str, Any], users: dict[uuid.UUID, AuthenticatedUser], pool: ConnectionPool[Any]
) -> None:
    """pgvector's iterative scan stops at ``hnsw.max_scan_tuples``; a user whose few rows lie far from the query in
    a graph full of other tenants' rows gets fewer than k from it. The search must notice and answer exactly."""
    carol = uuid.UUID("00000000-0000-4000-8000-0000000000c3")
    query = seeded["queries"][0]
    far = np.stack([-query + np.float32(0.01) * n for n in range(1, 4)]).astype(np.float32)
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    ids = [uuid.uuid4() for _ in far]
    with psycopg.connect(target_url, autocommit=True) as conn:
        conn.cursor().executemany(
            "insert into public.tasks (id, user_id, title, embedding) values (%s, %s, 'far', %s)",
            [(i, carol, _literal(v)) for i, v in zip(ids, far, strict=True)],
        )
    with project() as tokens:
        carol_user = tokens.verify_sync(token_for(carol))
    with user_transaction(pool, carol_user) as conn:
        conn.execute("set local hnsw.max_scan_tuples = 1")  # the iterative scan gives up after its first pass
        found = search_tasks(conn, query, -1.0, 10, ef_search=20)
        direct = conn.execute(
            "select count(*) from (select id from public.tasks order by embedding <=> %s::vector limit 10) x",
            (_literal(query),),
        ).fetchone()
    assert direct is not None and direct[0] < 3  # the HNSW scan alone really does come up short here
    assert [m.id for m in found] == _exact(ids, far, query, -1.0, 10)


def _nodes(plan: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    found = [plan] if plan["Node Type"] == kind else []
    for child in plan.get("Plans", []):
        found += _nodes(child, kind)
    return found


def test_use_index_makes_the_hnsw_scan_answer(
    pool: ConnectionPool[Any], seeded: dict[str, Any], users: dict[uuid.UUID, AuthenticatedUser]
) -> None:
    from pgferry.runtime.search import _TASKS_INLINE  # the statement search_tasks runs, explained as it runs

    query = query_vector(seeded["queries"][0])  # the binary parameter search_tasks sends
    with user_transaction(pool, users[ALICE]) as conn:
        search_tasks(conn, seeded["queries"][0], 0.0, 5, ef_search=80, use_index=True)  # sets the transaction up
        plan = "\n".join(
            str(r[0])
            for r in conn.execute("explain " + _TASKS_INLINE, {"q": query, "threshold": 0.0, "k": 5}, prepare=False)
        )
    assert "ix_tasks_embedding_hnsw" in plan, plan


def test_tuned_ef_search_applies_to_that_transaction_only(
    pool: ConnectionPool[Any], seeded: dict[str, Any], users: dict[uuid.UUID, AuthenticatedUser]
) -> None:
    with user_transaction(pool, users[ALICE]) as conn:
        search_tasks(conn, seeded["queries"][0], 0.0, 5, ef_search=321)
        inside = conn.execute("select current_setting('hnsw.ef_search'), current_setting('hnsw.iterative_scan')")
        assert inside.fetchone() == ("321", "strict_order")
    with user_transaction(pool, users[ALICE]) as conn:
        after = conn.execute("select current_setting('hnsw.ef_search', true)").fetchone()
    assert after is not None and after[0] in (None, "40")  # pgvector's default, not ours


@pytest.mark.parametrize(
    ("embedding", "threshold", "k", "ef_search", "message"),
    [
        ([0.1] * 3, 0.5, 10, None, "has 3 dimensions; pass a 1536-dimensional vector"),
        ([float("nan")] * DIM, 0.5, 10, None, "NaN or infinity"),
        ([1e39] * DIM, 0.5, 10, None, "beyond float4's range"),
        (["x"] * DIM, 0.5, 10, None, "not a sequence of numbers"),
        ([0.0] * DIM, 0.5, 10, None, "all zeros"),
        ([0.1] * DIM, 1.5, 10, None, "from -1 to 1"),
        ([0.1] * DIM, 0.5, 0, None, "from 1 to 200"),
        ([0.1] * DIM, 0.5, 201, None, "from 1 to 200"),
        ([0.1] * DIM, 0.5, 10, 0, "1 to 1000"),
    ],
    ids=["dimension", "nan", "float4-overflow", "not-numbers", "zeros", "threshold", "k-zero", "k-too-many", "ef-zero"],
)
def test_bad_search_input_is_one_clear_line_and_touches_nothing(
    pool: ConnectionPool[Any],
    users: dict[uuid.UUID, AuthenticatedUser],
    embedding: list[float],
    threshold: float,
    k: int,
    ef_search: int | None,
    message: str,
) -> None:
    with user_transaction(pool, users[ALICE]) as conn:
        with pytest.raises(SearchInputError, match=message) as raised:
            search_tasks(conn, embedding, threshold, k, ef_search=ef_search)
        assert "\n" not in str(raised.value)
        conn.execute("select 1")  # the transaction is still usable: nothing was sent
