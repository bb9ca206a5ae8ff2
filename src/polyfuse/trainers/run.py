"""One training run from pre-tokenised features to a saved model: resume, train, save, clean up."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from polyfuse.errors import DataError
from polyfuse.trainers.callbacks import TrainingProgress, tracking_callbacks
from polyfuse.trainers.checkpoints import CompleteCheckpoints, checkpoints, fingerprint, resolve_resume
from polyfuse.trainers.config import TrainConfig
from polyfuse.trainers.distributed import distributed_summary
from polyfuse.trainers.model_setup import add_lora, disable_dropout
from polyfuse.trainers.saving import save_trained


@dataclass
class TrainingRun:
    """A run's settings, where its model is saved, the caller's extra callbacks and whether it resumes
    (None: this run's last complete checkpoint if there is one, as recipes do; True: `--resume`; False:
    start at step 0; see `checkpoints.resolve_resume`). Creating it builds Trainer's arguments, which
    also sets up the (distributed) device: do it before loading the model."""

    config: TrainConfig
    out_dir: Path
    callbacks: list[TrainerCallback] | None = None
    resume: bool | None = None
    args: Any = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.args = self.config.training_arguments(self.out_dir)

    @property
    def device(self) -> Any:
        return self.args.device

    def train(self, trainer_cls: type, model: Any, tokenizer: Any, features: Any, collator: Any,
              summary: dict[str, Any], **trainer_kwargs: Any) -> Path:
        """Train on `features` (a list, or a `datasets.Dataset` kept on disk) and save the result to
        `out_dir`. A failed run leaves Trainer's scratch folder only when it holds checkpoints to resume
        from."""
        if len(features) == 0:
            dropped = len(summary.get("dropped") or [])
            raise DataError(f"no training rows: all {dropped} rows are longer than max_length "
                            f"{self.config.max_length} tokens; raise max_length" if dropped
                            else "no training rows: the data is empty")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        expected = fingerprint(self.config, summary, self.args.world_size)
        resume_from = resolve_resume(Path(self.args.output_dir), expected, self.resume, self.args.process_index == 0)
        if self.config.lora is not None:
            model = add_lora(model, self.config.lora, self.config.seed)
        dropout = disable_dropout(model) if self.config.disable_dropout else None
        progress = TrainingProgress(f"train {getattr(self.config, 'objective', None) or summary['stage']}")
        try:
            trainer = self._trainer(trainer_cls, model, tokenizer, features, collator, expected, trainer_kwargs)
            trainer.add_callback(progress)
            trainer.train(resume_from_checkpoint=resume_from)
            progress.close()
            summary = {**summary, "config": self.config.model_dump(), "examples": len(features),
                       "distributed": distributed_summary(trainer.accelerator)}
            return save_trained(trainer, tokenizer, self.out_dir, summary, dropout)
        except BaseException:
            scratch = Path(self.args.output_dir)  # keep it only for the checkpoints a rerun can resume from
            if self.args.process_index == 0 and scratch.is_dir() and not checkpoints(scratch):
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        finally:
            progress.close()  # also when training fails: the terminal gets its cursor back

    def _trainer(self, trainer_cls: type, model: Any, tokenizer: Any, features: Any, collator: Any, expected: str,
                 trainer_kwargs: dict[str, Any]) -> Any:
        from datasets import Dataset

        trainer = trainer_cls(
            model=model,
            args=self.args,
            data_collator=collator,
            train_dataset=features if isinstance(features, Dataset) else Dataset.from_list(features),
            processing_class=tokenizer,
            callbacks=[*tracking_callbacks(self.config, self.out_dir), *(self.callbacks or []),
                       CompleteCheckpoints(expected, self.config.save_total_limit)],
            **trainer_kwargs,
        )
        trainer.remove_callback(PrinterCallback)  # `TrainingProgress` stands in for both
        trainer.remove_callback(ProgressCallback)
        return trainer
