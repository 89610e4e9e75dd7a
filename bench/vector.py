"""Benchmark ``search_tasks`` as the calling user: recall@k against exact search, and latency, on 100k vectors.

Run from the project root::

    .venv/bin/python bench/vector.py                              # 100k tasks, 10 users, 200 queries
    .venv/bin/python bench/vector.py --rows 20000 --queries 50     # a quick look

What is measured
----------------
A throwaway server with the platform schema gets ``--rows`` tasks with 1536-dimension embeddings (unit vectors
around ``--topics`` random centroids, so neighbours are close and the graph has structure to get wrong), owned by
``--users`` users in equal shares, loaded by binary ``COPY`` and indexed once with the migrations' own HNSW index
(``vector_cosine_ops``, m=16, ef_construction=128: migration 20261130000400). Every query runs exactly as a
service runs it: a pooled connection from ``create_database_client``, a transaction as a user whose access
token was verified (``SET LOCAL ROLE authenticated`` + claims), the search, commit — two ways:
``client.search_tasks(user, …)`` (claims and settings, then the query with the embedding as a binary parameter,
pipelined: one round trip) and ``search_tasks(conn, …)`` inside
``client.user_transaction(user)`` (five round trips). RLS
keeps 1/``--users`` of the rows, so the HNSW scan must filter by owner: pgvector 0.8's iterative scan
(``strict_order``) keeps scanning until ``k`` rows pass. Latency is the wall time of that whole transaction on the
client (p50/p95/p99). Recall@k compares the ids returned with the exact top k computed in numpy from the same
user's vectors (cosine similarity above the threshold), averaged over the queries. Measured: the default call
(``search_tasks(user, embedding, threshold, k)``: HNSW at ef_search 100, exact if it gives up), the SQL function
left to the planner (``use_index=False``: what PostgREST's rpc runs), and each ``ef_search`` in ``--ef``.

Target (issue 14): recall@10 ≥ 0.98 at p50 ≤ 5 ms on 100k 1536-d vectors with RLS on. Output:
``bench/results/vector-<date>.json`` and a summary on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from runtime_common import (  # bench/ is on sys.path when a benchmark runs as a script
    SECRET,
    SUPABASE_URL,
    anon_key,
    machine,
    say,
    summarize_ms,
    throwaway_server,
    token_for,
    write_results,
)

from pgferry.config import load_settings
from pgferry.runtime.client import create_database_client
from pgferry.runtime.search import search_tasks

DIM = 1536
APIS = ("client.search_tasks", "search_tasks in user_transaction")


def make_vectors(rng: np.random.Generator, n: int, centroids: np.ndarray, noise: float) -> np.ndarray:
    vectors = centroids[rng.integers(0, len(centroids), n)] + rng.normal(0, noise, (n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def load(url: str, ids: list[uuid.UUID], owners: list[uuid.UUID], vectors: np.ndarray) -> dict[str, Any]:
    timings: dict[str, Any] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        row = conn.execute("select pg_get_indexdef('public.ix_tasks_embedding_hnsw'::regclass)").fetchone()
        assert row is not None
        index_definition = str(row[0])  # the migrations' own index, options included, built after the load
        conn.execute("drop index if exists public.ix_tasks_embedding_hnsw")
        started = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy("copy public.tasks (id, user_id, title, embedding) from stdin with (format binary)") as copy,
        ):
            copy.set_types(["uuid", "uuid", "text", "vector"])
            for n, (task, owner, vector) in enumerate(zip(ids, owners, vectors, strict=True)):
                copy.write_row((task, owner, f"task {n}", vector))
        timings["copy_seconds"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        conn.execute("set maintenance_work_mem = '2GB'")
        conn.execute("set max_parallel_maintenance_workers = 1")
        conn.execute(index_definition)
        timings["hnsw_build_seconds"] = round(time.perf_counter() - started, 1)
        timings["index"] = index_definition
        conn.execute("vacuum analyze public.tasks")
    return timings


def exact_top_k(
    vectors: np.ndarray, ids: Sequence[uuid.UUID], query: np.ndarray, threshold: float, k: int
) -> list[uuid.UUID]:
    sims = vectors @ query  # unit vectors: the dot product is the cosine similarity
    order = np.argsort(-sims, kind="stable")[: k * 3]
    return [ids[i] for i in order if sims[i] > threshold][:k]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="recall and latency of search_tasks under RLS")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--topics", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.03, help="per-dimension noise around a topic centroid")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--ef", default="200,400", help="ef_search values to measure besides the default 100")
    parser.add_argument("--bindir", help="PostgreSQL bin directory (default: embedded 18 or PGFERRY_PG_BINDIR)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(14)
    centroids = rng.normal(size=(args.topics, DIM)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    users = [uuid.UUID(int=0x6F1C2D4E_0000_4000_8000_000000000000 + n) for n in range(args.users)]
    vectors = make_vectors(rng, args.rows, centroids, args.noise)
    ids = [uuid.uuid4() for _ in range(args.rows)]
    owners = [users[n % args.users] for n in range(args.rows)]
    queries = make_vectors(rng, args.queries, centroids, args.noise)
    askers = [users[n % args.users] for n in range(args.queries)]
    report: dict[str, Any] = {
        "benchmark": "vector",
        "command": "bench/vector.py " + " ".join(argv or []),
        "machine": machine(),
        "parameters": {k: v for k, v in vars(args).items() if k != "no_write"},
    }
    with throwaway_server(args.bindir, shared_buffers="1GB") as (url, version, _cluster):
        report["server"] = {"version": version}
        say(f"loading {args.rows:,} vectors ({args.users} users) into PostgreSQL {version}")
        report["load"] = load(url, ids, owners, vectors)
        say(f"loaded: {report['load']}")
        by_user = {u: [i for i, o in enumerate(owners) if o == u] for u in users}
        settings = load_settings(
            supabase_db_url=url,
            supabase_url=SUPABASE_URL,
            supabase_anon_key=anon_key(),
            supabase_jwt_secret=SECRET,
            profile="dev",
        )
        with create_database_client(settings, max_size=2) as client:
            verified = {u: client.verify(token_for(str(u))) for u in users}
            expected = []
            for query, asker in zip(queries, askers, strict=True):
                rows = by_user[asker]
                expected.append(exact_top_k(vectors[rows], [ids[i] for i in rows], query, args.threshold, args.k))
            with client.user_transaction(verified[users[0]]) as conn:
                plan = conn.execute(
                    "explain select id from public.tasks order by embedding <=> %s::vector limit 10",
                    (str(queries[0].tolist()),),
                ).fetchall()
            report["plan_uses_hnsw"] = any("ix_tasks_embedding_hnsw" in str(r[0]) for r in plan)
            results = []
            configs = [(None, True), (None, False), *[(int(e), True) for e in args.ef.split(",") if e]]

            def run(api: str, asker: uuid.UUID, query: np.ndarray, ef: int | None, use_index: bool) -> list[Any]:
                if api == "client.search_tasks":  # one message: claims, settings, query
                    return client.search_tasks(
                        verified[asker], query, args.threshold, args.k, ef_search=ef, use_index=use_index
                    )
                with client.user_transaction(verified[asker]) as conn:  # BEGIN, claims, settings, query, COMMIT
                    return search_tasks(conn, query, args.threshold, args.k, ef_search=ef, use_index=use_index)

            for (ef, use_index), api in itertools.product(configs, APIS):
                for query, asker in zip(queries[:20], askers[:20], strict=True):  # warm the index pages
                    run(api, asker, query, ef, use_index)
                seconds, recalls = [], []
                for query, asker, truth in zip(queries, askers, expected, strict=True):
                    started = time.perf_counter()
                    found = run(api, asker, query, ef, use_index)
                    seconds.append(time.perf_counter() - started)
                    got = {m.id for m in found}
                    recalls.append(len(got & set(truth)) / len(truth) if truth else 1.0)
                row = {
                    "api": api,
                    "ef_search": ef if ef is not None else ("default (100)" if use_index else "function (100)"),
                    "plan": "hnsw, exact if it gives up (use_index, the default)" if use_index else "planner's choice",
                    "recall_at_k": round(float(np.mean(recalls)), 4),
                    "min_recall": round(float(np.min(recalls)), 2),
                    **summarize_ms(seconds),
                }
                row["meets_target"] = row["recall_at_k"] >= 0.98 and row["p50_ms"] <= 5.0
                say(
                    f"{api}, ef_search={row['ef_search']}, {row['plan']}: recall@{args.k} {row['recall_at_k']}, "
                    f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms"
                )
                results.append(row)
    report["results"] = results
    report["target"] = "recall@10 >= 0.98 at p50 <= 5 ms (100k x 1536, RLS on)"
    report["met"] = any(r["meets_target"] for r in results)
    if not args.no_write:
        say(f"wrote {write_results('vector', report)}")
    say("target met" if report["met"] else "target NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
