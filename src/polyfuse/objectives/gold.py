"""`gold`: GOLD's hybrid cross-tokenizer loss (TRL `trl/experimental/gold`, `ULDLoss` with
`uld_use_hybrid_loss`), and X-Token's H-KL (the same hybrid with the relaxed match). Spec:
`methods/onpolicy-distillation.md`, sections 3, 4.3 and 6 (e).

Per aligned group, the teacher's and the student's merged vectors are split by a one-to-one vocabulary match
(`Projection.matched_*`, built for `match_rule()`): matched tokens are compared directly by the generalised
JSD (beta), the others by ULD's sorted L1, weighted `w_m * matched + w_u * unmatched` with fixed weights or
GOLD's adaptive `w_m = |matched| / |V_teacher|`, `w_u = 1 - w_m`.

Two modes:
- `hybrid` (polyfuse's): chain-rule merge; the matched part is a true divergence (>= 0): the teacher's matched
  top-K entries plus one tail bucket on each side; the stop token's group is {stop} plus the tail.
- `gold_compat`: TRL's semantics on the sparse teacher: the observed merge by default, the matched JSD over
  every matched pair on probabilities clamped at 1e-8 and not renormalised (so it can be negative), a teacher
  entry that the wire does not carry (not in its top-K, not its realised token) read as 0, as TRL would see a
  teacher that is zero there; no stop group (TRL skips EOS). TRL averages groups per sample, then samples;
  here the trainer divides by the global group count.
Both modes keep, besides the teacher's top-K at the group's base position, its realised token there.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from polyfuse.errors import ConfigError
from polyfuse.lazy import lazy_import
from polyfuse.objectives.distill import (
    DISTILL_OBJECTIVES,
    AlignedRow,
    DistillBatch,
    DistillObjective,
    Projection,
)
from polyfuse.objectives.kd import anchored, batch_projection
from polyfuse.objectives.topk import (
    GROUP_FIELDS,
    LOG_EPS,
    STOP_GROUP,
    Merge,
    group_targets,
    group_weight,
    jsd_terms,
    sorted_l1,
    sparse_divergence,
    student_prefix,
    teacher_metric,
)

torch = lazy_import("torch")

Match = Literal["strings", "exact", "relaxed", "none"]


def matched_entries(ids: torch.Tensor, valid: torch.Tensor, projection: Projection) -> tuple[torch.Tensor, torch.Tensor]:
    """(the matched student id of each teacher entry [G, S] (0 where none), which entries are matched)."""
    inside = (ids >= 0) & (ids < projection.shape[1])
    student = projection.teacher_to_student[torch.where(inside, ids, 0)]
    matched = valid & inside & (student >= 0)
    return student.clamp(min=0), matched


def gold_matched_compat(student: torch.Tensor, teacher: torch.Tensor, matched_ids: torch.Tensor,
                        matched: torch.Tensor, projection: Projection, beta: float) -> torch.Tensor:
    """TRL's matched part [G]: the generalised JSD over every matched pair on log-probs clamped at log(1e-8),
    neither side renormalised, from the student's dense group log-vector [G, V_S] and the teacher's sparse
    entries [G, S]. Pairs outside the teacher's K are read as 0 (clamped to 1e-8): their terms are a function
    of the student alone, summed densely; the teacher's matched entries then replace theirs."""
    clamped = student.clamp(min=LOG_EPS)
    floor = torch.full_like(clamped[:, :1], LOG_EPS)
    everywhere = jsd_terms(clamped[:, projection.matched_student], floor.expand(-1, len(projection.matched_student)),
                           beta).sum(-1)
    at = clamped.gather(1, matched_ids)
    own = jsd_terms(at, teacher.clamp(min=LOG_EPS), beta, matched) - jsd_terms(at, floor.expand_as(at), beta, matched)
    return everywhere + own.sum(-1)


def gold_unmatched(student: torch.Tensor, teacher: torch.Tensor, unmatched: torch.Tensor,
                   projection: Projection) -> torch.Tensor:
    """ULD's sorted L1 [G] between the student's unmatched probabilities (dense) and the teacher's unmatched
    entries (sparse)."""
    student_matched = torch.nn.functional.pad(projection.student_matched, (0, student.shape[-1] - projection.shape[0]))
    return sorted_l1(torch.where(student_matched, 0.0, student.exp()), torch.where(unmatched, teacher.exp(), 0.0))


