"""Evaluation batching: greedy generation cut by a token budget over length-sorted prompts (what `polyfuse eval`
and the recipe's eval stage do now) against fixed batches of 64 prompts (what they did before), on the toy
world's held-out prompts, with every toy model; plus the cost of the gold bits per byte that evaluation now
measures (one token-budget `score` call per model).

    python bench/eval_batching.py [--preset tiny --per-domain 100 --rounds 3 --budgets 4096 8192 16384]
    python bench/eval_batching.py --smoke    # 4 prompts per domain, one round, two settings: seconds

Rounds interleave the settings (A, B, C, A, B, C, ...) so that load on a shared machine hits each alike; the
best round per setting is reported, and the responses of every setting are checked to be the same.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--per-domain", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--smoke", action="store_true", help="tiny world, 4 prompts per domain, 8 new tokens, "
                        "one round, one budget: seconds")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.per_domain, args.max_new_tokens, args.rounds, args.budgets = "tiny", 4, 8, 1, [4096]

    import torch

    from polyfuse.evaluation.evaluate import gold_bpb
    from polyfuse.models import ModelSpec
    from polyfuse.sampling import SamplingParams
    from polyfuse.sampling.transformers_backend import TransformersBackend, TransformersSettings
    from polyfuse.toyworld import ToyWorldConfig, build_world

    torch.set_num_threads(1)  # as the demo runs the toy models
    world = build_world(ToyWorldConfig.preset(args.preset), progress=False)
    prompts = world.prompts("heldout", per_domain=args.per_domain)
    models = {"pivot": world.pivot_path, **world.source_paths}
    backends = {name: TransformersBackend(ModelSpec(path=str(path)), TransformersSettings()) for name, path in models.items()}
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens)
    settings = {"64 prompts per batch (before)": {"batch_size": 64}}
    settings.update({f"token budget {b}": {"token_budget": b} for b in args.budgets})
    best: dict[str, float] = {}
    answers: dict[str, list] = {}
    for _ in range(args.rounds):
        for name, options in settings.items():
            started = time.perf_counter()
            answers[name] = [backend.generate_all([p.prompt for p in prompts], params, **options)
                             for backend in backends.values()]
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    reference = answers[next(iter(settings))]
    scoring = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        for backend in backends.values():
            gold_bpb(backend, prompts, args.budgets[0])
        scoring.append(time.perf_counter() - started)
    print(f"{len(prompts)} held-out prompts x {len(models)} models ({args.preset} world), greedy, "
          f"{args.max_new_tokens} new tokens at most; best of {args.rounds} interleaved rounds")
    print("| batching | generation wall (s) | vs before | same responses |")
    print("|---|---:|---:|---|")
    for name in settings:
        print(f"| {name} | {best[name]:.1f} | {best[name] / best[next(iter(settings))]:.2f}x | "
              f"{answers[name] == reference} |")
    print(f"gold bits per byte of every prompt, all models (token budget {args.budgets[0]}): {min(scoring):.1f} s")


if __name__ == "__main__":
    main()
