"""Is preference optimisation at or below SFT on the gym a polyfuse bug or the method on this data? (issue 21:
"find out whether it is a polyfuse bug ... or the method, and say which"). Checks one seed's implicit-family data
and runs, as bench/gym_protocol.py left them in its work folder:

1. the SFT / PO split: no PO prompt is an SFT prompt;
2. the reference log-probs the PO objectives start from: recomputed for a sample of pairs with plain
   transformers (the SFT model, its own chat template, no polyfuse code) and compared with the `ref_*` columns;
3. what the pairs can teach: the SFT model's greedy answer on every PO prompt, how often it is already right,
   and how often it *is* the pair's rejected (or chosen) response, by who wrote the rejected side;
4. how each trained PO run moved the policy: the first and last logged log-probs of chosen and rejected;
5. with `--control`, a positive control: DPO on the same PO prompts and chosen responses, but with the SFT model's
   own wrong samples (WRPO's target samples, which the protocol's wrpo row builds) as the rejected side, trained
   at the protocol's grid and scored on the validation items beside SFT. If it beats SFT where the recipe's
   pairs do not, the DPO code works and the recipe's off-policy pairs are what leaves it at SFT.

    python bench/gym_implicit_diagnose.py --root /tmp/ev-implicit/gym-<key> --seed 0 --control 0.0333 0.1 0.3 1
    python bench/gym_implicit_diagnose.py --smoke   # the protocol's smoke run (tiny world), then every check on it
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from _train_bench import run_script_here
from transformers import AutoModelForCausalLM, AutoTokenizer

from polyfuse.data.io import read_rows, write_json, write_rows
from polyfuse.data.schemas import PreferenceRow, PromptRow, SampleRow, SFTRow, response_text
from polyfuse.evaluation import evaluate
from polyfuse.evaluation.stats import AVERAGE, compare_methods
from polyfuse.models import ModelSpec
from polyfuse.scorers import build_scorer


def reference_check(sft_model: Path, rows: list[PreferenceRow], count: int, seed: int) -> dict:
    """sum log p(response | prompt) under the SFT model by plain transformers against the stored
    `ref_chosen_logps` / `ref_rejected_logps`. The response's tokens are, as TRL takes them, every token of the
    templated conversation after the templated prompt (with its generation prompt): the answer, the end-of-turn
    token and what the template writes after it."""
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    model = AutoModelForCausalLM.from_pretrained(sft_model, dtype=torch.float32).eval()
    picked = random.Random(seed).sample(rows, min(count, len(rows)))
    gaps = []
    for row in picked:
        prompt = [{"role": "user", "content": row.prompt}]
        start = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
        for side, stored in ((row.chosen, row.ref_chosen_logps), (row.rejected, row.ref_rejected_logps)):
            ids = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response_text(side)}],
                                                tokenize=True, return_dict=False)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            logps = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            gaps.append(abs(float(logps[start - 1 :].sum()) - stored))
    return {"pairs_checked": len(picked), "max_abs_diff": max(gaps), "mean_abs_diff": float(np.mean(gaps))}


def what_pairs_teach(sft_model: Path, rows: list[PreferenceRow], prompts: dict[str, PromptRow]) -> dict:
    """The SFT model's greedy answers on the PO prompts against the pairs built there."""
    items = [prompts[r.id] for r in rows]
    result = evaluate(ModelSpec(path=str(sft_model)), items, [build_scorer({"type": "toyworld"})], batch_size=256,
                      max_new_tokens=16, quiet=True, bpb=False)
    greedy = {r.prompt_id: r for r in result.records}
    by_author: dict[str, dict[str, float]] = {}
    for row in rows:
        author = row.rejected_id.split(":")[1]
        found = by_author.setdefault(author, {"pairs": 0, "sft_right": 0, "sft_says_rejected": 0, "sft_says_chosen": 0})
        answer = greedy[row.id].response.strip()
        found["pairs"] += 1
        found["sft_right"] += greedy[row.id].correct
        found["sft_says_rejected"] += answer == response_text(row.rejected).strip()
        found["sft_says_chosen"] += answer == response_text(row.chosen).strip()
    total = {k: sum(v[k] for v in by_author.values()) for k in ("pairs", "sft_right", "sft_says_rejected",
                                                                 "sft_says_chosen")}
    share = {k: round(v / total["pairs"], 4) for k, v in total.items() if k != "pairs"}
    return {"pairs": total["pairs"], **share, "by_rejected_author": by_author}


