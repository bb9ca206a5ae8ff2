"""Run untrusted (model-generated) Python alone in a bubblewrap sandbox; only plain data comes back.

The sandbox runs the candidate program and nothing else: no tests, no expected answers. The trusted
side (the tests, in the scorer's process) calls the candidate's functions through `Sandbox.call`; each
call and its return value cross a socket as plain data (`sandbox_wire`), so no object made in the
sandbox reaches the tests. The verdict is never read from the sandbox.

Isolation (`bwrap`, the tool Flatpak uses; Debian/Ubuntu package `bubblewrap`):
- new user, PID, mount, network, IPC, UTS and cgroup namespaces; uid/gid 65534 inside, no
  capabilities, no further user namespaces (`--disable-userns`), a new session (no terminal);
- the filesystem is /usr, the Python installation and /dev's safe nodes, all read-only, plus one
  writable size-capped tmpfs at /tmp (the working directory); no home, no /etc, no host files; /proc
  is the sandbox's own PID namespace (its processes only);
- an empty environment (PATH, LANG, HOME=/tmp), no inherited file descriptors but the channel;
- the interpreter runs with `-I -S` (site-packages put on sys.path directly: no `.pth` code runs, and
  start-up is several times faster);
- limits on the whole sandbox: memory and process count by a cgroup of its own (pooled, reused once
  idle) where one can be made
  (always when the scorer runs as root), else by RLIMIT_NPROC, which a fresh user namespace makes
  count this sandbox's tasks only (Linux >= 5.14; the memory bound is then per process); per process
  RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, no core dumps; wall time and stdout/stderr size in the parent;
- at the end every process in it is killed: the PID namespace dies with its init (SIGKILLed, and
  `--die-with-parent`), and the cgroup's processes are killed too.

`unsafe_local=True` runs the same protocol in a plain subprocess (rlimits, process-group kill, a
network namespace where the kernel allows) for machines without bubblewrap: the verdict still cannot
be forged, but the code can read and write the user's files, see the environment of other processes,
signal them, and leave processes running (`setsid`). Use it only for trusted code.
"""

from __future__ import annotations

import atexit
import builtins
import functools
import itertools
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polyfuse.scorers.sandbox_wire as sandbox_wire
from polyfuse.errors import ConfigError
from polyfuse.scorers.sandbox_wire import WireError, encode_message, from_wire, to_wire

SANDBOX_UID = 65534  # "nobody" inside the user namespace
_MESSAGE_LIMIT = 64 * 1024 * 1024  # what the parent sends (programs, arguments)

