"""Training losses as pure functions of tensors: the SFT token loss, the preference objectives
(`OBJECTIVES`), the unpaired objectives (`UNPAIRED_OBJECTIVES`: KTO, CGPO, FuseSFT) and the distillation
objectives (`DISTILL_OBJECTIVES`).

The registries name this package: on their first lookup they import every module of it, so a new
objective registers itself just by being a file here.
"""

from polyfuse.objectives.base import (
    OBJECTIVES,
    PreferenceBatch,
    PreferenceObjective,
    logps_column,
    reward_metrics,
)
from polyfuse.objectives.cgpo import (
    CGPO,
    cgpo_loss,
    reference_scores,
    undesirable_coefficient,
)
from polyfuse.objectives.consensus import (
    Consensus,
    ConsensusSettings,
    EntropyCalibration,
    align_to_pivot,
    build_consensus,
    calibration_prompts,
    check_disjoint,
    confidence_weights,
    fit_entropy_calibration,
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
from polyfuse.objectives.fusesft import FuseSFT, fusesft_loss, fusesft_row_weights, fusesft_weights
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
from polyfuse.objectives.kto import KTO, kto_loss
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
from polyfuse.objectives.unpaired import (
    COMPLETION,
    KL_COMPLETION,
    UNPAIRED_OBJECTIVES,
    UnpairedBatch,
    UnpairedObjective,
    reference_point,
    value_losses,
)
from polyfuse.objectives.wrpo import WRPO, wrpo_alpha, wrpo_loss

__all__ = [
    "CGPO",
    "COMPLETION",
    "DISTILL_OBJECTIVES",
    "DPO",
    "IGNORE_INDEX",
    "IPO",
    "KL_COMPLETION",
    "KTO",
    "OBJECTIVES",
    "UNPAIRED_OBJECTIVES",
    "WRPO",
    "AlignedRow",
    "Consensus",
    "ConsensusSettings",
    "DistillBatch",
    "DistillObjective",
    "EntropyCalibration",
    "FuseLLMObjective",
    "FuseSFT",
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
    "UnpairedBatch",
    "UnpairedObjective",
    "align_to_pivot",
    "average_weights",
    "avg_ce_weights",
    "build_consensus",
    "calibration_prompts",
    "cgpo_loss",
    "check_disjoint",
    "clip_to_pivot",
    "confidence_fuse",
    "confidence_weights",
    "dpo_loss",
    "fit_entropy_calibration",
    "fuse_references",
    "fuse_sparse",
    "fused_reference",
    "fusesft_loss",
    "fusesft_row_weights",
    "fusesft_weights",
    "infifpo_loss",
    "ipo_loss",
    "kto_loss",
    "logit_std",
    "logps_column",
    "min_ce_choice",
    "reference_point",
    "reference_scores",
    "reward_metrics",
    "sequence_logps",
    "soft_cross_entropy",
    "student_uld_probs",
    "teacher_uld_probs",
    "token_cross_entropy",
    "topk_entropy",
    "uld_distance",
    "uncertainty_weights",
    "undesirable_coefficient",
    "value_losses",
    "wrpo_alpha",
    "wrpo_loss",
]
