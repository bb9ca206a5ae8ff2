"""The recipe stage `merge`: names resolved to earlier stages' models, the base defaulting to the current pivot,
the merged model becoming the pivot, evaluated, fingerprinted (skipped when unchanged), and bad sections
refused when the recipe loads, before any model runs. On the tiny toy world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polyfuse.errors import ConfigError
from polyfuse.pipeline.context import Context
from polyfuse.pipeline.demo import recipe_path
from polyfuse.pipeline.recipe import load_recipe
from polyfuse.pipeline.runner import run_recipe
from polyfuse.pipeline.stages.merge import resolved_merge_config
from test_pipeline import tiny_overrides, tiny_world_sources

STAGES = "[prompts, sample, score, pairs, sft, merge, eval]"
WEIGHT = 0.25
# th = th_sft + lambda * w * (th_pivot - th_sft): the SFT model pulled a quarter of the way back to the pivot


def merge_section(weight: float) -> str:
    return f"merge={{merge_method: task_arithmetic, models: [{{model: pivot, parameters: {{weight: {weight}}}}}]}}"


def merge_recipe(world, *extra: str):
    overrides = [*tiny_overrides(world.root.parent), f"stages={STAGES}", merge_section(WEIGHT),
                 "eval.models=[pivot, sft, merge]", *extra]
    return load_recipe(recipe_path("fusechat3-toy.yaml"), overrides)


def tensors(folder: str | Path) -> dict:
    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def merged_run(tiny_world, tmp_path_factory):
    work = tmp_path_factory.mktemp("merge-stage")
    ctx = run_recipe(merge_recipe(tiny_world), work, quiet=True)
    return work, ctx


def test_merge_of_the_current_pivot_is_task_arithmetic_by_hand(merged_run, tiny_world):
    work, ctx = merged_run
    sft, pivot, merged = (tensors(p) for p in (work / "sft/model", tiny_world.pivot_path, work / "merge/model"))
    assert set(merged) == set(sft)
    for name, value in merged.items():
        expected = sft[name] + WEIGHT * (pivot[name] - sft[name])
        assert (value - expected).abs().max() < 1e-6, name
    assert any((sft[n] - pivot[n]).abs().max() > 1e-3 for n in merged)  # the check is not vacuous
    manifest = json.loads((work / "merge/manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["outputs"] == {"model": str(work / "merge/model")}
    assert set(manifest["inputs"]) == {"base_model", "models[0]"}
    assert ctx.current_pivot("eval").path == str(work / "merge/model")  # the merged model is the new pivot


def test_eval_lists_the_merged_model(merged_run):
    work, _ = merged_run
    results = json.loads((work / "eval/results.json").read_text())
    assert list(results) == ["pivot", "pivot+SFT", "pivot+SFT+MERGE(task_arithmetic)"]


def test_rerun_skips_the_merge_and_a_changed_weight_redoes_it(merged_run, tiny_world, tmp_path):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(merged_run[0], work)
    stages = ["prompts", "sample", "score", "pairs", "sft", "merge", "eval"]
    stamp = lambda: {s: (work / s / "manifest.json").stat().st_mtime_ns for s in stages}  # noqa: E731
    before = stamp()
    run_recipe(merge_recipe(tiny_world), work, quiet=True)
    assert stamp() == before
    run_recipe(merge_recipe(tiny_world, merge_section(0.5)), work, quiet=True)
    after = stamp()
    assert [s for s in stages if after[s] != before[s]] == ["merge", "eval"]
    sft, pivot, merged = (tensors(p) for p in (work / "sft/model", tiny_world.pivot_path, work / "merge/model"))
    name = next(iter(merged))
    assert (merged[name] - (sft[name] + pivot[name]) / 2).abs().max() < 1e-6


def test_names_resolve_to_stage_outputs_sources_and_paths(tiny_world, tmp_path):
    models = "[{model: sft}, {model: 'sft:model'}, {model: pivot}, {model: llama-compare}, {model: ./elsewhere}]"
    recipe = merge_recipe(tiny_world, f"merge={{merge_method: linear, models: {models}, "
                                      f"parameters: {{weight: 1.0}}}}")
    ctx = Context(recipe, tmp_path, outputs={"sft": {"model": "/runs/sft/model"}})
    cfg = resolved_merge_config(ctx)
    assert cfg.base_model == "/runs/sft/model"  # the current pivot
    assert [e.model for e in cfg.models] == ["/runs/sft/model", "/runs/sft/model", recipe.pivot.path,
                                             recipe.sources[0].path, "./elsewhere"]
    assert cfg.parameters["seed"] == recipe.seed
    assert recipe.merge.models[0].model == "sft"  # the recipe itself keeps the names (its fingerprint)


@pytest.mark.parametrize(("change", "message"), [
    ("merge.models=[{model: po, parameters: {weight: 1.0}}]", "names the stage 'po', which does not run before merge"),
    ("merge.models=[{model: pairs, parameters: {weight: 1.0}}]", "the stage 'pairs' makes no model"),
    ("merge.merge_method=nonsense", "unknown merge method 'nonsense'"),
    ("merge.merge_method=slerp", "parameters.t: required by slerp"),
    ("merge.modules={}", "modules: not supported"),
    ("merge.models=[{model: pivot}]", "parameters.weight: required by task_arithmetic"),
])
def test_bad_merge_sections_fail_when_the_recipe_loads(tiny_world, change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        merge_recipe(tiny_world, change)


def test_merge_is_opt_in_and_existing_recipes_still_load():
    for name in ("fusechat3-toy.yaml", "infifpo-toy.yaml", "fusechat3.yaml", "infifpo.yaml"):
        recipe = load_recipe(recipe_path(name))
        assert "merge" not in recipe.stages and recipe.merge is None
    with pytest.raises(ConfigError, match="'merge' section"):
        load_recipe(recipe_path("fusechat3-toy.yaml"), [f"stages={STAGES}"])


@pytest.mark.slow  # three recipe runs
def test_a_slices_recipe_resolves_every_name_and_reruns_when_a_model_it_names_changes(tiny_world, tmp_path):
    """Names in `slices:` and `tokenizer.source` resolve like those in `models:`, and every model the merge reads is
    an input of its fingerprint: changing the weights or the tokenizer of a model that only the slices and the
    tokenizer source name reruns the merge (they were neither resolved nor fingerprinted)."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    pivot, other = (Path(shutil.copytree(tiny_world.pivot_path, tmp_path / name)) for name in ("pivot", "other"))
    source = tiny_world_sources()[0]
    section = (f"merge={{merge_method: passthrough, tokenizer: {{source: {source}}}, slices: ["
               f"{{sources: [{{model: pivot, layer_range: [0, 1]}}]}}, {{sources: [{{model: {source}, "
               f"layer_range: [0, 1]}}]}}]}}")
    recipe = load_recipe(recipe_path("fusechat3-toy.yaml"), [
        *tiny_overrides(tiny_world.root.parent), "stages=[merge]", section, f"pivot.path={pivot}",
        f"sources.0.path={other}"])
    work = tmp_path / "work"
    run = lambda: (run_recipe(recipe, work, quiet=True), (work / "merge/manifest.json").stat().st_mtime_ns)[1]  # noqa: E731
    first = run()
    manifest = json.loads((work / "merge/manifest.json").read_text())
    assert set(manifest["inputs"]) == {"base_model", "slices[1].sources[0]"}
    out = tensors(work / "merge/model")
    layer = next(k for k in tensors(other) if ".layers.0." in k)
    assert torch.equal(out[layer.replace(".0.", ".1.")], tensors(other)[layer])
    assert run() == first  # unchanged: skipped

    changed = {k: v * 2 if k == layer else v for k, v in tensors(other).items()}
    for file in other.glob("*.safetensors"):
        file.unlink()
    save_file(changed, other / "model.safetensors", metadata={"format": "pt"})
    second = run()
    assert second != first and torch.equal(tensors(work / "merge/model")[layer.replace(".0.", ".1.")], changed[layer])

    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.chat_template = "{{ 'the tokenizer source changed' }}"
    tokenizer.save_pretrained(other)
    assert run() != second
    assert AutoTokenizer.from_pretrained(work / "merge/model").chat_template == tokenizer.chat_template
