"""The SQLite replica on real data: values round-trip exactly, changes land atomically with the offset.

The oracle for values is PostgreSQL itself: the same rows read with psycopg (typed) and as ``::text``."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgferry.client import Change, LocalReplica, ShapeOptions, ShapeStream
from pgferry.client.values import parse_value, to_text
from tests.sync_helpers import SECRET, USER, make_server


@pytest.fixture
def db(target_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        yield conn


def sync_once(url: str, replica: LocalReplica, name: str = "tasks") -> None:
    """One pass of a client: gather batches, apply at each up-to-date with the position."""
    position = replica.position(name)
    offset, handle = position if position else ("-1", None)
    gathered: list[Change] = []
    reset = False
    with ShapeStream(
        url, ShapeOptions("tasks", extra={"secret": SECRET}, live=False), offset=offset, handle=handle
    ) as s:
        for batch in s:
            if batch.must_refetch:
                gathered, reset = [], True
                continue
            gathered.extend(batch.changes)
            if batch.up_to_date:
                replica.apply(
                    name,
                    "public.tasks",
                    gathered,
                    offset=batch.offset,
                    handle=batch.handle,
                    schema=batch.schema,
                    reset=reset,
                )
                gathered, reset = [], False


TRICKY_ROWS = [
    {
        "title": "quotes ' \" and back\\slash, {braces} and NULL",
        "tags": ["", "NULL", "a,b", 'q"uote', "back\\slash", "{x}", "spa ce", "ünï✓"],
        "metadata": {"nested": {"list": [1, 2.5, None, "s"], "empty": {}}, "emoji": "🚀", "n": 1e-7},
        "embedding": [0.1, -2.5, 3.0e-8] + [0.0] * 1533,
        "due_at": dt.datetime(2026, 12, 1, 8, 30, 0, 123456, tzinfo=dt.UTC),
        "priority": -2147483648,
    },
    {"title": "empty things", "tags": [], "metadata": [], "embedding": None, "due_at": None, "priority": 0},
]


def test_values_round_trip_exactly(target_url: str, db: Any, tmp_path: Path) -> None:
    for row in TRICKY_ROWS:
        db.execute(
            "insert into tasks (user_id, title, tags, metadata, embedding, due_at, priority) "
            "values (%s, %s, %s, %s::jsonb, %s::extensions.vector, %s, %s)",
            [
                USER,
                row["title"],
                row["tags"],
                json.dumps(row["metadata"]),
                None if row["embedding"] is None else str(row["embedding"]),
                row["due_at"],
                row["priority"],
            ],
        )
    replica = LocalReplica(tmp_path / "replica.db")
    with make_server(target_url, tmp_path / "sync") as server:
        sync_once(server.url, replica)

    columns = ["id", "user_id", "title", "tags", "metadata", "embedding", "due_at", "priority", "created_at"]
    expected_text = {
        r[0]: dict(zip(columns, r, strict=True))
        for r in db.execute(f"select {', '.join(c + '::text' for c in columns)} from tasks")
    }
    typed = {
        str(r[0]): dict(zip(columns, r, strict=True))
        for r in db.execute(
            "select id, user_id, title, tags, metadata, embedding::text, due_at, priority, created_at from tasks"
        )
    }
    local_text = {r["id"]: r for r in replica.rows("tasks", typed=False)}
    local = {str(r["id"]): r for r in replica.rows("tasks")}
    assert set(local) == set(expected_text) and len(local) == 2
    for key, pg_text in expected_text.items():
        assert {c: local_text[key][c] for c in columns} == pg_text  # stored exactly as PostgreSQL writes it
        pg = typed[key]
        got = local[key]
        assert got["id"] == uuid.UUID(key) and got["user_id"] == USER
        assert got["title"] == pg["title"] and got["tags"] == pg["tags"] and got["metadata"] == pg["metadata"]
        assert got["due_at"] == pg["due_at"] and got["created_at"] == pg["created_at"]
        assert got["priority"] == pg["priority"]
        expected_vector = (
            None if pg["embedding"] is None else [float(x) for x in pg["embedding"].strip("[]").split(",")]
        )
        assert got["embedding"] == expected_vector
        # And back: the Python value renders to the text the server sends (what optimistic writes store).
        schema = replica.schema("tasks")
        for column in ("tags", "due_at", "priority", "id", "embedding", "created_at"):
            assert parse_value(to_text(got[column], schema[column]), schema[column]) == got[column]


def test_changes_and_position_commit_together_or_not_at_all(target_url: str, db: Any, tmp_path: Path) -> None:
    db.execute("insert into tasks (user_id, title) values (%s, 'one')", [USER])
    replica = LocalReplica(tmp_path / "replica.db")
    with make_server(target_url, tmp_path / "sync") as server:
        sync_once(server.url, replica)
    before = (replica.position("tasks"), replica.rows("tasks", typed=False))
    good = Change(
        '"public"."tasks"/"00000000-0000-4000-8000-000000000001"',
        "insert",
        {"id": "00000000-0000-4000-8000-000000000001", "title": "two"},
    )
    unbindable = Change('"public"."tasks"/"x"', "insert", {"title": object()})  # type: ignore[dict-item]
    with pytest.raises(sqlite3.Error):
        replica.apply("tasks", "public.tasks", [good, unbindable], offset="999_0", handle="h", schema=None)
    assert (replica.position("tasks"), replica.rows("tasks", typed=False)) == before

    # A reopened replica resumes where its rows are: no refetch, no duplicates, the new row arrives once.
    replica.close()
    db.execute("insert into tasks (user_id, title) values (%s, 'three')", [USER])
    reopened = LocalReplica(tmp_path / "replica.db")
    with make_server(target_url, tmp_path / "sync") as server:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the server's feed has the new row (it lags under load)
            sync_once(server.url, reopened)
            if len(reopened.rows("tasks")) >= 2:
                break
            time.sleep(0.2)
    assert sorted(r["title"] for r in reopened.rows("tasks")) == ["one", "three"]
    assert reopened.position("tasks") != before[0]


STAGE_SCHEMA = {"id": {"type": "text", "pk_index": 0}, "title": {"type": "text"}, "note": {"type": "text"}}


def staged_change(n: int, op: str = "insert", **values: str | None) -> Change:
    key = f'"public"."tasks"/"{n}"'
    if op == "insert":
        return Change(key, op, {"id": str(n), "title": f"t{n} 'q' \"d\" ✓", "note": None if n % 3 else "x", **values})
    return Change(key, op, {"id": str(n), **values}, (1000 + n,))


def replayed(changes: list[Change]) -> dict[str, tuple[str | None, ...]]:
    """The oracle: the changes replayed on a dict, as the protocol defines them."""
    state: dict[str, dict[str, str | None]] = {}
    for change in changes:
        if change.operation == "insert":
            state[change.key] = {c: change.value.get(c) for c in STAGE_SCHEMA}
        elif change.operation == "update":
            state[change.key].update(change.value)
        else:
            state.pop(change.key, None)
    return {key: tuple(row[c] for c in STAGE_SCHEMA) for key, row in state.items()}


def replica_state(replica: LocalReplica) -> dict[str, tuple[str | None, ...]]:
    return {row[0]: tuple(row[1:]) for row in replica.query('select _key, id, title, note from "_synced_tasks"')}


def test_staged_changes_are_invisible_until_applied_and_gone_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "replica.db"
    replica = LocalReplica(path)
    replica.apply("tasks", "public.tasks", [], offset="0_0", handle="h1", schema=STAGE_SCHEMA)
    replica.stage("tasks", [staged_change(n) for n in range(3000)], schema=STAGE_SCHEMA)
    assert replica_state(replica) == {} and replica.rows("tasks") == []
    replica.close()  # a crash before the up-to-date: the staged rows must not survive, the offset did not move

    reopened = LocalReplica(path)
    assert reopened.position("tasks") == ("0_0", "h1")
    assert reopened.query("select name from sqlite_master where name like '%stage%'") == [("_pgferry_staged",)]
    reopened.apply("tasks", "public.tasks", [], offset="1_0", handle="h1", schema=STAGE_SCHEMA)
    assert replica_state(reopened) == {}

    # A snapshot staged in two parts (inserts only: the one-statement path), then applied with the last page.
    snapshot = [staged_change(n) for n in range(12_000)]
    reopened.stage("tasks", snapshot[:5000], schema=STAGE_SCHEMA)
    reopened.stage("tasks", snapshot[5000:11_000], schema=STAGE_SCHEMA)
    reopened.apply("tasks", "public.tasks", snapshot[11_000:], offset="2_0", handle="h1", schema=STAGE_SCHEMA)
    assert replica_state(reopened) == replayed(snapshot)
    assert reopened.query('select count(*) from "tasks"') == [(12_000,)]  # the visible table too

    # Live changes staged with inserts, updates and deletes (the replayed path), some of the same keys.
    live = [
        staged_change(5, "update", title="renamed"),
        staged_change(7, "delete"),
        staged_change(7),
        staged_change(12_001),
        staged_change(8, "delete"),
        staged_change(12_001, "update", note=None, title="new"),
    ]
    reopened.stage("tasks", live, schema=STAGE_SCHEMA)
    seen = reopened.apply(
        "tasks", "public.tasks", [staged_change(9, "update", note="last")], offset="3_0", handle="h1", schema=None
    )
    expected = replayed([*snapshot, *live, staged_change(9, "update", note="last")])
    assert replica_state(reopened) == expected
    assert {row[0]: tuple(row[1:]) for row in reopened.query('select _key, id, title, note from "tasks"')} == expected
    assert seen == {1005, 1007, 1008, 1009, 13_001}
    assert reopened.position("tasks") == ("3_0", "h1")


def next_tables(replica: LocalReplica) -> list[str]:
    return [
        r[0] for r in replica.query("select name from sqlite_master where name like '\\_pgferry\\_next%' escape '\\'")
    ]


def test_a_new_snapshot_is_loaded_once_in_log_order_and_gone_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "replica.db"
    replica = LocalReplica(path)
    snapshot = [staged_change(n) for n in range(12_000)]
    replica.stage("tasks", snapshot[:5000], schema=STAGE_SCHEMA)  # never applied: the snapshot-table path
    assert next_tables(replica) == ["_pgferry_next_tasks"] and replica.rows("tasks") == []
    replica.close()  # a crash before the up-to-date: nothing of it survives, and there is no position

    replica = LocalReplica(path)
    assert replica.position("tasks") is None and next_tables(replica) == []
    # Inserts (one of them from the log, with its txid; a key inserted twice: the later one wins), then the first
    # update ends the snapshot: the rest of that page and the next are staged after it; the last page in memory.
    from_log = Change('"public"."tasks"/"12000"', "insert", {"id": "12000", "title": "logged", "note": None}, (555,))
    parts = [
        snapshot[:5000],
        [*snapshot[5000:9000], from_log, staged_change(7, title="twice")],
        [
            *snapshot[9000:10_000],
            staged_change(5, "update", title="renamed"),
            staged_change(10_000),
            staged_change(8, "delete"),
        ],
        [staged_change(n) for n in range(10_001, 11_000)],
    ]
    last = [*snapshot[11_000:], staged_change(9, "update", note="last"), staged_change(12_001)]
    for part in parts:
        replica.stage("tasks", part, schema=STAGE_SCHEMA)
    seen = replica.apply("tasks", "public.tasks", last, offset="1_0", handle="h1", schema=STAGE_SCHEMA)

    expected = replayed([change for part in parts for change in part] + last)
    assert replica_state(replica) == expected
    assert {row[0]: tuple(row[1:]) for row in replica.query('select _key, id, title, note from "tasks"')} == expected
    assert seen == {555, 1005, 1008, 1009}
    assert replica.position("tasks") == ("1_0", "h1") and next_tables(replica) == []
    # The synced table that was the snapshot table has its unique key index (updates and upserts go by key).
    indexes = replica.query("select name from sqlite_master where type = 'index' and tbl_name = '_synced_tasks'")
    assert ("_synced_tasks__key",) in indexes
    with pytest.raises(sqlite3.IntegrityError):
        replica.query('insert into "_synced_tasks" (_key, id) values (\'"public"."tasks"/"1"\', \'1\')')
    # The visible rows are a view over the synced rows and the overlay: never a second copy, never writable.
    assert replica.query("select type from sqlite_master where name = 'tasks'") == [("view",)]
    with pytest.raises(sqlite3.OperationalError, match="view"):
        replica.query('insert into "tasks" (_key, id) values (\'"public"."tasks"/"1"\', \'1\')')

    # Live changes after it take the ordinary path, by key.
    replica.apply(
        "tasks", "public.tasks", [staged_change(1, "update", title="live"), staged_change(2, "delete")],
        offset="2_0", handle="h1", schema=None,
    )  # fmt: skip
    expected = replayed(
        [change for part in parts for change in part]
        + last
        + [staged_change(1, "update", title="live"), staged_change(2, "delete")]
    )
    assert replica_state(replica) == expected


def test_a_refetched_snapshot_replaces_the_rows_at_its_apply_and_keeps_pending_writes(tmp_path: Path) -> None:
    replica = LocalReplica(tmp_path / "replica.db")
    old = [staged_change(n) for n in range(10)]
    replica.apply("tasks", "public.tasks", old, offset="1_0", handle="h1", schema=STAGE_SCHEMA)
    replica.write("tasks", "update", {"id": "3", "title": "local"}, {"id": "3", "title": "local"})
    replica.query('create index by_note on "_synced_tasks" (note)')  # an application's index

    # A must-refetch: the new snapshot is loaded beside the old rows, which stay what the application sees.
    new = [staged_change(n, title=f"new {n}") for n in range(3, 8000)]
    replica.stage("tasks", new[:6000], schema=STAGE_SCHEMA, replace=True)
    assert next_tables(replica) == ["_pgferry_next_tasks"]
    assert replica_state(replica) == replayed(old) and len(replica.rows("tasks")) == 10
    replica.apply("tasks", "public.tasks", new[6000:], offset="5_0", handle="h2", schema=STAGE_SCHEMA, reset=True)

    assert replica_state(replica) == replayed(new)
    visible = {row["id"]: row for row in replica.rows("tasks", typed=False)}
    assert len(visible) == len(new) and "0" not in visible
    assert visible["3"]["title"] == "local" and replica.pending_keys("tasks") == {'"public"."tasks"/"3"'}
    assert visible["4"]["title"] == "new 4"
    assert replica.query("select tbl_name from sqlite_master where name = 'by_note'") == [("_synced_tasks",)]

    # A second must-refetch while one is being loaded: the loaded part is dropped, the shape's rows kept.
    replica.stage("tasks", new[:5000], schema=STAGE_SCHEMA, replace=True)
    replica.discard_staged("tasks")
    assert next_tables(replica) == [] and replica_state(replica) == replayed(new)


def test_a_snapshot_loads_without_checkpoints_and_leaves_no_snapshot_sized_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new snapshot is appended without WAL checkpoints (one in the background after the apply instead of one per
    thousand pages): the WAL grows while it loads, everything is readable after the apply and in the file after the
    checkpoint, and the next write cuts the WAL back to the limit rather than leaving a snapshot-sized file beside
    the replica."""
    import pgferry.client.replica as replica_module

    monkeypatch.setattr(replica_module, "WAL_SIZE_LIMIT", 1 << 20)
    path = tmp_path / "replica.db"
    replica = LocalReplica(path)
    schema = {"id": {"type": "text", "pk_index": 0}, "title": {"type": "text"}}
    for page in range(4):
        replica.stage(
            "t",
            [
                Change(f'"public"."t"/"{n}"', "insert", {"id": str(n), "title": f"{n} " + "x" * 500}, ())
                for n in range(page * 2000, (page + 1) * 2000)
            ],
            schema=schema,
        )
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 4 << 20  # ~4 MB of rows in the WAL,
    assert path.stat().st_size < 1 << 20  # none of them checkpointed into the file yet
    replica.apply("t", "public.t", [], offset="0_0", handle="h", schema=schema)
    # The apply commits without copying the snapshot into the file; a background checkpoint does that after it.
    assert replica.query("select count(*) from t") == [(8000,)]
    replica.wait_for_checkpoint()
    assert path.stat().st_size > 4 << 20
    replica.write("t", "insert", {"id": "new", "title": "after"}, {"id": "new", "title": "after"})
    assert wal.stat().st_size <= 1 << 20
    replica.close()
    reopened = LocalReplica(path)
    assert reopened.query(
        "select count(*), min(title = id || ' ' || substr(title, length(id) + 2)) from _synced_t"
    ) == [(8000, 1)]
    assert reopened.query("select title from t where id = 'new'") == [("after",)]
    reopened.close()


