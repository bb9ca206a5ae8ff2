"""`kd`: forward KL, reverse KL or the generalised JSD (beta) between the teacher's sparse group targets and
the student, over the teacher's top-K plus a tail bucket (TRL's server / async distillation semantics); across
tokenizers the student is read in the teacher's vocabulary through X-Token's projection W (P-KL, arXiv
2605.21699). Spec: `methods/onpolicy-distillation.md`, sections 2.2, 2.3 and 6 (c)-(d).

Per aligned group (`polyfuse.objectives.topk`), the buckets are:
- beta = 0: the teacher's top-K ids, the student's mass on each `log (W^T v_S)[id]`, plus the tail, in a group of
  one token on each side; a group of several tokens on either side is compared on {its realised text} plus the
  tail (the top-K there ranks the teacher's last piece, which W does not pair with the student's; docs/design.md);
- 0 < beta < 1: {the teacher's top-1, the realised group text} plus the tail (TRL's server path); the realised
  entry is the joint probability of the group's text on both sides, so it needs no W;
- beta = 1: {the realised group text} plus the tail;
- the stop token's group, always: {stop} plus the tail, i.e. P(stop) against the teacher's P(end of turn).
A teacher id that no student token projects onto has no student entry: it joins the tail on both sides.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from polyfuse.errors import DataError
from polyfuse.lazy import lazy_import
from polyfuse.objectives.distill import (
    DISTILL_OBJECTIVES,
    AlignedRow,
    DistillBatch,
    DistillObjective,
    Projection,
)
from polyfuse.objectives.topk import (
    GROUP_FIELDS,
    STOP_GROUP,
    Support,
    group_targets,
    group_weight,
    projected_logps,
    sparse_divergence,
    student_prefix,
    teacher_metric,
)

torch = lazy_import("torch")


def batch_projection(batch: DistillBatch, teacher: int) -> Projection:
    """Teacher `teacher`'s projection from the batch, or a clear error when the trainer gave none."""
    if teacher >= len(batch.projections) or batch.projections[teacher] is None:
        raise DataError(f"teacher {teacher} has no vocabulary projection in the batch (`DistillBatch.projections`)")
    return batch.projections[teacher]


def anchored(batch: DistillBatch, teacher: int) -> torch.Tensor:
    """The positions [G] where a group of teacher `teacher` is anchored."""
    return (batch.require("group")[:, teacher] > 0).nonzero().squeeze(-1)


def kd_group_losses(logps: torch.Tensor, batch: DistillBatch, teacher: int, anchors: torch.Tensor, beta: float,
                    support: Support, tail: bool = True) -> torch.Tensor:
    """The divergence [G] of each group of one teacher anchored at `anchors`, from the student's log-probs [N, V_S]
    (module docstring for the buckets)."""
    lead = batch.require("group_lead")[anchors, teacher]
    prefix = student_prefix(logps, batch.labels, anchors, lead)
    stop = batch.require("group")[anchors, teacher] == STOP_GROUP
    student_realised = (logps[anchors, batch.labels[anchors]] + prefix)[:, None]
    teacher_realised = batch.require("teacher_realised")[anchors, teacher].float()[:, None]
    if support == "realised":
        return sparse_divergence(student_realised, teacher_realised, torch.ones_like(stop)[:, None], beta, tail)
    ids = batch.require("teacher_ids")[anchors, teacher]
    teacher_logps = batch.require("teacher_logps")[anchors, teacher].float()
    student = projected_logps(logps[anchors], ids, batch_projection(batch, teacher)) + prefix[:, None]
    valid = torch.isfinite(teacher_logps) & torch.isfinite(student) & ~stop[:, None]
    # top1 always keeps the realised entry; topk where no top-K entry is left (the stop, several tokens, none W reaches)
    realised_valid = (stop | (support != "topk") | ~valid.any(-1))[:, None]
    return sparse_divergence(torch.cat([student, student_realised], -1), torch.cat([teacher_logps, teacher_realised], -1),
                             torch.cat([valid, realised_valid], -1), beta, tail)


@DISTILL_OBJECTIVES.register("kd")
class KDObjective(DistillObjective):
    """`L = sum over aligned groups of JSD_beta(teacher || student)` on the teacher's sparse targets: beta 0 is
    forward KL (X-Token's P-KL across tokenizers), beta 1 reverse KL. Needs each teacher's `Projection` in the
    batch (W = I for a teacher that shares the student's vocabulary) unless beta = 1."""

    target_fields = GROUP_FIELDS
    default_alignment = "offsets"

    beta: float = Field(default=0.0, ge=0, le=1, description="0: forward KL (default), 1: reverse KL, between: JSD.")
    top_k: int = Field(default=16, ge=1, description="Teacher entries per group at beta 0 (the spec's default K).")
    tau: float = Field(default=1.0, gt=0, description="Student temperature; the teacher's is applied where it runs.")
    tail: bool = Field(default=True, description="The tail bucket 1 - sum; off: renormalise inside the support.")

    def support(self) -> Support:
        return "topk" if self.beta == 0 else "realised" if self.beta == 1 else "top1"

    def vocabulary_map(self) -> Literal["exact"]:
        return "exact"  # for the pivot's token bytes, which tell the stop group from text

    def projection_match(self) -> str:
        return "exact"

    def required_fields(self) -> tuple[str, ...]:
        sparse = () if self.support() == "realised" else ("teacher_ids", "teacher_logps")
        return ("group", "group_lead", "teacher_realised", *sparse)

    def targets(self, row: AlignedRow) -> dict[str, Any]:
        built = group_targets(row, self.support(), self.top_k)
        return {name: built[name] for name in self.required_fields()}

    def __call__(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = torch.log_softmax(batch.logits.float() / self.tau, dim=-1)
        losses = logps.new_zeros(len(logps))
        per_group, per_teacher = [], {}
        for teacher in range(batch.require("group").shape[1]):
            anchors = anchored(batch, teacher)
            if len(anchors):
                divergence = kd_group_losses(logps, batch, teacher, anchors, self.beta, self.support(), self.tail)
                losses = losses.index_add(0, anchors, divergence * group_weight(batch, teacher, anchors))
                per_group.append(divergence.detach())
                per_teacher[teacher_metric(teacher)] = divergence.detach()
        groups = (batch.require("group") > 0).sum(-1).float()
        return losses, {"loss/kd": torch.cat(per_group) if per_group else losses.detach()[:0], "kd/groups": groups,
                        **per_teacher}
