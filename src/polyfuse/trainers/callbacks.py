"""Trainer callbacks of every run: the progress bar and where TensorBoard writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from polyfuse.progress import progress_bar


class TrainingProgress(TrainerCallback):
    """The training bar (optimiser steps, with the latest loss), on the main process and unless quiet. It
    stands in for transformers' tqdm bar and for its printing of every raw log dict on stdout; the logs
    are kept in `polyfuse_training.json`."""

    def __init__(self, description: str):
        self.description = description
        self.bar, self.task = None, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = progress_bar()
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=state.max_steps, completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.update(self.task, description=f"{self.description} (loss {float(logs['loss']):.4g})")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def tracking_callbacks(config: Any, out_dir: Path) -> list[TrainerCallback]:
    """TensorBoard writes to `config.logging_dir` (Trainer's default is inside its scratch folder, which
    is removed after saving); the other trackers are Trainer's own, through `report_to`."""
    if "tensorboard" not in config.report_to:
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = config.logging_dir or str(out_dir.parent / "logs" / out_dir.name)
    return [callback]
