"""Training losses as pure functions of tensors: the SFT token loss, the preference objectives
(`OBJECTIVES`) and the distillation objectives (`DISTILL_OBJECTIVES`).

Both registries name this package: on their first lookup they import every module of it, so a new
objective registers itself just by being a file here.
"""

from polyfuse.objectives.base import (
    OBJECTIVES,
    PreferenceBatch,
    PreferenceObjective,
    logps_column,
    reward_metrics,
)
from polyfuse.objectives.distill import (
    DISTILL_OBJECTIVES,
    AlignedRow,
    DistillBatch,
    DistillObjective,
    TargetField,
    TeacherOutputs,
    TeacherVocabulary,
    logit_std,
    token_cross_entropy,
)
from polyfuse.objectives.dpo import DPO, LengthNormalizedDPO, dpo_loss
from polyfuse.objectives.fusellm import (
    FuseLLMObjective,
    avg_ce_weights,
    fuse_sparse,
    min_ce_choice,
    soft_cross_entropy,
)
from polyfuse.objectives.infifpo import (
    FusedReferenceObjective,
    InfiFPO,
    InfiFPOIPO,
    InfiFPOWRPO,
    clip_to_pivot,
    confidence_fuse,
    fuse_references,
    fused_reference,
    infifpo_loss,
)
from polyfuse.objectives.ipo import IPO, ipo_loss
from polyfuse.objectives.logps import IGNORE_INDEX, sequence_logps
from polyfuse.objectives.uld import (
    ULDObjective,
    average_weights,
    student_uld_probs,
    teacher_uld_probs,
    topk_entropy,
    uld_distance,
    uncertainty_weights,
)
from polyfuse.objectives.wrpo import WRPO, wrpo_alpha, wrpo_loss

__all__ = [
    "DISTILL_OBJECTIVES",
    "DPO",
    "IGNORE_INDEX",
    "IPO",
    "OBJECTIVES",
    "WRPO",
    "AlignedRow",
    "DistillBatch",
    "DistillObjective",
    "FuseLLMObjective",
    "FusedReferenceObjective",
    "InfiFPO",
    "InfiFPOIPO",
    "InfiFPOWRPO",
    "LengthNormalizedDPO",
    "PreferenceBatch",
    "PreferenceObjective",
    "TargetField",
    "TeacherOutputs",
    "TeacherVocabulary",
    "ULDObjective",
    "average_weights",
    "avg_ce_weights",
    "clip_to_pivot",
    "confidence_fuse",
    "dpo_loss",
    "fuse_references",
    "fuse_sparse",
    "fused_reference",
    "infifpo_loss",
    "ipo_loss",
    "logit_std",
    "logps_column",
    "min_ce_choice",
    "reward_metrics",
    "sequence_logps",
    "soft_cross_entropy",
    "student_uld_probs",
    "teacher_uld_probs",
    "token_cross_entropy",
    "topk_entropy",
    "uld_distance",
    "uncertainty_weights",
    "wrpo_alpha",
    "wrpo_loss",
]
