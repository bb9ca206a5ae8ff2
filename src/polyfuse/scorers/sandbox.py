"""Run untrusted (model-generated) Python alone in a sandbox; only plain data comes back.

The sandbox runs the candidate program and nothing else: no tests, no expected answers. The trusted
side (the tests, in the scorer's process) calls the candidate's functions through `Sandbox.call`; each
call and its return value cross a socket as plain data (`sandbox_wire`), so no object made in the
sandbox reaches the tests. The verdict is never read from the sandbox.

Two independent settings choose a sandbox:
- isolation (`sandbox_host`): bubblewrap (namespaces, uid 65534, read-only system, a size-capped /tmp,
  a cgroup or rlimits for the whole sandbox; see docs/sandbox.md), or `unsafe_local`, a plain
  subprocess in a scratch directory with rlimits, a process-group kill and its own empty network
  namespace where the kernel allows. `unsafe_local` keeps the verdict unforgeable, but the code can read
  and write the user's files, see the environment of other processes, signal them, and leave processes
  running (`setsid`): use it only for trusted code;
- protocol (`sandbox_server`): `serve` (load the program, then calls) or `script` (one run as
  `__main__` with a given stdin; the caller compares the output).

This module is the process and its channel: start it, send requests within the deadline, read replies
(size-capped, well-formed plain data only), drain its output, kill it and report how it ended.
"""

from __future__ import annotations

import builtins
import functools
import json
import math
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polyfuse.scorers.sandbox_host as sandbox_host
import polyfuse.scorers.sandbox_server as sandbox_server
import polyfuse.scorers.sandbox_wire as sandbox_wire
from polyfuse.scorers.sandbox_wire import WireError, encode_message, from_wire, to_wire

Protocol = Literal["serve", "script"]
_MESSAGE_LIMIT = 64 * 1024 * 1024  # what the parent sends (programs, arguments)
# The interpreter's -c program: sandbox_wire and sandbox_server installed as modules from their sources
# (the sandbox mounts nothing of polyfuse), then the server's main with the settings in argv[1].
_BOOTSTRAP = """\
import sys, types
for _name, _source in {modules!r}:
    _module = sys.modules[_name] = types.ModuleType(_name)
    exec(compile(_source, _name, "exec"), _module.__dict__)
del _name, _source, _module
sys.modules[{server!r}].main(sys.argv[1])
"""


class SandboxFailure(BaseException):
    """The sandbox timed out, died or broke the protocol. A BaseException, so that tests catching
    `Exception` around a call cannot swallow it; the verdict is a fail whenever one was raised."""


