"""InfiFPO ablation in small: the InfiFPO paper's Table 2 rows (SFT, SFT+DPO, SFT+IPO, SFT+WRPO, InfiFPO) and
its fusion/LN/clip ablations, on polyfuse's offline toy world, over several seeds.

    python bench/infifpo_ablation.py --seeds 0 1 2                                     # the full run
    python bench/infifpo_ablation.py --smoke    # tiny world, seed 0, in runs/infifpo-ablation-smoke: the plumbing

Per seed, in `<work-dir>/seed<N>/`:
1. the `infifpo-toy` recipe up to `logprobs` (sources n=4 + pivot n=8, cross-model pairs, SFT on half of the
   prompts, `ref_*` / `fuse_*` columns on the other half);
2. WRPO triples on the same PO prompts: the SFT model (label `sft`) samples 4 responses per PO prompt, they
   are scored like the rest, y_ws = best source response, y_wt / y_l = the SFT model's best / worst;
3. one preference run per method, every one from the same SFT checkpoint with the recipe's `po` settings
   (learning rate, epochs, batch, max length, warmup) and the objective's own default beta;
4. greedy held-out evaluation of every model, cached per (seed, method).
Every step is skipped when its output exists, so a killed run resumes. The seed sets the prompts, sampling,
the SFT/PO split (`pairs.seed`) and the SFT and PO training seeds; the toy world (world seed 0) is shared.
The last row, InfiFPO with `fusion: none` (LN-DPO at InfiFPO's beta), is a control that isolates fusion.
With `--preset tiny` (and `--smoke`, a plumbing test on a few prompts) responses are ranked by the reward model alone: the barely trained
tiny models are never verifier-correct, so verifier gating would leave no SFT rows.

Prints a Markdown table (rows = methods, columns = toy domains then their average, mean ± standard
deviation over seeds) and writes `<out>/infifpo_ablation.png` and `<out>/infifpo_ablation.json` (every
per-seed number, pair counts, timings and max-margin selection fractions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _seeds import SMOKE_DATA, cell_values, chart, evaluate_cached, markdown, mean_sd, timed

from polyfuse.data.io import read_rows, write_json
from polyfuse.data.schemas import PreferenceRow, PromptRow, SampleRow, response_text
from polyfuse.logprobs import fusion_sources, run_logprobs
from polyfuse.models import ModelSpec
from polyfuse.pairs import run_pairs, sft_split
from polyfuse.pipeline.demo import recipe_path
from polyfuse.pipeline.recipe import Recipe, load_recipe
from polyfuse.pipeline.runner import run_recipe
from polyfuse.sampling import EngineModel, SampleConfig, SampledModel, run_sample
from polyfuse.sampling.base import SamplingSettings
from polyfuse.scorers import run_score
from polyfuse.trainers import PreferenceTrainConfig, train_preference

RECIPE = "infifpo-toy.yaml"
DATA_STAGES = "[prompts, sample, score, pairs, sft, logprobs]"
TARGET = "sft"  # WRPO: the label of the SFT model's own samples (y_wt, y_l)
TARGET_SAMPLING = SamplingSettings(n=4, temperature=0.8, max_new_tokens=16)  # its seed: the recipe's
PIVOT_LABEL = "pivot (before SFT)"
TINY_SCORERS = (
    "score.scorers=[{type: reward_model, name: rm, normalize: sigmoid, batch_size: 256, "
    "model: {path: toyworld://reward_model}}]"
)
SFT_LABEL = "SFT"


@dataclass(frozen=True)
class Method:
    """One preference-optimisation row: `objective` with `args` (beta: the objective's default) on the
    cross-model pairs, or on the WRPO triples when `wrpo_data`."""

    key: str
    label: str
    objective: str
    args: dict[str, Any] = field(default_factory=dict)
    wrpo_data: bool = False


METHODS = [
    Method("dpo", "SFT+DPO", "dpo"),
    Method("ipo", "SFT+IPO", "ipo"),
    Method("wrpo", "SFT+WRPO", "wrpo", wrpo_data=True),
    Method("infifpo-max-margin", "InfiFPO (max-margin)", "infifpo"),
    Method("infifpo-confidence", "InfiFPO (confidence)", "infifpo", {"fusion": "confidence"}),
    Method("infifpo-average", "InfiFPO (average)", "infifpo", {"fusion": "average"}),
    Method("infifpo-max-margin-no-clip", "InfiFPO (max-margin, no clip)", "infifpo", {"clip": False}),
    Method("infifpo-max-margin-no-ln", "InfiFPO (max-margin, no LN)", "infifpo", {"length_normalize": False}),
    Method(
        "infifpo-max-margin-per-response",
        "InfiFPO (max-margin per response)",
        "infifpo",
        {"max_margin": "per_response"},
    ),
    # Control, not in the paper's table: the same loss and beta with M0 as the reference (LN-DPO at beta 2.5),
    # so the difference to the rows above is the fusion alone.
    Method("infifpo-no-fusion", "InfiFPO (no fusion: LN-DPO control)", "infifpo", {"fusion": "none"}),
]


# ----------------------------------------------------------------------------------------------- helpers
def trained_spec(recipe: Recipe, path: str | Path) -> ModelSpec:
    """The pivot's spec pointing at a trained folder (same template and settings as the pivot)."""
    return recipe.pivot.model_copy(update={"path": str(path), "gguf_file": None})


def seed_recipe(seed: int, preset: str) -> Recipe:
    """The recipe of one seed; preset `smoke` is the tiny world on a few prompts, one epoch."""
    world = "tiny" if preset == "smoke" else preset
    overrides = [
        f"seed={seed}",
        f"toyworld.preset={world}",
        f"stages={DATA_STAGES}",
        f"pairs.seed={seed}",
        f"sft.seed={seed}",
        f"po.seed={seed}",
    ]
    if world == "tiny":  # barely trained models are never verifier-correct: rank by the reward model alone
        overrides += [TINY_SCORERS, "eval.scorers=[{type: toyworld}]"]
    if preset == "smoke":
        overrides += [*SMOKE_DATA, "sft.epochs=1", "sft.batch_size=4", "po.epochs=1", "po.batch_size=4",
                      "po.logging_steps=1"]  # 3 steps: log each, the details print first and last
    return load_recipe(recipe_path(RECIPE), overrides)


# ------------------------------------------------------------------------------------------------ WRPO data
def build_wrpo_data(recipe: Recipe, ctx: Any, sft: ModelSpec, folder: Path) -> Path:
    """WRPO triples (y_ws, y_wt, y_l: arXiv 2412.03187) on the recipe's PO prompts, with `ref_*` columns of
    all three roles under the SFT model. Sampling, scoring and log-probs resume from their shards."""
    out = folder / "preference.jsonl"
    if out.is_file():
        return out
    prompts = read_rows(ctx.output("prompts", "prompts"), PromptRow)
    sft_prompts = sft_split([p.id for p in prompts], recipe.pairs.sft_fraction, recipe.pairs.seed)
    prompts = [p for p in prompts if p.id not in sft_prompts]
    target = SampledModel(**{**sft.model_dump(), "name": TARGET, "sampling": TARGET_SAMPLING.model_dump()})
    config = SampleConfig(
        models=[target],
        batch_size=recipe.sample.batch_size,
        chunk_size=recipe.sample.chunk_size,
        seed=recipe.seed,
    )
    samples = read_rows(run_sample(prompts, config, folder / "sample", quiet=True), SampleRow)
    scored = read_rows(run_score(samples, recipe.score, folder / "score", quiet=True), SampleRow)
    names = [s.label for s in recipe.sources]
    sources = [r for r in read_rows(ctx.output("score", "scored"), SampleRow) if r.model in names]
    pairs = recipe.pairs.model_copy(update={"target": TARGET, "sources": names})
    rows = read_rows(run_pairs(sources + scored, pairs, folder / "pairs")["preference"], PreferenceRow)
    config = recipe.logprobs.model_copy(update={"pivot": EngineModel.model_validate(sft.model_dump(exclude={"sampling"})), "sources": []})
    return run_logprobs(config, rows, out, quiet=True)


def data_counts(recipe: Recipe, ctx: Any, wrpo: Path) -> dict[str, Any]:
    """Pair / triple counts, a check that both data sets use the same PO prompts, and how often y_ws (the
    reward model's best source response) fails the toy verifier."""
    cross_report = json.loads(Path(ctx.output("pairs", "report")).read_text())
    wrpo_report = json.loads((wrpo.parent / "pairs" / "report.json").read_text())
    cross = read_rows(ctx.output("logprobs", "preference"), PreferenceRow)
    triples = read_rows(wrpo, PreferenceRow)
    ids = [p.id for p in read_rows(ctx.output("prompts", "prompts"), PromptRow)]
    po_prompts = set(ids) - sft_split(ids, recipe.pairs.sft_fraction, recipe.pairs.seed)
    correct = {
        (r.prompt_id, r.response): r.correct for r in read_rows(ctx.output("score", "scored"), SampleRow)
    }
    ws_wrong = sum(1 for row in triples if correct.get((row.id, response_text(row.chosen_source))) is False)
    return {
        "po_prompts": len(po_prompts),
        "same_split": cross_report["po_prompts"] == wrpo_report["po_prompts"] == len(po_prompts)
        and {r.id for r in cross} | {r.id for r in triples} <= po_prompts,
        "cross_model_pairs": len(cross),
        "cross_model_pairs_per_domain": dict(Counter(r.domain for r in cross)),
        "cross_model_report": cross_report,
        "wrpo_triples": len(triples),
        "wrpo_triples_per_domain": dict(Counter(r.domain for r in triples)),
        "wrpo_report": wrpo_report,
        "wrpo_y_ws_incorrect": ws_wrong,
        "max_margin_choice_by_domain": max_margin_choice_by_domain(
            Path(ctx.output("logprobs", "preference"))
        ),
    }


def max_margin_choice_by_domain(data: Path) -> dict[str, dict[str, float]]:
    """Per domain, the fraction of pairs whose max-margin reference (LN, clip, per example: the default)
    is M0 or each source. It depends on the precomputed columns only, not on the policy."""
    import torch

    from polyfuse.objectives import fused_reference

    rows = read_rows(data, PreferenceRow)
    names = ["M0", *fusion_sources(data, rows)]
    fractions = {}
    for domain in sorted({r.domain for r in rows}):
        subset = [r for r in rows if r.domain == domain]
        columns = [
            torch.tensor([getattr(r, name) for r in subset], dtype=torch.float64)
            for name in (
                "ref_mean_chosen_logps",
                "ref_mean_rejected_logps",
                "fuse_mean_chosen_logps",
                "fuse_mean_rejected_logps",
            )
        ]
        _, _, metrics = fused_reference(*columns)
        fractions[domain] = {
            names[i]: metrics[f"fusion/selected/{i}"].mean().item() for i in range(len(names))
        }
    return fractions


# --------------------------------------------------------------------------------------------- training
def train_method(method: Method, recipe: Recipe, sft: ModelSpec, data: Path, folder: Path) -> Path:
    model_dir = folder / "model"
    if model_dir.is_dir():
        return model_dir
    rows = read_rows(data, PreferenceRow)
    config = PreferenceTrainConfig.model_validate(
        {
            **recipe.po.model_dump(),
            "objective": method.objective,
            "objective_args": method.args,
            "beta": None,
        }
    )
    return train_preference(sft, rows, config, model_dir, data_path=data)


def training_log(model_dir: Path) -> dict[str, Any]:
    """Beta used; first / last logged loss and policy log-prob of the chosen responses; the mean of the
    InfiFPO gradient weight sigma(-u) (`fusion/weight`); every `fusion/selected*` fraction averaged over
    training."""
    summary = json.loads((model_dir / "polyfuse_training.json").read_text())
    history = summary["log_history"]

    def logged(name: str) -> list[float]:
        return [e[name] for e in history if name in e]

    losses, chosen, weight = logged("loss"), logged("logps/chosen"), logged("fusion/weight")
    selected: dict[str, list[float]] = {}
    for entry in history:
        for name, value in entry.items():
            if name.startswith("fusion/selected"):
                selected.setdefault(name, []).append(value)
    return {
        "beta": summary["objective"].get("beta"),
        "examples": summary["examples"],
        "dropped": len(summary["dropped"]),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "logps_chosen": [chosen[0], chosen[-1]] if chosen else None,
        "mean_fusion_weight": statistics.mean(weight) if weight else None,
        "selected": {name: statistics.mean(values) for name, values in selected.items()},
    }


# ------------------------------------------------------------------------------------------------ eval
# ---------------------------------------------------------------------------------------------- one seed
def run_seed(seed: int, preset: str, seed_dir: Path) -> dict[str, Any]:
    """Data, training and evaluation of every method for one seed; returns the seed's raw numbers."""
    recipe = seed_recipe(seed, preset)
    times_path = seed_dir / "timings.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    try:
        ctx = timed(times, "recipe (prompts..logprobs)", lambda: run_recipe(recipe, seed_dir, quiet=True))
        sft = trained_spec(recipe, ctx.output("sft", "model"))
        cross = Path(ctx.output("logprobs", "preference"))
        wrpo = timed(times, "wrpo data", lambda: build_wrpo_data(recipe, ctx, sft, seed_dir / "wrpo"))
        models: dict[str, ModelSpec] = {f"{s.label} (source)": s for s in recipe.sources}
        models |= {PIVOT_LABEL: recipe.pivot, SFT_LABEL: sft}
        logs = {}
        for method in METHODS:
            folder = seed_dir / "po" / method.key
            data = wrpo if method.wrpo_data else cross
            model_dir = timed(
                times,
                f"po {method.key}",
                lambda m=method, f=folder, d=data: train_method(m, recipe, sft, d, f),
            )
            models[method.label] = trained_spec(recipe, model_dir)
            logs[method.label] = training_log(model_dir)
        accuracy = {}
        for label, spec in models.items():
            path = seed_dir / "eval" / (re.sub(r"[^\w.-]+", "_", label) + ".json")
            accuracy[label] = timed(
                times, f"eval {label}", lambda s=spec, lb=label, p=path: evaluate_cached(s, lb, recipe, p)
            )
    finally:
        write_json(times_path, times)
    return {
        "seed": seed,
        "accuracy": accuracy,
        "training": logs,
        "data": data_counts(recipe, ctx, wrpo),
        "timings_s": times,
        "wall_s": round(sum(times.values()), 1),
    }


# ------------------------------------------------------------------------------------------------ report
def paired_vs_sft(runs: list[dict], labels: list[str]) -> str:
    """Average accuracy minus the same seed's SFT model (every PO run starts from it): mean ± sd over seeds,
    and the number of seeds where the method is above / level with / below SFT."""
    sft = cell_values(runs, SFT_LABEL, "average")
    lines = ["| method | average − SFT (points) | seeds above / level / below SFT |", "|---|---:|---:|"]
    for label in labels[labels.index(SFT_LABEL) + 1 :]:
        diffs = [v - b for v, b in zip(cell_values(runs, label, "average"), sft, strict=True)]
        signs = [
            sum(d > 1e-9 for d in diffs),
            sum(abs(d) <= 1e-9 for d in diffs),
            sum(d < -1e-9 for d in diffs),
        ]
        lines.append(
            f"| {label} | {{:+.1f}} ± {{:.1f}} | {' / '.join(map(str, signs))} |".format(*mean_sd(diffs))
        )
    return "\n".join(lines)


def print_details(runs: list[dict]) -> None:
    for run in runs:
        data = run["data"]
        print(
            f"seed {run['seed']}: wall {run['wall_s']} s; PO prompts {data['po_prompts']}, cross-model pairs "
            f"{data['cross_model_pairs']} {data['cross_model_pairs_per_domain']}, WRPO triples "
            f"{data['wrpo_triples']} {data['wrpo_triples_per_domain']} (y_ws incorrect: "
            f"{data['wrpo_y_ws_incorrect']}), same split: {data['same_split']}"
        )
        for domain, shares in data["max_margin_choice_by_domain"].items():
            print(
                f"    max-margin reference on {domain} pairs: "
                + ", ".join(f"{k} {v:.2f}" for k, v in shares.items())
            )
        for label, log in run["training"].items():
            selected = ", ".join(f"{k.removeprefix('fusion/')} {v:.2f}" for k, v in log["selected"].items())
            print(
                f"    {label}: beta {log['beta']}, pairs {log['examples']} (dropped {log['dropped']}), "
                f"loss {log['first_loss']:.4f} -> {log['last_loss']:.4f}, "
                f"logps/chosen {log['logps_chosen'][0]:.2f} -> {log['logps_chosen'][1]:.2f}"
                + (f", mean sigma(-u) {log['mean_fusion_weight']:.2f}" if log["mean_fusion_weight"] else "")
                + (f"; {selected}" if selected else "")
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/infifpo-ablation"))
    parser.add_argument("--preset", choices=["default", "tiny"], default="default")
    parser.add_argument(
        "--out", type=Path, default=None, help="Folder for the PNG and JSON (default: work dir)."
    )
    parser.add_argument("--smoke", action="store_true", help="every method on the tiny world with 8 prompts per "
                        "domain, one epoch, seed 0 (default work dir runs/infifpo-ablation-smoke): the plumbing")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.seeds = "smoke", [0]
        if args.work_dir == parser.get_default("work_dir"):
            args.work_dir = Path("runs/infifpo-ablation-smoke")
    import torch

    torch.set_num_threads(1)  # tiny models on shared cores: one thread is as fast and never oversubscribed
    out = args.out or args.work_dir
    out.mkdir(parents=True, exist_ok=True)
    runs = [run_seed(seed, args.preset, args.work_dir / f"seed{seed}") for seed in args.seeds]
    labels = list(runs[0]["accuracy"])
    columns = [*runs[0]["accuracy"][labels[0]]["per_domain"], "average"]
    table = markdown(runs, labels, columns)
    paired = paired_vs_sft(runs, labels)
    chart(runs, labels, columns, out / "infifpo_ablation.png", "InfiFPO ablation on the toy world",
          lambda label: label.endswith("(source)") or label == PIVOT_LABEL)
    settings = {
        "preset": args.preset,
        "recipe": RECIPE,
        "seeds": args.seeds,
        "po": seed_recipe(args.seeds[0], args.preset).po.model_dump(exclude={"seed", "objective"}),
        "methods": [dataclasses.asdict(m) for m in METHODS],
        "wrpo_target_sampling": TARGET_SAMPLING.model_dump(),
    }
    write_json(
        out / "infifpo_ablation.json",
        {"settings": settings, "table": table, "paired_vs_sft": paired, "runs": runs},
    )
    print(f"\nSeeds {args.seeds}; held-out accuracy (%), mean ± standard deviation over seeds.\n\n{table}\n")
    print(f"Paired with the same seed's SFT model:\n\n{paired}\n")
    print_details(runs)
    print(f"\nwrote {out / 'infifpo_ablation.png'} and {out / 'infifpo_ablation.json'}")


if __name__ == "__main__":
    main()
