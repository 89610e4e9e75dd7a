"""Run an ASGI app with uvicorn on a free loopback port in a background thread (tests and benchmarks).

A real server on a real socket, not an in-process transport: clients (httpx, node) see exactly what they would
see in production, including streaming, compression and long-polls.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

from pgferry.localstack.cluster import free_port

__all__ = ["ServedApp", "free_port"]


class ServedApp:
    """``with ServedApp(app) as served: httpx.get(served.url + "/v1/health")``; stops (running the app's lifespan
    shutdown) on exit."""

    def __init__(self, app: ASGIApp, port: int | None = None, *, startup_timeout: float = 60.0) -> None:
        # Without a port, the socket is bound here to port 0 and handed to uvicorn: a port found free and bound later
        # can be taken in between by another process (seen in the suite: "address already in use" at startup).
        self._sockets: list[socket.socket] | None = None
        if port is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            port = int(listener.getsockname()[1])
            self._sockets = [listener]
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", timeout_graceful_shutdown=3
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self._startup_timeout = startup_timeout

    def _run(self) -> None:
        try:
            self._server.run(sockets=self._sockets)
        finally:
            for listener in self._sockets or []:
                listener.close()

    def start(self) -> ServedApp:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on port {self.port} did not start in {self._startup_timeout} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> ServedApp:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
