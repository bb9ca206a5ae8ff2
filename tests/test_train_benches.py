"""The training benches' smoke modes (issue 23, item 8): `bench/po_step_speed.py --smoke` and
`bench/sft_speed.py --smoke` run end to end on a tiny model against TRL in the same run, so the
reproduce commands of docs/performance.md keep working; `--help` says that they need TRL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                          timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_po_step_speed_smoke(tmp_path):
    assert "Needs TRL 1.16" in run_bench("po_step_speed.py", "--help")
    out = run_bench("po_step_speed.py", "--smoke", "--threads", "1", "--tools", "polyfuse:dpo,trl",
                    "--workdir", str(tmp_path))  # fmt: skip
    assert re.search(r"polyfuse:dpo +wall [\d.]+ s, CPU [\d.]+ s per step .*shared_prompt", out), out
    assert re.search(r"trl +wall [\d.]+ s, CPU [\d.]+ s per step .*precompute_ref_log_probs", out), out
    assert re.search(r"polyfuse:dpo / trl \(precompute_ref_log_probs\), CPU time per step = [\d.]+", out), out
    assert re.search(r"dense matmul: median [\d.]+ GFLOP/s of wall time", out), out
    assert re.search(r"model [\d.]+ GFLOP per CPU s = [\d.]+% of the matmul's", out), out


@pytest.mark.slow
def test_sft_speed_smoke(tmp_path):
    assert "Needs TRL 1.16" in run_bench("sft_speed.py", "--help")
    out = run_bench("sft_speed.py", "--smoke", "--threads", "1", "--tools", "polyfuse,trl:padding_free",
                    "--workdir", str(tmp_path))  # fmt: skip
    assert re.search(r"polyfuse +[\d.]+ tokens per CPU s; wall .*packed", out), out
    assert re.search(r"trl:padding_free +[\d.]+ tokens per CPU s; wall .*padding_free", out), out
    assert re.search(r"polyfuse / trl:padding_free, tokens per CPU second = [\d.]+", out), out
