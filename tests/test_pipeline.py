"""The FuseChat-3.0 recipe end to end on the tiny toy world: manifests, skipping finished stages,
and a run killed at any point that, rerun, gives the same result with no duplicated or lost rows."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

import warm_python
from polyfuse.data import PreferenceRow, SampleRow, SFTRow, read_rows
from polyfuse.data.io import read_metadata
from polyfuse.pipeline.demo import TINY_OVERRIDES, recipe_path
from polyfuse.pipeline.recipe import load_recipe
from polyfuse.pipeline.runner import run_recipe

STAGES = ["prompts", "sample", "score", "pairs", "sft", "logprobs", "po", "eval"]


def tiny_overrides(cache_dir: Path) -> list[str]:
    """The demo recipe, shrunk as `polyfuse demo --preset tiny` shrinks it, with the test session's cache."""
    return ["toyworld.preset=tiny", f"toyworld.cache_dir={cache_dir}", *TINY_OVERRIDES]


def tiny_world_sources() -> list[str]:
    from polyfuse.toyworld import ToyWorldConfig

    return [s.name for s in ToyWorldConfig.preset("tiny").sources]


def digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(digest(p).encode() for p in sorted(path.rglob("*.safetensors")))).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(work: Path) -> dict[str, str]:
    return {name: digest(work / name) for name in [
        "sample/samples.jsonl", "score/scored.jsonl", "pairs/sft.jsonl", "pairs/preference.jsonl",
        "logprobs/preference.jsonl", "sft/model", "po/model", "eval/results.json",
    ]}


@pytest.fixture(scope="module")
def reference_run(tiny_world, tmp_path_factory):
    """One uninterrupted run of the tiny recipe, in process."""
    work = tmp_path_factory.mktemp("reference")
    recipe = load_recipe(recipe_path("fusechat3-toy.yaml"), tiny_overrides(tiny_world.root.parent))
    run_recipe(recipe, work, quiet=True)
    return work


def test_every_stage_leaves_a_manifest_and_consistent_rows(reference_run):
    work = reference_run
    for stage in STAGES:
        manifest = json.loads((work / stage / "manifest.json").read_text())
        assert manifest["status"] == "done" and manifest["stage"] == stage
        assert manifest["versions"]["torch"] and manifest["versions"]["transformers"]
        assert manifest["config"]["seed"] == 0
    assert json.loads((work / "sample/manifest.json").read_text())["inputs"]["prompts"]
    samples = read_rows(work / "sample/samples.jsonl", SampleRow)
    assert len(samples) == 6 * 3 * 3 * 4  # per_domain x domains x sources x n
    assert len({s.id for s in samples}) == len(samples)
    scored = read_rows(work / "score/scored.jsonl", SampleRow)
    assert [s.id for s in scored] == [s.id for s in samples]
    assert all(set(s.rewards) == {"rm"} for s in scored)
    sft = read_rows(work / "pairs/sft.jsonl", SFTRow)
    pairs = read_rows(work / "logprobs/preference.jsonl", PreferenceRow)
    assert not {r.id for r in sft} & {p.id for p in pairs}  # SFT and PO prompts are disjoint
    for pair in pairs:
        assert pair.ref_chosen_ntokens > 0
        assert abs(pair.ref_mean_chosen_logps * pair.ref_chosen_ntokens - pair.ref_chosen_logps) < 1e-4
    results = json.loads((work / "eval/results.json").read_text())
    assert list(results) == [*tiny_world_sources(), "pivot", "pivot+SFT", "pivot+SFT+DPO"]
    assert (work / "eval/accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_infifpo_recipe_scores_every_source_and_logs_the_selected_one(tiny_world, tmp_path):
    """The InfiFPO recipe end to end: pivot samples too, cross-model pairs, M0 + source log-probs,
    InfiFPO training that loads no source and logs which source max-margin picked, by name."""
    overrides = [*tiny_overrides(tiny_world.root.parent), "eval.models=[sft, po]", "sample.batch_size=16"]
    recipe = load_recipe(recipe_path("infifpo-toy.yaml"), overrides)
    work = tmp_path / "work"
    run_recipe(recipe, work, quiet=True)
    samples = read_rows(work / "sample/samples.jsonl", SampleRow)
    assert {s.model for s in samples} == {*tiny_world_sources(), "pivot"}
    pairs = read_rows(work / "logprobs/preference.jsonl", PreferenceRow)
    sources = [s["name"] for s in read_metadata(work / "logprobs/preference.jsonl")["sources"]]
    assert sources == tiny_world_sources()
    assert pairs and all(len(p.fuse_mean_chosen_logps) == len(sources) for p in pairs)
    log = json.loads((work / "po/model/polyfuse_training.json").read_text())["log_history"]
    picked = {k: v for k, v in log[0].items() if k.startswith("fusion/selected/")}
    assert set(picked) == {f"fusion/selected/{name}" for name in ["M0", *sources]}
    assert sum(picked.values()) == pytest.approx(1.0)
    results = json.loads((work / "eval/results.json").read_text())
    assert list(results) == ["pivot+SFT", "pivot+SFT+INFIFPO"]


def test_rerun_skips_finished_stages(reference_run, tiny_world):
    before = {s: (reference_run / s / "manifest.json").stat().st_mtime_ns for s in STAGES}
    recipe = load_recipe(recipe_path("fusechat3-toy.yaml"), tiny_overrides(tiny_world.root.parent))
    run_recipe(recipe, reference_run, quiet=True)
    assert {s: (reference_run / s / "manifest.json").stat().st_mtime_ns for s in STAGES} == before


def test_changed_config_reruns_that_stage_and_what_follows(reference_run, tiny_world, tmp_path):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(reference_run, work)
    recipe = load_recipe(recipe_path("fusechat3-toy.yaml"), [*tiny_overrides(tiny_world.root.parent), "po.beta=0.2"])
    before = {s: (work / s / "manifest.json").stat().st_mtime_ns for s in STAGES}
    run_recipe(recipe, work, quiet=True)
    after = {s: (work / s / "manifest.json").stat().st_mtime_ns for s in STAGES}
    assert [s for s in STAGES if after[s] != before[s]] == ["po", "eval"]


def _run_cli(work: Path, overrides: list[str]) -> warm_python.Started:
    """`python -m polyfuse run` of the tiny recipe, started in a process group of its own (a warm child:
    `warm_python`)."""
    args = ["-m", "polyfuse", "run", str(recipe_path("fusechat3-toy.yaml")), "--work-dir", str(work), "--quiet"]
    for item in overrides:
        args += ["--set", item]
    return warm_python.start(args)


def _kill_when(work: Path, overrides: list[str], ready) -> None:
    proc = _run_cli(work, overrides)
    deadline = time.time() + 240
    while not ready(work):
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr()}"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.05)
    proc.kill()  # SIGKILL to its process group


