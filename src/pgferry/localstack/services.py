"""Long-running pgferry processes of the local stack (the dev sync server, the shape proxy).

They run detached from the terminal that started them (``pgferry dev up`` returns), with a pid file and a log file
under ``$PGFERRY_HOME/dev/<name>``; ``dev down`` stops them. Like the PostgreSQL servers, starting one that is
already running and healthy is a no-op, so ``dev up`` stays idempotent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgferry.errors import ToolError
from pgferry.localstack.cluster import live_pid

__all__ = ["BackgroundService", "ServiceError"]


class ServiceError(ToolError):
    """A local service did not start or stop as asked (the end of its log is in :attr:`output`)."""


@dataclass(frozen=True)
class BackgroundService:
    name: str
    directory: Path
    argv: Sequence[str]
    health_url: str

    @property
    def pid_file(self) -> Path:
        return self.directory / "pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "log"

    def pid(self) -> int | None:
        return live_pid(self.pid_file)

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=timeout) as response:  # noqa: S310 - loopback URL
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def start(self, *, env: Mapping[str, str] | None = None, timeout: float = 60.0) -> None:
        """Start detached (``env`` added to ours) and wait until healthy; a healthy running one is left alone."""
        if self.pid() is not None and self.healthy():
            return
        self.stop()
        self.directory.mkdir(parents=True, exist_ok=True)
        environment = {**os.environ, **(env or {})}
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{process.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServiceError(
                    f"the {self.name} exited with status {process.returncode}; see {self.log_file}",
                    _tail(self.log_file),
                )
            if self.healthy(timeout=1.0):
                return
            time.sleep(0.2)
        raise ServiceError(f"the {self.name} did not become healthy in {timeout:.0f} s; see {self.log_file}")

    def stop(self, *, timeout: float = 15.0) -> None:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            _reap(pid)
            time.sleep(0.1)
        if self.pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _reap(pid)
        self.pid_file.unlink(missing_ok=True)


def _reap(pid: int) -> None:
    """Collect our own child if it is one (a zombie still answers ``kill(pid, 0)``)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
