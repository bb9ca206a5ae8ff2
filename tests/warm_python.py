"""`python ARGS` (a script or `-m module`) without the seconds a new interpreter spends importing torch, transformers
and polyfuse (test-only): the script or module runs as `__main__` in a child of a fork server that imported them
once per test process.

A new interpreter importing what a tiny-recipe run needs costs 3-6 CPU seconds; the kill tests relaunch `polyfuse`
about thirty times (`kill_at_rename`), `test_benches` runs some thirty bench scripts, and other slow tests start
`polyfuse` or a script a few times each. The child sees what a new interpreter would: the script's folder (for
`-m`, the working directory) first on `sys.path` and then a plain interpreter's path (not pytest's), its own
working directory, environment, `sys.argv`, temporary folder and process group, and its output in files of its own.
"""

from __future__ import annotations

import functools
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


@functools.cache
def _plain_path(pythonpath: str | None) -> list[str]:
    """`sys.path` of a new interpreter with this PYTHONPATH, without its first entry (the script's folder)."""
    code = "import json, sys; print(json.dumps(sys.path[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | ({} if pythonpath is None else {"PYTHONPATH": pythonpath})
    return json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)


def _child(argv: list[str], cwd: str, env: dict[str, str], path: list[str], out: str, err: str) -> None:
    os.setsid()  # a group of its own, as `start_new_session`: a kill of the group reaches what it started
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # read TMPDIR again
    for fd, name in ((1, out), (2, err)):  # the files, for the script and every process it starts
        handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    if argv[0] == "-m":
        sys.path[:] = [cwd, *path]
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.path[:] = [str(Path(argv[0]).resolve().parent), *path]
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


class Started:
    """A `python ARGS` started by `start`: its process id (the leader of its process group), exit code, output."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]):
        self.argv, self._folder = argv, tempfile.TemporaryDirectory(prefix="warm-python-")
        self._out, self._err = Path(self._folder.name) / "stdout", Path(self._folder.name) / "stderr"
        self._process = fork_server().Process(target=_child, args=(argv, str(cwd), env, _plain_path(env.get("PYTHONPATH")),
                                                                   str(self._out), str(self._err)))
        self._process.start()
        self.pid = self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        """The exit code; `subprocess.TimeoutExpired` after `timeout` seconds, the process group killed."""
        self._process.join(timeout)
        if self._process.exitcode is None:
            self.kill()
            raise subprocess.TimeoutExpired(self.argv, timeout, self.stdout(), self.stderr())
        return self._process.exitcode

    def kill(self) -> None:
        """SIGKILL to its process group."""
        os.killpg(self.pid, signal.SIGKILL)
        self._process.join()

    def stdout(self) -> str:
        return self._out.read_text(errors="replace") if self._out.exists() else ""

    def stderr(self) -> str:
        return self._err.read_text(errors="replace") if self._err.exists() else ""


def start(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Started:
    """`python ARGV` started, as `subprocess.Popen([sys.executable, *argv], start_new_session=True)`."""
    return Started(list(map(str, argv)), cwd or Path.cwd(), dict(os.environ if env is None else env))


def run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python ARGV` run to its end, as `subprocess.run([sys.executable, *argv], capture_output=True, text=True)`
    returns it."""
    started = start(argv, cwd, env)
    code = started.wait(timeout)
    return subprocess.CompletedProcess([sys.executable, *started.argv], code, started.stdout(), started.stderr())
