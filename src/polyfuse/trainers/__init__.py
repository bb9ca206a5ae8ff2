"""Thin `transformers.Trainer` subclasses for SFT, distillation and preference training, and their entry points."""

from polyfuse.trainers.base import LoraSettings, PolyfuseTrainer, SequenceCollator, TrainConfig
from polyfuse.trainers.distill import DistillCollator, DistillTrainConfig, DistillTrainer, train_distill
from polyfuse.trainers.preference import (
    PreferenceTrainConfig,
    PreferenceTrainer,
    ensure_reference_columns,
    tokenize_pairs,
    train_preference,
)
from polyfuse.trainers.sft import SFTTrainConfig, SFTTrainer, tokenize_sft, train_sft

__all__ = [
    "DistillCollator",
    "DistillTrainConfig",
    "DistillTrainer",
    "LoraSettings",
    "PolyfuseTrainer",
    "PreferenceTrainConfig",
    "PreferenceTrainer",
    "SFTTrainConfig",
    "SFTTrainer",
    "SequenceCollator",
    "TrainConfig",
    "ensure_reference_columns",
    "tokenize_pairs",
    "tokenize_sft",
    "train_distill",
    "train_preference",
    "train_sft",
]
