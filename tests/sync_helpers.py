"""Helpers for the dev sync server tests: a served app, shape requests carrying the server's secret, paging."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg

from pgferry.sync.server import SyncServerConfig, create_sync_app
from pgferry.testing.asgi import ServedApp

USER = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
SECRET = "sync-test-secret-0123456789abcdef"


def make_server(url: str, data_dir: Path, *, live_timeout: float = 3.0, **options: Any) -> ServedApp:
    config = SyncServerConfig(database_url=url, data_dir=data_dir, live_timeout=live_timeout, secret=SECRET, **options)
    return ServedApp(create_sync_app(config))


def insert_task(conn: psycopg.Connection[Any], title: str, **values: Any) -> str:
    columns = {"user_id": USER, "title": title, **values}
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join(["%s"] * len(columns))
    row = conn.execute(f"insert into tasks ({names}) values ({marks}) returning id::text", list(columns.values()))
    fetched = row.fetchone()
    assert fetched is not None
    return str(fetched[0])


def shape(served: Any, **params: Any) -> httpx.Response:
    query = {"table": "tasks", "offset": "-1", "secret": SECRET, **{k: str(v) for k, v in params.items()}}
    return httpx.get(served.url + "/v1/shape", params=query, timeout=30)


def changes(response: httpx.Response) -> list[dict[str, Any]]:
    return [m for m in response.json() if "key" in m]


def controls(response: httpx.Response) -> list[str]:
    return [m["headers"]["control"] for m in response.json() if "control" in m.get("headers", {})]


def sync_to_end(served: Any, **params: Any) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """Page through a new shape until up-to-date, as a client does; return the last response and all changes."""
    response = shape(served, **params)
    assert response.status_code == 200, response.text
    seen = changes(response)
    while "up-to-date" not in controls(response):
        response = shape(
            served, **params, offset=response.headers["electric-offset"], handle=response.headers["electric-handle"]
        )
        assert response.status_code == 200, response.text
        seen += changes(response)
    return response, seen


def live_after(served: Any, last: httpx.Response, **params: Any) -> httpx.Response:
    return shape(
        served,
        **params,
        offset=last.headers["electric-offset"],
        handle=last.headers["electric-handle"],
        live="true",
        cursor="",
    )


def follow(served: Any, last: httpx.Response, until: Any, *, rounds: int = 10, **params: Any) -> list[dict[str, Any]]:
    """Live changes after ``last`` until ``until(changes so far)`` holds or ``rounds`` long-polls passed."""
    seen: list[dict[str, Any]] = []
    response = last
    for _ in range(rounds):
        response = live_after(served, response, **params)
        assert response.status_code == 200, response.text
        seen += changes(response)
        if until(seen):
            break
    return seen


class Later:
    """Start a (live) request now, in a thread, and collect its response later."""

    def __init__(self, call: Any) -> None:
        self._result: list[Any] = []
        self._thread = threading.Thread(target=lambda: self._result.append(call()))
        self._thread.start()

    def result(self) -> Any:
        self._thread.join(30)
        assert self._result, "request did not finish"
        return self._result[0]
