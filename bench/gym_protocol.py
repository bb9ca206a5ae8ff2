"""The fair protocol (issue 21 items 4 and 6; /shared/methods/evidence-protocol.md section 3): every method
family on one toy world, the same data per family, the same tuning budget, >= 5 seeds, paired intervals.

    python bench/gym_protocol.py --preset tiny                       # every family, 5 seeds, 3 learning rates
    python bench/gym_protocol.py --preset gym --families merge       # one family
    python bench/gym_protocol.py --smoke                             # tiny world, 1 seed, 1 rate, few items
    python bench/gym_protocol.py --preset gym --families unpaired --seeds 3 --data-only   # one seed's data, in parallel
    python bench/gym_protocol.py --preset gym --jobs 2               # two worker processes, the longest units first

The recipe, per family (`FAMILIES`; adding a family is adding one function to it):
1. **Data, built once per seed and shared by every method of the family**: the family's recipe (the
   `<name>-gym.yaml` recipe on a gym preset, else `<name>-toy.yaml`) run up to its data stages by the
   pipeline (prompts, samples, scores, pairs, SFT, log-probs / teacher outputs), each stage cached.
2. **Tuning**: every trained method gets the same grid, `--lr-scales` times its recipe's learning rate at its
   default beta, trained with seed 0 and scored on the **validation** items; the rate with the best average
   accuracy wins (ties: the lower gold bits per byte).
3. **Reporting**: the chosen rate trained with every seed (`--seeds`, >= 5) and scored on the **test** items.
   A seed sets sampling, the SFT/PO split, training order and dropout; validation and test items are the
   same for every seed and method (drawn with seed 0).
4. **Evidence**: per-item verdicts and gold bits per byte of every test run go through
   `polyfuse.evaluation.evidence` to `<out>/<preset>-<family>.json` (paired bootstrap over seeds and items),
   with every method against SFT and against DPO (where the family has them) and the pairs the hypotheses
   need; a table of paired differences with 95% intervals and a PNG with error bars; then the hypotheses
   table H1-H12 (held / not held / inconclusive / not run) over every family's file in `<out>`, also written to
   `<out>/<preset>-hypotheses.md`.

Families: `implicit` (the pivot, SFT, FuseChat-3.0 SFT+DPO, DPO, WRPO, InfiFPO max-margin / confidence /
average, without clipping, without LN, the sources and the oracle = best source per domain on validation),
`merge` (the base, each specialist, the multitask fine-tune, linear, task arithmetic, TIES, RSAF and TIES at
RSAF's realised density; specialists are the gym's LoRA copies on a gym preset, else full fine-tunes of the
pivot as bench/merge_methods_toy.py makes them), `distill` (SFT on gold texts vs ULD with uncertainty /
average weighting and FuseLLM MinCE on the same texts), `unpaired` (CGPO and KTO on the cgpo recipe's
desirable / undesirable rows, issue 24), `onpolicy` (issue 25: from the distill family's SFT model of each seed,
X-Token P-KL off-policy on the gold texts vs on the student's samples, MOPD-routed teachers vs the best one, GOLD,
ULD and polyfuse's hybrid on the student's samples).

Every data run goes through one stage cache (`stage_cache`): a stage or sampling shard that another run of the
protocol finished with the same fingerprint is taken as hard links (the implicit and unpaired families train each
seed's SFT model once and sample the sources once). `--jobs N` shares the families' work (`WORK_UNITS`) between N
worker processes through the cache's file locks, then writes the reports and the hypotheses table once.

Resumable: every training run and every evaluation is cached under `--work-dir/<preset>-<hash of preset, item
counts, smoke>/` by its inputs (family, seed, method, learning rate; an evaluation by model folder and split), so a
rerun after a kill, or with more seeds or rates, redoes nothing finished.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import _uld_stats
import explicit_fusion
import infifpo_ablation
import merge_methods_toy
import numpy as np
from _seeds import cached_json

from polyfuse.data.io import atomic_write_text, read_rows, write_json, write_rows
from polyfuse.data.schemas import PreferenceRow, PromptRow, SampleRow, SFTRow, UnpairedRow
from polyfuse.evaluation import evaluate
from polyfuse.evaluation.evidence import Evidence, build_evidence, read_evidence, write_evidence
from polyfuse.evaluation.stats import AVERAGE, ItemScores
from polyfuse.models import ModelSpec
from polyfuse.objectives import DISTILL_OBJECTIVES
from polyfuse.pairs import run_pairs
from polyfuse.pipeline.demo import recipe_path
from polyfuse.pipeline.recipe import Recipe, load_recipe
from polyfuse.pipeline.runner import run_recipe
from polyfuse.scorers import build_scorer
from polyfuse.toyworld import ToyWorldConfig, build_world
from polyfuse.trainers import OnPolicyTrainConfig, SFTTrainConfig, train_sft, train_unpaired
from polyfuse.trainers.onpolicy import train_onpolicy

Scores = dict[str, ItemScores]  # domain -> one model's items
Runs = dict[int, Scores]  # seed -> domain -> items

# Barely trained tiny models are never verifier-correct: their responses are ranked by the reward model alone.
TINY_PRESETS = {"tiny", "gym-tiny"}
TINY = ["score.scorers=[{type: reward_model, name: rm, normalize: sigmoid, batch_size: 256, "
        "model: {path: toyworld://reward_model}}]", "pairs.gap_window=null"]
SMOKE = ["prompts.toyworld.per_domain=8", "sample.chunk_size=8", "sft.epochs=1", "sft.batch_size=4",
         "po.epochs=1", "po.batch_size=4", "distill.epochs=1", "distill.batch_size=4"]


# The grid, in multiples of each method's recipe learning rate. The preference families go down to a tenth: their
# recipes' 3e-4 overshoots on the gym: on 1/3, 1, 3 every PO and unpaired objective chose the lowest rate, accuracy
# falling with the rate; on 0.1, 0.3, 1 the implicit methods chose 0.1, and DPO at 1/30 did no better (results.md).
DEFAULT_LR_SCALES = [1 / 3, 1.0, 3.0]
# Each family's grid as its evidence file records it: the preference families' recipes overshoot at their rate, and
# the distill and on-policy grids were extended below their edge (docs/design.md), so one command reruns them all.
LR_SCALES = {"implicit": [0.1, 0.3, 1.0], "unpaired": [0.1, 0.3, 1.0], "distill": [1 / 9, 1 / 3, 1.0, 3.0],
             "onpolicy": [1 / 81, 1 / 27, 1 / 9, 1 / 3, 1.0, 3.0]}


@dataclass(frozen=True)
class Protocol:
    """What one run of the protocol is: the world, the seeds, the grid and the item counts."""

    preset: str
    seeds: list[int]
    lr_scales: list[float] | None  # None: each family's own grid (`LR_SCALES`)
    kd_scales: list[float]  # the distillation term's weight: multiples of each distillation method's default
    items: dict[str, int]  # split (validation, test) -> items per domain
    smoke: bool
    root: Path  # the cache of this setting
    out: Path
    methods: tuple[str, ...] = ()  # the trained methods to run (empty: all); baselines always run
    cgpo_ablations: bool = False  # CGPO's one-change variants (issue 24), a diagnosis rather than a hypothesis

    @classmethod
    def make(cls, args: argparse.Namespace) -> Protocol:
        items = {"validation": args.validation_items, "test": args.items}
        settings = dict(preset=args.preset, items=items, smoke=args.smoke)  # seeds and rates have their own folders
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        return cls(args.preset, args.seeds, args.lr_scales, args.kd_scales, items, args.smoke,
                   args.work_dir / f"{args.preset}-{key}", args.out, tuple(args.methods or ()), args.cgpo_ablations)

    def grid(self, family: str) -> list[float]:
        """The learning-rate multiples a family's methods are tuned over."""
        return self.lr_scales or LR_SCALES.get(family, DEFAULT_LR_SCALES)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """One process at a time through a data run, a training or an evaluation, so that protocol processes started
    side by side (`--data-only` seeds, single rates) on one cache wait for each other's work instead of redoing it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def stage_cache(protocol: Protocol) -> Path:
    """Where every data run of the protocol shares finished work by content (`run_recipe`'s stage cache): the
    implicit and unpaired families' recipes differ only after their SFT data, so each seed's SFT model is trained
    once, and the sources' samples (the implicit recipe also samples the pivot) are drawn once; KTO's data run and
    CGPO's data ablations take CGPO's stages of equal fingerprints."""
    return protocol.root / "stages"


# ------------------------------------------------------------------------------------------------ the world
@cache
def world(preset: str):
    return build_world(ToyWorldConfig.preset(preset), progress=False)


def is_gym(preset: str) -> bool:
    """A fusion gym: three-way split domains, shared-base specialists, gold texts (toy world v2)."""
    return getattr(world(preset), "is_gym", False)


@cache
def eval_items(preset: str, split: str, per_domain: int) -> tuple[PromptRow, ...]:
    """The validation or test items (seed 0, the same for every run). A world without a validation split (the
    v1 presets) gives its held-out items alternately to validation and test: disjoint, both held out (the
    first `per_domain` of each)."""
    if is_gym(preset):
        return tuple(world(preset).prompts(split, per_domain=per_domain, seed=0))
    rows = world(preset).prompts("heldout", per_domain=2 * per_domain, seed=0)
    by_domain: dict[str, list[PromptRow]] = {}
    for row in rows:
        by_domain.setdefault(row.domain, []).append(row)
    start = 0 if split == "validation" else 1
    return tuple(row for found in by_domain.values() for row in found[start::2])


# ------------------------------------------------------------------------------------------------ evaluation
def scores(protocol: Protocol, spec: ModelSpec, split: str) -> Scores:
    """Per-item verdicts and gold bits per byte of one model on one split, cached by the model's folder (a
    model at one path is scored once, whichever rows share it)."""

    def compute() -> dict:
        items = list(eval_items(protocol.preset, split, protocol.items[split]))
        say(f"evaluate {spec.path} on {len(items)} {split} items")
        result = evaluate(spec, items, [build_scorer({"type": "toyworld"})], batch_size=256, max_new_tokens=16,
                          quiet=True)
        record = {r.prompt_id: r for r in result.records}
        out: dict[str, dict] = {}
        for item in items:  # the items' order, the same for every model
            found = out.setdefault(item.domain, {"correct": "", "bpb": []})
            found["correct"] += "1" if record[item.id].correct else "0"
            found["bpb"].append(record[item.id].bpb)
        return out

    path = eval_path(protocol, spec, split)
    with exclusive(path.with_suffix(".lock")):
        data = cached_json(path, lambda: timed(path.with_suffix(".cost.json"), compute))
    return {d: ItemScores(np.array([c == "1" for c in v["correct"]]), np.array(v["bpb"], dtype=float))
            for d, v in data.items()}


def eval_path(protocol: Protocol, spec: ModelSpec, split: str) -> Path:
    """Keyed by the model's folder; a model a stage took over from another run (the stage cache: the unpaired
    family's SFT model is the implicit family's) by that run's folder, so that it is evaluated once."""
    model = Path(spec.path)
    manifest = model.parent / "manifest.json"
    if manifest.is_file() and (source := json.loads(manifest.read_text()).get("reused_from")):
        model = Path(source) / model.name
    key = hashlib.sha256(str(model.resolve()).encode()).hexdigest()[:16]
    return protocol.root / "eval" / key / f"{split}.json"


