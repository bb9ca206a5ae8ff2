"""The fusion gym's calibration (docs/gym.md), measured: is each family's premise of issue 21 met by the `gym` preset?

    python bench/gym_calibration.py --out docs/gym/calibration.json
    python bench/gym_calibration.py --smoke      # gym-tiny, 4 items per domain: that it runs

For one world seed: the `gym` preset is built (or found in the cache: then the build time is the one recorded in
its world.json), `polyfuse toyworld info`'s premise report runs (validation accuracy of every model, task
vectors, checks), and two recipe runs measure what the report cannot: `fusechat3-gym` up to SFT (how many
intra-source pairs its preference prompts give, and the pivot's validation accuracy after SFT: the room left
for preference optimisation) and `infifpo-gym` up to its pairs (how many cross-model pairs). The load average
of the machine is recorded before and after, since the wall times depend on it; the CPU seconds of the build do
not. The two runs and the report run side by side. Runs are cached under `--work-dir`, so a rerun only reads and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from polyfuse.data.io import write_json
from polyfuse.toyworld import ToyWorldConfig, build_world
from polyfuse.toyworld.info import VALIDATION_ITEMS, gym_report

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "src" / "polyfuse" / "recipes"


def start_recipe(recipe: str, work: Path, stages: list[str], overrides: list[str], seed: int) -> subprocess.Popen | None:
    """Start `polyfuse run` of a shipped recipe with `stages` only (None when an earlier run finished it)."""
    if (work / "done").is_file():
        return None
    sets = [f"stages=[{', '.join(stages)}]", f"toyworld.seed={seed}", *overrides]
    return subprocess.Popen([sys.executable, "-c", "from polyfuse.cli.main import main; main()", "run",
                             str(RECIPES / recipe), "--work-dir", str(work), "--quiet",
                             *[a for s in sets for a in ("--set", s)]])


def finish_recipe(run: subprocess.Popen | None, work: Path, started: float) -> float:
    """Wait for a run of `start_recipe`; its wall seconds (recorded in `work`/done)."""
    if run is not None:
        if run.wait():
            raise SystemExit(f"{work}: polyfuse run failed (exit code {run.returncode})")
        (work / "done").write_text(str(round(time.perf_counter() - started, 1)))
    return float((work / "done").read_text())


def pairs_report(work: Path) -> dict:
    return json.loads(next(work.rglob("pairs/**/report.json")).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="World seed.")
    parser.add_argument("--per-domain", type=int, default=VALIDATION_ITEMS, help="Validation items per domain.")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/gym-calibration"))
    parser.add_argument("--out", type=Path, default=Path("docs/gym/calibration.json"))
    parser.add_argument("--smoke", action="store_true", help="gym-tiny, 4 items per domain, no SFT, under runs/.")
    args = parser.parse_args()
    preset, tiny = "gym", []
    if args.smoke:
        preset, args.per_domain = "gym-tiny", 4
        tiny = ["toyworld.preset=gym-tiny", "prompts.toyworld.per_domain=4", "eval.prompts.toyworld.per_domain=4"]
        args.work_dir, args.out = Path("runs/gym-calibration-smoke"), Path("runs/gym-calibration-smoke/calibration.json")
    load_before = os.getloadavg()
    world = build_world(ToyWorldConfig.preset(preset).model_copy(update={"seed": args.seed}))
    built = json.loads((world.root / "world.json").read_text())
    work = args.work_dir / f"seed{args.seed}-{world.root.name}"
    validation = ["eval.prompts.toyworld.split=validation", f"eval.prompts.toyworld.per_domain={args.per_domain}",
                  "eval.models=[pivot, sft]", *tiny]
    stages = ["prompts", "sample", "score", "pairs", "sft", "eval"]
    if args.smoke:  # gym-tiny's sources are barely trained: no correct sample, no SFT row
        stages, validation = [s for s in stages if s != "sft"], [*validation, "eval.models=[pivot]"]
    started = time.perf_counter()  # the two runs and the report are independent: they run side by side
    fusechat = start_recipe("fusechat3-gym.yaml", work / "fusechat3", stages, validation, args.seed)
    infifpo = start_recipe("infifpo-gym.yaml", work / "infifpo", ["prompts", "sample", "score", "pairs"], tiny, args.seed)
    report = gym_report(world, per_domain=args.per_domain, quiet=False)
    seconds = {"fusechat3-gym": finish_recipe(fusechat, work / "fusechat3", started),
               "infifpo-gym": finish_recipe(infifpo, work / "infifpo", started)}
    results = json.loads(next((work / "fusechat3").rglob("eval/**/results.json")).read_text())
    result = {
        "seed": args.seed, "world": str(world.root), "per_domain": args.per_domain,
        "build": {"wall_seconds": built["build_seconds"], "cpu_seconds": built.get("cpu_seconds"),
                  "cpu_seconds_total": round(sum((built.get("cpu_seconds") or {}).values()), 1)},
        "accuracy": report["accuracy"], "task_vectors": report["task_vectors"],
        "checks": [asdict(c) for c in report["checks"]],
        "pairs": {"intra_source (fusechat3-gym)": pairs_report(work / "fusechat3"),
                  "cross_model (infifpo-gym)": pairs_report(work / "infifpo")},
        "after_sft": {name: {d: 100 * s["accuracy"] for d, s in r["per_domain"].items()} for name, r in results.items()},
        "recipe_seconds": seconds,
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("build", "pairs", "after_sft", "load_average")}, indent=1))


if __name__ == "__main__":
    main()
