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
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import explicit_fusion
import gym_protocol

from polyfuse.data.io import read_rows, write_json
from polyfuse.data.schemas import SFTRow
from polyfuse.evaluation import evaluate
from polyfuse.models import templates
from polyfuse.scorers import build_scorer
from polyfuse.trainers import SFTTrainConfig, train_sft


def cpu(work: Callable[[], object]) -> tuple[float, object]:
    started = time.process_time()
    result = work()
    return round(time.process_time() - started, 1), result


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
        recipe = gym_protocol.family_recipe("infifpo", preset, ["seed=0"])
        sft = gym_protocol.spec_at(recipe, args.run / "implicit" / "data" / "seed0" / "sft" / "model")
        items = list(gym_protocol.eval_items(preset, "test", 4 if args.smoke else 4000))

        def run() -> object:
            return evaluate(sft, items, [build_scorer({"type": "toyworld"})], batch_size=256, max_new_tokens=16, quiet=True)

        keyed = templates._tokenizer_key
        templates._tokenizer_key = lambda tokenizer: ()  # the memo off
        off, plain = cpu(run)
        templates._tokenizer_key = keyed
        (first, cold), (warm, again) = cpu(run), cpu(run)
        records = [[r.model_dump() for r in result.records] for result in (plain, cold, again)]
        found["eval"] = {"cpu_s memo off / first / warm": [off, first, warm],
                         "identical": records[0] == records[1] == records[2]}
        print(found, flush=True)
    def train(key: str, folder: Path) -> Path:  # on a gym preset: its gold texts
        distill = gym_protocol.family_recipe("infifusion-unified", preset, [])
        recipe = gym_protocol.with_section(distill, "distill", 0, distill.distill.learning_rate)
        gold = read_rows(gym_protocol.world(preset).gold_texts_path, SFTRow)
        store = (args.distill_run or args.run) / "distill" / "data" / "teacher" / "store"
        if key == "sft-gold":
            return train_sft(recipe.pivot, gold, SFTTrainConfig(**explicit_fusion.train_settings(recipe)), folder / "model")
        return explicit_fusion.train_method(gym_protocol.DISTILL[key], recipe, gold, store, folder)

    for spec in (w for w in args.what if w != "eval"):
        key, times = (spec.split(":") + ["1"])[:2]
        for n in range(1, int(times) + 1):
            spent, model = cpu(partial(train, key, args.scratch / f"{key}-{n}"))
            same = None if args.before is None else weights_hash(Path(model)) == weights_hash(args.before / key / "model")
            found[f"{key} #{n}"] = {"cpu_s": spent, "identical_to_before": same}
            print(found, flush=True)
    write_json(args.out, found)


if __name__ == "__main__":
    main()
