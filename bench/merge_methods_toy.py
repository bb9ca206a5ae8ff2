"""Weight merging on the toy world: does merging domain-specialised copies of the pivot give one model that
keeps every specialty, and which merge method does it best? Also RSAF against TIES at matched density.

    python bench/merge_methods_toy.py --seeds 0 1 2 3 4 --out docs/merge-methods-toy   # work in runs/merge-methods-toy
    python bench/merge_methods_toy.py --seeds 0 --learning-rate 1e-3 --work-dir runs/merge-methods-toy-lr1e-3
    python bench/merge_methods_toy.py --smoke   # tiny world, 8 training and 4 held-out prompts per domain: seconds

Per seed, in `<work-dir>/seed<N>/`:
1. three copies of the toy world's pivot (default preset, world seed 0), each fine-tuned (`train_sft`) on 500
   training prompts of one domain with their gold answers, all with the same settings (`SFT`); the seed is the
   SFT seed (init of the data order) and the seed of the drawn training prompts;
2. one merge per method of `METHODS` (`run_merge`), the pivot as base and the three copies as models, the seed
   as the merge seed (DARE / DELLA masks); then TIES at RSAF's realised average density (same weights, lambda);
3. diagnostics: each copy's task vector alone, scaled by 1/3 and 2/3 (what averaging does to it), and the task
   vectors' norms and cosines;
4. greedy held-out accuracy (toy verifiers, 100 held-out prompts per domain drawn with the seed) of the pivot,
   the copies and every merge.
Every model and every evaluation is cached per (seed, method): a rerun skips finished work. A work dir keeps
one setting (`settings.json`): other settings need another `--work-dir`.

Parameter choices (every other value is the method's default): `weight: 1.0` per model where a weight is
required; `density: 0.5` for TIES, DARE, breadcrumbs and DELLA, whose default density 1.0 turns their
sparsification off (DARE would be task arithmetic); slerp takes exactly two models, so it interpolates the
compare copy (t = 0) and the strings copy (t = 1) at t = 0.5; SCE, Model Stock and RSAF need nothing.

Prints Markdown tables (rows = models, columns = domains then their average, mean ± standard deviation over
seeds), writes `<out>/merge_methods_toy.png` (grouped bars with error bars) and `<out>/merge_methods_toy.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from _seeds import cached_json, chart, markdown, timed
from rich.console import Console

from polyfuse.data.io import atomic_write_text, write_json
from polyfuse.data.schemas import SFTRow
from polyfuse.evaluation import evaluate
from polyfuse.merge import MergeConfig, MergeOptions, load_merge_config, run_merge
from polyfuse.merge.executor import read_task
from polyfuse.merge.methods.sparsify import keep_count
from polyfuse.merge.plan import build_plan
from polyfuse.merge.sources import FLOAT_DTYPES, ModelReader
from polyfuse.models import ModelSpec
from polyfuse.scorers import build_scorer
from polyfuse.toyworld import ToyWorldConfig, build_world
from polyfuse.trainers import SFTTrainConfig, train_sft

TRAIN_PER_DOMAIN = 500  # distinct training prompts per copy
HELDOUT_PER_DOMAIN = 100
SMOKE = {"preset": "tiny", "train_per_domain": 8, "heldout_per_domain": 4}  # `--smoke`: the plumbing in seconds
SFT = dict(learning_rate=3e-4, epochs=15, batch_size=32, max_length=64, warmup_ratio=0.05, logging_steps=50)
DENSITY = 0.5  # for the methods whose default density (1.0) means "no sparsification" (see METHODS)
SLERP_PAIR = ("compare", "strings")  # slerp takes exactly two models: t = 0 is the first, t = 1 the second
SLERP_T = 0.5
RSAF_KEY = "rsaf"
MATCHED_KEY = "ties_matched"
PIVOT = "pivot"


@dataclass(frozen=True)
class Method:
    """One merge: `method` with global `parameters` and per-model `model_parameters` (the same for every copy),
    of the copies of `domains` (all three when None; for slerp the first is the base, t = 0)."""

    key: str
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    model_parameters: dict[str, Any] = field(default_factory=dict)
    domains: tuple[str, ...] | None = None
    title: str | None = None  # the table label; default the key

    @property
    def label(self) -> str:
        if self.key == MATCHED_KEY:
            return f"{self.key} (density {self.model_parameters['density']:.3g})"
        return self.title or self.key


WEIGHT = {"weight": 1.0}
SPARSE = {"weight": 1.0, "density": DENSITY}
METHODS = [
    Method("linear", "linear", model_parameters=WEIGHT),  # normalize (default): the plain mean of the copies
    Method("task_arithmetic", "task_arithmetic", model_parameters=WEIGHT),
    Method("ties", "ties", model_parameters=SPARSE),
    Method("dare_linear", "dare_linear", model_parameters=SPARSE),
    Method("dare_ties", "dare_ties", model_parameters=SPARSE),
    Method("breadcrumbs", "breadcrumbs", model_parameters=SPARSE),
    Method("breadcrumbs_ties", "breadcrumbs_ties", model_parameters=SPARSE),
    Method("della", "della", model_parameters=SPARSE),
    Method("della_linear", "della_linear", model_parameters=SPARSE),
    Method("sce", "sce"),
    Method("model_stock", "model_stock"),
    Method(RSAF_KEY, "rsaf"),
    Method("slerp", "slerp", parameters={"t": SLERP_T}, domains=SLERP_PAIR),
]
SCALED_PREFIX = "pivot + "
SCALES = (1 / 3, 2 / 3)  # diagnostic: one copy's task vector alone, shrunk as averaging shrinks it


def scaled(domain: str, scale: float) -> Method:
    """pivot + scale * (copy - pivot) for one copy: how much of its skill survives a shrunk task vector."""
    return Method(f"scaled_{domain}_{scale:.2f}", "task_arithmetic", model_parameters={"weight": round(scale, 4)},
                  domains=(domain,), title=f"{SCALED_PREFIX}{scale:.2f} × task vector [{domain}]")


# ----------------------------------------------------------------------------------------------- helpers
def spec(label: str, path: str | Path) -> ModelSpec:
    return ModelSpec(name=label, path=str(path))


# ------------------------------------------------------------------------------------------------ copies
def sft_rows(world, domain: str, seed: int, count: int) -> list[SFTRow]:
    """The domain's training prompts with their gold answers as SFT rows (the split never overlaps held-out)."""
    prompts = world.prompts("train", per_domain=count, domains=[domain], seed=seed)
    return [SFTRow(id=p.id, prompt=p.prompt, completion=p.answer, domain=p.domain) for p in prompts]


