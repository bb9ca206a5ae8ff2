"""Step-0 DPO loss on a tiny GPT-2 with dropout 0.1: polyfuse's preference trainer against TRL 1.16's
`DPOTrainer`, each with dropout disabled (both tools' default) and kept.

At step 0 the policy equals its reference M0, so with dropout off every pair's loss is
-log sigmoid(0) = ln 2 = 0.693147 in both tools; with dropout on the policy's log-probs are noisy while
the reference's are not, and the loss moves away from ln 2. The tools tokenise the same conversational
pairs with the same chat template; the reference of polyfuse is the precomputed `ref_*` columns (M0 in
eval mode), TRL's a reference model scoring in eval mode.

    pip install -e '.[bench]'       # TRL 1.16 (or: pip install --no-deps trl==1.16.0)
    python bench/dropout_vs_trl.py   # seconds: the test suite runs it as it is
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
from pathlib import Path

from _train_bench import require_trl, trl_help

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def build_gpt2(folder: Path, rate: float) -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny_lm import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=rate, embd_pdrop=rate, attn_pdrop=rate, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def rows(count: int) -> list[dict]:
    from tiny_lm import sentence

    rng = random.Random(0)
    return [
        {"id": f"p{i}", "prompt": [{"role": "user", "content": sentence(rng)}],
         "chosen": [{"role": "assistant", "content": sentence(rng, 3, 12)}],
         "rejected": [{"role": "assistant", "content": sentence(rng, 3, 12)}]}
        for i in range(count)
    ]  # fmt: skip


def polyfuse_first_loss(model_dir: str, data: list[dict], disable: bool, work: Path) -> float:
    from polyfuse.data import PreferenceRow
    from polyfuse.models import ModelSpec
    from polyfuse.trainers import PreferenceTrainConfig, train_preference

    config = PreferenceTrainConfig(batch_size=len(data), learning_rate=1e-6, beta=0.1, disable_dropout=disable,
                                   warmup_ratio=0.0)  # fmt: skip
    out = train_preference(ModelSpec(path=model_dir), [PreferenceRow.model_validate(r) for r in data], config,
                           work / f"polyfuse-{disable}")  # fmt: skip
    return json.loads((out / "polyfuse_training.json").read_text())["log_history"][0]["loss"]


def trl_first_loss(model_dir: str, data: list[dict], disable: bool, work: Path) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, ref = (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32) for _ in range(2))
    config = DPOConfig(output_dir=str(work / f"trl-{disable}"), per_device_train_batch_size=len(data), num_train_epochs=1,
                       learning_rate=1e-6, beta=0.1, loss_type=["sigmoid"], disable_dropout=disable, logging_steps=1,
                       save_strategy="no", report_to="none", gradient_checkpointing=False, seed=42,
                       train_sampling_strategy="sequential", bf16=False)  # fmt: skip
    trainer = DPOTrainer(model=model, ref_model=ref, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in data]))  # fmt: skip
    trainer.train()
    return next(e["loss"] for e in trainer.state.log_history if "loss" in e)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " " + trl_help()).parse_args(argv)
    require_trl()
    work = Path(tempfile.mkdtemp(prefix="dropout-vs-trl-"))
    model_dir = build_gpt2(work / "gpt2", 0.1)
    data = rows(8)
    results = [(name, disable, run(model_dir, data, disable, work)) for disable in (True, False)
               for name, run in (("polyfuse", polyfuse_first_loss), ("TRL 1.16", trl_first_loss))]  # fmt: skip
    print(f"\nln 2 = {math.log(2):.6f}; tiny GPT-2, dropout 0.1 (resid, embd, attn), 8 pairs in one step, beta 0.1")
    print(f"{'tool':<10} {'dropout':<9} {'step-0 loss':>12} {'- ln 2':>10}")
    for name, disable, loss in results:
        print(f"{name:<10} {'off' if disable else 'on':<9} {loss:>12.6f} {loss - math.log(2):>+10.6f}")


if __name__ == "__main__":
    main()
