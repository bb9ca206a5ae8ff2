"""FuseSFT (FuseRL, arXiv 2504.06562): SFT on every source response of a prompt, weighted by its reward,
instead of on the best one only.

The paper's weight formula is not public; polyfuse's choice (project decision FuseSFT, docs/design.md): per
prompt, over the candidates that pass the verifiers, standardise the rewards (`zhat = (R - mean) /
(popstd + 1e-6)`, so the temperature does not depend on the reward model's scale) and take
`w = softmax(zhat / tau)`, tau 1. The loss is `mean_x sum_j w_j * NLL_j`, NLL_j the mean token negative
log-likelihood of response j in the pivot's tokens; each prompt counts once. Equal rewards give equal
weights; tau -> 0 is best-response SFT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field

from polyfuse.errors import DataError
from polyfuse.lazy import lazy_import
from polyfuse.objectives.unpaired import COMPLETION, UNPAIRED_OBJECTIVES, UnpairedBatch, UnpairedObjective

torch = lazy_import("torch")

WEIGHT_COLUMN = "fusesft_weight"
EPS = 1e-6


def fusesft_weights(rewards: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(zhat / tau) over one prompt's candidates, zhat the rewards standardised by their population std."""
    standardised = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + EPS)
    return torch.softmax(standardised / temperature, dim=-1)


def fusesft_row_weights(
    prompt_ids: Sequence[str],
    rewards: Sequence[float | None],
    temperature: float = 1.0,
    passed: Sequence[bool | None] | None = None,
) -> torch.Tensor:
    """Every row's weight within its prompt, computed once over the whole data set; a row whose verifiers
    failed (`passed` False) is dropped first and weighs 0, and a prompt with no candidate left weighs 0."""
    if not len(prompt_ids) == len(rewards):
        raise DataError(f"{len(prompt_ids)} prompt ids for {len(rewards)} rewards")
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompt_ids):
        if passed is None or passed[row] is not False:
            if rewards[row] is None:
                raise DataError(f"row {row} (prompt {prompt!r}) has no reward; FuseSFT weighs responses by reward")
            groups.setdefault(prompt, []).append(row)
    weights = torch.zeros(len(prompt_ids), dtype=torch.float64)
    for rows in groups.values():
        index = torch.tensor(rows)
        weights[index] = fusesft_weights(torch.tensor([rewards[r] for r in rows], dtype=torch.float64), temperature)
    return weights


def fusesft_loss(nll: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row `w_j * NLL_j` (a prompt's loss is the sum over its rows; the weights are constants), and the
    weighted and plain mean NLL."""
    weights = weights.detach().to(nll.dtype)
    losses = weights * nll
    metrics = {"fusesft/nll": nll.detach().mean(), "fusesft/weighted_nll": losses.detach().sum() / weights.sum()}
    return losses, metrics


@UNPAIRED_OBJECTIVES.register("fusesft")
class FuseSFT(UnpairedObjective):
    """FuseSFT (FuseRL): SFT on all the sources' responses of a prompt, each weighted by a softmax of its
    standardised reward within the prompt."""

    roles = (COMPLETION,)
    detached_roles = ()
    columns = (WEIGHT_COLUMN,)

    temperature: float = Field(default=1.0, gt=0, description="tau of the softmax over standardised rewards.")

    def row_weights(
        self, prompt_ids: Sequence[str], rewards: Sequence[float | None], passed: Sequence[bool | None] | None = None
    ) -> torch.Tensor:
        """The `fusesft_weight` column of a data set, computed once before training."""
        return fusesft_row_weights(prompt_ids, rewards, self.temperature, passed)

    def items(self, columns: Mapping[str, torch.Tensor], rows: int) -> torch.Tensor:
        """The micro-batch's weight: its number of prompts when it holds all of their candidates."""
        return columns[WEIGHT_COLUMN].detach().sum()

    def __call__(self, batch: UnpairedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fusesft_loss(-batch.mean_logps(COMPLETION), batch.column(WEIGHT_COLUMN))
