"""``pgferry.client`` ShapeStream (blocking) and AsyncShapeStream against real servers: the dev sync server on a
real PostgreSQL, and the proxy in front of it with real tokens. The oracle is the database itself."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pgferry.client import AsyncShapeStream, ShapeOptions, ShapeRequestError, ShapeStream
from pgferry.sync import SyncServerConfig, create_sync_app
from pgferry.testing.asgi import ServedApp, free_port
from tests.sync_helpers import SECRET, USER, insert_task, make_server
from tests.write_helpers import ALICE, BOB, token_for, write_stack


@pytest.fixture
def db(target_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(target_url, autocommit=True) as conn:
        yield conn


def titles(changes: list[Any]) -> list[str]:
    return sorted(str(c.value["title"]) for c in changes if c.operation != "delete")


def options(live: bool = True, **extra: Any) -> ShapeOptions:
    return ShapeOptions("tasks", extra={"secret": SECRET}, live=live, **extra)


def test_blocking_stream_pages_to_up_to_date_and_resumes_from_a_stored_offset(
    target_url: str, db: Any, tmp_path: Path
) -> None:
    for n in range(5):
        insert_task(db, f"task {n}")
    with make_server(target_url, tmp_path / "sync") as server:
        with ShapeStream(server.url, options(live=False)) as stream:
            batches = list(stream)
        assert batches[-1].up_to_date
        assert titles([c for b in batches for c in b.changes]) == [f"task {n}" for n in range(5)]
        assert batches[-1].schema is not None and batches[-1].schema["id"]["type"] == "uuid"
        offset, handle = stream.offset, stream.handle

        insert_task(db, "after the first sync")
        # A new process resumes from the persisted position: only what changed since, no snapshot again.
        with ShapeStream(server.url, options(), offset=offset, handle=handle) as resumed:
            seen: list[Any] = []
            for batch in resumed:
                seen.extend(batch.changes)
                if seen:
                    break
        assert titles(seen) == ["after the first sync"]
        assert seen[0].txids  # a streamed change carries its transaction id


def test_async_stream_follows_live_changes_and_refetches_a_rotated_shape(
    target_url: str, db: Any, tmp_path: Path
) -> None:
    insert_task(db, "first")

    async def scenario(server_url: str) -> list[Any]:
        events: list[Any] = []
        async with AsyncShapeStream(server_url, options()) as stream:
            async for batch in stream:
                events.append(batch)
                if batch.up_to_date and len([e for e in events if e.up_to_date]) == 1:
                    await asyncio.to_thread(insert_task, db, "live change")
                if any(c.value.get("title") == "live change" for c in batch.changes):
                    handle = stream.handle
                    deleted = await asyncio.to_thread(
                        httpx.delete,
                        server_url + "/v1/shape",
                        params={"table": "tasks", "handle": handle, "secret": SECRET},
                    )
                    assert deleted.status_code == 202
                if any(e.must_refetch for e in events) and batch.up_to_date and batch.changes:
                    return events
        return events

    with make_server(target_url, tmp_path / "sync", live_timeout=1.0) as server:
        events = asyncio.run(asyncio.wait_for(scenario(server.url), 60))
    assert any(c.value.get("title") == "live change" for e in events for c in e.changes)
    refetch = next(i for i, e in enumerate(events) if e.must_refetch)
    after = [c for e in events[refetch:] for c in e.changes]
    assert titles(after) == ["first", "live change"]  # the whole shape again, from a new snapshot


def dev_server(url: str, data_dir: Path, port: int) -> ServedApp:
    config = SyncServerConfig(database_url=url, data_dir=data_dir, live_timeout=1.0, secret=SECRET)
    return ServedApp(create_sync_app(config), port=port)


def test_stream_rides_out_a_server_restart_with_backoff(target_url: str, db: Any, tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "sync"
    with dev_server(target_url, data_dir, port) as server:
        stream = ShapeStream(server.url, options())
        assert next(b for b in stream if b.up_to_date).up_to_date
    # Down: the stream backs off and keeps trying; a change made meanwhile arrives once the server is back.
    insert_task(db, "while the server was down")
    results: list[Any] = []

    def follow() -> None:
        for batch in stream:
            results.extend(batch.changes)
            if results:
                return

    follower = threading.Thread(target=follow)
    follower.start()
    follower.join(1.5)
    assert follower.is_alive() and stream.state.failures >= 1
    with dev_server(target_url, data_dir, port):
        follower.join(30)
    stream.close()
    assert titles(results) == ["while the server was down"]


def test_through_the_proxy_each_user_gets_their_rows(target_url: str, tmp_path: Path) -> None:
    with write_stack(target_url, tmp_path / "sync") as stack:
        with psycopg.connect(target_url, autocommit=True) as conn:
            for user, title in ((ALICE, "alice's"), (BOB, "bob's")):
                conn.execute("insert into tasks (user_id, title) values (%s, %s)", [user, title])
        token = token_for(ALICE)
        with ShapeStream(
            stack.proxy_url, ShapeOptions("tasks", live=False), headers=lambda: {"authorization": f"Bearer {token}"}
        ) as stream:
            changes = [c for b in stream for c in b.changes]
        assert titles(changes) == ["alice's"]

        with pytest.raises(ShapeRequestError, match="401"):
            list(ShapeStream(stack.proxy_url, ShapeOptions("tasks", live=False), headers={"authorization": "Bearer x"}))
        with pytest.raises(ShapeRequestError, match=r"403.*table"):
            list(
                ShapeStream(
                    stack.proxy_url,
                    ShapeOptions("pgferry.applied_mutations", live=False),
                    headers={"authorization": f"Bearer {token}"},
                )
            )
    assert USER != ALICE and uuid.UUID(str(ALICE))


def test_pages_decoded_by_the_schema_read_exactly_as_plain_json_says() -> None:
    """The schema-typed decoding (a struct per column, inserts as ``RowValues``) against ``json.loads`` of the same
    page: every change's key, operation, txids and values; an insert that leaves a column out has it as NULL, an
    update or delete only the columns it carries; a page whose values are not all strings falls back to the
    generic decoding, unchanged."""
    import json
    import random

    from pgferry.client import RowValues
    from pgferry.client._shape_base import ShapeState

    rng = random.Random(7)
    columns = ["id", "title", "due at ü", "note"]
    schema = {c: {"type": "text", **({"pk_index": 0} if c == "id" else {})} for c in columns}
    alphabet = ["a", "\\", '"', "\n", "\u2028", "✓", "🚀", "\x01", " ", "null", "{"]

    def text() -> str | None:
        return None if rng.random() < 0.2 else "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))

    messages: list[dict[str, Any]] = []
    for n in range(400):
        op = rng.choice(["insert", "insert", "update", "delete"])
        present = [c for c in columns if c == "id" or rng.random() < (0.9 if op == "insert" else 0.4)]
        headers: dict[str, Any] = {"operation": op}
        if rng.random() < 0.5:
            headers["txids"] = [rng.randrange(1, 10**9)]
        messages.append({"headers": headers, "key": f'"public"."t"/"{n}"', "value": {c: text() for c in present}})
    messages.append({"headers": {"control": "up-to-date", "global_last_seen_lsn": "1"}})
    body = json.dumps(messages).encode()

    state = ShapeState(ShapeOptions("t"))
    batch = state.on_response(200, {"electric-schema": json.dumps(schema), "electric-offset": "0_0"}, body)
    assert batch is not None and batch.up_to_date
    expected = [m for m in messages if "key" in m]
    assert len(batch.changes) == len(expected)
    typed = 0
    for change, message in zip(batch.changes, expected, strict=True):
        op = message["headers"]["operation"]
        assert (change.key, change.operation) == (message["key"], op)
        assert change.txids == tuple(message["headers"].get("txids", ()))
        if op == "insert":
            typed += isinstance(change.value, RowValues)
            assert dict(change.value) == {c: message["value"].get(c) for c in columns}
        else:
            assert dict(change.value) == message["value"]
    assert typed == sum(1 for m in expected if m["headers"]["operation"] == "insert") > 100

    # A column name msgspec cannot take as a field (a quote or backslash in it): the generic decoding, same values.
    odd_schema = {**schema, 'say "hi"': {"type": "text"}}
    plain = ShapeState(ShapeOptions("t"))
    page = json.dumps([{"headers": {"operation": "insert"}, "key": "k", "value": {"id": "1", 'say "hi"': "x"}}])
    batch = plain.on_response(200, {"electric-schema": json.dumps(odd_schema), "electric-offset": "0_0"}, page.encode())
    assert batch is not None and dict(batch.changes[0].value) == {"id": "1", 'say "hi"': "x"}

    # A value that is not a string (another server's number): the generic decoding, values as they came.
    odd = json.dumps([{"headers": {"operation": "insert"}, "key": "k", "value": {"id": 1, "title": "x"}}]).encode()
    batch = state.on_response(200, {"electric-offset": "0_1"}, odd)
    assert batch is not None and dict(batch.changes[0].value) == {"id": 1, "title": "x"}
    assert not isinstance(batch.changes[0].value, RowValues)


def test_deferred_pages_decode_later_to_the_same_changes() -> None:
    """``defer_decoding``: a large page that does not end up to date is handed on undecoded and decodes, on
    demand, to exactly what the eager decoding gives; an up-to-date answer (header) and a small one are decoded at
    once; a must-refetch hidden in a deferred page is an error the consumer restarts on, never silently lost."""
    import json

    from pgferry.client._shape_base import DEFER_DECODING_FROM, RefetchInDeferredPageError, ShapeState

    schema = {"id": {"type": "text", "pk_index": 0}, "title": {"type": "text"}}
    page = [
        {"headers": {"operation": "insert"}, "key": f'"public"."t"/"{n}"', "value": {"id": str(n), "title": "x" * 90}}
        for n in range(1000)
    ]
    body = json.dumps(page).encode()
    assert len(body) >= DEFER_DECODING_FROM
    headers = {"electric-schema": json.dumps(schema), "electric-offset": "0_999", "electric-handle": "h"}
    eager = ShapeState(ShapeOptions("t")).on_response(200, headers, body)
    deferred = ShapeState(ShapeOptions("t"), defer_decoding=True).on_response(200, headers, body)
    assert eager is not None and deferred is not None
    assert deferred.changes == [] and deferred.undecoded == body and not deferred.up_to_date
    assert deferred.offset == "0_999" and deferred.handle == "h" and deferred.size == len(body)
    assert deferred.decoded() == eager.decoded() == eager.changes and len(eager.changes) == 1000

    state = ShapeState(ShapeOptions("t"), defer_decoding=True)
    ending = json.dumps([*page, {"headers": {"control": "up-to-date", "global_last_seen_lsn": "7"}}]).encode()
    up_to_date = state.on_response(200, {**headers, "electric-up-to-date": ""}, ending)
    assert up_to_date is not None and up_to_date.undecoded is None and len(up_to_date.changes) == 1000
    assert up_to_date.up_to_date and up_to_date.global_lsn == 7
    small = state.on_response(200, headers, json.dumps(page[:3]).encode())
    assert small is not None and small.undecoded is None and len(small.changes) == 3

    hidden = json.dumps([*page, {"headers": {"control": "must-refetch"}}]).encode()
    odd = ShapeState(ShapeOptions("t"), defer_decoding=True).on_response(200, headers, hidden)
    assert odd is not None
    with pytest.raises(RefetchInDeferredPageError):
        odd.decoded()


def test_leading_inserts_of_a_deferred_page_are_its_decoded_inserts_as_rows() -> None:
    """``ShapeBatch.leading_inserts`` (a snapshot page straight into rows for the replica) against ``decoded()`` of
    the same page: the leading inserts as ``(key, *values in the schema's order)`` (a column an insert leaves out is
    NULL), the union of their txids, and everything from the first other message on as the same changes (an update
    keeps only the columns it carries). Pages it cannot read that way say so (``None``) and a hidden must-refetch
    is an error, as for ``decoded()``."""
    import json
    import random

    from pgferry.client._shape_base import DEFER_DECODING_FROM, RefetchInDeferredPageError, ShapeState

    rng = random.Random(11)
    columns = ["id", "title", "due at ü", "note"]
    schema = {c: {"type": "text", **({"pk_index": 0} if c == "id" else {})} for c in columns}
    alphabet = ["a", "\\", '"', "\n", "\u2028", "✓", "🚀", "\x01", " ", "null", "{"]

    def text() -> str | None:
        return None if rng.random() < 0.3 else "".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))

    def message(n: int, op: str) -> dict[str, Any]:
        present = [c for c in columns if c == "id" or rng.random() < (0.85 if op == "insert" else 0.4)]
        headers: dict[str, Any] = {"operation": op}
        if rng.random() < 0.3:
            headers["txids"] = [rng.randrange(1, 10**9), str(rng.randrange(1, 10**9))]
        return {"headers": headers, "key": f'"public"."t"/"{n}"', "value": {c: text() for c in present}}

    headers = {"electric-schema": json.dumps(schema), "electric-offset": "0_9", "electric-handle": "h"}

    def deferred(messages: list[dict[str, Any]]) -> Any:
        body = json.dumps(messages).encode()
        assert len(body) >= DEFER_DECODING_FROM
        batch = ShapeState(ShapeOptions("t"), defer_decoding=True).on_response(200, headers, body)
        assert batch is not None and batch.undecoded is not None
        return batch

    for ends_at in (None, 0, 700, 1499):  # all inserts; the first message an update; in the middle; the last one
        inserts = [message(n, "insert") for n in range(1500)]
        messages = [*inserts] if ends_at is None else [*inserts[:ends_at], message(9999, "update"), *inserts[ends_at:]]
        if ends_at == 700:
            messages.insert(702, message(9998, "delete"))
        messages.insert(3, {"headers": {"control": "up-to-date"}})  # a control message among them is skipped
        batch = deferred(messages)
        decoded = batch.decoded()
        split = len(decoded) if ends_at is None else ends_at
        read = batch.leading_inserts(columns)
        assert read is not None
        rows, txids, rest = read
        assert rows == [(c.key, *(c.value[x] for x in columns)) for c in decoded[:split]]
        assert rows == [(m["key"], *(m["value"].get(x) for x in columns)) for m in inserts[:split]]
        assert txids == {t for c in decoded[:split] for t in c.txids}
        assert rest == decoded[split:]
        assert [dict(c.value) for c in rest if c.operation != "insert"] == [
            m["value"] for m in messages[split:] if m.get("headers", {}).get("operation") in ("update", "delete")
        ]

    page = [message(n, "insert") for n in range(1500)]
    batch = deferred(page)
    assert batch.leading_inserts(list(reversed(columns))) is None  # another column order: decoded() serves
    eager = ShapeState(ShapeOptions("t")).on_response(200, headers, json.dumps(page).encode())
    assert eager is not None and eager.leading_inserts(columns) is None  # decoded already
    numbers = [*page, {"headers": {"operation": "insert"}, "key": "k", "value": {"id": 1}}]
    assert deferred(numbers).leading_inserts(columns) is None  # a value that is not a string: decoded() serves
    for at in (5, 1499):
        hidden = deferred([*page[:at], {"headers": {"control": "must-refetch"}}, *page[at:]])
        with pytest.raises(RefetchInDeferredPageError):
            hidden.leading_inserts(columns)
    after_update = deferred([*page[:5], message(9999, "update"), {"headers": {"control": "must-refetch"}}, *page[5:]])
    with pytest.raises(RefetchInDeferredPageError):
        after_update.leading_inserts(columns)


def test_a_fetched_page_is_held_by_its_batch_alone() -> None:
    """The async stream hands each page's bytes on without the HTTP response keeping them too: httpx keeps a
    response in a reference cycle, so a body stored on it (``aread()``) stayed alive, MBs per page, until a full
    collection of the cyclic GC (which an initial sync now seldom triggers). With the GC off, the page's bytes
    must have no owner left but the batch."""
    import gc
    import json
    import sys

    page = json.dumps(
        [
            {"headers": {"operation": "insert"}, "key": f"k{n}", "value": {"id": str(n), "t": "x" * 200}}
            for n in range(400)
        ]
    ).encode()

    async def chunks() -> Any:
        for start in range(0, len(page), 10_000):
            yield page[start : start + 10_000]

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"electric-offset": "0_1", "electric-handle": "h"}, content=chunks())

    async def fetch() -> Any:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            stream = AsyncShapeStream("http://sync.test", ShapeOptions("t"), client=client, defer_decoding=True)
            return await stream.fetch()

    enabled = gc.isenabled()
    gc.disable()
    try:
        batch = asyncio.run(fetch())
        assert batch is not None and batch.undecoded == page
        body = batch.undecoded
        del batch
        assert sys.getrefcount(body) == 2  # ``body`` here, and the call's argument: nothing else
    finally:
        if enabled:
            gc.enable()
