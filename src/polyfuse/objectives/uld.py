"""ULD (InfiFusion, arXiv 2501.02795; ULD, arXiv 2402.12030): CE plus the weighted ULD distance between the
student's and each teacher's sorted top-K probabilities after logit standardisation; needs no vocabulary
mapping, since ULD compares sorted vectors.

Per training row and teacher, the targets are the sorted top-K probabilities (`teacher_uld_probs`), the
teacher's top-K entropy (for uncertainty weights) and whether the teacher has a position aligned to each
of the pivot's response positions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from polyfuse.lazy import lazy_import
from polyfuse.objectives.distill import (
    DISTILL_OBJECTIVES,
    STD_EPS,
    AlignedRow,
    DistillBatch,
    DistillObjective,
    Groups,
    TargetField,
    TeacherOutputs,
    logit_std,
    token_cross_entropy,
)

np = lazy_import("numpy")
torch = lazy_import("torch")


def teacher_uld_probs(
    topk_logits: torch.Tensor, std: torch.Tensor | None, tau: float = 1.0, standardize: bool = True
) -> torch.Tensor:
    """`sort_desc(softmax(z_topK / tau))` [.., K] from a model's top-K raw logits [.., K] and its full-vocabulary
    std [..] (`logit_std`; unused without standardisation). The mean cancels inside the softmax, so
    `z_topK / tau = l_topK / (tau * (std + eps))` up to a shift. Renormalised over the K entries (not
    published; polyfuse's default). Padding entries are -inf and come out as trailing zeros; an
    all-padding row is all zeros."""
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
    uncertainty of `uncertainty_weights`, in [0, ln K]. -inf padding is ignored; an all-padding
    row gives 0."""
    padding = torch.isneginf(topk_logits)
    log_p = torch.log_softmax(topk_logits.float(), dim=-1)
    return -torch.where(padding, 0.0, log_p.exp() * log_p).sum(-1)


def uncertainty_weights(entropy: torch.Tensor, mask: torch.Tensor, tau_u: float = 1.0) -> torch.Tensor:
    """`w = softmax over the aligned teachers of -H / tau_u` [N, T], detached: InfiFusion v1/v2 publish no
    formula, this is polyfuse's (docs/design.md, "Explicit fusion"). Unaligned teachers get 0; a position
    with no aligned teacher gets all zeros."""
    mask = mask.bool()
    scores = (-entropy.detach().float() / tau_u).masked_fill(~mask, float("-inf"))
    return torch.where(mask, torch.softmax(scores, dim=-1), 0.0)


def average_weights(mask: torch.Tensor) -> torch.Tensor:
    """`1 / #aligned` over the aligned teachers [N, T] (v3 default, the plain-averaging baseline)."""
    weights = mask.bool().float()
    return weights / weights.sum(-1, keepdim=True).clamp(min=1)


def uld_targets(n: int, examples: list[TeacherOutputs | None], groups: list[Groups | None], top_k: int,
                tau: float, standardize: bool) -> dict[str, Any]:
    """`teacher_probs` [n][T][K], `teacher_mask` [n][T], `teacher_entropy` [n][T] for one row."""
    probs = np.zeros((n, len(examples), top_k), dtype=np.float32)
    mask = np.zeros((n, len(examples)), dtype=bool)
    entropy = np.zeros((n, len(examples)), dtype=np.float32)
    for t, (example, teacher_groups) in enumerate(zip(examples, groups, strict=True)):
        if example is None:
            continue
        pairs = [(left[0], right[0]) for left, right in teacher_groups]
        if not pairs:
            continue
        student_idx = np.array([j for j, _ in pairs])
        teacher_idx = np.array([k for _, k in pairs])
        logits = torch.from_numpy(example.topk_logits[teacher_idx].astype(np.float32))[:, :top_k]
        std = torch.from_numpy(example.std[teacher_idx])
        sorted_probs = teacher_uld_probs(logits, std, tau=tau, standardize=standardize)
        probs[student_idx, t, : sorted_probs.shape[-1]] = sorted_probs.numpy()
        entropy[student_idx, t] = topk_entropy(logits).numpy()
        mask[student_idx, t] = True
    return {"teacher_probs": probs.tolist(), "teacher_mask": mask.tolist(), "teacher_entropy": entropy.tolist()}


@DISTILL_OBJECTIVES.register("uld")
class ULDObjective(DistillObjective):
    """InfiFusion: `L_n = CE_n + lambda_kd * sum_t w_{n,t} * ULD_{n,t}` over the teachers aligned to n (one
    teacher: pairwise fusion; several: unified). Positions with no aligned teacher get CE only."""

    target_fields = {
        "teacher_probs": TargetField("float32"),  # [T, K] per position: sort_desc(softmax(z_topK / tau)), 0-padded
        "teacher_mask": TargetField("bool"),  # [T]: teacher t has a position aligned to this one
        "teacher_entropy": TargetField("float32"),  # [T]: H of the raw top-K softmax, in [0, ln K]
    }
    default_alignment = "positional"  # ULD's published rule; `offsets` is the option

    lambda_kd: float = Field(default=1.0, ge=0)
    top_k: int = Field(default=10, ge=1)
    tau: float = Field(default=1.0, gt=0)
    standardize: bool = True
    weighting: Literal["average", "uncertainty"] = "average"
    tau_u: float = Field(default=1.0, gt=0)

    def required_fields(self) -> tuple[str, ...]:
        return ("teacher_probs", "teacher_mask") + (("teacher_entropy",) if self.weighting == "uncertainty" else ())

    def targets(self, row: AlignedRow) -> dict[str, Any]:
        built = uld_targets(len(row.labels), row.examples, row.groups, self.top_k, self.tau, self.standardize)
        return {name: built[name] for name in self.required_fields()}

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
