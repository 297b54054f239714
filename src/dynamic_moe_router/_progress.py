"""Progress bars with an ETA for the long commands (calibration, the bench sweep, evaluation).

A bar is drawn with rich on **standard error**, so that standard output stays clean for results and
pipes; it is off when disabled (``--json``) or when rich is not installed. Library functions take an
optional :class:`Progress` and call :meth:`Progress.task`; ``None`` (the default) draws nothing.

Example:
    >>> from dynamic_moe_router._progress import Progress
    >>> with Progress(enabled=False) as progress:
    ...     task = progress.task("calibrating", total=3)
    ...     for _ in range(3):
    ...         task.advance()
    ...     task.completed
    3
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

__all__ = ["Progress", "Task", "task"]


class Task:
    """One bar: ``advance()`` after each step; ``total`` may be re-estimated with ``update``."""

    def __init__(self, owner: Progress, description: str, total: float | None) -> None:
        self._owner, self.total, self.completed = owner, total, 0
        self._id = owner._add(description, total)

    def advance(self, steps: int = 1) -> None:
        self.completed += steps
        if self._id is not None:
            self._owner._rich.update(self._id, advance=steps)  # type: ignore[union-attr]

    def update(self, *, total: float | None = None, description: str | None = None) -> None:
        if total is not None:
            self.total = total
        if self._id is not None:
            kwargs: dict[str, Any] = {}
            if total is not None:
                kwargs["total"] = total
            if description is not None:
                kwargs["description"] = description
            self._owner._rich.update(self._id, **kwargs)  # type: ignore[union-attr]

    def finish(self) -> None:
        """Mark the bar complete (a step count estimated too high ends at 100%)."""
        self.update(total=self.completed)


class Progress:
    """A group of bars on standard error (rich), or nothing when disabled."""

    def __init__(self, enabled: bool = True) -> None:
        self._rich: Any = None
        if enabled:
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )
                from rich.progress import Progress as RichProgress
            except ImportError:
                return
            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                redirect_stdout=False,
                redirect_stderr=False,
            )

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._rich is not None:
            self._rich.stop()

    def _add(self, description: str, total: float | None) -> Any:
        return None if self._rich is None else self._rich.add_task(description, total=total)

    def task(self, description: str, total: float | None = None) -> Task:
        """A new bar of ``total`` steps (``None``: unknown)."""
        return Task(self, description, total)

    def log(self, message: str) -> None:
        """Print a line to standard output (above the bars when they are drawn)."""
        if self._rich is not None and self._rich.live.is_started and self._rich.console.is_terminal:
            self._rich.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)


def task(progress: Progress | None, description: str, total: float | None = None) -> Task:
    """``progress.task(...)``, or a bar that draws nothing when ``progress`` is ``None``."""
    return (progress or Progress(enabled=False)).task(description, total)
