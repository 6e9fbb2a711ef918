"""Progress bars with time left against the budget (rich), or plain periodic lines in quiet mode."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from daytune.units import format_duration


class Reporter:
    """What stages print through. quiet=True prints only a line every `every` seconds and final messages."""

    def __init__(self, quiet: bool = False, every: float = 15.0):
        self.quiet = quiet
        self.every = every
        self.console = Console(stderr=False, highlight=False)

    def print(self, *args, **kwargs) -> None:
        kwargs.setdefault("soft_wrap", True)  # paths and commands stay on one line, copy-pasteable
        self.console.print(*args, **kwargs)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False, soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: int):
        if self.quiet or not sys.stdout.isatty():
            yield _LineTask(self, description, total)
            return
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task_id = progress.add_task(description, total=total, info="")
            yield _RichTask(progress, task_id)


class _RichTask:
    def __init__(self, progress: Progress, task_id):
        self.progress, self.task_id = progress, task_id

    def update(self, completed: int, info: str = "", total: int | None = None) -> None:
        self.progress.update(self.task_id, completed=completed, info=info, total=total)


class _LineTask:
    def __init__(self, reporter: Reporter, description: str, total: int):
        self.reporter, self.description, self.total = reporter, description, total
        self.last = 0.0

    def update(self, completed: int, info: str = "", total: int | None = None) -> None:
        if total is not None:
            self.total = total
        now = time.monotonic()
        if now - self.last >= self.reporter.every or completed >= self.total:
            self.last = now
            print(f"{self.description}: {completed}/{self.total} {info}", flush=True)


def budget_info(elapsed: float, budget: float | None) -> str:
    if budget is None:
        return f"elapsed {format_duration(elapsed)}"
    return f"{format_duration(max(0.0, budget - elapsed))} of {format_duration(budget)} left"