class CandidateError(Exception):
    """The candidate raised an exception that is not a built-in one (its type name and message)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall time of the whole sandbox, from its start
    memory_mb: int = 1024  # the whole sandbox (cgroup) and each process in it (RLIMIT_AS)
    max_processes: int = 16  # processes and threads in the sandbox
    max_output_bytes: int = 64 * 1024  # stdout and stderr each; more is drained and dropped
    max_file_mb: int = 16  # the writable /tmp in all, and any one file
    max_reply_bytes: int = 1024 * 1024  # one serialised return value

    def rlimits(self) -> dict[str, int]:
        """Each process's rlimits. The NPROC count includes bwrap's init process, hence the + 1."""
        mib = 1024 * 1024
        return {"AS": self.memory_mb * mib, "CPU": math.ceil(self.timeout_s) + 1, "FSIZE": self.max_file_mb * mib,
                "NPROC": self.max_processes + 1}


@dataclass
class SandboxReport:
    """How the sandbox ended: its output (capped) and whether it was stopped or broke down."""

    stdout: str
    stderr: str
    output_truncated: bool
    timed_out: bool
    failure: str | None  # why the sandbox failed (time-out, died, bad message), None if it did not
    returncode: int | None
    duration_s: float
    isolation: str  # "bwrap+cgroup", "bwrap+rlimit" or "unsafe-local"


@functools.cache
def _bootstrap() -> str:
    modules = [(m.__name__, Path(m.__file__).read_text(encoding="utf-8")) for m in (sandbox_wire, sandbox_server)]
    return _BOOTSTRAP.format(modules=modules, server=sandbox_server.__name__)


class _CappedReader(threading.Thread):
    """Drains a pipe to its end (so the sandbox never blocks on a full pipe) but keeps `cap` bytes."""

    def __init__(self, fd: int, cap: int):
        super().__init__(daemon=True)
        self.fd, self.cap = fd, cap
        self.kept = bytearray()
        self.truncated = False

    def run(self) -> None:
        try:
            while chunk := os.read(self.fd, 65536):
                room = self.cap - len(self.kept)
                self.kept += chunk[: max(room, 0)]
                self.truncated |= len(chunk) > room
        except OSError:
            pass

    def text(self) -> str:
        return self.kept.decode("utf-8", errors="replace")


class Sandbox:
    """One sandboxed interpreter running one candidate program (a context manager), isolated by bubblewrap
    or, with `unsafe_local`, not; `protocol` "serve" (below) or "script" (`run_script`).

    `load()` runs the program; `call(name, *args)` calls one of its functions and returns the value
    (plain data), or raises the candidate's exception (a built-in type, else `CandidateError`);
    `SandboxFailure` when the sandbox timed out, died or answered nonsense, after which it is dead.
    `close()` kills everything in it and returns the `SandboxReport`.
    """

    def __init__(self, limits: Limits = Limits(), unsafe_local: bool = False, protocol: Protocol = "serve"):
        self.limits = limits
        self.protocol = protocol
        self.failure: str | None = None
        self.timed_out = False
        self._report: SandboxReport | None = None
        mib = 1024 * 1024
        self._launch = sandbox_host.launch(unsafe_local, limits.max_file_mb * mib, limits.memory_mb * mib,
                                           limits.max_processes + 2)  # the cgroup's count: + bwrap and its init
        self.isolation = self._launch.isolation
        self._channel, inner = socket.socketpair()
        settings = {"protocol": protocol, "channel_fd": inner.fileno(), "cut_network": self._launch.cut_network,
                    "limits": limits.rlimits(), "site_dirs": sandbox_host.site_dirs()}
        command = [*self._launch.command, "-c", _bootstrap(), json.dumps(settings)]
        self._start = time.monotonic()
        self._deadline = self._start + limits.timeout_s
        try:
            self._proc = subprocess.Popen(
                command, env=self._launch.env, cwd=self._launch.cwd,
                stdin=subprocess.PIPE if protocol == "script" else subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=(inner.fileno(),), start_new_session=True,
            )
        except BaseException:
            self._channel.close()
            self._launch.cleanup()
            raise
        finally:
            inner.close()
        self._readers = [
            _CappedReader(self._proc.stdout.fileno(), limits.max_output_bytes),
            _CappedReader(self._proc.stderr.fileno(), limits.max_output_bytes),
        ]
        for reader in self._readers:
            reader.start()

    # -- the channel --

    def _fail(self, why: str, timed_out: bool = False) -> SandboxFailure:
        self.failure = self.failure or why
        self.timed_out |= timed_out
        self._kill()
        return SandboxFailure(why)

    def _remaining(self) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._fail(f"timed out after {self.limits.timeout_s:g} s", timed_out=True)
        return remaining

    def _recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            self._channel.settimeout(self._remaining())
            try:
                chunk = self._channel.recv(min(n - len(data), 1 << 20))
            except TimeoutError:
                raise self._fail(f"timed out after {self.limits.timeout_s:g} s", timed_out=True) from None
            except OSError as err:
                raise self._fail(f"the sandbox's channel broke: {err}") from None
            if not chunk:
                raise self._fail("the sandbox ended before it answered")
            data += chunk
        return bytes(data)

    def _request(self, message: list) -> Any:
        if self.failure:
            raise SandboxFailure(self.failure)
        data = encode_message(message)
        if len(data) > _MESSAGE_LIMIT:
            raise ValueError(f"a request of {len(data)} bytes is more than the sandbox accepts")
        try:
            self._channel.settimeout(self._remaining())
            self._channel.sendall(data)
        except TimeoutError:
            raise self._fail(f"timed out after {self.limits.timeout_s:g} s", timed_out=True) from None
        except OSError as err:
            raise self._fail(f"the sandbox's channel broke: {err}") from None
        length = sandbox_wire.decode_length(self._recv_exact(4))
        if length > self.limits.max_reply_bytes:
            raise self._fail(f"a reply of {length} bytes is over the {self.limits.max_reply_bytes}-byte limit")
        try:
            reply = from_wire(self._recv_exact(length).decode("ascii"))
        except (WireError, UnicodeDecodeError) as err:
            raise self._fail(f"the sandbox sent malformed data: {err}") from None
        if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if type(reply) is list and len(reply) == 3 and reply[0] == "raise" and all(type(x) is str for x in reply[1:]):
            raise _candidate_exception(reply[1], reply[2])
        raise self._fail("the sandbox sent a reply of unknown form")

    # -- what the trusted side uses --

    def load(self, program: str) -> None:
        """Run the candidate program (its top level); raises what it raised."""
        self._request(["load", program])

    def resolve(self, names: list[str]) -> dict[str, tuple]:
        """For each name: ("callable",), ("value", data), ("unsupported", why) or ("missing",)."""
        reply = self._request(["resolve", list(names)])
        if type(reply) is not dict or not all(type(v) is tuple and v and type(v[0]) is str for v in reply.values()):
            raise self._fail("the sandbox sent a malformed name table")
        return reply

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            message = ["call", name, to_wire(args), {"dict": [[k, to_wire(v)] for k, v in kwargs.items()]}]
        except TypeError as err:
            raise TypeError(f"cannot pass the arguments of {name}() into the sandbox: {err}") from None
        message[2] = message[2]["tuple"]  # the sandbox unpacks a list
        return self._request(message)

    def function(self, name: str) -> CandidateFunction:
        return CandidateFunction(self, name)

    # -- the end --

    def _kill(self) -> None:
        self._launch.kill()
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)  # bwrap, whose PID-namespace init dies with it
        except (ProcessLookupError, PermissionError):
            pass

    def run_script(self, program: str, stdin: str) -> int | None:
        """(The script protocol) run `program` as __main__ reading `stdin`; its exit status, None if it
        was killed at the time limit. Its output is in the report."""
        if self.protocol != "script":
            raise ValueError("run_script needs a sandbox started with protocol='script'")
        self._channel.sendall(encode_message(["load", program]))
        feeder = threading.Thread(target=_feed, args=(self._proc.stdin, stdin.encode()), daemon=True)
        feeder.start()
        try:
            return self._proc.wait(timeout=max(self._deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            self._fail(f"timed out after {self.limits.timeout_s:g} s", timed_out=True)
            return None

    def close(self) -> SandboxReport:
        if self._report is not None:
            return self._report
        self._channel.close()
        self._kill()
        returncode = self._proc.wait()
        duration = time.monotonic() - self._start
        for reader in self._readers:
            reader.join(timeout=1)
        stuck = any(reader.is_alive() for reader in self._readers)  # unsafe-local: an escaped process holds a pipe
        for pipe in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if pipe is not None and not stuck:
                pipe.close()
        self._launch.cleanup()
        out, err = self._readers
        self._report = SandboxReport(
            stdout=out.text(), stderr=err.text(), output_truncated=out.truncated or err.truncated,
            timed_out=self.timed_out, failure=self.failure, returncode=None if self.timed_out else returncode,
            duration_s=round(duration, 3), isolation=self.isolation,
        )
        return self._report

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CandidateFunction:
    """A candidate's function as the trusted tests see it: calling it runs it in the sandbox."""

    def __init__(self, sandbox: Sandbox, name: str):
        self._sandbox, self.__name__, self.__qualname__ = sandbox, name, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._sandbox.call(self.__name__, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<sandboxed function {self.__name__}>"


_BUILTIN_ERRORS = {
    name: obj for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, Exception)
}


def _candidate_exception(type_name: str, message: str) -> Exception:
    """The candidate's exception, rebuilt from its name and text: the built-in type of that name
    (so tests expecting e.g. ValueError still work), else a CandidateError."""
    cls = _BUILTIN_ERRORS.get(type_name)
    if cls is not None:
        try:
            return cls(message[:2000])
        except Exception:  # a built-in whose constructor needs other arguments
            pass
    return CandidateError(f"{type_name}: {message[:2000]}")


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (OSError, ValueError):
        pass


def run_script(program: str, stdin: str = "", limits: Limits = Limits(), unsafe_local: bool = False) -> tuple[int | None, SandboxReport]:
    """Run `program` alone as a script with `stdin` as its input (stdin/stdout tests: the caller
    compares the output); its exit status (None when killed at the time limit) and the report."""
    with Sandbox(limits, unsafe_local, protocol="script") as box:
        returncode = box.run_script(program, stdin)
    return returncode, box.close()
