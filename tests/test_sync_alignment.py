"""Nothing falls between a shape's snapshot and the replication stream, whatever transactions are open.

A shape's snapshot decides which replicated transactions the shape still needs: those not visible in it. That
rule only holds if every transaction the snapshot does not see reaches the stream, and if making a table
replicable never waits on (or makes others wait on) the platform's own writers. These tests open transactions at
each point around shape creation and judge with an independent oracle: the rows PostgreSQL has, each of which
must reach the client exactly once.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.sync_helpers import USER, changes, follow, insert_task, make_server, shape, sync_to_end


def _titles(messages: list[dict[str, Any]]) -> list[str]:
    return [m["value"]["title"] for m in messages]


def test_a_transaction_open_at_the_first_shape_arrives_exactly_once(target_url: str, tmp_path: Path) -> None:
    """The snapshot cannot see it (in progress: its xid is in the snapshot's xip list), so the stream must bring
    it. The first shape on a table used to publish the table just then, after the row was written, and the stream
    dropped the row for good."""
    with make_server(target_url, tmp_path / "s") as served:
        with psycopg.connect(target_url) as writer, psycopg.connect(target_url, autocommit=True) as other:
            insert_task(writer, "in flight")
            # A later transaction completes first, so the snapshot's xmax is past "in flight": only the xip list
            # says it was still running (without it, its xid would count as visible and the stream would skip it).
            insert_task(other, "committed meanwhile")
            last, rows = sync_to_end(served)
            assert _titles(rows) == ["committed meanwhile"]
            writer.commit()
        with psycopg.connect(target_url, autocommit=True) as conn:
            insert_task(conn, "after")
        seen = follow(served, last, lambda found: "after" in _titles(found))
        assert _titles(seen) == ["in flight", "after"]


def test_a_transaction_open_when_its_table_joins_replication_is_in_the_first_snapshot(
    target_url: str, tmp_path: Path
) -> None:
    """A row written before its table joined the publication never streams, even if its transaction commits
    later: the table's first snapshot must wait until such transactions have ended, so that it contains them."""
    data = tmp_path / "s"
    with make_server(target_url, data, tables=("public.agent_executions",)):
        pass  # the slot and the publication exist; tasks is not in it
    with psycopg.connect(target_url) as early:
        insert_task(early, "written before the join")
        with make_server(target_url, data, tables=("public.agent_executions", "public.tasks")) as served:
            waiting = shape(served)
            assert waiting.status_code == 503, waiting.text
            assert int(waiting.headers["retry-after"]) >= 1
            assert "joined replication" in waiting.json()["errors"]["table"][0]
            early.commit()
            last, rows = sync_to_end(served)
            assert _titles(rows) == ["written before the join"]
            with psycopg.connect(target_url, autocommit=True) as conn:
                insert_task(conn, "after")
            assert _titles(follow(served, last, lambda found: bool(found))) == ["after"]


def test_rows_committed_around_and_during_shape_creation_each_arrive_exactly_once(
    target_url: str, tmp_path: Path
) -> None:
    """Writers commit all the while the first shape is created: one transaction opened before the request and
    committed after the snapshot, one committed while the snapshot is being paged, and a stream of small
    transactions (some held open for a moment) throughout. The client's inserts must be exactly the rows in the
    table, each once."""
    with psycopg.connect(target_url, autocommit=True) as conn:
        conn.execute(
            "insert into tasks (user_id, title, description) select %s, 'preloaded ' || i, repeat('x', 300)"
            " from generate_series(1, 4000) i",
            [USER],
        )
    stop = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        rng = random.Random(7)
        try:
            with psycopg.connect(target_url) as conn:
                n = 0
                while not stop.is_set():
                    for _ in range(rng.randint(1, 3)):
                        n += 1
                        insert_task(conn, f"concurrent {n}")
                    if rng.random() < 0.3:
                        time.sleep(0.02)  # held open: in progress when some snapshot is taken
                    conn.commit()
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    writers = [threading.Thread(target=write) for _ in range(2)]
    with make_server(target_url, tmp_path / "s", max_chunk_bytes=64 * 1024) as served:
        with psycopg.connect(target_url) as before, psycopg.connect(target_url) as during:
            insert_task(before, "open before the request, committed after the snapshot")
            insert_task(during, "committed while the snapshot is paged")
            for thread in writers:
                thread.start()
            response = shape(served)
            assert response.status_code == 200, response.text
            during.commit()
            inserted = [m["key"] for m in changes(response)]
            while "electric-up-to-date" not in response.headers:
                response = shape(
                    served, offset=response.headers["electric-offset"], handle=response.headers["electric-handle"]
                )
                assert response.status_code == 200, response.text
                inserted += [m["key"] for m in changes(response)]
            before.commit()
        time.sleep(0.5)
        stop.set()
        for thread in writers:
            thread.join(30)
        assert not failures, failures
        with psycopg.connect(target_url, autocommit=True) as conn:
            expected = {f'"public"."tasks"/"{row[0]}"' for row in conn.execute("select id::text from tasks")}
        deadline = time.monotonic() + 60
        while set(inserted) != expected and time.monotonic() < deadline:
            live = shape(
                served,
                offset=response.headers["electric-offset"],
                handle=response.headers["electric-handle"],
                live="true",
            )
            assert live.status_code == 200, live.text
            response = live
            inserted += [m["key"] for m in changes(live) if m["headers"]["operation"] == "insert"]
        assert set(inserted) == expected, (len(expected - set(inserted)), len(set(inserted) - expected))
        assert len(inserted) == len(expected), "some row arrived twice"


def test_a_shape_request_never_makes_writers_wait(target_url: str, tmp_path: Path) -> None:
    """observability_events has REPLICA IDENTITY DEFAULT from the migrations; the server needs FULL. With a
    transaction open on the table, the shape request used to run ALTER TABLE in the request path: it waited for
    the lock, and every other writer of the table queued behind it. Now the table is prepared in the background
    without waiting for locks, the request is told to retry, and writers never notice."""
    insert = "insert into observability_events (user_id, event_type, message) values (%s, 'test', %s)"
    with make_server(target_url, tmp_path / "s", tables=("public.tasks",)):
        pass  # the slot exists (creating one waits for every open transaction, by PostgreSQL's design)
    with psycopg.connect(target_url) as holder:
        holder.execute(insert, [USER, "held open"])
        with make_server(target_url, tmp_path / "s") as served:
            result: list[httpx.Response | BaseException] = []

            def request() -> None:
                try:
                    result.append(shape(served, table="observability_events"))
                except BaseException as exc:
                    result.append(exc)

            requester = threading.Thread(target=request)
            requester.start()
            time.sleep(0.5)  # let the request reach whatever it would wait for
            with psycopg.connect(target_url, autocommit=True) as other:
                other.execute("set lock_timeout = '5s'")
                other.execute(insert, [USER, "another writer"])  # LockNotAvailable if queued behind an ALTER
            requester.join(30)
            [answer] = result
            assert isinstance(answer, httpx.Response) and answer.status_code == 503, answer
            assert answer.headers["retry-after"]
            assert "observability_events" in answer.json()["errors"]["table"][0]
            health = httpx.get(served.url + "/v1/health").json()
            assert health["tables_pending"] == ["public.observability_events"], health
            holder.commit()
            deadline = time.monotonic() + 60
            response = shape(served, table="observability_events")
            while response.status_code == 503 and time.monotonic() < deadline:
                time.sleep(0.5)
                response = shape(served, table="observability_events")
            assert response.status_code == 200, response.text
            messages = [m["value"]["message"] for m in response.json() if "key" in m]
            assert sorted(messages) == ["another writer", "held open"]
            assert httpx.get(served.url + "/v1/health").json() == {"status": "active"}
    with psycopg.connect(target_url) as conn:
        identity = conn.execute("select relreplident from pg_class where oid = 'observability_events'::regclass")
        assert identity.fetchone() == ("f",)
