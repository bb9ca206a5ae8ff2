"""The sandbox itself: the data form that crosses it, calls and their failures, limits, script mode,
the isolation it reports, and the refusal to run without bubblewrap unless `unsafe_local` is set."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from fractions import Fraction

import pytest

from polyfuse.data import SampleRow
from polyfuse.errors import ConfigError
from polyfuse.scorers import build_scorer, sandbox_host
from polyfuse.scorers.sandbox import CandidateError, Limits, Sandbox, SandboxFailure, run_script
from polyfuse.scorers.sandbox_wire import WireError, from_wire, to_wire


def code_row(response: str) -> SampleRow:
    return SampleRow(
        id="t", prompt='def total(xs):\n    """Sum."""\n', domain="code", entry_point="total", prompt_id="t",
        tests="def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n",
        model="m", sample_index=0, response=response,
    )


# Skipped only off CI: CI installs bubblewrap, so a missing sandbox there is a failure, not a skip.
needs_bwrap = pytest.mark.skipif(
    sandbox_host.isolation_problem() is not None and not os.environ.get("CI"), reason="no bubblewrap sandbox here"
)
FAST = Limits(timeout_s=5)


def round_trip(value):
    import json

    return from_wire(json.dumps(to_wire(value)))


def test_plain_data_round_trips_with_its_types():
    value = [None, True, 0, -(10**30), 1.5, "é\ud800", b"\x00\xff", (1, (2,)), {1, "a"}, frozenset({3}), {(1, 2): [3], 4: {}}, 2j]
    back = round_trip(value)
    assert back == value and [type(v) for v in back] == [type(v) for v in value]
    nan, inf = round_trip([math.nan, -math.inf])
    assert math.isnan(nan) and inf == -math.inf
    assert round_trip(Fraction(1, 4)) == 0.25 and type(round_trip(Fraction(1, 4))) is float
    assert round_trip([(), []]) == [(), []] and type(round_trip(())) is tuple


def test_objects_do_not_cross():
    class Always:
        def __eq__(self, other):
            return True

    for value in (Always(), object(), print, iter([1]), [Always()]):
        with pytest.raises(TypeError, match="not plain data"):
            to_wire(value)


def test_subclasses_become_their_plain_base():
    class Sneaky(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    class Text(str):
        pass

    back = round_trip([Sneaky(3), Text("a")])
    assert back == [3, "a"] and type(back[0]) is int and type(back[1]) is str
    assert back[0] != 4


@pytest.mark.parametrize(
    "text",
    ['{"evil": 1}', '{"tuple": 1}', '{"dict": [[1]]}', '{"set": [[1]]}', '{"complex": ["a", 1]}', "[" * 100000, "nope"],
)
def test_malformed_or_untagged_data_is_refused(text):
    with pytest.raises(WireError):
        from_wire(text)


@needs_bwrap
def test_calls_return_plain_values_and_raise_builtin_errors():
    with Sandbox(FAST) as box:
        box.load("def f(x, y=1):\n    return (x * y, [x])\ndef g():\n    raise ValueError('bad')\nclass E(Exception):\n    pass\ndef h():\n    raise E('mine')\n")
        assert box.call("f", 3, y=2) == (6, [3])
        with pytest.raises(ValueError, match="bad"):
            box.call("g")
        with pytest.raises(CandidateError, match="E: mine"):
            box.call("h")
        assert box.resolve(["f", "nope"]) == {"f": ("callable",), "nope": ("missing",)}
        assert box.function("f")(2) == (2, [2])
    report = box.close()
    assert report.failure is None and report.isolation.startswith("bwrap")


@needs_bwrap
def test_a_call_past_the_time_limit_fails_the_sandbox_and_it_stays_dead():
    with Sandbox(Limits(timeout_s=1)) as box:
        box.load("def spin():\n    while True:\n        pass\ndef ok():\n    return 1\n")
        with pytest.raises(SandboxFailure, match="timed out"):
            box.call("spin")
        with pytest.raises(SandboxFailure):
            box.call("ok")
    report = box.close()
    assert report.timed_out and report.duration_s < 3


@needs_bwrap
def test_inside_the_sandbox():
    probe = (
        "import os, socket\n"
        "def facts():\n"
        "    try:\n        open('/usr/x', 'w')\n        usr = 'writable'\n    except OSError:\n        usr = 'read-only'\n"
        "    return {'uid': os.getuid(), 'cwd': os.getcwd(), 'root': sorted(os.listdir('/')), 'env': dict(os.environ),\n"
        "            'pids': sorted(p for p in os.listdir('/proc') if p.isdigit()), 'usr': usr,\n"
        "            'fds': sorted(os.listdir('/proc/self/fd')),\n"
        "            'hostname': socket.gethostname()}\n"
    )
    with Sandbox(FAST) as box:
        box.load(probe)
        facts = box.call("facts")
    assert facts["uid"] == 65534 and facts["cwd"] == "/tmp" and facts["usr"] == "read-only"
    system = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "dev", "proc", "tmp"}
    # no /etc, /home or host files: besides the system, only the way to the Python installation
    assert all(sys.base_prefix.startswith(f"/{entry}/") for entry in set(facts["root"]) - system), facts["root"]
    assert set(facts["env"]) == {"PATH", "LANG", "HOME", "TMPDIR", "PWD"}
    assert len(facts["pids"]) <= 3  # bwrap's init, the interpreter (and the listing process itself)
    assert facts["fds"] == ["0", "1", "2", "3", "4"]  # stdio, the channel, and listdir's own
    assert facts["hostname"] == "sandbox"


@needs_bwrap
def test_output_is_capped_and_drained():
    with Sandbox(Limits(timeout_s=5, max_output_bytes=4096)) as box:
        box.load("print('x' * 1_000_000)\ndef f():\n    return 'the end'\n")
        assert box.call("f") == "the end"
    report = box.close()
    assert report.output_truncated and report.stdout == "x" * 4096


@needs_bwrap
def test_script_mode_feeds_stdin_and_reports_exit_status():
    code, report = run_script("import sys\nprint(sum(map(int, sys.stdin.read().split())))\n", "1 2 3\n", FAST)
    assert (code, report.stdout) == (0, "6\n")
    code, report = run_script("raise SystemExit(3)\n", "", FAST)
    assert code == 3
    code, report = run_script("while True:\n    pass\n", "", Limits(timeout_s=1))
    assert code is None and report.timed_out


def test_without_bubblewrap_the_scorer_refuses_unless_unsafe_local(monkeypatch):
    monkeypatch.setattr(sandbox_host, "isolation_problem", lambda: "bubblewrap (`bwrap`) is not installed")
    rows_verifier = build_scorer({"type": "code", "timeout_s": 5})
    with pytest.raises(ConfigError, match="unsafe_local"):
        rows_verifier.check(code_row("def total(xs):\n    return sum(xs)\n"))
    unsafe = build_scorer({"type": "code", "timeout_s": 5, "unsafe_local": True})
    verdict, details = unsafe.check(code_row("def total(xs):\n    return sum(xs)\n"))
    assert verdict is True and details["isolation"] == "unsafe-local"


FORGERIES = {  # verdict forgeries only: escapes are never run unsandboxed
    "status_pipe": "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'done\\n')\n    except OSError:\n        pass\nos._exit(0)\n",
    "python_O": "import os, sys\nif not sys.flags.optimize:\n    os.execv(sys.executable, [sys.executable, '-O'] + sys.orig_argv[1:])\n",
    "always_equal": "class A:\n    def __eq__(self, o):\n        return True\n",
    "exit_zero": "import sys\nsys.exit(0)\n",
}


@pytest.mark.parametrize("name", FORGERIES)
def test_unsafe_local_still_decides_the_verdict_outside(name):
    unsafe = build_scorer({"type": "code", "timeout_s": 5, "unsafe_local": True})
    body = "    return A()\n" if name == "always_equal" else "    return len(xs)\n"
    verdict, details = unsafe.check(code_row(f"{FORGERIES[name]}\ndef total(xs):\n{body}"))
    assert verdict is False and details["isolation"] == "unsafe-local"
    assert not os.path.exists("main.py")


def test_evaluation_refuses_before_loading_the_model(monkeypatch):
    from polyfuse.evaluation import default_verifiers, evaluate, load_humaneval
    from polyfuse.models import ModelSpec

    monkeypatch.setattr(sandbox_host, "isolation_problem", lambda: "bubblewrap (`bwrap`) is not installed")
    missing = ModelSpec(path="/nonexistent/model")  # loading it would fail with another error
    with pytest.raises(ConfigError, match="refuses to run model-written code"):
        evaluate(missing, load_humaneval(limit=2), default_verifiers(), quiet=True)
    assert any(v.config.unsafe_local for v in default_verifiers(unsafe_local_code=True) if v.name == "code")


@needs_bwrap
def test_without_a_cgroup_the_pid_namespace_still_takes_every_process_down(monkeypatch):
    token = f"polyfuse-nocgroup-{os.getpid()}"
    monkeypatch.setattr(sandbox_host, "cgroup_base", lambda: None)
    with Sandbox(Limits(timeout_s=5)) as box:
        box.load(
            "import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {token!r}])\n"
        )
        assert box.isolation == "bwrap+rlimit"
    box.close()
    time.sleep(0.3)
    alive = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and token.encode() in open(f"/proc/{entry}/cmdline", "rb").read():
                alive.append(entry if "State:\tZ" not in open(f"/proc/{entry}/status").read() else None)
        except OSError:
            pass
    assert [a for a in alive if a] == []


NETWORK_PROBE = (
    "import json, socket\n"
    "def network(port):\n"
    "    try:\n"
    "        socket.create_connection(('127.0.0.1', port), timeout=1).close()\n"
    "        reached = True\n"
    "    except OSError:\n"
    "        reached = False\n"
    "    return {'interfaces': sorted(name for _, name in socket.if_nameindex()), 'reached': reached}\n"
)


@pytest.mark.parametrize("protocol", ["serve", "script"])
@pytest.mark.parametrize("unsafe_local", [False, True], ids=["bwrap", "unsafe_local"])
def test_every_mode_cuts_the_network(unsafe_local, protocol):
    """Isolation and protocol are independent: the network is cut in both protocols of both isolations
    (for unsafe_local wherever the kernel gives this user a network namespace, as documented; otherwise
    it sees the host's interfaces and the probe says so)."""
    if not unsafe_local and sandbox_host.isolation_problem() is not None and not os.environ.get("CI"):
        pytest.skip("no bubblewrap sandbox here")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    with listener:
        if protocol == "serve":
            with Sandbox(FAST, unsafe_local=unsafe_local) as box:
                box.load(NETWORK_PROBE)
                seen = box.call("network", port)
        else:
            code, report = run_script(NETWORK_PROBE + f"print(json.dumps(network({port})))\n", "", FAST, unsafe_local)
            assert code == 0, report.stderr
            seen = json.loads(report.stdout)
        try:
            listener.accept()[0].close()
            accepted = True
        except TimeoutError:
            accepted = False
    host_interfaces = sorted(name for _, name in socket.if_nameindex())
    cut = not unsafe_local or sandbox_host.network_namespace_available()
    assert seen == ({"interfaces": ["lo"], "reached": False} if cut else {"interfaces": host_interfaces, "reached": True})
    assert accepted is not cut
