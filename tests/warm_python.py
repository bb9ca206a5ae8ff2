"""`python ARGS` (a script or `-m module`) without the seconds a new interpreter spends importing torch, transformers
and polyfuse (test-only): the script or module runs as `__main__` in a child of a fork server that imported them
once per test process.

A new interpreter importing what a tiny-recipe run needs costs 3-6 CPU seconds; the kill tests relaunch `polyfuse`
about thirty times (`kill_at_rename`), `test_benches` runs some thirty bench scripts, and other slow tests start
`polyfuse` or a script a few times each. The child sees what a new interpreter would: the script's folder (for
`-m`, the working directory) first on `sys.path` and then a plain interpreter's path (not pytest's), its own
working directory, environment, `sys.argv`, temporary folder and process group, and its output in files of its own.

`Server` does the same for another interpreter (the vLLM venv's, `conftest.warm_vllm`): this file run there as a
script (`--serve SOCKET MODULE...`) imports the modules once and forks a child per request on a Unix socket.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import json
import multiprocessing
import os
import runpy
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
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


def _run_forked(request: dict) -> int:
    """A forked child of `serve`: the request run as `_child` runs it, ended as an interpreter ends (exit code of
    `sys.exit`, a traceback and 1 for an exception, the exit functions run, the output flushed)."""
    try:
        _child(request["argv"], request["cwd"], request["env"], _plain_path(request["env"].get("PYTHONPATH")),
               request["out"], request["err"])
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001  (an uncaught exception: the traceback, exit code 1, as Python does)
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return code


def serve(address: str, preload: list[str]) -> None:
    """The fork server of `Server`, in its interpreter: each connection sends one request (a JSON line), gets the
    forked child's pid, then its exit code when it ends. Ends with its parent."""
    for name in preload:
        importlib.import_module(name)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address + ".part")
    listener.listen()
    os.replace(address + ".part", address)  # ready
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    waiting: dict[int, socket.socket] = {}
    while os.getppid() == parent:
        if selector.select(timeout=0.2):
            connection, _ = listener.accept()
            request = json.loads(connection.makefile().readline())
            pid = os.fork()
            if pid == 0:
                listener.close()
                connection.close()
                os._exit(_run_forked(request))
            connection.sendall(f"{pid}\n".encode())
            waiting[pid] = connection
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid in waiting:
                with waiting.pop(pid) as connection:
                    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())


class Server:
    """A fork server in the interpreter `python` with `preload` imported (started at once, ready at the first
    `start`): its `start` and `run` are the module's, for that interpreter."""

    def __init__(self, python: str | Path, preload: list[str], env: dict[str, str]):
        self.python, self._folder = str(python), tempfile.TemporaryDirectory(prefix="warm-")  # a short socket path
        self.address = os.path.join(self._folder.name, "socket")
        self._process = subprocess.Popen([self.python, __file__, "--serve", self.address, *preload], env=env)

    def start(self, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> ServedChild:
        while not os.path.exists(self.address):
            if self._process.poll() is not None:
                raise RuntimeError(f"the fork server of {self.python} exited with {self._process.returncode}")
            time.sleep(0.1)
        return ServedChild(self.address, list(map(str, argv)), cwd or Path.cwd(), dict(os.environ if env is None else env))

    def run(self, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        started = self.start(argv, cwd, env)
        code = started.wait(timeout)
        return subprocess.CompletedProcess([self.python, *started.argv], code, started.stdout(), started.stderr())

    def close(self) -> None:
        self._process.terminate()
        self._process.wait()
        self._folder.cleanup()


class ServedChild(Started):
    """A `python ARGS` started by a `Server`: `Started`'s interface, the exit code from the server."""

    def __init__(self, address: str, argv: list[str], cwd: Path, env: dict[str, str]):
        self.argv, self._folder = argv, tempfile.TemporaryDirectory(prefix="warm-python-")
        self._out, self._err = Path(self._folder.name) / "stdout", Path(self._folder.name) / "stderr"
        self._connection = socket.socket(socket.AF_UNIX)
        self._connection.connect(address)
        request = {"argv": argv, "cwd": str(cwd), "env": env, "out": str(self._out), "err": str(self._err)}
        self._connection.sendall((json.dumps(request) + "\n").encode())
        self._replies = self._connection.makefile()
        self.pid, self._code = int(self._replies.readline()), None

    def poll(self) -> int | None:
        return self._receive() if self._code is not None or self._ready(0) else None

    def _ready(self, timeout: float | None) -> bool:
        return bool(select.select([self._connection], [], [], timeout)[0])

    def _receive(self) -> int:
        if self._code is None:
            self._code = int(self._replies.readline())
            self._connection.close()
        return self._code

    def wait(self, timeout: float | None = None) -> int:
        if self._code is None and not self._ready(timeout):
            self.kill()
            raise subprocess.TimeoutExpired(self.argv, timeout, self.stdout(), self.stderr())
        return self._receive()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self._receive()


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2], sys.argv[3:])
