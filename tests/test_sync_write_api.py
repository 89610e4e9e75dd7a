"""The write API (``POST /v1/mutations``) on real servers: the proxy over HTTP, a real PostgreSQL with the
platform's RLS policies, and the dev sync server whose shape log is the independent witness of the txid.

Oracles: the database read back as its owner (``postgres``, not through the API), the shape log's
``headers.txids`` as the replication stream reports them, and PostgreSQL's own ``pg_current_xact_id`` semantics.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pgferry.replication.lsn import Lsn
from pgferry.sync import MutationRejectedError, WriteApiConfig, create_write_app
from pgferry.sync.writer import BatchRejectedError
from pgferry.testing.asgi import ServedApp
from tests.write_helpers import ALICE, BOB, WriteStack, mutation, token_for, verifier, write_stack


@pytest.fixture
def stack(target_url: str, tmp_path: Path) -> Iterator[WriteStack]:
    with write_stack(target_url, tmp_path / "sync") as served:
        yield served


def rows(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []


def add_task(url: str, user: uuid.UUID, title: str) -> str:
    found = rows(url, "insert into tasks (user_id, title) values (%s, %s) returning id::text", [user, title])
    return str(found[0][0])


def synced(stack: WriteStack, user: uuid.UUID = ALICE) -> httpx.Response:
    """The user's tasks shape paged to up-to-date (so later changes arrive from the log, with their txids)."""
    response = stack.shape(user)
    while response.status_code == 200 and "electric-up-to-date" not in response.headers:
        response = stack.shape(
            user, offset=response.headers["electric-offset"], handle=response.headers["electric-handle"]
        )
    assert response.status_code == 200, response.text
    return response


def follow_until(stack: WriteStack, last: httpx.Response, predicate: Any, user: uuid.UUID = ALICE) -> list[Any]:
    """Live changes after ``last`` until ``predicate(changes)`` holds."""
    seen: list[dict[str, Any]] = []
    response = last
    for _ in range(20):
        response = stack.shape(
            user,
            offset=response.headers["electric-offset"],
            handle=response.headers["electric-handle"],
            live="true",
        )
        assert response.status_code == 200, response.text
        seen += [m for m in response.json() if "key" in m]
        if predicate(seen):
            return seen
    raise AssertionError(f"never saw the expected changes: {seen}")


def test_a_batch_is_applied_in_one_transaction_whose_txid_the_shape_log_shows(stack: WriteStack) -> None:
    existing = add_task(stack.database_url, ALICE, "written before")
    last = synced(stack)
    new_id = str(uuid.uuid4())
    batch = [
        mutation("insert", {"id": new_id, "title": "from the write API", "tags": ["a", "b c"], "priority": 3}),
        mutation("update", {"id": existing, "status": "running"}),
    ]
    response = stack.post(batch)
    assert response.status_code == 200, response.text
    body = response.json()
    txid = body["txid"]
    assert txid.isdigit()
    assert [r["status"] for r in body["results"]] == ["applied", "applied"]
    assert [r["id"] for r in body["results"]] == [m["id"] for m in batch]
    assert {r["txid"] for r in body["results"]} == {txid}
    assert body["results"][0]["key"] == {"id": new_id}

    # The owner column was filled from the token; both rows were written by one transaction (same xmin).
    written = rows(
        stack.database_url,
        "select id::text, user_id, title, tags, priority, status, xmin::text from tasks order by title",
    )
    by_id = {r[0]: r for r in written}
    assert by_id[new_id][1:5] == (ALICE, "from the write API", ["a", "b c"], 3)
    assert by_id[existing][5] == "running"
    assert by_id[new_id][6] == by_id[existing][6] == txid

    # The independent witness: the replication stream's txids on the two changes.
    seen = follow_until(
        stack, last, lambda changes: sum(1 for c in changes if c["headers"].get("txids") == [int(txid)]) >= 2
    )
    ours = [c for c in seen if c["headers"].get("txids") == [int(txid)]]
    assert {c["headers"]["operation"] for c in ours} == {"insert", "update"}

    # The commit position: at or after the start of the commit record, which the shape log names (headers.lsn,
    # from the replication stream), and before the WAL written after the answer.
    position = Lsn.parse(body["lsn"])
    assert {r["lsn"] for r in body["results"]} == {body["lsn"]}
    assert {int(c["headers"]["lsn"]) for c in ours} == {int(ours[0]["headers"]["lsn"])}
    assert int(ours[0]["headers"]["lsn"]) <= position
    after = rows(stack.database_url, "select pg_catalog.pg_current_wal_insert_lsn()::text")[0][0]
    assert position < Lsn.parse(after)


