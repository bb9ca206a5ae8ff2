"""Why do merges of the fusion gym's LoRA specialists keep almost none of their gains? Measures, on the gym's
shared base and its three specialists:

1. interference in accuracy: each specialist on the other domains against the base; the base plus one task
   vector shrunk as averaging shrinks it (1/3, 1/2: is the skill lost by the scale alone?); the base plus two
   task vectors at full weight (task arithmetic of a pair: does adding a second specialist destroy the first?);
2. interference in weights: cosine between task vectors (all tensors, and per kind of layer), and sign
   conflicts: the share of coordinates where the three task vectors do not all agree in sign (0.75 for
   independent signs), and TIES's view of it: the share of each task vector's squared norm on coordinates
   whose elected sign (sign of the sum) is the opposite of its own.

    python bench/gym_merge_diagnose.py --cache-dir /tmp/gymcal/cache/toyworld --out docs/gym/merge_diagnosis.json
    python bench/gym_merge_diagnose.py --smoke       # gym-tiny, 4 items per domain

Merges go through `polyfuse.merge` (task arithmetic, mergekit semantics; gym_merge_check.merge), evaluations
are greedy on gym_merge_check's validation items and cached under `--work-dir`.
"""

from __future__ import annotations

import itertools
import time

import torch
from _gym import gym_arguments
from gym_merge_check import accuracy, merge
from merge_methods_toy import task_vector_stats, weights

from polyfuse.data.io import write_json
from polyfuse.toyworld import ToyWorldConfig, build_world

SCALES = (1 / 3, 1 / 2)
KINDS = ("self_attn", "mlp")


def sign_conflicts(taus: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Sign agreement of the task vectors over the coordinates where every one of them is non-zero."""
    names = [k for k in next(iter(taus.values())) if all(t[k].abs().max() > 0 for t in taus.values())]
    stacked = {d: torch.cat([t[k].reshape(-1) for k in names]) for d, t in taus.items()}
    values = torch.stack(list(stacked.values()))
    signs = values.sign()
    nonzero = (signs != 0).all(0)
    disagree = (signs != signs[0]).any(0) & nonzero
    elected = values.sum(0).sign()
    against = {d: float((v.pow(2) * (v.sign() == -elected)).sum() / v.pow(2).sum()) for d, v in stacked.items()}
    return {"coordinates": int(nonzero.sum()), "share_not_all_agree": float(disagree.sum() / nonzero.sum()),
            "independent_signs_expectation": 1 - 2 * 0.5 ** len(taus), "norm2_share_against_elected_sign": against}


def kind_cosines(taus: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Cosine between every two task vectors restricted to attention, or to MLP, tensors."""
    out = {}
    for kind in KINDS:
        flat = {d: torch.cat([v.reshape(-1) for k, v in t.items() if kind in k]) for d, t in taus.items()}
        out[kind] = {f"{a}/{b}": float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0))
                     for a, b in itertools.combinations(flat, 2)}
    return out


def main() -> None:
    args = gym_arguments(__doc__, "gym-merge-diagnose", "docs/gym/merge_diagnosis.json", "diagnosis.json")
    started = time.perf_counter()
    world = build_world(ToyWorldConfig.preset(args.preset), cache_dir=args.cache_dir)
    work = args.work_dir / world.root.name
    prompts = world.prompts("validation", per_domain=args.per_domain, seed=0)
    base, specialists = world.merge_base_path, world.specialist_paths
    models = {"base": base, **{f"specialist-{d}": p for d, p in specialists.items()}}
    for domain, path in specialists.items():
        for scale in SCALES:
            models[f"base + {scale:.2f} tau[{domain}]"] = merge(
                "task_arithmetic", {"weight": round(scale, 4)}, {}, base, [path], work / f"scaled-{domain}-{scale:.2f}")
    for a, b in itertools.combinations(specialists, 2):
        models[f"base + tau[{a}] + tau[{b}]"] = merge(
            "task_arithmetic", {"weight": 1.0}, {}, base, [specialists[a], specialists[b]], work / f"pair-{a}-{b}")
    scores = {name: accuracy(name, path, prompts, work / "eval" / f"{name}.json") for name, path in models.items()}
    theta = weights(base)
    taus = {d: {k: v - theta[k] for k, v in weights(p).items()} for d, p in specialists.items()}
    report = {"world": str(world.root), "per_domain": args.per_domain, "accuracy": scores,
              "task_vectors": {**task_vector_stats(base, specialists), "cosine_by_kind": kind_cosines(taus),
                               "signs": sign_conflicts(taus)},
              "seconds": round(time.perf_counter() - started, 1)}
    write_json(args.out, report)
    domains = world.domains
    print("| model | " + " | ".join(domains) + " |")
    for name, s in scores.items():
        print(f"| {name} | " + " | ".join(f"{s[d]:.1f}" for d in domains) + " |")
    tv = report["task_vectors"]
    print("cosine", {k: round(v, 3) for k, v in tv["cosine"].items()})
    print("cosine by kind", {kind: {k: round(v, 3) for k, v in c.items()} for kind, c in tv["cosine_by_kind"].items()})
    print("signs", tv["signs"])


if __name__ == "__main__":
    main()
