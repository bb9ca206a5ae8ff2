"""Model Stock (arXiv 2403.19522): th = t * mean_i(th_i) + (1 - t) * th0 with t = N cos / (1 + (N - 1) cos),
where cos is the mean pairwise cosine of the task vectors (over the flattened tensor, or per row with
`filter_wise`; a row is a vector along the last dimension, and a 1-D tensor is one row)."""

from __future__ import annotations

import torch

from polyfuse.errors import ConfigError
from polyfuse.merge.methods.base import MERGE_METHODS, MergeMethod, Param, TensorTask

NORM_PRODUCT_FLOOR = 1e-6
DENOMINATOR_EPS = 1e-8


def model_stock_ratio(cos: torch.Tensor, n_models: int) -> torch.Tensor:
    """t = N cos / (1 + (N - 1) cos); t = 0 (keep the base) where the denominator vanishes (cos = -1/(N-1))."""
    denominator = 1 + (n_models - 1) * cos
    safe = torch.where(denominator.abs() < DENOMINATOR_EPS, torch.ones_like(denominator), denominator)
    return torch.where(denominator.abs() < DENOMINATOR_EPS, torch.zeros_like(cos), n_models * cos / safe)


def mean_pairwise_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs i < j of cos(offset_i, offset_j) along the last dimension; the norm product is clamped to
    >= 1e-6 and each cosine to [-1, 1]."""
    norms = [torch.linalg.vector_norm(x, dim=-1) for x in offsets]
    total = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            total += (dot / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_FLOOR)).clamp(-1, 1)
            pairs += 1
    return total / pairs


@MERGE_METHODS.register("model_stock")
class ModelStock(MergeMethod):
    name = "model_stock"
    description = "Model Stock: interpolate the base towards the models' mean by their task vectors' angle"
    min_models = 2
    parameters = (Param("filter_wise", False, description="the task vectors' angle per row instead of over the whole "
                                                       "tensor",
                        explain=lambda v: ("filter_wise true = similarity per row" if v
                                           else "filter_wise false = similarity over the whole tensor")),)

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        assert task.base is not None, "model_stock needs a base model"
        n = len(task.models)
        if n < 2:
            raise ConfigError("model_stock needs the base model and at least 2 other models")
        base = task.base
        if bool(self.param(task, "filter_wise")) and base.dim() >= 2:
            rows = base.reshape(-1, base.shape[-1])
        else:
            rows = base.reshape(1, -1)
        offsets = [model.reshape(rows.shape) - rows for model in task.models]
        t = model_stock_ratio(mean_pairwise_cosine(offsets), n).unsqueeze(-1)
        del offsets
        average = torch.zeros_like(rows)
        for model in task.models:
            average.add_(model.reshape(rows.shape))
        average /= n
        return (t * average + (1 - t) * rows).reshape(base.shape)
