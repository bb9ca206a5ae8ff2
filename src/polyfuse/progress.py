"""One progress-bar style for every long loop (a ground-floor module: any package may use it)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(disable: bool = False) -> Progress:
    """A rich progress display; add one task per loop with `bar.add_task(description, total=...)`."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=disable, transient=False,
    )


@contextmanager
def progress_task(description: str, total: int, disable: bool = False) -> Iterator[Callable[[int], None]]:
    """A bar with a single task; yields the `advance(n)` callable that engines take as `progress`."""
    with progress_bar(disable=disable) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
