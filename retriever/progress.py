"""One progress bar for long CLI runs (``vlmrag ingest``, ``vlmrag eval``): rich on stderr, or nothing."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class ProgressBar:
    """A rich progress bar (count, rate, elapsed, ETA) on stderr when enabled; a no-op otherwise.

    Stdout stays free for the command's result (a report, JSON), so a bar never mixes into it.
    """

    def __init__(self, label: str, total: int | None, *, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._started = 0.0
        self._completed = 0

    def __enter__(self) -> Self:
        if self.enabled:
            # imported here: commands that never draw a bar (and tests) do not load rich
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, rate="")
            self._started = time.perf_counter()
        return self

    def update(self, completed: int, *, throughput: int | None = None) -> None:
        """Set how many are done; the rate counts ``throughput`` (default ``completed``) per second."""
        self._completed = completed
        if self._progress is None or self._task is None:
            return
        elapsed = max(time.perf_counter() - self._started, 1e-6)
        rate = (completed if throughput is None else throughput) / elapsed
        shown = completed if self.total is None else min(completed, self.total)
        self._progress.update(self._task, completed=shown, rate=f"{rate:.1f}/s")

    def advance(self, n: int = 1) -> None:
        """``n`` more done."""
        self.update(self._completed + n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


__all__ = ["ProgressBar"]
