"""Turning expected failures into one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

import psycopg

from pgferry.errors import PgferryError
from pgferry.redaction import redact_text

EXIT_USAGE = 2


def fail(message: str) -> NoReturn:
    print(f"pgferry: error: {redact_text(message)}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_reporting_errors(main: Callable[[], object]) -> None:
    """Run ``main``; expected failures become ``pgferry: error: …`` and exit status 2."""
    try:
        main()
    except PgferryError as exc:
        fail(str(exc))
    except psycopg.OperationalError as exc:
        side = getattr(exc, "pgferry_side", None)
        which = f"the {side} database" if side else "the database"
        fail(
            f"cannot connect to {which}: {_first_line(exc)} (check the URL, that the server runs and "
            "that it accepts connections from here)"
        )
    except psycopg.Error as exc:
        state = getattr(exc, "sqlstate", None)
        fail(f"database error{f' [{state}]' if state else ''}: {_first_line(exc)}")
    except Exception as exc:
        # Alembic is imported only by the commands that use it; its errors are one line too.
        if type(exc).__module__.startswith("alembic.") and type(exc).__name__ == "CommandError":
            fail(f"migration error: {_first_line(exc)}")
        raise
