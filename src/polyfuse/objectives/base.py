"""The preference-objective interface: a batch of per-sequence tensors in, per-pair losses and metrics out.

Every objective is a pure function of tensors. The trainer hands it a `PreferenceBatch` holding the
policy's log-prob sums and token counts for each response role it asked for, every precomputed
`ref_*` / `fuse_*` column of the data, and the optimiser-step counters (for scheduled objectives such
as WRPO); the objective reads what it needs. Adding one (IPO, WRPO, InfiFPO) is one file in this
package that subclasses `PreferenceObjective` and registers it in `OBJECTIVES`.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.errors import DataError
from polyfuse.lazy import lazy_import
from polyfuse.registry import Registry

torch = lazy_import("torch")


@dataclass
class PreferenceBatch:
    """Per-sequence tensors of one micro-batch; every tensor has the batch as its first dimension."""

    logps: dict[str, torch.Tensor]  # role -> policy S (sum over scored tokens); carries gradients
    ntokens: dict[str, torch.Tensor]  # role -> policy n (scored tokens in the pivot's tokenization)
    columns: dict[str, torch.Tensor] = field(default_factory=dict)  # precomputed ref_* / fuse_* columns
    step: int = 0  # completed optimiser steps
    total_steps: int = 1  # optimiser steps of the whole run

    def mean_logps(self, role: str) -> torch.Tensor:
        """A = S / n for the policy."""
        return self.logps[role] / self.ntokens[role]

    def policy_logps(self, role: str, length_normalize: bool) -> torch.Tensor:
        """lp(pi, y): the per-token mean A with length normalisation, else the sum S."""
        return self.mean_logps(role) if length_normalize else self.logps[role]

    def column(self, name: str) -> torch.Tensor:
        """A precomputed column, detached: reference and source values are constants of the loss."""
        if name not in self.columns:
            raise DataError(f"the objective needs column {name!r}, which the preference data does not have")
        return self.columns[name].detach()


class PreferenceObjective(StrictModel):
    """Hyper-parameters of one preference loss. Calling it on a batch gives `(per-pair losses, metrics)`;
    metrics are per-pair or scalar tensors named like TRL's (`rewards/chosen`, `logps/chosen`, ...).

    `roles` are the responses the policy scores (row fields, concatenated into one forward); `columns`
    are the precomputed columns the loss reads, checked before training starts through
    `required_columns()`, which objectives with setting-dependent columns override."""

    roles: ClassVar[tuple[str, ...]] = ("chosen", "rejected")
    columns: ClassVar[tuple[str, ...]] = ()

    beta: float = Field(gt=0)

    def required_columns(self) -> tuple[str, ...]:
        """The columns this instance reads; objectives whose columns depend on their settings override it."""
        return self.columns

    @abstractmethod
    def __call__(self, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


OBJECTIVES: Registry[type[PreferenceObjective]] = Registry("preference objective", package="polyfuse.objectives")


def logps_column(prefix: str, role: str, length_normalize: bool) -> str:
    """Name of a precomputed column: `ref` (M0) or `fuse` (sources), per-token means or sums, for `role`."""
    return f"{prefix}_mean_{role}_logps" if length_normalize else f"{prefix}_{role}_logps"


def reward_metrics(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """TRL's per-pair metrics: implicit rewards beta*(lp(pi,y) - ref(y)), their margin and accuracy, and the
    policy's log-probs (the lp the loss uses: sums, or means with length normalisation)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }
