"""Conflict resolution of the write API on real servers: per-column LWW (the default), row LWW on ``updated_at``
and a custom resolver, each outcome read back from the database as its owner and from the conflict records.

Two "clients" here are two outboxes replaying edits made offline against the same base: what they send is what the
Python outbox sends (``written_at`` = the time of the local edit, ``base`` = the row as the replica had it).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgferry.sync.conflicts import ColumnLww, CustomResolver, RowLww
from tests.write_helpers import ALICE, WriteStack, mutation, write_stack

T0 = 1_796_000_000_000  # ms; the clients' clocks


def rows(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []


def new_task(url: str, title: str = "base", **values: Any) -> str:
    columns = {"user_id": ALICE, "title": title, **values}
    names = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    return str(
        rows(url, f"insert into tasks ({names}) values ({marks}) returning id::text", list(columns.values()))[0][0]
    )


def edit(
    task: str, written_at: int, base: Mapping[str, Any], mutation_id: str | None = None, **values: Any
) -> dict[str, Any]:
    item = mutation("update", {"id": task, **values}, base={"id": task, **base}, written_at=written_at)
    if mutation_id is not None:
        item["id"] = mutation_id
    return item


def post_ok(stack: WriteStack, *items: dict[str, Any]) -> list[dict[str, Any]]:
    response = stack.post(list(items))
    assert response.status_code == 200, response.text
    return list(response.json()["results"])


def task(url: str, task_id: str) -> dict[str, Any]:
    found = rows(url, "select title, status, priority, tags from tasks where id = %s", [task_id])
    title, status, priority, tags = found[0]
    return {"title": title, "status": status, "priority": priority, "tags": tags}


@pytest.fixture
def stack(target_url: str, tmp_path: Path) -> Any:
    with write_stack(target_url, tmp_path / "sync") as served:
        yield served


def test_per_column_lww_keeps_concurrent_edits_to_different_columns(stack: WriteStack) -> None:
    task_id = new_task(stack.database_url)
    base = {"title": "base", "status": "pending"}
    first = post_ok(stack, edit(task_id, T0 + 2000, base, status="running"))  # client B reconnects first
    second = post_ok(stack, edit(task_id, T0 + 1000, base, title="renamed offline"))  # then client A
    assert task(stack.database_url, task_id)["title"] == "renamed offline"
    assert task(stack.database_url, task_id)["status"] == "running"
    assert "conflicts" not in first[0] and "conflicts" not in second[0]  # different columns: no conflict at all


@pytest.mark.parametrize("order", ["newer_first", "older_first"])
def test_per_column_lww_the_newer_write_of_a_column_wins_in_any_order(stack: WriteStack, order: str) -> None:
    task_id = new_task(stack.database_url)
    base = {"title": "base"}
    newer = edit(task_id, T0 + 3000, base, title="newer")
    older = edit(task_id, T0 + 2500, base, title="older")
    sequence = [newer, older] if order == "newer_first" else [older, newer]
    results = [post_ok(stack, item)[0] for item in sequence]
    assert task(stack.database_url, task_id)["title"] == "newer"
    second = results[1]
    if order == "newer_first":
        assert second["changed"] is False
        assert second["conflicts"] == [
            {"columns": ["title"], "winner": "server", "why": "the server's write of these columns is newer"}
        ]
    else:
        assert second["changed"] is True
        assert second["conflicts"][0]["winner"] == "client"
    recorded = rows(stack.database_url, "select mutation_id::text, columns, winner from pgferry.resolved_conflicts")
    assert recorded == [(sequence[1]["id"], ["title"], second["conflicts"][0]["winner"])]


@pytest.mark.parametrize("order", ["low_first", "high_first"])
def test_per_column_lww_ties_are_broken_by_mutation_id(stack: WriteStack, order: str) -> None:
    task_id = new_task(stack.database_url)
    low = edit(task_id, T0, {"title": "base"}, "00000000-0000-4000-8000-000000000001", title="low id")
    high = edit(task_id, T0, {"title": "base"}, "ffffffff-0000-4000-8000-000000000001", title="high id")
    for item in [low, high] if order == "low_first" else [high, low]:
        post_ok(stack, item)
    assert task(stack.database_url, task_id)["title"] == "high id"


def test_per_column_lww_against_a_change_made_outside_the_api(stack: WriteStack) -> None:
    task_id = new_task(stack.database_url)
    rows(stack.database_url, "update tasks set title = 'from SQL' where id = %s", [task_id])
    old = post_ok(stack, edit(task_id, 1_000, {"title": "base"}, title="stale offline edit"))[0]
    assert old["changed"] is False and old["conflicts"][0]["winner"] == "server"
    assert task(stack.database_url, task_id)["title"] == "from SQL"
    fresh = post_ok(stack, edit(task_id, 2**52, {"title": "base"}, title="edit from the future"))[0]
    assert fresh["conflicts"][0]["winner"] == "client"
    assert task(stack.database_url, task_id)["title"] == "edit from the future"


def test_row_lww_on_updated_at(target_url: str, tmp_path: Path) -> None:
    with write_stack(target_url, tmp_path / "sync", conflicts={"public.tasks": RowLww()}) as stack:
        task_id = new_task(target_url)
        (updated_ms,) = rows(
            target_url, "select (extract(epoch from updated_at) * 1000)::bigint from tasks where id = %s", [task_id]
        )[0]
        base = {"title": "base", "status": "pending"}
        older = post_ok(stack, edit(task_id, updated_ms - 60_000, base, title="older", status="running"))[0]
        assert older["changed"] is False
        assert older["conflicts"][0]["winner"] == "server"
        assert task(target_url, task_id)["title"] == "base"
        newer = post_ok(stack, edit(task_id, updated_ms + 60_000, base, title="newer", status="running"))[0]
        assert newer["changed"] is True and "conflicts" not in newer  # base still matched: no conflict
        assert task(target_url, task_id)["title"] == "newer"
        # Row LWW loses the other column of a concurrent edit: the whole row is one register.
        (now_ms,) = rows(
            target_url, "select (extract(epoch from updated_at) * 1000)::bigint from tasks where id = %s", [task_id]
        )[0]
        stale = post_ok(stack, edit(task_id, now_ms - 1, {"status": "pending"}, status="failed"))[0]
        assert stale["conflicts"][0] == {
            "columns": ["status"],
            "winner": "server",
            "why": "the row's updated_at is newer than the client's write",
        }
        assert task(target_url, task_id)["status"] == "running"


def test_custom_resolver_decides_and_is_recorded(target_url: str, tmp_path: Path) -> None:
    calls: list[tuple[Any, Any, Any]] = []

    def merge(server: Mapping[str, Any], client: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, Any]:
        calls.append((dict(server), dict(client), base))
        tags = sorted(set(server["tags"]) | set(client.get("tags") or []))
        return {"tags": tags, "priority": max(int(server["priority"]), int(client.get("priority") or 0))}

    with write_stack(target_url, tmp_path / "sync", conflicts={"tasks": CustomResolver(merge)}) as stack:
        task_id = new_task(target_url, tags=["a"], priority=1)
        base = {"tags": ["a"], "priority": 1}
        first = post_ok(stack, edit(task_id, T0, base, tags=["a", "b"], priority=5))[0]
        assert "conflicts" not in first and calls == []  # no concurrent change: the client's values as sent
        second = post_ok(stack, edit(task_id, T0 + 1, base, tags=["a", "c"], priority=3))[0]
        assert second["conflicts"] == [
            {"columns": ["tags", "priority"], "winner": "custom", "why": "decided by the table's custom resolver"}
        ]
        server_seen, client_seen, base_seen = calls[0]
        assert server_seen["tags"] == ["a", "b"] and server_seen["priority"] == "5"
        assert client_seen == {"tags": ["a", "c"], "priority": "3"}
        assert base_seen == {"id": task_id, "tags": ["a"], "priority": "1"}
        assert task(target_url, task_id)["tags"] == ["a", "b", "c"]
        assert task(target_url, task_id)["priority"] == 5
    assert rows(target_url, "select winner, columns from pgferry.resolved_conflicts") == [
        ("custom", ["tags", "priority"])
    ]


def test_conflict_policy_config_names_unknown_tables(target_url: str) -> None:
    from pgferry.errors import ConfigError
    from pgferry.sync import WriteApiConfig
    from tests.write_helpers import verifier

    with pytest.raises(ConfigError, match=r"public\.nope"):
        WriteApiConfig(database_url=target_url, verifier=verifier(), conflicts={"public.nope": ColumnLww()})


def test_deleted_rows_forget_their_column_versions(stack: WriteStack) -> None:
    task_id = new_task(stack.database_url)
    post_ok(stack, edit(task_id, T0, {"title": "base"}, title="x"))
    assert rows(stack.database_url, "select count(*) from pgferry.column_versions") == [(1,)]
    post_ok(stack, mutation("delete", {"id": task_id}))
    assert rows(stack.database_url, "select count(*) from pgferry.column_versions") == [(0,)]
    assert uuid.UUID(task_id)


@pytest.mark.parametrize("order", ["newer_first", "older_first"])
def test_per_column_lww_holds_inside_one_batch_that_edits_a_row_twice(stack: WriteStack, order: str) -> None:
    """An outbox delivers a series of edits of one row in one request: each must meet the versions the earlier ones
    wrote (not those before the batch), and one version per column is stored."""
    task_id = new_task(stack.database_url)
    newer = edit(task_id, T0 + 3000, {"title": "base"}, title="newer", priority=3)
    older = edit(task_id, T0 + 2500, {"title": "base"}, title="older")
    sequence = [newer, older] if order == "newer_first" else [older, newer]
    results = post_ok(stack, *sequence)
    assert task(stack.database_url, task_id)["title"] == "newer"
    assert task(stack.database_url, task_id)["priority"] == 3
    if order == "newer_first":
        assert results[1]["changed"] is False
        assert results[1]["conflicts"][0]["winner"] == "server"
    assert rows(
        stack.database_url, "select column_name, mutation_id::text from pgferry.column_versions order by 1"
    ) == [("priority", newer["id"]), ("title", newer["id"])]
