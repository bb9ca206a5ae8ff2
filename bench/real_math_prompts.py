"""Writes the prompts of recipes/real-infifpo-verifier.yaml: 24 short math word problems for training and 24
held out, 8 of each of three reasoning-gym families at easy settings (where SmolLM2-135M-Instruct solves some
and fails others, docs/real-tier.md), each after one solved example of its family, judged by the `math`
verifier (math-verify) against the numeric answer.

    python bench/real_math_prompts.py      # rewrites recipes/data/real-math-train.jsonl and real-math-test.jsonl
    python bench/real_math_prompts.py --smoke   # the same rows into ./real-math-smoke/, leaving the checkout alone
"""

from __future__ import annotations

import argparse
from pathlib import Path

from real_tier_probe import FAMILIES as PROBE_FAMILIES

from polyfuse.data.io import write_rows
from polyfuse.data.schemas import PromptRow
from polyfuse.evaluation.datasets import load_reasoning_gym

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"
# Easy settings where SmolLM2 has room (greedy, 3 shots: 12.5%, 12.5%, 29.2%; docs/real-tier.md).
FAMILIES = {family: PROBE_FAMILIES[family] for family in ("basic_arithmetic", "leg_counting", "gcd")}
SPLITS = {"train": 1000, "test": 2000}  # the reasoning-gym seed of each split
PER_FAMILY = 8


def prompts(seed: int) -> list[PromptRow]:
    """PER_FAMILY items of every family, domain `math` (the math verifier judges them), ids naming the family."""
    rows = []
    for family, options in FAMILIES.items():
        for row in load_reasoning_gym(family, size=PER_FAMILY, seed=seed, system=None, shots=1, **options):
            rows.append(PromptRow(id=row.id, prompt=row.prompt, domain="math", answer=row.answer))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA, help="folder of the two files (default: recipes/data)")
    parser.add_argument("--smoke", action="store_true", help="write into ./real-math-smoke instead")
    args = parser.parse_args()
    out = Path("real-math-smoke") if args.smoke else args.out
    out.mkdir(parents=True, exist_ok=True)
    for split, seed in SPLITS.items():
        count = write_rows(out / f"real-math-{split}.jsonl", prompts(seed))
        print(f"wrote {count} prompts to {out / f'real-math-{split}.jsonl'}")


if __name__ == "__main__":
    main()
