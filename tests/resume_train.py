"""`tests/test_checkpoints.py` runs this in a subprocess: SFT that kills itself with SIGKILL (kill -9) at
a chosen point, as a preempted node would.

Usage: resume_train.py MODEL_DIR DATA CONFIG OUT [KILL_AT] [resume]
KILL_AT is `step:K` (right after optimiser step K) or `save:K` (while checkpoint-K is being written: Trainer
has written its files, polyfuse's completeness marker is not there yet); empty: run to the end.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from polyfuse.data import SFTRow, read_rows
from polyfuse.models import ModelSpec
from polyfuse.trainers import SFTTrainConfig, train_sft


class KillAt(TrainerCallback):
    def __init__(self, event: str, step: int):
        self.event, self.step = event, step

    def _maybe_kill(self, event: str, state) -> None:
        if event == self.event and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_kill("step", state)

    def on_save(self, args, state, control, **kwargs):
        self._maybe_kill("save", state)


def main(model_dir: str, data: str, config: str, out: str, kill_at: str = "", resume: str = "") -> None:
    torch.set_num_threads(1)
    callbacks = []
    if kill_at:
        event, step = kill_at.split(":")
        callbacks.append(KillAt(event, int(step)))
    train_sft(ModelSpec(path=model_dir), read_rows(Path(data), SFTRow),
              SFTTrainConfig(**json.loads(Path(config).read_text())), Path(out), callbacks,
              resume=True if resume else None)  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
