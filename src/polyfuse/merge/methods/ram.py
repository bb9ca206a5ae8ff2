"""RAM, Reinforced Agent Merging (mergekit `ram`, arXiv 2601.13572): task-vector entries that only one model
changes are kept whole; entries several models change are averaged over those models.

An entry counts as changed by model i when |tau_i| > epsilon (default 1e-5); unchanged entries contribute
nothing. th = th0 + sum_i [changed_i] tau_i / max(count, 1), count = how many models changed the entry (so a
unique change is taken as it is). `ramplus_tl` (its own file) scales the unique changes up.
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, MergeMethod, Param, TensorTask

CHANGE_EPSILON = Param("epsilon", 1e-5, description="a task-vector entry counts as changed when |tau| is above this",
                       explain="epsilon {v} = a task-vector entry counts as changed when |tau| > {v}")


def changed_masks(taus: list[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per model, where |tau_i| > epsilon; and how many models changed each entry."""
    masks = [tau.abs() > epsilon for tau in taus]
    counts = torch.zeros(taus[0].shape, dtype=torch.int64)
    for mask in masks:
        counts += mask
    return masks, counts


def ram_delta(taus: list[torch.Tensor], masks: list[torch.Tensor], counts: torch.Tensor,
              unique_scale: list[float] | None = None) -> torch.Tensor:
    """sum_i [changed_i] tau_i * (unique_scale_i where only i changed it, else 1 / count); in place in taus."""
    divisor = counts.clamp(min=1).to(taus[0].dtype)
    unique = counts == 1
    total = torch.zeros_like(taus[0])
    for i, (tau, mask) in enumerate(zip(taus, masks, strict=True)):
        tau.mul_(mask)
        shared = tau.div(divisor)
        if unique_scale is not None:
            shared = torch.where(unique, tau * unique_scale[i], shared)
        total.add_(shared)
    return total


@MERGE_METHODS.register("ram")
class Ram(MergeMethod):
    name = "ram"
    description = "RAM: unique task-vector changes kept, shared ones averaged over the models that made them"
    min_models = 1
    parameters = (CHANGE_EPSILON,)

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        taus = task.deltas()
        masks, counts = changed_masks(taus, float(self.param(task, "epsilon")))
        return ram_delta(taus, masks, counts).add_(task.base)
