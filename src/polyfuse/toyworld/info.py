"""How good is each model of a world: greedy accuracy per domain, reward-model ranking, and for a fusion gym
the checks that each fusion family's premise holds (`gym_report`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from polyfuse.data import SFTRow
from polyfuse.data.io import read_rows
from polyfuse.evaluation import EvalResult, evaluate
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer
from polyfuse.scorers import build_scorer
from polyfuse.toyworld.build import World
from polyfuse.toyworld.tasks import Split, distinct_tasks, get_domain, make_row

INFO_SEED = 12345  # held-out prompts for `world_info`; any seed gives held-out tasks only
TEST_ITEMS, VALIDATION_ITEMS = 4000, 1000  # what a gym promises per domain (issue 21)
SOURCE_SPECIALTY = (60.0, 90.0)  # a source's accuracy on its specialty, %
SOURCE_SECONDARY = (20.0, 50.0)  # ... on at least one other domain
COVERED = 20.0  # a source covers a domain from this accuracy on, %
PIVOT_ROOM = 30.0  # the pivot's average before fusion stays below this, %
SMALL_UPDATE = 0.10  # ||tau|| / ||theta|| of a specialist at most


def world_info(world: World, per_domain: int = 100, quiet: bool = True, split: Split = "heldout",
               models: dict[str, Path] | None = None) -> dict[str, EvalResult]:
    """Accuracy (greedy, `per_domain` prompts per domain of `split`) of `models`, default every source and
    the pivot."""
    prompts = world.prompts(split, per_domain=per_domain, seed=INFO_SEED)
    verifier = build_scorer({"type": "toyworld"})
    models = models or {**world.source_paths, "pivot": world.pivot_path}
    return {
        name: evaluate(ModelSpec(name=name, path=str(path)), prompts, [verifier], batch_size=64,
                       max_new_tokens=12, label=name, quiet=quiet)
        for name, path in models.items()
    }


@torch.inference_mode()
def reward_model_accuracy(world: World, per_domain: int = 100) -> dict[str, float]:
    """Per domain, how often the reward model scores a held-out gold answer above a near miss."""
    spec = ModelSpec(path=str(world.reward_model_path))
    model, tokenizer = load_model(spec, task="sequence-classification"), load_tokenizer(spec)
    rng = random.Random(INFO_SEED)
    result = {}
    for name in world.domains:
        domain = get_domain(name)
        wins = 0
        tasks = distinct_tasks(name, "heldout", per_domain, INFO_SEED)
        for params in tasks:
            row, wrong = make_row(domain, params), domain.corrupt(rng, params)
            scores = [model(input_ids=torch.tensor([encode(tokenizer, row.prompt, text).input_ids])).logits[0, 0]
                      for text in (row.answer, wrong)]
            wins += bool(scores[0] > scores[1])
        result[name] = wins / len(tasks)
    return result


def task_vector(base: Path, model: Path) -> dict[str, float]:
    """||tau|| / ||theta_base|| of `model` - `base` (every weight tensor), and the share of ||tau||^2 in the
    embedding matrices (input embeddings and, untied, the output head) against the transformer layers."""
    from safetensors.torch import load_file

    theta, tuned = load_file(base / "model.safetensors"), load_file(model / "model.safetensors")
    squares = {"embeddings": 0.0, "layers": 0.0}
    for name, weight in theta.items():
        part = "embeddings" if "embed" in name or "lm_head" in name or name.endswith(("wte.weight", "wpe.weight")) else "layers"
        squares[part] += float((tuned[name].double() - weight.double()).pow(2).sum())
    total = sum(squares.values())
    base_norm = sum(float(w.double().pow(2).sum()) for w in theta.values()) ** 0.5
    return {"ratio": total**0.5 / base_norm, "embedding_share": squares["embeddings"] / total if total else 0.0}


@dataclass(frozen=True)
class Check:
    """One premise of the gym: what was measured, against which target, and whether it holds."""

    premise: str
    measured: str
    target: str
    holds: bool


def _split_check(world: World, name: str) -> Check:
    """The domain's test and validation items (the first `TEST_ITEMS` / `VALIDATION_ITEMS` of seed 0, what the
    gym recipes evaluate on) exist, and share no parameters with each other or with the gold training texts."""
    test, validation = (set(distinct_tasks(name, split, n)) for split, n in (("test", TEST_ITEMS), ("validation", VALIDATION_ITEMS)))
    domain = get_domain(name)
    gold = {row.prompt for row in read_rows(world.gold_texts_path, SFTRow) if row.domain == name}
    held_out = {domain.prompt(params) for params in test | validation}
    disjoint = not test & validation and not gold & held_out
    return Check(f"{name}: test / validation items", f"{len(test)} / {len(validation)}, overlaps: {'none' if disjoint else 'yes'}",
                 f">= {TEST_ITEMS} / {VALIDATION_ITEMS}, disjoint from each other and from train",
                 len(test) >= TEST_ITEMS and len(validation) >= VALIDATION_ITEMS and disjoint)


def _pct(result: EvalResult) -> dict[str, float]:
    return {d: 100 * s.accuracy for d, s in result.per_domain.items()}


def gym_report(world: World, per_domain: int = VALIDATION_ITEMS, quiet: bool = True) -> dict:
    """Validation accuracy of every model of a gym and the premise checks of issue 21: split sizes, sources good
    but imperfect and overlapping, a pivot with room, specialists that gain on their domain with small updates
    that live outside the embeddings. Returns {"accuracy": {model: {domain: %}}, "task_vectors": {model: {...}},
    "checks": [Check, ...]}."""
    checks = [_split_check(world, name) for name in world.domains]
    models = {**world.source_paths, "pivot": world.pivot_path, "base": world.merge_base_path,
              **{f"specialist-{d}": p for d, p in world.specialist_paths.items()}, "multitask": world.multitask_path}
    results = world_info(world, per_domain=per_domain, quiet=quiet, split="validation", models=models)
    accuracy = {name: _pct(result) for name, result in results.items()}
    for name, specialty in world.specialties.items():
        own = accuracy[name][specialty]
        checks.append(Check(f"{name}: its specialty {specialty}", f"{own:.1f}", "60-90", _within(own, SOURCE_SPECIALTY)))
        other, score = max(((d, a) for d, a in accuracy[name].items() if d != specialty), key=lambda x: x[1])
        checks.append(Check(f"{name}: best other domain {other}", f"{score:.1f}", "20-50", _within(score, SOURCE_SECONDARY)))
    for domain in world.domains:
        covering = [s for s in world.source_paths if accuracy[s][domain] >= COVERED]
        checks.append(Check(f"{domain}: sources at >= {COVERED:.0f}%", ", ".join(covering) or "none", ">= 2", len(covering) >= 2))
    pivot = sum(accuracy["pivot"].values()) / len(world.domains)
    checks.append(Check("pivot before fusion: average", f"{pivot:.1f}", f"< {PIVOT_ROOM:.0f} (room for SFT)", pivot < PIVOT_ROOM))
    vectors = {}
    for domain, path in world.specialist_paths.items():
        name = f"specialist-{domain}"
        vectors[name] = task_vector(world.merge_base_path, path)
        gain = accuracy[name][domain] - accuracy["base"][domain]
        checks.append(Check(f"{name}: gain over the base on {domain}", f"{gain:+.1f}", ">= +20 points", gain >= 20))
        checks.append(Check(f"{name}: ||tau|| / ||theta||, in embeddings", f"{vectors[name]['ratio']:.3f}, "
                            f"{100 * vectors[name]['embedding_share']:.0f}%", f"<= {SMALL_UPDATE}, 0%",
                            vectors[name]["ratio"] <= SMALL_UPDATE and vectors[name]["embedding_share"] == 0))
    vectors["multitask"] = task_vector(world.merge_base_path, world.multitask_path)
    return {"accuracy": accuracy, "task_vectors": vectors, "checks": checks}


def _within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


def gym_tables(report: dict) -> list:
    """The report of `gym_report` as rich tables: validation accuracy, task vectors, premise checks."""
    from rich.table import Table

    domains = list(next(iter(report["accuracy"].values())))
    accuracy = Table(title="Validation accuracy (%)")
    for column in ["model", *domains, "average"]:
        accuracy.add_column(column, justify="left" if column == "model" else "right")
    for model, scores in report["accuracy"].items():
        accuracy.add_row(model, *(f"{scores[d]:.1f}" for d in domains), f"{sum(scores.values()) / len(scores):.1f}")
    vectors = Table(title="Task vectors against the merging base")
    for column in ["model", "||tau|| / ||theta||", "share of ||tau||^2 in embeddings"]:
        vectors.add_column(column, justify="left" if column == "model" else "right")
    for model, vector in report["task_vectors"].items():
        vectors.add_row(model, f"{vector['ratio']:.4f}", f"{100 * vector['embedding_share']:.1f}%")
    checks = Table(title="Premises")
    for column in ["premise", "measured", "target", "holds"]:
        checks.add_column(column)
    for check in report["checks"]:
        checks.add_row(check.premise, check.measured, check.target, "yes" if check.holds else "[red]no[/]")
    return [accuracy, vectors, checks]
