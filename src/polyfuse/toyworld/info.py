"""How good is each model of a world: greedy held-out accuracy per domain, and reward-model ranking."""

from __future__ import annotations

import random

import torch

from polyfuse.evaluation import EvalResult, evaluate
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer
from polyfuse.scorers import build_scorer
from polyfuse.toyworld.build import World
from polyfuse.toyworld.tasks import distinct_tasks, get_domain, make_row

INFO_SEED = 12345  # held-out prompts for `world_info`; any seed gives held-out tasks only


def world_info(world: World, per_domain: int = 100, quiet: bool = True) -> dict[str, EvalResult]:
    """Held-out accuracy (greedy, `per_domain` prompts per domain) of every source and the pivot."""
    prompts = world.prompts("heldout", per_domain=per_domain, seed=INFO_SEED)
    verifier = build_scorer({"type": "toyworld"})
    models = {**world.source_paths, "pivot": world.pivot_path}
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
