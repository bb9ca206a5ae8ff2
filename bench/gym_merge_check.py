"""The merging premise of the fusion gym, checked quickly: do task arithmetic and TIES merges of the gym's LoRA
specialists (one per domain, fine-tuned from the shared base) keep a good part of each specialist's gain?

    python bench/gym_merge_check.py --seeds 0 1 --out docs/gym/merge_check.json
    python bench/gym_merge_check.py --smoke      # gym-tiny, 4 items per domain: that it runs, in seconds

For each world seed: the `gym` preset is built (or found in the cache), the three specialists are merged onto
the base with `polyfuse.merge` (mergekit semantics) by each method of `METHODS`, and every model is evaluated
greedily on the validation split (`--per-domain` items per domain, seed 0). Reported per domain: accuracy, and
the share of the specialist's gain the merge keeps, (merged - base) / (specialist - base); per method,
FusionBench's normalised accuracy, the mean over domains of merged / specialist. Merges and evaluations are
cached under `--work-dir`, so a rerun only prints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from _gym import gym_arguments
from rich.console import Console

from polyfuse.data.io import atomic_write_text, write_json
from polyfuse.evaluation import evaluate
from polyfuse.merge import MergeOptions, load_merge_config, run_merge
from polyfuse.models import ModelSpec
from polyfuse.scorers import build_scorer
from polyfuse.toyworld import ToyWorldConfig, build_world

# name -> (mergekit method, per-model parameters, global parameters)
METHODS = {
    "task_arithmetic (lambda 1)": ("task_arithmetic", {"weight": 1.0}, {}),
    "task_arithmetic (lambda 0.5)": ("task_arithmetic", {"weight": 0.5}, {}),
    "ties (density 0.5)": ("ties", {"weight": 1.0, "density": 0.5}, {"normalize": True}),
    "linear (average)": ("linear", {"weight": 1.0}, {}),
}


def accuracy(name: str, path: Path, prompts, cache: Path) -> dict[str, float]:
    """Validation accuracy per domain in %, cached in `cache`."""
    if cache.is_file():
        return json.loads(cache.read_text())
    result = evaluate(ModelSpec(name=name, path=str(path)), prompts, [build_scorer({"type": "toyworld"})],
                      batch_size=256, max_new_tokens=16, label=name, quiet=True)
    scores = {d: 100 * s.accuracy for d, s in result.per_domain.items()}
    write_json(cache, scores)
    return scores


def merge(method: str, model_parameters: dict, parameters: dict, base: Path, models: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"merge_method": method, "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(m), "parameters": model_parameters} for m in models], "parameters": parameters}
    path = folder / "merge.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    run_merge(load_merge_config(path), folder / "model", str(path), MergeOptions(quiet=True, smoke_check=False),
              Console(quiet=True))
    return folder / "model"


def check(seed: int, per_domain: int, work: Path, cache_dir: Path | None, preset: str = "gym") -> dict:
    started = time.perf_counter()
    world = build_world(ToyWorldConfig.preset(preset).model_copy(update={"seed": seed}), cache_dir=cache_dir)
    prompts = world.prompts("validation", per_domain=per_domain, seed=0)
    work = work / f"seed{seed}-{world.root.name}"
    models = {"base": world.merge_base_path, **{f"specialist-{d}": p for d, p in world.specialist_paths.items()},
              "multitask": world.multitask_path}
    for name, (method, model_parameters, parameters) in METHODS.items():
        slug = name.split()[0] + "-" + "".join(c for c in name.split("(")[1] if c.isalnum())
        models[name] = merge(method, model_parameters, parameters, world.merge_base_path,
                             list(world.specialist_paths.values()), work / slug)
    scores = {name: accuracy(name, path, prompts, work / "eval" / f"{name}.json") for name, path in models.items()}
    base = scores["base"]
    special = {d: scores[f"specialist-{d}"][d] for d in world.domains}
    kept = {name: {d: (s[d] - base[d]) / (special[d] - base[d]) if special[d] != base[d] else None for d in world.domains}
            for name, s in scores.items() if name != "base"}
    normalised = {name: sum(s[d] / special[d] for d in world.domains) / len(world.domains) if all(special.values()) else None
                  for name, s in scores.items()}
    return {"seed": seed, "world": str(world.root), "per_domain": per_domain, "accuracy": scores, "gain_kept": kept,
            "normalised_accuracy": normalised, "seconds": round(time.perf_counter() - started, 1)}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    args = gym_arguments(__doc__, "gym-merge-check", "docs/gym/merge_check.json", "merge_check.json",
                         per_domain=1000, seeds=[0, 1])
    results = [check(seed, args.per_domain, args.work_dir, args.cache_dir, args.preset) for seed in args.seeds]
    write_json(args.out, {"methods": {k: list(v) for k, v in METHODS.items()}, "runs": results})
    console = Console()
    for run in results:
        domains = list(run["gain_kept"]["multitask"])
        console.print(f"[bold]world seed {run['seed']}[/] (validation, {run['per_domain']} per domain, {run['seconds']} s)")
        console.print("| model | " + " | ".join(domains) + " | gain kept (mean) | normalised acc. |")
        for name, scores in run["accuracy"].items():
            kept = [k for k in run["gain_kept"].get(name, {}).values() if k is not None]
            mean_kept = f"{100 * sum(kept) / len(kept):.0f}%" if kept else "-"
            console.print(f"| {name} | " + " | ".join(f"{scores[d]:.1f}" for d in domains)
                          + f" | {mean_kept} | {_number(run['normalised_accuracy'][name])} |")


if __name__ == "__main__":
    main()
