"""Task arithmetic (arXiv 2212.04089), and the pipeline every task-vector method shares.

`TaskVectorMerge` is mergekit's "generalized task arithmetic": per model, tau_i = th_i - th0 is sparsified
(`sparsify`, the identity here), then th = th0 + lambda * combine_i(w_i tau_i), where the combination is a plain
weighted sum or, for the TIES family (`consensus`), sign election and disjoint mean; `normalize` divides by the
(surviving) weights. TIES, DARE, breadcrumbs, DELLA and RSAF subclass it and only choose the sparsifier.

`int8_mask` is accepted for mergekit configs and has no effect: polyfuse's masks are always boolean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, WEIGHT, MergeMethod, Param, TensorTask
from polyfuse.merge.methods.sparsify import check_rescale_mode, weighted_merge

LAMBDA = Param("lambda", 1.0, description="the scale of the merged task vector before it is added to the base",
               explain="lambda {v} = the merged task vector is scaled by {v} before it is added to the base")
NORMALIZE = Param("normalize", False, description="divide by the sum of the weights, so weights act as shares",
                  explain=lambda v: ("normalize true = divide by the sum of the weights, so weights act as shares" if v
                                     else "normalize false = weights are used as given, not divided by their sum"))
INT8_MASK = Param("int8_mask", False, description="mergekit's memory-saving mask storage; no effect (masks are boolean)",
                  explain=lambda v: f"int8_mask {str(v).lower()} = mergekit's memory-saving mask storage; the result "
                                    f"is the same")
RESCALE = Param("rescale", True, description="scale the kept entries up to make up for the dropped ones",
                explain=lambda v: ("rescale true = the kept entries are scaled up to make up for the dropped ones" if v
                                   else "rescale false = dropped entries are not compensated"))
RESCALE_MODE = Param("rescale_mode", "paper", description="how to rescale: `paper` (1/keep probability) or `l1_norm` "
                                                          "(match each tensor's L1 norm, mergekit)",
                     explain=lambda v: f"rescale_mode {v} = " + ("match each tensor's L1 norm (mergekit)"
                                                                 if v == "l1_norm" else
                                                                 "scale kept entries by 1/density (the paper's rule)"))


def family_parameters(*per_model: Param, normalize: bool, rescale: bool | None = None,
                      rescale_mode: str = "paper") -> tuple[Param, ...]:
    """The parameters of a task-vector method: weight and its own per-model ones (density, gamma, epsilon), then
    lambda, int8_mask, normalize and, for the methods that rescale what they keep, rescale and rescale_mode;
    mergekit's methods of the family differ only in these defaults."""
    rescaling = () if rescale is None else (RESCALE.but(rescale), RESCALE_MODE.but(rescale_mode))
    return (WEIGHT, *per_model, LAMBDA, INT8_MASK, NORMALIZE.but(normalize), *rescaling)


class TaskVectorMerge(MergeMethod):
    """th0 + lambda * combine_i(w_i * sparsify(tau_i)); subclasses override `sparsify` and the class flags."""

    consensus: ClassVar[bool] = False  # TIES sign election + disjoint merge
    parameters = family_parameters(normalize=False)

    @classmethod
    def check(cls, params: dict[str, Any], model_params: list[dict[str, Any]]) -> None:
        """Also the rescale mode. Weights summing to 0 with normalize: true follow mergekit's rule (the divisor
        becomes 1), so they are not refused here."""
        super().check(params, model_params)
        if "rescale_mode" in params:
            check_rescale_mode(str(params["rescale_mode"]))

    def sparsify(self, task: TensorTask, index: int, tau: torch.Tensor) -> torch.Tensor:
        return tau

    def rescale_settings(self, task: TensorTask) -> tuple[bool, str]:
        """(rescale, rescale_mode) for methods that rescale after sparsifying."""
        return bool(self.param(task, "rescale")), check_rescale_mode(str(self.param(task, "rescale_mode")))

    def weights(self, task: TensorTask) -> list[float]:
        return [float(self.model_param(task, i, "weight")) for i in range(len(task.models))]

    def combine(self, task: TensorTask, sparse: Sequence[torch.Tensor]) -> torch.Tensor:
        """th0 + lambda * the (normalised, sign-elected) weighted sum of the sparsified task vectors."""
        assert task.base is not None, f"{self.name} needs a base model"
        mixed = weighted_merge(
            sparse,
            self.weights(task),
            consensus=self.consensus,
            normalize=bool(self.param(task, "normalize")),
        )
        return mixed.mul_(float(self.param(task, "lambda"))).add_(task.base)

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        return self.combine(task, self.sparsify_all(task, task.deltas()))

    def sparsify_all(self, task: TensorTask, taus: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sparsify the task vectors one by one, each replacing its input in `taus`, so only one unsparsified
        task vector is alive next to the sparse ones."""
        for i in range(len(taus)):
            taus[i] = self.sparsify(task, i, taus[i])
        return taus


@MERGE_METHODS.register("task_arithmetic")
class TaskArithmetic(TaskVectorMerge):
    """th = th0 + lambda * sum_i w_i tau_i (divided by sum_i w_i when normalize)."""

    name = "task_arithmetic"
    description = "task arithmetic: th0 + lambda * sum_i w_i (th_i - th0)"
