"""CGPO, Consensus-Guided Preference Optimization (reference release PayneDeng2/CGPO; not Meta's "Constrained
Generative Policy Optimization", arXiv 2409.20370): KTO's pointwise value loss on length-normalised scores,
with a label-dependent reference and class-conditional aggregation.

- Scores are per-token means (A): the policy's, M0's (`l_0`) and the sources' aligned consensus (`Ctilde`,
  `polyfuse.objectives.consensus`). beta 0.08 is meant for this scale.
- Reference b: `l_0` on D rows and `Ctilde` on U rows (`label_conditional`, the default), `l_0` on both
  (`policy_anchored`) or `Ctilde` on both (`consensus_anchored`).
- z0: the mean of `A(pi) - l_0` over the micro-batch's anchor rows (`kl_completion`: a completion of another
  prompt, fixed offline), over both classes; detached, not clamped (project decision CGPO-e).
- `L = w_D * mean_D(l) + c(t) * w_U * mean_U(l)`, with the U warm-up `c(t)` over completed optimiser steps.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from polyfuse.lazy import lazy_import
from polyfuse.objectives.base import logps_column
from polyfuse.objectives.unpaired import (
    COMPLETION,
    KL_COMPLETION,
    UNPAIRED_OBJECTIVES,
    UnpairedBatch,
    UnpairedObjective,
    class_metrics,
    reference_point,
    value_losses,
)

torch = lazy_import("torch")

Assignment = Literal["label_conditional", "policy_anchored", "consensus_anchored"]
PIVOT_COLUMN = logps_column("ref", COMPLETION, length_normalize=True)  # l_0
ANCHOR_COLUMN = logps_column("ref", KL_COMPLETION, length_normalize=True)  # l_0 of the anchor completion
CONSENSUS_COLUMN = "aligned_consensus"  # Ctilde, the CGPO reference release's name


def undesirable_coefficient(step: int, start: int, steps: int) -> float:
    """c(t) = clip((t - start) / steps, 0, 1) over completed optimiser steps; 1 throughout when `steps` is 0."""
    return 1.0 if steps == 0 else min(1.0, max(0.0, (step - start) / steps))


def reference_scores(
    desirable: torch.Tensor,
    pivot: torch.Tensor | None,
    consensus: torch.Tensor | None,
    assignment: Assignment,
) -> torch.Tensor:
    """b per row: M0's score `pivot` or the aligned consensus, by label and assignment; detached."""
    if assignment == "policy_anchored":
        return pivot.detach()
    if assignment == "consensus_anchored":
        return consensus.detach()
    return torch.where(desirable, pivot.detach(), consensus.detach())


def cgpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor | float,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    u_coefficient: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row losses whose mean is `w_D * mean_D(l) + c * w_U * mean_U(l)` (an empty class adds 0), and the
    metrics: KTO's per class, the two terms, c, z0 (as `kl`) and the largest |beta*m| (CGPO-g)."""
    pointwise, rewards, margins = value_losses(policy, reference, desirable, z0, beta)
    rows = len(pointwise)
    terms, scale = {}, torch.zeros_like(pointwise)
    for name, mask, weight in (
        ("desirable", desirable, desirable_weight),
        ("undesirable", ~desirable, u_coefficient * undesirable_weight),
    ):
        count = int(mask.sum())
        terms[name] = weight * pointwise[mask].mean() if count else pointwise.sum() * 0.0
        scale = torch.where(mask, rows * weight / max(count, 1), scale)
    metrics = {
        "kl": torch.as_tensor(z0, device=pointwise.device).detach(),
        "cgpo/u_coefficient": torch.tensor(u_coefficient, device=pointwise.device),
        "cgpo/desirable_term": terms["desirable"].detach(),
        "cgpo/undesirable_term": terms["undesirable"].detach(),
        "cgpo/beta_margin_abs_max": (beta * margins).detach().abs().max(),
    }
    return scale * pointwise, metrics | class_metrics(desirable, beta * rewards, policy)


@UNPAIRED_OBJECTIVES.register("cgpo")
class CGPO(UnpairedObjective):
    """CGPO (consensus-guided): KTO's pointwise loss on per-token means, referenced to M0 on desirable rows and
    to the sources' aligned consensus on undesirable ones, class means weighted 1.2 / 1.0, U warm-up."""

    beta: float = Field(default=0.08, gt=0, description="Scale of the value loss on per-token-mean scores.")
    desirable_weight: float = Field(default=1.2, ge=0, description="w_D, weight of the desirable class mean.")
    undesirable_weight: float = Field(default=1.0, ge=0, description="w_U, weight of the undesirable class mean.")
    undesirable_warmup_start: int = Field(default=0, ge=0, description="Optimiser step where the U warm-up starts.")
    undesirable_warmup_steps: int = Field(default=100, ge=0, description="Steps over which c(t) ramps 0 -> 1; 0: no warm-up.")
    reference: Assignment = Field(default="label_conditional", description="Which reference each class gets.")
    z0_clamp_min: float | None = Field(default=None, description="Clamp z0 from below (KTO clamps at 0); None: no clamp.")

    def required_columns(self) -> tuple[str, ...]:
        pivot = () if self.reference == "consensus_anchored" else (PIVOT_COLUMN,)
        consensus = () if self.reference == "policy_anchored" else (CONSENSUS_COLUMN,)
        return (*pivot, *consensus, ANCHOR_COLUMN)

    def __call__(self, batch: UnpairedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        columns = {name: batch.column(name) for name in self.required_columns()}
        z0 = reference_point(
            batch.mean_logps(KL_COMPLETION), columns[ANCHOR_COLUMN], batch.rank_mean, self.z0_clamp_min
        )
        return cgpo_loss(
            batch.mean_logps(COMPLETION),
            reference_scores(batch.labels, columns.get(PIVOT_COLUMN), columns.get(CONSENSUS_COLUMN), self.reference),
            batch.labels,
            z0,
            self.beta,
            self.desirable_weight,
            self.undesirable_weight,
            undesirable_coefficient(batch.step, self.undesirable_warmup_start, self.undesirable_warmup_steps),
        )
