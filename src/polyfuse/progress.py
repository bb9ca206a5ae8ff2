"""One progress style for every long loop, and the process-wide quiet switch (a ground-floor module:
any package may use it).

On a terminal, progress is rich's live bars. When stdout is not a terminal (a file or a pipe: `nohup`,
SLURM, CI, `| tee`) a live bar would be written only when its loop ends, so each task prints plain lines
instead, in the style of transformers' Trainer logs:

    12:03:41 sample src-a: 120/512 (23%), 3.21/s, elapsed 0:00:37, ETA 0:02:02

one when the task starts, then every `POLYFUSE_PROGRESS_INTERVAL` seconds (default 30) and every
`POLYFUSE_PROGRESS_STEP` percent done (default 5, 0 for none; at most one line a second for these),
and one when it ends.

`polyfuse ... -q` calls `set_quiet(True)`: every bar and line is then disabled and `note` prints nothing,
so the output holds warnings, errors and the command's result only.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from rich import get_console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from polyfuse.errors import ConfigError

INTERVAL_ENV, STEP_ENV = "POLYFUSE_PROGRESS_INTERVAL", "POLYFUSE_PROGRESS_STEP"
_STEP_MIN_GAP_S = 1.0  # percent steps of a fast loop print at most this often

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


@dataclass(frozen=True)
class LineSchedule:
    """When a task prints its next plain line: `interval_s` after the last one, or once it has crossed
    another `step_percent` of its total (no sooner than a second after the last line)."""

    interval_s: float = 30.0
    step_percent: float = 5.0

    @classmethod
    def from_env(cls) -> LineSchedule:
        """From POLYFUSE_PROGRESS_INTERVAL (seconds, >= 0) and POLYFUSE_PROGRESS_STEP (percent, 0-100)."""
        return cls(_env_number(INTERVAL_ENV, cls.interval_s, "a number of seconds >= 0", 0, math.inf),
                   _env_number(STEP_ENV, cls.step_percent, "a percentage from 0 (no steps) to 100", 0, 100))

    def due(self, now: float, done: float, total: float | None, last_time: float, last_done: float) -> bool:
        since = now - last_time
        if since >= self.interval_s:
            return True
        if not self.step_percent or not total or since < min(_STEP_MIN_GAP_S, self.interval_s):
            return False
        step = total * self.step_percent / 100
        return math.floor(done / step) > math.floor(last_done / step)


def _env_number(name: str, default: float, expected: str, low: float, high: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise ConfigError(f"environment variable {name}={text!r}: expected {expected}")
    return value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def progress_line(description: str, done: float, total: float | None, elapsed: float, rate: float | None) -> str:
    """One plain progress line (no wall-clock stamp): done/total, percent, rate, elapsed and ETA."""
    count = f"{_number(done)}/{_number(total)} ({100 * done / total:.0f}%)" if total else _number(done)
    parts = [f"{description}: {count}"]
    if rate:
        parts.append(f"{1 / rate:.3g} s each" if rate < 1 else f"{rate:.3g}/s" if rate < 1000 else f"{rate:.0f}/s")
    parts.append(f"elapsed {_clock(elapsed)}")
    if total and done < total and rate:
        parts.append(f"ETA {_clock((total - done) / rate)}")
    return ", ".join(parts)


class _Progress(Progress):
    """rich's Progress; where the console is not interactive, its live display is off and every task
    prints plain lines on the same stream instead (see the module's docstring)."""

    def __init__(self, *columns, schedule: LineSchedule | None, **kwargs):
        super().__init__(*columns, **kwargs)
        self._schedule = schedule
        self._last: dict[TaskID, tuple[float, float]] = {}  # task -> (time, done) of its last line
        self._started: dict[TaskID, float] = {}  # task -> done when it was added (resumed work is not rate)

    def add_task(self, description: str, *args, **kwargs) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        if self._schedule is not None:
            with self._lock:
                self._started[task_id] = self._tasks[task_id].completed
                line = self._line(task_id)
            self._print(line)
        return task_id

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._maybe_print(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_print(task_id)

    def stop(self) -> None:
        if self._schedule is not None:
            with self._lock:  # a task that ended early (an error) or between two lines: where it stopped
                lines = [self._line(t) for t, (_, done) in list(self._last.items())
                         if t in self._tasks and self._tasks[t].completed != done]
            for line in lines:
                self._print(line)
        super().stop()

    def _maybe_print(self, task_id: TaskID) -> None:
        if self._schedule is None:
            return
        with self._lock:
            task: Task = self._tasks[task_id]
            last_time, last_done = self._last[task_id]
            finished = task.total is not None and task.completed >= task.total > last_done
            due = finished or self._schedule.due(self.get_time(), task.completed, task.total, last_time, last_done)
            line = self._line(task_id) if due else None
        if line:
            self._print(line)

    def _line(self, task_id: TaskID) -> str:
        """The task's line now, recorded as its last (under the lock)."""
        task = self._tasks[task_id]
        self._last[task_id] = (self.get_time(), task.completed)
        elapsed = task.elapsed or 0.0
        rate = task.finished_speed or task.speed
        if not rate and elapsed > 0:
            rate = (task.completed - self._started[task_id]) / elapsed or None
        return f"{time.strftime('%H:%M:%S')} {progress_line(task.description, task.completed, task.total, elapsed, rate)}"

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def progress_bar(disable: bool = False) -> Progress:
    """A progress display; add one task per loop with `bar.add_task(description, total=...)`. Live bars
    on a terminal, plain periodic lines otherwise; nothing when disabled or quiet."""
    console = get_console()
    shown = not (disable or _quiet)
    live = shown and (console.is_interactive or console.is_jupyter)
    return _Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, disable=not live, transient=False,
        schedule=LineSchedule.from_env() if shown and not live else None,
    )


@contextmanager
def progress_task(description: str, total: int, disable: bool = False) -> Iterator[Callable[[int], None]]:
    """A bar with a single task; yields the `advance(n)` callable that engines take as `progress`."""
    with progress_bar(disable=disable) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
