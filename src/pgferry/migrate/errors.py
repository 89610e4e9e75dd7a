"""The errors ``pgferry.migrate`` raises on purpose, one hierarchy under :class:`pgferry.errors.PgferryError`.

Each message is one line that says what happened, where (which server, which phase, doing what), what to do,
and whether rerunning ``pgferry migrate run`` resumes. Every class pickles (its constructor arguments are
its ``args``), so an error can cross a process boundary intact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pgferry.errors import PgferryError

if TYPE_CHECKING:
    from pgferry.migrate.plan import MigrationPlan
    from pgferry.migrate.verify import VerificationReport

__all__ = [
    "MigrationError",
    "MigrationInterruptedError",
    "NothingToRollBackError",
    "PlanBlockedError",
    "SameDatabaseError",
    "ServerUnreachableError",
    "VerificationFailedError",
    "on_side",
]


@contextlib.contextmanager
def on_side(side: str) -> Iterator[None]:
    """Label an exception raised inside with the server it came from (``source`` or ``target``).

    A database error does not say which connection raised it; errors shown to the operator must. The label
    is an attribute (``pgferry_side``) on the exception itself, so retry classification is unchanged; an
    inner label wins over an outer one.
    """
    try:
        yield
    except Exception as exc:
        if not getattr(exc, "pgferry_side", None):
            with contextlib.suppress(AttributeError):
                exc.pgferry_side = side  # type: ignore[attr-defined]
        raise


def _one_line(text: str) -> str:
    return " ".join(text.split())


class MigrationError(PgferryError):
    """The migration stopped; the state on the target says where, and ``run`` resumes from there."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class SameDatabaseError(MigrationError):
    """Source and target are one database: migrating it onto itself would rewrite the source."""


class ServerUnreachableError(MigrationError):
    """A server could not be reached (or refused the login) before anything was done on it."""

    def __init__(self, message: str, side: str = "") -> None:
        super().__init__(message)
        self.side = side

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.side))


class MigrationInterruptedError(MigrationError):
    """A phase stopped on an error; the message names the phase, the step and the server, and how to go on."""

    def __init__(self, message: str, phase: str = "", side: str = "", sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.phase = phase
        self.side = side
        self.sqlstate = sqlstate

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.phase, self.side, self.sqlstate))


class PlanBlockedError(MigrationError):
    """``plan`` found something that would lose or duplicate data; nothing was written anywhere."""

    def __init__(self, message: str, plan: MigrationPlan | None = None) -> None:
        super().__init__(message)
        self.plan = plan

    @classmethod
    def from_plan(cls, plan: MigrationPlan) -> PlanBlockedError:
        first = plan.errors[0]
        more = f" (and {len(plan.errors) - 1} more; see `pgferry migrate plan`)" if len(plan.errors) > 1 else ""
        fix = f"; {first.fix}" if first.fix else ""
        return cls(f"nothing was written: {first.message}{fix}{more}", plan)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.plan))


class VerificationFailedError(MigrationError):
    """The target does not (yet) hold exactly the source's data; the report says where."""

    def __init__(self, message: str, report: VerificationReport | None = None) -> None:
        super().__init__(message)
        self.report = report

    @classmethod
    def from_report(cls, report: VerificationReport, *, repairable: bool) -> VerificationFailedError:
        problems = report.problems()
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        advice = (
            " If the source was written during this offline run, stop the writes, then rerun `pgferry migrate "
            "run`: it copies again only the buckets that differ and verifies them again."
            if repairable
            else ""
        )
        return cls(f"verification failed: {shown}.{advice} Details: `pgferry migrate verify --json`.", report)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.report))


class NothingToRollBackError(MigrationError):
    """There is no migration recorded on the target (never run, or already rolled back)."""