def train_copy(world, domain: str, seed: int, sft: dict[str, Any], count: int, folder: Path) -> Path:
    """The pivot fine-tuned on `count` prompts of one domain; `done.json` marks a finished copy."""
    model = folder / "model"
    if not (folder / "done.json").is_file():
        config = SFTTrainConfig(**sft, seed=seed)
        train_sft(spec(PIVOT, world.pivot_path), sft_rows(world, domain, seed, count), config, model)
        write_json(folder / "done.json", {"domain": domain, "seed": seed, "sft": config.model_dump(mode="json")})
    return model


# ------------------------------------------------------------------------------------------------ merges
def merge_config(method: Method, base: Path, copies: dict[str, Path], seed: int) -> dict[str, Any]:
    """The mergekit-style config of one merge: base the pivot (slerp: the first of its copies)."""
    models = [copies[d] for d in method.domains or copies]
    if method.method == "slerp":
        base, models = models[0], models[1:]
    return {
        "merge_method": method.method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": dict(method.model_parameters)} for m in models],
        "parameters": {**method.parameters, "seed": seed},
        "dtype": "float32",
    }


def merge(method: Method, base: Path, copies: dict[str, Path], seed: int, folder: Path) -> tuple[MergeConfig, Path]:
    """Write the config next to the output and merge (the engine resumes or skips a finished output)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "merge.yaml"
    atomic_write_text(path, yaml.safe_dump(merge_config(method, base, copies, seed), sort_keys=False))
    cfg = load_merge_config(path)
    run_merge(cfg, folder / "model", str(path), MergeOptions(quiet=True, smoke_check=False), Console(quiet=True))
    return cfg, folder / "model"


def realised_density(cfg: MergeConfig) -> float:
    """RSAF's parameter-count-weighted mean keep ratio over every merged float tensor and source, as
    `magnitude_trim` realises it (floor(k n) of n entries): the method's own statistics pass and
    `keep_ratios` hook, on the same plan and tensors as the engine."""
    method = cfg.method()()
    plan = build_plan(cfg, "rsaf")
    floats = [t for t in plan.tensors if t.dtype in FLOAT_DTYPES]
    readers = [ModelReader(s) for s in plan.inputs]
    try:
        per_tensor = {t.name: method.tensor_statistics(read_task(method, plan, readers, t, {})) for t in floats}
        statistics_ = method.finish_statistics(per_tensor)
        kept = total = 0
        for tensor in floats:
            numel = math.prod(tensor.shape)
            for k in method.keep_ratios(read_task(method, plan, readers, tensor, statistics_)):
                kept += keep_count(k, numel, tensor.name)
                total += numel
    finally:
        for reader in readers:
            reader.close()
    return kept / total


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def task_vector_stats(base: Path, copies: dict[str, Path]) -> dict[str, Any]:
    """Why merges fail or work: each task vector's norm relative to the base's, the share of its squared norm in
    the (tied) embedding, and the cosine between every two task vectors (all tensors flattened together)."""
    theta = weights(base)
    taus = {d: {k: v - theta[k] for k, v in weights(path).items()} for d, path in copies.items()}
    flat = {d: torch.cat([t.reshape(-1) for t in tau.values()]) for d, tau in taus.items()}
    base_norm = float(torch.cat([t.reshape(-1) for t in theta.values()]).norm())
    return {
        "relative_norm": {d: float(f.norm()) / base_norm for d, f in flat.items()},
        "embedding_share": {d: float(sum(t.pow(2).sum() for k, t in tau.items() if "embed" in k) / flat[d].pow(2).sum())
                            for d, tau in taus.items()},
        "cosine": {f"{a}/{b}": float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0))
                   for a, b in itertools.combinations(flat, 2)},
    }


# ------------------------------------------------------------------------------------------------ one seed
class SeedRun:
    """Copies, merges and evaluations of one seed, each cached in `folder`."""

    def __init__(self, world, seed: int, sft: dict[str, Any], sizes: dict[str, Any], folder: Path):
        self.world, self.seed, self.sft, self.folder = world, seed, sft, folder
        self.train_per_domain = sizes["train_per_domain"]
        self.prompts = world.prompts("heldout", per_domain=sizes["heldout_per_domain"], seed=seed)
        self.scorers = [build_scorer({"type": "toyworld"})]
        self.times_path = folder / "timings.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.is_file() else {}
        self.accuracy: dict[str, dict] = {}
        self.extra: dict[str, Any] = {}

    def evaluate(self, key: str, label: str, path: Path | Callable[[], Path]) -> None:
        """Accuracy of the model at `path` (or made by `path()`), cached in `eval/<key>.json`."""

        def compute() -> dict:
            model = path() if callable(path) else path
            result = evaluate(spec(label, model), self.prompts, self.scorers, batch_size=256, max_new_tokens=16,
                              quiet=True)
            return result.summary()

        self.accuracy[label] = timed(self.times, key, lambda: cached_json(self.folder / "eval" / f"{key}.json", compute))

    def run(self) -> dict[str, Any]:
        torch.manual_seed(self.seed)
        try:
            self.evaluate(PIVOT, "pivot", self.world.pivot_path)
            copies = {d: timed(self.times, f"sft {d}", lambda d=d: train_copy(
                self.world, d, self.seed, self.sft, self.train_per_domain, self.folder / "copies" / d))
                      for d in self.world.domains}
            for domain, path in copies.items():
                self.evaluate(f"copy_{domain}", f"pivot+SFT[{domain}]", path)
            self.extra["task_vectors"] = task_vector_stats(self.world.pivot_path, copies)
            for method in METHODS:
                self.merge_and_evaluate(method, copies)
            for domain in self.world.domains:
                for scale in SCALES:
                    self.merge_and_evaluate(scaled(domain, scale), copies)
            density = cached_json(self.folder / "rsaf_density.json", lambda: {"density": realised_density(
                self.merge(Method(RSAF_KEY, "rsaf"), copies)[0])})["density"]
            self.extra["rsaf_density"] = density
            self.merge_and_evaluate(Method(MATCHED_KEY, "ties", model_parameters={"weight": 1.0, "density": round(density, 4)}),
                                    copies)
        finally:
            write_json(self.times_path, self.times)
        return {"seed": self.seed, "accuracy": self.accuracy, **self.extra, "timings_s": self.times,
                "wall_s": round(sum(self.times.values()), 1)}

    def merge(self, method: Method, copies: dict[str, Path]) -> tuple[MergeConfig, Path]:
        return merge(method, self.world.pivot_path, copies, self.seed, self.folder / "merges" / method.key)

    def merge_and_evaluate(self, method: Method, copies: dict[str, Path]) -> None:
        self.evaluate(method.key, method.label, lambda: self.merge(method, copies)[1])


# ------------------------------------------------------------------------------------------------ report
def row_labels(runs: list[dict]) -> list[str]:
    """Labels in first-seed order; the matched-TIES label carries each seed's density, so it is renamed."""
    return [label for label in runs[0]["accuracy"] if not label.startswith(MATCHED_KEY)] + [MATCHED_KEY]


