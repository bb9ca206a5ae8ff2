"""The unpaired-objective interface: independently labelled completions in, per-row losses and metrics out.

Each row is one (prompt, completion) labelled desirable (D) or undesirable (U); no chosen/rejected pairs
are built. The trainer hands the objective an `UnpairedBatch`: the policy's log-prob sums and token counts
for every role it scores (`completion`, and `kl_completion`, a completion of another prompt scored on this
row's prompt, for the reference point z0), the labels, the precomputed columns it declares, the optimiser
step, and a mean over data-parallel ranks. KTO, CGPO and FuseSFT are one file each in this package,
registered in `UNPAIRED_OBJECTIVES`.

A separate registry from `OBJECTIVES`: those generate `polyfuse train NAME` commands that read pairs.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from polyfuse.config import StrictModel
from polyfuse.lazy import lazy_import
from polyfuse.objectives.base import PreferenceBatch
from polyfuse.registry import Registry

torch = lazy_import("torch")

COMPLETION = "completion"
KL_COMPLETION = "kl_completion"

RankMean = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass(kw_only=True)
class UnpairedBatch(PreferenceBatch):
    """A micro-batch of unpaired rows: `PreferenceBatch` (policy S and n per role, columns, step) plus the
    labels (bool, True = desirable) and `rank_mean`, which averages a scalar over the data-parallel ranks
    (None in one process)."""

    labels: torch.Tensor
    rank_mean: RankMean | None = None


class UnpairedObjective(StrictModel):
    """Hyper-parameters of one unpaired loss. Calling it on a batch gives `(per-row losses, metrics)`.

    The per-row losses sum to the micro-batch's loss times `items(...)`, so a trainer that divides an
    optimiser step's summed losses by its summed items (as `PolyfuseTrainer` does) gets the mean of the
    micro-batch losses, weighted by their items. `roles` are the responses the policy scores; the loss
    never differentiates through `detached_roles`, so the trainer may score those without a graph."""

    roles: ClassVar[tuple[str, ...]] = (COMPLETION, KL_COMPLETION)
    detached_roles: ClassVar[tuple[str, ...]] = (KL_COMPLETION,)
    columns: ClassVar[tuple[str, ...]] = ()

    def scored_roles(self) -> tuple[str, ...]:
        """The roles this instance scores; objectives whose roles depend on their settings override it."""
        return self.roles

    def required_columns(self) -> tuple[str, ...]:
        """The precomputed columns this instance reads (`UnpairedRow` fields)."""
        return self.columns

    def items(self, columns: Mapping[str, torch.Tensor], rows: int) -> torch.Tensor:
        """How much a micro-batch counts in its optimiser step's mean: its rows, unless overridden."""
        return torch.tensor(float(rows))

    @abstractmethod
    def __call__(self, batch: UnpairedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


UNPAIRED_OBJECTIVES: Registry[type[UnpairedObjective]] = Registry("unpaired objective", package="polyfuse.objectives")


def reference_point(
    policy_kl_logps: torch.Tensor,
    reference_kl_logps: torch.Tensor,
    rank_mean: RankMean | None = None,
    clamp_min: float | None = None,
) -> torch.Tensor:
    """z0: the mean of `policy - reference` over the micro-batch's mismatched rows, then the mean over ranks,
    then the clamp; detached. TRL's KTO clamps at 0, CGPO does not clamp."""
    z0 = (policy_kl_logps.detach() - reference_kl_logps.detach()).mean()
    if rank_mean is not None:
        z0 = rank_mean(z0)
    if clamp_min is not None:
        z0 = z0.clamp(min=clamp_min)
    return z0.detach()


def value_losses(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor | float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row `1 - sigma(beta*m)` with `m = s*(r - z0)`, `r = policy - reference`, s = +1 on D rows and -1 on
    U rows; also returns r and m. The reference and z0 are constants."""
    rewards = policy_logps - reference_logps.detach()
    signs = torch.where(desirable, 1.0, -1.0).to(rewards.dtype)
    margins = signs * (rewards - torch.as_tensor(z0, dtype=rewards.dtype, device=rewards.device).detach())
    return 1 - torch.sigmoid(beta * margins), rewards, margins


def class_metrics(desirable: torch.Tensor, rewards: torch.Tensor, logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's KTO metrics of one micro-batch, as scalars: class means of the rewards and of the policy's
    log-probs, and the margin between the reward means when both classes are present."""
    metrics: dict[str, torch.Tensor] = {}
    for name, mask in (("chosen", desirable), ("rejected", ~desirable)):
        if mask.any():
            metrics[f"rewards/{name}"] = rewards.detach()[mask].mean()
            metrics[f"logps/{name}"] = logps.detach()[mask].mean()
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