# Runs inside the sandbox after sandbox_wire's source: limits, then serve the parent's requests.
_SERVER = r"""
import builtins, os, resource, sys

def _limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass

_MODE, _FD, _AS, _CPU, _FSIZE, _NPROC = sys.argv[1], *map(int, sys.argv[2:7])
_limit(resource.RLIMIT_AS, _AS)
_limit(resource.RLIMIT_CPU, _CPU)
_limit(resource.RLIMIT_FSIZE, _FSIZE)
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NPROC, _NPROC)
if _MODE == "unsafe-local":
    try:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.unshare(0x40000000) == 0 or _libc.unshare(0x50000000)  # CLONE_NEWNET (| CLONE_NEWUSER)
    except (OSError, AttributeError):
        pass
# -S skipped the site module's start-up work (.pth files: most of an interpreter's start-up time); the
# installed packages stay importable.
import site
sys.path += [_p for _p in site.getsitepackages() if os.path.isdir(_p) and _p not in sys.path]
if _FD != 3:
    os.dup2(_FD, 3)
os.closerange(4, 1 << 16)
sys.argv = ["main.py"]

def _read(n):
    data = b""
    while len(data) < n:
        chunk = os.read(3, n - len(data))
        if not chunk:
            raise SystemExit(0)
        data += chunk
    return data

def _send(message):
    sys.stdout.flush()
    sys.stderr.flush()
    data = encode_message(message)
    while data:
        data = data[os.write(3, data):]

def _failure(err):
    try:
        text = str(err)[:2000]
    except BaseException:
        text = ""
    return ["raise", type(err).__name__, text]

_namespace = {"__name__": "__main__", "__builtins__": builtins}
if _MODE == "script":  # one run as __main__ with the parent's stdin, no more requests
    _request = from_wire(_read(decode_length(_read(4))).decode("ascii"))
    os.close(3)
    with open("main.py", "w", encoding="utf-8") as _file:
        _file.write(_request[1])
    del _file, _read, _send, _failure, _limit
    exec(compile(_request[1], "main.py", "exec"), _namespace)
    raise SystemExit(0)
while True:
    _request = from_wire(_read(decode_length(_read(4))).decode("ascii"))
    try:
        if _request[0] == "load":
            with open("main.py", "w", encoding="utf-8") as _file:
                _file.write(_request[1])
            exec(compile(_request[1], "main.py", "exec"), _namespace)
            _reply = None
        elif _request[0] == "resolve":
            _reply = {}
            for _name in _request[1]:
                if _name not in _namespace:
                    _reply[_name] = ("missing",)
                elif callable(_namespace[_name]):
                    _reply[_name] = ("callable",)
                else:
                    try:
                        to_wire(_namespace[_name])
                        _reply[_name] = ("value", _namespace[_name])
                    except TypeError as _err:
                        _reply[_name] = ("unsupported", str(_err))
            _reply = to_wire(_reply)
        else:
            _reply = to_wire(_namespace[_request[1]](*_request[2], **_request[3]))
    except BaseException as _err:
        _send(_failure(_err))
        continue
    _send(["ok", _reply])
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

    def server_args(self, mode: str, channel_fd: int) -> list[str]:
        """The sandbox server's argv: its mode, the channel's fd, RLIMIT_AS, _CPU, _FSIZE, _NPROC. The
        NPROC count includes bwrap's init process, hence the + 1."""
        mib = 1024 * 1024
        cpu = math.ceil(self.timeout_s) + 1
        limits = [self.memory_mb * mib, cpu, self.max_file_mb * mib, self.max_processes + 1]
        return [mode, str(channel_fd), *map(str, limits)]


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


# --- what this machine offers ------------------------------------------------------------------


@functools.cache
def _bwrap() -> tuple[str, frozenset[str]] | None:
    """bwrap's path and the options this version knows (`--disable-userns` and `--size` are recent)."""
    path = shutil.which("bwrap")
    if path is None:
        return None
    help_text = subprocess.run([path, "--help"], capture_output=True, text=True, check=False).stdout
    return path, frozenset(opt for opt in ("--disable-userns", "--size") if opt in help_text)


@dataclass(frozen=True)
class _CgroupBase:
    version: int
    dirs: tuple[Path, ...]  # v1: the memory and pids hierarchies' own cgroups; v2: one


def _own_cgroups() -> dict[str, str]:
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else ["unified"]:
            paths[controller] = path
    return paths


def _can_make_children(parent: Path) -> bool:
    probe = parent / f"polyfuse-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False


@functools.cache
def _cgroup_base() -> _CgroupBase | None:
    """Where this process may make one cgroup per sandbox with memory and pids limits, if anywhere."""
    root = Path("/sys/fs/cgroup")
    try:
        own = _own_cgroups()
    except OSError:
        return None
    v1 = [root / c / own[c].lstrip("/") for c in ("memory", "pids") if c in own]
    if len(v1) == 2 and all((d / "cgroup.procs").exists() for d in v1):
        return _CgroupBase(1, tuple(v1)) if all(_can_make_children(d) for d in v1) else None
    if "unified" in own:
        base = root / own["unified"].lstrip("/")
        try:
            enabled = (base / "cgroup.subtree_control").read_text().split()
        except OSError:
            return None
        if {"memory", "pids"} <= set(enabled) and _can_make_children(base):
            return _CgroupBase(2, (base,))
    return None


def isolation_problem() -> str | None:
    """Why this machine cannot run the sandbox, or None if it can (probed once per process)."""
    return _isolation_problem()


@functools.cache
def _isolation_problem() -> str | None:
    found = _bwrap()
    if found is None:
        return "bubblewrap (`bwrap`) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    if os.geteuid() == 0 and _cgroup_base() is None:
        return (
            "running as root, the sandbox needs a writable cgroup (v1 memory+pids, or v2 with both "
            "controllers delegated) to cap its processes: RLIMIT_NPROC does not apply to root"
        )
    command = _bwrap_command(Limits()) + ["-c", "print('ok')"]
    probe = subprocess.run(command, capture_output=True, text=True, env=_OUTER_ENV, timeout=60, check=False)
    if probe.stdout != "ok\n":
        return f"bubblewrap cannot create its namespaces here: {probe.stderr.strip()[-500:] or probe.returncode}"
    return None


