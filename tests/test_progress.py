"""Progress where stdout is not a terminal (nohup, SLURM, CI, a pipe): plain lines at a steady interval
instead of a bar written only when its loop ends; `-q` silences them; the schedule is configurable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polyfuse.data import write_rows
from polyfuse.errors import ConfigError
from polyfuse.progress import INTERVAL_ENV, STEP_ENV, LineSchedule, progress_bar, progress_line

LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<what>[^:]+): (?P<done>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\)")


def test_schedule_by_time_and_by_percent_step():
    schedule = LineSchedule(interval_s=30, step_percent=5)
    # 30 s after the last line, whatever the progress
    assert schedule.due(now=130.0, done=101, total=1000, last_time=100.0, last_done=100)
    assert not schedule.due(now=129.9, done=101, total=1000, last_time=100.0, last_done=100)
    # crossing a 5% mark (50 of 1000) counts once a second has passed since the last line
    assert schedule.due(now=101.0, done=150, total=1000, last_time=100.0, last_done=149)
    assert not schedule.due(now=100.5, done=150, total=1000, last_time=100.0, last_done=149)
    assert not schedule.due(now=105.0, done=149, total=1000, last_time=100.0, last_done=101)
    # no total, or steps off: time only
    assert not schedule.due(now=110.0, done=500, total=None, last_time=100.0, last_done=0)
    assert not LineSchedule(30, 0).due(now=110.0, done=500, total=1000, last_time=100.0, last_done=0)
    # interval 0: a line at every update
    assert LineSchedule(0, 5).due(now=100.0, done=1, total=1000, last_time=100.0, last_done=0)


def test_line_says_count_percent_rate_elapsed_and_eta():
    assert progress_line("sample src-a", 120, 512, 37.4, 3.2) == (
        "sample src-a: 120/512 (23%), 3.2/s, elapsed 0:00:37, ETA 0:02:02"  # 392 / 3.2 = 122.5 s
    )
    assert progress_line("train sft (loss 2.31)", 3, 40, 90, 0.04) == (
        "train sft (loss 2.31): 3/40 (8%), 25 s each, elapsed 0:01:30, ETA 0:15:25"  # 37 x 25 s
    )
    assert progress_line("score", 10, 10, 4, 2.5) == "score: 10/10 (100%), 2.5/s, elapsed 0:00:04"
    assert progress_line("score", 0, 10, 0, None) == "score: 0/10 (0%), elapsed 0:00:00"
    assert progress_line("build", 7, None, 3661, None) == "build: 7, elapsed 1:01:01"
    assert progress_line("tokens", 1234567, 2469134.0, 10, 123456.7) == (
        "tokens: 1234567/2469134 (50%), 123457/s, elapsed 0:00:10, ETA 0:00:10"
    )


@pytest.mark.parametrize(("name", "value"), [(INTERVAL_ENV, "soon"), (INTERVAL_ENV, "-1"), (STEP_ENV, "150")])
def test_a_bad_setting_is_one_line_before_any_work(polyfuse_cli, monkeypatch, tmp_path, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"environment variable {name}="):
        LineSchedule.from_env()
    proc = polyfuse_cli("sample", "--config", tmp_path / "missing.yaml", "--prompts", tmp_path / "p.jsonl",
                        "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: environment variable {name}={value!r}: expected " + (
        "a number of seconds >= 0" if name == INTERVAL_ENV else "a percentage from 0 (no steps) to 100")]


def test_the_bar_is_off_when_quiet_or_disabled_and_lines_when_not_a_terminal(capsys):
    with progress_bar(disable=True) as bar:
        bar.advance(bar.add_task("hidden", total=3), 3)
    assert capsys.readouterr().out == ""
    with progress_bar() as bar:  # pytest's captured stdout is not a terminal
        task = bar.add_task("shown", total=3)
        bar.advance(task, 1)
        bar.update(task, completed=3)
    lines = [LINE.match(line) for line in capsys.readouterr().out.splitlines()]
    assert [(m["what"], m["done"]) for m in lines] == [("shown", "0"), ("shown", "3")]  # start, end


def sample_command(world, tmp_path: Path) -> list[str]:
    prompts = world.prompts("train", per_domain=4)
    write_rows(tmp_path / "prompts.jsonl", prompts)
    models = [{"name": name, "path": str(path), "sampling": {"n": 1, "max_new_tokens": 4}}
              for name, path in list(world.source_paths.items())[:2]]
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump({"models": models, "batch_size": 1}))
    return ["sample", "--config", str(tmp_path / "sample.yaml"), "--prompts", str(tmp_path / "prompts.jsonl")]


def progress_lines(log: str) -> dict[str, list[int]]:
    """Each task's done counts, in the order its lines were printed."""
    found: dict[str, list[int]] = {}
    for line in log.splitlines():
        if match := LINE.match(line):
            found.setdefault(match["what"], []).append(int(match["done"]))
    return found


def check_periodic(found: dict[str, list[int]], models: list[str], total: int) -> None:
    assert sorted(found) == sorted(f"sample {m}" for m in models)
    for counts in found.values():
        assert counts[0] == 0 and counts[-1] == total
        assert counts == sorted(counts) and len(set(counts)) >= 4  # a start, the end and lines between


def test_polyfuse_sample_prints_periodic_lines_and_q_silences_them(tiny_world, polyfuse_cli, monkeypatch, tmp_path):
    monkeypatch.setenv(INTERVAL_ENV, "0")  # every update: the lines' content, not the clock, is tested here
    command = sample_command(tiny_world, tmp_path)
    proc = polyfuse_cli(*command, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    total = len(tiny_world.prompts("train", per_domain=4))
    check_periodic(progress_lines(proc.stdout), list(tiny_world.source_paths)[:2], total)
    quiet = polyfuse_cli(*command, "--out", tmp_path / "quiet", "-q")
    assert quiet.returncode == 0 and progress_lines(quiet.stdout + quiet.stderr) == {}


@pytest.mark.slow
def test_a_logged_run_to_a_file_shows_progress_while_it_runs(tiny_world, tmp_path):
    """As under nohup: stdout and stderr into a file, a new process, the schedule from the environment."""
    command = [sys.executable, "-m", "polyfuse", *sample_command(tiny_world, tmp_path), "--out", str(tmp_path / "out")]
    env = {**os.environ, INTERVAL_ENV: "0.01", STEP_ENV: "0", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300)
    text = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    check_periodic(progress_lines(text), list(tiny_world.source_paths)[:2], len(tiny_world.prompts("train", per_domain=4)))
