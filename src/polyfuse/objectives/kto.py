"""KTO (arXiv 2402.01306) exactly as TRL 1.16's KTOTrainer computes it, and APO-zero (arXiv 2408.06266).

Log-probs are sums (S) for the policy, the reference and the mismatched KL rows. The reference point z0 is
the mean of `S(pi) - S(ref)` over the micro-batch's KL rows (a completion of another prompt scored on this
row's prompt), averaged over ranks, clamped at 0, detached. D rows lose `1 - sigma(beta*(r - z0))`, U rows
`1 - sigma(beta*(z0 - r))`, each times its class weight; the micro-batch loss is one mean over all rows.
What polyfuse decided where TRL leaves room: docs/design.md ("Unpaired objectives").
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
    RankMean,
    UnpairedBatch,
    UnpairedObjective,
    class_metrics,
    reference_point,
    value_losses,
)

torch = lazy_import("torch")

KTOLoss = Literal["kto", "apo_zero_unpaired"]


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    policy_kl_logps: torch.Tensor | None = None,
    reference_kl_logps: torch.Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    rank_mean: RankMean | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row weighted KTO losses (their mean is TRL's loss) and TRL's metrics. Without KL rows z0 is 0,
    which is TRL's `apo_zero_unpaired`."""
    if policy_kl_logps is None:
        z0 = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
    else:
        z0 = reference_point(policy_kl_logps, reference_kl_logps, rank_mean, clamp_min=0.0)
    losses, rewards, _ = value_losses(policy_logps, reference_logps, desirable, z0, beta)
    weights = torch.where(desirable, *(torch.full_like(losses, w) for w in (desirable_weight, undesirable_weight)))
    return weights * losses, {"kl": z0, **class_metrics(desirable, beta * rewards, policy_logps)}


@UNPAIRED_OBJECTIVES.register("kto")
class KTO(UnpairedObjective):
    """KTO as TRL's KTOTrainer: sigmoid value loss on summed log-probs against the initial pivot M0, with
    the detached reference point z0 from mismatched rows; `apo_zero_unpaired` drops z0."""

    beta: float = Field(default=0.1, gt=0, description="Strength of the pull towards the reference (TRL's default).")
    desirable_weight: float = Field(default=1.0, ge=0, description="Weight of each desirable row's loss.")
    undesirable_weight: float = Field(default=1.0, ge=0, description="Weight of each undesirable row's loss.")
    loss_type: KTOLoss = Field(default="kto", description="kto, or apo_zero_unpaired (z0 fixed at 0, no KL rows).")

    def scored_roles(self) -> tuple[str, ...]:
        return (COMPLETION,) if self.loss_type == "apo_zero_unpaired" else self.roles

    def required_columns(self) -> tuple[str, ...]:
        return tuple(logps_column("ref", role, length_normalize=False) for role in self.scored_roles())

    def __call__(self, batch: UnpairedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kl = self.loss_type == "kto"
        return kto_loss(
            batch.logps[COMPLETION],
            batch.column("ref_completion_logps"),
            batch.labels,
            self.beta,
            batch.logps[KL_COMPLETION] if kl else None,
            batch.column("ref_kl_completion_logps") if kl else None,
            self.desirable_weight,
            self.undesirable_weight,
            batch.rank_mean,
        )
