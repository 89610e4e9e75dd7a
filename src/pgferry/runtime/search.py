"""Vector search as the calling user: ``search_tasks`` and ``search_memory``, the ``match_*`` SQL functions' query.

Both run on a connection that is already inside an RLS-scoped transaction (:mod:`pgferry.runtime.scoped`), so a
user only ever matches their own rows; nothing here filters by owner itself.

By default (``use_index=True``) they run the functions' query inline with the HNSW scan made the only cheap plan
for it (sequential, bitmap and explicit sorts off for this transaction only) and pgvector 0.8's iterative scan
(``hnsw.iterative_scan = strict_order``, ``hnsw.ef_search`` = ``ef_search`` or 100): under RLS the planner, left
alone, usually picks the exact plan — the owner's rows through the ``user_id`` index, every distance computed,
a sort — which is right for a user with few rows and ~100 ms for one with 10,000 (each 1536-d vector is
detoasted). The HNSW scan is not enough alone for a user owning a tiny share of a big table: the iterative scan
may stop at ``hnsw.max_scan_tuples`` before meeting ``k`` of their rows. So the query checks: fewer than ``k``
rows found means the exact search answers instead, in the same statement.

``use_index=False`` leaves the plan to the planner: with no ``ef_search`` it calls ``public.match_tasks`` /
``public.match_agent_memory`` exactly as PostgREST's ``rpc`` would (they pin ``hnsw.ef_search = 100``; a
function's ``SET`` clause overrides the caller's), with one it runs the inline query under that setting. Every
path returns the same rows (``tests/test_runtime_search.py`` checks them against exact search);
``bench/vector.py`` measures them.

Owns argument checking and the two queries; must not open connections or decide who the user is.
"""

from __future__ import annotations

import math
import struct
import sys
import uuid
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.rows import class_row

from pgferry.runtime.errors import SearchInputError
from pgferry.runtime.statements import local_settings

__all__ = [
    "DIMENSIONS",
    "MAX_MATCHES",
    "MemoryMatch",
    "QueryVector",
    "TaskMatch",
    "memory_query",
    "query_vector",
    "search_memory",
    "search_tasks",
    "tasks_query",
]

DIMENSIONS: Final = 1536
"""Embedding width of ``tasks.embedding`` and ``agent_memory.embedding``."""
MAX_MATCHES: Final = 200
"""The ``match_*`` functions cap ``match_count`` here; asking for more is an error rather than a silent cut."""
DEFAULT_EF_SEARCH: Final = 100
"""What the ``match_*`` functions pin, and the inline query's ``ef_search`` when only ``use_index`` is given."""


@dataclass(frozen=True, slots=True)
class TaskMatch:
    id: uuid.UUID
    title: str
    description: str | None
    status: str
    environment_id: uuid.UUID | None
    similarity: float


@dataclass(frozen=True, slots=True)
class MemoryMatch:
    id: uuid.UUID
    agent_name: str
    memory_type: str
    content: str
    importance: float | None
    similarity: float


