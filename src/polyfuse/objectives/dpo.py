"""DPO (arXiv 2305.18290) on sums, and LN-DPO (FuseChat-3.0): the same loss on per-token means.

LN-DPO divides the policy's and the reference's log-probs by |y|, the response's token count in the
pivot's tokenization (the `ref_*_ntokens` columns; the trainer checks that its own tokenization gives
the same counts).
"""

from __future__ import annotations

from pydantic import Field

from polyfuse.lazy import lazy_import
from polyfuse.objectives.base import OBJECTIVES, PreferenceBatch, PreferenceObjective, reward_metrics

torch = lazy_import("torch")
F = lazy_import("torch.nn.functional")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair `(1-e)*softplus(-beta*h) + e*softplus(beta*h)` with
    `h = [lp(pi,y_w) - ref_w] - [lp(pi,y_l) - ref_l]`; the references are constants."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps.detach())
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps.detach())
    margin = chosen_rewards - rejected_rewards
    losses = (1 - label_smoothing) * F.softplus(-margin) + label_smoothing * F.softplus(margin)
    return losses, reward_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)


@OBJECTIVES.register("dpo")
class DPO(PreferenceObjective):
    """Sigmoid DPO on summed log-probs against the initial pivot M0."""

    columns = ("ref_chosen_logps", "ref_rejected_logps")

    beta: float = Field(default=0.1, gt=0, description="Strength of the pull towards the reference (KL weight).")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5, description="Assumed share of flipped labels (conservative DPO).")

    def __call__(self, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return dpo_loss(
            batch.logps["chosen"],
            batch.logps["rejected"],
            batch.column("ref_chosen_logps"),
            batch.column("ref_rejected_logps"),
            self.beta,
            self.label_smoothing,
        )


@OBJECTIVES.register("ln_dpo")
class LengthNormalizedDPO(DPO):
    """DPO on per-token means for policy and reference alike. FuseChat-3.0 uses beta 10; a sum-scale beta
    such as 0.1 gives almost no signal on means."""

    columns = ("ref_mean_chosen_logps", "ref_mean_rejected_logps")

    beta: float = Field(default=10.0, gt=0)

    def __call__(self, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return dpo_loss(
            batch.mean_logps("chosen"),
            batch.mean_logps("rejected"),
            batch.column("ref_mean_chosen_logps"),
            batch.column("ref_mean_rejected_logps"),
            self.beta,
            self.label_smoothing,
        )
