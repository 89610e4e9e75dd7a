"""``pgferry dev``: the two-server local stack and its state on disk.

``source`` stands in for Neon (database ``neondb``, the platform tables as Neon has them) and ``target`` for
Supabase (database ``postgres``, the local baseline plus pgferry's migrations). Both live under
``$PGFERRY_HOME/dev`` and survive ``down``; ``down --destroy`` deletes them. Running ``up`` twice is
harmless: a running server is left alone and preparation steps are idempotent.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg

from pgferry.db.connect import connect
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
from pgferry.localstack.pgbouncer import PgBouncer, PgBouncerError, pgbouncer_program
from pgferry.localstack.services import BackgroundService
from pgferry.schema.migrator import upgrade
from pgferry.schema.neon import create_neon_schema
from pgferry.supabase.baseline import apply_local_baseline

DEFAULT_SOURCE_PORT = 54330
DEFAULT_TARGET_PORT = 54322
DEFAULT_SYNC_PORT = 54350
DEFAULT_PROXY_PORT = 54351
DEFAULT_POOLER_PORT = 54329
"""PgBouncer in transaction mode in front of the target: what `supabase start` calls the pooler (Supavisor 6543)."""
# `supabase start`'s API port: the Realtime server answers there (/realtime/v1/websocket), as Supabase's gateway does.
DEFAULT_API_PORT = 54321
# What `supabase start` calls the project URL; dev tokens are issued for it (iss = <url>/auth/v1).
DEV_SUPABASE_URL = "http://127.0.0.1:54321"
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
    sync_port: int = DEFAULT_SYNC_PORT
    proxy_port: int = DEFAULT_PROXY_PORT
    pooler_port: int = DEFAULT_POOLER_PORT
    api_port: int = DEFAULT_API_PORT

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> StackState | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        return cls(
            bindir=data["bindir"],
            source_port=int(data["source_port"]),
            target_port=int(data["target_port"]),
            sync_port=int(data.get("sync_port", DEFAULT_SYNC_PORT)),
            proxy_port=int(data.get("proxy_port", DEFAULT_PROXY_PORT)),
            pooler_port=int(data.get("pooler_port", DEFAULT_POOLER_PORT)),
            api_port=int(data.get("api_port", DEFAULT_API_PORT)),
        )


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
        sync_port: int = DEFAULT_SYNC_PORT,
        proxy_port: int = DEFAULT_PROXY_PORT,
        pooler_port: int = DEFAULT_POOLER_PORT,
        api_port: int = DEFAULT_API_PORT,
        with_sync: bool = True,
        with_pooler: bool = True,
    ) -> list[ServerStatus]:
        """Create (first time), start and prepare both servers; PgBouncer in transaction mode in front of the target
        (when installed); then the sync server, the shape proxy and the Realtime server on the API port."""
        state = StackState.load(self.state_file)
        if state is None:
            options = {"--source-port": source_port, "--target-port": target_port}
            if with_pooler:
                options["--pooler-port"] = pooler_port
            if with_sync:
                options.update({"--sync-port": sync_port, "--proxy-port": proxy_port, "--api-port": api_port})
            for option, port in options.items():
                if not port_is_free(port):
                    raise PortInUseError(
                        f"port {port} on 127.0.0.1 is already in use; pick a free one with `pgferry dev up {option} N`"
                    )
            user = service_user()
            install: PostgresInstall = runnable_install(find_install(bindir), user, self.home / "pginstall")
            state = StackState(
                bindir=str(install.bindir),
                source_port=source_port,
                target_port=target_port,
                sync_port=sync_port,
                proxy_port=proxy_port,
                pooler_port=pooler_port,
                api_port=api_port,
            )
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
        pooler = self._pooler(state)
        try:
            if not with_pooler:
                raise PgBouncerError("not asked for")
            pgbouncer_program()
        except PgBouncerError as exc:  # the stack works without it; only transaction-mode testing needs it
            if with_pooler:
                print(f"pgferry: note: no pooler on the local stack: {exc}", file=sys.stderr)
        else:
            self._start_pooler(pooler, state)
        if with_sync:
            sync, proxy, realtime = self._services(state, target)
            electric_secret = self.electric_secret()
            sync_env = {"ELECTRIC_SECRET": electric_secret}  # the sync server refuses requests without it
            proxy_env = {  # the proxy verifies tokens the way it would for this stack's "Supabase"
                "SUPABASE_JWT_SECRET": self.jwt_secret(),
                "SUPABASE_URL": DEV_SUPABASE_URL,
                "SUPABASE_JWKS_URL": "",
                "ELECTRIC_SECRET": electric_secret,  # and adds it to every request it forwards
            }
            realtime_env = {  # Realtime verifies API keys and users' tokens with the stack's JWT secret
                "SUPABASE_JWT_SECRET": self.jwt_secret(),
                "SUPABASE_URL": DEV_SUPABASE_URL,
                "SUPABASE_JWKS_URL": "",
            }
            for service, port, option, env in (
                (sync, state.sync_port, "--sync-port", sync_env),
                (proxy, state.proxy_port, "--proxy-port", proxy_env),
                (realtime, state.api_port, "--api-port", realtime_env),
            ):
                if service.pid() is None and not port_is_free(port):
                    raise PortInUseError(
                        f"port {port} on 127.0.0.1 (the {service.name}) is already in use; stop what holds it, or "
                        f"`pgferry dev down --destroy` and `pgferry dev up {option} N`"
                    )
                service.start(env=env)
        return self.status()

    def jwt_secret(self) -> str:
        """The local stack's JWT secret (created once, private to this home): what `supabase start` calls the
        project's JWT secret. The proxy verifies tokens with it and `pgferry dev token` signs them."""
        return self._private_secret("jwt-secret")

    def anon_key(self) -> str:
        """The stack's public API key: a JWT with role ``anon`` signed with the stack's JWT secret, fixed for the
        secret's life (as `supabase start`'s demo keys are), for ``create_client(api, anon_key)``."""
        import jwt

        issued = 1_700_000_000
        claims = {"iss": "supabase", "ref": "local", "role": "anon", "iat": issued, "exp": issued + 20 * 365 * 86400}
        return jwt.encode(claims, self.jwt_secret(), algorithm="HS256")

    def api_url(self) -> str:
        state = StackState.load(self.state_file)
        return f"http://127.0.0.1:{state.api_port if state else DEFAULT_API_PORT}"

    def electric_secret(self) -> str:
        """The secret the dev sync server requires on every request (Electric's ``ELECTRIC_SECRET``); created once,
        private to this home, given to the sync server and the shape proxy only."""
        return self._private_secret("electric-secret")

    def _private_secret(self, name: str) -> str:
        path = self.root / name
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48) + "\n")
        return path.read_text().strip()

    def _services(
        self, state: StackState, target: PostgresCluster
    ) -> tuple[BackgroundService, BackgroundService, BackgroundService]:
        python = sys.executable
        sync_url = f"http://127.0.0.1:{state.sync_port}"
        sync = BackgroundService(
            name="sync server",
            directory=self.root / "sync",
            argv=[
                python,
                "-m",
                "pgferry",
                "sync",
                "serve",
                "--database-url",
                target.url(TARGET_DBNAME),
                "--port",
                str(state.sync_port),
                "--data-dir",
                str(self.root / "sync" / "shapes"),
            ],
            health_url=f"{sync_url}/v1/health",
        )
        proxy = BackgroundService(
            name="shape proxy",
            directory=self.root / "proxy",
            argv=[
                python,
                "-m",
                "pgferry",
                "sync",
                "proxy",
                "--upstream",
                sync_url,
                "--port",
                str(state.proxy_port),
                "--database-url",  # the write API: POST /v1/mutations, as each user
                target.url(TARGET_DBNAME),
            ],
            health_url=f"http://127.0.0.1:{state.proxy_port}/v1/health",
        )
        realtime = BackgroundService(
            name="realtime server",
            directory=self.root / "realtime",
            argv=[
                *(python, "-m", "pgferry", "realtime", "serve", "--database-url", target.url(TARGET_DBNAME)),
                *("--port", str(state.api_port), "--data-dir", str(self.root / "realtime" / "state")),
            ],
            health_url=f"http://127.0.0.1:{state.api_port}/realtime/v1/health",
        )
        return sync, proxy, realtime

    @staticmethod
    def _start_pooler(pooler: PgBouncer, state: StackState) -> None:
        if pooler.pid() is None and not port_is_free(state.pooler_port):
            raise PortInUseError(
                f"port {state.pooler_port} on 127.0.0.1 (the pooler) is already in use; stop what holds it, or "
                "`pgferry dev down --destroy` and `pgferry dev up --pooler-port N`"
            )
        pooler.start()

    def _pooler(self, state: StackState) -> PgBouncer:
        return PgBouncer(
            self.root / "pooler", upstream_port=state.target_port, port=state.pooler_port, user=service_user()
        )

    def down(self, *, destroy: bool = False) -> None:
        state = StackState.load(self.state_file)
        if state is None:
            return
        self._pooler(state).stop()
        _source, target = self._clusters(state)
        for service in reversed(self._services(state, target)):
            service.stop()
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
        statuses = [
            _server_status("source", source, SOURCE_DBNAME),
            _server_status("target", target, TARGET_DBNAME),
        ]
        pooler = self._pooler(state)
        pooler_running = pooler.pid() is not None
        statuses.append(
            ServerStatus(
                name="pooler",
                url=pooler.url(TARGET_DBNAME),
                port=state.pooler_port,
                running=pooler_running,
                reachable=pooler_running and _accepts(pooler.url(TARGET_DBNAME)),
                version=None,
                datadir=str(pooler.directory),
            )
        )
        for name, service, port in zip(
            ("sync", "proxy", "realtime"),
            self._services(state, target),
            (state.sync_port, state.proxy_port, state.api_port),
            strict=True,
        ):
            running = service.pid() is not None
            statuses.append(
                ServerStatus(
                    name=name,
                    url=f"http://127.0.0.1:{port}",
                    port=port,
                    running=running,
                    reachable=running and service.healthy(),
                    version=None,
                    datadir=str(service.directory),
                )
            )
        return statuses

    def url(self, name: str) -> str:
        for server in self.status():
            if server.name == name:
                if not server.running:
                    raise StackError(f"the {name} server is not running; run `pgferry dev up`")
                return server.url
        raise StackError(f"no server named {name!r}; the stack has 'source' and 'target'")


def _accepts(url: str) -> bool:
    try:
        with connect(url, application_name="pgferry-dev-status", connect_timeout=2) as conn:
            conn.execute("select 1")
    except psycopg.Error:
        return False
    return True


def _server_status(name: str, cluster: PostgresCluster, dbname: str) -> ServerStatus:
    running = cluster.is_running()
    version = None
    reachable = False
    if running:
        try:
            with connect(
                cluster.url(dbname), application_name="pgferry-localstack", autocommit=False, connect_timeout=3
            ) as conn:
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
