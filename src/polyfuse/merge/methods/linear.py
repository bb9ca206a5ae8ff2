"""Linear merge (model soup): th = sum_i w_i th_i / sum_i w_i, or the plain weighted sum without normalize.

No base model is needed. A base model the config names is one more input, as in mergekit (which appends it to
the inputs); polyfuse leaves it out when it has no weight (mergekit stops there), see `config.output_slices`.
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, WEIGHT, MergeMethod, TensorTask
from polyfuse.merge.methods.sparsify import check_weight_sum, weighted_merge
from polyfuse.merge.methods.task_arithmetic import NORMALIZE


@MERGE_METHODS.register("linear")
class Linear(MergeMethod):
    name = "linear"
    description = "linear (model soup): sum_i w_i th_i / sum_i w_i"
    base_policy = "ignored"
    parameters = (WEIGHT, NORMALIZE.but(True))

    @classmethod
    def check(cls, params, model_params) -> None:
        if params["normalize"]:
            check_weight_sum(model_params, "linear with normalize: true")

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        weights = [float(self.model_param(task, i, "weight")) for i in range(len(task.models))]
        return weighted_merge(
            task.models, weights, consensus=False, normalize=bool(self.param(task, "normalize"))
        )