def trajectories(family: Path) -> dict:
    """Per trained run: the first and last logged mean log-probs of chosen and rejected (policy), and the loss."""
    out = {}
    for summary in sorted(family.glob("*/lr*/seed*/model/polyfuse_training.json")):
        history = [e for e in json.loads(summary.read_text())["log_history"] if "loss" in e]
        if history:
            run = "/".join(summary.parts[-5:-2])
            out[run] = {k: [round(history[0].get(k, float("nan")), 3), round(history[-1].get(k, float("nan")), 3)]
                        for k in ("loss", "logps/chosen", "logps/rejected", "rewards/margins")}
    return out


def on_policy_pairs(pairs: list[PreferenceRow], target_scored: Path) -> list[PreferenceRow]:
    """Each PO pair's chosen response against the first wrong sample of the SFT model on its prompt (prompts where
    every SFT sample is right have no pair)."""
    wrong: dict[str, SampleRow] = {}
    for sample in read_rows(target_scored, SampleRow):
        if sample.correct is False and sample.response.strip() and sample.prompt_id not in wrong:
            wrong[sample.prompt_id] = sample
    def swapped(row: PreferenceRow, sample: SampleRow) -> PreferenceRow:  # no log-prob columns: the trainer adds them
        kept = {k: v for k, v in row.model_dump().items() if not k.startswith(("ref_", "fuse_"))}
        return PreferenceRow.model_validate({**kept, "rejected": [{"role": "assistant", "content": sample.response}],
                                             "rejected_id": sample.id, "rejected_reward": sample.rewards.get("rm"),
                                             "rejected_correct": False})

    return [swapped(row, wrong[row.id]) for row in pairs
            if row.id in wrong and wrong[row.id].response.strip() != response_text(row.chosen).strip()]


def control(root: Path, seed: int, pairs: list[PreferenceRow], lr_scales: list[float], preset: str,
            items: dict[str, int], smoke: bool) -> dict:
    """DPO on on-policy pairs at each rate of the grid (seed `seed`), and every model of that seed's grid (the
    protocol's and this one's) against the SFT model on the validation items: paired, 95% item-bootstrap interval."""
    import gym_protocol
    import infifpo_ablation

    data = root / "implicit" / "data" / f"seed{seed}"
    rows = on_policy_pairs(pairs, data / "wrpo" / "score" / "scored.jsonl")
    path = root / "implicit" / "control-on-policy" / f"seed{seed}" / "pairs.jsonl"
    if not path.is_file():
        write_rows(path, rows)
    protocol = gym_protocol.Protocol(preset, [seed], lr_scales, [1.0], items, smoke, root, Path("unused"))
    recipe = gym_protocol.family_recipe("infifpo", preset, [f"seed={seed}", *gym_protocol.world_overrides(protocol)])
    sft = gym_protocol.spec_at(recipe, data / "sft" / "model")
    found = {"pairs": pair_stats_of(rows), "sft": gym_protocol.accuracy(gym_protocol.scores(protocol, sft, "validation"))}
    if not rows:  # a world whose verifiers pass nothing (tiny) judges no SFT sample wrong
        return {"pairs": found["pairs"], "note": "no SFT sample was judged wrong by a verifier: nothing to train"}
    dpo = next(m for m in infifpo_ablation.METHODS if m.key == "dpo")
    for scale in lr_scales:
        lr = recipe.po.learning_rate * scale
        infifpo_ablation.train_method(dpo, gym_protocol.with_section(recipe, "po", seed, lr), sft, path,
                                      path.parent / f"lr{lr:.3g}")
    baseline = gym_protocol.scores(protocol, sft, "validation")
    found["vs_sft_on_validation"] = {}  # every seed-`seed` model of the protocol's grid and of this control
    for model in sorted([*(root / "implicit").glob(f"*/lr*/seed{seed}/model"), *path.parent.glob("lr*/model")]):
        spec = gym_protocol.spec_at(recipe, model)
        if gym_protocol.eval_path(protocol, spec, "validation").is_file() or model.parent.parent == path.parent:
            row = next(r for r in compare_methods([gym_protocol.scores(protocol, spec, "validation")], [baseline])
                       if r.row == AVERAGE)
            name = str(model.parent.relative_to(root / "implicit")).replace(f"/seed{seed}", "")
            found["vs_sft_on_validation"][name] = {"accuracy": round(row.a, 2), "diff": round(row.diff.value, 2),
                                                   "ci95": [round(row.diff.low, 2), round(row.diff.high, 2)]}
    return {k: {"accuracy": round(100 * v[0], 2), "bpb": round(v[1], 4)} if isinstance(v, tuple) else v
            for k, v in found.items()}


