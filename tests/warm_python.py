"""`python SCRIPT ARGS` without the seconds a new interpreter spends importing torch, transformers and polyfuse
(test-only): the script runs as `__main__` in a child of a fork server that imported them once per test process.

A new interpreter importing what a tiny-recipe run needs costs 3-6 CPU seconds; the kill tests relaunch `polyfuse`
about thirty times (`kill_at_rename`), and `test_benches` runs some thirty bench scripts. The child sees what a new
interpreter would: the script's folder first on `sys.path` and then a plain interpreter's path (not pytest's), its
own working directory, environment, `sys.argv` and temporary folder, and its output in files of its own.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# What the tiny recipe and the bench scripts import beyond `import transformers` (lazy: the model classes, the
# trainer) and polyfuse's CLI (lazy: stages, toy world, trainers, plots, statistics): a kill-and-rerun of the tiny
# recipe took 11-12 s with the first six preloaded and 6-7 s with all (load 3, 2 cores).
PRELOAD = ["torch", "transformers", "datasets", "polyfuse.cli.main", "polyfuse.pipeline.runner", "polyfuse.trainers",
           "transformers.modeling_utils", "transformers.trainer", "peft", "accelerate", "matplotlib.pyplot",
           "scipy.stats", "polyfuse.toyworld", "polyfuse.pipeline.stages", "polyfuse.trainers.preference",
           "polyfuse.trainers.sft", "polyfuse.evaluation", *(f"transformers.models.{arch}.modeling_{arch}"
                                                             for arch in ("gpt2", "llama", "mistral", "qwen3"))]

_context = None


def fork_server() -> multiprocessing.context.ForkServerContext:
    """This process's fork server, started on first use with `PRELOAD` imported."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _plain_path(env: dict[str, str]) -> list[str]:
    """`sys.path` of a new interpreter with this environment, without its first entry (the script's folder)."""
    code = "import json, sys; print(json.dumps(sys.path[1:]))"
    return json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)


def _child(script: str, args: list[str], cwd: str, env: dict[str, str], path: list[str], out: str, err: str) -> None:
    os.setsid()  # a group of its own, as `start_new_session`: a kill of the group reaches what it started
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # read TMPDIR again
    for fd, name in ((1, out), (2, err)):  # the files, for the script and every process it starts
        handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.path[:] = [str(Path(script).parent), *path]
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def run_script(script: Path, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in `cwd` with `env`, as `subprocess.run(..., capture_output=True, text=True)` returns it;
    `subprocess.TimeoutExpired` after `timeout` seconds (the script's process group killed)."""
    with tempfile.TemporaryDirectory(prefix="warm-python-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        process = fork_server().Process(target=_child, args=(str(script), args, str(cwd), env, _plain_path(env),
                                                             str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.join()
            raise subprocess.TimeoutExpired([str(script), *args], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess([str(script), *args], process.exitcode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))
