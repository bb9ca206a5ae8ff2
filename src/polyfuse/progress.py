"""One progress-bar style for every long loop, and the process-wide quiet switch (a ground-floor module:
any package may use it).

`polyfuse ... -q` calls `set_quiet(True)`: every bar is then disabled and `note` prints nothing, so the
output holds warnings, errors and the command's result only.
"""

from __future__ import annotations

import sys
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

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def note(message: str) -> None:
    """An informational line on stderr (e.g. the memory estimate before training), unless quiet."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


def progress_bar(disable: bool = False) -> Progress:
    """A rich progress display; add one task per loop with `bar.add_task(description, total=...)`."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=disable or _quiet, transient=False,
    )


@contextmanager
def progress_task(description: str, total: int, disable: bool = False) -> Iterator[Callable[[int], None]]:
    """A bar with a single task; yields the `advance(n)` callable that engines take as `progress`."""
    with progress_bar(disable=disable) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
