"""Hostile candidates against the code scorer: each must be contained and none may forge a pass.

Every snippet is a *wrong* solution of `total(xs)` (it returns `len(xs)`, or nothing useful) plus an
attack: forging the verdict (status pipes, `python -O`, tracing, rewriting the harness, reading the
answers, objects equal to everything, forged replies), escaping (setns, files, secrets, shells,
processes that outlive the sandbox, signals to the scorer, memory spread over forks, the network) or
just misbehaving (loops, bombs, floods). All rows are scored once, concurrently, in a module fixture;
each test then asserts the fail verdict and the containment that snippet is about. Controls: the
correct solution passes, with and without harmless noise.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from polyfuse.data import SampleRow
from polyfuse.scorers import build_scorer
from polyfuse.scorers.sandbox_host import isolation_problem

# Skipped only off CI: CI installs bubblewrap, so a missing sandbox there is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    isolation_problem() is not None and not os.environ.get("CI"), reason=f"no sandbox: {isolation_problem()}"
)

TIMEOUT_S = 4.0
TOKEN = f"polyfuse-hostile-{os.getpid()}"  # marks processes started by the snippets
SECRET = "hunter2-" + TOKEN
PROMPT = 'def total(xs):\n    """Sum of xs."""\n'
TESTS = (
    "def check(candidate):\n"
    "    assert candidate([1, 2, 3]) == 6\n"
    "    assert candidate([]) == 0\n"
    "    assert candidate([5]) == 5\n"
)
WRONG = "def total(xs):\n    return len(xs)\n"


def wrong_with(top: str = "", inside: str = "") -> str:
    """The wrong solution, with an attack at the top level and/or inside the function."""
    body = "".join(f"    {line}\n" for line in inside.splitlines())
    return f"{top}\n\ndef total(xs):\n{body}    return len(xs)\n"


class Host:
    """What the snippets aim at, outside the sandbox: files, a listener, the environment."""

    def __init__(self, root: Path):
        self.root = root
        self.secret_file = root / "secret.txt"
        self.secret_file.write_text(SECRET)
        self.victim = root / "victim.txt"
        self.victim.write_text("intact")
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    self.received.append(conn.recv(1024) or b"<connected>")
                except OSError:
                    self.received.append(b"<connected>")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.listener.close()


def snippets(host: Host) -> dict[str, str]:
    root, port, secret_file, victim = host.root, host.port, host.secret_file, host.victim
    src = Path(__file__).resolve().parents[1] / "src" / "polyfuse" / "__init__.py"
    return {
        # --- forging the verdict ---
        "status_pipe_done_then_exit": wrong_with(
            "import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'done\\nnet=1\\n')\n"
            "    except OSError:\n        pass\nos._exit(0)\n"
        ),
        "status_pipe_from_atexit": wrong_with(
            "import atexit, os\ndef _forge():\n    for fd in range(3, 256):\n        try:\n"
            "            os.write(fd, b'done\\n')\n        except OSError:\n            pass\n    os._exit(0)\n"
            "atexit.register(_forge)\n",
            "raise SystemExit(0)",
        ),
        "forged_reply_on_channel": wrong_with(
            "import json, os, struct\n"
            "def _reply(value):\n    data = json.dumps(['ok', value]).encode()\n"
            "    return struct.pack('>I', len(data)) + data\n"
            "for fd in range(3, 64):\n    try:\n        os.write(fd, _reply(None) + _reply(6) + _reply(0) + _reply(5))\n"
            "    except OSError:\n        pass\n"
        ),
        "garbage_on_channel": wrong_with(inside="import os\nos.write(3, b'\\x00\\x00\\x00\\x05hello')\nos._exit(0)"),
        "reexec_with_python_O": wrong_with(
            "import os, sys\nif not sys.flags.optimize:\n    argv = open('/proc/self/cmdline', 'rb').read().split(b'\\0')[:-1]\n"
            "    os.execv(sys.executable, [argv[0], b'-O'] + argv[1:])\n"
        ),
        "settrace_replaces_check": wrong_with(
            "import sys\ndef _tracer(frame, event, arg):\n    if frame.f_code.co_name == 'check':\n"
            "        frame.f_globals['check'] = lambda c: None\n    return _tracer\nsys.settrace(_tracer)\n"
            "import builtins\nbuiltins.AssertionError = type('AssertionError', (BaseException,), {})\n"
        ),
        "rewrites_main_py_and_reexecs": wrong_with(
            "import os, sys\nif os.path.exists('main.py') and 'PWNED' not in open('main.py').read():\n"
            "    open('main.py', 'w').write('# PWNED\\ndef total(xs):\\n    return 6\\n')\n"
            "    argv = open('/proc/self/cmdline', 'rb').read().split(b'\\0')[:-1]\n"
            "    os.execv(sys.executable, argv)\n"
        ),
        "reads_expected_answers": wrong_with(
            "import glob, re\n_text = ''\nfor path in ['main.py', '/proc/self/cmdline', '/proc/1/cmdline'] + glob.glob('/tmp/*'):\n"
            "    try:\n        _text += open(path, errors='replace').read()\n    except OSError:\n        pass\n"
            "_answers = [int(x) for x in re.findall(r'== (\\d+)', _text)]\n",
            "return _answers.pop(0) if _answers else len(xs)",
        ),
        "always_true_eq": wrong_with(
            "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n",
            "return Anything()",
        ),
        "int_subclass_always_equal": wrong_with(
            "class Sneaky(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n",
            "return Sneaky(-1)",
        ),
        "hijacks_the_server_encoder": wrong_with(
            "import sys\n_server = sys.modules['__main__']\n_server.to_wire = lambda value: {'custom': 1}\n"
        ),
        "huge_reply": wrong_with(inside="return 'x' * (64 * 1024 * 1024)"),
        # --- escaping ---
        "setns_into_parent_netns": wrong_with(
            f"import ctypes, os, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"for pid in ['1', str(os.getppid())] + [p for p in os.listdir('/proc') if p.isdigit()]:\n"
            f"    try:\n        fd = os.open(f'/proc/{{pid}}/ns/net', os.O_RDONLY)\n        libc.setns(fd, 0)\n"
            f"    except OSError:\n        pass\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'setns')\n"
            f"except OSError:\n    pass\n"
        ),
        "network_loopback_and_public": wrong_with(
            f"import socket\nfor addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
            f"    try:\n        socket.create_connection(addr, timeout=1).sendall(b'net')\n    except OSError:\n        pass\n"
        ),
        "writes_outside_temp": wrong_with(
            f"import os, pathlib\nfor path in [{str(victim)!r}, {str(root / 'planted.txt')!r}, {str(src)!r},\n"
            f"             os.path.expanduser('~/planted-{TOKEN}'), '/root/planted-{TOKEN}', '/usr/planted-{TOKEN}',\n"
            f"             '/etc/planted-{TOKEN}', '/planted-{TOKEN}']:\n"
            f"    try:\n        open(path, 'w').write('pwned')\n    except OSError:\n        pass\n"
            f"    try:\n        os.remove(path)\n    except OSError:\n        pass\n"
        ),
        "reads_parent_environ_and_secret_files": wrong_with(
            f"import glob, os, sys\n_found = []\n"
            f"for path in [{str(secret_file)!r}, '/proc/%d/environ' % os.getppid(), '/proc/1/environ',\n"
            f"             os.path.expanduser('~/.bash_history'), '/etc/shadow', '/root/.ssh/id_rsa']\\\n"
            f"            + glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):\n"
            f"    try:\n        _found.append(open(path, errors='replace').read())\n    except OSError as err:\n"
            f"        _found.append(str(err))\n"
            f"print('\\n'.join(_found))\nprint('\\n'.join(_found), file=sys.stderr)\nprint(dict(os.environ))\n",
            "raise ValueError(' '.join(_found)[:1000])",
        ),
        "shell_and_os_system": wrong_with(
            f"import os, subprocess\nos.system('echo pwned > {root / 'shell.txt'}; rm -f {victim}')\n"
            f"subprocess.run(['/bin/sh', '-c', 'echo pwned > {root / 'sh.txt'}'])\n"
        ),
        "setsid_child_outlives": wrong_with(
            f"import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{TOKEN}'])\n"
            f"    os._exit(0)\n"
        ),
        "detached_child_holds_stdout": wrong_with(
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\n"
        ),
        "kills_the_parent": wrong_with(
            "import os, signal\nfor pid in [os.getppid(), 1, -1]:\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError:\n        pass\n",
        ),
        "forks_to_spread_memory": wrong_with(  # reports how many children hold 400 MB at the same time
            "import os, sys, time\n_r, _w = os.pipe()\n_kids = []\nfor _ in range(4):\n    pid = os.fork()\n"
            "    if pid == 0:\n        block = b'x' * (400 * 1024 * 1024)\n        os.write(_w, b'%8d' % os.getpid())\n"
            "        time.sleep(30)\n        os._exit(0)\n    _kids.append(pid)\ntime.sleep(2)\nos.set_blocking(_r, False)\n"
            "try:\n    _held = [int(_r_) for _r_ in os.read(_r, 4096).split()]\nexcept BlockingIOError:\n    _held = []\n"
            "alive = sum(os.waitpid(p, os.WNOHANG) == (0, 0) for p in _held)\n"
            "print(f'holding={alive}', file=sys.stderr, flush=True)\n"
        ),
        "fork_bomb": wrong_with(
            "import os\n_n = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            import time\n"
            "            time.sleep(30)\n            os._exit(0)\n        _n += 1\nexcept OSError:\n    pass\n"
            "print(f'forked={_n}', flush=True)\n"
        ),
        # --- misbehaving (contained before too) ---
        "infinite_loop": wrong_with(inside="while True:\n    pass"),
        "long_sleep": wrong_with(inside="import time\ntime.sleep(60)"),
        "ignores_sigterm": wrong_with(
            "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n", "time.sleep(60)"
        ),
        "long_lived_threads": wrong_with(
            "import threading, time\nfor _ in range(4):\n    threading.Thread(target=time.sleep, args=(60,)).start()\n"
        ),
        "memory_bomb": wrong_with(inside="block = bytearray(8 * 1024 ** 3)"),
        "stdout_flood": wrong_with("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 1024 * 1024)\n"),
        "ctypes_segfault": wrong_with(inside="import ctypes\nctypes.string_at(0)"),
        "os_exit_zero": wrong_with(inside="import os\nos._exit(0)"),
        "sys_exit_zero": wrong_with(inside="import sys\nsys.exit(0)"),
        "raise_system_exit": wrong_with("raise SystemExit(0)\n"),
        "excepthook_and_atexit": wrong_with(
            "import atexit, os, sys\nsys.excepthook = lambda *a: os._exit(0)\natexit.register(lambda: os._exit(0))\n"
        ),
        "keyboard_interrupt": wrong_with(inside="raise KeyboardInterrupt"),
        "writes_big_temp_file": wrong_with(
            "try:\n    open('/tmp/big', 'wb').write(b'x' * (256 * 1024 * 1024))\nexcept OSError as err:\n"
            "    print('write refused:', type(err).__name__)\n"
        ),
    }


CORRECT = "def total(xs):\n    return sum(xs)\n"
NOISY_CORRECT = (
    "import sys, tempfile\nprint('hello from the candidate')\nprint('debug', file=sys.stderr)\n"
    "open(tempfile.gettempdir() + '/scratch.txt', 'w').write('ok')\n\ndef total(xs):\n    return sum(xs)\n"
)


def row(name: str, response: str) -> SampleRow:
    return SampleRow(
        id=name, prompt=PROMPT, domain="code", tests=TESTS, entry_point="total", prompt_id="total",
        model="hostile", sample_index=0, response=response,
    )


def host_processes_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "status").read_text()
            except OSError:
                continue
            if token.encode() in cmdline and "State:\tZ" not in state:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    host = Host(tmp_path_factory.mktemp("host"))
    os.environ["POLYFUSE_TEST_SECRET"] = SECRET
    cases = snippets(host) | {"control_correct": CORRECT, "control_noisy_correct": NOISY_CORRECT, "control_wrong": WRONG}
    verifier = build_scorer({"type": "code", "timeout_s": TIMEOUT_S, "memory_mb": 512, "workers": 4})
    start = time.monotonic()
    try:
        results = verifier.score([row(name, response) for name, response in cases.items()])
    finally:
        del os.environ["POLYFUSE_TEST_SECRET"]
    elapsed = time.monotonic() - start
    time.sleep(0.3)  # anything that escaped has had time to act
    outcome = {
        "results": dict(zip(cases, results, strict=True)),
        "elapsed": elapsed,
        "leftover": host_processes_with(TOKEN),
        "received": list(host.received),
        "host": host,
    }
    yield outcome
    host.close()
    for pid in outcome["leftover"]:  # only if a snippet escaped: do not leave it running
        os.kill(pid, 9)


def hostile_names() -> list[str]:
    class _Dummy:
        root = Path("/nonexistent")
        port = 1
        secret_file = root / "s"
        victim = root / "v"

    return list(snippets(_Dummy()))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", hostile_names())
def test_hostile_snippet_fails_and_is_contained(scored, name):
    verdict, details = scored["results"][name]
    assert verdict is False, details
    text = json.dumps(details)
    assert SECRET not in text  # nothing read from the host reaches the data
    assert details["duration_s"] < TIMEOUT_S + 3.0, details  # nothing holds the scorer past the limit
    assert details["isolation"].startswith("bwrap")


def test_nothing_outside_the_sandbox_was_touched(scored):
    host = scored["host"]
    assert host.victim.read_text() == "intact"
    assert sorted(p.name for p in host.root.iterdir()) == ["secret.txt", "victim.txt"]
    src = Path(__file__).resolve().parents[1] / "src" / "polyfuse" / "__init__.py"
    assert "pwned" not in src.read_text()
    for path in (Path.home() / f"planted-{TOKEN}", Path(f"/usr/planted-{TOKEN}"), Path(f"/planted-{TOKEN}")):
        assert not path.exists()


def test_no_connection_reached_the_host(scored):
    assert scored["received"] == []


def test_no_process_outlives_its_sandbox(scored):
    assert scored["leftover"] == []


def test_the_scorer_survives_and_finishes_in_time(scored):
    # 38 snippets, a few of which run into the time limit, 4 at a time
    assert scored["elapsed"] < 60
    assert os.getppid() > 1


def test_memory_spread_over_forks_is_capped_for_the_whole_sandbox(scored):
    _, details = scored["results"]["forks_to_spread_memory"]
    for alive in (2, 3, 4):  # 2 x 400 MB would exceed the sandbox's 512 MB
        assert f"holding={alive}" not in details["stderr"]


def test_forged_and_hijacked_replies_are_data_at_most(scored):
    for name in ("always_true_eq", "int_subclass_always_equal", "hijacks_the_server_encoder", "garbage_on_channel"):
        _, details = scored["results"][name]
        assert details["error"] is not None or details["failure"] is not None


def test_limits_show_as_failures(scored):
    results = scored["results"]
    for name in ("infinite_loop", "long_sleep", "ignores_sigterm"):
        assert results[name][1]["timed_out"] is True
    assert "MemoryError" in results["memory_bomb"][1]["error"]
    assert "over the" in results["huge_reply"][1]["failure"]


def test_controls(scored):
    results = scored["results"]
    assert results["control_correct"][0] is True, results["control_correct"][1]
    assert results["control_noisy_correct"][0] is True, results["control_noisy_correct"][1]
    assert "debug" in results["control_noisy_correct"][1]["stderr"]
    assert results["control_wrong"][0] is False
    assert "AssertionError" in results["control_wrong"][1]["error"]
