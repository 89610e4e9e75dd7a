"""Minimal valid rows for each platform table, for tests that need a handful of known rows."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import psycopg
from psycopg import sql

_SEQUENCE = itertools.count()

# table -> (columns besides user_id, parent table per fk column)
PARENT_OF: dict[str, dict[str, str]] = {
    "environments": {},
    "tasks": {"environment_id": "environments"},
    "agent_executions": {"task_id": "tasks", "environment_id": "environments"},
    "observability_events": {"execution_id": "agent_executions"},
    "agent_memory": {},
    "workflows": {"environment_id": "environments"},
    "workflow_executions": {"workflow_id": "workflows"},
    "execution_snapshots": {"execution_id": "agent_executions"},
}


def row_values(table: str, user_id: uuid.UUID, parents: dict[str, Any]) -> dict[str, Any]:
    """Values for a new row of ``table`` owned by ``user_id``, pointing at ``parents`` (table -> id)."""
    fk = {column: parents[parent] for column, parent in PARENT_OF[table].items()}
    base: dict[str, Any] = {"user_id": user_id, **fk}
    extra: dict[str, dict[str, Any]] = {
        "environments": {"name": f"env-{uuid.uuid4().hex[:8]}", "github_repository": "acme/agents"},
        "tasks": {"title": "write the migration plan"},
        "agent_executions": {"agent_name": "planner"},
        "observability_events": {"event_type": "llm.call", "message": "called the model"},
        "agent_memory": {"agent_name": "planner", "content": "the user prefers small commits"},
        "workflows": {"name": f"wf-{uuid.uuid4().hex[:8]}"},
        "workflow_executions": {},
        "execution_snapshots": {"sequence": next(_SEQUENCE), "state": '{"step": 1}'},
    }
    return {**base, **extra[table]}


def insert_row(conn: psycopg.Connection[Any], table: str, values: dict[str, Any]) -> Any:
    query = sql.SQL("insert into public.{} ({}) values ({}) returning id").format(
        sql.Identifier(table),
        sql.SQL(", ").join(sql.Identifier(c) for c in values),
        sql.SQL(", ").join(sql.Placeholder() for _ in values),
    )
    row = conn.execute(query, list(values.values())).fetchone()
    assert row is not None
    return row[0]


def insert_tree(conn: psycopg.Connection[Any], user_id: uuid.UUID) -> dict[str, Any]:
    """One row in every table for ``user_id``, parents first; returns table -> id."""
    ids: dict[str, Any] = {}
    for table in PARENT_OF:
        ids[table] = insert_row(conn, table, row_values(table, user_id, ids))
    return ids
