"""The real-model tier (issue 21 item 3; the design is docs/real-tier.md's last section): every fusion family on
real models, three reasoning-gym families, one script, resumable step by step.

    python bench/real_tier.py                       # the CPU size (docs/real-tier.md: what it cut, and its cost)
    python bench/real_tier.py --scale test_items=100 specialist_steps=24   # larger (a new cache folder)
    python bench/real_tier.py --gpu                 # the one-GPU size (bench/gpu_check.py): CUDA, vLLM sampling
    python bench/real_tier.py --smoke               # the tiny toy world's models on 2 items a family: the plumbing

Tasks: `basic_arithmetic`, `count_bits`, `word_sequence_reversal` at easy settings (bench/real_tier_probe.py's
`FAMILIES`), each prompt after one solved example of its family (`load_reasoning_gym(shots=1)`), judged by the
family's own verifier (`reasoning_gym`). Items by seed: a train pool (seed 1) and the test split (seed 3); a
train item whose question is also a test question is dropped (count_bits has only 64 distinct questions).

Steps (each cached under `--work-dir/<size>-<hash of the sizes>/`, its wall time and the load average recorded in
`steps/<step>.json`; a killed run redoes only the unfinished step):
1. `specialists`: three LoRA fine-tunes of the pivot (SmolLM2-135M-Instruct), one per family, and one multi-task
   LoRA on all three, on gold answers (`polyfuse.trainers.train_sft`, peft LoRA r 16 on every linear layer).
2. (a) `merges` of the three specialists with the pivot as base (`polyfuse.merge`, as bench/merge_methods_toy.py
   runs it): linear, task arithmetic, TIES, DARE-TIES, RSAF; reported per domain and normalised by each domain's
   specialist (FusionBench).
3. (c) `distill`: the teacher stage (Gemma-3-270M's and the pivot's top-K on gold texts, `polyfuse run`) and, on the
   same texts, SFT vs ULD (Gemma-3) vs FuseLLM MinCE (Gemma-3 and the pivot), as bench/explicit_fusion.py trains them.
4. (b) `implicit`: `polyfuse run` up to the log-probs on the sources pivot, the three specialists and Gemma-3 (a base
   model, sampled with `stop: ["\\n"]`), verifier-only pairs; FuseChat-3.0 (intra-source pairs: SFT then DPO), DPO
   and InfiFPO (max-margin) on the cross-model pairs, all from the same SFT model (bench/infifpo_ablation.py).
5. `eval:<model>`: greedy answers and gold bits per byte on the test items (`polyfuse.evaluation.evaluate`).
Each family's runs go through `polyfuse.evaluation.evidence` (paired bootstrap over items, one training seed) to
`<out>/real-<family>.json` and a PNG with error bars (bench/gym_protocol.py's chart).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import explicit_fusion
import gym_protocol
import infifpo_ablation
import merge_methods_toy
import numpy as np
import real_tier_probe
import yaml

from polyfuse.data.io import atomic_write_text, read_rows, write_json, write_rows
from polyfuse.data.schemas import PromptRow, SampleRow, SFTRow
from polyfuse.evaluation import evaluate
from polyfuse.evaluation.datasets import load_reasoning_gym
from polyfuse.evaluation.evidence import build_evidence, write_evidence
from polyfuse.evaluation.stats import AVERAGE, ItemScores
from polyfuse.models import ModelSpec
from polyfuse.models.loader import resolved
from polyfuse.pairs import run_pairs
from polyfuse.pipeline.recipe import Recipe, load_recipe
from polyfuse.pipeline.runner import run_recipe
from polyfuse.scorers import build_scorer
from polyfuse.trainers import SFTTrainConfig, train_sft

TASKS = ["basic_arithmetic", "count_bits", "word_sequence_reversal"]
SMOKE_TASKS = ["basic_arithmetic", "count_bits", "gcd"]  # short prompts: the toy models have 128 positions
SEEDS = {"train": 1, "test": 3}
MERGES = ["linear", "task_arithmetic", "ties", "dare_ties", "rsaf"]
IMPLICIT = {"fusechat-dpo": infifpo_ablation.Method("fusechat-dpo", "FuseChat-3.0 SFT+DPO", "dpo"),
            "dpo": infifpo_ablation.Method("dpo", "SFT+DPO", "dpo"),
            "infifpo": infifpo_ablation.Method("infifpo", "InfiFPO (max-margin)", "infifpo")}
DISTILL = {"uld": explicit_fusion.Method("uld", "ULD", "uld", {"weighting": "uncertainty"}),
           "fusellm": explicit_fusion.Method("fusellm", "FuseLLM (MinCE)", "fusellm", {"fusion": "min_ce"},
                                             with_pivot=True)}
BASELINES = {"merge": ["specialists", "multitask"], "implicit": ["sft", "dpo"], "distill": ["sft-gold"]}


@dataclass(frozen=True)
class Sizes:
    """How large a run is; every field is a `--scale` knob. Steps are optimizer steps of `batch` rows."""

    train_pool: int = 400  # train items generated per family (before dropping test questions)
    test_items: int = 50  # per family
    specialist_steps: int = 16  # per specialist; the multi-task LoRA gets twice as many over all three families
    sample_prompts: int = 20  # implicit: prompts per family sampled by every source
    samples: int = 4  # responses per prompt and source
    gold_texts: int = 24  # distill: gold texts per family
    train_epochs: float = 2.0  # SFT, PO and distillation epochs over their rows
    batch: int = 8
    max_new_tokens: int = 12
    shots: int = 1  # solved examples before each prompt
    lora_lr: float = 4e-4  # specialists, SFT, distillation (LoRA)
    po_lr: float = 5e-5  # DPO and InfiFPO (LoRA)
    device: str = "cpu"
    vllm: bool = False  # sample the sources with vLLM (the GPU size)
    qwen: bool = False  # Qwen2.5-Coder-1.5B-Instruct as a further source and teacher (its export: ~6 CPU minutes, once)


LATER_KNOBS = {"qwen": False}  # knob -> its default

PRESETS = {
    "cpu": Sizes(),
    "smoke": Sizes(train_pool=24, test_items=2, specialist_steps=2, sample_prompts=2, samples=2, gold_texts=2,
                   train_epochs=1.0, batch=2, max_new_tokens=4, shots=0),
    # one H100 (bench/gpu_check.py, <= 8 minutes): 20x the test items and 10x the training, vLLM sampling
    "gpu": Sizes(train_pool=4000, test_items=1000, specialist_steps=150, sample_prompts=300, samples=8,
                 gold_texts=500, train_epochs=2.0, batch=16, max_new_tokens=16, device="cuda", vllm=True),
}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Tier:
    """One run of the tier: its sizes, its cache folder, its models (real, or the tiny world's in a smoke run)."""

    sizes: Sizes
    root: Path
    out: Path
    smoke: bool

    @property
    def tasks(self) -> list[str]:
        return SMOKE_TASKS if self.smoke else TASKS

    def step(self, name: str, work: Callable[[], Any]) -> Any:
        """`work()`'s JSON result, computed once: `steps/<name>.json` holds it with its wall time and the machine's
        1-minute load average before and after (the machine is shared)."""
        path = self.root / "steps" / f"{name.replace(':', '-')}.json"
        if path.is_file():
            return json.loads(path.read_text())["result"]
        say(f"step {name}")
        started, load = time.perf_counter(), os.getloadavg()[0]
        result = work()
        wall = round(time.perf_counter() - started, 1)
        write_json(path, {"result": result, "wall_s": wall, "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)]})
        say(f"step {name} done in {wall:.0f}s")
        return result

    def costs(self) -> dict[str, dict[str, Any]]:
        return {p.stem: {k: v for k, v in json.loads(p.read_text()).items() if k != "result"}
                for p in sorted((self.root / "steps").glob("*.json"))}

    # models
    def pivot(self) -> ModelSpec:
        if self.smoke:
            return ModelSpec(name="pivot", path=str(gym_protocol.world("tiny").pivot_path), device=self.sizes.device)
        return ModelSpec(name="pivot", path="packaged://smollm2", device=self.sizes.device)

    def teacher_path(self) -> str:
        """The heterogeneous source: Gemma-3-270M (a base model), or the tiny world's llama-compare."""
        return str(gym_protocol.world("tiny").source_paths["llama-compare"]) if self.smoke else "packaged://gemma3"

    def spec(self, name: str, path: str | Path) -> ModelSpec:
        return ModelSpec(name=name, path=str(path), device=self.sizes.device)


def packaged_spec(spec: ModelSpec) -> ModelSpec:
    """A spec whose `packaged://` path is the installed GGUF file (the recipe loader does this for recipes)."""
    from polyfuse.models import packaged

    if not spec.path.startswith("packaged://"):
        return spec
    return spec.model_copy(update={"path": str(packaged.packaged_model(spec.path.removeprefix("packaged://"), spec.name))})


# ------------------------------------------------------------------------------------------------ items
def items(tier: Tier, split: str) -> list[PromptRow]:
    """A split's items of every family (one solved example before each), in a fixed order; the train pool
    without any question of the test split."""
    size = tier.sizes.train_pool if split == "train" else tier.sizes.test_items
    rows = [row for task in tier.tasks for row in load_reasoning_gym(
        task, size, seed=SEEDS[split], system=None, shots=tier.sizes.shots, **real_tier_probe.FAMILIES[task])]
    if split == "train":
        held_out = {question(row) for row in items(tier, "test")}
        rows = [row for row in rows if question(row) not in held_out]
    return rows


def question(row: PromptRow) -> str:
    return row.prompt if isinstance(row.prompt, str) else row.prompt[-1].content


def by_task(rows: list[PromptRow], count: int, skip: int = 0) -> list[PromptRow]:
    """The rows `skip` to `skip + count` of each family (the train pool's slices: specialists first, then the
    fusion prompts and texts), cycled when a family has fewer distinct items."""
    picked = []
    for task in dict.fromkeys(row.domain for row in rows):
        found = [row for row in rows if row.domain == task]
        picked += [found[(skip + i) % len(found)] for i in range(count)]
    return picked


def gold_rows(rows: list[PromptRow]) -> list[SFTRow]:
    return [SFTRow(id=f"{r.id}-{i}", prompt=r.prompt, completion=r.answer, domain=r.domain, source="gold")
            for i, r in enumerate(rows)]


def train_lora(tier: Tier, rows: list[SFTRow], folder: Path, epochs: float = 1.0, base: ModelSpec | None = None) -> str:
    """A LoRA fine-tune of the pivot on `rows` (saved merged into plain weights); skipped when already saved."""
    model = folder / "model"
    if not (model / "config.json").is_file():
        config = SFTTrainConfig(learning_rate=tier.sizes.lora_lr, epochs=epochs, batch_size=tier.sizes.batch,
                                max_length=256, warmup_ratio=0.1, save_steps=0, logging_steps=1, lora={"r": 16},
                                bf16=tier.sizes.device == "cuda")
        train_sft(packaged_spec(base or tier.pivot()), rows, config, model)
    return str(model)


# ------------------------------------------------------------------------------------------------ evaluation
def scores(tier: Tier, name: str, spec: ModelSpec) -> dict[str, ItemScores]:
    """Per-item verdicts and gold bits per byte of one model on the test items, in item order (a step)."""

    def compute() -> dict[str, Any]:
        test = items(tier, "test")
        result = evaluate(packaged_spec(spec), test, [build_scorer({"type": "reasoning_gym"})], batch_size=64,
                          max_new_tokens=tier.sizes.max_new_tokens, label=name, quiet=True)
        record = {r.prompt_id: r for r in result.records}
        out: dict[str, dict[str, Any]] = {}
        for item in test:
            found = out.setdefault(item.domain, {"correct": "", "bpb": [], "responses": []})
            found["correct"] += "1" if record[item.id].correct else "0"
            found["bpb"].append(record[item.id].bpb)
            found["responses"].append(record[item.id].response)
        return out

    data = tier.step(f"eval:{name}", compute)
    return {d: ItemScores(np.array([c == "1" for c in v["correct"]]), np.array(v["bpb"], dtype=float))
            for d, v in data.items()}


def report(tier: Tier, family: str, runs: dict[str, dict[str, ItemScores]], pairs: list[tuple[str, str]],
           notes: dict[str, Any]) -> None:
    """The family's evidence file (one seed: the interval is the paired bootstrap over items), its PNG, and the
    tables printed: accuracy and gold bpb per domain and on the average, differences with 95% intervals."""
    experiment = f"real-{family}"
    evidence = build_evidence(experiment, {m: {0: r} for m, r in runs.items()}, pairs)
    evidence.protocol = {"sizes": asdict(tier.sizes), "tasks": {t: real_tier_probe.FAMILIES[t] for t in tier.tasks},
                         "notes": notes, "steps": tier.costs()}
    tier.out.mkdir(parents=True, exist_ok=True)
    write_evidence(tier.out / f"{experiment}.json", evidence)
    gym_protocol.chart(evidence, BASELINES[family], tier.out / f"{experiment}.png")
    print(f"\n## {experiment}: {tier.sizes.test_items} test items per family\n")
    print("| model | " + " | ".join(f"{t} acc" for t in tier.tasks) + " | average acc (%) | average gold bpb |")
    print("|---|" + "---:|" * (len(tier.tasks) + 2))
    for method, found in runs.items():
        accs = [100 * float(np.mean(found[t].correct)) for t in tier.tasks]
        bits = float(np.mean([np.mean(found[t].bpb) for t in tier.tasks]))
        print(f"| {method} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {np.mean(accs):.1f} | {bits:.3f} |")
    bpb = {(c.a, c.b): c for c in evidence.bpb_comparisons if c.domain == AVERAGE}
    print("\n| a − b | accuracy (points) [95%] | McNemar p | gold bpb [95%] |\n|---|---:|---:|---:|")
    for c in (c for c in evidence.comparisons if c.domain == AVERAGE):
        b = bpb.get((c.a, c.b))
        bits = f"{b.diff:+.3f} [{b.ci95[0]:+.3f}, {b.ci95[1]:+.3f}]" if b else ""
        print(f"| {c.a} − {c.b} | {c.diff:+.1f} [{c.ci95[0]:+.1f}, {c.ci95[1]:+.1f}] | {c.p:.3g} | {bits} |")
    for key, value in notes.items():
        print(f"- {key}: {value}")
    print(f"wrote {tier.out / experiment}.json and .png")


# ------------------------------------------------------------------------------------------------ families
def specialists(tier: Tier) -> dict[str, str]:
    """One LoRA specialist per family and the multi-task LoRA (twice a specialist's steps, all families mixed)."""
    pool, steps = items(tier, "train"), tier.sizes.specialist_steps * tier.sizes.batch
    found = {}
    for task in tier.tasks:
        rows = gold_rows([r for r in by_task(pool, steps) if r.domain == task])
        found[task] = tier.step(f"specialist:{task}", lambda rows=rows, task=task: train_lora(
            tier, rows, tier.root / "specialists" / task))
    rows = gold_rows(by_task(pool, 2 * steps // len(tier.tasks)))
    found["multitask"] = tier.step("multitask", lambda: train_lora(tier, rows, tier.root / "specialists" / "multitask"))
    return found


def merge_family(tier: Tier, trained: dict[str, str]) -> None:
    """(a) The merges of the three specialists against each specialist and the multi-task LoRA."""
    base = Path(resolved(packaged_spec(tier.pivot())).path)
    copies = {task: Path(trained[task]) for task in tier.tasks}
    methods = {m.key: m for m in merge_methods_toy.METHODS}
    merged = {key: tier.step(f"merge:{key}", lambda key=key: str(merge_methods_toy.merge(
        methods[key], base, copies, 0, tier.root / "merges" / key)[1])) for key in MERGES}
    runs = {"pivot": scores(tier, "pivot", tier.pivot())}
    per_task = {task: scores(tier, f"specialist-{task}", tier.spec(task, trained[task])) for task in tier.tasks}
    runs.update({f"specialist-{t}": found for t, found in per_task.items()})
    runs["specialists"] = {t: per_task[t][t] for t in tier.tasks}  # each family by its own specialist
    runs["multitask"] = scores(tier, "multitask", tier.spec("multitask", trained["multitask"]))
    runs.update({key: scores(tier, key, tier.spec(key, path)) for key, path in merged.items()})
    norms = tier.step("task-vectors", lambda: merge_methods_toy.task_vector_stats(base, copies))
    special = {t: float(np.mean(runs["specialists"][t].correct)) for t in tier.tasks}
    normalised = {m: {t: round(float(np.mean(runs[m][t].correct)) / special[t], 3) if special[t] else None for t in tier.tasks}
                  for m in [*MERGES, "multitask", "pivot"]}
    notes = {"normalised accuracy (FusionBench: / the family's specialist)": normalised,
             "||tau|| / ||theta||": {t: round(v, 4) for t, v in norms["relative_norm"].items()},
             "share of ||tau||^2 in the embedding": {t: round(v, 3) for t, v in norms["embedding_share"].items()}}
    report(tier, "merge", runs, [(m, b) for m in [*MERGES, "pivot"] for b in BASELINES["merge"]]
           + [("multitask", "specialists")], notes)


def distill_recipe(tier: Tier, texts: Path) -> Recipe:
    """The teacher stage's recipe: the pivot and Gemma-3's top-K on the gold texts (`polyfuse run`)."""
    sizes = tier.sizes
    recipe = {
        "name": "real-tier-distill", "seed": 0,
        "sources": [{"name": "gemma3", "path": tier.teacher_path(), "device": sizes.device},
                    *([{"name": "qwen-coder", "path": "packaged://qwen-coder", "device": sizes.device}] if sizes.qwen else [])],
        "pivot": tier.pivot().model_dump(exclude_defaults=True),
        "prompts": {"path": str(tier.root / "data" / "test.jsonl")},  # unused by the teacher stage (it reads `data`)
        "stages": ["prompts", "teacher"],
        "teacher": {"top_k": 10, "data": str(texts), "include_pivot": True},
        "distill": {"strategy": "unified", "objective": "uld", "objective_args": {"lambda_kd": 1.0, "top_k": 10},
                    "learning_rate": sizes.lora_lr, "epochs": sizes.train_epochs, "batch_size": sizes.batch,
                    "max_length": 256, "warmup_ratio": 0.1, "save_steps": 0, "logging_steps": 1, "lora": {"r": 16},
                    "bf16": sizes.device == "cuda"},
    }
    path = tier.root / "distill" / "recipe.yaml"
    atomic_write_text(path, yaml.safe_dump(recipe, sort_keys=False))
    return load_recipe(path)


def distill_family(tier: Tier) -> None:
    """(c) SFT on gold texts vs ULD and FuseLLM from Gemma-3 on the same texts."""
    pool = items(tier, "train")
    skip = tier.sizes.specialist_steps * tier.sizes.batch  # after the specialists' rows
    texts = tier.root / "distill" / "gold.jsonl"
    if not texts.is_file():
        write_rows(texts, gold_rows(by_task(pool, tier.sizes.gold_texts, skip)))
    rows = read_rows(texts, SFTRow)
    recipe = distill_recipe(tier, texts)
    store = tier.step("distill:teacher", lambda: run_recipe(recipe, tier.root / "distill" / "run", quiet=True)
                      .output("teacher", "store"))
    runs = {"pivot": scores(tier, "pivot", tier.pivot())}
    sft = tier.step("distill:sft-gold", lambda: train_lora(tier, rows, tier.root / "distill" / "sft-gold",
                                                           tier.sizes.train_epochs))
    runs["sft-gold"] = scores(tier, "sft-gold", tier.spec("sft-gold", sft))
    for key, method in DISTILL.items():
        model = tier.step(f"distill:{key}", lambda method=method: str(explicit_fusion.train_method(
            method, recipe, rows, Path(store), tier.root / "distill" / method.key)))
        runs[key] = scores(tier, key, tier.spec(key, model))
    report(tier, "distill", runs, [(m, "sft-gold") for m in [*DISTILL, "pivot"]],
           {"texts": len(rows), "teachers": {"uld": [t.label for t in recipe.sources],
                                              "fusellm": [*(t.label for t in recipe.sources), "pivot"]}})


def implicit_recipe(tier: Tier, trained: dict[str, str], prompts: Path) -> Recipe:
    """Sampling to log-probs (`polyfuse run`): the pivot, its three specialists and Gemma-3 as sources."""
    sizes = tier.sizes
    backend = {"type": "vllm", "gpu_memory_utilization": 0.3} if sizes.vllm else "transformers"
    sampling = {"n": sizes.samples, "temperature": 0.8, "max_new_tokens": sizes.max_new_tokens}
    pivot = tier.pivot().model_dump(exclude_defaults=True)
    sources = [{**pivot, "name": "smollm2"}, *({"name": f"spec-{t}", "path": trained[t], "device": sizes.device}
                                              for t in tier.tasks),
               {"name": "gemma3", "path": tier.teacher_path(), "device": sizes.device,
                "sampling": {**sampling, "stop": ["\n"]}},  # a base model: it never ends its turn
               *([{"name": "qwen-coder", "path": "packaged://qwen-coder", "device": sizes.device}] if sizes.qwen else [])]
    recipe = {
        "name": "real-tier-implicit", "seed": 0,
        "sources": [{"sampling": sampling, **s, "backend": backend} for s in sources],
        "pivot": pivot, "prompts": {"path": str(prompts)},
        "stages": ["prompts", "sample", "score", "pairs", "sft", "logprobs"],
        "score": {"scorers": [{"type": "reasoning_gym"}]},  # verifiers only: no reward model
        "pairs": {"pair_rule": "cross_model", "tie_break": "shorter", "sft_fraction": 0.5},
        "sft": {"learning_rate": sizes.lora_lr, "epochs": sizes.train_epochs, "batch_size": sizes.batch,
                "max_length": 256, "warmup_ratio": 0.1, "save_steps": 0, "logging_steps": 1, "lora": {"r": 16},
                "bf16": sizes.device == "cuda"},
        "logprobs": {"sources": True, "backend": "transformers"},
        "po": {"objective": "infifpo", "learning_rate": sizes.po_lr, "epochs": sizes.train_epochs,
               "batch_size": sizes.batch, "max_length": 256, "warmup_ratio": 0.1, "save_steps": 0,
               "logging_steps": 1, "lora": {"r": 16}, "bf16": sizes.device == "cuda"},
    }
    if tier.smoke:  # the barely trained toy models are never verifier-correct: the toy reward model ranks them
        recipe["score"]["scorers"] = [{"type": "reward_model", "name": "rm", "normalize": "sigmoid", "model": {
            "path": str(gym_protocol.world("tiny").reward_model_path)}}]
        recipe["pairs"]["reward"] = "rm"
    path = tier.root / "implicit" / "recipe.yaml"
    atomic_write_text(path, yaml.safe_dump(recipe, sort_keys=False))
    return load_recipe(path)


def implicit_family(tier: Tier, trained: dict[str, str]) -> None:
    """(b) FuseChat-3.0 (SFT then DPO on intra-source pairs), DPO and InfiFPO on the cross-model pairs."""
    pool = items(tier, "train")
    skip = tier.sizes.specialist_steps * tier.sizes.batch
    prompts = tier.root / "implicit" / "prompts.jsonl"
    if not prompts.is_file():
        write_rows(prompts, by_task(pool, tier.sizes.sample_prompts, skip + tier.sizes.gold_texts))
    recipe = implicit_recipe(tier, trained, prompts)
    work = tier.root / "implicit" / "run"
    outputs = tier.step("implicit:data", lambda: run_recipe(recipe, work, quiet=True).outputs)
    sft = tier.spec("sft", outputs["sft"]["model"])
    names = [s.label for s in recipe.sources]

    def fusechat_pairs() -> str:
        rows = [r for r in read_rows(outputs["score"]["scored"], SampleRow) if r.model in names]
        config = recipe.pairs.model_copy(update={"pair_rule": "intra_source", "sources": names})
        return str(run_pairs(rows, config, tier.root / "implicit" / "fusechat-pairs")["preference"])

    data = {"fusechat-dpo": tier.step("implicit:fusechat-pairs", fusechat_pairs),
            "dpo": outputs["logprobs"]["preference"], "infifpo": outputs["logprobs"]["preference"]}
    runs = {"pivot": scores(tier, "pivot", tier.pivot()), "sft": scores(tier, "sft", sft)}
    counts = {k: len(Path(p).read_text().splitlines()) for k, p in data.items()}
    for key, method in IMPLICIT.items():
        if not counts[key]:
            continue  # no pair qualified
        model = tier.step(f"implicit:{key}", lambda key=key, method=method: str(infifpo_ablation.train_method(
            method, recipe, sft, Path(data[key]), tier.root / "implicit" / key)))
        runs[key] = scores(tier, key, tier.spec(key, model))
    scored = read_rows(outputs["score"]["scored"], SampleRow)
    correct = {n: round(float(np.mean([bool(r.correct) for r in scored if r.model == n])), 3) for n in names}
    pairs = [(m, "sft") for m in runs if m != "sft"] + [(m, "dpo") for m in runs if m not in ("sft", "dpo") and "dpo" in runs]
    report(tier, "implicit", runs, pairs,
           {"pairs": counts, "sft_rows": len(Path(outputs["pairs"]["sft"]).read_text().splitlines()),
            "sampled accuracy by source (train prompts)": correct,
            "pairs report": json.loads(Path(outputs["pairs"]["report"]).read_text())})


# ------------------------------------------------------------------------------------------------ main
def sizes_of(args: argparse.Namespace) -> tuple[str, Sizes]:
    name = "smoke" if args.smoke else "gpu" if args.gpu else "cpu"
    sizes = PRESETS[name]
    for knob in args.scale:
        key, _, value = knob.partition("=")
        if key not in asdict(sizes):
            raise SystemExit(f"--scale {knob}: expected KEY=VALUE with KEY one of {', '.join(asdict(sizes))}")
        kind = type(getattr(sizes, key))
        sizes = replace(sizes, **{key: value.lower() in ("1", "true", "yes") if kind is bool else kind(value)})
    return name, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny toy world's pivot and a source in place of "
                        "SmolLM2 and Gemma-3, 2 items a family, 1 step: the plumbing in about a minute, under runs/")
    parser.add_argument("--gpu", action="store_true", help="the one-GPU size (CUDA, vLLM sampling): bench/gpu_check.py")
    parser.add_argument("--scale", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"change a size ({', '.join(asdict(Sizes()))}); a new cache folder")
    parser.add_argument("--families", nargs="+", choices=["merge", "distill", "implicit"],
                        default=["merge", "distill", "implicit"], help="in this order: merge first, its specialists "
                        "are the implicit family's sources")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/real-tier"))
    parser.add_argument("--out", type=Path, default=None, help="evidence JSON and PNGs (default docs/evidence)")
    args = parser.parse_args()
    name, sizes = sizes_of(args)
    # knobs added later count only when set, so that a cache made before them is still found
    hashed = {k: v for k, v in asdict(sizes).items() if not (k in LATER_KNOBS and v == LATER_KNOBS[k])}
    key = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:10]
    work = args.work_dir.with_name(args.work_dir.name + "-smoke") if args.smoke else args.work_dir
    tier = Tier(sizes, work / f"{name}-{key}", args.out or (work / "evidence" if args.smoke else Path("docs/evidence")),
                args.smoke)
    import torch

    if sizes.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    say(f"real tier ({name}): {asdict(sizes)} in {tier.root}")
    started = time.perf_counter()
    test = tier.root / "data" / "test.jsonl"
    if not test.is_file():
        write_rows(test, items(tier, "test"))
    trained = specialists(tier)
    for family in args.families:
        {"merge": lambda: merge_family(tier, trained), "distill": lambda: distill_family(tier),
         "implicit": lambda: implicit_family(tier, trained)}[family]()
    write_json(tier.root / "costs.json", tier.costs())
    say(f"done in {time.perf_counter() - started:.0f}s (this invocation; every step's wall time: {tier.root}/costs.json)")


if __name__ == "__main__":
    main()
