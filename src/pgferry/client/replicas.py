"""The replica interface the client relies on, and :func:`open_replica`, which picks a backend from a URL.

Two backends keep the same contract (rows + offset/handle committed together at up-to-date boundaries, the
optimistic overlay, the durable outbox): :class:`~pgferry.client.replica.LocalReplica` on SQLite (the default:
embedded, zero set-up) and :class:`~pgferry.client.replica_pg.PostgresReplica` on any PostgreSQL database, where the
synced columns keep their native types. ``ElectricSupabaseClient`` and ``OutboxSender`` are written against
:class:`Replica`, so they do not care which one holds the data.

Owns the choice of backend; must not do HTTP or hold data itself.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from pgferry.client._shape_base import Change, ShapeBatch
from pgferry.client.replica import LocalReplica, OutboxItem, Rejection

__all__ = ["Replica", "open_replica"]


class Replica(Protocol):
    """What the client and the outbox sender need from a replica (see :class:`LocalReplica` for each method)."""

    def position(self, name: str) -> tuple[str, str | None] | None: ...

    def schema(self, name: str) -> dict[str, Any]: ...

    def source_table(self, name: str) -> str | None: ...

    def stage(
        self,
        name: str,
        changes: Sequence[Change],
        *,
        schema: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> None: ...

    def stage_pages(
        self,
        name: str,
        pages: Sequence[ShapeBatch],
        *,
        schema: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> None: ...
    def discard_staged(self, name: str) -> None: ...

    def apply(
        self,
        name: str,
        source_table: str,
        changes: Sequence[Change],
        *,
        offset: str,
        handle: str | None,
        schema: Mapping[str, Any] | None,
        reset: bool = False,
        processed_lsn: int | None = None,
    ) -> set[int]: ...

    def rows(self, name: str, *, typed: bool = True, synced: bool = False) -> list[dict[str, Any]]: ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def write(
        self,
        name: str,
        op: Literal["insert", "update", "delete"],
        text_row: Mapping[str, str | None],
        json_row: Mapping[str, Any],
        *,
        written_at: int | None = None,
    ) -> str: ...

    def outbox(self, *, state: str | None = None, limit: int = 1000, after: int = 0) -> list[OutboxItem]: ...

    def count_outbox(self, *, state: str | None = None) -> int: ...

    def acknowledge(self, results: Iterable[Mapping[str, Any]], *, followed: Container[str] | None = None) -> None: ...

    def reject(self, problems: Iterable[Mapping[str, Any]]) -> list[Rejection]: ...

    def rejections(self) -> list[Rejection]: ...

    def close(self) -> None: ...


def open_replica(target: str | Path) -> Replica:
    """``postgresql://…`` / ``postgres://…``: a :class:`PostgresReplica` in that database; ``sqlite:///path``, a
    plain path or ``":memory:"``: a SQLite :class:`LocalReplica`."""
    text = str(target)
    if text.startswith(("postgresql://", "postgres://")):
        from pgferry.client.replica_pg import PostgresReplica  # psycopg only when a PostgreSQL replica is wanted

        return PostgresReplica(text)
    if text.startswith("sqlite://"):
        text = text.removeprefix("sqlite://")
        # sqlite:///relative.db -> "relative.db"; sqlite:////abs/path.db -> "/abs/path.db"; sqlite:// -> memory
        text = text[1:] if text.startswith("/") else text
        return LocalReplica(text or ":memory:")
    return LocalReplica(text)
