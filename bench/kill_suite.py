"""Kill the tiny FuseChat-3.0 recipe just before every rename of its run, and at random moments, and count
what a rerun gets back.

    python bench/kill_suite.py --random 20 --work-dir runs/kill-suite
    python bench/kill_suite.py --smoke     # one kill, before the first rename, and its rerun

An uninterrupted run gives the reference and the list of its renames (every atomic write's commit point).
Then, for every n, a fresh work folder runs the recipe killed (SIGKILL) just before its n-th rename and is
rerun to the end; likewise for `--random` kills after a random delay (seeded). Each rerun is compared with
the reference: identical outputs, no temporary file left, no row duplicated. `tests/test_kills.py` is the
suite's short version (one kill per kind of write, chained in one work folder).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from kill_at_rename import launch  # noqa: E402
from polyfuse.config import apply_overrides  # noqa: E402
from polyfuse.data import SampleRow, read_rows  # noqa: E402
from polyfuse.pipeline.demo import recipe_path  # noqa: E402
from test_kills import digests, relative_renames, temporaries  # noqa: E402
from test_pipeline import tiny_overrides  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/kill-suite"))
    parser.add_argument("--random", type=int, default=20, help="random-moment kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=1, help="kill before every n-th rename only")
    parser.add_argument("--smoke", action="store_true", help="one kill, before the first rename, no random kill "
                        "(the reference run, the killed run and its rerun)")
    args = parser.parse_args()
    if args.smoke:
        args.every, args.random = 10**9, 0
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    recipe = args.work_dir / "recipe.yaml"
    base = yaml.safe_load(recipe_path("fusechat3-toy.yaml").read_text())
    recipe.write_text(yaml.safe_dump(apply_overrides(base, tiny_overrides(args.work_dir / "cache"))))

    def command(work: Path) -> list[str]:
        return ["run", str(recipe), "--work-dir", str(work), "-q"]

    reference, log = args.work_dir / "reference", args.work_dir / "reference.log"
    assert launch(command(reference), log=str(log)) == 0  # builds the toy world too

    expected, renames = digests(reference), relative_renames(log, reference)
    rows = len(read_rows(reference / "sample/samples.jsonl", SampleRow))
    rng = random.Random(args.seed)
    trials = [("rename", n) for n in range(1, len(renames) + 1, args.every)] + [("random", None)] * args.random
    run_s = None  # how long a whole run takes: random kills land within it
    counts = {"kills": 0, "identical": 0, "stray": 0, "duplicated": 0}
    for kind, point in trials:
        work = args.work_dir / "trial"
        shutil.rmtree(work, ignore_errors=True)
        if kind == "random":
            if run_s is None:  # a whole run's time, the world cached, measured now (the load changes)
                started = time.perf_counter()
                assert launch(command(args.work_dir / "warm")) == 0
                run_s = time.perf_counter() - started
            point = rng.uniform(0.5, 0.9 * run_s)
        code = launch(command(work), kill_at=point if kind == "rename" else None,
                      kill_after_s=point if kind == "random" else None)
        counts["kills"] += code != 0
        assert launch(command(work)) == 0
        same = digests(work) == expected
        stray = temporaries(work)
        samples = read_rows(work / "sample/samples.jsonl", SampleRow)
        counts["identical"] += same
        counts["stray"] += bool(stray)
        counts["duplicated"] += len({s.id for s in samples}) != len(samples) or len(samples) != rows
        where = renames[point - 1] if kind == "rename" else f"{point:.1f}s"
        print(f"{kind} {where}: {'killed' if code else 'finished first'}, {'identical' if same else 'DIFFERENT'}"
              f"{', stray ' + str(stray) if stray else ''}", flush=True)
    print(f"\n{len(trials)} trials ({len(renames)} renames in a run), {counts['kills']} kills: "
          f"{counts['identical']} identical outputs, {counts['stray']} with stray files, "
          f"{counts['duplicated']} with lost or duplicated rows")


if __name__ == "__main__":
    main()