def visible_by_replay(replica: LocalReplica) -> dict[str, tuple[str | None, ...]]:
    """The oracle for the visible rows: the synced rows with every outbox item replayed over them in order, by
    the rules of a local write (an update of a row that is not there changes nothing; an insert of a row that is
    there updates it) — computed in Python from the synced table and the outbox, not from the overlay."""
    state: dict[str, dict[str, str | None]] = {
        key: dict(zip(STAGE_SCHEMA, rest, strict=True)) for key, *rest in replica_state_rows(replica)
    }
    for op, key, row in replica.query("select op, row_key, row from _pgferry_outbox order by seq"):
        text = json.loads(row)["text"]
        if op == "delete":
            state.pop(key, None)
        elif key in state:
            state[key].update({c: v for c, v in text.items() if c in STAGE_SCHEMA})
        elif op == "insert":
            state[key] = {c: text.get(c) for c in STAGE_SCHEMA}
    return {key: tuple(row[c] for c in STAGE_SCHEMA) for key, row in state.items()}


def replica_state_rows(replica: LocalReplica) -> list[tuple[Any, ...]]:
    return replica.query('select _key, id, title, note from "_synced_tasks"')


def visible_state(replica: LocalReplica) -> dict[str, tuple[str | None, ...]]:
    return {row[0]: tuple(row[1:]) for row in replica.query('select _key, id, title, note from "tasks"')}


