"""Explicit fusion on the offline toy world, over several seeds: SFT only against FuseLLM (MinCE, AvgCE)
and InfiFusion (pairwise + TIES merge; unified with plain averaging and with uncertainty weighting).

    python bench/explicit_fusion.py --seeds 0 1 2 --out docs/explicit-fusion   # the full run
    python bench/explicit_fusion.py --smoke      # tiny world, seed 0, in runs/explicit-fusion-smoke: the plumbing

Per seed, in `<work-dir>/seed<N>/`:
1. the `infifusion-unified-toy` recipe up to `teacher`: prompts, sampling, scoring, the training texts (the
   best verified response of every train prompt) and the top-10 outputs of every source and of the pivot;
2. one training run per method, every one from the original pivot on the same texts with the recipe's
   `distill` settings (learning rate, epochs, batch, max length, warmup); SFT only is the same run with CE
   alone. Pairwise InfiFusion distils each source alone into its own copy, then merges the copies with
   TIES (density 0.5, weights 1, normalised) on the original pivot;
3. greedy held-out evaluation of every model, cached per (seed, method).
Every step is skipped when its output exists, so a killed run resumes. The seed sets the prompts, sampling
and the training seed; the toy world (world seed 0) is shared.

Prints a Markdown table (rows = models, columns = toy domains then their average, mean ± sd over seeds)
and writes `<out>/explicit_fusion.png` and `<out>/explicit_fusion.json` (per-seed numbers, training
summaries, timings).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _seeds import SMOKE_DATA, cell_values, chart, evaluate_cached, markdown, mean_sd, timed
from rich.console import Console

from polyfuse.data.io import read_rows, write_json
from polyfuse.data.schemas import SFTRow
from polyfuse.merge import MergeOptions, run_merge
from polyfuse.merge.config import parse_merge_config
from polyfuse.models import ModelSpec
from polyfuse.pipeline.demo import recipe_path
from polyfuse.pipeline.recipe import Recipe, load_recipe
from polyfuse.pipeline.runner import run_recipe
from polyfuse.trainers import DistillTrainConfig, SFTTrainConfig, train_distill, train_sft

RECIPE = "infifusion-unified-toy.yaml"
DATA_STAGES = "[prompts, sample, score, pairs, teacher]"
TINY_SCORERS = (
    "score.scorers=[{type: reward_model, name: rm, normalize: sigmoid, batch_size: 256, "
    "model: {path: toyworld://reward_model}}]"
)
PIVOT_LABEL = "pivot (start)"
SFT_LABEL = "SFT only"


@dataclass(frozen=True)
class Method:
    """One distillation row: `objective` with `args`; `with_pivot` adds the pivot's own outputs to the
    candidates (FuseLLM); `pairwise` trains one copy per source and merges them."""

    key: str
    label: str
    objective: str
    args: dict[str, Any] = field(default_factory=dict)
    with_pivot: bool = False
    pairwise: bool = False


METHODS = [
    Method("fusellm-min-ce", "FuseLLM (MinCE)", "fusellm", {"fusion": "min_ce"}, with_pivot=True),
    Method("fusellm-avg-ce", "FuseLLM (AvgCE)", "fusellm", {"fusion": "avg_ce"}, with_pivot=True),
    Method("infifusion-pairwise", "InfiFusion pairwise + TIES", "uld", pairwise=True),
    Method("infifusion-unified-average", "InfiFusion unified (average)", "uld", {"weighting": "average"}),
    Method("infifusion-unified-uncertainty", "InfiFusion unified (uncertainty)", "uld", {"weighting": "uncertainty"}),
]


def seed_recipe(seed: int, preset: str) -> Recipe:
    """The recipe of one seed; preset `smoke` is the tiny world on a few prompts, one epoch."""
    world = "tiny" if preset == "smoke" else preset
    overrides = [f"seed={seed}", f"toyworld.preset={world}", f"stages={DATA_STAGES}", "teacher.include_pivot=true"]
    if world == "tiny":  # barely trained models are never verifier-correct: rank by the reward model alone
        overrides += [TINY_SCORERS, "eval.scorers=[{type: toyworld}]", "pairs.gap_window=null"]
    if preset == "smoke":
        overrides += [*SMOKE_DATA, "distill.epochs=1", "distill.batch_size=4"]
    return load_recipe(recipe_path(RECIPE), overrides)


def trained_spec(recipe: Recipe, path: str | Path) -> ModelSpec:
    return recipe.pivot.model_copy(update={"path": str(path), "gguf_file": None})


def train_settings(recipe: Recipe) -> dict[str, Any]:
    """The recipe's `distill` training settings, shared by every method (and SFT only)."""
    return recipe.distill.model_dump(exclude={"strategy", "objective", "objective_args", "teachers", "alignment"})


