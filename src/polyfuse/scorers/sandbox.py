"""Run untrusted (model-generated) Python in a separate, limited process.

Each run gets a fresh temporary working directory (deleted afterwards), `python -I` (no user site,
no PYTHON* variables, no cwd on sys.path), a stripped environment, its own process group (killed as a
whole at the time limit and after the run), a memory cap (RLIMIT_AS), a file-size cap (RLIMIT_FSIZE),
no core dumps, capped stdout/stderr, and, where the kernel allows it, a new empty network namespace
(`unshare(CLONE_NEWNET)`, or with CLONE_NEWUSER when not root); whether that worked is reported.

The limits are set by a small bootstrap inside the child, before the user code runs, rather than in
`preexec_fn`: `preexec_fn` is unsafe when the parent has threads, and scorers run sandboxes from a
thread pool. RLIMIT_NPROC is not set: it counts every process of the user system-wide (and root ignores
it), so no fixed value is both safe and useful; the process-group kill covers forked children.

This is a guard against accidents (infinite loops, memory bombs, stray files, network calls), not a
security boundary against deliberately hostile code; use a container or VM for that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Runs in the child before the program: limits, network namespace, then the program itself. The status
# pipe receives "net=0|1" at start and "done" only if the program ran to its end, so a program that
# calls sys.exit(0) or os._exit(0) early does not count as passed.
_BOOTSTRAP = """
import ctypes, os, resource, sys
def _limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass
_limit(resource.RLIMIT_AS, {memory_bytes})
_limit(resource.RLIMIT_FSIZE, {file_bytes})
_limit(resource.RLIMIT_CORE, 0)
_isolated = False
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _isolated = _libc.unshare(0x40000000) == 0 or _libc.unshare(0x50000000) == 0
except (OSError, AttributeError):
    pass
os.write({status_fd}, b"net=1\\n" if _isolated else b"net=0\\n")
sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as _source:
    _program = compile(_source.read(), "main.py", "exec")
exec(_program, {{"__name__": "__main__", "__builtins__": __builtins__}})
os.write({status_fd}, b"done\\n")
"""


@dataclass
class SandboxResult:
    passed: bool  # ran to its end with exit status 0 within the limits
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    duration_s: float
    network_isolated: bool
    output_truncated: bool


class _CappedReader(threading.Thread):
    """Drains a pipe to its end (so the child never blocks on a full pipe) but keeps only `cap` bytes."""

    def __init__(self, pipe, cap: int):
        super().__init__(daemon=True)
        self.pipe, self.cap = pipe, cap
        self.kept = bytearray()
        self.truncated = False

    def run(self) -> None:
        while chunk := self.pipe.read1(65536):
            room = self.cap - len(self.kept)
            self.kept += chunk[: max(room, 0)]
            self.truncated |= len(chunk) > room

    def text(self) -> str:
        return self.kept.decode("utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_available(fd: int) -> list[str]:
    """What is already in the status pipe; never blocks, even if an escaped grandchild holds it open."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096).decode().split()
    except BlockingIOError:
        return []
    finally:
        os.close(fd)


def run_sandboxed(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 64 * 1024,
    max_file_mb: int = 16,
) -> SandboxResult:
    """Run `code` as a script in the sandbox and report how it ended."""
    status_read, status_write = os.pipe()
    bootstrap = _BOOTSTRAP.format(
        memory_bytes=memory_mb * 1024 * 1024, file_bytes=max_file_mb * 1024 * 1024, status_fd=status_write
    )
    with tempfile.TemporaryDirectory(prefix="polyfuse-sandbox-", ignore_cleanup_errors=True) as workdir:
        Path(workdir, "main.py").write_text(code, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", bootstrap], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_write,), start_new_session=True,
            )
        finally:
            os.close(status_write)
        readers = [_CappedReader(proc.stdout, max_output_bytes), _CappedReader(proc.stderr, max_output_bytes)]
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)  # the program, and anything it left running in its group
        proc.wait()
        duration = time.monotonic() - start
        for reader in readers:
            reader.join(timeout=5)
        status = _read_available(status_read)
        proc.stdout.close()
        proc.stderr.close()
    out, err = readers
    return SandboxResult(
        passed=not timed_out and proc.returncode == 0 and "done" in status,
        returncode=None if timed_out else proc.returncode,
        timed_out=timed_out,
        stdout=out.text(),
        stderr=err.text(),
        duration_s=round(duration, 3),
        network_isolated="net=1" in status,
        output_truncated=out.truncated or err.truncated,
    )