def test_visible_rows_are_the_synced_rows_with_the_outbox_replayed_over_them(tmp_path: Path) -> None:
    """Random local writes, synced changes, acknowledgements, settling and rejections: after every step the view
    shows exactly the synced rows with the remaining outbox replayed (judged by replaying in Python), and the
    overlay holds only keys that have outbox items."""
    import random

    rng = random.Random(20261130)
    replica = LocalReplica(tmp_path / "replica.db")
    replica.apply(
        "tasks", "public.tasks", [staged_change(n) for n in range(40)], offset="0_0", handle="h", schema=STAGE_SCHEMA
    )
    txid = 5000
    for step in range(600):
        n = rng.randrange(60)
        action = rng.random()
        if action < 0.45:
            op = rng.choice(["insert", "update", "delete"])
            row = {"id": str(n)} if op == "delete" else {"id": str(n), "title": f"local {step}"}
            if op == "insert":
                row["note"] = rng.choice([None, f"n{step}"])
            replica.write("tasks", op, row, row)  # type: ignore[arg-type]
        elif action < 0.75:
            op = rng.choice(["insert", "update", "delete"])
            txid += 1
            key = f'"public"."tasks"/"{n}"'
            change = (
                Change(key, "insert", {"id": str(n), "title": f"server {step}", "note": None}, (txid,))
                if op == "insert"
                else Change(key, op, {"id": str(n), **({"note": f"s{step}"} if op == "update" else {})}, (txid,))
            )
            known = key in replica_state(replica)
            if op != "insert" and not known:
                continue  # the server never sends an update or delete of a row the shape does not hold
            replica.apply("tasks", "public.tasks", [change], offset=f"{step}_0", handle="h", schema=None)
        elif action < 0.9:
            items = replica.outbox(state="pending", limit=rng.randrange(1, 4))
            if items:
                txid += 1
                replica.acknowledge([{"id": item.mutation_id, "txid": str(txid)} for item in items])
                if rng.random() < 0.5:  # the change streams in: the items settle at that boundary
                    with replica._transaction() as conn:  # record the txid as seen, as a streamed change would
                        conn.execute("insert or ignore into _pgferry_seen_txids values (?, 0)", [txid])
                    replica.apply("tasks", "public.tasks", [], offset=f"{step}_2", handle="h", schema=None)
        else:
            items = replica.outbox(state="pending", limit=1)
            if items:
                replica.reject([{"id": items[0].mutation_id, "problem": "no", "status": 403}])
        assert visible_state(replica) == visible_by_replay(replica), f"step {step}"
        with_items = {r[0] for r in replica.query("select distinct row_key from _pgferry_outbox")}
        overlay_keys = {r[0] for r in replica.query('select _key from "_pgferry_overlay_tasks"')}
        assert overlay_keys <= with_items, f"step {step}: keys left in the overlay without outbox items"


