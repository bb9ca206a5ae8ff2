"""What this machine offers the sandbox, and how a sandbox is launched on it: bubblewrap and the
options this version knows, a cgroup per sandbox (pooled), a network namespace for `unsafe_local`,
and the refusal to run model code without isolation.

`launch(unsafe_local, ...)` gives the command prefix that starts an interpreter isolated one way or the
other; what runs in it (the protocol) is the caller's business (`sandbox.py`, `sandbox_server.py`).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import shlex
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from polyfuse.errors import ConfigError

SANDBOX_UID = 65534  # "nobody" inside the user namespace
OUTER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # bwrap's own environment
INNER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp"}
# Isolated mode (no PYTHON* variables, no user site, no cwd on sys.path), without site's start-up work.
INTERPRETER = (sys.executable, "-I", "-S")
_PROBE_TMP_BYTES = 16 * 1024 * 1024


# --- bubblewrap --------------------------------------------------------------------------------


@functools.cache
def _bwrap() -> tuple[str, frozenset[str]] | None:
    """bwrap's path and the options this version knows (`--disable-userns` and `--size` are recent)."""
    path = shutil.which("bwrap")
    if path is None:
        return None
    help_text = subprocess.run([path, "--help"], capture_output=True, text=True, check=False).stdout
    return path, frozenset(opt for opt in ("--disable-userns", "--size") if opt in help_text)


