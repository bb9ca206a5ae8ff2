"""SFT, then InfiFPO from the SFT model, and distillation from the initial model: the script
`tests/test_ddp.py` launches on 2 CPU processes (DDP, and FSDP2 with examples/accelerate/fsdp2.yaml)
and also calls in-process, with the same global batch, for comparison.

Usage: ddp_train.py MODEL_DIR DATA_DIR OUT_DIR GRAD_ACCUM
DATA_DIR holds sft.jsonl, pairs.jsonl, a teacher store `teacher/`, and sft.json, preference.json and
distill.json (configs). Results go to OUT_DIR/sft, OUT_DIR/preference and OUT_DIR/distill; each rank
also saves its final parameters to OUT_DIR/<stage>.rank<N>.pt, so the test can check that the replicas
agree.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from polyfuse.data import PreferenceRow, SFTRow, read_rows
from polyfuse.logprobs import fusion_sources
from polyfuse.models import ModelSpec
from polyfuse.trainers import (
    DistillTrainConfig,
    PreferenceTrainConfig,
    SFTTrainConfig,
    train_distill,
    train_preference,
    train_sft,
)


class SaveRankParameters(TrainerCallback):
    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        # Under FSDP2 each rank holds shards (DTensor): gather them (a collective, on every rank alike).
        local = model.state_dict()
        state_dict = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in local.items()}
        held = sum(v.to_local().numel() if isinstance(v, DTensor) else v.numel() for v in local.values())
        self.path.with_suffix(".numel").write_text(f"{held} {sum(v.numel() for v in state_dict.values())}")
        torch.save({k: v.detach().cpu().clone() for k, v in state_dict.items()}, self.path)


def main(model_dir: str, data_dir: str, out_dir: str, grad_accum: str) -> None:
    data, out = Path(data_dir), Path(out_dir)
    rank = int(os.environ.get("RANK", 0))  # set by the launcher; the process group starts later, in Trainer
    sft_config = SFTTrainConfig(**json.loads((data / "sft.json").read_text()), grad_accum=int(grad_accum))
    pref_config = PreferenceTrainConfig(
        **json.loads((data / "preference.json").read_text()), grad_accum=int(grad_accum)
    )
    sft = train_sft(
        ModelSpec(path=model_dir),
        read_rows(data / "sft.jsonl", SFTRow),
        sft_config,
        out / "sft",
        [SaveRankParameters(out / f"sft.rank{rank}.pt")],
    )
    pairs = read_rows(data / "pairs.jsonl", PreferenceRow)
    train_preference(
        ModelSpec(path=str(sft)),
        pairs,
        pref_config,
        out / "preference",
        [SaveRankParameters(out / f"preference.rank{rank}.pt")],
        source_names=fusion_sources(data / "pairs.jsonl", pairs),
    )
    distill_config = DistillTrainConfig(**json.loads((data / "distill.json").read_text()), grad_accum=int(grad_accum))
    train_distill(
        ModelSpec(path=model_dir),
        read_rows(data / "sft.jsonl", SFTRow),
        data / "teacher",
        distill_config,
        out / "distill",
        [SaveRankParameters(out / f"distill.rank{rank}.pt")],
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