def test_a_replica_with_a_visible_table_is_converted_to_the_view_when_opened(tmp_path: Path) -> None:
    """Replicas written before the visible rows became a view keep them as a table: opening one replaces it with
    the view and rebuilds the overlay from the outbox, losing nothing."""
    path = tmp_path / "replica.db"
    replica = LocalReplica(path)
    replica.apply(
        "tasks", "public.tasks", [staged_change(n) for n in range(20)], offset="1_0", handle="h", schema=STAGE_SCHEMA
    )
    replica.write("tasks", "update", {"id": "3", "title": "local"}, {"id": "3", "title": "local"})
    replica.write("tasks", "delete", {"id": "4"}, {"id": "4"})
    replica.write("tasks", "insert", {"id": "99", "title": "new", "note": None}, {"id": "99", "title": "new"})
    expected = visible_state(replica)
    replica.close()
    with sqlite3.connect(path) as old:  # the old layout: the visible rows as a table of their own
        old.execute('create table "tasks_copy" as select * from "tasks"')
        old.execute('drop view "tasks"')
        old.execute('drop table "_pgferry_overlay_tasks"')
        old.execute('alter table "tasks_copy" rename to "tasks"')
        old.execute('create index "tasks by title" on "tasks" (title) where note is null')
    assert sqlite3.connect(path).execute("select type from sqlite_master where name = 'tasks'").fetchall() == [
        ("table",)
    ]

    reopened = LocalReplica(path)
    assert reopened.query("select type from sqlite_master where name = 'tasks'") == [("view",)]
    assert visible_state(reopened) == expected == visible_by_replay(reopened)
    assert reopened.pending_keys("tasks") == {'"public"."tasks"/"3"', '"public"."tasks"/"99"'}
    assert reopened.position("tasks") == ("1_0", "h")
    # The application's index on the old table now serves the view from the synced table.
    assert reopened.query("select tbl_name, sql from sqlite_master where name = 'tasks by title'") == [
        ("_synced_tasks", 'CREATE INDEX "tasks by title" on "_synced_tasks" (title) where note is null')
    ]
    plan = " ".join(
        str(r) for r in reopened.query("explain query plan select * from tasks where title = 'x' and note is null")
    )
    assert "tasks by title" in plan


