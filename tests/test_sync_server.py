"""The dev sync server speaking Electric's Shape API, checked over HTTP against a real PostgreSQL.

These tests pin the wire details the official clients depend on (headers, offsets, message shapes, 409/400
bodies, up-to-date with ``global_last_seen_lsn``); tests/test_sync_interop.py runs the official clients.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pgferry.testing.asgi import ServedApp
from pgferry.testing.servers import ServerPair
from tests.sync_helpers import (
    SECRET,
    USER,
    Later,
    changes,
    controls,
    insert_task,
    live_after,
    make_server,
    shape,
    sync_to_end,
)


def _server(url: str, data_dir: Path, *, live_timeout: float = 3.0) -> ServedApp:
    return make_server(url, data_dir, live_timeout=live_timeout)


@pytest.fixture
def db(target_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def server(target_url: str, tmp_path: Path) -> Iterator[ServedApp]:
    with _server(target_url, tmp_path / "sync") as served:
        yield served


def test_initial_snapshot_has_electric_headers_schema_and_text_values(server: ServedApp, db: Any) -> None:
    task_id = insert_task(db, 'a/b "quoted"', priority=3, tags=["x", "y z"], metadata=json.dumps({"k": [1, 2]}))
    response, rows = sync_to_end(server)
    assert response.headers["electric-handle"]
    assert response.headers["electric-offset"]
    assert "electric-up-to-date" in response.headers
    schema = json.loads(response.headers["electric-schema"])
    assert schema["id"] == {"type": "uuid", "not_null": True, "pk_index": 0}
    assert schema["tags"]["type"] == "text" and schema["tags"]["dims"] == 1
    assert schema["embedding"]["type"] == "vector"
    assert schema["priority"]["type"] == "int4"
    assert len(rows) == 1
    message = rows[0]
    assert message["key"] == f'"public"."tasks"/"{task_id}"'
    assert message["headers"]["operation"] == "insert"
    assert message["headers"]["relation"] == ["public", "tasks"]
    value = message["value"]
    assert value["title"] == 'a/b "quoted"'
    assert value["priority"] == "3"
    assert value["tags"] == '{x,"y z"}'
    assert json.loads(value["metadata"]) == {"k": [1, 2]}
    assert value["embedding"] is None and value["description"] is None
    up_to_date = response.json()[-1]
    assert up_to_date["headers"]["control"] == "up-to-date"
    assert up_to_date["headers"]["global_last_seen_lsn"].isdigit()


def _commit_position(db: psycopg.Connection[Any]) -> int:
    """The position the write API reports for the commit just made on ``db``: the insert position right after it,
    minus one (``pgferry.sync.writer._commit_position``), as a number."""
    row = db.execute("select (pg_catalog.pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
    assert row is not None
    return int(row[0]) - 1


def _seen_lsn(response: httpx.Response) -> int:
    return int(response.json()[-1]["headers"]["global_last_seen_lsn"])


def test_global_last_seen_lsn_passes_commits_no_shape_holds_on_an_idle_server(server: ServedApp, db: Any) -> None:
    """A commit that no shape holds — a row the shape's where clause excludes, a table the server does not publish
    — and nothing written after it: a live up-to-date still soon carries global_last_seen_lsn at or past the commit's
    position, so a client can settle such a write. (Electric's own stays at the last commit it processed.)"""
    last, _ = sync_to_end(server, where="priority = 99")
    db.execute("create table scratch_unpublished (x int)")
    for commit in ("outside the where clause", "unpublished table"):
        if commit == "outside the where clause":
            insert_task(db, "outside", priority=1)
        else:
            db.execute("insert into scratch_unpublished values (1)")
        position = _commit_position(db)
        deadline = time.monotonic() + 15
        response = last
        while _seen_lsn(response) < position:
            assert time.monotonic() < deadline, f"{commit}: global_last_seen_lsn stayed below {position}"
            response = live_after(server, response, where="priority = 99")
            assert response.status_code == 200 and changes(response) == []
        last = response


def test_the_up_to_date_after_a_change_is_past_its_whole_commit_record(server: ServedApp, db: Any) -> None:
    """The live answer carrying a change reports global_last_seen_lsn past the change's commit LSN (the end of its
    commit record, less one), not at it: that is what the write API's commit position for the same commit (read
    right after it) is compared with, so a write settles with its own commit, without waiting for later WAL."""
    insert_task(db, "first")
    last, _ = sync_to_end(server)
    waiting = Later(lambda: live_after(server, last))
    time.sleep(0.5)  # the long-poll is waiting: it answers as the change is applied, before any later keepalive
    insert_task(db, "second")
    response = waiting.result()
    [change] = changes(response)
    assert _seen_lsn(response) > int(change["headers"]["lsn"])


def test_applying_a_transaction_moves_the_processed_position_to_just_before_its_end(tmp_path: Path) -> None:
    """The same property without the race the HTTP test above has with the feed's keepalive handling (which usually
    moves the position a moment later anyway): right after applying a transaction the position is the end of its
    commit record less one, never the commit LSN (Electric's figure), and never the end itself (a commit may start
    there); later positions only move it forward."""
    import datetime as dt

    from pgferry.replication.lsn import Lsn
    from pgferry.replication.reader import Transaction
    from pgferry.sync.shapes import ShapeManager

    manager = ShapeManager("postgresql://unused", tmp_path)  # no shapes: nothing is evaluated or read
    txn = Transaction(xid=7, commit_lsn=Lsn(1000), end_lsn=Lsn(1048), commit_ts=dt.datetime.now(dt.UTC), changes=())
    manager.apply_transactions([txn], evaluator=None)  # type: ignore[arg-type]
    assert manager.processed_lsn == 1047
    manager.advance_processed(1040)  # an older keepalive position
    assert manager.processed_lsn == 1047
    manager.advance_processed(2000)
    assert manager.processed_lsn == 1999


def test_live_insert_update_delete_reach_a_waiting_client(server: ServedApp, db: Any) -> None:
    task_id = insert_task(db, "first")
    last, _ = sync_to_end(server)

    waiting = Later(lambda: live_after(server, last))
    second = insert_task(db, "second")
    response = waiting.result()
    assert response.status_code == 200
    assert response.headers["electric-cursor"]
    assert "electric-schema" not in response.headers
    [insert] = changes(response)
    assert insert["headers"]["operation"] == "insert" and insert["value"]["id"] == second
    assert insert["headers"]["txids"] and insert["headers"]["last"] is True
    assert int(insert["headers"]["lsn"]) > int(last.json()[-1]["headers"]["global_last_seen_lsn"])
    assert controls(response)[-1] == "up-to-date"

    db.execute("update tasks set status = 'running' where id = %s", [task_id])
    response = live_after(server, response)
    [update] = changes(response)
    assert update["headers"]["operation"] == "update"
    assert set(update["value"]) == {"id", "status", "updated_at"}  # key + changed columns (replica=default)
    assert update["value"]["status"] == "running"

    db.execute("delete from tasks where id = %s", [task_id])
    response = live_after(server, response)
    [delete] = changes(response)
    assert delete["headers"]["operation"] == "delete"
    assert delete["value"] == {"id": task_id}


def test_transaction_with_several_changes_marks_only_the_last(server: ServedApp, db: Any) -> None:
    last, _ = sync_to_end(server)
    with db.transaction():
        insert_task(db, "one")
        insert_task(db, "two")
    response = live_after(server, last)
    found = changes(response)
    assert [m["headers"].get("last", False) for m in found] == [False, True]
    assert len({m["headers"]["lsn"] for m in found}) == 1
    assert [m["headers"]["op_position"] for m in found] == [0, 1]


def test_replica_full_updates_carry_the_whole_row_and_old_values(server: ServedApp, db: Any) -> None:
    task_id = insert_task(db, "before")
    last, _ = sync_to_end(server, replica="full")
    db.execute("update tasks set title = 'after' where id = %s", [task_id])
    response = live_after(server, last, replica="full")
    [update] = changes(response)
    assert update["value"]["title"] == "after" and "priority" in update["value"]
    assert update["old_value"]["title"] == "before"


def test_where_with_params_moves_rows_in_and_out(server: ServedApp, db: Any) -> None:
    inside = insert_task(db, "pending one")
    insert_task(db, "running one", status="running")
    params = {"where": "status = $1 and priority >= $2", "params[1]": "pending", "params[2]": "0"}
    last, rows = sync_to_end(server, **params)
    assert [r["value"]["id"] for r in rows] == [inside]

    db.execute("update tasks set status = 'running' where id = %s", [inside])
    response = live_after(server, last, **params)
    [moved_out] = changes(response)
    assert moved_out["headers"]["operation"] == "delete" and moved_out["value"] == {"id": inside}

    db.execute("update tasks set status = 'pending' where id = %s", [inside])
    response = live_after(server, response, **params)
    [moved_in] = changes(response)
    assert moved_in["headers"]["operation"] == "insert" and moved_in["value"]["title"] == "pending one"

    db.execute("update tasks set priority = -1 where status = 'running'")  # outside before and after: nothing
    db.execute("update tasks set description = 'x' where id = %s", [inside])
    response = live_after(server, response, **params)
    [update] = changes(response)
    assert update["headers"]["operation"] == "update" and update["value"]["description"] == "x"


def test_column_subset_limits_values_and_schema(server: ServedApp, db: Any) -> None:
    task_id = insert_task(db, "subset")
    last, rows = sync_to_end(server, columns='id,"title"')
    assert rows[0]["value"] == {"id": task_id, "title": "subset"}
    assert set(json.loads(last.headers["electric-schema"])) == {"id", "title"}
    db.execute("update tasks set priority = 9 where id = %s", [task_id])
    db.execute("update tasks set title = 'renamed' where id = %s", [task_id])
    response = live_after(server, last, columns='id,"title"')
    assert [m["value"] for m in changes(response)][-1] == {"id": task_id, "title": "renamed"}
    assert shape(server, columns="title").status_code == 400  # the primary key is required


def test_same_definition_shares_one_shape(server: ServedApp, db: Any) -> None:
    insert_task(db, "shared")
    first = shape(server).headers["electric-handle"]
    assert shape(server).headers["electric-handle"] == first
    assert shape(server, where="priority > 0").headers["electric-handle"] != first


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"table": ""}, "table"),
        ({"table": "no_such_table"}, "table"),
        ({"table": "tasks; drop table tasks"}, "table"),
        ({"table": "pg_catalog.pg_class"}, "table"),
        ({"where": "1=1; drop table tasks"}, "where"),
        ({"where": "true) or (true"}, "where"),
        ({"where": "title = 'x' -- comment"}, "where"),
        ({"where": "(select count(*) from auth.users) > 0"}, "where"),
        ({"where": "pg_sleep(10) is null"}, "where"),
        ({"where": "no_such_column = 1"}, "where"),
        ({"where": "priority = 'abc'"}, "where"),
        ({"where": "title"}, "where"),
        ({"where": "status = $1"}, "params"),
        ({"where": "status = $1", "params[1]": "y", "params[x]": "z"}, "params"),
        ({"columns": "id,nope"}, "columns"),
        ({"offset": "banana"}, "offset"),
        ({"offset": "5_5"}, "handle"),
        ({"replica": "partial"}, "replica"),
        ({"log": "changes_only"}, "log"),
        ({"live": "maybe", "offset": "now"}, "live"),
    ],
)
def test_malformed_or_hostile_requests_get_400_and_reach_no_sql(
    server: ServedApp, db: Any, params: dict[str, str], field: str
) -> None:
    insert_task(db, "still here")
    response = shape(server, **params)
    assert response.status_code == 400, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["message"] and field in body["errors"], body
    assert db.execute("select count(*) from tasks").fetchone() == (1,)
    assert httpx.get(server.url + "/v1/health").json() == {"status": "active"}


