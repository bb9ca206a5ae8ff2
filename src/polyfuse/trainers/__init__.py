"""Thin `transformers.Trainer` subclasses for SFT, distillation, preference and unpaired training, and their entry
points."""

from polyfuse.trainers.collate import SequenceCollator, SharedPromptCollator
from polyfuse.trainers.config import LoraSettings, TrainConfig
from polyfuse.trainers.distill import DistillCollator, DistillTrainConfig, DistillTrainer, train_distill
from polyfuse.trainers.preference import (
    PreferenceTrainConfig,
    PreferenceTrainer,
    ensure_reference_columns,
    tokenize_pairs,
    train_preference,
)
from polyfuse.trainers.sft import SFTTrainConfig, SFTTrainer, tokenize_sft, train_sft
from polyfuse.trainers.trainer import PolyfuseTrainer
from polyfuse.trainers.unpaired import UnpairedTrainConfig, UnpairedTrainer, train_unpaired

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
    "SharedPromptCollator",
    "TrainConfig",
    "UnpairedTrainConfig",
    "UnpairedTrainer",
    "ensure_reference_columns",
    "tokenize_pairs",
    "tokenize_sft",
    "train_distill",
    "train_preference",
    "train_sft",
    "train_unpaired",
]
