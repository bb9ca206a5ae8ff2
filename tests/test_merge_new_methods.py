"""The methods mergekit 0.1.5 has beyond the task-arithmetic family: passthrough, nuslerp, multislerp, karcher,
nearswap, arcee_fusion, ram, ramplus_tl. Hand-computed values from their definitions, then equality with
mergekit 0.1.5's own functions (installed by the README's test command) on random tensors."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from polyfuse.merge.methods import MERGE_METHODS
from polyfuse.merge.methods.base import TensorTask

R = math.sqrt(0.5)


def run(name: str, models, base=None, model_params=None, **params) -> torch.Tensor:
    method = MERGE_METHODS.get(name)()
    models = [torch.tensor(m, dtype=torch.float32) if not isinstance(m, torch.Tensor) else m.clone()
              for m in models]
    if base is not None and not isinstance(base, torch.Tensor):
        base = torch.tensor(base, dtype=torch.float32)
    task = TensorTask(name="model.layers.0.mlp.up_proj.weight", base=None if base is None else base.clone(),
                      models=models, model_params=model_params or [{} for _ in models], params=params)
    return method.merge(task)


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# --- hand-computed values ------------------------------------------------------------------------------------

def test_passthrough_scales_the_single_input():
    close(run("passthrough", [[1.0, -2.0]], model_params=[{"scale": 0.5}]), [0.5, -1.0])
    close(run("passthrough", [[1.0, -2.0]]), [1.0, -2.0])


def test_nearswap_swaps_entries_within_t():
    # |diff| = [0.05, 0.2, 1.0]; weight = clamp(0.1 / |diff|, 0, 1) = [1, 0.5, 0.1]
    close(run("nearswap", [[0.05, 0.2, -1.0]], base=[0.0, 0.0, 0.0], t=0.1), [0.05, 0.1, -0.1])


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    taus = [[0.4, 0.0, 0.2, 0.0], [0.2, 0.3, 0.0, 0.0]]
    close(run("ram", taus, base=[0.0] * 4, epsilon=1e-5), [0.3, 0.3, 0.2, 0.0])
    close(run("ram", [[1.4, 1.0, 1.2, 1.0], [1.2, 1.3, 1.0, 1.0]], base=[1.0] * 4, epsilon=1e-5),
          [1.3, 1.3, 1.2, 1.0])
    # epsilon 0.25 ignores 0.2 changes: entry 0 is model 1's alone, entry 2 nobody's
    close(run("ram", taus, base=[0.0] * 4, epsilon=0.25), [0.4, 0.3, 0.0, 0.0])


def test_ramplus_tl_scales_unique_changes():
    taus = [[0.4, 0.0, 0.2, 0.0], [0.2, 0.3, 0.0, 0.0]]
    # each model: 1 shared, 1 unique change: rho = 1; lambda = 1 + r * clamp(rho, 0, alpha)
    close(run("ramplus_tl", taus, base=[0.0] * 4, r=0.1, alpha=0.2, epsilon=1e-5), [0.3, 0.306, 0.204, 0.0])
    close(run("ramplus_tl", taus, base=[0.0] * 4, r=0.05, alpha=1.0, epsilon=1e-5), [0.3, 0.315, 0.21, 0.0])


def test_nuslerp_weights_set_t_and_the_base_is_the_origin():
    w = [{"weight": 1.0}, {"weight": 1.0}]
    flat = {"nuslerp_row_wise": False, "nuslerp_flatten": True}
    close(run("nuslerp", [[1.0, 0.0], [0.0, 1.0]], model_params=w, **flat), [R, R])
    close(run("nuslerp", [[1.0, 0.0], [0.0, 1.0]], model_params=[{"weight": 3.0}, {"weight": 1.0}], **flat),
          [math.sin(3 * math.pi / 8), math.sin(math.pi / 8)])  # t = 0.25
    close(run("nuslerp", [[2.0, 1.0], [1.0, 2.0]], base=[1.0, 1.0], model_params=w, **flat), [1 + R, 1 + R])
    rows = {"nuslerp_row_wise": False, "nuslerp_flatten": False}  # per row: row 1 is colinear, so lerp
    close(run("nuslerp", [[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [3.0, 0.0]]], model_params=w, **rows),
          [[R, R], [2.0, 0.0]])
    # weights summing to zero: t = 0.5
    close(run("nuslerp", [[1.0, 0.0], [0.0, 1.0]], model_params=[{"weight": -0.5}, {"weight": 0.5}], **flat), [R, R])


def test_multislerp_and_karcher_keep_the_mean_direction_and_mean_norm():
    w = [{"weight": 1.0}, {"weight": 1.0}]
    sqrt2 = math.sqrt(2.0)
    close(run("multislerp", [[1.0, 0.0], [0.0, 3.0]], model_params=w, normalize_weights=True, eps=1e-8),
          [sqrt2, sqrt2])  # direction (1, 1)/sqrt2, norm (1 + 3) / 2
    close(run("multislerp", [[2.0, 1.0], [1.0, 4.0]], base=[1.0, 1.0], model_params=w, normalize_weights=True,
              eps=1e-8), [1 + sqrt2, 1 + sqrt2])
    close(run("multislerp", [[5.0, 1.0]], model_params=[{"weight": 1.0}], normalize_weights=True, eps=1e-8),
          [5.0, 1.0])
    close(run("karcher", [[1.0, 0.0], [0.0, 3.0]], max_iter=10, tol=1e-5), [sqrt2, sqrt2])


def test_arcee_fusion_keeps_importance_outliers():
    # one row: importance = kl * |delta|; sorted ids 1, 3, 5 -> q1 0.02k, median 0.04k, q3 0.06k; threshold 0.1k
    other = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 1.0]
    close(run("arcee_fusion", [[other]], base=[[0.0] * 8]), [[0.0] * 7 + [1.0]])


# --- equality with mergekit 0.1.5 ----------------------------------------------------------------------------

def mergekit_run(name: str, tensors: list[torch.Tensor], base: torch.Tensor | None, per_model: dict,
                 params: dict) -> torch.Tensor:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    ids = [f"m{i}" for i in range(len(tensors))]
    group_tensors = [t.clone() for t in tensors]
    base_index = None
    if base is not None:
        ids.append("base")
        group_tensors.append(base.clone())
        base_index = len(ids) - 1
    parameters = dict(params)
    for key, values in per_model.items():
        parameters[key] = dict(zip(ids, values, strict=False))
    group = TensorGroup.from_tensors(group_tensors, ids=ids, base_index=base_index)
    return registry.get(name)((group,), parameters=parameters)[0]


SHAPES = [(64, 48), (96,), (8, 16, 12)]
CASES = [
    ("passthrough", 1, False, {"scale": [0.7]}, {}),
    ("nuslerp", 2, False, {"weight": [0.6, 0.4]}, {"nuslerp_row_wise": False, "nuslerp_flatten": True}),
    ("nuslerp", 2, True, {"weight": [0.6, 0.4]}, {"nuslerp_row_wise": False, "nuslerp_flatten": False}),
    ("nuslerp", 2, True, {"weight": [0.6, 0.4]}, {"nuslerp_row_wise": True, "nuslerp_flatten": False}),
    ("nuslerp", 2, True, {"weight": [-0.5, 0.5]}, {"nuslerp_row_wise": False, "nuslerp_flatten": False}),
    ("multislerp", 3, True, {"weight": [0.5, 0.3, 0.2]}, {}),
    ("multislerp", 2, False, {"weight": [1.0, 2.0]}, {"normalize_weights": True}),
    ("karcher", 3, False, {}, {"max_iter": 5, "tol": 1e-5}),
    ("karcher", 4, False, {}, {}),
    ("nearswap", 1, True, {}, {"t": 0.0001}),
    ("nearswap", 1, True, {}, {"t": 0.05}),
    ("arcee_fusion", 1, True, {}, {}),
    ("ram", 3, True, {}, {}),
    ("ramplus_tl", 3, True, {}, {"r": 0.05, "alpha": 1.0}),
    ("ramplus_tl", 2, True, {}, {}),
]


def sparse_finetunes(base: torch.Tensor, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Fine-tunes that change a random half of the entries each, so RAM sees unique and shared changes."""
    out = []
    for _ in range(count):
        change = torch.randn(base.shape, generator=generator) * 0.05
        keep = torch.rand(base.shape, generator=generator) < 0.5
        out.append(base + change * keep)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "count", "with_base", "per_model", "params"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_equal_to_mergekit(name, count, with_base, per_model, params, shape):
    generator = torch.Generator().manual_seed(zlib.crc32(f"{name}{shape}".encode()))
    base = torch.randn(shape, generator=generator)
    models = sparse_finetunes(base, count, generator)
    method = MERGE_METHODS.get(name)
    full = {**method.defaults, **params}
    ours = run(name, models, base if with_base else None,
               model_params=[{k: v[i] for k, v in per_model.items()} for i in range(count)], **full)
    theirs = mergekit_run(name, models, base if with_base else None, per_model, params)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), atol=2e-6, rtol=1e-5)