def test_unknown_handle_gets_409_with_must_refetch_and_the_current_handle(server: ServedApp, db: Any) -> None:
    insert_task(db, "x")
    current = shape(server).headers["electric-handle"]
    response = shape(server, offset="0_0", handle="bogus-123")
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == [{"headers": {"control": "must-refetch"}}]
    assert response.headers["electric-handle"] == current


def test_truncate_and_delete_rotate_the_shape(server: ServedApp, db: Any) -> None:
    insert_task(db, "x")
    last, _ = sync_to_end(server)
    db.execute("truncate tasks cascade")
    response = live_after(server, last)
    assert response.status_code == 409
    new_handle = response.headers["electric-handle"]
    assert new_handle != last.headers["electric-handle"]
    deleted = httpx.delete(server.url + "/v1/shape", params={"table": "tasks", "handle": new_handle, "secret": SECRET})
    assert deleted.status_code == 202
    assert shape(server, offset="0_0", handle=new_handle).status_code == 409


def test_live_request_times_out_with_up_to_date_and_a_new_cursor(target_url: str, tmp_path: Path, db: Any) -> None:
    with _server(target_url, tmp_path / "s", live_timeout=0.3) as served:
        last, _ = sync_to_end(served)
        response = live_after(served, last)
        assert response.status_code == 200
        assert controls(response) == ["up-to-date"]
        assert response.headers["electric-offset"] == last.headers["electric-offset"]
        again = shape(
            served,
            offset=last.headers["electric-offset"],
            handle=last.headers["electric-handle"],
            live="true",
            cursor=response.headers["electric-cursor"],
        )
        assert int(again.headers["electric-cursor"]) > int(response.headers["electric-cursor"])