def unify_matched(runs: list[dict]) -> None:
    for run in runs:
        for label in [lb for lb in run["accuracy"] if lb.startswith(MATCHED_KEY)]:
            run["accuracy"][MATCHED_KEY] = run["accuracy"].pop(label)


def rsaf_vs_ties(runs: list[dict]) -> str:
    """Per seed: RSAF's realised density, RSAF and matched-TIES average accuracy, and the difference."""
    lines = ["| seed | RSAF density | RSAF average | TIES (matched) average | RSAF − TIES |",
             "|---|---:|---:|---:|---:|"]
    for run in runs:
        rsaf, ties = (100 * run["accuracy"][k]["average"] for k in (RSAF_KEY, MATCHED_KEY))
        lines.append(f"| {run['seed']} | {run['rsaf_density']:.4f} | {rsaf:.1f} | {ties:.1f} | {rsaf - ties:+.1f} |")
    return "\n".join(lines)


def task_vector_table(runs: list[dict]) -> str:
    """Mean over seeds of each task vector's relative norm and embedding share, and of the pairwise cosines."""
    first = runs[0]["task_vectors"]
    mean = lambda key, name: statistics.mean(r["task_vectors"][key][name] for r in runs)  # noqa: E731
    lines = ["| task vector | ‖τ‖ / ‖θ_pivot‖ | share of ‖τ‖² in the embedding |", "|---|---:|---:|"]
    lines += [f"| {d} | {mean('relative_norm', d):.3f} | {mean('embedding_share', d):.2f} |" for d in first["relative_norm"]]
    lines += ["", "| pair | cosine |", "|---|---:|"]
    lines += [f"| {pair} | {mean('cosine', pair):.2f} |" for pair in first["cosine"]]
    return "\n".join(lines)


