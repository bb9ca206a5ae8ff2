"""`polyfuse` with a kill point, for the kill tests (test-only: no production code is involved).

Every rename (`os.replace`, `os.rename`: the commit point of every atomic write) is appended to a log. With
a kill point, the process SIGKILLs itself just before the first rename whose destination ends with
`kill_before` and, when `contains` is given, whose source (the finished temporary file) holds that text
(e.g. a manifest's `"status": "done"`): the temporary file or folder of that write is then complete but
never renamed into place.

Or the kill point is the n-th rename of the run (`kill_at`), as `bench/kill_suite.py` uses it.

`launch` runs the command in a child of a fork server that has imported torch, transformers and polyfuse
once (`warm_python`), so a kill-and-rerun costs the work, not the imports.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile

from warm_python import fork_server


def install(kill_before: str | None, contains: str | None, log: str | None, kill_at: int | None = None) -> None:
    """Watch every rename; the kill point is `kill_before` (and `contains`), or the `kill_at`-th rename."""
    count = 0

    def is_target(src, dst) -> bool:
        nonlocal count
        count += 1
        if kill_at is not None:
            return count == kill_at
        if not kill_before or not os.fspath(dst).endswith(kill_before):
            return False
        if contains is None:
            return True
        with open(src, encoding="utf-8", errors="replace") as handle:
            return contains in handle.read()

    def watched(rename):
        def renamed(src, dst, *args, **kwargs):
            if log:
                with open(log, "a") as handle:
                    handle.write(os.fspath(dst) + "\n")
            if is_target(src, dst):
                os.kill(os.getpid(), signal.SIGKILL)
            return rename(src, dst, *args, **kwargs)

        return renamed

    os.replace, os.rename = watched(os.replace), watched(os.rename)


def _child(argv: list[str], kill_before: str | None, contains: str | None, log: str | None, output: str,
           kill_at: int | None) -> None:
    install(kill_before, contains, log, kill_at)
    sys.stdout = sys.stderr = open(output, "w")  # noqa: SIM115  (for the child's whole life)
    from polyfuse.cli.main import main

    main(argv)


def launch(argv: list[str], kill_before: str | None = None, contains: str | None = None, log: str | None = None,
           kill_after_s: float | None = None, kill_at: int | None = None, timeout_s: float = 600) -> int:
    """Run `polyfuse ARGV` with the kill point (see `install`); returns the exit code: 0, or -9 when killed (at
    the kill point, or after `kill_after_s` seconds: a random kill). Anything else raises, with the output."""
    handle, output = tempfile.mkstemp(prefix="polyfuse-kill-", suffix=".out")
    os.close(handle)
    process = fork_server().Process(target=_child, args=(argv, kill_before, contains, log, output, kill_at))
    process.start()
    process.join(kill_after_s if kill_after_s is not None else timeout_s)
    if process.exitcode is None:
        process.kill()
        process.join()
        if kill_after_s is None:
            raise TimeoutError(f"polyfuse {' '.join(argv)} ran over {timeout_s}s")
    with open(output) as handle:
        text = handle.read()
    os.unlink(output)
    if process.exitcode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"polyfuse {' '.join(argv)} exited with {process.exitcode}:\n{text[-3000:]}")
    return process.exitcode