def test_a_snapshot_decoded_as_row_tuples_loads_the_same_rows(tmp_path: Path) -> None:
    """Snapshot rows decoded straight into tuples (``RowValues``, in the stream schema's column order, or in another
    order) are loaded exactly as the same rows given as dicts."""
    from pgferry.client import RowValues
    from pgferry.client._shape_base import ColumnOrder

    def as_tuples(changes: list[Change], order: tuple[str, ...]) -> list[Change]:
        columns = ColumnOrder(order)
        return [
            Change(c.key, c.operation, RowValues(columns, tuple(c.value.get(x) for x in order)), c.txids)
            for c in changes
        ]

    snapshot = [staged_change(n) for n in range(12_000)]
    for label, order in (("schema order", tuple(STAGE_SCHEMA)), ("another order", ("note", "title", "id"))):
        replica = LocalReplica(tmp_path / f"{label}.db")
        rows = as_tuples(snapshot, order)
        replica.stage("tasks", rows[:6000], schema=STAGE_SCHEMA)
        replica.stage("tasks", rows[6000:11_000], schema=STAGE_SCHEMA)
        replica.apply("tasks", "public.tasks", rows[11_000:], offset="1_0", handle="h", schema=STAGE_SCHEMA)
        assert replica_state(replica) == replayed(snapshot), label
        assert visible_state(replica) == replayed(snapshot), label


