"""WRPO (arXiv 2412.03187): DPO whose chosen side is an alpha-weighted mix of a source's response y_ws and
the pivot's own best response y_wt, with alpha ramped up over training so the policy first learns from
its own distribution and only gradually from the sources'.

Roles: `chosen_source` = y_ws, `chosen` = y_wt, `rejected` = y_l.
"""

from __future__ import annotations

from pydantic import Field

from polyfuse.lazy import lazy_import
from polyfuse.objectives.base import OBJECTIVES, PreferenceBatch, PreferenceObjective
from polyfuse.objectives.dpo import dpo_loss

torch = lazy_import("torch")

WRPO_ROLES = ("chosen_source", "chosen", "rejected")


def wrpo_alpha(step: int, total_steps: int, alpha_max: float, dynamic: bool = True) -> float:
    """`alpha_max * t / T` with t the completed optimiser steps and T the run's total; `alpha_max` when
    not dynamic."""
    return alpha_max * step / total_steps if dynamic else alpha_max


def wrpo_loss(
    source_logps: torch.Tensor,
    target_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_source_logps: torch.Tensor,
    ref_target_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair `softplus(-beta*[alpha*D(y_ws) + (1-alpha)*D(y_wt) - D(y_l)])`, `D(y) = lp(pi,y) - ref(y)`.

    The weighted chosen term is DPO's chosen term on the weighted log-probs, so this is `dpo_loss` on
    them; at alpha = 0 it is exactly DPO on (y_wt, y_l). The TRL-named metrics are the weighted ones;
    `*_source` / `*_target` compare each chosen response alone with the rejected one."""

    def weighted(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return alpha * source + (1 - alpha) * target

    losses, metrics = dpo_loss(
        weighted(source_logps, target_logps),
        rejected_logps,
        weighted(ref_source_logps.detach(), ref_target_logps.detach()),
        ref_rejected_logps,
        beta,
    )
    rejected_rewards = metrics["rewards/rejected"]
    for name, logps, ref in (
        ("source", source_logps, ref_source_logps),
        ("target", target_logps, ref_target_logps),
    ):
        rewards = beta * (logps.detach() - ref.detach())
        metrics[f"rewards/chosen_{name}"] = rewards
        metrics[f"rewards/accuracies_{name}"] = (rewards > rejected_rewards).float()
        metrics[f"logps/chosen_{name}"] = logps.detach()
    metrics["wrpo/alpha"] = torch.full_like(rejected_rewards, alpha)
    return losses, metrics


@OBJECTIVES.register("wrpo")
class WRPO(PreferenceObjective):
    """WRPO on summed log-probs against the initial pivot M0 (the paper's "Target-SFT")."""

    roles = WRPO_ROLES
    columns = ("ref_chosen_source_logps", "ref_chosen_logps", "ref_rejected_logps")

    beta: float = Field(default=0.01, gt=0, description="Strength of the pull towards the reference (KL weight).")
    alpha_max: float = Field(default=0.1, ge=0, le=1, description="Final weight of the source response y_ws against y_wt.")
    dynamic: bool = Field(default=True, description="Raise alpha linearly from 0 to alpha_max over the run; false: alpha_max throughout.")

    def __call__(self, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return wrpo_loss(
            *(batch.logps[role] for role in self.roles),
            *(batch.column(name) for name in self.columns),
            self.beta,
            wrpo_alpha(batch.step, batch.total_steps, self.alpha_max, self.dynamic),
        )