_TASKS_BY_FUNCTION: Final = "select * from public.match_tasks(%(q)b::vector, %(threshold)s, %(k)s)"
_MEMORY_BY_FUNCTION: Final = (
    "select * from public.match_agent_memory(%(q)b::vector, %(threshold)s, %(k)s, %(agent)s::text)"
)
# The functions' bodies (migration 20261125000400), for a tuned ef_search; search_path as the functions set it.
# The query vector is one binary parameter (6 KB; as a text literal it is ~30 KB that the client spends longer
# formatting and the server longer parsing than the HNSW scan itself takes). ``nearest``: the k nearest visible rows
# ordered by distance alone, which the HNSW index yields without a sort (with the id as a second key, PostgreSQL 15
# sorts instead, even with sorts disabled). If the scan found fewer than k — pgvector's iterative scan stops at
# hnsw.max_scan_tuples, which a user owning a tiny share of a big table can hit before meeting k of their rows —
# the exact search runs instead (the owner's rows through their index, every distance, a sort; ``+ 0`` keeps the
# HNSW index from answering it); otherwise that branch is never executed (a one-time filter). The threshold is
# applied to those k afterwards — the same rows the functions' WHERE gives, since everything past the k-th nearest
# is farther still — so a threshold nothing passes ends the scan at k rows instead of walking the iterative scan
# to its limit; the rows are then ordered as the functions do.
_NEAREST: Final = """
  with nearest as materialized (
    select {columns}, {alias}.embedding <=> %(q)b::vector as distance
    from {table} {alias}
    {where}
    order by {alias}.embedding <=> %(q)b::vector
    limit %(k)s
  )
  select {names}, 1 - distance as similarity from (
    select * from nearest where (select count(*) from nearest) >= %(k)s
    union all
    (select {columns}, {alias}.embedding <=> %(q)b::vector as distance
     from {table} {alias}
     where (select count(*) from nearest) < %(k)s {also}
     order by ({alias}.embedding <=> %(q)b::vector) + 0
     limit %(k)s)
  ) found
  where distance < 1 - %(threshold)s
  order by similarity desc, id
"""
_TASK_COLUMNS: Final = ("id", "title", "description", "status", "environment_id")
_MEMORY_COLUMNS: Final = ("id", "agent_name", "memory_type", "content", "importance")
_MEMORY_FILTER: Final = (
    "(%(agent)s::text is null or m.agent_name = %(agent)s::text) and (m.expires_at is null or m.expires_at > now())"
)
_TASKS_INLINE: Final = _NEAREST.format(
    columns=", ".join(f"t.{c}" for c in _TASK_COLUMNS),
    names=", ".join(_TASK_COLUMNS),
    table="public.tasks",
    alias="t",
    where="",
    also="",
)
_MEMORY_INLINE: Final = _NEAREST.format(
    columns=", ".join(f"m.{c}" for c in _MEMORY_COLUMNS),
    names=", ".join(_MEMORY_COLUMNS),
    table="public.agent_memory",
    alias="m",
    where="where " + _MEMORY_FILTER,
    also="and " + _MEMORY_FILTER,
)


class QueryVector(bytes):
    """A query embedding in pgvector's binary form (dimensions, then big-endian float4s), sent as a binary
    parameter; the statement casts it (``%(q)b::vector``), which tells the server to read it with ``vector_recv``."""

    __slots__ = ()


class _QueryVectorDumper(Dumper):
    format = Format.BINARY
    oid = 0  # unknown: the ``::vector`` cast in the statement decides, so no per-connection type lookup is needed

    def dump(self, obj: QueryVector) -> bytes:
        return bytes(obj)


psycopg.adapters.register_dumper(QueryVector, _QueryVectorDumper)


def query_vector(embedding: Sequence[float] | Any) -> QueryVector:
    """``embedding`` (a list, tuple or numpy array) as a binary ``vector`` parameter, checked first: the width, no
    NaN or infinity (also none from a value too large for float4, which is what pgvector stores), not all zeros."""
    tolist = getattr(embedding, "tolist", None)  # numpy: one C call instead of 1,536 float() calls
    try:
        values = array("f", tolist() if callable(tolist) else embedding)
    except (TypeError, ValueError) as exc:
        raise SearchInputError(f"embedding is not a sequence of numbers ({exc}); pass {DIMENSIONS} floats") from None
    if len(values) != DIMENSIONS:
        raise SearchInputError(f"embedding has {len(values)} dimensions; pass a {DIMENSIONS}-dimensional vector")
    if not all(map(math.isfinite, values)):
        raise SearchInputError(
            "embedding contains NaN or infinity (or a value beyond float4's range); pass finite numbers only"
        )
    if not any(values):
        raise SearchInputError("embedding is all zeros, which has no cosine similarity; pass a real embedding")
    if sys.byteorder == "little":
        values.byteswap()
    return QueryVector(_VECTOR_HEADER + values.tobytes())


_VECTOR_HEADER: Final = struct.pack(">HH", DIMENSIONS, 0)


def _check(threshold: float, k: int, ef_search: int | None) -> None:
    if not -1.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise SearchInputError(f"threshold {threshold!r} is not a cosine similarity; pass a number from -1 to 1")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_MATCHES:
        raise SearchInputError(f"k={k!r}: pass a whole number of matches from 1 to {MAX_MATCHES}")
    if ef_search is not None and (isinstance(ef_search, bool) or not 1 <= ef_search <= 1000):
        raise SearchInputError(f"ef_search={ef_search!r}: pgvector accepts 1 to 1000 (higher: better recall, slower)")