T = TypeVar("T")


def timed(record: Path, work: Callable[[], T]) -> T:
    """`work`'s result; its wall time and the machine's 1-minute load average before and after it go to `record`,
    so that the cost of a cached result is still known when a rerun reads it (the machine is shared)."""
    started, load = time.perf_counter(), os.getloadavg()[0]
    result = work()
    write_json(record, {"wall_s": round(time.perf_counter() - started, 1),
                        "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)]})
    return result


def cost(records: list[Path]) -> dict[str, Any]:
    """Total wall time of the recorded runs and the load range they ran under (runs made before costs were
    recorded are counted as untimed)."""
    found = [json.loads(p.read_text()) for p in records if p.is_file()]
    loads = [x for f in found for x in f["load_1min"]]
    return {"runs": len(records), "untimed": len(records) - len(found),
            "wall_s": round(sum(f["wall_s"] for f in found), 1),
            "load_1min": [min(loads), max(loads)] if loads else None}


def accuracy(found: Scores) -> tuple[float, float]:
    """(average accuracy, average gold bits per byte) over domains: the selection rule's key."""
    acc = np.mean([np.mean(s.correct) for s in found.values()])
    bpb = np.mean([np.mean(s.bpb) for s in found.values()])
    return float(acc), float(bpb)


def spec_at(recipe: Recipe, path: str | Path, name: str = "pivot") -> ModelSpec:
    """The pivot's spec (template, settings) pointing at a trained folder."""
    return recipe.pivot.model_copy(update={"path": str(path), "gguf_file": None, "name": name})


# ------------------------------------------------------------------------------------------------ the table
def run_folder(folder: Path, lr: float, seed: int, kd: float = 1.0) -> Path:
    """One training run's folder under its method's; a distillation weight other than the default (x1) adds to the
    rate's name, so the default keeps the folder it had before the weight was tuned."""
    return folder / (f"lr{lr:.3g}" + ("" if kd == 1.0 else f"-kd{kd:.3g}")) / f"seed{seed}"


Train = Callable[[int, float, Path], Path | None]  # (seed, learning rate, folder) -> model folder; None: no data


@dataclass
class Family:
    """One family's rows: method -> seed -> domain -> test items, and how each was tuned."""

    name: str
    protocol: Protocol
    spec: Callable[[Path], ModelSpec]  # a trained model's spec from its folder
    runs: dict[str, Runs] = field(default_factory=dict)
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)
    folders: dict[str, Path] = field(default_factory=dict)  # tuned method -> where its runs live
    notes: list[str] = field(default_factory=list)
    data: dict[int, dict[str, Any]] = field(default_factory=dict)  # seed -> what its shared data holds and cost

    @property
    def folder(self) -> Path:
        return self.protocol.root / self.name

    def fixed(self, method: str, spec: ModelSpec) -> Scores:
        """A model no seed changes (the pivot, a source): its test items stand for every seed."""
        found = scores(self.protocol, spec, "test")
        self.runs[method] = dict.fromkeys(self.protocol.seeds, found)
        return found

    def per_seed(self, method: str, model: Callable[[int], Path]) -> None:
        """A model per seed at one setting (SFT, a specialist, a merge)."""
        self.runs[method] = {seed: scores(self.protocol, self.spec(model(seed)), "test") for seed in self.protocol.seeds}

    def chosen_model(self, method: str, seed: int) -> Path:
        """The model folder of a tuned method's chosen setting at `seed`."""
        chosen = self.chosen[method]
        return run_folder(self.folders[method], chosen["learning_rate"], seed, chosen.get("kd_scale", 1.0)) / "model"

    def tuned(self, method: str, base_lr: float, train: Train, folder: Path | None = None,
              seeds: list[int] | None = None, kd_scales: Sequence[float] | None = None,
              scales: Sequence[float] | None = None) -> None:
        """The protocol for one trained method: the grid with seed 0 on validation, then every seed on test. `folder`:
        where its runs live when another family shares them (default: this family's folder); `seeds` (default the
        protocol's): `[]` only chooses the rate, whose other seeds a later call trains and scores. A distillation
        method (`kd_scales` given; `train` then takes the scale as a fourth argument) also tunes the weight of its
        distillation term, coordinate-wise: the rate at the method's default weight first, then each multiple of
        that weight in `kd_scales` at the chosen rate (1 = the default, already trained). `scales` (default the
        family's grid): `[1.0]` trains `base_lr` alone, an ablation at its parent method's chosen rate."""
        if self.protocol.methods and method not in self.protocol.methods:
            return
        folder = self.folders.setdefault(method, folder or self.folder / method)
        evaluations: list[Path] = []

        def trained(seed: int, lr: float, kd: float = 1.0) -> Path | None:
            started, run = time.perf_counter(), run_folder(folder, lr, seed, kd)
            with exclusive(run / "train.lock"):
                cached = (run / "model").is_dir()

                def work() -> Path | None:
                    return train(seed, lr, run) if kd_scales is None else train(seed, lr, run, kd)

                model = work() if cached else timed(run / "cost.json", work)
            if model is not None and not cached:
                say(f"{self.name}: trained {method} at {run.parent.name}, seed {seed} in "
                    f"{time.perf_counter() - started:.1f}s")
            return model

        def scored(model: Path, split: str) -> Scores:
            evaluations.append(eval_path(self.protocol, self.spec(model), split).with_suffix(".cost.json"))
            return scores(self.protocol, self.spec(model), split)

        grid = [base_lr * scale for scale in scales or self.protocol.grid(self.name)]
        validation: dict[tuple[float, float], tuple[float, float]] = {}

        def validate(lr: float, kd: float) -> bool:
            model = trained(0, lr, kd)
            if model is None:
                self.notes.append(f"{method}: no training data; not run")
                return False
            validation[(lr, kd)] = accuracy(scored(model, "validation"))
            return True

        def best(points: list[tuple[float, float]]) -> tuple[float, float]:
            return max(points, key=lambda point: (validation[point][0], -validation[point][1]))

        chosen = (grid[0], 1.0)
        weights = [kd for kd in kd_scales or [] if kd != 1.0]
        if len(grid) > 1 or weights:
            if not all(validate(lr, 1.0) for lr in grid):
                return
            chosen = best([(lr, 1.0) for lr in grid])
            if not all(validate(chosen[0], kd) for kd in weights):
                return
            chosen = best([chosen, *((chosen[0], kd) for kd in weights)])
        runs = {}
        for seed in self.protocol.seeds if seeds is None else seeds:
            model = trained(seed, *chosen)
            if model is None:
                self.notes.append(f"{method}: no training data; not run")
                return
            runs[seed] = scored(model, "test")
        if runs:
            self.runs[method] = runs
        trainings = [run_folder(folder, lr, seed, kd) / "cost.json" for lr, kd, seed in dict.fromkeys(
            [*((lr, kd, 0) for lr, kd in validation), *((*chosen, seed) for seed in runs)])]
        self.chosen[method] = {"learning_rate": chosen[0], **({"kd_scale": chosen[1]} if kd_scales else {}),
                               "validation": {grid_key(lr, kd if kd_scales else None): {"accuracy": 100 * a, "bpb": b}
                                              for (lr, kd), (a, b) in validation.items()},
                               "cost": {"training": cost(trainings), "evaluation": cost(evaluations)}}

    def picked(self, method: str, per_domain: dict[str, str]) -> None:
        """A row that takes each domain from another row (the oracle, each domain's own specialist)."""
        self.runs[method] = {seed: {d: self.runs[m][seed][d] for d, m in per_domain.items()}
                             for seed in self.protocol.seeds}
        self.chosen[method] = {"per_domain": per_domain}


def grid_key(lr: float, kd: float | None) -> str:
    """A grid point's name in the settings and the tables: the rate, and a distillation method's weight scale."""
    return f"{lr:.3g}" if kd is None else f"{lr:.3g} kd x{kd:.3g}"


def family_recipe(name: str, preset: str, overrides: list[str]) -> Recipe:
    """The family's recipe for this world: `<name>-gym.yaml` on a gym preset when it ships, else the toy one."""
    gym = recipe_path(f"{name}-gym.yaml")
    path = gym if preset.startswith("gym") and gym.is_file() else recipe_path(f"{name}-toy.yaml")
    return load_recipe(path, [f"toyworld.preset={preset}", *overrides])


def world_overrides(protocol: Protocol) -> list[str]:
    return [*(TINY if protocol.preset in TINY_PRESETS else []), *(SMOKE if protocol.smoke else [])]


def with_section(recipe: Recipe, section: str, seed: int, lr: float) -> Recipe:
    """The recipe with one training section at a seed and learning rate (everything else as given)."""
    return recipe.model_copy(update={section: getattr(recipe, section).model_copy(
        update={"seed": seed, "learning_rate": lr})})


def oracle(family: Family, sources: list[ModelSpec]) -> None:
    """Each source's test rows, and the oracle: per domain the source best on validation (ties: bpb)."""
    best: dict[str, tuple[tuple[float, float], str]] = {}
    for source in sources:
        family.fixed(source.label, source)
        valid = scores(family.protocol, source, "validation")
        for domain, found in valid.items():
            key = (float(np.mean(found.correct)), -float(np.mean(found.bpb)))
            if domain not in best or key > best[domain][0]:
                best[domain] = (key, source.label)
    family.picked("oracle", {d: label for d, (_, label) in sorted(best.items())})


# ------------------------------------------------------------------------------------------------ families
FUSECHAT_DPO = infifpo_ablation.Method("fusechat-dpo", "FuseChat-3.0 SFT+DPO", "dpo")
# method -> the ablation bench's row (objective, arguments; beta: the objective's default), in the order they run:
# the main comparisons first, so that a run cut short (and resumed later) has them; the InfiFPO ablations last.
IMPLICIT = {
    "dpo": "dpo", "fusechat-dpo": FUSECHAT_DPO.key, "infifpo-max-margin": "infifpo-max-margin", "wrpo": "wrpo",
    "infifpo-confidence": "infifpo-confidence", "infifpo-average": "infifpo-average",
    "infifpo-no-clip": "infifpo-max-margin-no-clip", "infifpo-no-ln": "infifpo-max-margin-no-ln",
}


def implicit(protocol: Protocol) -> Family:
    """Preference fusion on one recipe's data (infifpo): the same prompts, samples, SFT model and PO prompts for
    every method; DPO, InfiFPO on the cross-model pairs, WRPO on its triples, FuseChat-3.0 on intra-source pairs."""
    stages = "stages=[prompts, sample, score, pairs, sft, logprobs]"

    @cache
    def data(seed: int) -> tuple[Recipe, Any, ModelSpec]:
        recipe = family_recipe("infifpo", protocol.preset, [stages, f"seed={seed}", *world_overrides(protocol)])
        say(f"implicit: data of seed {seed} (prompts, samples, scores, pairs, SFT, log-probs)")
        folder = protocol.root / "implicit" / "data" / f"seed{seed}"
        with exclusive(folder.with_suffix(".lock")):  # `--jobs` runs the family's methods in two processes
            ctx = run_recipe(recipe, folder, quiet=True, stage_cache=stage_cache(protocol))
        return recipe, ctx, spec_at(recipe, ctx.output("sft", "model"))

    @cache
    def pairs(seed: int, method: str) -> Path:
        recipe, ctx, sft = data(seed)
        folder = protocol.root / "implicit" / "data" / f"seed{seed}"
        if method == "wrpo":
            return infifpo_ablation.build_wrpo_data(recipe, ctx, sft, folder / "wrpo")
        if method == "fusechat-dpo":  # FuseChat-3.0's rule and gap window on the same scored samples and split
            names = [s.label for s in recipe.sources]
            rows = [r for r in read_rows(ctx.output("score", "scored"), SampleRow) if r.model in names]
            window = family_recipe("fusechat3", protocol.preset, world_overrides(protocol)).pairs.gap_window
            config = recipe.pairs.model_copy(update={"pair_rule": "intra_source", "gap_window": window, "sources": names})
            return run_pairs(rows, config, folder / "fusechat-pairs")["preference"]
        return Path(ctx.output("logprobs", "preference"))

    recipe = data(protocol.seeds[0])[0]
    family = Family("implicit", protocol, lambda path: spec_at(recipe, path))
    family.fixed("pivot", recipe.pivot)
    family.per_seed("sft", lambda seed: Path(data(seed)[1].output("sft", "model")))
    rows = {m.key: m for m in [*infifpo_ablation.METHODS, FUSECHAT_DPO]}
    for method, row in ((k, rows[v]) for k, v in IMPLICIT.items()):
        def train(seed: int, lr: float, folder: Path, method: str = method, row=row) -> Path | None:
            recipe, _, sft = data(seed)
            path = pairs(seed, method)
            if not Path(path).read_text().strip():
                return None  # no pair qualified
            return infifpo_ablation.train_method(row, with_section(recipe, "po", seed, lr), sft, path, folder)

        family.tuned(method, recipe.po.learning_rate, train)
    oracle(family, list(recipe.sources))  # after the methods: fixed models, needed once, not first
    for seed in protocol.seeds:  # what each seed's data holds and cost (the rows built so far)
        folder = protocol.root / "implicit" / "data" / f"seed{seed}"
        ctx = data(seed)[1]
        built = {"cross-model": Path(ctx.output("logprobs", "preference")),
                 "fusechat": pairs(seed, "fusechat-dpo") if (folder / "fusechat-pairs").is_dir() else None,
                 "wrpo": pairs(seed, "wrpo") if (folder / "wrpo" / "preference.jsonl").is_file() else None}
        family.data[seed] = {
            "pairs_report": json.loads(Path(ctx.output("pairs", "report")).read_text()),
            "pairs": {rule: pair_stats(path) for rule, path in built.items() if path is not None},
            "stage_seconds": {stage: json.loads((folder / stage / "manifest.json").read_text()).get("wall_s")
                              for stage in ctx.outputs}}
    return family


def pair_stats(path: Path) -> dict[str, Any]:
    """How many pairs, how often each side is verifier-correct, who wrote the rejected side, and the margins the
    objectives start from: the reward model's and the reference (SFT) model's log-prob of chosen minus rejected."""
    rows = read_rows(path, PreferenceRow)
    if not rows:
        return {"pairs": 0}

    def mean(values: list[float | None]) -> float | None:
        found = [v for v in values if v is not None]
        return round(float(np.mean(found)), 4) if found else None

    authors: dict[str, int] = {}
    for row in rows:
        author = (row.rejected_id or "").split(":")[1] if (row.rejected_id or "").count(":") == 2 else "?"
        authors[author] = authors.get(author, 0) + 1
    return {"pairs": len(rows), "chosen_correct": mean([float(r.chosen_correct) for r in rows if r.chosen_correct is not None]),
            "rejected_correct": mean([float(r.rejected_correct) for r in rows if r.rejected_correct is not None]),
            "rejected_by": dict(sorted(authors.items())),
            "reward_margin": mean([r.chosen_reward - r.rejected_reward for r in rows
                                   if r.chosen_reward is not None and r.rejected_reward is not None]),
            "ref_logp_margin": mean([r.ref_chosen_logps - r.ref_rejected_logps for r in rows
                                     if r.ref_chosen_logps is not None and r.ref_rejected_logps is not None])}


MERGES = ["linear", "task_arithmetic", "ties", "rsaf"]


def merge(protocol: Protocol) -> Family:
    """Merges of domain specialists of one base against each specialist and the multitask fine-tune. A gym world
    ships them (LoRA fine-tunes of a shared base); elsewhere they are the pivot fine-tuned on one domain's gold
    answers per seed (merge_methods_toy's copies) and on all three (multitask)."""
    the_world = world(protocol.preset)
    gym = is_gym(protocol.preset)
    if gym:  # a gym's specialists and merges are fixed by the world and evaluated greedily: other seeds would be
        protocol = replace(protocol, seeds=protocol.seeds[:1])  # copies of the first, narrowing intervals falsely
    family = Family("merge", protocol, lambda path: merge_methods_toy.spec("model", path))
    sft = {**merge_methods_toy.SFT, **({"epochs": 1} if protocol.smoke else {})}
    count = merge_methods_toy.SMOKE["train_per_domain"] if protocol.smoke else merge_methods_toy.TRAIN_PER_DOMAIN
    if gym:
        base = the_world.merge_base_path

        def copies(seed: int) -> dict[str, Path]:
            return dict(the_world.specialist_paths)

        def multitask(seed: int) -> Path:
            return the_world.multitask_path
    else:
        base = the_world.pivot_path

        @cache
        def copies(seed: int) -> dict[str, Path]:
            say(f"merge: specialists of seed {seed}")
            return {d: merge_methods_toy.train_copy(the_world, d, seed, sft, count, family.folder / "copies" / f"seed{seed}" / d)
                    for d in the_world.domains}

        def multitask(seed: int) -> Path:
            model = family.folder / "multitask" / f"seed{seed}" / "model"
            if not model.is_dir():
                rows = [r for d in the_world.domains for r in merge_methods_toy.sft_rows(the_world, d, seed, count)]
                train_sft(family.spec(base), rows, SFTTrainConfig(**sft, seed=seed), model)
            return model

    family.fixed("base", family.spec(base))
    for domain in the_world.domains:
        family.per_seed(f"specialist-{domain}", lambda seed, d=domain: copies(seed)[d])
    family.picked("specialists", {d: f"specialist-{d}" for d in the_world.domains})
    family.per_seed("multitask", multitask)
    methods = {m.key: m for m in merge_methods_toy.METHODS}

    def merged(method: merge_methods_toy.Method, seed: int):
        seed = protocol.seeds[0] if gym else seed
        return merge_methods_toy.merge(method, base, copies(seed), seed, family.folder / "merges" / f"seed{seed}" / method.key)

    for key in MERGES:
        family.per_seed(key, lambda seed, m=methods[key]: merged(m, seed)[1])
    density = {seed: cached_json(merged(methods["rsaf"], seed)[1].parent / "density.json", lambda s=seed: {
        "density": merge_methods_toy.realised_density(merged(methods["rsaf"], s)[0])})["density"] for seed in protocol.seeds}
    family.per_seed("ties-matched", lambda seed: merged(merge_methods_toy.Method(
        "ties_matched", "ties", model_parameters={"weight": 1.0, "density": round(density[seed], 4)}), seed)[1])
    family.chosen["ties-matched"] = {"density": density}
    for method in [*MERGES, "ties-matched", "multitask"]:
        family.notes.append(f"{method}: normalised accuracy (FusionBench: / the domain's specialist) "
                            f"{normalised_accuracy(family, method)}")
    stats = merge_methods_toy.task_vector_stats(base, copies(protocol.seeds[0]))
    norms = {d: round(v, 4) for d, v in stats["relative_norm"].items()}
    shares = {d: round(v, 3) for d, v in stats["embedding_share"].items()}
    family.notes.append(f"task vectors (seed {protocol.seeds[0]}): ||tau||/||theta|| {norms}, "
                        f"share of ||tau||^2 in the embedding {shares}")
    return family


def normalised_accuracy(family: Family, method: str) -> dict[str, float | None]:
    """Per domain, the method's test accuracy over its own specialist's (means over seeds); None where the
    specialist scores 0."""

    def mean(row: str, domain: str) -> float:
        return float(np.mean([np.mean(runs[domain].correct) for runs in family.runs[row].values()]))

    return {d: round(mean(method, d) / mean("specialists", d), 3) if mean("specialists", d) else None
            for d in family.runs["specialists"][family.protocol.seeds[0]]}


DISTILL = {  # method -> the explicit-fusion bench's row
    "uld-uncertainty": explicit_fusion.Method("uld-uncertainty", "ULD (uncertainty)", "uld", {"weighting": "uncertainty"}),
    "uld-average": explicit_fusion.Method("uld-average", "ULD (average)", "uld", {"weighting": "average"}),
    "fusellm-min-ce": explicit_fusion.Method("fusellm-min-ce", "FuseLLM (MinCE)", "fusellm", {"fusion": "min_ce"},
                                             with_pivot=True),
}


def gold_texts(protocol: Protocol) -> Path:
    """Training texts no teacher wrote: a gym's gold texts, else train prompts with their gold answers."""
    the_world = world(protocol.preset)
    if getattr(the_world, "is_gym", False):
        return the_world.gold_texts_path
    path = protocol.root / "distill" / "gold.jsonl"
    if not path.is_file():
        per_domain = 8 if protocol.smoke else 300
        prompts = the_world.prompts("train", per_domain=per_domain, seed=0)
        write_rows(path, [SFTRow(id=p.id, prompt=p.prompt, completion=p.answer, domain=p.domain, source="gold")
                          for p in prompts])
    return path


def sft_gold(family: Family, seeds: list[int] | None = None) -> Callable[[int], Path]:
    """SFT on the gold texts with the explicit-fusion recipe's `distill` settings: the baseline of the distill and
    onpolicy families, whose runs (under the distill family's folder) both families share; returns each seed's
    model at the chosen rate (trained when first asked for). `seeds`: as `Family.tuned`'s."""
    protocol = family.protocol
    recipe = family_recipe("infifusion-unified", protocol.preset, world_overrides(protocol))
    rows = read_rows(gold_texts(protocol), SFTRow)

    def sft(seed: int, lr: float, folder: Path) -> Path:
        model = folder / "model"
        if not model.is_dir():
            settings = {**explicit_fusion.train_settings(recipe), "learning_rate": lr, "seed": seed}
            train_sft(recipe.pivot, rows, SFTTrainConfig(**settings), model)
        return model

    folder = protocol.root / "distill" / "sft-gold"
    family.tuned("sft-gold", recipe.distill.learning_rate, sft, folder, seeds)
    chosen = family.chosen["sft-gold"]["learning_rate"]
    return lambda seed: sft(seed, chosen, run_folder(folder, chosen, seed))


def kd_scaled(row: explicit_fusion.Method, recipe: Recipe, scale: float) -> explicit_fusion.Method:
    """The row with the weight of its distillation term times `scale`, the CE term's left as it is: ULD's
    `lambda_kd`; FuseLLM's `1 - ce_weight` (a convex pair, so its CE weight becomes `1 - scale * (1 - ce_weight)`:
    0.9 -> 0.99 at scale 0.1)."""
    if scale == 1.0:
        return row
    args = {**recipe.distill.objective_args, **row.args} if row.objective == "uld" else dict(row.args)
    default = DISTILL_OBJECTIVES.get(row.objective)(**args)
    if row.objective == "uld":
        args["lambda_kd"] = default.lambda_kd * scale
    else:
        args["ce_weight"] = 1 - scale * (1 - default.ce_weight)
    return replace(row, args=args)


def distill(protocol: Protocol) -> Family:
    """Explicit fusion on gold texts: SFT on the texts vs ULD and FuseLLM distilling the sources (and, for FuseLLM,
    the pivot) on the same texts; the teachers' outputs are computed once."""
    recipe = family_recipe("infifusion-unified", protocol.preset, [
        "stages=[prompts, teacher]", f"teacher.data={gold_texts(protocol)}", "teacher.include_pivot=true",
        *world_overrides(protocol)])
    say("distill: teacher outputs on the gold texts")
    with exclusive(protocol.root / "distill" / "data.lock"):
        ctx = run_recipe(recipe, protocol.root / "distill" / "data", quiet=True, stage_cache=stage_cache(protocol))
    rows, store = read_rows(gold_texts(protocol), SFTRow), Path(ctx.output("teacher", "store"))
    family = Family("distill", protocol, lambda path: spec_at(recipe, path))
    family.fixed("pivot", recipe.pivot)
    oracle(family, list(recipe.sources))
    sft_gold(family)
    for key, row in DISTILL.items():
        family.tuned(key, recipe.distill.learning_rate, lambda seed, lr, folder, kd, row=row: explicit_fusion.train_method(
            kd_scaled(row, recipe, kd), with_section(recipe, "distill", seed, lr), rows, store, folder),
            kd_scales=protocol.kd_scales)
    uld_report(family, recipe, rows, store)
    return family


def uld_report(family: Family, recipe: Recipe, rows: list[SFTRow], store: Path) -> None:
    """What ULD's weights and terms do here (`_uld_stats`), on every 10th text, for the pivot and each tuned method's
    seed-0 model: written to `<out>/<preset>-distill-uld.json`, summarised in the notes."""
    students = {"pivot": Path(recipe.pivot.path), **{m: family.chosen_model(m, family.protocol.seeds[0])
                                                      for m in family.chosen if "learning_rate" in family.chosen[m]}}
    key = hashlib.sha256(json.dumps({k: str(v) for k, v in students.items()}).encode()).hexdigest()[:16]
    found = cached_json(family.folder / "uld-stats" / f"{key}.json", lambda: _uld_stats.uld_statistics(
        recipe.pivot, [s.label for s in recipe.sources], rows[::10], store, students, family.folder / "uld-stats" / f".features-{key}"))
    write_json(family.protocol.out / f"{family.protocol.preset}-distill-uld.json", found)
    right = {d: (v["weight_on_right_teachers_uncertainty"], v["weight_on_right_teachers_average"])
             for d, v in found["teachers"].items()}
    family.notes.append("ULD weight on the teachers whose top-1 is the text's next token (uncertainty, average): "
                        + ", ".join(f"{d} {u:.2f} / {a:.2f}" for d, (u, a) in right.items()))
    family.notes.append("seed-0 students (CE, ULD-uncertainty term, gradient norms CE / ULD, logit std): " + "; ".join(
        f"{m} {v['ce']:.3f}, {v['kd_uncertainty']:.3f}, {v['grad_ce']:.3f} / {v['grad_kd_uncertainty']:.3f}, "
        f"{v['logit_std']:.2f}" for m, v in found["students"].items()))


@dataclass(frozen=True)
class Distiller:
    """One row of the onpolicy family: the recipe's `onpolicy` section with `objective` (its `args` over the
    section's top_k), `lmbda` (1: the student's own samples; 0: the gold texts only, which the teachers score the
    same at every epoch, i.e. stored teacher outputs) and each prompt routed to its domain's teacher (MOPD) or
    every prompt to one teacher."""

    lmbda: float
    objective: str = "kd"
    args: dict[str, Any] = field(default_factory=dict)
    routed: bool = True


ONPOLICY = {
    "offpolicy-xtoken": Distiller(0.0),  # X-Token P-KL on the gold texts: off-policy, the same teachers and loss
    "onpolicy-xtoken": Distiller(1.0),  # the same on the student's samples
    "onpolicy-one-teacher": Distiller(1.0, routed=False),  # every prompt to the best source on validation
    "onpolicy-gold": Distiller(1.0, "gold", {"mode": "gold_compat"}),  # TRL's GOLD hybrid
    "onpolicy-uld": Distiller(1.0, "gold", {"mode": "gold_compat", "match": "none"}),  # GOLD's plain ULD
    "onpolicy-hybrid": Distiller(1.0, "gold", {"mode": "hybrid"}),  # polyfuse's non-negative hybrid
}
ONPOLICY_SMOKE = ["onpolicy.epochs=1", "onpolicy.batch_size=4"]
# From an SFT model (not the recipe's raw pivot): a lower rate, and the step budget a shared 2-core CPU affords
# (47 steps of 32 prompts: half the texts; docs/results.md has the sizing).
ONPOLICY_FROM_SFT = ["onpolicy.epochs=0.5", "onpolicy.learning_rate=3.0e-4"]


def onpolicy(protocol: Protocol) -> Family:
    """On-policy distillation (issue 25) on the distill family's gold texts, as GKD and MOPD run it: the student is
    the pivot after SFT on the texts (the distill family's `sft-gold` run of the same seed, at its chosen rate),
    which samples an answer to each text's prompt while the sources score its tokens through their own tokenizers
    (`polyfuse.trainers.onpolicy`); against that SFT model and the same teachers and loss on the texts themselves
    (off-policy, the same steps); losses X-Token P-KL, GOLD, ULD, polyfuse's hybrid; routed teachers against one.
    (From the pivot itself, the on-policy step budget a CPU affords leaves every method at 0%: docs/results.md.)"""
    texts = gold_texts(protocol)
    recipe = family_recipe("onpolicy", protocol.preset, [f"onpolicy.data={texts}", *world_overrides(protocol),
                                                         *(ONPOLICY_SMOKE if protocol.smoke else ONPOLICY_FROM_SFT)])
    rows = read_rows(texts, PromptRow)
    family = Family("onpolicy", protocol, lambda path: spec_at(recipe, path))
    family.fixed("pivot", recipe.pivot)
    oracle(family, list(recipe.sources))
    start = sft_gold(family, seeds=[])  # each seed's start is trained when its first method needs it
    valid = {s.label: accuracy(scores(protocol, s, "validation")) for s in recipe.sources}
    one = max(valid, key=lambda label: (valid[label][0], -valid[label][1]))
    section = recipe.onpolicy

    def config(row: Distiller, seed: int, lr: float) -> OnPolicyTrainConfig:
        args = section.objective_args if row.objective == section.objective else {"top_k": section.objective_args["top_k"]}
        update: dict[str, Any] = {"seed": seed, "learning_rate": lr, "lmbda": row.lmbda, "objective": row.objective,
                                  "objective_args": {**args, **row.args}}
        if not row.routed:
            update |= {"mix": "sum", "route_by": None, "routes": {},
                       "teachers": [t.model_dump() for t in section.teachers if t.label == one]}
        return OnPolicyTrainConfig.model_validate({**section.model_dump(exclude={"data"}), **update})

    for method, row in ONPOLICY.items():
        def train(seed: int, lr: float, folder: Path, row: Distiller = row) -> Path:
            model = folder / "model"
            if not model.is_dir():
                train_onpolicy(spec_at(recipe, start(seed)), rows, config(row, seed, lr), model, where=str(texts))
            return model

        family.tuned(method, section.learning_rate, train)
    sft_gold(family)  # the baseline's test rows, every run already trained
    first = ["pivot", *(s.label for s in recipe.sources), "oracle", "sft-gold"]
    family.runs = {m: family.runs[m] for m in [*first, *(m for m in family.runs if m not in first)] if m in family.runs}
    if "learning_rate" in family.chosen.get("onpolicy-one-teacher", {}):
        family.chosen["onpolicy-one-teacher"]["teacher"] = one
    return family


UNPAIRED = {"cgpo": "[prompts, sample, score, pairs, sft, logprobs, consensus, upo]",  # objective -> its stages
            "kto": "[prompts, sample, score, pairs, sft, logprobs, upo]"}
# CGPO with one thing changed (issue 24 item 5), at CGPO's chosen rate on the same rows: the other two reference
# assignments, and no warm-up of the U rows.
CGPO_ABLATIONS = {"cgpo-policy-anchored": {"reference": "policy_anchored"},
                  "cgpo-consensus-anchored": {"reference": "consensus_anchored"},
                  "cgpo-no-warmup": {"undesirable_warmup_steps": 0}}
# CGPO on a consensus built another way (its data run changes the consensus step only): without the entropy
# calibration, the sources' plain mean (the spec's `mean_consensus`; the same calibration prompts held out, so the
# same training rows).
CGPO_DATA_ABLATIONS = {"cgpo-no-calibration": ["consensus.aggregation=mean"]}
# The data run's own `upo` stage (the pipeline scores unpaired rows only when a recipe trains on them) trains a few
# steps: the protocol trains every (seed, rate) itself.
DATA_RUN_EPOCHS = 0.001


def unpaired_folder(protocol: Protocol, seed: int, objective: str) -> Path:
    return protocol.root / "unpaired" / "data" / f"seed{seed}" / objective


_UNPAIRED_DATA: dict[tuple[Path, int, str], tuple[Recipe, Any, Path]] = {}


def unpaired_data(protocol: Protocol, seed: int, objective: str) -> tuple[Recipe, Any, Path]:
    """One seed's data run for one objective: (recipe, run context, the rows it trains on). KTO's run reuses CGPO's
    prompts, samples, scores and SFT model of the same seed (`stage_cache`, by their fingerprints); each
    objective adds its own KL completions (CGPO's anchors, the sources' scores and the consensus; KTO's rotation,
    scored under M0 only)."""
    key = (protocol.root, seed, objective)
    if key not in _UNPAIRED_DATA:
        with exclusive(unpaired_folder(protocol, seed, objective).parent / f"{objective}.lock"):
            _UNPAIRED_DATA[key] = _unpaired_run(protocol, seed, objective)
    return _UNPAIRED_DATA[key]


def _unpaired_run(protocol: Protocol, seed: int, name: str) -> tuple[Recipe, Any, Path]:
    """`name`: an objective of UNPAIRED or a CGPO data ablation."""
    folder = unpaired_folder(protocol, seed, name)
    objective = "cgpo" if name in CGPO_DATA_ABLATIONS else name
    overrides = [f"seed={seed}", f"upo.objective={objective}", f"upo.epochs={DATA_RUN_EPOCHS}",
                 *(["logprobs.sources=false"] if objective == "kto" else []), *world_overrides(protocol),
                 *(["consensus.calibration_min_rows=12"] if protocol.smoke else []),  # a smoke has 12 PO prompts
                 *CGPO_DATA_ABLATIONS.get(name, [])]
    if name != "cgpo":  # CGPO's run first: the others take its stages of equal fingerprints (`stage_cache`)
        unpaired_data(protocol, seed, "cgpo")
    say(f"unpaired: {name} data of seed {seed} (prompts, samples, scores, rows, SFT, log-probs)")
    if protocol.preset in TINY_PRESETS:  # no verifier passes a tiny model: D / U by the median reward
        scored = run_recipe(family_recipe("cgpo", protocol.preset, [*overrides, "stages=[prompts, sample, score]"]),
                            folder, quiet=True, stage_cache=stage_cache(protocol)).output("score", "scored")
        median = np.median([r.rewards["rm"] for r in read_rows(scored, SampleRow)])
        overrides.append(f"pairs.unpaired.threshold={float(median)!r}")
    recipe = family_recipe("cgpo", protocol.preset, [*overrides, f"stages={UNPAIRED[objective]}"])
    started = time.perf_counter()
    ctx = run_recipe(recipe, folder, quiet=True, stage_cache=stage_cache(protocol))
    say(f"unpaired: {name} data of seed {seed} ready in {time.perf_counter() - started:.0f}s")
    stage = "consensus" if "unpaired" in ctx.outputs.get("consensus", {}) else "logprobs"
    return recipe, ctx, Path(ctx.output(stage, "unpaired"))


def unpaired(protocol: Protocol) -> Family:
    """Unpaired preference fusion (issue 24) on the cgpo recipe's rows (`unpaired_data`): every judged source
    response of the PO prompts, desirable or undesirable, the same prompts, samples, rows and SFT model for CGPO
    and KTO."""

    def data(seed: int, objective: str) -> tuple[Recipe, Any, Path]:
        return unpaired_data(protocol, seed, objective)

    recipe = data(protocol.seeds[0], "cgpo")[0]
    trained = family_recipe("cgpo", protocol.preset, world_overrides(protocol)).upo  # the recipe's rate and epochs
    family = Family("unpaired", protocol, lambda path: spec_at(recipe, path))
    family.fixed("pivot", recipe.pivot)
    family.per_seed("sft", lambda seed: Path(data(seed, "cgpo")[1].output("sft", "model")))
    oracle(family, list(recipe.sources))
    def trainer(data_run: str, changed: dict[str, Any]) -> Train:
        def train(seed: int, lr: float, folder: Path) -> Path:
            recipe, ctx, rows = data(seed, data_run)
            model = folder / "model"
            if not model.is_dir():
                section = with_section(recipe, "upo", seed, lr).upo
                config = section.model_copy(update={"epochs": trained.epochs,
                                                    "objective_args": {**section.objective_args, **changed}})
                train_unpaired(spec_at(recipe, ctx.output("sft", "model")), read_rows(rows, UnpairedRow), config,
                               model, data_path=rows)
            return model
        return train

    for objective in UNPAIRED:
        family.tuned(objective, trained.learning_rate, trainer(objective, {}))
    if protocol.cgpo_ablations and "learning_rate" in family.chosen.get("cgpo", {}):
        for variant, changed in CGPO_ABLATIONS.items():
            family.tuned(variant, family.chosen["cgpo"]["learning_rate"], trainer("cgpo", changed), scales=[1.0])
        for variant in CGPO_DATA_ABLATIONS:
            family.tuned(variant, family.chosen["cgpo"]["learning_rate"], trainer(variant, {}), scales=[1.0])
    return family


FAMILIES: dict[str, Callable[[Protocol], Family]] = {"implicit": implicit, "merge": merge, "distill": distill,
                                                     "unpaired": unpaired, "onpolicy": onpolicy}
# Baselines every method of a family is compared with (where the family has them).
BASELINES = {"implicit": ["sft", "dpo"], "merge": ["specialists", "multitask"], "distill": ["sft-gold"],
             "unpaired": ["sft", "pivot", "cgpo"], "onpolicy": ["sft-gold"]}


# ------------------------------------------------------------------------------------------------ hypotheses
@dataclass(frozen=True)
class Hypothesis:
    """A paper's claim: every (a, b) of `pairs` in `family` has a > b on the average (evidence protocol 4)."""

    id: str
    claim: str
    family: str
    pairs: tuple[tuple[str, str], ...]


HYPOTHESES = [
    Hypothesis("H1", "SFT on source outputs improves the pivot", "implicit", (("sft", "pivot"),)),
    Hypothesis("H2", "FuseChat-3.0 SFT+DPO > SFT", "implicit", (("fusechat-dpo", "sft"),)),
    Hypothesis("H3", "WRPO > DPO", "implicit", (("wrpo", "dpo"),)),
    Hypothesis("H4", "InfiFPO > WRPO and > DPO", "implicit", (("infifpo-max-margin", "wrpo"), ("infifpo-max-margin", "dpo"))),
    Hypothesis("H5", "max-margin > confidence > average fusion", "implicit",
               (("infifpo-max-margin", "infifpo-confidence"), ("infifpo-confidence", "infifpo-average"))),
    Hypothesis("H6", "probability clipping and length normalisation help InfiFPO", "implicit",
               (("infifpo-max-margin", "infifpo-no-clip"), ("infifpo-max-margin", "infifpo-no-ln"))),
    # InfiFPO trains on pairs, CGPO and KTO on unpaired rows of another recipe: only CGPO vs KTO shares its data.
    Hypothesis("H7", "CGPO > InfiFPO > KTO (tested: CGPO > KTO on the same rows)", "unpaired", (("cgpo", "kto"),)),
    Hypothesis("H8", "TA / TIES keep the specialists' gains over the base; TIES > linear", "merge",
               (("task_arithmetic", "base"), ("ties", "base"), ("ties", "linear"))),
    Hypothesis("H9", "RSAF >= TIES at matched density", "merge", (("rsaf", "ties-matched"),)),
    Hypothesis("H10", "ULD / FuseLLM distillation on gold texts > SFT alone", "distill",
               (("uld-uncertainty", "sft-gold"), ("fusellm-min-ce", "sft-gold"))),
    Hypothesis("H11", "uncertainty weighting > plain average", "distill", (("uld-uncertainty", "uld-average"),)),
    Hypothesis("H12", "on-policy > off-policy distillation; X-Token > GOLD > ULD; two (routed) teachers > one",
               "onpolicy", (("onpolicy-xtoken", "offpolicy-xtoken"), ("onpolicy-xtoken", "onpolicy-gold"),
                            ("onpolicy-gold", "onpolicy-uld"), ("onpolicy-xtoken", "onpolicy-one-teacher"))),
]


def comparison_pairs(family: Family) -> list[tuple[str, str]]:
    """Every method against each baseline of its family, then the hypotheses' pairs, each pair once."""
    baselines = [b for b in BASELINES.get(family.name, []) if b in family.runs]
    pairs = [(m, b) for b in baselines for m in family.runs if m != b]
    pairs += [p for h in HYPOTHESES if h.family == family.name for p in h.pairs
              if all(m in family.runs for m in p)]
    return list(dict.fromkeys(pairs))


def verdict(evidence: dict[str, Evidence], hypothesis: Hypothesis) -> tuple[str, str]:
    """(verdict, the average rows' intervals): held when every pair's interval is above 0, not held when any is
    below, else inconclusive; not run when a method (or the family) was not run."""
    found = evidence.get(hypothesis.family)
    rows = {(c.a, c.b): c for c in found.comparisons if c.domain == AVERAGE} if found else {}
    if not hypothesis.pairs or any(p not in rows for p in hypothesis.pairs):
        return "not run", ""
    picked = [rows[p] for p in hypothesis.pairs]
    text = "; ".join(f"{c.a} − {c.b} {c.diff:+.1f} [{c.ci95[0]:+.1f}, {c.ci95[1]:+.1f}]" for c in picked)
    if any(c.ci95[1] < 0 for c in picked):
        return "not held", text
    return ("held" if all(c.ci95[0] > 0 for c in picked) else "inconclusive"), text


# ------------------------------------------------------------------------------------------------ report
def method_table(family: Family, evidence: Evidence, bpb: bool = False) -> str:
    """One row per method: test accuracy and gold bpb (mean over seeds of the domain average), its setting, and
    its paired difference to each baseline on the average with the 95% interval (accuracy in points; with
    `bpb`, gold bits per byte, lower is better)."""
    baselines = [b for b in BASELINES.get(family.name, []) if b in family.runs]
    listed = evidence.bpb_comparisons if bpb else evidence.comparisons
    rows = {(c.a, c.b): c for c in listed if c.domain == AVERAGE}
    unit = "bpb" if bpb else "points"
    lines = ["| method | accuracy (%) | gold bpb | setting | " + " | ".join(f"− {b} ({unit}) [95%]" for b in baselines)
             + " |", "|---|---:|---:|---|" + "---:|" * len(baselines)]
    for method, runs in family.runs.items():
        acc, bits = (float(np.mean(v)) for v in zip(*(accuracy(r) for r in runs.values()), strict=True))
        chosen = family.chosen.get(method, {})
        setting = f"lr {chosen['learning_rate']:.3g}" if "learning_rate" in chosen else ""
        setting += f", kd x{chosen['kd_scale']:.3g}" if "kd_scale" in chosen else ""
        cells = [f"{c.diff:+.{3 if bpb else 2}f} [{c.ci95[0]:+.{3 if bpb else 2}f}, {c.ci95[1]:+.{3 if bpb else 2}f}]"
                 if (c := rows.get((method, b))) else "" for b in baselines]
        lines.append(f"| {method} | {100 * acc:.2f} | {bits:.3f} | {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(evidence: Evidence, baselines: list[str], path: Path) -> None:
    """Each method's average difference to each baseline, with its 95% interval as the error bar."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = [b for b in baselines if any(c.b == b and c.domain == AVERAGE for c in evidence.comparisons)]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, baseline in zip(axes[0], panels, strict=True):
        rows = [c for c in evidence.comparisons if c.b == baseline and c.domain == AVERAGE]
        ys = range(len(rows))
        ax.errorbar([c.diff for c in rows], ys, xerr=[[c.diff - c.ci95[0] for c in rows],
                                                      [c.ci95[1] - c.diff for c in rows]], fmt="o", capsize=3)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(list(ys), [c.a for c in rows])
        ax.set_xlabel(f"average accuracy − {baseline} (points, 95% interval)")
    figure.suptitle(f"{evidence.experiment}: paired differences on the test items")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(family: Family) -> Evidence:
    """The family's experiment file (with how its runs were made and what they cost), table and chart."""
    experiment = f"{family.protocol.preset}-{family.name}"
    evidence = build_evidence(experiment, family.runs, comparison_pairs(family))
    evidence.protocol = {"seeds": family.protocol.seeds, "lr_scales": family.protocol.grid(family.name),
                         "methods_run": list(family.runs), "chosen": family.chosen, "notes": family.notes,
                         "data": {str(seed): found for seed, found in family.data.items()}}
    family.protocol.out.mkdir(parents=True, exist_ok=True)
    write_evidence(family.protocol.out / f"{experiment}.json", evidence)
    chart(evidence, BASELINES.get(family.name, []), family.protocol.out / f"{experiment}.png")
    write_json(family.protocol.root / f"{experiment}-settings.json", {"chosen": family.chosen, "notes": family.notes})
    print(f"\n## {experiment}: seeds {family.protocol.seeds}, {family.protocol.items['test']} test items per domain\n")
    for method, chosen in family.chosen.items():
        if "learning_rate" in chosen:
            grid = ", ".join(f"{lr}: {v['accuracy']:.2f}% / {v['bpb']:.3f}" for lr, v in chosen["validation"].items())
            weight = f", distillation weight x{chosen['kd_scale']:.3g}" if "kd_scale" in chosen else ""
            print(f"- {method}: lr {chosen['learning_rate']:.3g}{weight}" + (f" (validation accuracy / bpb by lr: {grid})"
                                                                     if grid else ""))
        else:
            print(f"- {method}: {chosen}")
    for note in family.notes:
        print(f"- {note}")
    print(f"\nAccuracy, paired differences on the test items:\n\n{method_table(family, evidence)}\n")
    print(f"Gold bits per byte, paired differences (lower is better):\n\n{method_table(family, evidence, bpb=True)}\n")
    print(f"wrote {family.protocol.out / experiment}.json and .png")
    return evidence


def hypotheses_table(evidence: dict[str, Evidence]) -> str:
    lines = ["| id | claim | average a − b [95% interval] | verdict |", "|---|---|---|---|"]
    for hypothesis in HYPOTHESES:
        outcome, text = verdict(evidence, hypothesis)
        lines.append(f"| {hypothesis.id} | {hypothesis.claim} | {text} | {outcome} |")
    return "\n".join(lines)


# What `--jobs` hands to its worker processes, the longest first (docs/gym.md, "Budget": projected CPU seconds): (family,
# its trained methods; empty: all). The unpaired family stays whole (CGPO's ablations run at CGPO's chosen rate), and so
# do distill and onpolicy (both tune `sft-gold`, trained once under its run locks); the implicit family is split in two
# halves of its methods (each seed's data is built once, under a lock, by whichever needs it first).
WORK_UNITS: list[tuple[str, tuple[str, ...]]] = [
    ("unpaired", ()), ("distill", ()),
    ("implicit", ("dpo", "fusechat-dpo", "infifpo-max-margin", "wrpo")),
    ("implicit", ("infifpo-confidence", "infifpo-average", "infifpo-no-clip", "infifpo-no-ln")),
    ("onpolicy", ()), ("merge", ()),
]


def work_units(families: list[str], methods: list[str] | None) -> list[tuple[str, tuple[str, ...]]]:
    """The units of `WORK_UNITS` for these families (with `--methods`: one unit per family, those methods)."""
    if methods:
        return [(name, tuple(methods)) for name in families]
    return [(name, found) for name, found in WORK_UNITS if name in families]


def share_work(args: argparse.Namespace, root: Path) -> None:
    """Run the families' trainings and evaluations in `args.jobs` worker processes of this script (one thread each),
    a unit at a time each, the longest first; they share the cache through its file locks. Each worker's output
    goes to `<root>/logs/`; a failed unit stops the run with its log's tail."""
    import subprocess

    common = [sys.executable, __file__, "--preset", args.preset, "--seeds", *map(str, args.seeds), "--kd-scales",
              *map(str, args.kd_scales), "--items", str(args.items), "--validation-items", str(args.validation_items),
              "--work-dir", str(args.work_dir), "--out", str(args.out), "--worker",
              *(["--lr-scales", *map(str, args.lr_scales)] if args.lr_scales else []), *(["--smoke"] if args.smoke else []),
              *(["--cgpo-ablations"] if args.cgpo_ablations else [])]
    queue = list(work_units(args.families, args.methods))
    running: dict[subprocess.Popen, tuple[str, Path, float]] = {}
    (root / "logs").mkdir(parents=True, exist_ok=True)
    while queue or running:
        while queue and len(running) < args.jobs:
            name, methods = queue.pop(0)
            unit = name + (f"-{methods[0]}" if methods else "")
            log = root / "logs" / f"{unit}.log"
            command = [*common, "--families", name, *(["--methods", *methods] if methods else [])]
            with open(log, "w") as handle:
                running[subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)] = (unit, log, time.perf_counter())
            say(f"worker: {unit} started (log {log})")
        time.sleep(1)
        for process in [p for p in running if p.poll() is not None]:
            unit, log, started = running.pop(process)
            if process.returncode != 0:
                for other in running:
                    other.terminate()
                sys.exit(f"worker {unit} failed (exit {process.returncode}); the end of {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))
            say(f"worker: {unit} done in {time.perf_counter() - started:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="toy world preset (tiny, default; gym, gym-tiny)")
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lr-scales", type=float, nargs="+", default=None,
                        help="the grid: multiples of each method's recipe learning rate (default: each family's own, "
                        "`LR_SCALES`: 0.1, 0.3, 1 for implicit and unpaired, 1/9 ... 3 for distill, 1/81 ... 3 for "
                        "onpolicy, 1/3, 1, 3 otherwise)")
    parser.add_argument("--kd-scales", type=float, nargs="+", default=[1.0, 0.1],
                        help="distillation methods also tune their distillation term's weight: multiples of the "
                        "method's default (ULD lambda_kd 1, FuseLLM 1 - ce_weight = 0.1), tried at the chosen rate")
    parser.add_argument("--items", type=int, default=None, help="test items per domain (default: 4000 on a gym "
                        "preset, 75 on a v1 world, whose held-out split is small)")
    parser.add_argument("--validation-items", type=int, default=None, help="validation items per domain (default: "
                        "1000 on a gym preset, as many as --items on a v1 world)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/gym-protocol"))
    parser.add_argument("--out", type=Path, default=None, help="evidence JSON and PNGs (default docs/evidence)")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these trained methods (baselines always "
                        "run; the evidence then holds only them): share a family's methods between processes or "
                        "run the first ones first; a later run without it takes every finished one from the cache")
    parser.add_argument("--smoke", action="store_true", help="seed 0, one learning rate, 4 items per domain, a few "
                        "prompts, one epoch, on the tiny world unless --preset says (work dir runs/gym-protocol-smoke): "
                        "the plumbing in a minute")
    parser.add_argument("--data-only", action="store_true", help="unpaired: build the data of each of --seeds (both "
                        "objectives) and stop; run it for different seeds in parallel processes before the protocol")
    parser.add_argument("--cgpo-ablations", action="store_true", help="unpaired: also CGPO's one-change variants at "
                        "its chosen rate (the other two reference assignments, no U warm-up, no entropy calibration; "
                        "issue 24's diagnosis, not one of the hypotheses; about 820 CPU-s on the gym)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each) sharing the families' "
                        "work, the longest units first (`WORK_UNITS`); the reports and the hypotheses table are then "
                        "written once, from the cache, when every worker is done")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a `--jobs` worker: no report
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.lr_scales, args.kd_scales, args.items, args.validation_items = [0], [1.0], [1.0], 4, 4
        if args.work_dir == parser.get_default("work_dir"):
            args.work_dir = Path("runs/gym-protocol-smoke")
        args.out = args.out or args.work_dir / "evidence"
    args.items = args.items or (4000 if is_gym(args.preset) else 75)
    args.validation_items = args.validation_items or (1000 if is_gym(args.preset) else args.items)
    args.out = args.out or Path("docs/evidence")
    if len(args.seeds) < 5 and not args.smoke:
        print(f"note: {len(args.seeds)} seeds; the protocol asks for at least 5", file=sys.stderr)
    import torch

    torch.set_num_threads(1)  # tiny models on shared cores: one thread is as fast and never oversubscribed
    protocol = Protocol.make(args)
    started = time.perf_counter()
    if args.data_only:
        for seed in args.seeds:
            for objective in UNPAIRED:
                unpaired_data(protocol, seed, objective)
        return
    if args.worker:
        for name in args.families:
            FAMILIES[name](protocol)
        return
    if args.jobs > 1:
        share_work(args, protocol.root)
    evidence = {}
    for name in args.families:
        say(f"family {name}: {len(args.seeds)} seeds, grid {protocol.grid(name)}, {args.validation_items} validation "
            f"and {args.items} test items per domain")
        evidence[name] = report(FAMILIES[name](protocol))
    for name in FAMILIES.keys() - evidence.keys():  # families run before (`--families` runs compose)
        if (path := args.out / f"{args.preset}-{name}.json").is_file():
            evidence[name] = read_evidence(path)
    table = hypotheses_table(evidence)
    atomic_write_text(args.out / f"{args.preset}-hypotheses.md", table + "\n")
    print(f"\n## Hypotheses ({args.preset}; families {sorted(evidence)})\n\n{table}\n")
    say(f"done in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