def test_a_replayed_mutation_id_is_not_applied_twice(stack: WriteStack) -> None:
    task = add_task(stack.database_url, ALICE, "original")
    first = mutation("update", {"id": task, "title": "first edit"})
    response = stack.post([first])
    assert response.status_code == 200, response.text
    first_txid = response.json()["txid"]
    later = stack.post([mutation("update", {"id": task, "title": "second edit"})])
    assert later.status_code == 200, later.text

    again = stack.post([first])  # the client never saw the first answer and sends the mutation again
    assert again.status_code == 200, again.text
    result = again.json()["results"][0]
    assert result["status"] == "replayed"
    assert result["txid"] == first_txid == again.json()["txid"]
    # A replay's commit position still bounds the original commit (the answer's, never a stale stored one).
    assert Lsn.parse(result["lsn"]) == Lsn.parse(again.json()["lsn"]) >= Lsn.parse(response.json()["lsn"])
    assert rows(stack.database_url, "select title from tasks where id = %s", [task]) == [("second edit",)]
    recorded = rows(stack.database_url, "select count(*) from pgferry.applied_mutations where id = %s", [first["id"]])
    assert recorded == [(1,)]

    # A batch mixing a replay and a new mutation applies only the new one.
    insert = mutation("insert", {"title": "new in a mixed batch"})
    mixed = stack.post([first, insert])
    assert mixed.status_code == 200, mixed.text
    assert [r["status"] for r in mixed.json()["results"]] == ["replayed", "applied"]
    assert mixed.json()["txid"] != first_txid
    assert rows(stack.database_url, "select count(*) from tasks") == [(2,)]


def test_concurrent_requests_with_the_same_id_apply_it_once(stack: WriteStack) -> None:
    insert = mutation("insert", {"id": str(uuid.uuid4()), "title": "raced"})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: stack.post([insert]), range(4)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    statuses = sorted(r.json()["results"][0]["status"] for r in responses)
    assert statuses == ["applied", "replayed", "replayed", "replayed"]
    assert len({r.json()["txid"] for r in responses}) == 1
    assert rows(stack.database_url, "select count(*) from tasks") == [(1,)]


def test_rls_decides_other_users_rows_are_refused_and_nothing_is_written(stack: WriteStack) -> None:
    alices = add_task(stack.database_url, ALICE, "alice's")
    good = mutation("insert", {"title": "bob's own"})

    update = stack.post([good, mutation("update", {"id": alices, "title": "taken over"})], user=BOB)
    assert update.status_code == 404, update.text
    (error,) = update.json()["errors"]
    assert error["field"] == "mutations[1].row" and error["status"] == 404

    steal = stack.post([good, mutation("insert", {"title": "planted", "user_id": str(ALICE)})], user=BOB)
    assert steal.status_code == 403, steal.text
    assert steal.json()["errors"][0]["field"] == "mutations[1].row"

    reassign = stack.post([mutation("update", {"id": alices, "user_id": str(BOB)})])
    assert reassign.status_code == 403, reassign.text

    delete = stack.post([mutation("delete", {"id": alices})], user=BOB)
    assert delete.status_code == 200  # nothing of Bob's had that key: nothing deleted, nothing revealed
    assert delete.json()["results"][0]["changed"] is False

    assert rows(stack.database_url, "select user_id, title from tasks order by title") == [(ALICE, "alice's")]
    assert rows(stack.database_url, "select count(*) from pgferry.applied_mutations") == [(1,)]  # the delete


