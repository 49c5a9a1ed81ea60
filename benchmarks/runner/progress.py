"""The grid's progress: runs done of the total (cached ones included) and the time left.

On a terminal with runs in worker processes or Ray tasks (``live``) it is a rich progress bar with a line
per finished run above it; otherwise (``--progress false``, a log file, or runs in this process, which show
Lightning's own bar) it is one line per finished run. The time left is the mean duration of the runs
finished here times the runs left, over the runs that go at once.
"""

from __future__ import annotations

import math
from typing import Any

from rich.markup import escape

__all__ = ["GridProgress", "format_seconds"]


def format_seconds(s: float) -> str:
    """``"?"``, ``"42 s"``, ``"12 min"`` or ``"3.5 h"``."""
    if not math.isfinite(s):
        return "?"
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


class GridProgress:
    """Counts finished runs (here, elsewhere or failed) of ``total`` and shows them on ``console``."""

    def __init__(self, console: Any, title: str, total: int, done: int, slots: int, live: bool) -> None:
        self.console, self.title, self.total, self.done, self.slots = console, title, total, done, slots
        self.durations: list[float] = []
        self._bar: Any = None
        self._task: Any = None
        self.live = live

    def __enter__(self) -> GridProgress:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[left]}"), console=self.console)
            self._bar.start()
            self._task = self._bar.add_task(self.title, total=self.total, completed=self.done, left=self._left())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()

    def time_left(self) -> float:
        """Seconds left: mean duration of the runs finished here x runs left / runs at once."""
        left = self.total - self.done
        if left == 0:
            return 0.0
        if not self.durations:
            return math.nan
        return sum(self.durations) / len(self.durations) * left / max(1, min(self.slots, left))

    def _left(self) -> str:
        return f"about {format_seconds(self.time_left())} left" if self.done < self.total else ""

    def _count(self, what: str, detail: str = "") -> None:
        """One line, never wrapped (a log keeps one line per run): what happened, the time left, details."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, left=self._left())
        left = f" ({self._left()})" if self.done < self.total else ""
        line = f"[{self.done}/{self.total}] {self.title}: {what}{left}" + (f": {detail}" if detail else "")
        self.console.print(escape(line), highlight=False, soft_wrap=True)

    def starting(self, label: str) -> None:
        """A run starts in this process: a rule above its Lightning output."""
        self.console.rule(escape(f"[{self.done + 1}/{self.total}] {self.title}: {label}"))

    def finished(self, label: str, seconds: float, summary: str) -> None:
        self.durations.append(seconds)
        self._count(f"{label} done in {seconds:.1f}s", summary)

    def finished_elsewhere(self, label: str) -> None:
        self._count(f"{label} finished by another runner")

    def failed(self, label: str, error: str) -> None:
        self._count(f"{label} FAILED", error)