def search_tasks(
    conn: psycopg.Connection[Any],
    embedding: Sequence[float] | Any,
    threshold: float,
    k: int,
    *,
    ef_search: int | None = None,
    use_index: bool = True,
) -> list[TaskMatch]:
    """The caller's ``k`` tasks most similar to ``embedding`` with cosine similarity above ``threshold``.

    ``conn`` must be in a user transaction (RLS decides whose tasks exist); ordered by similarity, best first.
    :meth:`pgferry.runtime.client.DatabaseClient.search_tasks` does the same in one round trip.
    """
    statement, params, settings = tasks_query(embedding, threshold, k, ef_search=ef_search, use_index=use_index)
    with conn.cursor(row_factory=class_row(TaskMatch)) as cur:
        _apply_settings(cur, settings)
        cur.execute(statement, params, prepare=False)  # a generic plan could trade the HNSW scan for a sort
        return cur.fetchall()


def search_memory(
    conn: psycopg.Connection[Any],
    embedding: Sequence[float] | Any,
    threshold: float,
    k: int,
    *,
    agent_name: str | None = None,
    ef_search: int | None = None,
    use_index: bool = True,
) -> list[MemoryMatch]:
    """The caller's ``k`` agent memories most similar to ``embedding`` (optionally of one agent), unexpired."""
    statement, params, settings = memory_query(
        embedding, threshold, k, agent_name=agent_name, ef_search=ef_search, use_index=use_index
    )
    with conn.cursor(row_factory=class_row(MemoryMatch)) as cur:
        _apply_settings(cur, settings)
        cur.execute(statement, params, prepare=False)  # a generic plan could trade the HNSW scan for a sort
        return cur.fetchall()


def tasks_query(
    embedding: Sequence[float] | Any, threshold: float, k: int, *, ef_search: int | None = None, use_index: bool = True
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """``search_tasks`` as ``(statement, params, transaction settings)``, for one round trip as the user
    (:meth:`pgferry.runtime.client.DatabaseClient.search_tasks`); rows are :class:`TaskMatch` fields in order."""
    _check(threshold, k, ef_search)
    params = {"q": query_vector(embedding), "threshold": threshold, "k": k}
    if ef_search is None and not use_index:
        return _TASKS_BY_FUNCTION, params, {}
    return _TASKS_INLINE, params, _settings(ef_search, use_index)


def memory_query(
    embedding: Sequence[float] | Any,
    threshold: float,
    k: int,
    *,
    agent_name: str | None = None,
    ef_search: int | None = None,
    use_index: bool = True,
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """``search_memory`` as ``(statement, params, transaction settings)``; rows are :class:`MemoryMatch` fields."""
    _check(threshold, k, ef_search)
    params = {"q": query_vector(embedding), "threshold": threshold, "k": k, "agent": agent_name}
    if ef_search is None and not use_index:
        return _MEMORY_BY_FUNCTION, params, {}
    return _MEMORY_INLINE, params, _settings(ef_search, use_index)


def _settings(ef_search: int | None, use_index: bool) -> dict[str, str]:
    """The transaction settings of a tuned search: ``hnsw.ef_search``, pgvector 0.8's iterative scan and the
    functions' ``search_path``; with ``use_index``, the HNSW scan made the only cheap plan (sequential, bitmap and
    explicit sorts off)."""
    settings = {"enable_seqscan": "off", "enable_bitmapscan": "off", "enable_sort": "off"} if use_index else {}
    settings["hnsw.ef_search"] = str(ef_search or DEFAULT_EF_SEARCH)
    settings["hnsw.iterative_scan"] = "strict_order"
    settings["search_path"] = "public, extensions, pg_temp"
    return settings


def _apply_settings(cur: psycopg.Cursor[Any], settings: dict[str, str]) -> None:
    """Every setting in one statement, for this transaction only."""
    if settings:
        cur.execute(*local_settings(settings))