def test_snapshot_pages_loaded_as_rows_give_the_replica_the_log_replayed(tmp_path: Path) -> None:
    """``stage_pages`` with pages handed on undecoded (a snapshot decoded straight into the rows inserted) and with
    small pages decoded at once, against the oracle of the log replayed on a dict: NULLs (given, and columns an
    insert leaves out), a key inserted twice (the later one wins), txids of inserts from the log, the first update
    ending the snapshot inside a page (it and everything after staged and applied in order); then, on the synced
    shape, pages of live changes take the ordinary staging path. The same pages through ``stage`` with
    ``decoded()`` changes give the same replica."""
    from pgferry.client._shape_base import ShapeBatch, ShapeState

    headers = {"electric-schema": json.dumps(STAGE_SCHEMA), "electric-offset": "0_9", "electric-handle": "h1"}

    def message(change: Change) -> dict[str, Any]:
        value = dict(change.value)
        if change.operation == "insert" and change.key.endswith('/"11"'):
            del value["note"]  # an insert that leaves a column out: NULL
        head: dict[str, Any] = {"operation": change.operation}
        if change.txids:
            head["txids"] = list(change.txids)
        return {"headers": head, "key": change.key, "value": value}

    def page(changes: list[Change]) -> ShapeBatch:
        batch = ShapeState(ShapeOptions("tasks"), defer_decoding=True).on_response(
            200, headers, json.dumps([message(c) for c in changes]).encode()
        )
        assert batch is not None
        return batch

    snapshot = [staged_change(n) for n in range(12_000)]
    from_log = Change('"public"."tasks"/"12000"', "insert", {"id": "12000", "title": "logged", "note": None}, (555,))
    parts = [
        snapshot[:4000],
        [*snapshot[4000:9000], from_log, staged_change(7, title="twice")],
        snapshot[9000:9010],  # small: decoded at once
        [
            *snapshot[9010:10_000],
            staged_change(5, "update", title="renamed"),
            staged_change(10_000),
            staged_change(8, "delete"),
        ],
        [*(staged_change(n) for n in range(10_001, 11_000)), staged_change(8, title="back")],  # after its delete
    ]
    pages = [page(part) for part in parts]
    assert [p.undecoded is not None for p in pages] == [True, True, False, True, True]
    last = [*snapshot[11_000:], staged_change(9, "update", note="last"), staged_change(12_001)]
    log = [change for p in pages for change in p.decoded()] + last
    assert dict(log[11].value)["note"] is None

    states = []
    for how in ("pages", "changes"):
        replica = LocalReplica(tmp_path / f"{how}.db")
        if how == "pages":
            replica.stage_pages("tasks", pages[:2], schema=STAGE_SCHEMA)
            replica.stage_pages("tasks", pages[2:3], schema=STAGE_SCHEMA)
            replica.stage_pages("tasks", pages[3:], schema=STAGE_SCHEMA)  # the snapshot ends inside the first
        else:
            for p in pages:
                replica.stage("tasks", p.decoded(), schema=STAGE_SCHEMA)
        seen = replica.apply("tasks", "public.tasks", last, offset="1_0", handle="h1", schema=STAGE_SCHEMA)
        assert replica_state(replica) == replayed(log), how
        assert visible_state(replica) == replayed(log), how
        assert seen == {555, 1005, 1008, 1009}, how
        assert next_tables(replica) == [], how

        live = [staged_change(n, "update", title=f"live {n}") for n in range(1, 3000, 2)] + [
            staged_change(n) for n in range(20_000, 21_000)
        ]
        replica.stage_pages("tasks", [page(live)], schema=STAGE_SCHEMA)
        assert next_tables(replica) == [], how  # not a new snapshot: the ordinary staging
        replica.apply("tasks", "public.tasks", [], offset="2_0", handle="h1", schema=None)
        assert replica_state(replica) == replayed(log + live), how
        states.append(replica_state_rows(replica))
        replica.close()
    assert states[0] == states[1]