def settings(sft: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    return {"world": f"{sizes['preset']} preset, world seed 0", "train_per_domain": sizes["train_per_domain"],
            "heldout_per_domain": sizes["heldout_per_domain"], "sft": sft, "density": DENSITY,
            "slerp": {"base": SLERP_PAIR[0], "model": SLERP_PAIR[1], "t": SLERP_T},
            "methods": {m.key: {"method": m.method, "parameters": m.parameters, "model_parameters": m.model_parameters}
                        for m in METHODS}}


def check_settings(work_dir: Path, current: dict[str, Any]) -> None:
    """The cache holds one setting: a work dir made with other settings is refused, never mixed."""
    path = work_dir / "settings.json"
    saved = cached_json(path, lambda: current)
    if saved != json.loads(json.dumps(current)):
        raise SystemExit(f"{path}: made with other settings; use another --work-dir (or delete it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/merge-methods-toy"))
    parser.add_argument("--learning-rate", type=float, default=SFT["learning_rate"], help="of the copies' SFT")
    parser.add_argument("--epochs", type=float, default=SFT["epochs"], help="of the copies' SFT")
    parser.add_argument("--out", type=Path, help="where the PNG and JSON go (default: the work dir)")
    parser.add_argument("--smoke", action="store_true", help="the tiny world, 8 training and 4 held-out prompts per "
                        "domain, one epoch, seed 0 (default work dir runs/merge-methods-toy-smoke): seconds")
    args = parser.parse_args()
    sizes = {"preset": "default", "train_per_domain": TRAIN_PER_DOMAIN, "heldout_per_domain": HELDOUT_PER_DOMAIN}
    if args.smoke:
        sizes, args.seeds, args.epochs = SMOKE, [0], 1.0
        if args.work_dir == parser.get_default("work_dir"):
            args.work_dir = Path("runs/merge-methods-toy-smoke")
    out = args.out or args.work_dir
    out.mkdir(parents=True, exist_ok=True)
    sft = {**SFT, "learning_rate": args.learning_rate, "epochs": args.epochs}
    check_settings(args.work_dir, settings(sft, sizes))
    torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to oversubscription
    started = time.perf_counter()
    world = build_world(ToyWorldConfig.preset(sizes["preset"]), progress=False)
    runs = [SeedRun(world, seed, sft, sizes, args.work_dir / f"seed{seed}").run() for seed in args.seeds]
    unify_matched(runs)
    columns = [*world.domains, "average"]
    labels = [label for label in row_labels(runs) if not label.startswith(SCALED_PREFIX)]
    diagnostic = [label for label in row_labels(runs) if label.startswith("pivot")]  # pivot, copies, scaled
    tables = {"methods": markdown(runs, labels, columns), "scaled task vectors": markdown(runs, diagnostic, columns),
              "rsaf vs ties": rsaf_vs_ties(runs), "task vectors": task_vector_table(runs)}
    print(f"\nSeeds {args.seeds}; held-out accuracy (%), mean ± standard deviation over seeds.")
    for name, table in tables.items():
        print(f"\n{name}:\n\n{table}")
    chart(runs, labels, columns, out / "merge_methods_toy.png", "Merging domain-specialised pivot copies",
          lambda label: label.startswith("pivot"))
    wall = round(time.perf_counter() - started, 1)
    write_json(out / "merge_methods_toy.json",
               {"seeds": args.seeds, "settings": settings(sft, sizes), "scales": SCALES, "runs": runs, "tables": tables,
                "wall_s_this_invocation": wall})
    print(f"\nwall time (this invocation): {wall}s; per seed (uncached work): {[r['wall_s'] for r in runs]}")
    print(f"wrote {out / 'merge_methods_toy.png'} and {out / 'merge_methods_toy.json'}")


if __name__ == "__main__":
    main()
