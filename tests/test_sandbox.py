"""The sandbox: time, memory and output limits, a throw-away working directory, no environment, no
network where the kernel allows, and only programs that run to their end pass."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from polyfuse.scorers.sandbox import run_sandboxed


def test_a_clean_program_passes_and_its_output_comes_back():
    result = run_sandboxed("import sys\nprint('out')\nprint('err', file=sys.stderr)\n")
    assert (result.passed, result.returncode, result.timed_out) == (True, 0, False)
    assert (result.stdout, result.stderr) == ("out\n", "err\n")


def test_an_infinite_loop_is_killed_at_the_time_limit():
    start = time.monotonic()
    result = run_sandboxed("while True:\n    pass\n", timeout_s=1.0)
    assert time.monotonic() - start < 3.0
    assert result.timed_out and not result.passed and result.returncode is None


def test_a_memory_bomb_fails_with_memory_error():
    result = run_sandboxed("block = bytearray(2 * 1024 ** 3)\nprint('allocated')\n", memory_mb=256)
    assert not result.passed and not result.timed_out
    assert result.returncode == 1 and "MemoryError" in result.stderr and result.stdout == ""


def test_output_is_capped_but_the_program_still_finishes():
    result = run_sandboxed("print('x' * 1_000_000)\nprint('the end')\n", max_output_bytes=4096)
    assert result.passed and result.output_truncated
    assert result.stdout == "x" * 4096


def test_files_are_written_in_a_temporary_directory_that_is_deleted():
    code = "import os\nopen('scratch.txt', 'w').write('data')\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\n"
    result = run_sandboxed(code)
    workdir, listing = result.stdout.splitlines()
    assert result.passed and listing == "['main.py', 'scratch.txt']"
    assert (
        Path(workdir).name.startswith("polyfuse-sandbox-") and Path(workdir).resolve() != Path.cwd().resolve()
    )
    assert not Path(workdir).exists()


def test_early_exit_with_status_zero_does_not_pass():
    for code in ("import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\n"):
        result = run_sandboxed(code)
        assert result.returncode == 0 and not result.passed


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("POLYFUSE_SECRET_TOKEN", "hunter2")
    result = run_sandboxed("import os\nprint(sorted(os.environ))\n")
    assert result.passed and "POLYFUSE_SECRET_TOKEN" not in result.stdout and "hunter2" not in result.stdout


def test_children_left_running_are_killed_with_the_group():
    code = "import subprocess\nprint(subprocess.Popen(['sleep', '60']).pid)\n"
    result = run_sandboxed(code)
    pid = int(result.stdout)
    status = Path(f"/proc/{pid}/status")
    # Gone, or a zombie waiting for init to reap it: either way not running.
    assert not status.exists() or "State:\tZ" in status.read_text()


def test_network_is_unreachable_when_isolation_is_reported():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        port = server.getsockname()[1]
        result = run_sandboxed(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
    finally:
        server.close()
    # In a new network namespace the host's listening socket does not exist; without one it does.
    assert result.passed is (not result.network_isolated)
