"""``pgferry dev``: the two-server local stack and its state on disk.

``source`` stands in for Neon (database ``neondb``, the platform tables as Neon has them) and ``target`` for
Supabase (database ``postgres``, the local baseline plus pgferry's migrations). Both live under
``$PGFERRY_HOME/dev`` and survive ``down``; ``down --destroy`` deletes them. Running ``up`` twice is
harmless: a running server is left alone and preparation steps are idempotent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg

from pgferry.errors import PgferryError
from pgferry.localstack.binaries import PostgresInstall, describe_install, find_install
from pgferry.localstack.cluster import (
    ClusterSettings,
    PortInUseError,
    PostgresCluster,
    port_is_free,
    runnable_install,
    service_user,
)
from pgferry.localstack.databases import create_database, database_exists
from pgferry.schema.migrator import upgrade
from pgferry.schema.neon import create_neon_schema
from pgferry.supabase.baseline import apply_local_baseline

DEFAULT_SOURCE_PORT = 54330
DEFAULT_TARGET_PORT = 54322
SOURCE_DBNAME = "neondb"
TARGET_DBNAME = "postgres"


class StackError(PgferryError):
    """The local stack is not in a state the command can work with."""


def prepare_source_database(url: str) -> None:
    """Give a database the shape of the team's Neon project."""
    create_neon_schema(url)


def prepare_target_database(url: str) -> None:
    """Give a database the shape of a Supabase project with pgferry's migrations applied."""
    apply_local_baseline(url)
    upgrade(url)


@dataclass
class StackState:
    bindir: str
    source_port: int
    target_port: int

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> StackState | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        return cls(bindir=data["bindir"], source_port=int(data["source_port"]), target_port=int(data["target_port"]))


@dataclass(frozen=True)
class ServerStatus:
    name: str
    url: str
    port: int
    running: bool
    reachable: bool
    version: str | None
    datadir: str


class LocalStack:
    """The ``source`` and ``target`` servers under one home directory."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.root = home / "dev"
        self.state_file = self.root / "stack.json"

    def _clusters(self, state: StackState) -> tuple[PostgresCluster, PostgresCluster]:
        user = service_user()
        install = describe_install(Path(state.bindir), "system")
        return (
            PostgresCluster(install, self.root / "source", user=user),
            PostgresCluster(install, self.root / "target", user=user),
        )

    def up(
        self,
        *,
        source_port: int = DEFAULT_SOURCE_PORT,
        target_port: int = DEFAULT_TARGET_PORT,
        bindir: str | None = None,
    ) -> list[ServerStatus]:
        """Create (first time), start and prepare both servers."""
        state = StackState.load(self.state_file)
        if state is None:
            for port in (source_port, target_port):
                if not port_is_free(port):
                    raise PortInUseError(
                        f"port {port} on 127.0.0.1 is already in use; pick free ports with "
                        "`pgferry dev up --source-port N --target-port M`"
                    )
            user = service_user()
            install: PostgresInstall = runnable_install(find_install(bindir), user, self.home / "pginstall")
            state = StackState(bindir=str(install.bindir), source_port=source_port, target_port=target_port)
            source, target = self._clusters(state)
            source.init(ClusterSettings(port=source_port))
            target.init(ClusterSettings(port=target_port))
            state.save(self.state_file)
        source, target = self._clusters(state)
        source.start()
        target.start()
        if not database_exists(source, SOURCE_DBNAME):
            create_database(source, SOURCE_DBNAME)
        prepare_source_database(source.url(SOURCE_DBNAME))
        prepare_target_database(target.url(TARGET_DBNAME))
        return self.status()

    def down(self, *, destroy: bool = False) -> None:
        state = StackState.load(self.state_file)
        if state is None:
            return
        for cluster in self._clusters(state):
            if destroy:
                cluster.destroy()
            else:
                cluster.stop()
        if destroy:
            self.state_file.unlink(missing_ok=True)

    def status(self) -> list[ServerStatus]:
        state = StackState.load(self.state_file)
        if state is None:
            raise StackError("the local stack has not been created; run `pgferry dev up`")
        source, target = self._clusters(state)
        return [
            _server_status("source", source, SOURCE_DBNAME),
            _server_status("target", target, TARGET_DBNAME),
        ]

    def url(self, name: str) -> str:
        for server in self.status():
            if server.name == name:
                if not server.running:
                    raise StackError(f"the {name} server is not running; run `pgferry dev up`")
                return server.url
        raise StackError(f"no server named {name!r}; the stack has 'source' and 'target'")


def _server_status(name: str, cluster: PostgresCluster, dbname: str) -> ServerStatus:
    running = cluster.is_running()
    version = None
    reachable = False
    if running:
        try:
            with psycopg.connect(cluster.url(dbname), connect_timeout=3) as conn:
                row = conn.execute("show server_version").fetchone()
                version = None if row is None else str(row[0])
                reachable = True
        except psycopg.OperationalError:
            reachable = False
    return ServerStatus(
        name=name,
        url=cluster.url(dbname),
        port=cluster.port,
        running=running,
        reachable=reachable,
        version=version,
        datadir=str(cluster.datadir),
    )