@pytest.mark.parametrize(
    ("item", "status", "field", "words"),
    [
        (mutation("insert", {"title": "x"}, table="public.nope"), 403, "mutations[0].table", "does not accept"),
        (mutation("insert", {"title": "x"}, table="auth.users"), 403, "mutations[0].table", "does not accept"),
        (mutation("insert", {"title": "x", "nope": 1}), 400, "mutations[0].row.nope", "no such column"),
        (mutation("insert", {"title": "x", "priority": "high"}), 400, "mutations[0].row.priority", "integer"),
        (mutation("insert", {"title": "x", "priority": 2**40}), 400, "mutations[0].row.priority", "out of range"),
        (mutation("insert", {"title": 5}), 400, "mutations[0].row.title", "string"),
        (mutation("insert", {"title": "x", "tags": "a"}), 400, "mutations[0].row.tags", "array"),
        (mutation("insert", {"title": "x", "tags": ["a", 1]}), 400, "mutations[0].row.tags[1]", "string"),
        (mutation("insert", {"title": "x", "due_at": "tomorrow"}), 400, "mutations[0].row.due_at", "ISO 8601"),
        (mutation("insert", {"title": "x", "id": "not-a-uuid"}), 400, "mutations[0].row.id", "UUID"),
        (mutation("insert", {"title": "x", "embedding": [1, 2]}), 400, "mutations[0].row.embedding", "1536"),
        (mutation("update", {"title": "x"}), 400, "mutations[0].row.id", "primary key"),
        (mutation("upsert", {"title": "x"}), 400, "mutations[0].op", "insert, update or delete"),
        ({"id": "7", "op": "insert", "table": "tasks", "row": {}}, 400, "mutations[0].id", "UUID"),
        ({**mutation("insert", {"title": "x"}), "extra": 1}, 400, "mutations[0].extra", "not a mutation field"),
        (mutation("insert", {"title": "x", "status": "bogus"}), 400, "mutations[0].row", "ck_tasks_status"),
        (mutation("insert", {"title": None}), 400, "mutations[0].row.title", "null"),
    ],
)
def test_bad_mutations_are_refused_naming_the_field(
    stack: WriteStack, item: dict[str, Any], status: int, field: str, words: str
) -> None:
    response = stack.post([mutation("insert", {"title": "fine"}), item])
    expected_field = field.replace("mutations[0]", "mutations[1]")
    assert response.status_code == status, response.text
    errors = response.json()["errors"]
    assert [e["field"] for e in errors] == [expected_field], errors
    assert words in errors[0]["problem"], errors
    assert rows(stack.database_url, "select count(*) from tasks") == [(0,)]


def test_every_problem_of_a_batch_is_reported_at_once(stack: WriteStack) -> None:
    response = stack.post(
        [
            mutation("insert", {"title": 1}),
            mutation("insert", {"title": "ok"}),
            mutation("update", {"id": str(uuid.uuid4()), "priority": "x"}),
        ]
    )
    assert response.status_code == 400
    assert [e["field"] for e in response.json()["errors"]] == ["mutations[0].row.title", "mutations[2].row.priority"]


