"""The on-policy recipes end to end on the tiny toy world (slow lane): MOPD across three tokenizers
(`recipes/onpolicy-toy.yaml`), and the tokenizer transplant followed by same-vocabulary on-policy distillation
(`recipes/transplant-onpolicy-toy.yaml`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from polyfuse.pipeline.demo import recipe_path
from polyfuse.pipeline.recipe import load_recipe
from polyfuse.pipeline.runner import run_recipe

pytestmark = pytest.mark.slow


def overrides(cache_dir: Path) -> list[str]:
    return ["toyworld.preset=tiny", f"toyworld.cache_dir={cache_dir}", "prompts.toyworld.per_domain=4",
            "eval.prompts.toyworld.per_domain=2", "eval.scorers=[{type: toyworld}]", "onpolicy.epochs=1",
            "onpolicy.batch_size=6", "onpolicy.sampling.max_new_tokens=8", "onpolicy.logging_steps=1"]


def summary(ctx) -> dict:
    return json.loads((Path(ctx.output("onpolicy", "model")) / "polyfuse_training.json").read_text())


def test_the_routed_recipe_distils_each_domain_from_its_source(tiny_world, tmp_path):
    recipe = load_recipe(recipe_path("onpolicy-toy.yaml"), overrides(tiny_world.root.parent))
    ctx = run_recipe(recipe, tmp_path / "work", quiet=True)
    record = summary(ctx)
    assert [t["name"] for t in record["teachers"]] == ["llama-compare", "qwen-strings", "gpt2-arithmetic"]
    assert record["objective"]["name"] == "kd" and record["objective"]["top_k"] == 16
    steps = [h for h in record["log_history"] if "loss" in h]
    assert steps and all(h["onpolicy/on_policy"] == 1.0 for h in steps)
    assert "pivot+ONPOLICY-KD" in json.loads(Path(ctx.output("eval", "results")).read_text())


def test_transplant_then_same_vocabulary_on_policy_distillation(tiny_world, tmp_path):
    recipe = load_recipe(recipe_path("transplant-onpolicy-toy.yaml"),
                         [*overrides(tiny_world.root.parent), "transplant.k=16"])  # the tiny donor is 32 wide
    ctx = run_recipe(recipe, tmp_path / "work", quiet=True)
    donor = tiny_world.source_paths["llama-compare"]
    transplanted = Path(ctx.output("transplant", "model"))
    assert AutoTokenizer.from_pretrained(transplanted).get_vocab() == AutoTokenizer.from_pretrained(donor).get_vocab()
    assert json.loads((transplanted / "transplant.json").read_text())["method"] == "omp"
    record = summary(ctx)
    assert record["model"]["path"] == str(transplanted)  # the transplanted pivot is the one distilled
    steps = [h for h in record["log_history"] if "loss" in h]
    # one vocabulary: the teacher scores the pivot's own ids, so every sampled token is one group
    assert steps and all(h["onpolicy/groups/llama-compare"] == h["onpolicy/response_tokens"] for h in steps)
    results = json.loads(Path(ctx.output("eval", "results")).read_text())
    assert {"pivot+TRANSPLANT", "pivot+TRANSPLANT+ONPOLICY-KD"} <= set(results)
    weights = [next(transplanted.glob("*.safetensors")), Path(ctx.output("onpolicy", "model")) / "model.safetensors"]
    stamps = [w.stat().st_mtime_ns for w in weights]
    run_recipe(recipe, tmp_path / "work", quiet=True)  # a rerun skips both
    assert [w.stat().st_mtime_ns for w in weights] == stamps