def _python_dirs() -> list[str]:
    """The Python installation's directories outside /usr (a venv, pyenv, conda, a build under /tmp)."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    dirs.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    if os.path.realpath(sys.executable) != sys.executable:
        dirs.add(os.path.dirname(sys.executable))
    return sorted(d for d in dirs if d != "/usr" and not d.startswith("/usr/"))


def site_dirs() -> list[str]:
    """The scorer's site-packages directories, which the sandboxed interpreter (started with -S) puts on
    its sys.path itself; read here, where `site` has run, so that a venv with system site-packages
    keeps them (inside, -S leaves `site` seeing the venv only)."""
    return [d for d in site.getsitepackages() if os.path.isdir(d)]


def bwrap_command(tmp_bytes: int) -> list[str]:
    """bwrap's arguments up to the interpreter: every namespace, uid 65534, and a filesystem of /usr,
    the top-level /bin, /lib... and the Python installation, read-only, plus a size-capped tmpfs at /tmp.

    The tmpfs is mounted first and the read-only binds after it, so an interpreter that lives under /tmp
    (a venv made by CI or a cluster's $TMPDIR) stays visible instead of being hidden by the fresh /tmp."""
    path, known = _bwrap()  # type: ignore[misc]
    command = [path, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session"]
    command += ["--disable-userns"] if "--disable-userns" in known else []
    command += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox"]
    command += ["--size", str(tmp_bytes)] if "--size" in known else []
    command += ["--tmpfs", "/tmp", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    for directory in _python_dirs():
        command += ["--ro-bind", directory, directory]
    command += ["--proc", "/proc", "--dev", "/dev", "--chdir", "/tmp", "--clearenv"]
    for key, value in INNER_ENV.items():
        command += ["--setenv", key, value]
    return command + ["--", *INTERPRETER]


# --- cgroups -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupBase:
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
def cgroup_base() -> CgroupBase | None:
    """Where this process may make one cgroup per sandbox with memory and pids limits, if anywhere."""
    root = Path("/sys/fs/cgroup")
    try:
        own = _own_cgroups()
    except OSError:
        return None
    v1 = [root / c / own[c].lstrip("/") for c in ("memory", "pids") if c in own]
    if len(v1) == 2 and all((d / "cgroup.procs").exists() for d in v1):
        return CgroupBase(1, tuple(v1)) if all(_can_make_children(d) for d in v1) else None
    if "unified" in own:
        base = root / own["unified"].lstrip("/")
        try:
            enabled = (base / "cgroup.subtree_control").read_text().split()
        except OSError:
            return None
        if {"memory", "pids"} <= set(enabled) and _can_make_children(base):
            return CgroupBase(2, (base,))
    return None


_counter = itertools.count()


class Cgroup:
    """One cgroup (per hierarchy) for one sandbox at a time: memory and pids limits, kill-all. Reused
    from a pool once empty (making and removing memory cgroups per sandbox is slow, and removed ones
    linger in the kernel while pages are charged to them)."""

    def __init__(self, base: CgroupBase):
        self.version = base.version
        name = f"polyfuse-sandbox-{os.getpid()}-{next(_counter)}"
        self.dirs = [d / name for d in base.dirs]
        for d in self.dirs:
            d.mkdir()
        self.limits: tuple[int, int] | None = None

    def configure(self, memory_bytes: int, pids: int) -> None:
        if self.limits == (memory_bytes, pids):
            return
        if self.version == 1:
            mem, pid_dir = self.dirs
            files = [mem / "memory.limit_in_bytes", mem / "memory.memsw.limit_in_bytes"]
            files = [f for f in files if f.exists()]
            try:  # the memory limit may not exceed memory+swap's: the order depends on the direction
                for f in files:
                    f.write_text(str(memory_bytes))
            except OSError:
                for f in reversed(files):
                    f.write_text(str(memory_bytes))
            (pid_dir / "pids.max").write_text(str(pids))
        else:
            (self.dirs[0] / "memory.max").write_text(str(memory_bytes))
            if (self.dirs[0] / "memory.swap.max").exists():
                (self.dirs[0] / "memory.swap.max").write_text("0")
            (self.dirs[0] / "pids.max").write_text(str(pids))
        self.limits = (memory_bytes, pids)

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


_free_cgroups: list[Cgroup] = []
_pool_lock = threading.Lock()


def acquire_cgroup(base: CgroupBase, memory_bytes: int, pids: int) -> Cgroup:
    with _pool_lock:
        for index, cgroup in enumerate(_free_cgroups):
            if cgroup.idle():
                del _free_cgroups[index]
                break
        else:
            cgroup = None
    cgroup = cgroup or Cgroup(base)
    cgroup.configure(memory_bytes, pids)
    return cgroup


def release_cgroup(cgroup: Cgroup) -> None:
    with _pool_lock:
        _free_cgroups.append(cgroup)


@atexit.register
def _remove_cgroups() -> None:
    with _pool_lock:
        while _free_cgroups:
            _free_cgroups.pop().remove()


# --- the network namespace of unsafe_local ------------------------------------------------------

# The sandbox server cuts its own network (`unshare(CLONE_NEWNET)`, else with a user namespace that maps
# the user to itself); this probe tells, once per process, whether the kernel lets this user do it.
_NETNS_PROBE = (
    "import ctypes, os, socket\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "uid, gid = os.getuid(), os.getgid()\n"
    "if libc.unshare(0x40000000) != 0:\n"
    "    assert libc.unshare(0x50000000) == 0\n"
    "print(sorted(name for _, name in socket.if_nameindex()))\n"
)


@functools.cache
def network_namespace_available() -> bool:
    """Whether `unsafe_local` can cut the network here (the kernel allows this user a network namespace)."""
    probe = subprocess.run([*INTERPRETER, "-c", _NETNS_PROBE], capture_output=True, text=True, env=OUTER_ENV,
                           timeout=60, check=False)
    return probe.stdout.strip() == "['lo']"


# --- launching -----------------------------------------------------------------------------------


@dataclass
class Launch:
    """How one sandbox is started: the command up to the interpreter's own arguments, its environment and
    working directory, and what must be undone when it ends (its cgroup, its scratch directory)."""

    command: list[str]
    env: dict[str, str]
    isolation: str  # "bwrap+cgroup", "bwrap+rlimit" or "unsafe-local"
    cut_network: bool  # the server itself must enter a new network namespace (unsafe-local)
    cgroup: Cgroup | None = None
    workdir: str | None = None

    @property
    def cwd(self) -> str:
        return self.workdir or "/"

    def kill(self) -> None:
        if self.cgroup:
            self.cgroup.kill_all()

    def cleanup(self) -> None:
        if self.cgroup:
            release_cgroup(self.cgroup)
            self.cgroup = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def launch(unsafe_local: bool, tmp_bytes: int, memory_bytes: int, pids: int) -> Launch:
    """The bwrap sandbox (in a cgroup of its own where one can be made), or for `unsafe_local` a plain
    interpreter in a scratch directory that cuts its own network where the kernel allows."""
    if unsafe_local:
        workdir = tempfile.mkdtemp(prefix="polyfuse-sandbox-")
        env = {**INNER_ENV, "HOME": workdir, "TMPDIR": workdir}
        return Launch(list(INTERPRETER), env, "unsafe-local", network_namespace_available(), workdir=workdir)
    require_isolation(False)
    command, base = bwrap_command(tmp_bytes), cgroup_base()
    if base is None:
        return Launch(command, OUTER_ENV, "bwrap+rlimit", False)
    cgroup = acquire_cgroup(base, memory_bytes, pids)
    return Launch(cgroup.join_command() + command, OUTER_ENV, "bwrap+cgroup", False, cgroup=cgroup)


def isolation_problem() -> str | None:
    """Why this machine cannot run the sandbox, or None if it can (probed once per process)."""
    return _isolation_problem()


@functools.cache
def _isolation_problem() -> str | None:
    if _bwrap() is None:
        return "bubblewrap (`bwrap`) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    if os.geteuid() == 0 and cgroup_base() is None:
        return (
            "running as root, the sandbox needs a writable cgroup (v1 memory+pids, or v2 with both "
            "controllers delegated) to cap its processes: RLIMIT_NPROC does not apply to root"
        )
    command = bwrap_command(_PROBE_TMP_BYTES) + ["-c", "print('ok')"]
    probe = subprocess.run(command, capture_output=True, text=True, env=OUTER_ENV, timeout=60, check=False)
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
