"""Per-user limits in the shape proxy: how many shapes one user keeps, how many snapshots one user builds at once.

Every distinct shape is a full copy of the rows it selects, kept and evaluated on every change to its table, and
every new shape costs a snapshot. Without limits, one signed-in user varying a constant in a where clause creates
shapes without end (each a copy of their rows), and a few concurrent snapshot requests occupy every worker of
the sync service while other users wait. The proxy is where users are known, so the limits live here:

* ``max_shapes``: distinct shape definitions a user has used within ``shape_ttl`` seconds (a definition is
  "used" by any request for it, live polls included, so a shape a client follows never expires). A request for
  one more is answered 429 with ``Retry-After`` (when the least recently used one expires).
* ``max_concurrent_snapshots``: requests with ``offset=-1`` (those that create or read a snapshot) one user may
  have in flight; one more is answered 429 with ``Retry-After: 1``.

The official client retries 429 after ``Retry-After``. Limits are per proxy process (run one proxy per sync
service, or divide the limits by the number of processes).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from uuid import UUID

from pgferry.errors import ConfigError
from pgferry.sync.errors import TooManyRequestsError

__all__ = ["UserLimiter", "UserLimits"]

_MAX_TRACKED_USERS = 100_000


@dataclass(frozen=True, slots=True)
class UserLimits:
    max_shapes: int = 32
    max_concurrent_snapshots: int = 2
    shape_ttl: float = 600.0

    def __post_init__(self) -> None:
        if self.max_shapes < 1 or self.max_concurrent_snapshots < 1 or self.shape_ttl <= 0:
            raise ConfigError("--max-shapes-per-user", "limits must be at least 1 (and the TTL positive)")


class UserLimiter:
    """Thread-safe bookkeeping of :class:`UserLimits`; ``clock`` is injectable for tests of expiry."""

    def __init__(self, limits: UserLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._shapes: OrderedDict[UUID, OrderedDict[tuple[tuple[str, str], ...], float]] = OrderedDict()
        self._snapshots: dict[UUID, int] = {}

    def use_shape(self, user: UUID, shape: tuple[tuple[str, str], ...]) -> None:
        """Record that ``user`` uses ``shape`` (its defining parameters); 429 if it is one too many."""
        now = self._clock()
        with self._lock:
            used = self._shapes.get(user)
            if used is None:
                used = self._shapes[user] = OrderedDict()
                while len(self._shapes) > _MAX_TRACKED_USERS:
                    self._shapes.popitem(last=False)
            self._shapes.move_to_end(user)
            expiry = now - self.limits.shape_ttl
            while used and next(iter(used.values())) < expiry:
                used.popitem(last=False)
            if shape not in used and len(used) >= self.limits.max_shapes:
                oldest = next(iter(used.values()))
                wait = max(1, math.ceil(oldest + self.limits.shape_ttl - now))
                raise TooManyRequestsError(
                    "shape",
                    f"you already use {self.limits.max_shapes} shapes; reuse one or retry later",
                    retry_after=wait,
                )
            used[shape] = now
            used.move_to_end(shape)

    def forget_shape(self, user: UUID, shape: tuple[tuple[str, str], ...]) -> None:
        """Stop counting a shape the sync service refused (a 400: it holds no copy of anything)."""
        with self._lock:
            used = self._shapes.get(user)
            if used is not None:
                used.pop(shape, None)

    @contextlib.contextmanager
    def snapshot(self, user: UUID) -> Iterator[None]:
        """Hold one of ``user``'s concurrent snapshot slots for the ``with`` block; 429 if none is free."""
        with self._lock:
            running = self._snapshots.get(user, 0)
            if running >= self.limits.max_concurrent_snapshots:
                raise TooManyRequestsError(
                    "offset",
                    f"you already have {running} new shapes loading; retry when one has answered",
                    retry_after=1,
                )
            self._snapshots[user] = running + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._snapshots.get(user, 1) - 1
                if left > 0:
                    self._snapshots[user] = left
                else:
                    self._snapshots.pop(user, None)