def _sampling_half_done(work: Path) -> bool:
    return len(list((work / "sample/shards").glob("*.jsonl"))) >= 5


def _training(work: Path) -> bool:
    manifest = work / "sft/manifest.json"
    return manifest.exists() and json.loads(manifest.read_text())["status"] == "running"


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", [_sampling_half_done, _training], ids=["during-sample", "during-sft"])
def test_killed_run_resumes_to_the_same_result(reference_run, tiny_world, tmp_path, kill_point):
    overrides = tiny_overrides(tiny_world.root.parent)
    work = tmp_path / "work"
    _kill_when(work, overrides, kill_point)
    assert not (work / "eval/manifest.json").exists()
    proc = _run_cli(work, overrides)
    assert proc.wait(timeout=300) == 0, proc.stderr()
    assert outputs(work) == outputs(reference_run)


def test_stage_cache_shares_finished_stages_by_fingerprint(reference_run, tiny_world, tmp_path):
    """A run through a stage cache takes every stage another run finished with the same fingerprint as hard links
    (the same bytes, nothing retrained, its outputs in its own folder); a changed config reruns that stage and
    what follows."""
    cache, first, second = tmp_path / "stages", reference_run, tmp_path / "second"
    recipe = load_recipe(recipe_path("fusechat3-toy.yaml"), tiny_overrides(tiny_world.root.parent))
    before = {s: (first / s / "manifest.json").stat().st_mtime_ns for s in STAGES}
    run_recipe(recipe, first, quiet=True, stage_cache=cache)  # finished before the cache: only registered
    assert {s: (first / s / "manifest.json").stat().st_mtime_ns for s in STAGES} == before
    ctx = run_recipe(recipe, second, quiet=True, stage_cache=cache)
    assert outputs(second) == outputs(reference_run)
    for stage in STAGES:
        manifest = json.loads((second / stage / "manifest.json").read_text())
        assert manifest["reused_from"] == str((first / stage).resolve()) and manifest["status"] == "done"
        assert all(str(p).startswith(str(second / stage)) for p in ctx.outputs[stage].values())
    model = "sft/model/model.safetensors"
    assert (second / model).stat().st_ino == (first / model).stat().st_ino  # a link, not a retraining
    changed = load_recipe(recipe_path("fusechat3-toy.yaml"), [*tiny_overrides(tiny_world.root.parent), "po.beta=0.2"])
    third = tmp_path / "third"
    run_recipe(changed, third, quiet=True, stage_cache=cache)
    assert [s for s in STAGES if "reused_from" not in json.loads((third / s / "manifest.json").read_text())] == ["po", "eval"]
    assert outputs(third)["sft/model"] == outputs(reference_run)["sft/model"]
    assert outputs(third)["po/model"] != outputs(reference_run)["po/model"]
