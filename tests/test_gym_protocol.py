"""The fair-protocol runner (`bench/gym_protocol.py`, issue 21 items 4 and 6): its smoke run writes one evidence
file per family in the spec's shape, whose every comparison is the paired difference of its runs with an interval
around it, prints the hypotheses table, and a rerun redoes nothing; validation and test items are disjoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from polyfuse.evaluation.evidence import read_evidence, recompute

BENCH = Path(__file__).resolve().parents[1] / "bench"
FAMILIES = {
    "implicit": {"pivot", "sft", "oracle", "fusechat-dpo", "dpo", "wrpo", "infifpo-max-margin", "infifpo-confidence",
                 "infifpo-average", "infifpo-no-clip", "infifpo-no-ln"},
    "merge": {"base", "specialists", "multitask", "linear", "task_arithmetic", "ties", "rsaf", "ties-matched"},
    "distill": {"pivot", "oracle", "sft-gold", "uld-uncertainty", "uld-average", "fusellm-min-ce"},
    "unpaired": {"pivot", "sft", "oracle", "cgpo", "kto"},
    "onpolicy": {"pivot", "oracle", "sft-gold", "offpolicy-xtoken", "onpolicy-xtoken", "onpolicy-one-teacher",
                 "onpolicy-gold", "onpolicy-uld", "onpolicy-hybrid"},
}
BASELINES = {"implicit": ["sft", "dpo"], "merge": ["specialists", "multitask"], "distill": ["sft-gold"],
             "unpaired": ["sft", "pivot"], "onpolicy": ["sft-gold"]}


def smoke(tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH / "gym_protocol.py"), "--smoke", "--work-dir",
                           str(tmp_path / "work"), "--out", str(tmp_path / "evidence")],
                          capture_output=True, text=True, env=env, timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_smoke_writes_evidence_and_resumes(tmp_path):
    out = smoke(tmp_path)
    for family, methods in FAMILIES.items():
        path = tmp_path / "evidence" / f"tiny-{family}.json"
        assert set(json.loads(path.read_text())) == {"experiment", "items", "runs", "comparisons", "bpb_comparisons",
                                                     "bootstrap"}
        evidence = read_evidence(path)  # validates every run against `items`
        assert evidence.experiment == f"tiny-{family}"
        assert evidence.items == {"arithmetic": 4, "compare": 4, "strings": 4}
        assert methods <= {r.method for r in evidence.runs}
        assert {(r.seed, r.split) for r in evidence.runs} == {(0, "test")}
        assert all(len(r.bpb) == len(r.correct) and np.isfinite(r.bpb).all() for r in evidence.runs)
        for baseline in BASELINES[family]:
            compared = {c.a for c in evidence.comparisons if c.b == baseline and c.domain == "average"}
            assert compared == {r.method for r in evidence.runs} - {baseline}
        accuracy = {(r.method, r.domain): np.mean([c == "1" for c in r.correct]) for r in evidence.runs}
        for c in evidence.comparisons:
            domains = list(evidence.items) if c.domain == "average" else [c.domain]
            by_hand = 100 * np.mean([accuracy[(c.a, d)] - accuracy[(c.b, d)] for d in domains])
            assert c.diff == pytest.approx(by_hand, abs=1e-9)
            assert c.ci95[0] <= c.diff <= c.ci95[1] and 0 <= c.p <= 1
        assert recompute(evidence) == evidence
        assert (tmp_path / "evidence" / f"tiny-{family}.png").stat().st_size > 0
    verdicts = dict(re.findall(r"^\| (H\d+) \| .* \| (held|not held|inconclusive|not run) \|$", out, re.M))
    assert list(verdicts) == [f"H{k}" for k in range(1, 13)]
    written = (tmp_path / "evidence" / "tiny-hypotheses.md").read_text()
    assert dict(re.findall(r"^\| (H\d+) \| .* \| (held|not held|inconclusive|not run) \|$", written, re.M)) == verdicts
    assert all(v != "not run" for v in verdicts.values()), verdicts
    distill, onpolicy = (json.loads((tmp_path / "evidence" / f"tiny-{f}.json").read_text()) for f in ("distill", "onpolicy"))
    shared = {(r["seed"], r["domain"]): r["correct"] for r in distill["runs"] if r["method"] == "sft-gold"}
    assert shared == {(r["seed"], r["domain"]): r["correct"] for r in onpolicy["runs"] if r["method"] == "sft-gold"}
    unpaired = next((tmp_path / "work").glob("tiny-*/unpaired/data/seed0"))
    for stage in ("prompts", "sample", "score", "sft"):  # KTO's data run took CGPO's (hard links), never redid them
        assert (unpaired / "kto" / stage / "manifest.json").read_bytes() == (unpaired / "cgpo" / stage /
                                                                             "manifest.json").read_bytes()
    before = {p: p.read_bytes() for p in (tmp_path / "evidence").glob("*.json")}
    again = smoke(tmp_path)
    assert not re.search(r"\] (\w+: trained|evaluate) ", again), again  # no training, no evaluation
    assert {p: p.read_bytes() for p in before} == before


def test_validation_and_test_items_are_disjoint_held_out_items(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gym_protocol

    validation, test = (gym_protocol.eval_items("tiny", split, 20) for split in ("validation", "test"))
    assert not {r.id for r in validation} & {r.id for r in test}
    for rows in (validation, test):
        assert {d: sum(r.domain == d for r in rows) for d in ("arithmetic", "compare", "strings")} == dict.fromkeys(
            ("arithmetic", "compare", "strings"), 20)
    held_out = {r.id for r in gym_protocol.world("tiny").prompts("heldout", per_domain=40, seed=0)}
    assert {r.id for r in (*validation, *test)} == held_out
