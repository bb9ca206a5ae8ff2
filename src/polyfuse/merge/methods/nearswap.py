"""NearSwap (mergekit `nearswap`): take the other model's value where it is close to the base.

Per entry, weight = clamp(t / max(|th0 - th1|, 1e-6), 0, 1) and th = weight * th1 + (1 - weight) * th0: entries
that differ by at most t are swapped in fully, larger differences proportionally less.
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, InvalidParameter, MergeMethod, Param, TensorTask

DIFF_FLOOR = 1e-6


@MERGE_METHODS.register("nearswap")
class NearSwap(MergeMethod):
    name = "nearswap"
    description = "NearSwap: the other model's entries where they are within t of the base"
    min_models = 1
    max_models = 1
    parameters = (Param("t", description="the distance to the base within which entries take the other model's "
                                         "value",
                        explain="t {v} = entries within {v} of the base take the other model's value; farther ones "
                                "mix in proportion t / |difference|"),)

    @classmethod
    def check(cls, params, model_params) -> None:
        """A negative distance threshold would keep the base everywhere (mergekit has no rule): refused."""
        if params["t"] < 0:
            raise InvalidParameter("t", f"must be >= 0, a distance to the base (got {params['t']})")

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        base, other = task.base, task.models[0]
        weight = (base - other).abs_().clamp_(min=DIFF_FLOOR)
        weight = (float(self.param(task, "t")) / weight).clamp_(0, 1)
        other.mul_(weight)
        return other.add_(weight.neg_().add_(1).mul_(base))
