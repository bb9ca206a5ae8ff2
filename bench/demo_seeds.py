"""Run `polyfuse demo` for several seeds and print the per-domain accuracy table, mean and spread.

    python bench/demo_seeds.py --seeds 0 1 2 --work-dir runs/demo-seeds
    python bench/demo_seeds.py --smoke    # the tiny world, seed 0, in runs/demo-seeds-smoke: seconds

Each seed changes sampling, the SFT/PO split and training; the toy world itself (seed 0) is shared.
The Markdown table printed at the end is what `docs/results.md` records.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from polyfuse.evaluation import load_eval_report
from polyfuse.evaluation.report import describe_gains
from polyfuse.pipeline.demo import run_demo
from polyfuse.toyworld import ToyWorldConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/demo-seeds"))
    parser.add_argument("--preset", default="default")
    parser.add_argument("--smoke", action="store_true", help="--preset tiny --seeds 0 (default work dir "
                        "runs/demo-seeds-smoke): the plumbing in seconds")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.seeds = "tiny", [0]
        if args.work_dir == parser.get_default("work_dir"):
            args.work_dir = Path("runs/demo-seeds-smoke")
    summaries = [run_demo(args.work_dir / f"seed{seed}", seed=seed, preset=args.preset, quiet=True)
                 for seed in args.seeds]
    models = list(summaries[0]["accuracy"])
    domains = list(summaries[0]["accuracy"][models[0]]["per_domain"])
    print(f"\nSeeds {args.seeds}; held-out accuracy (%), mean ± standard deviation over seeds.\n")
    print("| model | " + " | ".join([*domains, "average"]) + " |")
    print("|---|" + "---:|" * (len(domains) + 1))
    for model in models:
        cells = []
        for domain in [*domains, "average"]:
            values = [100 * (s["accuracy"][model]["average"] if domain == "average"
                             else s["accuracy"][model]["per_domain"][domain]["accuracy"]) for s in summaries]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        print(f"| {model} | " + " | ".join(cells) + " |")
    runs = [load_eval_report(args.work_dir / f"seed{seed}" / "eval") for seed in args.seeds]
    sources = {s.name for s in ToyWorldConfig.preset(args.preset).sources}
    print("\n" + "\n".join(describe_gains(runs, sources, summaries[0]["domains"])))
    walls = [s["wall_s"] for s in summaries]
    print(f"\nDemo wall time per seed (s): {walls}")
    for seed, summary in zip(args.seeds, summaries, strict=True):
        print(f"seed {seed}: pairs {summary['pairs']}")


if __name__ == "__main__":
    main()
