"""CPU seconds of the gym protocol's components (issue 21 item 3, "Budget"), each measured alone in this process
(`time.process_time`, one thread) on one seed's data of a finished protocol run, so that the cold protocol's CPU can
be projected from counts (docs/gym.md, "Budget") without running it whole on a shared machine:

    python bench/gym_protocol_costs.py --run runs/gym-protocol/gym-fbc3d68940 --seed 0 --out runs/gym-costs.json
    python bench/gym_protocol_costs.py --smoke --run runs/gym-protocol-smoke/tiny-<key>   # on a --smoke protocol run

Components: sampling one chunk of one source, scoring 1,024 samples (reward model and verifier), one SFT epoch, one
DPO training (the implicit family's recipe), one CGPO training (the unpaired family's, at its recipe rate) and reading
its rows apart, the unpaired log-probs (M0 and every source, with entropies) of a tenth of the rows, one training of
each distillation method (SFT on the gold texts, ULD with uncertainty weights, FuseLLM MinCE; `--distill-run`: the
distill family's data, whose teacher store the trainings read) and one test evaluation (12,000 items). Nothing under `--run` is written; every output goes
to `--scratch`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import explicit_fusion
import gym_protocol
import infifpo_ablation

from polyfuse.data.io import read_rows, write_json
from polyfuse.data.schemas import PromptRow, SampleRow, SFTRow, UnpairedRow
from polyfuse.evaluation import evaluate
from polyfuse.logprobs import LogprobsConfig, run_logprobs
from polyfuse.sampling import SampleConfig, run_sample
from polyfuse.scorers import build_scorer
from polyfuse.scorers.run import ScoreConfig, run_score
from polyfuse.trainers import SFTTrainConfig, train_sft, train_unpaired


def cpu(work: Callable[[], object]) -> float:
    started = time.process_time()
    work()
    return round(time.process_time() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a protocol cache: <work-dir>/gym-<key>")
    parser.add_argument("--distill-run", type=Path, default=None,
                        help="a protocol cache whose distill family's data is done (default: --run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", type=Path, default=Path("runs/gym-costs"))
    parser.add_argument("--out", type=Path, default=Path("runs/gym-costs.json"))
    parser.add_argument("--only", nargs="+", default=None, help="measure only these components")
    parser.add_argument("--smoke", action="store_true", help="on a `gym_protocol.py --smoke` run (its world's "
                        "preset, 4 test items per domain), the components whose data a smoke run holds: the plumbing")
    args = parser.parse_args()
    preset = args.run.name.rsplit("-", 1)[0]  # the protocol names its cache <preset>-<key>
    if args.smoke:
        args.only = args.only or ["sample", "score", "sft", "dpo", "cgpo", "eval"]
    import torch

    torch.set_num_threads(1)
    shutil.rmtree(args.scratch, ignore_errors=True)
    implicit = args.run / "implicit" / "data" / f"seed{args.seed}"
    unpaired = args.run / "unpaired" / "data" / f"seed{args.seed}" / "cgpo"
    recipe = gym_protocol.family_recipe("infifpo", preset, [f"seed={args.seed}"])
    cgpo = gym_protocol.family_recipe("cgpo", preset, [f"seed={args.seed}"])
    sft = gym_protocol.spec_at(recipe, implicit / "sft" / "model")
    prompts = read_rows(implicit / "prompts" / "prompts.jsonl", PromptRow)
    samples = read_rows(implicit / "sample" / "samples.jsonl", SampleRow)

    def sample() -> None:
        config = recipe.sample.model_copy(update={"models": recipe.sample.models[:1]})
        run_sample(prompts[: config.chunk_size], SampleConfig.model_validate(config.model_dump()),
                   args.scratch / "sample", quiet=True)

    def score() -> None:
        run_score(samples[:1024], ScoreConfig.model_validate(recipe.score.model_dump()), args.scratch / "score", quiet=True)

    def sft_epoch() -> None:
        train_sft(recipe.pivot, read_rows(implicit / "pairs" / "sft.jsonl", SFTRow),
                  recipe.sft.model_copy(update={"epochs": 1, "seed": args.seed}), args.scratch / "sft")

    def dpo() -> None:
        row = next(m for m in infifpo_ablation.METHODS if m.key == "dpo")
        infifpo_ablation.train_method(row, gym_protocol.with_section(recipe, "po", args.seed, recipe.po.learning_rate),
                                      sft, implicit / "logprobs" / "preference.jsonl", args.scratch / "dpo")

    rows_path = unpaired / "consensus" / "unpaired.jsonl"

    def cgpo_rows() -> None:
        read_rows(rows_path, UnpairedRow)

    def cgpo_training() -> None:
        section = gym_protocol.with_section(cgpo, "upo", args.seed, cgpo.upo.learning_rate).upo
        train_unpaired(gym_protocol.spec_at(cgpo, unpaired / "sft" / "model"), read_rows(rows_path, UnpairedRow), section,
                       args.scratch / "cgpo", data_path=rows_path)

    def logprobs() -> None:  # M0 and every source, with entropies, on a tenth of the rows
        section = json.loads((unpaired / "logprobs" / "manifest.json").read_text())["config"]["section"]
        pivot = section["pivot"] | {"path": str(unpaired / "sft" / "model")}
        rows = read_rows(unpaired / "pairs" / "unpaired.jsonl", UnpairedRow)
        run_logprobs(LogprobsConfig.model_validate({**section, "pivot": pivot}), rows[::10], args.scratch / "logprobs.jsonl",
                     quiet=True)

    def evaluation() -> None:
        items = list(gym_protocol.eval_items(preset, "test", 4 if args.smoke else 4000))
        evaluate(sft, items, [build_scorer({"type": "toyworld"})], batch_size=256, max_new_tokens=16, quiet=True)

    distill_root = (args.distill_run or args.run) / "distill"
    distill_recipe = gym_protocol.family_recipe("infifusion-unified", preset, [])

    def distill_training(key: str) -> Callable[[], object]:
        def train() -> object:
            gold = read_rows(gym_protocol.world(preset).gold_texts_path, SFTRow)
            recipe = gym_protocol.with_section(distill_recipe, "distill", args.seed, distill_recipe.distill.learning_rate)
            if key == "sft-gold":
                settings = explicit_fusion.train_settings(recipe)
                return train_sft(recipe.pivot, gold, SFTTrainConfig(**settings), args.scratch / key / "model")
            return explicit_fusion.train_method(gym_protocol.DISTILL[key], recipe, gold,
                                                distill_root / "data" / "teacher" / "store", args.scratch / key)
        return train

    components = {"sample: 1 chunk x 1 source": sample, "score: 1,024 samples": score, "sft: 1 epoch": sft_epoch,
                  "dpo: 1 training": dpo, "cgpo: reading its rows": cgpo_rows, "cgpo: 1 training": cgpo_training,
                  "logprobs: a tenth of the unpaired rows": logprobs,
                  "distill: sft-gold, 1 training": distill_training("sft-gold"),
                  "distill: uld-uncertainty, 1 training": distill_training("uld-uncertainty"),
                  "distill: fusellm-min-ce, 1 training": distill_training("fusellm-min-ce"),
                  "eval: 12,000 test items": evaluation}
    found: dict[str, float] = {}
    for name, work in components.items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        found[name] = cpu(work)
        print(f"{name}: {found[name]} CPU s", flush=True)
    write_json(args.out, {"cpu_s": found, "run": str(args.run), "seed": args.seed})


if __name__ == "__main__":
    main()
