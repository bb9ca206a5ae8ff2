"""IPO (arXiv 2310.12036): a squared loss that pulls the reference-relative margin to 1/(2*beta) instead of
pushing it to infinity. Per-token means by default, as TRL and the InfiFPO paper ("already length
normalized") do.
"""

from __future__ import annotations

from pydantic import Field

from polyfuse.lazy import lazy_import
from polyfuse.objectives.base import (
    OBJECTIVES,
    PreferenceBatch,
    PreferenceObjective,
    logps_column,
    reward_metrics,
)

torch = lazy_import("torch")


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair `(h - 1/(2*beta))^2` with `h = [lp(pi,y_w) - ref_w] - [lp(pi,y_l) - ref_l]`; the references
    are constants. Rewards are logged as DPO's, `beta*(lp(pi,y) - ref(y))`."""
    chosen_margin = chosen_logps - ref_chosen_logps.detach()
    rejected_margin = rejected_logps - ref_rejected_logps.detach()
    losses = (chosen_margin - rejected_margin - 1 / (2 * beta)) ** 2
    return losses, reward_metrics(chosen_logps, rejected_logps, beta * chosen_margin, beta * rejected_margin)


@OBJECTIVES.register("ipo")
class IPO(PreferenceObjective):
    """IPO against the initial pivot M0; beta 0.1 (TRL) targets a margin of 5."""

    beta: float = Field(default=0.1, gt=0, description="Regularisation: the target margin is 1 / (2 beta).")
    length_normalize: bool = Field(default=True, description="Per-token mean log-probs instead of sums.")

    def required_columns(self) -> tuple[str, ...]:
        return tuple(logps_column("ref", role, self.length_normalize) for role in self.roles)

    def __call__(self, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ref_chosen, ref_rejected = (batch.column(name) for name in self.required_columns())
        return ipo_loss(
            batch.policy_logps("chosen", self.length_normalize),
            batch.policy_logps("rejected", self.length_normalize),
            ref_chosen,
            ref_rejected,
            self.beta,
        )