def pair_stats_of(rows: list[PreferenceRow]) -> dict:
    by_domain: dict[str, int] = {}
    for row in rows:
        by_domain[row.domain] = by_domain.get(row.domain, 0) + 1
    return {"pairs": len(rows), "by_domain": by_domain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="gym_protocol's work folder of the setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-pairs", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("docs/evidence/gym-implicit-diagnose.json"))
    parser.add_argument("--control", type=float, nargs="*", default=None, metavar="LR_SCALE",
                        help="run the on-policy positive control at these multiples of the recipe's PO rate")
    parser.add_argument("--preset", default="gym", help="the world the protocol ran on")
    parser.add_argument("--items", type=int, nargs=2, default=[1000, 4000], metavar=("VALIDATION", "TEST"),
                        help="the protocol's items per domain (its cache folder's setting)")
    parser.add_argument("--smoke", action="store_true", help="run gym_protocol.py --smoke --families implicit (tiny "
                        "world, under runs/), then every check and the control at one rate on it")
    args = parser.parse_args()
    if args.smoke:
        work = Path("runs/gym-protocol-smoke")
        code, _ = run_script_here([str(Path(__file__).parent / "gym_protocol.py"), "--smoke", "--families", "implicit",
                                   "--work-dir", str(work)], sys.stderr)  # in this process: a new one imports for seconds
        if code:
            sys.exit(f"gym_protocol.py --smoke failed (exit {code})")
        args.root = next(work.glob("tiny-*"))
        args.preset, args.items, args.reference_pairs, args.control = "tiny", [4, 4], 4, [1.0]
        args.out = Path("runs/gym-implicit-diagnose-smoke.json")
    if args.root is None:
        parser.error("--root is required (or --smoke)")
    torch.set_num_threads(1)
    data = args.root / "implicit" / "data" / f"seed{args.seed}"
    sft_model = data / "sft" / "model"
    pairs = read_rows(data / "logprobs" / "preference.jsonl", PreferenceRow)
    sft_ids = {r.id for r in read_rows(data / "pairs" / "sft.jsonl", SFTRow)}
    prompts = {p.id: p for p in read_rows(data / "prompts" / "prompts.jsonl", PromptRow)}
    report = {
        "seed": args.seed,
        "split": {"sft_prompts_with_rows": len(sft_ids), "po_pairs": len(pairs),
                  "po_prompts_also_in_sft": len({r.id for r in pairs} & sft_ids)},
        "reference": reference_check(sft_model, pairs, args.reference_pairs, args.seed),
        "sft_greedy_on_po_prompts": what_pairs_teach(sft_model, pairs, prompts),
        "runs": trajectories(args.root / "implicit"),
    }
    if args.control is not None:
        report["on_policy_control"] = control(args.root, args.seed, pairs, args.control or [0.1, 0.3, 1.0], args.preset,
                                              dict(zip(("validation", "test"), args.items, strict=True)), args.smoke)
    write_json(args.out, report)
    print(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
