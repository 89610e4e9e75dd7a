"""The durable operation queue: writes accepted while the database was unreachable, on local disk, in order.

A SQLite file (stdlib, crash-safe: WAL journal with ``synchronous = FULL``, so an operation is on disk before
``put`` returns) holding each operation with its idempotency key, the verified claims it was accepted under, the SQL
and its JSON parameters. ``seq`` gives the order; an operation leaves the file only after the database committed it
(``remove``), and one the database refuses for good moves to ``dead_letters`` with the error, so nothing is lost.

The file holds users' claims (ids, emails), so it is created ``0600``. Owns the file only: applying operations is
:mod:`pgferry.runtime.resilience`'s job.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgferry.runtime.errors import QueueError

__all__ = ["Operation", "OperationQueue", "QueuedOperation"]

_SCHEMA = """
create table if not exists operations (
  seq integer primary key autoincrement,
  key text not null unique,
  claims text not null,
  statement text not null,
  params text not null,
  enqueued_at real not null
);
create table if not exists dead_letters (
  seq integer primary key,
  key text not null,
  claims text not null,
  statement text not null,
  params text not null,
  enqueued_at real not null,
  failed_at real not null,
  error text not null
);
"""


@dataclass(frozen=True)
class Operation:
    """One write: ``statement`` (SQL with ``%(name)s`` placeholders) and JSON-serializable ``params``.

    ``key`` is the idempotency key: the database records it in the same transaction as the write, so however often
    the operation is sent (a retry after a lost commit acknowledgement, a replay after a crash) it applies once.
    Give a key derived from the request (e.g. the client's request id) to make client retries idempotent too.
    """

    statement: str
    params: Mapping[str, Any] = field(default_factory=dict)
    key: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass(frozen=True)
class QueuedOperation:
    seq: int
    operation: Operation
    claims: Mapping[str, Any]
    enqueued_at: float


def _json(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


class OperationQueue:
    """A FIFO of operations in one SQLite file; safe to share between threads of one process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("pragma journal_mode = wal")
            self._db.execute("pragma synchronous = full")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise QueueError(
                f"cannot open the operation queue {path}: {exc}; check the directory and its space"
            ) from None
        self._lock = threading.Lock()

    def put(self, operation: Operation, claims: Mapping[str, Any]) -> None:
        """Store ``operation`` at the end of the queue, durably; a key already queued is not queued twice."""
        try:
            params = _json(dict(operation.params))
        except (TypeError, ValueError) as exc:
            raise QueueError(f"operation parameters must be JSON-serializable to be queued: {exc}") from None
        with self._lock:
            try:
                self._db.execute(
                    "insert into operations (key, claims, statement, params, enqueued_at) values (?, ?, ?, ?, ?) "
                    "on conflict (key) do nothing",
                    (str(operation.key), _json(dict(claims)), operation.statement, params, time.time()),
                )
            except sqlite3.Error as exc:
                raise QueueError(
                    f"cannot write to the operation queue {self.path}: {exc}; check free disk space"
                ) from None

    def peek(self, limit: int, *, after: int | None = None) -> list[QueuedOperation]:
        """The oldest ``limit`` operations (those queued after ``after``, a ``seq``, if given), oldest first; they
        stay queued until :meth:`remove`."""
        with self._lock:
            rows = self._db.execute(
                "select seq, key, claims, statement, params, enqueued_at from operations where seq > ? "
                "order by seq limit ?",
                (-1 if after is None else after, limit),
            ).fetchall()
        claims_by_text: dict[str, Any] = {}  # one object per distinct claims: the replay renders each once
        return [
            QueuedOperation(
                seq,
                Operation(statement, json.loads(params), uuid.UUID(key)),
                claims_by_text.get(claims) or claims_by_text.setdefault(claims, json.loads(claims)),
                at,
            )
            for seq, key, claims, statement, params, at in rows
        ]

    def remove(self, items: Sequence[QueuedOperation]) -> None:
        """Forget operations the database has committed."""
        with self._lock:
            self._db.execute("begin immediate")
            self._db.executemany("delete from operations where seq = ?", [(item.seq,) for item in items])
            self._db.execute("commit")

    def dead_letter(self, item: QueuedOperation, error: str) -> None:
        """Move an operation the database refuses for good (a policy, a constraint) aside, with the reason."""
        op = item.operation
        with self._lock:
            self._db.execute("begin immediate")
            self._db.execute(
                "insert or replace into dead_letters values (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    item.seq,
                    str(op.key),
                    _json(dict(item.claims)),
                    op.statement,
                    _json(dict(op.params)),
                    item.enqueued_at,
                    time.time(),
                    error,
                ),
            )
            self._db.execute("delete from operations where seq = ?", (item.seq,))
            self._db.execute("commit")

    def depth(self) -> int:
        with self._lock:
            row = self._db.execute("select count(*) from operations").fetchone()
        return int(row[0])

    def dead_letters(self) -> list[tuple[uuid.UUID, str]]:
        """``(key, error)`` of every operation the database refused, oldest first."""
        with self._lock:
            rows = self._db.execute("select key, error from dead_letters order by seq").fetchall()
        return [(uuid.UUID(key), error) for key, error in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
