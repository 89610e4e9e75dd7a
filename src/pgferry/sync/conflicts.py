"""Conflict resolution for the write API: who wins when a client's update meets a row that changed meanwhile.

Server-authoritative: the policy runs inside the write transaction, on the row as it is now, and what it decides is
what gets written. Three policies, chosen per table (:attr:`pgferry.sync.write_api.WriteApiConfig.conflicts`):

- :class:`ColumnLww` (the default): last-write-wins **per column**. Every column written through the API keeps the
  client's write time (``written_at``, ms; the server's clock when a client sends none) and the mutation id; a
  client's value for a column wins unless the column's stored write is newer (ties: the larger mutation id wins, so
  every server decides alike). Concurrent edits to different columns therefore both survive. A column changed
  outside the API has no stored time; the row's ``updated_at`` stands in for it.
- :class:`RowLww`: last-write-wins for the **whole row** on ``updated_at``: the client's update is applied only if
  its write time is not older than the row's ``updated_at``.
- :class:`CustomResolver`: a callable given the server row, the client's values and the base the client saw (all in
  PostgreSQL text form), returning the values to write (``None``: keep the server's row).

A conflict is a written column whose server value differs from the client's ``base`` (when the client sent one),
or, for per-column LWW, whose stored write is newer than the client's. Each conflict is recorded
(``pgferry.resolved_conflicts``: table, key, columns, winner, why) and reported in the mutation's result.

Pure: decisions only, no I/O. Must not build SQL (that is :mod:`pgferry.sync.writer`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "ColumnLww",
    "ColumnVersion",
    "ConflictPolicy",
    "CustomResolver",
    "Decision",
    "ResolvedConflict",
    "RowLww",
    "UpdateContext",
]

Value = str | list[str | None] | None
Winner = Literal["client", "server", "custom"]


@dataclass(frozen=True, slots=True)
class ColumnVersion:
    """When a column was last written through the API (client ms) and by which mutation (the tie-breaker)."""

    written_at: int
    mutation_id: uuid.UUID

    def newer_than(self, other: ColumnVersion) -> bool:
        return (self.written_at, str(self.mutation_id)) > (other.written_at, str(other.mutation_id))


@dataclass(frozen=True, slots=True)
class ResolvedConflict:
    """One resolved conflict as recorded and reported: which columns, who won, and why."""

    columns: tuple[str, ...]
    winner: Winner
    why: str

    def as_json(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "winner": self.winner, "why": self.why}


@dataclass(frozen=True, slots=True)
class Decision:
    """What to write (``values``: column -> text value, possibly empty: nothing), the conflicts resolved on the
    way, and the column versions to store for the columns written."""

    values: Mapping[str, Any]
    conflicts: list[ResolvedConflict] = field(default_factory=list)
    versions: dict[str, ColumnVersion] = field(default_factory=dict)
    #: ``values`` are JSON values (a custom resolver's), still to be converted to text by column type.
    json_values: bool = False


@dataclass(frozen=True, slots=True)
class UpdateContext:
    """Everything a policy may look at for one update: the client's values (key excluded), the base it saw, the
    server row now (text form; arrays as lists), the written columns whose server value differs from the base
    (compared by PostgreSQL, by type: ``IS DISTINCT FROM``), the stored column versions, the client's write time
    and mutation id, and the row's ``updated_at`` in ms (``None`` when the table has none)."""

    client: Mapping[str, Value]
    base: Mapping[str, Value] | None
    server: Mapping[str, Value]
    changed: frozenset[str]
    versions: Mapping[str, ColumnVersion]
    written_at: int
    mutation_id: uuid.UUID
    row_updated_at: int | None

    def changed_since_base(self) -> list[str]:
        """Written columns whose server value is not the one the client's base shows, in the client's order."""
        return [name for name in self.client if name in self.changed]


class ConflictPolicy(Protocol):
    """How a table's concurrent updates are decided."""

    @property
    def keeps_versions(self) -> bool:
        """Whether the writer must keep per-column write times for this table."""
        ...

    def decide(self, context: UpdateContext) -> Decision: ...


@dataclass(frozen=True)
class ColumnLww:
    """Last-write-wins per column, by the client's write time (see the module docstring)."""

    keeps_versions: bool = True

    def decide(self, context: UpdateContext) -> Decision:
        ours = ColumnVersion(context.written_at, context.mutation_id)
        changed = set(context.changed_since_base())
        values: dict[str, Value] = {}
        versions: dict[str, ColumnVersion] = {}
        server_won: list[str] = []
        client_won: list[str] = []
        for name, value in context.client.items():
            theirs = context.versions.get(name)
            if theirs is None and name in changed and context.row_updated_at is not None:
                theirs = ColumnVersion(context.row_updated_at, uuid.UUID(int=0))
            if theirs is not None and theirs.newer_than(ours):
                server_won.append(name)
                continue
            values[name] = value
            versions[name] = ours
            if name in changed:
                client_won.append(name)
        conflicts = []
        if server_won:
            conflicts.append(
                ResolvedConflict(tuple(server_won), "server", "the server's write of these columns is newer")
            )
        if client_won:
            conflicts.append(
                ResolvedConflict(
                    tuple(client_won), "client", "changed since the client's base, but the client's write is newer"
                )
            )
        return Decision(values, conflicts, versions)


@dataclass(frozen=True)
class RowLww:
    """Last-write-wins per row: the client's update applies only if its write time is not older than the row's
    ``updated_at`` (the platform's tables keep it by trigger, so clients cannot fake it)."""

    keeps_versions: bool = False

    def decide(self, context: UpdateContext) -> Decision:
        changed = tuple(context.changed_since_base())
        if context.row_updated_at is not None and context.row_updated_at > context.written_at:
            columns = changed or tuple(context.client)
            why = "the row's updated_at is newer than the client's write"
            return Decision({}, [ResolvedConflict(columns, "server", why)])
        conflicts = []
        if changed:
            why = "changed since the client's base, but the client's write is newer than updated_at"
            conflicts.append(ResolvedConflict(changed, "client", why))
        return Decision(dict(context.client), conflicts)


Resolver = Callable[[Mapping[str, Value], Mapping[str, Value], Mapping[str, Value] | None], Mapping[str, Any] | None]


@dataclass(frozen=True)
class CustomResolver:
    """A resolver of the application's: ``resolve(server_row, client_values, base)`` is called when a written
    column changed since the client's base (or always, with ``always=True``) and returns the values to write, in
    JSON form like a mutation's row (``None`` or ``{}``: keep the server's row). Without a conflict the client's
    values are written as sent."""

    resolve: Resolver
    always: bool = False
    keeps_versions: bool = False

    def decide(self, context: UpdateContext) -> Decision:
        changed = tuple(context.changed_since_base())
        if not changed and not self.always:
            return Decision(dict(context.client))
        chosen = self.resolve(dict(context.server), dict(context.client), context.base)
        columns = changed or tuple(context.client)
        conflict = ResolvedConflict(columns, "custom", "decided by the table's custom resolver")
        return Decision(dict(chosen or {}), [conflict], json_values=True)
