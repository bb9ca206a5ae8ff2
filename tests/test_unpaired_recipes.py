"""`polyfuse run recipes/cgpo-toy.yaml` end to end on the tiny toy world (CGPO: unpaired rows, M0 and source
log-probs with entropies, the consensus step, class-balanced training, evaluation), its rerun skipping every
finished stage, and KTO and FuseSFT on the same samples (the recipe pointed at another objective with `--set`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from polyfuse.data import SampleRow, UnpairedRow, read_rows
from polyfuse.data.io import read_metadata
from polyfuse.pipeline.demo import recipe_path

STAGES = ["prompts", "sample", "score", "pairs", "sft", "logprobs", "consensus", "upo", "eval"]


def overrides(cache_dir: Path) -> list[str]:
    """The recipe shrunk to the tiny world, whose barely trained models the verifiers fail on every prompt: the
    reward model labels the responses instead (the threshold is set per run, from the rewards)."""
    return ["toyworld.preset=tiny", f"toyworld.cache_dir={cache_dir}", "prompts.toyworld.per_domain=6",
            "eval.prompts.toyworld.per_domain=4", "sample.chunk_size=4", "sample.batch_size=16", "score.chunk_size=16",
            "sft.epochs=1", "sft.batch_size=4", "upo.batch_size=4", "consensus.calibration_min_rows=10",
            "eval.scorers=[{type: toyworld}]",
            'score.scorers=[{type: reward_model, name: rm, model: {path: "toyworld://reward_model"}}]']  # fmt: skip


def run(polyfuse_cli, work: Path, *extra: str) -> None:
    args = [f"--set={value}" for value in extra]
    result = polyfuse_cli("run", recipe_path("cgpo-toy.yaml"), "--work-dir", work, "-q", *args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def threshold(tiny_world, tmp_path_factory) -> float:
    """The median reward of the tiny world's samples (the same samples every run below draws: same seed)."""
    from polyfuse.pipeline.recipe import load_recipe
    from polyfuse.pipeline.runner import run_recipe

    work = tmp_path_factory.mktemp("scored")
    recipe = load_recipe(recipe_path("cgpo-toy.yaml"), [*overrides(tiny_world.root.parent), "stages=[prompts, sample, score]"])
    run_recipe(recipe, work, quiet=True)
    return statistics.median(r.rewards["rm"] for r in read_rows(work / "score" / "scored.jsonl", SampleRow))


@pytest.fixture(scope="module")
def cgpo_run(tiny_world, threshold, tmp_path_factory):
    """One run of the recipe in process (the tests below run `polyfuse run` itself)."""
    from polyfuse.pipeline.recipe import load_recipe
    from polyfuse.pipeline.runner import run_recipe

    work = tmp_path_factory.mktemp("cgpo")
    settings = [*overrides(tiny_world.root.parent), f"pairs.unpaired.threshold={threshold}"]
    run_recipe(load_recipe(recipe_path("cgpo-toy.yaml"), settings), work, quiet=True)
    return work, settings


def test_cgpo_recipe_runs_every_stage_and_trains_on_the_rows_outside_the_calibration_split(cgpo_run, threshold):
    work, _ = cgpo_run
    for stage in STAGES:
        assert json.loads((work / stage / "manifest.json").read_text())["status"] == "done", stage
    samples = {r.id: r for r in read_rows(work / "score" / "scored.jsonl", SampleRow)}
    rows = read_rows(work / "pairs" / "unpaired.jsonl", UnpairedRow)
    report = json.loads((work / "pairs" / "report.json").read_text())
    assert len(rows) == report["unpaired_rows"] == report["unpaired_desirable"] + report["unpaired_undesirable"]
    assert report["unpaired_desirable"] > 0 and report["unpaired_undesirable"] > 0
    for row in rows:
        assert row.label == ("D" if samples[row.sample_id].rewards["rm"] >= threshold else "U")
        assert row.kl_completion is not None  # CGPO's anchors, set from the recipe's objective
    scored = read_rows(work / "logprobs" / "unpaired.jsonl", UnpairedRow)
    sources = [s["name"] for s in read_metadata(work / "logprobs" / "unpaired.jsonl")["sources"]]
    assert len(sources) == 3 and len(scored) == len(rows)
    assert all(len(r.fuse_completion_entropy) == 3 and all(0 <= h <= 1 for h in r.fuse_completion_entropy) for r in scored)
    assert all(r.ref_mean_kl_completion_logps is not None for r in scored)
    training = read_rows(work / "consensus" / "unpaired.jsonl", UnpairedRow)
    calibration = read_rows(work / "consensus" / "calibration.jsonl", UnpairedRow)
    assert len(training) + len(calibration) == len(rows) and calibration
    assert not {r.prompt_id for r in training} & {r.prompt_id for r in calibration}
    assert all(r.aligned_consensus is not None and len(r.source_weights) == 3 for r in training)
    summary = json.loads((work / "upo" / "model" / "polyfuse_training.json").read_text())
    assert summary["objective"]["reference"] == "label_conditional" and summary["sources"] == sources
    assert summary["examples"] == len(training)
    assert any("cgpo/u_coefficient" in entry for entry in summary["log_history"])
    results = json.loads((work / "eval" / "results.json").read_text())
    assert list(results)[-2:] == ["pivot+SFT", "pivot+SFT+CGPO"]
    assert "unpaired_rows" in json.loads((work / "report.json").read_text())["pairs"]


def test_a_rerun_skips_every_finished_stage(cgpo_run, polyfuse_cli):
    work, settings = cgpo_run
    before = {s: (work / s / "manifest.json").stat().st_mtime_ns for s in STAGES}
    run(polyfuse_cli, work, *settings)
    assert {s: (work / s / "manifest.json").stat().st_mtime_ns for s in STAGES} == before


@pytest.mark.parametrize("objective", ["kto", "fusesft"])
def test_the_recipe_trains_kto_and_fusesft_on_the_same_samples(cgpo_run, polyfuse_cli, tmp_path, objective):
    """The other objectives on the same samples: KTO on every unpaired row (TRL's rotation of the KL completions,
    M0's columns from logprobs), FuseSFT on every row with a reward (no verifier failed any: no logprobs needed)."""
    work, settings = cgpo_run
    stages = "[prompts, sample, score, pairs, sft, logprobs, upo, eval]" if objective == "kto" else \
        "[prompts, sample, score, pairs, sft, upo, eval]"
    run(polyfuse_cli, tmp_path, *settings, f"upo.objective={objective}", f"stages={stages}", "eval.models=[upo]")
    samples = read_rows(tmp_path / "sample" / "samples.jsonl", SampleRow)
    assert [s.id for s in samples] == [s.id for s in read_rows(work / "sample" / "samples.jsonl", SampleRow)]
    rows = read_rows(tmp_path / "pairs" / "unpaired.jsonl", UnpairedRow)
    summary = json.loads((tmp_path / "upo" / "model" / "polyfuse_training.json").read_text())
    assert summary["examples"] == len(rows)  # every unpaired row trains: no calibration split, no row dropped
    if objective == "kto":
        meta = read_metadata(tmp_path / "pairs" / "unpaired.jsonl")["unpaired"]
        assert (meta["kl_completion"], meta["kl_block"]) == ("rotation", 4) and summary["objective"]["beta"] == 0.1
    else:
        assert all(r.kl_completion is None for r in rows) and summary["fusesft_rows"] == len(rows)
    assert list(json.loads((tmp_path / "eval" / "results.json").read_text())) == [f"pivot+SFT+{objective.upper()}"]
