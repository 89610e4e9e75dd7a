"""Waiting for a connection's socket without holding the GIL, for code that drives libpq itself.

Why poll and not ``select.select``: select cannot watch a descriptor numbered 1024 or more, and a process that
serves thousands of clients (the dev sync server holding 10,000 long-polls) opens its PostgreSQL connections
past that number — a new shape's snapshot, or the replication feed reconnecting, would fail with
``ValueError: filedescriptor out of range in select()``. Shared by the replication reader and the sync server's
COPY reader.
"""

from __future__ import annotations

import select
from collections.abc import Iterable

__all__ = ["wait_readable", "wait_writable"]


def wait_readable(fds: Iterable[int], timeout: float) -> set[int]:
    """The descriptors among ``fds`` that are readable (or closed, or in error) within ``timeout`` seconds."""
    return _ready(fds, select.POLLIN, timeout)


def wait_writable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` can take more data (or is closed, or in error) within ``timeout`` seconds."""
    return bool(_ready([fd], select.POLLOUT, timeout))


def _ready(fds: Iterable[int], events: int, timeout: float) -> set[int]:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, events)
    return {fd for fd, _events in poller.poll(max(0, int(timeout * 1000)))}
