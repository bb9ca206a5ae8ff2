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

from polyfuse.merge.methods.base import MERGE_METHODS, MergeMethod, TensorTask
from polyfuse.merge.methods.sparsify import check_rescale_mode, weighted_merge


class TaskVectorMerge(MergeMethod):
    """th0 + lambda * combine_i(w_i * sparsify(tau_i)); subclasses override `sparsify` and the class flags."""

    consensus: ClassVar[bool] = False  # TIES sign election + disjoint merge
    defaults: ClassVar[dict[str, Any]] = {"lambda": 1.0, "int8_mask": False, "normalize": False}
    model_defaults: ClassVar[dict[str, Any]] = {"weight": None}

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
