"""Live mode over server-sent events (``live_sse=true``), as Electric serves it, checked on the wire.

The official client's side of it (``liveSse: true``, directly and through the proxy) is in
tests/test_sync_interop.py; here each event, the up-to-date that follows a transaction, keep-alives, the end of the
stream and the offset a client resumes from are pinned.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pgferry.testing.asgi import ServedApp
from tests.sync_helpers import SECRET, insert_task, make_server, sync_to_end

Event = dict[str, Any]


class EventStream:
    """An SSE response read by a thread: parsed ``data:`` events and ``:`` comments, in order, on a queue."""

    def __init__(self, served: ServedApp, params: dict[str, str]) -> None:
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.response: httpx.Response | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(served.url, params), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "no response headers"

    def _run(self, base: str, params: dict[str, str]) -> None:
        query = {"table": "tasks", "secret": SECRET, **params}
        headers = {"accept": "text/event-stream"}
        try:
            with httpx.stream("GET", base + "/v1/shape", params=query, headers=headers, timeout=60) as response:
                self.response = response
                self._ready.set()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.items.put(("data", json.loads(line[len("data: ") :])))
                    elif line.startswith(":"):
                        self.items.put(("comment", line))
            self.items.put(("end", None))
        except httpx.HTTPError as exc:  # the server shut down under an open stream (end of a test)
            self.items.put(("broken", exc))

    def next(self, timeout: float = 20.0) -> tuple[str, Any]:
        return self.items.get(timeout=timeout)

    def data(self, count: int) -> list[Event]:
        """The next ``count`` data events, skipping comments."""
        found: list[Event] = []
        while len(found) < count:
            kind, value = self.next()
            assert kind not in ("end", "broken"), f"stream ended after {found}"
            if kind == "data":
                found.append(value)
        return found

    def join(self, timeout: float = 30.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"


@pytest.fixture
def served(target_url: str, tmp_path: Path) -> Iterator[ServedApp]:
    with make_server(target_url, tmp_path / "s", sse_timeout=4.0, sse_keepalive=0.5) as app:
        yield app


def sse_params(last: httpx.Response, **extra: str) -> dict[str, str]:
    return {
        "offset": last.headers["electric-offset"],
        "handle": last.headers["electric-handle"],
        "live": "true",
        "live_sse": "true",
        "cursor": "",
        **extra,
    }


def test_live_sse_streams_each_transaction_then_up_to_date_and_keeps_the_stream_open(
    served: ServedApp, target_url: str
) -> None:
    with psycopg.connect(target_url, autocommit=True) as db:
        insert_task(db, "before")
        last, _ = sync_to_end(served)
        stream = EventStream(served, sse_params(last))
        response = stream.response
        assert response is not None and response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["electric-handle"] == last.headers["electric-handle"]
        assert response.headers["electric-cursor"]
        assert response.headers["electric-offset"] == last.headers["electric-offset"]
        with db.transaction():
            insert_task(db, "one")
            insert_task(db, "two")
        first, second, up_to_date = stream.data(3)
        assert [first["value"]["title"], second["value"]["title"]] == ["one", "two"]
        assert first["headers"]["lsn"] == second["headers"]["lsn"] and second["headers"]["last"] is True
        assert up_to_date["headers"]["control"] == "up-to-date"
        assert int(up_to_date["headers"]["global_last_seen_lsn"]) >= int(second["headers"]["lsn"])
        kind, comment = stream.next()  # nothing happens for longer than the keep-alive interval
        assert (kind, comment) == ("comment", ": keep-alive")
        insert_task(db, "three")  # the same stream carries the next transaction
        change, up_to_date = stream.data(2)
        assert change["value"]["title"] == "three" and up_to_date["headers"]["control"] == "up-to-date"
        stream.join()  # it ends after sse_timeout; the client reconnects
        resume = f"{up_to_date['headers']['global_last_seen_lsn']}_0"  # the official client's getOffset()
        insert_task(db, "four")
        again = EventStream(served, {**sse_params(last), "offset": resume})
        change, _ = again.data(2)
        assert change["value"]["title"] == "four", "a reconnect from <lsn>_0 must neither skip nor repeat"


def test_experimental_live_sse_alone_also_streams(served: ServedApp, target_url: str) -> None:
    with psycopg.connect(target_url, autocommit=True) as db:
        last, _ = sync_to_end(served)
        params = sse_params(last)
        del params["live_sse"]
        stream = EventStream(served, {**params, "experimental_live_sse": "true"})
        assert stream.response is not None
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        insert_task(db, "via the deprecated name")
        change, up_to_date = stream.data(2)
        assert change["value"]["title"] == "via the deprecated name"
        assert up_to_date["headers"]["control"] == "up-to-date"


def test_a_deleted_shape_ends_the_stream_and_the_reconnect_gets_409(served: ServedApp, target_url: str) -> None:
    with psycopg.connect(target_url, autocommit=True) as db:
        insert_task(db, "x")
        last, _ = sync_to_end(served)
        stream = EventStream(served, sse_params(last))
        handle = last.headers["electric-handle"]
        deleted = httpx.delete(served.url + "/v1/shape", params={"table": "tasks", "handle": handle, "secret": SECRET})
        assert deleted.status_code == 202
        while (item := stream.next())[0] != "end":
            assert item[0] == "comment", item
        stream.join()
        reconnect = httpx.get(served.url + "/v1/shape", params={"table": "tasks", "secret": SECRET, **sse_params(last)})
        assert reconnect.status_code == 409
        assert reconnect.json() == [{"headers": {"control": "must-refetch"}}]


def test_sse_without_live_is_an_ordinary_response(served: ServedApp, target_url: str) -> None:
    """``live_sse`` only changes live requests, as in Electric: a catch-up request stays a JSON array."""
    with psycopg.connect(target_url, autocommit=True) as db:
        insert_task(db, "x")
    response = httpx.get(
        served.url + "/v1/shape", params={"table": "tasks", "offset": "-1", "live_sse": "true", "secret": SECRET}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert [m["value"]["title"] for m in response.json() if "key" in m] == ["x"]
