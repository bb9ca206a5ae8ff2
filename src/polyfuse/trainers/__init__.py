"""Thin `transformers.Trainer` subclasses for SFT, distillation, preference and unpaired training, and their entry
points.

The names below are imported from their modules on first use, so the configs (`polyfuse.trainers.config`, what
the stage commands are built from) import without torch and transformers."""

from polyfuse.lazy import lazy_exports

_EXPORTS = {  # module -> the names it gives the package
    "collate": ("SequenceCollator", "SharedPromptCollator"),
    "config": ("DistillTrainConfig", "LoraSettings", "OnPolicyTrainConfig", "PreferenceTrainConfig", "SFTTrainConfig",
               "TrainConfig", "UnpairedTrainConfig"),
    "distill": ("DistillCollator", "DistillTrainer", "train_distill"),
    "preference": ("PreferenceTrainer", "ensure_reference_columns", "tokenize_pairs", "train_preference"),
    "sft": ("SFTTrainer", "tokenize_sft", "train_sft"),
    "trainer": ("PolyfuseTrainer",),
    "unpaired": ("UnpairedTrainer", "train_unpaired"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
