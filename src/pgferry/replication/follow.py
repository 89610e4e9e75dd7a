"""Follow a slot for the life of a server: a thread that restarts the stream, with backoff, whenever it fails.

The sync server and the Realtime server each follow one slot for as long as they run. A stream fails for reasons
that pass — PostgreSQL restarting, a network blip, a consumer error on one batch — and the answer is always the
same: close everything the attempt opened, say so in the status (health endpoints show it), wait a little longer
each time, and start a new reader, which resumes from the slot's confirmed position so nothing is lost or applied
twice. Written once here so both servers (and anything that follows a slot next) get it the same way.

Owns the thread, the restart loop and the status; what a session does with the stream is the caller's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final, Literal

from pgferry.db.retry import RetryPolicy
from pgferry.replication.reader import ReplicationReader

__all__ = ["RESTART_POLICY", "FollowedFeed", "FollowerStatus", "SlotFollower"]

FollowerStatus = Literal["starting", "active", "reconnecting", "stopped"]

RESTART_POLICY: Final = RetryPolicy(max_attempts=1_000_000, base_delay=0.2, max_delay=5.0)
"""Between stream attempts: from 0.2 s, doubling with jitter, at most 5 s — never giving up."""


class SlotFollower:
    """Runs ``session(reader)`` on its own thread with a fresh :class:`ReplicationReader` per attempt.

    ``session`` starts the reader on its slot, calls :meth:`mark_active` once streaming, and loops until
    :attr:`stopping`. If it raises, the failure is logged to ``log`` as ``log_event`` (text from ``describe``,
    which must not carry row values: health bodies and logs are not for them), :attr:`status` turns
    ``reconnecting`` and a new attempt starts after the policy's delay. ``ready``, if given, is waited for
    before the first attempt. ``on_stream`` is each reader's (see :class:`ReplicationReader`).
    """

    def __init__(
        self,
        replication_dsn: str,
        session: Callable[[ReplicationReader], None],
        *,
        thread_name: str,
        log: Any,
        log_event: str,
        describe: Callable[[BaseException], str],
        ready: threading.Event | None = None,
        policy: RetryPolicy = RESTART_POLICY,
        status_interval: float = 5.0,
        on_stream: Callable[[bool], None] | None = None,
    ) -> None:
        self._dsn = replication_dsn
        self._on_stream = on_stream
        self._session = session
        self._thread_name = thread_name
        self._log_event = log_event
        self._describe = describe
        self._ready = ready
        self._policy = policy
        self._status_interval = status_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader: ReplicationReader | None = None
        self.status: FollowerStatus = "starting"
        self.last_error: str | None = None
        self._log = log  # the caller's structlog logger: the restart is logged under its name

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def mark_active(self) -> None:
        self.status = "active"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the batch in hand (the session's own rule decides whether it is stored and confirmed)."""
        self._stop.set()
        reader = self._reader
        if reader is not None:
            reader.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        self.status = "stopped"

    def _run(self) -> None:
        if self._ready is not None:
            while not self._ready.wait(0.2):
                if self._stop.is_set():
                    return
        failures = 0
        while not self._stop.is_set():
            reader = ReplicationReader(self._dsn, status_interval=self._status_interval, on_stream=self._on_stream)
            self._reader = reader
            try:
                self._session(reader)
                failures = 0
            except Exception as exc:  # log, back off, resume from the last confirmed transaction
                failures += 1
                self.status = "reconnecting"
                self.last_error = self._describe(exc)
                self._log.warning(self._log_event, error=self.last_error, attempt=failures)
                self._stop.wait(self._policy.delay(failures))
            finally:
                self._reader = None
                reader.close()
        self.status = "stopped"


class FollowedFeed:
    """What a server's feed shows of its :class:`SlotFollower` (status and last error for health endpoints) and
    how it is started and stopped; the feed sets ``_follower`` in its constructor."""

    _follower: SlotFollower

    @property
    def status(self) -> FollowerStatus:
        return self._follower.status

    @property
    def last_error(self) -> str | None:
        return self._follower.last_error

    def start(self) -> None:
        self._follower.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the batch in hand: it is stored and confirmed, or neither (the session's rule)."""
        self._follower.stop(timeout)