def test_offset_now_skips_the_snapshot(server: ServedApp, db: Any) -> None:
    insert_task(db, "old")
    response = shape(server, offset="now")
    assert response.status_code == 200 and changes(response) == [] and controls(response) == ["up-to-date"]
    insert_task(db, "new")
    response = live_after(server, response)
    assert [m["value"]["title"] for m in changes(response)] == ["new"]


def test_restart_resumes_the_same_handle_and_offsets(target_url: str, tmp_path: Path, db: Any) -> None:
    insert_task(db, "before restart")
    with _server(target_url, tmp_path / "s") as served:
        last, _ = sync_to_end(served)
    insert_task(db, "while down")
    with _server(target_url, tmp_path / "s") as served:
        response = live_after(served, last)
        assert response.status_code == 200, response.text
        assert response.headers["electric-handle"] == last.headers["electric-handle"]
        assert [m["value"]["title"] for m in changes(response)] == ["while down"]


def test_large_snapshot_is_paged_and_compressed(target_url: str, tmp_path: Path, db: Any) -> None:
    db.execute(
        "insert into tasks (user_id, title, description) select %s, 'task ' || i, repeat('x', 500)"
        " from generate_series(1, 3000) i",
        [USER],
    )
    with make_server(target_url, tmp_path / "s", max_chunk_bytes=256 * 1024) as served:
        first = httpx.get(
            served.url + "/v1/shape",
            params={"table": "tasks", "offset": "-1", "secret": SECRET},
            headers={"accept-encoding": "gzip"},
        )
        assert first.headers["content-encoding"] == "gzip"
        assert "up-to-date" not in controls(first)
        _, rows = sync_to_end(served)
        assert len({r["key"] for r in rows}) == 3000


