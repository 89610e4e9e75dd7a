"""Live progress for ``pgferry migrate run``: a bar per table and one overall, with rows/s and ETA."""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichReporter:
    """Implements the engine's ``ProgressReporter`` with rich bars (thread-safe: workers call it)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}", justify="left"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            TextColumn("{task.fields[rate]:>10} rows/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._lock = threading.Lock()
        self._tasks: dict[str, TaskID] = {}
        self._table_started: dict[str, float] = {}
        self._overall: TaskID | None = None
        self._started = time.monotonic()
        self._rows_done = 0
        self._phase_started = time.monotonic()
        self._current_phase = ""

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def phase(self, name: str) -> None:
        now = time.monotonic()
        if self._current_phase:
            self.console.log(f"phase [bold]{self._current_phase}[/] done in {now - self._phase_started:.1f}s")
        self._current_phase, self._phase_started = name, now
        if name != "complete":
            self.console.log(f"phase [bold cyan]{name}[/]")

    def table_started(self, table: str, rows_estimate: int, rows_done: int) -> None:
        with self._lock:
            if self._overall is None:
                self._overall = self.progress.add_task("all tables", total=0, rate="-")
                self._started = time.monotonic()
            total = max(rows_estimate, rows_done)
            self._tasks[table] = self.progress.add_task(table, total=total, completed=rows_done, rate="-")
            self._table_started[table] = time.monotonic()
            overall = self.progress.tasks[self._overall]
            self.progress.update(
                self._overall, total=(overall.total or 0) + total, completed=overall.completed + rows_done
            )

    def chunk_done(self, table: str, rows: int, nbytes: int) -> None:
        with self._lock:
            task_id = self._tasks.get(table)
            if task_id is not None:
                task = self.progress.tasks[task_id]
                completed = task.completed + rows
                total = max(task.total or 0, completed)
                elapsed = max(1e-6, time.monotonic() - self._table_started.get(table, self._started))
                self.progress.update(task_id, completed=completed, total=total, rate=f"{completed / elapsed:,.0f}")
            if self._overall is not None:
                self._rows_done += rows
                overall = self.progress.tasks[self._overall]
                completed = overall.completed + rows
                elapsed = max(1e-6, time.monotonic() - self._started)
                self.progress.update(
                    self._overall,
                    completed=completed,
                    total=max(overall.total or 0, completed),
                    rate=f"{self._rows_done / elapsed:,.0f}",
                )

    def bytes_copied(self, table: str, nbytes: int) -> None:
        pass  # rows are only known per committed chunk; bars advance when a chunk commits

    def message(self, text: str) -> None:
        self.console.log(text)
