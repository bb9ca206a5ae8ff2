"""The fair-protocol runner (`bench/gym_protocol.py`, issue 21 items 4 and 6): its smoke run writes one evidence
file per family in the spec's shape, whose every comparison is the paired difference of its runs with an interval
around it, prints the hypotheses table, and a rerun redoes nothing; validation and test items are disjoint."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import warm_python
from polyfuse.data.io import write_rows
from polyfuse.data.schemas import PreferenceRow
from polyfuse.evaluation.evidence import read_evidence, recompute
from polyfuse.evaluation.stats import ItemScores
from polyfuse.models import ModelSpec

BENCH = Path(__file__).resolve().parents[1] / "bench"
FAMILIES = {
    "implicit": {"pivot", "sft", "oracle", "fusechat-dpo", "dpo", "wrpo", "infifpo-max-margin", "infifpo-confidence",
                 "infifpo-average", "infifpo-no-clip", "infifpo-no-ln"},
    "merge": {"base", "specialists", "multitask", "linear", "task_arithmetic", "ties", "rsaf", "ties-matched"},
    "distill": {"pivot", "oracle", "sft-gold", "uld-uncertainty", "uld-average", "fusellm-min-ce"},
    "unpaired": {"pivot", "sft", "oracle", "cgpo", "kto", "cgpo-policy-anchored", "cgpo-consensus-anchored",
                 "cgpo-no-warmup", "cgpo-no-calibration"},
    "onpolicy": {"pivot", "oracle", "sft-gold", "offpolicy-xtoken", "onpolicy-xtoken", "onpolicy-one-teacher",
                 "onpolicy-gold", "onpolicy-uld", "onpolicy-hybrid"},
}
BASELINES = {"implicit": ["sft", "dpo"], "merge": ["specialists", "multitask"], "distill": ["sft-gold"],
             "unpaired": ["sft", "pivot", "cgpo"], "onpolicy": ["sft-gold"]}


def smoke(tmp_path: Path, *options: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = warm_python.run([BENCH / "gym_protocol.py", "--smoke", "--cgpo-ablations", "--work-dir", tmp_path / "work",
                            "--out", tmp_path / "evidence", *options], env=env, timeout=900)  # as the script
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_smoke_writes_evidence_and_resumes(tmp_path, monkeypatch):
    out = smoke(tmp_path)
    for family, methods in FAMILIES.items():
        path = tmp_path / "evidence" / f"tiny-{family}.json"
        assert set(json.loads(path.read_text())) == {"experiment", "items", "runs", "comparisons", "bpb_comparisons", "protocol",
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
    uld = json.loads((tmp_path / "evidence" / "tiny-distill-uld.json").read_text())  # what ULD's weights do there
    assert set(uld["students"]) == {"pivot", "sft-gold", "uld-uncertainty", "uld-average", "fusellm-min-ce"}
    for found in uld["teachers"].values():
        for weighting in ("uncertainty", "average"):  # per position the weights sum to 1 (0 where none is aligned)
            total = sum(t[f"weight_{weighting}"] for t in found["teachers"].values())
            assert total == pytest.approx(1 - found["no_teacher_aligned"] / found["positions"], abs=2e-3)
    verdicts = dict(re.findall(r"^\| (H\d+) \| .* \| (held|not held|inconclusive|not run) \|$", out, re.M))
    assert list(verdicts) == [f"H{k}" for k in range(1, 13)]
    written = (tmp_path / "evidence" / "tiny-hypotheses.md").read_text()
    assert dict(re.findall(r"^\| (H\d+) \| .* \| (held|not held|inconclusive|not run) \|$", written, re.M)) == verdicts
    assert all(v != "not run" for v in verdicts.values()), verdicts
    distill, onpolicy = (json.loads((tmp_path / "evidence" / f"tiny-{f}.json").read_text()) for f in ("distill", "onpolicy"))
    shared = {(r["seed"], r["domain"]): r["correct"] for r in distill["runs"] if r["method"] == "sft-gold"}
    assert shared == {(r["seed"], r["domain"]): r["correct"] for r in onpolicy["runs"] if r["method"] == "sft-gold"}
    unpaired = next((tmp_path / "work").glob("tiny-*/unpaired/data/seed0"))

    def taken(run: Path, stage: str, source: Path) -> bool:  # the stage cache gave `run` the stage `source` has
        manifest, origin = (json.loads((f / stage / "manifest.json").read_text()) for f in (run, source))
        return ("reused_from" in manifest and manifest["fingerprint"] == origin["fingerprint"]
                and manifest["status"] == "done")

    for stage in ("prompts", "sample", "score", "sft"):  # KTO's data run took CGPO's (hard links), never redid them
        assert taken(unpaired / "kto", stage, unpaired / "cgpo")
    for stage in ("prompts", "sample", "score", "pairs", "sft", "logprobs"):  # no calibration: CGPO's rows, scores
        assert taken(unpaired / "cgpo-no-calibration", stage, unpaired / "cgpo")
    implicit = unpaired.parents[2] / "implicit" / "data" / "seed0"  # samples the pivot too: the sources' shards shared
    shards = sorted((unpaired / "cgpo" / "sample" / "shards").glob("*.jsonl"))
    assert shards and all(p.stat().st_ino == (implicit / "sample" / "shards" / p.name).stat().st_ino for p in shards)
    plain, calibrated = (json.loads((unpaired / run / "consensus" / "consensus.json").read_text())
                         for run in ("cgpo-no-calibration", "cgpo"))
    assert (plain["settings"]["aggregation"], calibrated["settings"]["aggregation"]) == ("mean", "calibrated_entropy")
    assert plain["calibration"]["prompts"] == calibrated["calibration"]["prompts"]  # the same rows left to train on
    sources = len(plain["summary"]["sources"])
    assert [plain["summary"][f"source_weight/{i}"] for i in range(sources)] == pytest.approx([1 / sources] * sources)
    for variant, changed in {"policy-anchored": ("reference", "policy_anchored"),
                             "no-warmup": ("undesirable_warmup_steps", 0)}.items():  # one change, CGPO's rate
        (run,) = unpaired.parents[1].glob(f"cgpo-{variant}/*/seed0/model/polyfuse_training.json")
        config = json.loads(run.read_text())["config"]
        assert config["objective_args"][changed[0]] == changed[1] and config["objective"] == "cgpo"
        assert run.parts[-4] == next(unpaired.parents[1].glob("cgpo/*/seed0")).parts[-2]
    before = {p: p.read_bytes() for p in (tmp_path / "evidence").glob("*.json")}
    again = smoke(tmp_path)
    assert not re.search(r"\] (\w+: trained|evaluate) ", again), again  # no training, no evaluation
    assert {p: p.read_bytes() for p in before} == before
    monkeypatch.syspath_prepend(str(BENCH))
    import gym_protocol

    workers = smoke(tmp_path / "jobs", "--jobs", "2")  # two workers: the same runs, chosen rates and intervals
    assert workers.count("worker: ") == 2 * len(gym_protocol.work_units(list(FAMILIES), None)), workers
    for path in before:
        if path.name.endswith("-uld.json"):
            continue
        serial, parallel = (json.loads(p.read_text()) for p in (path, tmp_path / "jobs" / "evidence" / path.name))
        assert parallel["runs"] == serial["runs"] and parallel["comparisons"] == serial["comparisons"], path.name
        assert ({m: c.get("learning_rate") for m, c in parallel["protocol"]["chosen"].items()}
                == {m: c.get("learning_rate") for m, c in serial["protocol"]["chosen"].items()})
    assert (tmp_path / "jobs" / "evidence" / "tiny-hypotheses.md").read_text() == written
    (root,) = (tmp_path / "work").glob("tiny-*")  # the cost benches' smoke runs, on this finished protocol run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for script, options in {"gym_protocol_costs.py": [], "gym_overheads_check.py": ["eval"]}.items():
        out = tmp_path / f"{script}.json"
        done = warm_python.run([BENCH / script, "--smoke", "--run", root, "--scratch", tmp_path / script, "--out", out,
                                *options], env=env, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        found = json.loads(out.read_text())
        if script == "gym_protocol_costs.py":  # every component a smoke run has data for, each timed
            assert [name.split(":")[0] for name in found["cpu_s"]] == ["sample", "score", "sft", "dpo", "cgpo", "cgpo",
                                                                       "eval"]
            assert all(seconds >= 0 for seconds in found["cpu_s"].values())
        else:  # the tokenising memo off, cold and warm give the same evaluation records
            assert found["eval"]["identical"] is True and len(found["eval"]["cpu_s memo off / first / warm"]) == 3


def test_a_model_taken_over_from_another_run_shares_its_evaluation(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gym_protocol

    protocol = gym_protocol.Protocol("tiny", [0], None, [1.0], {}, False, tmp_path / "root", tmp_path / "out")
    first, second, other = (tmp_path / run / "sft" for run in ("first", "second", "other"))
    for folder, manifest in [(first, {}), (second, {"reused_from": str(first)}), (other, {})]:
        (folder / "model").mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    path = {f: gym_protocol.eval_path(protocol, ModelSpec(path=str(f / "model")), "test") for f in (first, second, other)}
    assert path[second] == path[first] != path[other]


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


def test_tuning_picks_the_best_validation_rate_runs_only_the_asked_methods_and_records_costs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gym_protocol

    protocol = gym_protocol.Protocol("tiny", [0, 1, 2, 3, 4], None, [1.0], {"validation": 4, "test": 4}, False,
                                     tmp_path, tmp_path / "out", methods=("dpo",))
    # no --lr-scales: each family's own grid, the preference families' reaching a tenth of the recipe's rate
    assert protocol.grid("implicit") == [0.1, 0.3, 1.0] and protocol.grid("distill") == pytest.approx([1 / 9, 1 / 3, 1, 3])
    assert protocol.grid("merge") == pytest.approx([1 / 3, 1, 3]) and len(protocol.grid("onpolicy")) == 6
    assert dataclasses.replace(protocol, lr_scales=[2.0]).grid("implicit") == [2.0]
    best_lr = 3e-4 * 0.3

    def scores(protocol, spec, split):  # validation accuracy peaks at the middle rate; test is per seed
        lr = float(Path(spec.path).parts[-3].removeprefix("lr"))
        right = 3 if abs(lr - best_lr) < 1e-12 else 1
        return {"d": ItemScores(np.array([True] * right + [False] * (4 - right)), np.ones(4))}

    monkeypatch.setattr(gym_protocol, "scores", scores)
    trained = []

    def train(seed, lr, folder):  # as the benches' train: an existing model is returned as it is
        if not (folder / "model").is_dir():
            trained.append((seed, round(lr, 12)))
        (folder / "model").mkdir(parents=True, exist_ok=True)
        return folder / "model"

    family = gym_protocol.Family("implicit", protocol, lambda path: ModelSpec(path=str(path)))
    family.tuned("dpo", 3e-4, train)
    family.tuned("wrpo", 3e-4, train)  # not asked for: neither trained nor a row
    assert list(family.runs) == ["dpo"] and sorted(family.runs["dpo"]) == [0, 1, 2, 3, 4]
    chosen = family.chosen["dpo"]
    assert chosen["learning_rate"] == pytest.approx(best_lr)
    assert [v["accuracy"] for v in chosen["validation"].values()] == [25.0, 75.0, 25.0]
    # the grid at seed 0, then seeds 1-4 at the chosen rate (seed 0 at it is already trained): 7 runs, each timed
    assert trained == [(0, 3e-5), (0, 9e-5), (0, 3e-4), *((s, 9e-5) for s in (1, 2, 3, 4))]
    cost = chosen["cost"]["training"]
    assert (cost["runs"], cost["untimed"]) == (7, 0) and cost["wall_s"] >= 0 and len(cost["load_1min"]) == 2
    assert chosen["cost"]["evaluation"]["runs"] == 8  # 3 validation + 5 test evaluations (not timed here)
    family.tuned("dpo", 3e-4, train)  # a rerun trains nothing
    assert len(trained) == 7


def test_pair_stats_counts_who_wrote_the_rejected_side_and_the_margins(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gym_protocol

    rows = [PreferenceRow(id=f"p{i}", prompt="q", chosen="a", rejected="b", chosen_id=f"p{i}:src:0",
                          rejected_id=f"p{i}:{who}:1", chosen_reward=0.9, rejected_reward=reward,
                          chosen_correct=True, rejected_correct=False, ref_chosen_logps=-1.0, ref_rejected_logps=ref)
            for i, (who, reward, ref) in enumerate([("pivot", 0.5, -11.0), ("pivot", 0.7, -5.0), ("src", 0.6, -3.0)])]
    write_rows(tmp_path / "pairs.jsonl", rows)
    stats = gym_protocol.pair_stats(tmp_path / "pairs.jsonl")
    assert stats["pairs"] == 3 and stats["rejected_by"] == {"pivot": 2, "src": 1}
    assert (stats["chosen_correct"], stats["rejected_correct"]) == (1.0, 0.0)
    assert stats["reward_margin"] == pytest.approx((0.4 + 0.2 + 0.3) / 3, abs=1e-4)
    assert stats["ref_logp_margin"] == pytest.approx((10 + 4 + 2) / 3, abs=1e-4)


def test_distillation_weight_is_tuned_at_the_chosen_rate_then_every_seed_trains_the_winner(monkeypatch, tmp_path):
    # Validation accuracy by (rate, weight scale): the rate is chosen at the default weight (3 beats 1 and 9), then
    # the weight at that rate (x0.1 beats x1); every seed then trains (3, x0.1), in its own folder.
    monkeypatch.syspath_prepend(str(BENCH))
    import gym_protocol

    from polyfuse.evaluation.stats import ItemScores

    validation = {"lr1": 0.2, "lr3": 0.5, "lr9": 0.1, "lr3-kd0.1": 0.7}
    trained: list[tuple[str, int, float]] = []

    def scores(protocol, spec, split):
        grid_point = Path(spec.path).parent.parent.name
        accuracy = validation[grid_point] if split == "validation" else 0.5
        return {"d": ItemScores(np.array([True] * int(10 * accuracy) + [False] * (10 - int(10 * accuracy))),
                                np.zeros(10))}

    def train(seed, lr, folder, kd):
        trained.append((folder.parent.name, seed, kd))
        return folder / "model"

    monkeypatch.setattr(gym_protocol, "scores", scores)
    protocol = gym_protocol.Protocol("gym", [0, 1], [1.0, 3.0, 9.0], [1.0, 0.1], {"validation": 10, "test": 10},
                                     False, tmp_path, tmp_path)
    family = gym_protocol.Family("distill", protocol, lambda path: gym_protocol.ModelSpec(name="m", path=str(path)))
    family.tuned("uld", 1.0, train, kd_scales=protocol.kd_scales)
    assert trained == [("lr1", 0, 1.0), ("lr3", 0, 1.0), ("lr9", 0, 1.0), ("lr3-kd0.1", 0, 0.1),
                       ("lr3-kd0.1", 0, 0.1), ("lr3-kd0.1", 1, 0.1)]
    assert family.chosen["uld"]["learning_rate"] == 3.0 and family.chosen["uld"]["kd_scale"] == 0.1
    assert {k: v["accuracy"] for k, v in family.chosen["uld"]["validation"].items()} == {
        "1 kd x1": 20.0, "3 kd x1": 50.0, "9 kd x1": 10.0, "3 kd x0.1": 70.0}
    assert set(family.runs["uld"]) == {0, 1}


def test_distillation_weight_scale_multiplies_the_distillation_term_of_each_method(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gym_protocol

    from polyfuse.pipeline.demo import recipe_path
    from polyfuse.pipeline.recipe import load_recipe

    recipe = load_recipe(recipe_path("infifusion-unified-gym.yaml"), ["toyworld.preset=gym"])
    uld, fusellm = gym_protocol.DISTILL["uld-uncertainty"], gym_protocol.DISTILL["fusellm-min-ce"]
    assert gym_protocol.kd_scaled(uld, recipe, 1.0) == uld  # the default: the row itself, its folder unchanged
    assert gym_protocol.kd_scaled(uld, recipe, 0.1).args == {"lambda_kd": 0.1, "top_k": 10, "weighting": "uncertainty"}
    # FuseLLM: 0.9 CE + 0.1 fusion -> the fusion term's weight 0.1 * 0.1 = 0.01, CE 0.99
    assert gym_protocol.kd_scaled(fusellm, recipe, 0.1).args == {"fusion": "min_ce", "ce_weight": pytest.approx(0.99)}