def test_health_and_metrics(server: ServedApp, db: Any) -> None:
    insert_task(db, "m")
    sync_to_end(server)
    assert httpx.get(server.url + "/v1/health").json() == {"status": "active"}
    text = httpx.get(server.url + "/metrics").text
    assert "pgferry_sync_shapes 1.0" in text
    assert "pgferry_sync_replication_lag_bytes" in text
    assert "pgferry_sync_commit_to_response_seconds" in text


def test_random_where_clauses_never_crash_the_server(server: ServedApp, db: Any) -> None:
    """Fragments of SQL, valid and not, glued at random: every answer is a 200 or a 400, never a 500."""
    import random

    insert_task(db, "fuzz")
    pieces = [
        "title", "priority", "status", "tags", "metadata", "embedding", "id", "'x'", "'it''s'", "1", "-2.5e3",
        "$1", "$2", "=", "<>", "<", ">=", "+", "*", "/", "||", "and", "or", "not", "is", "null", "true", "in",
        "(", ")", ",", "::int", "::text[]", "like", "ilike", "between", "any", "array[", "]", "@>", "lower(",
        "select", ";", "--", "/*", "*/", "\"", "'", "\\", "\x00", "pg_sleep(", "drop table tasks", "%s", "{}",
    ]  # fmt: skip
    rng = random.Random(20261125)
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=30) as client:
        for _ in range(150):
            where = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 9)))
            params = {"params[1]": "1"} if "$1" in where else {}
            response = client.get(
                server.url + "/v1/shape",
                params={"table": "tasks", "offset": "-1", "where": where, "secret": SECRET, **params},
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code in (200, 400), (where, response.text)
    assert statuses.get(400, 0) > 50
    assert db.execute("select count(*) from tasks").fetchone() == (1,)
    assert httpx.get(server.url + "/v1/health").json() == {"status": "active"}


def test_database_restart_is_survived_and_live_clients_continue(
    server_pair: ServerPair, target_url: str, tmp_path: Path, db: Any
) -> None:
    """The feed reconnects after PostgreSQL restarts; a client keeps its handle and gets later changes."""
    insert_task(db, "before")
    with _server(target_url, tmp_path / "s") as served:
        last, _ = sync_to_end(served)
        server_pair.target.restart()
        deadline = time.monotonic() + 60
        while httpx.get(served.url + "/v1/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        with psycopg.connect(target_url, autocommit=True) as conn:
            insert_task(conn, "after restart")
        response = live_after(served, last)
        while not changes(response) and time.monotonic() < deadline:
            response = live_after(served, response)
        assert response.status_code == 200, response.text
        assert [m["value"]["title"] for m in changes(response)] == ["after restart"]


def test_many_filtered_shapes_on_one_table_each_get_their_own_changes(server: ServedApp, db: Any) -> None:
    """Shapes of one table are evaluated together (one query per transaction); each must still get only its rows."""
    lasts = {}
    for priority in range(5):
        params = {"where": "priority = $1", "params[1]": str(priority)}
        lasts[priority], _ = sync_to_end(server, **params)
    with db.transaction():
        for priority in range(5):
            insert_task(db, f"p{priority}", priority=priority)
        insert_task(db, "p9", priority=9)
    for priority in range(5):
        params = {"where": "priority = $1", "params[1]": str(priority)}
        response = live_after(server, lasts[priority], **params)
        assert [m["value"]["title"] for m in changes(response)] == [f"p{priority}"]


def test_a_where_clause_failing_at_run_time_is_a_400(server: ServedApp, db: Any) -> None:
    insert_task(db, "divides by zero", priority=3)
    response = shape(server, where="10 / (priority - 3) > 1")
    assert response.status_code == 400, response.text
    assert "division by zero" in response.json()["errors"]["where"][0]
    assert httpx.get(server.url + "/v1/health").status_code == 200


def test_abandoned_long_polls_are_released_at_once(target_url: str, tmp_path: Path, db: Any) -> None:
    with _server(target_url, tmp_path / "s", live_timeout=20) as served:
        last, _ = sync_to_end(served)
        query = {
            "table": "tasks",
            "offset": last.headers["electric-offset"],
            "handle": last.headers["electric-handle"],
            "live": "true",
            "secret": SECRET,
        }
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                httpx.get(served.url + "/v1/shape", params=query, timeout=0.5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if "pgferry_sync_live_clients 0.0" in httpx.get(served.url + "/metrics").text:
                break
            time.sleep(0.1)
        assert "pgferry_sync_live_clients 0.0" in httpx.get(served.url + "/metrics").text


def test_serve_refuses_a_role_without_replication_in_one_line(target_url: str) -> None:
    from tests.cli_helpers import run_pgferry

    role = f"no_repl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(target_url, autocommit=True) as conn:
        conn.execute(f"create role {role} login password 'pw'")
    try:
        url = target_url.replace("postgres@", f"{role}:pw@", 1)
        assert f"{role}:pw@" in url
        result = run_pgferry("sync", "serve", "--database-url", url, "--port", "1", "--insecure")
        assert result.returncode == 2
        assert "may not use replication" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        unreachable = run_pgferry(
            "sync", "serve", "--database-url", "postgresql://u@127.0.0.1:1/db", "--port", "1", "--insecure"
        )
        assert unreachable.returncode == 2 and "cannot connect" in unreachable.stderr
    finally:
        with psycopg.connect(target_url, autocommit=True) as conn:
            conn.execute(f"drop role {role}")


def test_serve_requires_a_secret_unless_insecure(target_url: str) -> None:
    from tests.cli_helpers import run_pgferry

    result = run_pgferry("sync", "serve", "--database-url", target_url, "--port", "1", env={"ELECTRIC_SECRET": ""})
    assert result.returncode == 2
    assert "ELECTRIC_SECRET" in result.stderr and "--insecure" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    short = run_pgferry("sync", "serve", "--database-url", target_url, "--port", "1", env={"ELECTRIC_SECRET": "short"})
    assert short.returncode == 2 and "at least 16 characters" in short.stderr
    forbidden = run_pgferry(
        "sync", "serve", "--database-url", target_url, "--port", "1", "--insecure", "--table", "auth.users"
    )
    assert forbidden.returncode == 2 and "never serves" in forbidden.stderr


def test_values_are_the_same_text_in_the_snapshot_and_in_live_changes(server: ServedApp, db: Any) -> None:
    """Snapshot rows come from a SQL session and live rows from the replication stream: every type the platform
    uses must print identically in both, or a client would see a value change that never happened."""
    columns = (
        "id, user_id, agent_name, inputs, duration_ms, cost_usd, started_at, prompt_tokens, status, outputs, error"
    )
    values = (
        'gen_random_uuid(), %s, \'planner\', \'{"q": "é ☃", "n": 1.50}\', 9007199254740993, 0.000123,'
        " '2024-02-29 23:59:59.123456+05:30', 7, 'running', null, 'line1\nline2 \"quoted\" \\\\'"
    )
    db.execute(f"insert into agent_executions ({columns}) values ({values})", [USER])
    db.execute(
        "insert into tasks (user_id, title, embedding, due_at, tags) values"
        " (%s, 'vec', array_fill(0.1::real, array[1536])::extensions.vector, '0044-03-15 12:00 BC', '{\"a,b\",NULL}')",
        [USER],
    )
    params = {"table": "agent_executions", "replica": "full"}
    last, [snapshot] = sync_to_end(server, **params)
    db.execute("update agent_executions set status = 'succeeded'")
    [update] = changes(live_after(server, last, **params))
    for name, text in snapshot["value"].items():
        if name not in ("status", "updated_at"):
            assert update["value"][name] == text, name
    assert snapshot["value"]["cost_usd"] == "0.000123"
    assert snapshot["value"]["duration_ms"] == "9007199254740993"
    assert snapshot["value"]["started_at"] == "2024-02-29 18:29:59.123456+00"
    assert json.loads(snapshot["value"]["inputs"]) == {"q": "é ☃", "n": 1.50}

    last, [task] = sync_to_end(server, replica="full")
    db.execute("update tasks set title = 'vec2'")
    [task_update] = changes(live_after(server, last, replica="full"))
    for name in ("embedding", "due_at", "tags", "created_at"):
        assert task_update["value"][name] == task["value"][name], name
    assert task["value"]["embedding"].startswith("[0.1,0.1,")
    assert task["value"]["due_at"] == "0044-03-15 12:00:00+00 BC"
    assert task["value"]["tags"] == '{"a,b",NULL}'


def test_kill_9_of_the_server_loses_and_duplicates_nothing(target_url: str, tmp_path: Path, db: Any) -> None:
    """kill -9 while transactions stream in, start again on the same data dir: the client, resuming with its
    handle and offset, sees every row exactly once."""
    import os
    import signal
    import subprocess
    import sys

    from pgferry.localstack.cluster import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "pgferry", "sync", "serve", "--database-url", target_url, "--port", str(port)]
    command += ["--data-dir", str(tmp_path / "s"), "--live-timeout", "1"]
    env = {**os.environ, "ELECTRIC_SECRET": SECRET}

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/v1/health", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("sync server did not start")

    class Remote:
        url = base

    for i in range(5):
        insert_task(db, f"before {i}")
    proc = start()
    try:
        # The served long-polls run on uvicorn's C HTTP parser and uvloop (issue 16: half the cost per request).
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "httptools/parser" in maps and "uvloop/loop" in maps
        last, rows = sync_to_end(Remote)  # type: ignore[arg-type]
        seen = [m["key"] for m in rows]

        def write_sixty() -> None:
            with psycopg.connect(target_url, autocommit=True) as conn:
                for i in range(60):
                    insert_task(conn, f"t{i}")

        writer = Later(write_sixty)
        response = last
        while len(seen) < 25:
            response = live_after(Remote, response)  # type: ignore[arg-type]
            seen += [m["key"] for m in changes(response) if m["headers"]["operation"] == "insert"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        writer.result()
        proc = start()
        deadline = time.monotonic() + 60
        while len(seen) < 65 and time.monotonic() < deadline:
            response = live_after(Remote, response)  # type: ignore[arg-type]
            assert response.status_code == 200, response.text  # resumed: no 409, no refetch
            seen += [m["key"] for m in changes(response) if m["headers"]["operation"] == "insert"]
        assert len(seen) == 65 and len(set(seen)) == 65
    finally:
        proc.kill()
        proc.wait()
