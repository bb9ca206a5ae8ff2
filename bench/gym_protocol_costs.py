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


def timed(work: Callable[[], object]) -> tuple[float, object]:
    """(CPU seconds of this process, rounded to 0.1; what `work` returned)."""
    started = time.process_time()
    result = work()
    return round(time.process_time() - started, 1), result


def protocol_evaluation(run: Path, preset: str, seed: int, smoke: bool) -> Callable[[], object]:
    """One test evaluation as the protocol runs it (12,000 items on a gym; 4 per domain for a smoke), of the
    implicit family's SFT model of `seed`."""
    recipe = gym_protocol.family_recipe("infifpo", preset, [f"seed={seed}"])
    sft = gym_protocol.spec_at(recipe, run / "implicit" / "data" / f"seed{seed}" / "sft" / "model")
    items = list(gym_protocol.eval_items(preset, "test", 4 if smoke else 4000))
    return lambda: evaluate(sft, items, [build_scorer({"type": "toyworld"})], batch_size=256, max_new_tokens=16,
                            quiet=True)


def train_distill(key: str, preset: str, seed: int, store: Path, folder: Path) -> Path:
    """One training of a distillation method (`gym_protocol.DISTILL` key, or `sft-gold`) on a gym's gold texts, at
    the recipe's rate; returns its model folder."""
    distill = gym_protocol.family_recipe("infifusion-unified", preset, [])
    recipe = gym_protocol.with_section(distill, "distill", seed, distill.distill.learning_rate)
    gold = read_rows(gym_protocol.world(preset).gold_texts_path, SFTRow)
    if key == "sft-gold":
        return train_sft(recipe.pivot, gold, SFTTrainConfig(**explicit_fusion.train_settings(recipe)), folder / "model")
    return Path(explicit_fusion.train_method(gym_protocol.DISTILL[key], recipe, gold, store, folder))


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

    evaluation = protocol_evaluation(args.run, preset, args.seed, args.smoke)

    store = (args.distill_run or args.run) / "distill" / "data" / "teacher" / "store"

    def distill_training(key: str) -> Callable[[], object]:
        return lambda: train_distill(key, preset, args.seed, store, args.scratch / key)

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
        found[name] = timed(work)[0]
        print(f"{name}: {found[name]} CPU s", flush=True)
    write_json(args.out, {"cpu_s": found, "run": str(args.run), "seed": args.seed})


if __name__ == "__main__":
    main()
