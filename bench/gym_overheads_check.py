"""The byte-identity and CPU check of the protocol's overhead cuts (docs/gym.md, "Budget"): in one process, one
test evaluation (12,000 items) with the tokenising memo off, first and warm (records compared), then distillation
trainings (`key` or `key:times`, keys of `gym_protocol.DISTILL` and `sft-gold`) whose `model.safetensors` is compared
with a model of the same method trained before the change (`--before <folder>/<key>/model`: e.g. the scratch folder of
`bench/gym_protocol_costs.py --only distill` run on the code before):

    python bench/gym_overheads_check.py --run <cache>/gym-fbc3d68940 --before runs/gym-costs eval uld-uncertainty:2
    python bench/gym_overheads_check.py --smoke --run runs/gym-protocol-smoke/tiny-<key> eval   # the plumbing
"""

from __future__ import annotations

import argparse
import hashlib
from functools import partial
from pathlib import Path

from gym_protocol_costs import protocol_evaluation, timed, train_distill

from polyfuse.data.io import write_json
from polyfuse.models import templates


def weights_hash(model: Path) -> str:
    return hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a protocol cache whose implicit and distill data are done")
    parser.add_argument("--distill-run", type=Path, default=None, help="the distill family's cache (default: --run)")
    parser.add_argument("--before", type=Path, default=None, help="models trained before the change: <before>/<key>/model")
    parser.add_argument("--scratch", type=Path, default=Path("runs/gym-overheads"))
    parser.add_argument("--out", type=Path, default=Path("runs/gym-overheads.json"))
    parser.add_argument("--smoke", action="store_true", help="on a `gym_protocol.py --smoke` run: 4 test items per "
                        "domain (distillation keys need a gym preset's gold texts)")
    parser.add_argument("what", nargs="+", help="eval, and distillation keys (key or key:times)")
    args = parser.parse_args()
    preset = args.run.name.rsplit("-", 1)[0]  # the protocol names its cache <preset>-<key>
    import torch

    torch.set_num_threads(1)
    found: dict[str, object] = {}
    if "eval" in args.what:
        run = protocol_evaluation(args.run, preset, 0, args.smoke)

        keyed = templates._tokenizer_key
        templates._tokenizer_key = lambda tokenizer: ()  # the memo off
        off, plain = timed(run)
        templates._tokenizer_key = keyed
        (first, cold), (warm, again) = timed(run), timed(run)
        records = [[r.model_dump() for r in result.records] for result in (plain, cold, again)]
        found["eval"] = {"cpu_s memo off / first / warm": [off, first, warm],
                         "identical": records[0] == records[1] == records[2]}
        print(found, flush=True)
    store = (args.distill_run or args.run) / "distill" / "data" / "teacher" / "store"  # on a gym: its gold texts
    for spec in (w for w in args.what if w != "eval"):
        key, times = (spec.split(":") + ["1"])[:2]
        for n in range(1, int(times) + 1):
            spent, model = timed(partial(train_distill, key, preset, 0, store, args.scratch / f"{key}-{n}"))
            same = None if args.before is None else weights_hash(Path(model)) == weights_hash(args.before / key / "model")
            found[f"{key} #{n}"] = {"cpu_s": spent, "identical_to_before": same}
            print(found, flush=True)
    write_json(args.out, found)


if __name__ == "__main__":
    main()
