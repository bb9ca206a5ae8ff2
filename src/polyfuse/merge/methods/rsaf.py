"""RSAF (polyfuse reconstruction) of InfiFusion's Rate-Skewness Adaptive Fusion.

Only the abstract of RSAF is published ("dynamically adjusts top-K ratios ... to the rate and skewness of the
parameter change"); the formulas below are polyfuse's reconstruction, not the authors' method.

Per source i and tensor, with delta = W_i - W_0 (fp32, moments accumulated in float64):
- rate r = ||delta||_1 / max(||W_0||_1, 1e-12);
- skewness s of |delta| (population moments; 0 when sigma = 0);
- r_med = the median of r over source i's tensors with a non-zero delta (statistics pass);
- keep ratio k = clip(k0 * (r / r_med)^a / (1 + b * max(s, 0)), k_min, k_max);
then TIES: trim each delta to its top-k by magnitude, elect signs on the weighted deltas, take the disjoint mean
and set th = th0 + lambda * delta_merged. With a = b = 0 (and k_min <= k0 <= k_max) it is TIES at density k0.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, WEIGHT, InvalidParameter, Param, TensorTask, percent
from polyfuse.merge.methods.sparsify import magnitude_trim
from polyfuse.merge.methods.task_arithmetic import LAMBDA, NORMALIZE, TaskVectorMerge

RATE_FLOOR = 1e-12
CHUNK = 1 << 22  # entries per float64 chunk when accumulating moments
SIGMA_RELATIVE_EPS = 1e-12  # sigma below this times the mean |delta| counts as 0 (all |delta| equal)
RSAF_PARAMETERS = (
    Param("k0", 0.5, description="the keep ratio of a tensor at the median rate and no skew",
          explain=lambda v: f"k0 {v} = RSAF (polyfuse reconstruction) keeps {percent(v)} of a tensor at median rate "
                            f"and no skew"),
    Param("a", 0.5, description="how strongly the keep ratio grows with the tensor's rate of change",
          explain="a {v} = RSAF: how strongly the keep ratio grows with the tensor's rate of change"),
    Param("b", 0.1, description="how strongly the keep ratio shrinks with the skewness of |delta|",
          explain="b {v} = RSAF: how strongly the keep ratio shrinks with the skewness of |delta|"),
    Param("k_min", 0.1, description="the smallest keep ratio",
          explain=lambda v: f"k_min {v} = RSAF never keeps less than {percent(v)} of a tensor"),
    Param("k_max", 0.9, description="the largest keep ratio",
          explain=lambda v: f"k_max {v} = RSAF never keeps more than {percent(v)} of a tensor"),
)


def delta_statistics(base: torch.Tensor, model: torch.Tensor) -> dict[str, float]:
    """Rate, skewness of |delta| and ||delta||_1 of one source's tensor; sums in float64, chunk by chunk, so the
    working memory stays a few chunks whatever the tensor size."""
    assert base.shape == model.shape, (base.shape, model.shape)
    base_flat = base.reshape(-1)
    model_flat = model.reshape(-1)
    n = base_flat.numel()
    if n == 0:
        return {"rate": 0.0, "skewness": 0.0, "l1": 0.0}
    device = base.device
    l1_delta = torch.zeros((), dtype=torch.float64, device=device)
    l1_base = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, n, CHUNK):
        stop = start + CHUNK
        l1_delta += (model_flat[start:stop] - base_flat[start:stop]).abs().sum(dtype=torch.float64)
        l1_base += base_flat[start:stop].abs().sum(dtype=torch.float64)
    mean = l1_delta / n
    m2 = torch.zeros((), dtype=torch.float64, device=device)
    m3 = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, n, CHUNK):
        stop = start + CHUNK
        centred = (model_flat[start:stop] - base_flat[start:stop]).abs().double() - mean
        squared = centred * centred
        m2 += squared.sum()
        m3 += (squared * centred).sum()
    l1 = float(l1_delta)
    mu = float(mean)
    variance = float(m2) / n
    sigma = variance**0.5
    skewness = 0.0 if sigma == 0 or sigma <= SIGMA_RELATIVE_EPS * mu else (float(m3) / n) / sigma**3
    return {"rate": l1 / max(float(l1_base), RATE_FLOOR), "skewness": skewness, "l1": l1}


def keep_ratio(
    rate: float,
    skewness: float,
    rate_median: float | None,
    *,
    k0: float,
    a: float,
    b: float,
    k_min: float,
    k_max: float,
) -> float:
    """k = clip(k0 * (r / r_med)^a / (1 + b * max(s, 0)), k_min, k_max); r / r_med counts as 1 when the source
    has no median (no tensor with a non-zero delta) or a zero one."""
    ratio = rate / rate_median if rate_median else 1.0
    k = k0 * ratio**a / (1 + b * max(skewness, 0.0))
    return min(max(k, k_min), k_max)


@MERGE_METHODS.register("rsaf")
class Rsaf(TaskVectorMerge):
    name = "rsaf"
    description = (
        "RSAF (polyfuse reconstruction): TIES with a per-tensor keep ratio from the delta's rate and skewness"
    )
    consensus = True
    parameters = (WEIGHT.but(1.0), LAMBDA, NORMALIZE.but(True), *RSAF_PARAMETERS)

    def __init__(self) -> None:
        self.keep_ratio_log: dict[str, list[float]] = {}  # tensor name -> realised k per source, filled by merge
        self.numel: dict[str, int] = {}  # tensor name -> entries, to weight the realised density

    def tensor_statistics(self, task: TensorTask) -> dict[str, Any]:
        """{"rate": [r_i], "skewness": [s_i], "l1": [||delta_i||_1]} over the sources of this tensor."""
        task = task.to_fp32()
        assert task.base is not None, "rsaf needs a base model"
        per_source = [delta_statistics(task.base, model) for model in task.models]
        return {key: [stats[key] for stats in per_source] for key in ("rate", "skewness", "l1")}

    def finish_statistics(self, per_tensor: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """{"rate_median": [r_med_i or None], "tensors": per_tensor}: each source's median rate over its tensors
        with a non-zero delta (the mean of the two middle values for an even count), and the per-tensor
        statistics themselves so the merge pass need not recompute them."""
        n_sources = max((len(stats["rate"]) for stats in per_tensor.values()), default=0)
        medians: list[float | None] = []
        for i in range(n_sources):
            rates = [stats["rate"][i] for stats in per_tensor.values() if stats["l1"][i] > 0]
            medians.append(statistics.median(rates) if rates else None)
        return {"rate_median": medians, "tensors": per_tensor}

    @classmethod
    def check(cls, params, model_params) -> None:
        super().check(params, model_params)
        k_min, k_max = (params.get(key, cls.defaults[key]) for key in ("k_min", "k_max"))
        if not 0 < k_min <= k_max <= 1:
            raise InvalidParameter("k_min", f"rsaf needs 0 < k_min <= k_max <= 1 (got k_min {k_min}, k_max {k_max})")

    def _settings(self, task: TensorTask) -> dict[str, float]:
        settings = {key: float(self.param(task, key)) for key in ("k0", "a", "b", "k_min", "k_max")}
        self.check(settings, task.model_params)
        return settings

    def keep_ratios(self, task: TensorTask) -> list[float]:
        """The keep ratio k of each source for this tensor (needs `task.statistics` from `finish_statistics`)."""
        if "rate_median" not in task.statistics:
            raise RuntimeError("rsaf needs its statistics pass: task.statistics has no 'rate_median'")
        task = task.to_fp32()
        settings = self._settings(task)
        medians = task.statistics["rate_median"]
        stats = task.statistics.get("tensors", {}).get(task.name) or self.tensor_statistics(task)
        return [
            keep_ratio(stats["rate"][i], stats["skewness"][i], medians[i], **settings)
            for i in range(len(task.models))
        ]

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        assert task.base is not None, "rsaf needs a base model"
        ratios = self.keep_ratios(task)
        self.keep_ratio_log[task.name] = ratios
        self.numel[task.name] = task.models[0].numel()
        return self.combine(task, self.sparsify_all(task, task.deltas()))

    def sparsify(self, task: TensorTask, index: int, tau: torch.Tensor) -> torch.Tensor:
        return magnitude_trim(tau, self.keep_ratio_log[task.name][index], name=task.name)

    def report(self) -> dict[str, Any]:
        """k per tensor and source, and each source's realised density: the parameter-count-weighted mean of its
        k over the tensors this run merged (an RSAF benefit counts only against TIES at that density)."""
        if not self.keep_ratio_log:
            return {}
        total = sum(self.numel.values())
        sources = len(next(iter(self.keep_ratio_log.values())))
        density = [
            sum(ks[i] * self.numel[name] for name, ks in self.keep_ratio_log.items()) / total for i in range(sources)
        ]
        return {"method": self.description, "realised_density": density, "keep_ratios": self.keep_ratio_log}
