"""Vector search: ``match_*`` return the exact top-k a brute-force computation gives, and respect RLS."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from pgferry.db.rls import anon_claims, scoped_transaction, user_claims

ALICE = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
BOB = uuid.UUID("00000000-0000-4000-8000-0000000000b0")
DIM = 1536


def _clustered_vectors(rng: np.random.Generator, n: int, centroids: np.ndarray) -> np.ndarray:
    picks = rng.integers(0, len(centroids), n)
    vectors = centroids[picks] + rng.normal(0, 0.35, (n, DIM)) / np.sqrt(DIM) * 4
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


@pytest.fixture
def seeded(target_url: str) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    centroids = rng.normal(size=(6, DIM))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    data: dict[str, Any] = {"tasks": {}, "memory": {}}
    with psycopg.connect(target_url, autocommit=True) as conn:
        register_vector(conn)
        with conn.cursor() as cur:
            for user in (ALICE, BOB):
                vectors = _clustered_vectors(rng, 300, centroids)
                ids = [uuid.uuid4() for _ in vectors]
                cur.executemany(
                    "insert into public.tasks (id, user_id, title, embedding) values (%s, %s, %s, %s)",
                    [(i, user, f"task {n}", v) for n, (i, v) in enumerate(zip(ids, vectors, strict=True))],
                )
                data["tasks"][user] = (ids, vectors)
                mem_vectors = _clustered_vectors(rng, 200, centroids)
                mem_ids = [uuid.uuid4() for _ in mem_vectors]
                agents = ["planner" if n % 2 else "coder" for n in range(len(mem_ids))]
                cur.executemany(
                    "insert into public.agent_memory (id, user_id, agent_name, content, embedding) "
                    "values (%s, %s, %s, %s, %s)",
                    [
                        (i, user, a, f"memory {n}", v)
                        for n, (i, a, v) in enumerate(zip(mem_ids, agents, mem_vectors, strict=True))
                    ],
                )
                data["memory"][user] = (mem_ids, mem_vectors, agents)
            # Rows without an embedding must never match.
            cur.execute("insert into public.tasks (user_id, title) values (%s, 'no embedding')", (ALICE,))
        conn.execute("analyze public.tasks")
        conn.execute("analyze public.agent_memory")
        conn.commit()
    data["query"] = _clustered_vectors(rng, 5, centroids)
    return data


def _brute_force(
    ids: list[uuid.UUID], vectors: np.ndarray, query: np.ndarray, threshold: float, k: int
) -> list[uuid.UUID]:
    v = vectors.astype(np.float64)
    q = query.astype(np.float64)
    sims = v @ q / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))
    order = sorted(range(len(ids)), key=lambda i: (-sims[i], str(ids[i])))
    return [ids[i] for i in order if sims[i] > threshold][:k]


@pytest.mark.parametrize("force_index", [False, True], ids=["planner-choice", "hnsw-forced"])
def test_match_tasks_equals_brute_force_top_k(target_url: str, seeded: dict[str, Any], force_index: bool) -> None:
    ids, vectors = seeded["tasks"][ALICE]
    with psycopg.connect(target_url, autocommit=True) as conn:
        register_vector(conn)
        for query in seeded["query"]:
            for threshold, k in ((0.0, 10), (0.5, 25), (-1.0, 40)):
                expected = _brute_force(ids, vectors, query, threshold, k)
                with scoped_transaction(conn, user_claims(ALICE)):
                    if force_index:
                        conn.execute("set local enable_seqscan = off")
                    rows = conn.execute(
                        "select id, similarity from public.match_tasks(%s, %s, %s)", (query, threshold, k)
                    ).fetchall()
                assert [r[0] for r in rows] == expected
                sims = [r[1] for r in rows]
                assert sims == sorted(sims, reverse=True)
                assert all(s > threshold for s in sims)


def test_hnsw_index_serves_the_search(target_url: str, seeded: dict[str, Any]) -> None:
    with psycopg.connect(target_url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("set enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "explain select id from public.tasks order by embedding <=> %s limit 5", (seeded["query"][0],)
            )
        )
    assert "ix_tasks_embedding_hnsw" in plan


def test_match_tasks_respects_rls(target_url: str, seeded: dict[str, Any]) -> None:
    alice_ids, alice_vectors = seeded["tasks"][ALICE]
    bob_ids = set(seeded["tasks"][BOB][0])
    with psycopg.connect(target_url, autocommit=True) as conn:
        register_vector(conn)
        # Bob searches with Alice's exact embedding: her row would be a perfect match, and must not appear.
        with scoped_transaction(conn, user_claims(BOB)):
            rows = conn.execute("select id from public.match_tasks(%s, -1, 200)", (alice_vectors[0],)).fetchall()
        found = {r[0] for r in rows}
        assert found and found <= bob_ids
        assert alice_ids[0] not in found
        with scoped_transaction(conn, user_claims(ALICE)):
            top = conn.execute(
                "select id, similarity from public.match_tasks(%s, 0.99, 1)", (alice_vectors[0],)
            ).fetchone()
        assert top is not None and top[0] == alice_ids[0] and top[1] == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with scoped_transaction(conn, anon_claims()):
                conn.execute("select * from public.match_tasks(%s, 0, 5)", (alice_vectors[0],))


def test_match_agent_memory_filters_by_agent_and_owner(target_url: str, seeded: dict[str, Any]) -> None:
    ids, vectors, agents = seeded["memory"][ALICE]
    planner_ids = [i for i, a in zip(ids, agents, strict=True) if a == "planner"]
    planner_vectors = vectors[[a == "planner" for a in agents]]
    with psycopg.connect(target_url, autocommit=True) as conn:
        register_vector(conn)
        for query in seeded["query"]:
            expected = _brute_force(planner_ids, planner_vectors, query, 0.1, 15)
            with scoped_transaction(conn, user_claims(ALICE)):
                rows = conn.execute(
                    "select id, agent_name from public.match_agent_memory(%s, 0.1, 15, 'planner')", (query,)
                ).fetchall()
            assert [r[0] for r in rows] == expected
            assert {r[1] for r in rows} <= {"planner"}
        with scoped_transaction(conn, user_claims(BOB)):
            rows = conn.execute("select id from public.match_agent_memory(%s, -1, 200)", (vectors[0],)).fetchall()
        assert not {r[0] for r in rows} & set(ids)


def test_hnsw_indexes_are_built_for_filtered_search(target_url: str) -> None:
    """Migration 20261130000400: both graphs built with ef_construction 128 (a coarser graph needs four times the
    scan for the same recall under RLS), and running it again over indexes already built so changes nothing."""
    query = (
        "select c.relname::text, c.reloptions::text[], c.oid from pg_class c "
        "where c.relname in ('ix_tasks_embedding_hnsw', 'ix_agent_memory_embedding_hnsw') order by 1"
    )
    with psycopg.connect(target_url, autocommit=True) as conn:
        before = conn.execute(query).fetchall()
        assert [(name, options) for name, options, _ in before] == [
            ("ix_agent_memory_embedding_hnsw", ["m=16", "ef_construction=128"]),
            ("ix_tasks_embedding_hnsw", ["m=16", "ef_construction=128"]),
        ]
        sql = next(Path("supabase/migrations").glob("20261130000400_*.sql")).read_text()
        for block in sql.split("$$;")[:-1]:
            conn.execute(block[block.index("do $$") :] + "$$")
        assert conn.execute(query).fetchall() == before  # same oids: nothing rebuilt