def train_method(method: Method, recipe: Recipe, rows: list[SFTRow], store: Path, folder: Path) -> Path:
    pivot = recipe.pivot
    sources = [s.label for s in recipe.sources]
    config = DistillTrainConfig.model_validate({
        **train_settings(recipe), "objective": method.objective,
        "objective_args": {**recipe.distill.objective_args, **method.args} if method.objective == "uld" else method.args,
        "teachers": [pivot.label, *sources] if method.with_pivot else sources,
    })
    out = folder / "model"
    if out.is_dir():
        return out
    if not method.pairwise:
        return train_distill(pivot, rows, store, config, out)
    copies = []
    for source in sources:
        copy = folder / source
        if not copy.is_dir():
            train_distill(pivot, rows, store, config.model_copy(update={"teachers": [source]}), copy)
        copies.append(str(copy))
    merge = parse_merge_config({
        "merge_method": "ties", "base_model": pivot.path, "dtype": "float32",
        "models": [{"model": c, "parameters": {"weight": 1.0, "density": 0.5}} for c in copies],
        "parameters": {"normalize": True},
    }, "bench")
    run_merge(merge, out, "bench", MergeOptions(quiet=True, smoke_check=False), Console(quiet=True))
    return out


def training_log(model_dir: Path) -> dict[str, Any]:
    summary_path = model_dir / "polyfuse_training.json"
    if not summary_path.is_file():  # a merge of pairwise copies
        return {"merged": True}
    summary = json.loads(summary_path.read_text())
    history = summary["log_history"]

    def logged(name: str) -> list[float]:
        return [e[name] for e in history if name in e]

    losses, kd = logged("loss"), logged("loss/kd")
    return {
        "examples": summary["examples"],
        "dropped": len(summary["dropped"]),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "kd": [kd[0], kd[-1]] if kd else None,
        "teachers_aligned": statistics.mean(logged("kd/teachers_aligned")) if logged("kd/teachers_aligned") else None,
    }


def run_seed(seed: int, preset: str, seed_dir: Path) -> dict[str, Any]:
    recipe = seed_recipe(seed, preset)
    times_path = seed_dir / "timings.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    try:
        ctx = timed(times, "recipe (prompts..teacher)", lambda: run_recipe(recipe, seed_dir, quiet=True))
        rows = read_rows(ctx.output("teacher", "sft"), SFTRow)
        store = Path(ctx.output("teacher", "store"))
        models: dict[str, ModelSpec] = {f"{s.label} (source)": s for s in recipe.sources}
        models[PIVOT_LABEL] = recipe.pivot
        sft_dir = seed_dir / "runs" / "sft" / "model"
        if not sft_dir.is_dir():
            timed(times, "train sft", lambda: train_sft(recipe.pivot, rows, SFTTrainConfig(**train_settings(recipe)), sft_dir))
        models[SFT_LABEL] = trained_spec(recipe, sft_dir)
        logs = {SFT_LABEL: training_log(sft_dir)}
        for method in METHODS:
            folder = seed_dir / "runs" / method.key
            model_dir = timed(times, f"train {method.key}",
                              lambda m=method, f=folder: train_method(m, recipe, rows, store, f))
            models[method.label] = trained_spec(recipe, model_dir)
            logs[method.label] = training_log(model_dir)
        accuracy = {}
        for label, spec in models.items():
            path = seed_dir / "eval" / (re.sub(r"[^\w.-]+", "_", label) + ".json")
            accuracy[label] = timed(times, f"eval {label}",
                                    lambda s=spec, lb=label, p=path: evaluate_cached(s, lb, recipe, p))
    finally:
        write_json(times_path, times)
    return {"seed": seed, "texts": len(rows), "accuracy": accuracy, "training": logs, "timings_s": times,
            "wall_s": round(sum(times.values()), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="default", choices=["default", "tiny"])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/explicit-fusion"))
    parser.add_argument("--out", type=Path, default=None, help="Folder for the PNG and JSON (default: work dir).")
    parser.add_argument("--smoke", action="store_true", help="every method on the tiny world with 8 prompts per "
                        "domain, one epoch, seed 0 (default work dir runs/explicit-fusion-smoke): the plumbing")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.seeds = "smoke", [0]
        if args.work_dir == parser.get_default("work_dir"):
            args.work_dir = Path("runs/explicit-fusion-smoke")
    args.out = args.out or args.work_dir

    import torch

    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared 2-core machine
    runs = [run_seed(seed, args.preset, args.work_dir / f"seed{seed}") for seed in args.seeds]
    labels = list(runs[0]["accuracy"])
    domains = list(runs[0]["accuracy"][labels[0]]["per_domain"])
    columns = [*domains, "average"]
    table = markdown(runs, labels, columns)
    sft = cell_values(runs, SFT_LABEL, "average")
    lines = ["| method | average − SFT only (points) | seeds above / level / below |", "|---|---:|---:|"]
    for method in METHODS:
        diffs = [v - b for v, b in zip(cell_values(runs, method.label, "average"), sft, strict=True)]
        mean, sd = mean_sd(diffs)
        signs = (sum(d > 1e-9 for d in diffs), sum(abs(d) <= 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs))
        lines.append(f"| {method.label} | {mean:+.1f} ± {sd:.1f} | {' / '.join(map(str, signs))} |")
    paired = "\n".join(lines)
    print(table, "\n", paired, sep="\n")
    args.out.mkdir(parents=True, exist_ok=True)
    chart(runs, labels, columns, args.out / "explicit_fusion.png", "Explicit fusion on the toy world",
          hatched=lambda label: label.endswith("(source)") or label == PIVOT_LABEL)
    write_json(args.out / "explicit_fusion.json", {"runs": runs, "table": table, "paired": paired})


if __name__ == "__main__":
    main()