def require_isolation(unsafe_local: bool) -> None:
    """Refuse (ConfigError) to run model code without the sandbox unless `unsafe_local` is set."""
    problem = None if unsafe_local else isolation_problem()
    if problem:
        raise ConfigError(
            f"the code scorer refuses to run model-written code: {problem}. Install bubblewrap, or set "
            "`unsafe_local: true` to run it unisolated (it can then read and change your files, see and "
            "signal your processes and leave processes running; the verdict still cannot be forged)"
        )


# --- starting and stopping one sandbox ------------------------------------------------------------

_OUTER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
_INNER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}
_counter = itertools.count()
# Isolated mode (no PYTHON* variables, no user site, no cwd on sys.path), without site's start-up work.
_INTERPRETER = (sys.executable, "-I", "-S")


def _system_mounts() -> list[str]:
    """/usr read-only, the top-level /bin, /lib... as they are on the host (links into /usr or
    directories), and the Python installation when it lives outside /usr."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    prefixes.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    for prefix in sorted(prefixes):
        if not prefix.startswith("/usr/") and prefix != "/usr":
            args += ["--ro-bind", prefix, prefix]
    if os.path.realpath(sys.executable) != sys.executable and not sys.executable.startswith("/usr/"):
        args += ["--ro-bind", os.path.dirname(sys.executable), os.path.dirname(sys.executable)]
    return args


def _server_source() -> str:
    return Path(sandbox_wire.__file__).read_text(encoding="utf-8") + _SERVER


def _bwrap_command(limits: Limits) -> list[str]:
    path, known = _bwrap()  # type: ignore[misc]
    command = [path, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session"]
    command += ["--disable-userns"] if "--disable-userns" in known else []
    command += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox"]
    command += _system_mounts() + ["--proc", "/proc", "--dev", "/dev"]
    command += ["--size", str(limits.max_file_mb * 1024 * 1024)] if "--size" in known else []
    command += ["--tmpfs", "/tmp", "--chdir", "/tmp", "--clearenv"]
    for key, value in _INNER_ENV.items():
        command += ["--setenv", key, value]
    return command + ["--", *_INTERPRETER]


class _Cgroup:
    """One cgroup (per hierarchy) for one sandbox at a time: memory and pids limits, kill-all. Reused
    from a pool once empty (making and removing memory cgroups per sandbox is slow, and removed ones
    linger in the kernel while pages are charged to them)."""

    def __init__(self, base: _CgroupBase):
        self.version = base.version
        name = f"polyfuse-sandbox-{os.getpid()}-{next(_counter)}"
        self.dirs = [d / name for d in base.dirs]
        for d in self.dirs:
            d.mkdir()
        self.limits: tuple[int, int] | None = None

    def configure(self, limits: Limits) -> None:
        memory, pids = limits.memory_mb * 1024 * 1024, limits.max_processes + 2  # + bwrap and its init
        if self.limits == (memory, pids):
            return
        if self.version == 1:
            mem, pid_dir = self.dirs
            files = [mem / "memory.limit_in_bytes", mem / "memory.memsw.limit_in_bytes"]
            files = [f for f in files if f.exists()]
            try:  # the memory limit may not exceed memory+swap's: the order depends on the direction
                for f in files:
                    f.write_text(str(memory))
            except OSError:
                for f in reversed(files):
                    f.write_text(str(memory))
            (pid_dir / "pids.max").write_text(str(pids))
        else:
            (self.dirs[0] / "memory.max").write_text(str(memory))
            if (self.dirs[0] / "memory.swap.max").exists():
                (self.dirs[0] / "memory.swap.max").write_text("0")
            (self.dirs[0] / "pids.max").write_text(str(pids))
        self.limits = (memory, pids)

    def join_command(self) -> list[str]:
        """A shell that moves itself into the cgroup, then becomes the sandbox: every process of the
        sandbox starts inside it."""
        joins = " && ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))}" for d in self.dirs)
        return ["/bin/sh", "-c", f'{joins} && exec "$@"', "sh"]

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return sorted(found)

    def idle(self) -> bool:
        """No task charged to it any more: dying tasks leave cgroup.procs before they stop counting
        against pids.max, so only pids.current tells that a new sandbox gets its full count."""
        try:
            return (self.dirs[-1] / "pids.current").read_text().strip() == "0"
        except OSError:
            return False

    def kill_all(self) -> None:
        """SIGKILL every process in it (bwrap's PID-namespace init among them: the kernel then kills
        the rest of the namespace)."""
        if self.version == 2 and (self.dirs[0] / "cgroup.kill").exists():
            (self.dirs[0] / "cgroup.kill").write_text("1")
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        self.kill_all()
        for d in self.dirs:
            for _ in range(200):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)


_free_cgroups: list[_Cgroup] = []
_pool_lock = threading.Lock()


def _acquire_cgroup(base: _CgroupBase, limits: Limits) -> _Cgroup:
    with _pool_lock:
        for index, cgroup in enumerate(_free_cgroups):
            if cgroup.idle():
                del _free_cgroups[index]
                break
        else:
            cgroup = None
    cgroup = cgroup or _Cgroup(base)
    cgroup.configure(limits)
    return cgroup


def _release_cgroup(cgroup: _Cgroup) -> None:
    with _pool_lock:
        _free_cgroups.append(cgroup)


@atexit.register
def _remove_cgroups() -> None:
    with _pool_lock:
        while _free_cgroups:
            _free_cgroups.pop().remove()


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
    """One sandboxed interpreter running one candidate program (a context manager).

    `load()` runs the program; `call(name, *args)` calls one of its functions and returns the value
    (plain data), or raises the candidate's exception (a built-in type, else `CandidateError`);
    `SandboxFailure` when the sandbox timed out, died or answered nonsense, after which it is dead.
    `close()` kills everything in it and returns the `SandboxReport`.
    """

    def __init__(self, limits: Limits = Limits(), unsafe_local: bool = False, script: bool = False):
        self.limits = limits
        self.failure: str | None = None
        self.timed_out = False
        self._report: SandboxReport | None = None
        self._cgroup: _Cgroup | None = None
        self._workdir: str | None = None
        if unsafe_local:
            self._workdir = tempfile.mkdtemp(prefix="polyfuse-sandbox-")
            command, self.isolation = list(_INTERPRETER), "unsafe-local"
            env = {**_INNER_ENV, "HOME": self._workdir, "TMPDIR": self._workdir}
            mode = "script" if script else "unsafe-local"
        else:
            require_isolation(False)
            base = _cgroup_base()
            command, env, mode = _bwrap_command(limits), _OUTER_ENV, "script" if script else "serve"
            if base is not None:
                self._cgroup = _acquire_cgroup(base, limits)
                command = self._cgroup.join_command() + command
            self.isolation = "bwrap+cgroup" if base else "bwrap+rlimit"
        self._channel, inner = socket.socketpair()
        command += ["-c", _server_source(), *limits.server_args(mode, inner.fileno())]
        self._start = time.monotonic()
        self._deadline = self._start + limits.timeout_s
        try:
            self._proc = subprocess.Popen(
                command, env=env, cwd=self._workdir or "/", stdin=subprocess.PIPE if script else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(inner.fileno(),), start_new_session=True,
            )
        except BaseException:
            self._channel.close()
            self._cleanup()
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
        if self._cgroup:
            self._cgroup.kill_all()
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)  # bwrap, whose PID-namespace init dies with it
        except (ProcessLookupError, PermissionError):
            pass

    def run_script(self, program: str, stdin: str) -> int | None:
        """(Script mode) run `program` as __main__ reading `stdin`; its exit status, None if it was
        killed at the time limit. Its output is in the report."""
        self._channel.sendall(encode_message(["load", program]))
        feeder = threading.Thread(target=_feed, args=(self._proc.stdin, stdin.encode()), daemon=True)
        feeder.start()
        try:
            return self._proc.wait(timeout=max(self._deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            self._fail(f"timed out after {self.limits.timeout_s:g} s", timed_out=True)
            return None

    def _cleanup(self) -> None:
        if self._cgroup:
            _release_cgroup(self._cgroup)
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

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
        self._cleanup()
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
    with Sandbox(limits, unsafe_local, script=True) as box:
        returncode = box.run_script(program, stdin)
    return returncode, box.close()
