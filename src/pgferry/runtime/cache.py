"""The local replica reads fall back to while the database is unreachable: the last good answer, per user.

Every successful read through :meth:`pgferry.runtime.resilience.ResilientDatabase.read` stores its rows here under
``(user id, cache key)``; when the database cannot be reached, the same read returns those rows marked stale with
the time they were read. The user id is part of the key, so one user's rows can never answer another user's read.
Rows are stored as JSON (uuids, timestamps and decimals come back as text).

A SQLite file created ``0600`` (it holds users' rows). Owns the file only; deciding when to use it is the caller's.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgferry.runtime.errors import QueueError

__all__ = ["CachedRows", "ReadCache"]


@dataclass(frozen=True)
class CachedRows:
    rows: list[dict[str, Any]]
    as_of: float
    """Unix time at which the database returned these rows."""


class ReadCache:
    """Last results of reads, by user and key; safe to share between threads of one process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("pragma journal_mode = wal")
            self._db.execute(
                "create table if not exists reads (user_id text not null, key text not null, rows text not null, "
                "as_of real not null, primary key (user_id, key))"
            )
        except (OSError, sqlite3.Error) as exc:
            raise QueueError(f"cannot open the read cache {path}: {exc}; check the directory and its space") from None
        self._lock = threading.Lock()

    def store(self, user_id: str, key: str, rows: list[dict[str, Any]]) -> None:
        text = json.dumps(rows, default=str, separators=(",", ":"))
        with self._lock:
            self._db.execute(
                "insert into reads values (?, ?, ?, ?) on conflict (user_id, key) do update "
                "set rows = excluded.rows, as_of = excluded.as_of",
                (user_id, key, text, time.time()),
            )

    def load(self, user_id: str, key: str) -> CachedRows | None:
        with self._lock:
            row = self._db.execute(
                "select rows, as_of from reads where user_id = ? and key = ?", (user_id, key)
            ).fetchone()
        if row is None:
            return None
        return CachedRows(json.loads(row[0]), float(row[1]))

    def close(self) -> None:
        with self._lock:
            self._db.close()
