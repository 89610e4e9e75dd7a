"""PgBouncer in transaction mode in front of a local server: the local stand-in for Supavisor's port 6543.

Supavisor's transaction mode gives each *transaction* a server connection, so session state (``SET``, advisory
locks, ``LISTEN``, server-side prepared statements) does not follow a client from one transaction to the next.
Debian's ``pgbouncer`` (1.18 on bookworm: no prepared-statement tracking at all) behaves the same way, so code that
is correct against it is correct against port 6543. Loopback only, ``auth_type = trust`` like the local servers.

Owns the pooler's files and process under one directory; it must not touch the PostgreSQL clusters it fronts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pgferry.errors import ToolError
from pgferry.localstack.cluster import ServiceUser, free_port, live_pid

__all__ = ["PgBouncer", "PgBouncerError", "pgbouncer_program"]

PGBOUNCER_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


class PgBouncerError(ToolError):
    """PgBouncer is missing, or did not start or stop as asked."""


def pgbouncer_program() -> Path:
    """The ``pgbouncer`` binary; :class:`PgBouncerError` saying how to install it when there is none."""
    found = shutil.which("pgbouncer")
    for candidate in (found, *PGBOUNCER_CANDIDATES):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise PgBouncerError("pgbouncer is not installed; install Debian's package: apt-get install -y pgbouncer")


@dataclass
class PgBouncer:
    """One PgBouncer process serving every database of ``upstream_port`` on ``port`` (0: a free port at start)."""

    directory: Path
    upstream_port: int
    port: int = 0
    pool_mode: str = "transaction"
    pool_size: int = 10
    user: ServiceUser | None = None

    @property
    def ini_file(self) -> Path:
        return self.directory / "pgbouncer.ini"

    @property
    def pid_file(self) -> Path:
        return self.directory / "pgbouncer.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "pgbouncer.log"

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def pid(self) -> int | None:
        return live_pid(self.pid_file)

    def _write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "userlist.txt").write_text('"postgres" ""\n"authenticator" ""\n')
        self.ini_file.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.upstream_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.directory / 'userlist.txt'}\n"
            f"pool_mode = {self.pool_mode}\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 500\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            "server_login_retry = 1\n"
            f"logfile = {self.log_file}\n"
            f"pidfile = {self.pid_file}\n"
        )
        if self.user is not None:
            for path in (self.directory, *self.directory.iterdir()):
                os.chown(path, self.user.uid, self.user.gid)

    def start(self, *, timeout: float = 20.0) -> None:
        """Start detached (``pgbouncer -d``) and wait until it accepts connections; a running one is left alone."""
        if self.pid() is not None:
            return
        program = pgbouncer_program()
        if self.port == 0:
            self.port = free_port()
        self._write_config()
        argv = [str(program), "-d", "-q", str(self.ini_file)]
        if self.user is not None:
            argv[1:1] = ["-u", self.user.name]
        elif os.geteuid() == 0:
            raise PgBouncerError("pgbouncer refuses to run as root; pass the service user the servers run as")
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout, cwd="/")
        if result.returncode != 0:
            raise PgBouncerError(
                f"pgbouncer did not start (exit {result.returncode}); its log: {self.log_file}",
                result.stderr + self._log_tail(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        self.stop()
        raise PgBouncerError(
            f"pgbouncer did not listen on 127.0.0.1:{self.port} within {timeout:g}s; its log: {self.log_file}",
            self._log_tail(),
        )

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop at once (SIGTERM drops client connections, as a pooler restart would); idempotent."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.05)
        if self.pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""
