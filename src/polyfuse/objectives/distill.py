"""Explicit fusion (spec `explicit-fusion.md`): distillation losses on precomputed teacher targets.

- `uld` (InfiFusion, section 2): CE plus the weighted ULD distance between the student's and each teacher's
  sorted top-K probabilities after logit standardisation; needs no vocabulary mapping.
- `fusellm` (FuseLLM / FuseChat, section 1): `lambda*CE + (1-lambda)*soft CE` against one fused sparse
  target in the pivot's vocabulary, built offline (`avg_ce_weights`, `min_ce_choice`, `fuse_sparse`).

Every loss is per response position: the trainer sums it and divides by the global token count (spec 0).
Teacher targets are constants; the student's logits are upcast to fp32 once and shared by every term.
Standard deviations are the sample std (Bessel-corrected, torch's default), as in the logit-standardisation
reference code (CVPR 2024, `logit.std(-1)`); over a vocabulary the two definitions differ by ~1/(2V).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.errors import DataError
from polyfuse.registry import Registry

STD_EPS = 1e-6


@dataclass
class DistillBatch:
    """Student logits and precomputed teacher targets at the N response positions of a micro-batch
    (row-major order of the scored positions: position j's logits predict response token j)."""

    logits: torch.Tensor  # [N, V] student logits (any dtype; losses compute in fp32), carries gradients
    labels: torch.Tensor  # [N] gold next tokens (pivot vocabulary)
    teacher_probs: torch.Tensor | None = None  # [N, T, K] sort_desc(softmax(z_topK / tau)), 0-padded
    teacher_mask: torch.Tensor | None = None  # [N, T] bool: teacher t has a position aligned to n
    teacher_entropy: torch.Tensor | None = None  # [N, T] H of the raw top-K softmax, in [0, ln K]
    target_ids: torch.Tensor | None = None  # [N, M] fused sparse target ids (pivot vocab), padded
    target_probs: torch.Tensor | None = None  # [N, M] their probabilities (0 on padding); rows sum to 1

    def require(self, name: str) -> torch.Tensor:
        """A precomputed teacher field, detached: teacher targets are constants of the loss."""
        value = getattr(self, name)
        if value is None:
            raise DataError(f"the distillation objective needs {name!r}, which the batch does not have")
        return value.detach()


# ---- shared pieces -------------------------------------------------------------------------------------


def logit_std(logits: torch.Tensor) -> torch.Tensor:
    """Per-position sample std over the full vocabulary, fp32: the one statistic a teacher stores so that its
    top-K logits can be standardised offline exactly as the student's are online."""
    return logits.float().std(dim=-1)


def standardize_logits(logits: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """Z-score per position over the full vocabulary, fp32: `(l - mean) / (std + eps)`."""
    x = logits.float()
    return (x - x.mean(-1, keepdim=True)) / (logit_std(x)[..., None] + eps)


def _log_probs_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 log q_theta [N, M] at ids [N, M] (any integer dtype), gathered, so no vocabulary-sized target is
    ever built."""
    x = logits.float()
    return x.gather(-1, ids.long()) - torch.logsumexp(x, dim=-1, keepdim=True)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 NLL [N] of the gold next tokens; every position is scored (no ignore index)."""
    return -_log_probs_at(logits, labels[:, None]).squeeze(-1)


# ---- ULD (InfiFusion) ------------------------------------------------------------------------------------


def teacher_uld_probs(
    topk_logits: torch.Tensor, std: torch.Tensor | None, tau: float = 1.0, standardize: bool = True
) -> torch.Tensor:
    """`sort_desc(softmax(z_topK / tau))` [.., K] from a model's top-K raw logits [.., K] and its full-vocabulary
    std [..] (`logit_std`; unused without standardisation). The mean cancels inside the softmax, so
    `z_topK / tau = l_topK / (tau * (std + eps))` up to a shift. Renormalised over the K entries (spec 2.2
    suggestion). Padding entries are -inf and come out as trailing zeros; an all-padding row is all zeros."""
    x = topk_logits.float()
    if standardize:
        if std is None:
            raise ValueError("standardised ULD targets need the full-vocabulary std")
        x = x / (std.float()[..., None] + STD_EPS)
    probs = torch.softmax(x / tau, dim=-1)
    probs = torch.where(torch.isneginf(topk_logits), 0.0, probs)  # all -inf rows: NaN -> 0
    return probs.sort(dim=-1, descending=True).values


def student_uld_probs(
    logits: torch.Tensor, k: int = 10, tau: float = 1.0, standardize: bool = True
) -> torch.Tensor:
    """The student's sorted top-K probabilities [N, K], through `teacher_uld_probs` so both sides share one
    definition. Standardisation is a positive affine map, so the top-K of raw and standardised logits agree;
    gradients reach every logit through the std."""
    x = logits.float()
    return teacher_uld_probs(
        x.topk(k, dim=-1).values, logit_std(x) if standardize else None, tau, standardize
    )


def uld_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """L1 distance [N, T] between sorted vectors, student [N, K_s] against each teacher [N, T, K_t], the
    shorter side zero-padded."""
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    student = torch.nn.functional.pad(student_probs, (0, width - student_probs.shape[-1]))
    teacher = torch.nn.functional.pad(teacher_probs, (0, width - teacher_probs.shape[-1]))
    return (student[:, None, :] - teacher).abs().sum(-1)


def topk_entropy(topk_logits: torch.Tensor) -> torch.Tensor:
    """Entropy [..] of softmax over a model's raw top-K logits [.., K] (T = 1, renormalised over the K), the
    uncertainty of the project decision (spec 2.5), in [0, ln K]. -inf padding is ignored; an all-padding
    row gives 0."""
    padding = torch.isneginf(topk_logits)
    log_p = torch.log_softmax(topk_logits.float(), dim=-1)
    return -torch.where(padding, 0.0, log_p.exp() * log_p).sum(-1)


def uncertainty_weights(entropy: torch.Tensor, mask: torch.Tensor, tau_u: float = 1.0) -> torch.Tensor:
    """Project decision (spec 2.5): `w = softmax over the aligned teachers of -H / tau_u` [N, T], detached.
    Unaligned teachers get 0; a position with no aligned teacher gets all zeros."""
    mask = mask.bool()
    scores = (-entropy.detach().float() / tau_u).masked_fill(~mask, float("-inf"))
    return torch.where(mask, torch.softmax(scores, dim=-1), 0.0)


def average_weights(mask: torch.Tensor) -> torch.Tensor:
    """`1 / #aligned` over the aligned teachers [N, T] (v3 default, the plain-averaging baseline)."""
    weights = mask.bool().float()
    return weights / weights.sum(-1, keepdim=True).clamp(min=1)


# ---- FuseLLM / FuseChat ----------------------------------------------------------------------------------


def soft_cross_entropy(
    logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor
) -> torch.Tensor:
    """`-sum_m p_m log q_theta(id_m)` [N] against sparse targets [N, M]. Padding entries have probability 0;
    their ids may be anything (e.g. -1) and are read as id 0."""
    target_probs = target_probs.detach().float()
    ids = target_ids.masked_fill(target_probs == 0, 0)
    return -(target_probs * _log_probs_at(logits, ids)).sum(-1)


def min_ce_choice(ce: torch.Tensor | Sequence[float]) -> int:
    """MinCE: the candidate with the lowest CE [T]; ties go to the lowest index (the pivot is candidate 0,
    so a source must strictly beat it)."""
    return int(torch.as_tensor(ce).argmin())


def avg_ce_weights(ce: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """AvgCE weights [T] as in the released FuseLLM code: `softmax_k(exp(-CE_k))`. The double exponential
    keeps them close to uniform (exp(-CE) is in (0, 1])."""
    return torch.softmax(torch.exp(-torch.as_tensor(ce, dtype=torch.float32)), dim=-1)


def fuse_sparse(
    ids: Sequence[torch.Tensor], probs: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sum_k w_k P_k` over the union of the candidates' supports, for one position. Returns (ids int64,
    probs fp32) sorted by probability descending, ties by ascending id, so truncating keeps the largest
    entries; zero-probability entries (padding) are dropped. Sums to `sum_k w_k` (1 with `avg_ce_weights`)."""
    weights = torch.as_tensor(weights, dtype=torch.float32)
    all_ids = torch.cat([i.long() for i in ids])
    all_probs = torch.cat([w * p.float() for w, p in zip(weights, probs, strict=True)])
    support, inverse = torch.unique(all_ids, return_inverse=True)  # ascending ids
    fused = all_probs.new_zeros(len(support)).index_add_(0, inverse, all_probs)
    order = fused.sort(descending=True, stable=True).indices
    support, fused = support[order], fused[order]
    keep = fused > 0
    return support[keep], fused[keep]


# ---- registered objectives -------------------------------------------------------------------------------


class DistillObjective(StrictModel):
    """Hyper-parameters of one distillation loss. Calling it on a batch gives `(per-position losses [N],
    metrics)`, metrics per position [N] (`loss/ce`, `loss/kd`, ...).

    `needs` names the optional `DistillBatch` fields the loss always reads (what the data builder must
    prepare); `required_fields()` adds setting-dependent ones, as `PreferenceObjective.required_columns()`."""

    needs: ClassVar[tuple[str, ...]] = ()
    default_alignment: ClassVar[str] = "offsets"  # how the data builder pairs pivot and teacher tokens

    def required_fields(self) -> tuple[str, ...]:
        return self.needs

    @abstractmethod
    def __call__(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


DISTILL_OBJECTIVES: Registry[type[DistillObjective]] = Registry("distillation objective")


@DISTILL_OBJECTIVES.register("uld")
class ULDObjective(DistillObjective):
    """InfiFusion: `L_n = CE_n + lambda_kd * sum_t w_{n,t} * ULD_{n,t}` over the teachers aligned to n (one
    teacher: pairwise fusion; several: unified). Positions with no aligned teacher get CE only."""

    needs = ("teacher_probs", "teacher_mask")
    default_alignment = "positional"  # ULD's published rule (spec 2.3); `offsets` is the option

    lambda_kd: float = Field(default=1.0, ge=0)
    top_k: int = Field(default=10, ge=1)
    tau: float = Field(default=1.0, gt=0)
    standardize: bool = True
    weighting: Literal["average", "uncertainty"] = "average"
    tau_u: float = Field(default=1.0, gt=0)

    def required_fields(self) -> tuple[str, ...]:
        return self.needs + (("teacher_entropy",) if self.weighting == "uncertainty" else ())

    def __call__(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = batch.logits.float()  # one fp32 copy shared by CE and the standardisation
        mask = batch.require("teacher_mask").bool()
        teacher = torch.where(mask[..., None], batch.require("teacher_probs").float(), 0.0)  # no NaN leaks
        if self.weighting == "uncertainty":
            weights = uncertainty_weights(batch.require("teacher_entropy"), mask, self.tau_u)
        else:
            weights = average_weights(mask)
        ce = token_cross_entropy(logits, batch.labels)
        uld = uld_distance(student_uld_probs(logits, self.top_k, self.tau, self.standardize), teacher)
        kd = (weights * uld).sum(-1)
        aligned = mask.sum(-1).float()
        metrics = {
            "loss/ce": ce.detach(),
            "loss/kd": kd.detach(),
            "kd/uld": (uld.detach() * mask).sum(-1) / aligned.clamp(min=1),
            "kd/teachers_aligned": aligned,
        }
        return ce + self.lambda_kd * kd, metrics


@DISTILL_OBJECTIVES.register("fusellm")
class FuseLLMObjective(DistillObjective):
    """FuseLLM / FuseChat: `L_n = ce_weight * CE_n + (1 - ce_weight) * soft CE_n` against the fused sparse
    target. The fusion (`min_ce` or `avg_ce`), its top-K, the vocabulary map and the temperature are
    applied offline by the data builder (`polyfuse.teacher.targets`) and are recorded here so the config
    names them."""

    needs = ("target_ids", "target_probs")

    ce_weight: float = Field(default=0.9, ge=0, le=1)
    fusion: Literal["min_ce", "avg_ce"] = "min_ce"
    top_k: int = Field(default=10, ge=1)
    vocab_map: Literal["exact", "mined"] = Field(
        default="mined", description="Source ids into the pivot vocabulary: exact strings, or MinED."
    )
    temperature: float = Field(default=1.0, gt=0, description="T of softmax(logits / T) over the kept entries.")

    def __call__(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = batch.logits.float()  # one fp32 copy shared by both terms
        ce = token_cross_entropy(logits, batch.labels)
        kd = soft_cross_entropy(logits, batch.require("target_ids"), batch.require("target_probs"))
        metrics = {"loss/ce": ce.detach(), "loss/kd": kd.detach()}
        return self.ce_weight * ce + (1 - self.ce_weight) * kd, metrics
