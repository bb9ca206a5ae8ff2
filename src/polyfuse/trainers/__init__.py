"""Thin `transformers.Trainer` subclasses for SFT, distillation and preference training, and their entry points.

The names below are imported from their modules on first use, so the configs (`polyfuse.trainers.config`, what
the stage commands are built from) import without torch and transformers."""

from polyfuse.lazy import lazy_exports

_EXPORTS = {
    "SequenceCollator": "collate",
    "SharedPromptCollator": "collate",
    "DistillTrainConfig": "config",
    "LoraSettings": "config",
    "PreferenceTrainConfig": "config",
    "SFTTrainConfig": "config",
    "TrainConfig": "config",
    "DistillCollator": "distill",
    "DistillTrainer": "distill",
    "train_distill": "distill",
    "PreferenceTrainer": "preference",
    "ensure_reference_columns": "preference",
    "tokenize_pairs": "preference",
    "train_preference": "preference",
    "SFTTrainer": "sft",
    "tokenize_sft": "sft",
    "train_sft": "sft",
    "PolyfuseTrainer": "trainer",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