@pytest.mark.parametrize(
    ("kind", "status"),
    [("none", 401), ("expired", 401), ("service_role", 401), ("not_json", 400), ("text_plain", 415), ("shape", 400)],
)
def test_bad_requests_get_one_clear_error(stack: WriteStack, kind: str, status: int) -> None:
    url = f"{stack.proxy_url}/v1/mutations"
    good = {"authorization": f"Bearer {token_for(ALICE)}", "content-type": "application/json"}
    body = (
        b'{"mutations": [{"id": "%s", "op": "insert", "table": "tasks", "row": {"title": "x"}}]}'
        % str(uuid.uuid4()).encode()
    )
    headers = dict(good)
    if kind == "none":
        del headers["authorization"]
    elif kind == "expired":
        headers["authorization"] = f"Bearer {token_for(ALICE, expires_in=-300)}"
    elif kind == "service_role":
        headers["authorization"] = f"Bearer {token_for(ALICE, role='service_role')}"
    elif kind == "not_json":
        body = b"{mutations"
    elif kind == "text_plain":
        headers["content-type"] = "text/plain"
    elif kind == "shape":
        body = b'{"rows": []}'
    response = httpx.post(url, content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    assert response.headers["cache-control"] == "no-store"
    assert "message" in response.json()
    assert rows(stack.database_url, "select count(*) from tasks") == [(0,)]


def test_a_mutation_id_used_by_another_user_is_a_conflict(stack: WriteStack) -> None:
    shared = mutation("insert", {"title": "alice's"})
    assert stack.post([shared]).status_code == 200
    response = stack.post([{**shared, "row": {"title": "bob's"}}], user=BOB)
    assert response.status_code == 409, response.text
    assert response.json()["errors"][0]["field"] == "mutations[0].id"
    assert rows(stack.database_url, "select title from tasks") == [("alice's",)]


def test_values_round_trip_exactly(stack: WriteStack) -> None:
    embedding = [0.5, -1.25, 3.0] + [0.0] * 1533
    task_id = str(uuid.uuid4())
    row = {
        "id": task_id,
        "title": "types 'quoted' \\ and \"escaped\" \u2018curly\u2019",
        "tags": ["x,y", "{brace}", "", None],
        "metadata": {"nested": {"list": [1, 2.5, None, "s"]}, "unicode": "é✓"},
        "embedding": embedding,
        "due_at": "2026-12-01T10:30:00.123456+02:00",
        "priority": -7,
    }
    assert stack.post([mutation("insert", row)]).status_code == 200
    (stored,) = rows(
        stack.database_url,
        "select title, tags, metadata, embedding::text, due_at, priority from tasks where id = %s",
        [task_id],
    )
    assert stored[0] == row["title"]
    assert stored[1] == row["tags"]
    assert stored[2] == row["metadata"]
    assert [float(x) for x in stored[3].strip("[]").split(",")] == embedding
    assert stored[4].isoformat() == "2026-12-01T08:30:00.123456+00:00"
    assert stored[5] == -7


def test_expired_ids_are_purged(target_url: str, tmp_path: Path) -> None:
    with write_stack(target_url, tmp_path / "sync", retention_seconds=60) as stack:
        old = mutation("insert", {"title": "long ago"})
        assert stack.post([old]).status_code == 200
        rows(target_url, "update pgferry.applied_mutations set applied_at = now() - interval '2 minutes'")
        with psycopg.connect(target_url, autocommit=True) as conn:
            from pgferry.sync.writer import purge_applied_mutations

            assert purge_applied_mutations(conn, 60) == 1
        assert rows(target_url, "select count(*) from pgferry.applied_mutations") == [(0,)]


def test_the_write_api_mounts_as_an_app_of_its_own(target_url: str) -> None:
    app = create_write_app(WriteApiConfig(database_url=target_url, verifier=verifier()))
    with ServedApp(app) as served:
        response = httpx.post(
            f"{served.url}/v1/mutations",
            json={"mutations": [mutation("insert", {"title": "standalone"})]},
            headers={"authorization": f"Bearer {token_for(BOB)}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
    assert rows(target_url, "select user_id, title from tasks") == [(BOB, "standalone")]


def test_the_roles_of_the_api_cannot_read_the_idempotency_records(target_url: str) -> None:
    for role in ("anon", "authenticated"):
        with psycopg.connect(target_url) as conn:
            conn.execute(f"set role {role}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("select * from pgferry.applied_mutations")


def test_errors_are_one_line_and_pickle() -> None:
    import pickle  # the exceptions' own round trip, nothing untrusted

    problem = MutationRejectedError("id-1", "mutations[0].row.title", "must be\na string", 400)
    assert str(problem) == "mutations[0].row.title: must be a string"
    assert str(pickle.loads(pickle.dumps(problem))) == str(problem)  # noqa: S301
    batch = BatchRejectedError([problem, problem])
    assert str(pickle.loads(pickle.dumps(batch))) == str(batch)  # noqa: S301
    assert "\n" not in str(batch)


def test_runs_of_inserts_go_in_one_statement_and_a_refusal_inside_is_still_pinned(stack: WriteStack) -> None:
    ids = [str(uuid.uuid4()) for _ in range(8)]
    run = [
        mutation("insert", {"id": i, "title": f"run {n}", "tags": ["a b", 'q"'], "priority": n})
        for n, i in enumerate(ids)
    ]
    generated = [mutation("insert", {"title": f"db key {n}"}) for n in range(5)]  # keys chosen by the database
    response = stack.post(run + generated)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["key"]["id"] for r in results[:8]] == ids
    stored = dict(rows(stack.database_url, "select title, id::text from tasks"))
    assert [r["key"]["id"] for r in results[8:]] == [stored[f"db key {n}"] for n in range(5)]
    assert rows(stack.database_url, "select tags from tasks where title = 'run 3'") == [(["a b", 'q"'],)]

    bad = [
        mutation("insert", {"title": f"second run {n}", "status": "bogus" if n == 5 else "pending"}) for n in range(8)
    ]
    refused = stack.post(bad)
    assert refused.status_code == 400, refused.text
    assert [e["field"] for e in refused.json()["errors"]] == ["mutations[5].row"]
    assert rows(stack.database_url, "select count(*) from tasks") == [(13,)]


def test_a_run_of_inserts_round_trips_values_and_replays_from_its_records(stack: WriteStack) -> None:
    """The bulk path (rows and idempotency records as one JSON document each) must keep every value exact and store
    each mutation's own result, so a replay of the whole run returns them and writes nothing."""
    embedding = [0.5, -1.25, 3.0] + [0.0] * 1533
    run = [
        mutation(
            "insert",
            {
                "id": str(uuid.uuid4()),
                "title": f"run {n} 'quoted' \\ and \"escaped\" \u2018curly\u2019 {{brace}}",
                "tags": ["x,y", "{brace}", "", None, 'q"\\'],
                "metadata": {"nested": {"list": [1, 2.5, None, "s"]}, "unicode": "é✓", "n": n},
                "embedding": embedding,
                "due_at": "2026-12-01T10:30:00.123456+02:00",
                "priority": -n,
            },
        )
        for n in range(6)
    ]
    first = stack.post(run)
    assert first.status_code == 200, first.text
    body = first.json()
    assert [r["status"] for r in body["results"]] == ["applied"] * 6
    assert [r["key"]["id"] for r in body["results"]] == [m["row"]["id"] for m in run]
    stored = {
        r[0]: r[1:]
        for r in rows(
            stack.database_url,
            "select id::text, title, tags, metadata, embedding::text, due_at, priority from tasks",
        )
    }
    for m in run:
        row = m["row"]
        title, tags, metadata, vector, due_at, priority = stored[row["id"]]
        assert (title, tags, metadata, priority) == (row["title"], row["tags"], row["metadata"], row["priority"])
        assert [float(x) for x in vector.strip("[]").split(",")] == embedding
        assert due_at.isoformat() == "2026-12-01T08:30:00.123456+00:00"
    recorded = rows(
        stack.database_url, "select id::text, txid::text, result from pgferry.applied_mutations order by id"
    )
    assert sorted(r[0] for r in recorded) == sorted(m["id"] for m in run)
    assert {r[1] for r in recorded} == {body["txid"]}
    by_id = {r["id"]: r for r in body["results"]}
    # Stored as answered, but for the commit position, which is only known after the commit (a replay is answered
    # with the position read then).
    assert all(r[2] == {k: v for k, v in by_id[r[0]].items() if k != "lsn"} for r in recorded)

    again = stack.post(run)
    assert again.status_code == 200, again.text
    replayed = again.json()
    assert replayed["txid"] == body["txid"]
    assert [r["status"] for r in replayed["results"]] == ["replayed"] * 6
    assert [{**r, "status": "applied"} for r in replayed["results"]] == body["results"]
    assert rows(stack.database_url, "select count(*) from tasks") == [(6,)]


def test_a_batch_mixing_tables_and_column_sets_writes_every_row_by_column_name(stack: WriteStack) -> None:
    """Runs of inserts (four or more in a row) are grouped by table and by the *set* of columns: rows naming the
    same columns in another order share a run, and each value must still land in its own column (read back as the
    owner). Between runs: another table, another column set, an update of a row of the first run."""
    ids = [str(uuid.uuid4()) for _ in range(14)]
    environment = str(uuid.uuid4())
    # The same set in two orders (a value put in the wrong text column would still cast: nothing would fail).
    first_run = [
        mutation("insert", {"id": ids[n], "title": f"t{n}", "description": f"d{n}"})
        if n % 2
        else mutation("insert", {"id": ids[n], "description": f"d{n}", "title": f"t{n}"})
        for n in range(5)
    ]
    # Another set (any failure in a run redoes the whole batch one statement at a time, which would hide a wrong
    # column above: these rows keep one order).
    second_run = [
        mutation("insert", {"id": ids[n], "title": f"t{n}", "priority": n, "tags": [f"x{n}", "y"] if n % 2 else []})
        for n in range(5, 10)
    ]
    batch = [
        *first_run,
        mutation("insert", {"id": environment, "name": "env"}, table="public.environments"),
        *second_run,
        mutation("insert", {"id": ids[10], "title": "t10", "environment_id": environment}),
        mutation("update", {"id": ids[0], "description": "d0 edited"}),
        # The owner sent in two rows, filled from the token in two: two runs of two (one statement each).
        mutation("insert", {"id": ids[11], "user_id": str(ALICE), "title": "t11"}),
        mutation("insert", {"user_id": str(ALICE), "id": ids[12], "title": "t12"}),
        mutation("insert", {"title": "t13", "id": ids[13]}),
    ]
    response = stack.post(batch)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["id"] for r in results] == [m["id"] for m in batch]
    assert [r["key"]["id"] for r in results] == [m["row"]["id"] for m in batch]
    stored = {
        r[0]: r[1:]
        for r in rows(
            stack.database_url,
            "select id::text, title, description, priority, tags, environment_id::text, user_id from tasks",
        )
    }
    expected = {ids[n]: (f"t{n}", f"d{n}", 0, [], None, ALICE) for n in range(5)}
    expected[ids[0]] = ("t0", "d0 edited", 0, [], None, ALICE)
    expected |= {ids[n]: (f"t{n}", None, n, [f"x{n}", "y"] if n % 2 else [], None, ALICE) for n in range(5, 10)}
    expected[ids[10]] = ("t10", None, 0, [], environment, ALICE)
    expected |= {ids[n]: (f"t{n}", None, 0, [], None, ALICE) for n in range(11, 14)}
    assert stored == expected
    assert rows(stack.database_url, "select id::text, name, user_id from environments") == [(environment, "env", ALICE)]
    recorded = rows(stack.database_url, "select id::text, txid from pgferry.applied_mutations")
    assert sorted(recorded) == sorted((m["id"], response.json()["txid"]) for m in batch)


def test_a_partly_seen_batch_applies_only_its_new_mutations_and_replays_the_rest(stack: WriteStack) -> None:
    """An outbox resends a batch of which the server applied some ids already (an earlier answer was lost): those
    come back with their stored results, the others are applied once, in one new transaction."""
    seen = [mutation("insert", {"id": str(uuid.uuid4()), "title": f"seen {n}"}) for n in range(6)]
    first = stack.post(seen)
    assert first.status_code == 200, first.text
    fresh = [mutation("insert", {"id": str(uuid.uuid4()), "title": f"new {n}"}) for n in range(6)]
    interleaved = [m for pair in zip(fresh, seen, strict=True) for m in pair]
    # The id in upper case is the same id: a replay, not a new mutation.
    interleaved[1] = {**interleaved[1], "id": interleaved[1]["id"].upper()}
    again = stack.post(interleaved)
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["txid"] != first.json()["txid"]
    by_id = {r["id"]: r for r in first.json()["results"]}
    for sent, result in zip(interleaved, body["results"], strict=True):
        ident = sent["id"].lower()
        assert result["id"] == ident
        if ident in by_id:
            # The stored result, with the commit position read at this answer (later, still covering the original).
            assert {**result, "status": "applied", "lsn": by_id[ident]["lsn"]} == by_id[ident]
            assert result["status"] == "replayed" and Lsn.parse(result["lsn"]) >= Lsn.parse(by_id[ident]["lsn"])
        else:
            assert (result["status"], result["txid"]) == ("applied", body["txid"])
    titles = sorted(r[0] for r in rows(stack.database_url, "select title from tasks"))
    assert titles == sorted([f"seen {n}" for n in range(6)] + [f"new {n}" for n in range(6)])
    recorded = rows(stack.database_url, "select txid, count(*) from pgferry.applied_mutations group by 1 order by 2")
    assert sorted(recorded) == sorted([(first.json()["txid"], 6), (body["txid"], 6)])


def test_one_id_in_two_spellings_in_a_batch_is_refused(stack: WriteStack) -> None:
    first = mutation("insert", {"title": "once"})
    response = stack.post([first, {**mutation("insert", {"title": "twice"}), "id": first["id"].upper()}])
    assert response.status_code == 400, response.text
    assert [e["field"] for e in response.json()["errors"]] == ["mutations[1].id"]
    assert rows(stack.database_url, "select count(*) from tasks") == [(0,)]


@pytest.mark.parametrize(
    ("bad_row", "field", "words"),
    [
        ({"title": 5}, "title", "string"),
        ({"title": "nul \x00 inside"}, "title", "NUL"),
        ({"user_id": "not-a-uuid"}, "user_id", "UUID"),
        ({"id": "0000"}, "id", "UUID"),
        ({"priority": "3"}, "priority", "integer"),
    ],
)
def test_a_bad_value_deep_in_a_large_batch_is_named_and_nothing_is_written(
    stack: WriteStack, bad_row: dict[str, Any], field: str, words: str
) -> None:
    """Thousands of rows naming the same columns are checked against one plan per column set; the plan must not
    let a later row's bad value through: it is refused by name, and the batch writes nothing."""
    columns = {"id": "", "user_id": str(ALICE), "title": "", "priority": 1}
    batch = [
        mutation("insert", {**columns, "id": str(uuid.uuid4()), "title": f"row {n}", "priority": n})
        for n in range(3000)
    ]
    batch[1717]["row"].update(bad_row)
    response = stack.post(batch)
    assert response.status_code == 400, response.text
    errors = response.json()["errors"]
    assert [e["field"] for e in errors] == [f"mutations[1717].row.{field}"], errors
    assert words in errors[0]["problem"], errors
    assert errors[0]["id"] == batch[1717]["id"]
    assert rows(stack.database_url, "select count(*) from tasks") == [(0,)]
    assert rows(stack.database_url, "select count(*) from pgferry.applied_mutations") == [(0,)]


def test_requests_racing_to_record_one_id_apply_it_once(stack: WriteStack) -> None:
    """Requests with the same insert (the key chosen by the database, so the rows themselves never collide) all
    reach the recording of the id before any commits — held there by a lock on the records' table. The first
    to commit wins; each other one fails on the id, rolls back its row and answers with the winner's result."""
    # A first request runs the write API's periodic purge of old ids (a delete, which the lock would hold too).
    warm_up = stack.post([mutation("delete", {"id": str(uuid.uuid4())})])
    assert warm_up.status_code == 200, warm_up.text
    insert = mutation("insert", {"title": "raced"})
    with psycopg.connect(stack.database_url) as blocker:
        blocker.execute("lock table pgferry.applied_mutations in share row exclusive mode")
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(stack.post, [insert]) for _ in range(3)]
            for _ in range(200):
                waiting = rows(
                    stack.database_url,
                    "select count(*) from pg_locks where not granted "
                    "and relation = 'pgferry.applied_mutations'::regclass",
                )
                if waiting == [(3,)]:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the requests never all reached the recording of the id")
            blocker.rollback()
            responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    statuses = sorted(r.json()["results"][0]["status"] for r in responses)
    assert statuses == ["applied", "replayed", "replayed"]
    assert len({r.json()["txid"] for r in responses}) == 1
    assert len({r.json()["results"][0]["key"]["id"] for r in responses}) == 1
    assert rows(stack.database_url, "select count(*) from tasks") == [(1,)]