@DISTILL_OBJECTIVES.register("gold")
class GoldObjective(DistillObjective):
    """`L = sum over aligned groups of w_m * matched + w_u * unmatched` (module docstring). `match`: `strings`
    (GOLD: identical raw vocabulary strings), `exact` (identical text after space-marker canonicalisation),
    `relaxed` (H-KL: a student token's top W entry when its weight is >= 0.6), `none` (GOLD's plain ULD)."""

    target_fields = GROUP_FIELDS
    default_alignment = "offsets"

    mode: Literal["hybrid", "gold_compat"] = Field(default="hybrid", description="hybrid (polyfuse) or TRL's semantics.")
    match: Match | None = Field(default=None, description="None: strings under gold_compat, else exact.")
    merge: Merge | None = Field(default=None, description="None: observed under gold_compat, else bayesian.")
    beta: float = Field(default=0.5, ge=0, le=1, description="Of the matched JSD (GOLD inherits GKD's 0.5).")
    top_k: int = Field(default=16, ge=1, description="Teacher entries per group.")
    tau: float = Field(default=1.0, gt=0, description="Student temperature; the teacher's is applied where it runs.")
    matched_weight: float | None = Field(default=None, ge=0, description="None: adaptive |matched| / |V_teacher|.")
    unmatched_weight: float | None = Field(default=None, ge=0, description="Given with matched_weight.")

    @model_validator(mode="after")
    def _check(self) -> GoldObjective:
        if (self.matched_weight is None) != (self.unmatched_weight is None):
            raise ConfigError("gold: give both matched_weight and unmatched_weight, or neither (adaptive weights)")
        if self.merge == "observed" and self.mode != "gold_compat":
            raise ConfigError("gold: merge 'observed' is TRL's and only available with mode gold_compat")
        return self

    @property
    def compat(self) -> bool:
        return self.mode == "gold_compat"

    def match_rule(self) -> Match:
        """The vocabulary match its `Projection` must be built with."""
        return self.match or ("strings" if self.compat else "exact")

    def merge_rule(self) -> Merge:
        return self.merge or ("observed" if self.compat else "bayesian")

    def vocabulary_map(self) -> Literal["exact"]:
        return "exact"  # for the pivot's token bytes, which tell the stop group from text

    def projection_match(self) -> str:
        return self.match_rule()

    def required_fields(self) -> tuple[str, ...]:
        return tuple(GROUP_FIELDS)

    def targets(self, row: AlignedRow) -> dict[str, Any]:
        return group_targets(row, "topk_realised", self.top_k, self.merge_rule(), stop_groups=not self.compat)

    def weights(self, projection: Projection) -> tuple[float, float]:
        if self.matched_weight is not None:
            return self.matched_weight, self.unmatched_weight
        share = len(projection.matched_teacher) / max(1, projection.teacher_vocab_size)
        return share, 1.0 - share

    def group_losses(self, logps: torch.Tensor, batch: DistillBatch, teacher: int,
                     anchors: torch.Tensor) -> dict[str, torch.Tensor]:
        """`matched`, `unmatched` and the weighted `loss` [G] of one teacher's groups."""
        projection = batch_projection(batch, teacher)
        lead = batch.require("group_lead")[anchors, teacher]
        prefix = student_prefix(logps, batch.labels, anchors, lead, self.merge_rule(), clamp=self.compat)
        student = logps[anchors] + prefix[:, None]
        ids = batch.require("teacher_ids")[anchors, teacher]
        teacher_logps = batch.require("teacher_logps")[anchors, teacher].float()
        valid = torch.isfinite(teacher_logps)
        matched_ids, matched = matched_entries(ids, valid, projection)
        if self.compat:
            matched_part = gold_matched_compat(student, teacher_logps, matched_ids, matched, projection, self.beta)
        else:
            matched_part = sparse_divergence(student.gather(1, matched_ids), teacher_logps, matched, self.beta)
        unmatched_part = gold_unmatched(student, teacher_logps, valid & ~matched, projection)
        w_matched, w_unmatched = self.weights(projection)
        loss = w_matched * matched_part + w_unmatched * unmatched_part
        stop = batch.require("group")[anchors, teacher] == STOP_GROUP
        if stop.any():
            realised = (logps[anchors, batch.labels[anchors]] + prefix)[:, None]
            teacher_realised = batch.require("teacher_realised")[anchors, teacher].float()[:, None]
            stop_loss = sparse_divergence(realised, teacher_realised, torch.ones_like(realised, dtype=torch.bool), self.beta)
            loss = torch.where(stop, stop_loss, loss)
        return {"loss": loss, "matched": matched_part, "unmatched": unmatched_part}

    def __call__(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = torch.log_softmax(batch.logits.float() / self.tau, dim=-1)
        losses = logps.new_zeros(len(logps))
        parts: dict[str, list[torch.Tensor]] = {"loss": [], "matched": [], "unmatched": []}
        per_teacher: dict[str, torch.Tensor] = {}
        for teacher in range(batch.require("group").shape[1]):
            anchors = anchored(batch, teacher)
            if len(anchors):
                out = self.group_losses(logps, batch, teacher, anchors)
                losses = losses.index_add(0, anchors, out["loss"] * group_weight(batch, teacher, anchors))
                for name, value in out.items():
                    parts[name].append(value.detach())
                per_teacher[teacher_metric(teacher)] = out["loss"].detach()
        metrics = {f"kd/{name}" if name != "loss" else "loss/kd": torch.cat(v) if v else losses.detach()[:0]
                   for name, v in parts.items()}
        metrics.update(per_teacher)
        return losses, {**metrics, "kd/groups": (batch.require("group") > 0).sum(-1).float()}
