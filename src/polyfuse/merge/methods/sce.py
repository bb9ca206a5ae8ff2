"""SCE (FuseChat 2.0, arXiv 2408.07990): Select, Calculate, Erase, per tensor over the K task vectors.

1. Select: M keeps the top floor(select_topk * nnz(v)) positions of the elementwise population variance
   v = Var_i(tau_i) (nnz counts v > 0); select_topk >= 1 keeps everything.
2. Calculate: eta_i = mean((M tau_i)^2) / sum_j mean((M tau_j)^2); uniform 1/K if the sum is below 1e-6.
3. Erase: s = sign of sum_i M tau_i (>= 0 counts as +); model i takes part where sign(M tau_i) == s.
4. Fuse: th = th0 + sum_i eta_i keep_i M tau_i / max(sum_i eta_i keep_i, 1e-6).

`sce_mask: upstream` (default) is upstream mergekit's `sce`, as above. `sce_mask: weights_only` reproduces the
FuseAI fork that built FuseChat-7B-v2.0: M only enters eta; Erase and Fuse use the unmasked task vectors, a
zero divisor is replaced by 1, and eta falls back to uniform only when the sum is exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polyfuse.merge.methods.base import (
    MERGE_METHODS,
    InvalidParameter,
    MergeMethod,
    Param,
    TensorTask,
    percent,
)
from polyfuse.merge.methods.sparsify import weighted_merge
from polyfuse.merge.methods.task_arithmetic import INT8_MASK

SCE_MASK_MODES = ("upstream", "weights_only")
ETA_SUM_EPS = 1e-6  # upstream: a smaller sum of mean squares gives uniform eta
DIVISOR_FLOOR = 1e-6  # upstream: the fuse divisor is clamped to at least this


def variance_mask(taus: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor | None:
    """Boolean mask of the top floor(select_topk * nnz(v)) positions by elementwise population variance;
    None (keep all) for select_topk >= 1, all False for select_topk <= 0 or when that count is 0."""
    if select_topk >= 1:
        return None
    if select_topk <= 0:
        return torch.zeros_like(taus[0], dtype=torch.bool)
    mean = torch.zeros_like(taus[0])
    for tau in taus:
        mean.add_(tau)
    mean /= len(taus)
    variance = torch.zeros_like(taus[0])
    for tau in taus:
        centred = tau - mean
        variance.addcmul_(centred, centred)
    variance /= len(taus)
    del mean
    k = int(select_topk * int(torch.count_nonzero(variance > 0)))
    mask = torch.zeros(variance.numel(), dtype=torch.bool, device=variance.device)
    if k > 0:
        mask[torch.topk(variance.reshape(-1), k, sorted=False).indices] = True
    return mask.reshape(variance.shape)


def mean_square(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x)) ** 2 / max(x.numel(), 1)


def sce_weights(energies: Sequence[float], zero_sum_below: float = ETA_SUM_EPS) -> list[float]:
    """eta_i = e_i / sum_j e_j from the mean squares e_i = mean(x_i^2) of the masked task vectors; uniform 1/K
    when the sum is below `zero_sum_below` (0 means exactly zero)."""
    total = sum(energies)
    if total < zero_sum_below or total == 0:
        return [1.0 / len(energies)] * len(energies)
    return [e / total for e in energies]


@MERGE_METHODS.register("sce")
class Sce(MergeMethod):
    name = "sce"
    description = "SCE (FuseChat 2.0): variance select, energy weights, sign erase, fuse"
    parameters = (
        Param("select_topk", 1.0, description="the fraction of positions kept, those where the task vectors vary most",
              explain=lambda v: f"select_topk {v} = keep the {percent(v)} of positions where the task vectors vary "
                                f"most"),
        Param("sce_mask", "upstream", description="where the variance mask applies: `upstream` (mergekit) or "
                                                  "`weights_only` (the FuseChat-7B-v2.0 fork)",
              explain="sce_mask {v} = where SCE's variance mask applies"),
        INT8_MASK,
    )

    def eta(self, task: TensorTask) -> list[float]:
        """The per-model merge coefficients of this tensor (for logs and tests)."""
        return self._select(task.to_fp32())[1]

    def _select(self, task: TensorTask) -> tuple[list[torch.Tensor], list[float]]:
        """(the task vectors to fuse, eta_i) of an fp32 task that owns its tensors. Upstream fuses the masked
        task vectors, masked in place; weights_only masks a temporary copy of one at a time for eta."""
        taus = task.deltas()
        mask = variance_mask(taus, float(self.param(task, "select_topk")))
        if self._mode(task) == "weights_only":
            energies = [mean_square(tau if mask is None else tau * mask) for tau in taus]
            return taus, sce_weights(energies, 0.0)
        if mask is not None:
            for tau in taus:
                tau.mul_(mask)
        return taus, sce_weights([mean_square(tau) for tau in taus], ETA_SUM_EPS)

    @classmethod
    def check(cls, params, model_params) -> None:
        if params["sce_mask"] not in SCE_MASK_MODES:
            raise InvalidParameter("sce_mask", f"expected one of {', '.join(SCE_MASK_MODES)} (got {params['sce_mask']!r})")

    def _mode(self, task: TensorTask) -> str:
        mode = self.param(task, "sce_mask")
        self.check({"sce_mask": mode}, task.model_params)
        return mode

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        assert task.base is not None, "sce needs a base model"
        upstream = self._mode(task) == "upstream"
        taus, eta = self._select(task)
        mixed = weighted_merge(
            taus,
            eta,
            consensus=True,
            normalize=True,
            elect_weighted=False,
            divisor_floor=DIVISOR_FLOOR if upstream else None,
        )
        return mixed.add_(task.base)
