"""Linear merge (model soup): th = sum_i w_i th_i / sum_i w_i, or the plain weighted sum without normalize.

No base model is needed; a base model, if the config names one, takes part only when it is also listed among
the models (the executor decides what `task.models` holds).
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, MergeMethod, TensorTask
from polyfuse.merge.methods.sparsify import weighted_merge


@MERGE_METHODS.register("linear")
class Linear(MergeMethod):
    name = "linear"
    description = "linear (model soup): sum_i w_i th_i / sum_i w_i"
    requires_base = False
    defaults = {"normalize": True}
    model_defaults = {"weight": None}

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        weights = [float(self.model_param(task, i, "weight")) for i in range(len(task.models))]
        return weighted_merge(
            task.models, weights, consensus=False, normalize=bool(self.param(task, "normalize"))
        )
