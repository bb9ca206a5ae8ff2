"""The explicit-fusion recipes end to end on the tiny toy world: InfiFusion pairwise (one distilled copy per
source, then a TIES merge on the original pivot), InfiFusion unified and FuseLLM (the pivot's own outputs
among the candidates), and a rerun that skips every finished stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from polyfuse.pipeline.demo import recipe_path
from polyfuse.pipeline.recipe import load_recipe
from polyfuse.pipeline.runner import run_recipe
from polyfuse.teacher import open_stores


def tiny_overrides(cache_dir: Path) -> list[str]:
    """The recipes shrunk to the tiny world, whose barely trained models are ranked by the reward model."""
    return [
        "toyworld.preset=tiny", f"toyworld.cache_dir={cache_dir}", "prompts.toyworld.per_domain=4",
        "eval.prompts.toyworld.per_domain=3", "sample.chunk_size=4", "sample.batch_size=8", "pairs.gap_window=null",
        'score.scorers=[{type: reward_model, name: rm, model: {path: "toyworld://reward_model"}}]',
        "eval.scorers=[{type: toyworld}]", "distill.epochs=1", "distill.batch_size=4", "teacher.top_k=4",
        "distill.objective_args.top_k=4",
    ]


def sources(tiny_world) -> list[str]:
    return sorted(tiny_world.source_paths)


@pytest.fixture(scope="module")
def pairwise_run(tiny_world, tmp_path_factory):
    work = tmp_path_factory.mktemp("pairwise")
    recipe = load_recipe(recipe_path("infifusion-pairwise-toy.yaml"), tiny_overrides(tiny_world.root.parent))
    return run_recipe(recipe, work, quiet=True), recipe


def test_pairwise_distils_one_copy_per_source_and_merges_them_on_the_pivot(pairwise_run, tiny_world):
    ctx, recipe = pairwise_run
    copies = ctx.outputs["distill"]
    assert sorted(copies) == sources(tiny_world)
    for name, folder in copies.items():
        summary = json.loads((Path(folder) / "polyfuse_training.json").read_text())
        assert summary["teachers"] == [name] and summary["objective"]["name"] == "uld"
    merged = load_file(str(next(Path(ctx.outputs["merge"]["model"]).glob("*.safetensors"))))
    pivot = load_file(str(next(Path(recipe.pivot.path).glob("*.safetensors"))))
    assert merged.keys() == pivot.keys()
    assert any((merged[k] - pivot[k]).abs().max() > 0 for k in merged)
    results = json.loads(Path(ctx.outputs["eval"]["results"]).read_text())
    assert "pivot+ULD+MERGE(ties)" in results


def test_a_rerun_skips_every_finished_stage(pairwise_run, tiny_world):
    ctx, recipe = pairwise_run
    stamps = {p: p.stat().st_mtime_ns for p in ctx.work_dir.rglob("*") if p.is_file()}
    run_recipe(recipe, ctx.work_dir, quiet=True)
    # what every run writes: its recipe, its wall times and the report that gives them
    rewritten = ("recipe.resolved.yaml", "run.json", "report.md", "report.json")
    changed = [p for p, t in stamps.items() if p.exists() and p.stat().st_mtime_ns != t and p.name not in rewritten]
    assert changed == []


@pytest.mark.parametrize(("recipe_name", "with_pivot"), [("infifusion-unified-toy.yaml", False), ("fusellm-toy.yaml", True)])
def test_unified_recipes_train_one_model_on_every_teacher(tiny_world, tmp_path, recipe_name, with_pivot):
    recipe = load_recipe(recipe_path(recipe_name), tiny_overrides(tiny_world.root.parent))
    ctx = run_recipe(recipe, tmp_path, quiet=True)
    stored = [s.name for s in open_stores(ctx.outputs["teacher"]["store"])]
    assert sorted(stored) == sorted(sources(tiny_world) + (["pivot"] if with_pivot else []))
    summary = json.loads((Path(ctx.outputs["distill"]["model"]) / "polyfuse_training.json").read_text())
    assert sorted(summary["teachers"]) == sorted(stored)
    assert summary["alignment"] == ("offsets" if with_pivot else "positional")
    label = "pivot+" + recipe.distill.objective.upper()
    assert label in json.loads(Path(ctx.outputs["eval"]["results"]).read_text())
