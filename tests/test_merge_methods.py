"""Weight-merge methods as pure per-tensor functions: hand-computed tables, determinism, fp32 math and
edge cases."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from polyfuse.errors import ConfigError
from polyfuse.merge.methods import MERGE_METHODS, TensorTask
from polyfuse.merge.methods.model_stock import mean_pairwise_cosine, model_stock_ratio
from polyfuse.merge.methods.rsaf import delta_statistics, keep_ratio
from polyfuse.merge.methods.sparsify import (
    dare_drop,
    della_keep_probabilities,
    della_magprune,
    magnitude_trim,
)

T = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731

TAU1 = [0.5, -0.2, 0.1, 0.0]
TAU2 = [-0.3, -0.4, 0.05, 0.2]


def task(models, base=None, model_params=None, name="layers.0.mlp.weight", seed=0, statistics=None, **params):
    models = [m if isinstance(m, torch.Tensor) else T(m) for m in models]
    if base is not None and not isinstance(base, torch.Tensor):
        base = T(base)
    return TensorTask(
        name=name,
        base=base,
        models=models,
        model_params=model_params or [{} for _ in models],
        params=params,
        seed=seed,
        statistics=statistics or {},
    )


def merge(method, t):
    return MERGE_METHODS.get(method)().merge(t)


def close(actual, expected, atol=1e-6):
    assert torch.allclose(
        actual, T(expected) if not isinstance(expected, torch.Tensor) else expected, atol=atol
    ), (
        actual,
        expected,
    )


def test_every_method_is_registered():
    assert set(MERGE_METHODS.names()) >= {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "sce",
        "model_stock",
        "slerp",
        "rsaf",
    }
    assert "polyfuse reconstruction" in MERGE_METHODS.get("rsaf").description


@pytest.mark.parametrize(
    ("method", "normalize", "rescale"),
    [
        ("task_arithmetic", False, None),
        ("ties", True, False),
        ("dare_linear", False, True),
        ("dare_ties", False, True),
        ("breadcrumbs", False, False),
        ("breadcrumbs_ties", False, False),
        ("della", True, True),
        ("della_linear", False, True),
    ],
)
def test_mergekit_defaults(method, normalize, rescale):
    cls = MERGE_METHODS.get(method)
    assert cls.defaults["normalize"] is normalize
    assert cls.defaults["lambda"] == 1.0
    assert cls.defaults.get("rescale") is rescale
    assert cls.model_defaults["weight"] is None
    assert MERGE_METHODS.get("linear").defaults["normalize"] is True


# --- linear and task arithmetic -------------------------------------------------------------------------------


def test_linear_normalize_true_and_false():
    params = [{"weight": 1.0}, {"weight": 3.0}]
    close(merge("linear", task([[1.0, 2.0], [5.0, -2.0]], model_params=params)), [4.0, -1.0])
    close(
        merge("linear", task([[1.0, 2.0], [5.0, -2.0]], model_params=params, normalize=False)), [16.0, -4.0]
    )
    # weights summing to ~0: divide by 1, not by 0
    zero_sum = [{"weight": 1.0}, {"weight": -1.0}]
    close(merge("linear", task([[1.0, 2.0], [5.0, -2.0]], model_params=zero_sum)), [-4.0, 4.0])


def test_linear_needs_weights():
    with pytest.raises(ConfigError, match="weight"):
        merge("linear", task([[1.0], [2.0]]))


def test_task_arithmetic_with_lambda_and_normalize():
    params = [{"weight": 1.0}, {"weight": 0.5}]
    t = task([[1.5, 1.0], [0.0, 3.0]], base=[1.0, 1.0], model_params=params, **{"lambda": 0.5})
    # taus [0.5, 0], [-1, 2]; sum w tau = [0, 1]; lam 0.5
    close(merge("task_arithmetic", t), [1.0, 1.5])
    t = task(
        [[1.5, 1.0], [0.0, 3.0]], base=[1.0, 1.0], model_params=params, normalize=True, **{"lambda": 0.5}
    )
    close(merge("task_arithmetic", t), [1.0, 1.0 + 0.5 / 1.5])


# --- TIES -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("density", "weights", "expected"),
    [
        (0.5, (1.0, 1.0), [0.5, -0.3, 0.0, 0.0]),
        (0.5, (1.0, 0.5), [0.5, -0.266667, 0.0, 0.0]),
        (1.0, (1.0, 1.0), [0.5, -0.3, 0.075, 0.2]),
    ],
)
def test_ties_table(density, weights, expected):
    params = [{"weight": w, "density": density} for w in weights]
    close(merge("ties", task([TAU1, TAU2], base=[0.0] * 4, model_params=params)), expected)


def test_ties_keeps_base_where_nothing_survives_and_applies_lambda():
    params = [{"weight": 1.0, "density": 0.5}] * 2
    base = [1.0, 2.0, 3.0, 4.0]
    models = [[b + t for b, t in zip(base, tau, strict=True)] for tau in (TAU1, TAU2)]
    out = merge("ties", task(models, base=base, model_params=params, **{"lambda": 2.0}))
    close(out, [2.0, 1.4, 3.0, 4.0], atol=1e-5)


# --- DARE -------------------------------------------------------------------------------------------------------

DARE_TAU = [0.4, -0.1, 0.2, -0.3]
DARE_MASK = torch.tensor([1, 0, 0, 1], dtype=torch.bool)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("paper", [0.8, 0.0, 0.0, -0.6]), ("l1_norm", [0.571429, 0.0, 0.0, -0.428571])],
)
def test_dare_table(mode, expected):
    close(dare_drop(T(DARE_TAU), 0.5, mask=DARE_MASK, mode=mode), expected)


def test_dare_rescale_off_and_full_density():
    close(dare_drop(T(DARE_TAU), 0.5, mask=DARE_MASK, rescale=False), [0.4, 0.0, 0.0, -0.3])
    tau = T(DARE_TAU)
    assert dare_drop(tau, 1.0, generator=torch.Generator().manual_seed(0)) is tau


def test_dare_paper_rescale_is_unbiased():
    tau = torch.linspace(-1.0, 1.0, 64)
    draws = torch.stack(
        [dare_drop(tau, 0.3, generator=torch.Generator().manual_seed(seed)) for seed in range(3000)]
    )
    assert (draws != 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    # per entry, std of the mean is |tau| * sqrt((1-d)/d / 3000) <= 0.028
    assert torch.allclose(draws.mean(dim=0), tau, atol=0.1)
    assert (draws.mean(dim=0) - tau).abs().mean().item() < 0.03


def dare_task(name="layers.0.mlp.weight", seed=7, method_params=None):
    g = torch.Generator().manual_seed(123)
    base = torch.randn(32, 16, generator=g)
    models = [base + torch.randn(32, 16, generator=g) for _ in range(2)]
    params = [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 2
    return task(models, base=base, model_params=params, name=name, seed=seed, **(method_params or {}))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_are_deterministic_per_tensor(method):
    first = merge(method, dare_task("a.weight"))
    merge(method, dare_task("b.weight"))  # another tensor in between: no shared RNG state
    again = merge(method, dare_task("a.weight"))
    assert torch.equal(first, again)
    assert not torch.equal(first, merge(method, dare_task("a.weight", seed=8)))


def test_different_tensor_names_and_models_get_different_masks():
    t_a, t_b = dare_task("a.weight"), dare_task("b.weight")
    mask_a0 = torch.rand(t_a.base.shape, generator=t_a.generator(0)) < 0.5
    mask_b0 = torch.rand(t_b.base.shape, generator=t_b.generator(0)) < 0.5
    mask_a1 = torch.rand(t_a.base.shape, generator=t_a.generator(1)) < 0.5
    assert not torch.equal(mask_a0, mask_b0)
    assert not torch.equal(mask_a0, mask_a1)
    # and the method really uses them: the kept entries of model 0 differ between the two names
    out_a = MERGE_METHODS.get("dare_linear")().sparsify(t_a, 0, t_a.models[0] - t_a.base)
    out_b = MERGE_METHODS.get("dare_linear")().sparsify(t_b, 0, t_a.models[0] - t_a.base)
    assert torch.equal(out_a != 0, mask_a0)
    assert torch.equal(out_b != 0, mask_b0)


def test_dare_l1_rescale_mode_and_rescale_off_in_the_method():
    t = dare_task(method_params={"rescale_mode": "l1_norm"})
    method = MERGE_METHODS.get("dare_linear")()
    tau = t.models[0] - t.base
    out = method.sparsify(t, 0, tau)
    assert out.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)
    off = method.sparsify(dare_task(method_params={"rescale": False}), 0, tau)
    kept = off != 0
    assert torch.equal(off[kept], tau[kept])
    with pytest.raises(ConfigError, match="rescale_mode"):
        method.sparsify(dare_task(method_params={"rescale_mode": "l2"}), 0, tau)


# --- breadcrumbs ------------------------------------------------------------------------------------------------

CRUMBS_TAU = [0.05, -0.9, 0.3, -0.2, 0.01, 0.6, -0.4, 0.15, -0.02, 0.5]


def test_breadcrumbs_example():
    expected = [0, 0, 0.3, -0.2, 0, 0.6, -0.4, 0.15, 0, 0.5]
    close(magnitude_trim(T(CRUMBS_TAU), 0.6, gamma=0.1), expected)
    params = [{"weight": 1.0, "density": 0.6, "gamma": 0.1}]
    close(merge("breadcrumbs", task([CRUMBS_TAU], base=[0.0] * 10, model_params=params)), expected)
    close(merge("breadcrumbs_ties", task([CRUMBS_TAU], base=[0.0] * 10, model_params=params)), expected)


def test_breadcrumbs_gamma_reduced_when_density_plus_gamma_exceeds_one_and_small_tensor_keeps_band():
    # d = 0.95, gamma = 0.1 on 10 entries: keep 9, so only 1 outlier (the 0.9) goes
    out = magnitude_trim(T(CRUMBS_TAU), 0.95, gamma=0.1)
    assert (out != 0).sum().item() == 9 and out[1].item() == 0
    # gamma * n < 1 (mergekit zeroes the whole delta here): polyfuse keeps the top floor(d n)
    close(magnitude_trim(T(CRUMBS_TAU), 0.2, gamma=0.01), [0, -0.9, 0, 0, 0, 0.6, 0, 0, 0, 0])


# --- DELLA ------------------------------------------------------------------------------------------------------


def test_della_keep_probabilities_for_a_known_row():
    # |tau| ranks ascending: 0.1 -> 1, 0.2 -> 2, 0.3 -> 3, 0.4 -> 4, 0.5 -> 5; q = (rank-1)/4
    probs = della_keep_probabilities(T([0.3, -0.5, 0.1, 0.2, -0.4]), 0.5, 0.2)
    close(probs, [0.5, 0.7, 0.3, 0.4, 0.6])
    # per row for a matrix; a row of one entry has q = 0.5
    close(della_keep_probabilities(T([[1.0, -3.0], [2.0, 0.5]]), 0.5, 0.1), [[0.4, 0.6], [0.6, 0.4]])
    close(della_keep_probabilities(T([[1.0], [2.0]]), 0.5, 0.1), [[0.5], [0.5]])


def test_della_paper_rescale_divides_each_survivor_by_its_probability():
    tau = T([0.3, -0.5, 0.1, 0.2, -0.4])
    mask = torch.tensor([True, True, False, True, False])
    close(della_magprune(tau, 0.5, 0.2, mask=mask), [0.6, -0.5 / 0.7, 0.0, 0.5, 0.0])
    close(
        della_magprune(tau, 0.5, 0.2, mask=mask, mode="l1_norm"), T([0.3, -0.5, 0.0, 0.2, 0.0]) * (1.5 / 1.0)
    )


@pytest.mark.parametrize(("density", "epsilon"), [(0.1, 0.15), (0.9, 0.15), (0.15, 0.15), (0.5, -0.1)])
def test_della_epsilon_constraint(density, epsilon):
    with pytest.raises(ConfigError, match="epsilon"):
        della_magprune(T(DARE_TAU), density, epsilon, generator=torch.Generator().manual_seed(0))
    params = [{"weight": 1.0, "density": density, "epsilon": epsilon}]
    with pytest.raises(ConfigError, match="epsilon"):
        merge("della", task([DARE_TAU], base=[0.0] * 4, model_params=params))


def test_della_full_density_is_untouched_whatever_epsilon():
    params = [{"weight": 1.0, "density": 1.0, "epsilon": 0.5}]
    close(merge("della_linear", task([DARE_TAU], base=[0.0] * 4, model_params=params)), DARE_TAU)


# --- SCE --------------------------------------------------------------------------------------------------------

SCE_TAU2 = [-0.3, -0.4, 0.05, 0.3]


def test_sce_select_all():
    t = task([TAU1, SCE_TAU2], base=[0.0] * 4, select_topk=1.0)
    sce = MERGE_METHODS.get("sce")()
    assert sce.eta(t) == pytest.approx([0.466926, 0.533074], abs=1e-6)
    close(sce.merge(t), [0.5, -0.306615, 0.073346, 0.3])


def test_sce_select_half():
    t = task([TAU1, SCE_TAU2], base=[0.0] * 4, select_topk=0.5)
    sce = MERGE_METHODS.get("sce")()
    # M keeps positions 0 and 3: masked taus [0.5, 0, 0, 0] and [-0.3, 0, 0, 0.3]
    assert sce.eta(t) == pytest.approx([0.0625 / 0.1075, 0.045 / 0.1075], abs=1e-6)
    close(sce.merge(t), [0.5, 0.0, 0.0, 0.3])


def test_sce_weights_only_uses_unmasked_deltas_after_eta():
    t = task([TAU1, SCE_TAU2], base=[0.0] * 4, select_topk=0.5, sce_mask="weights_only")
    eta1, eta2 = 0.0625 / 0.1075, 0.045 / 0.1075
    # election on unmasked sums [0.2, -0.6, 0.15, 0.3]; both agree at 1 and 2
    expected = [0.5, eta1 * -0.2 + eta2 * -0.4, eta1 * 0.1 + eta2 * 0.05, 0.3]
    close(MERGE_METHODS.get("sce")().merge(t), expected)
    with pytest.raises(ConfigError, match="sce_mask"):
        MERGE_METHODS.get("sce")().merge(task([TAU1, SCE_TAU2], base=[0.0] * 4, sce_mask="masked"))


# --- Model Stock ------------------------------------------------------------------------------------------------


def test_model_stock_ratio_and_formula():
    assert model_stock_ratio(torch.tensor(0.5), 2).item() == pytest.approx(2 / 3)
    assert model_stock_ratio(torch.tensor(1.0), 3).item() == pytest.approx(1.0)
    # tau1 = [1, 0], tau2 = [1, 1] / ... : cos 60 degrees -> 0.5
    base = T([1.0, 1.0])
    tau1, tau2 = T([1.0, 0.0]), T([0.5, math.sqrt(3) / 2])
    assert mean_pairwise_cosine([tau1.reshape(1, -1), tau2.reshape(1, -1)]).item() == pytest.approx(
        0.5, abs=1e-6
    )
    out = merge("model_stock", task([base + tau1, base + tau2], base=base))
    expected = (2 / 3) * (base + (tau1 + tau2) / 2) + (1 / 3) * base
    close(out, expected)


def test_model_stock_filter_wise_is_per_row():
    base = torch.zeros(2, 2)
    m1 = T([[1.0, 0.0], [1.0, 0.0]])
    m2 = T([[0.5, math.sqrt(3) / 2], [1.0, 0.0]])  # row 0: cos 0.5 (t = 2/3); row 1: cos 1 (t = 1)
    out = merge("model_stock", task([m1, m2], base=base, filter_wise=True))
    close(out, torch.stack([(2 / 3) * (m1[0] + m2[0]) / 2, (m1[1] + m2[1]) / 2]))
    with pytest.raises(ConfigError, match="at least 2"):
        merge("model_stock", task([m1], base=base))


# --- SLERP ------------------------------------------------------------------------------------------------------


def test_slerp_quarter_circle():
    close(merge("slerp", task([[0.0, 1.0]], base=[1.0, 0.0], t=0.5)), [0.707107, 0.707107])
    # unnormalised ends keep their scale
    close(merge("slerp", task([[0.0, 4.0]], base=[2.0, 0.0], t=0.5)), [1.414214, 2.828427])
    close(merge("slerp", task([[0.0, 1.0]], base=[1.0, 0.0], t=0.0)), [1.0, 0.0])


def test_slerp_falls_back_to_lerp_for_near_parallel_vectors():
    v0, v1 = T([1.0, 0.0, 0.0]), T([2.0, 0.01, 0.0])
    out = merge("slerp", task([v1], base=v0, t=0.25))
    close(out, 0.75 * v0 + 0.25 * v1)


def test_slerp_requires_t():
    with pytest.raises(ConfigError, match="'t'"):
        merge("slerp", task([[0.0, 1.0]], base=[1.0, 0.0]))


# --- RSAF -------------------------------------------------------------------------------------------------------


def rsaf_setup(n_tensors=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for j in range(n_tensors):
        base = torch.randn(20, 10, generator=g)
        models = [base + (0.1 + 0.05 * i + 0.02 * j) * torch.randn(20, 10, generator=g) for i in range(3)]
        params = [{"weight": w, "density": 1.0} for w in (1.0, 0.5, 2.0)]
        tasks.append(task(models, base=base, model_params=params, name=f"layers.{j}.weight"))
    return tasks


def rsaf_statistics(tasks):
    rsaf = MERGE_METHODS.get("rsaf")()
    return rsaf.finish_statistics({t.name: rsaf.tensor_statistics(t) for t in tasks})


def test_rsaf_with_a_b_zero_is_ties_at_density_k0():
    tasks = rsaf_setup()
    stats = rsaf_statistics(tasks)
    assert set(stats["tensors"]) == {t.name for t in tasks}  # cached for the merge pass
    for t in tasks:
        t.statistics = stats
        t.params.update({"a": 0.0, "b": 0.0, "k0": 0.3, "k_min": 0.1, "k_max": 0.9, "lambda": 0.8})
        rsaf = MERGE_METHODS.get("rsaf")()
        out = rsaf.merge(t)
        assert rsaf.keep_ratios(t) == [0.3, 0.3, 0.3]
        assert rsaf.keep_ratio_log[t.name] == [0.3, 0.3, 0.3]
        ties_params = [{**p, "density": 0.3} for p in t.model_params]
        ties = merge("ties", task(t.models, base=t.base, model_params=ties_params, **{"lambda": 0.8}))
        assert torch.equal(out, ties)


def test_rsaf_statistics_and_median():
    tasks = rsaf_setup()
    stats = rsaf_statistics(tasks)
    rsaf = MERGE_METHODS.get("rsaf")()
    rates = [rsaf.tensor_statistics(t)["rate"] for t in tasks]
    for i in range(3):
        assert stats["rate_median"][i] == pytest.approx(sorted(r[i] for r in rates)[1])
    # the merge pass reads the cached per-tensor statistics; recomputing them gives the same k
    t = tasks[1]
    cached = rsaf.keep_ratios(task(t.models, base=t.base, name=t.name, statistics=stats))
    fresh = rsaf.keep_ratios(
        task(t.models, base=t.base, name=t.name, statistics={"rate_median": stats["rate_median"]})
    )
    assert cached == fresh and len(set(cached)) == 3
    # rate and skewness by hand; Gaussian deltas give a half-normal |delta| with s about 1
    t = tasks[0]
    delta = (t.models[0] - t.base).double()
    s = delta_statistics(t.base, t.models[0])
    assert s["rate"] == pytest.approx((delta.abs().sum() / t.base.double().abs().sum()).item(), rel=1e-9)
    x = delta.abs()
    skew = (((x - x.mean()) ** 3).mean() / ((x - x.mean()) ** 2).mean() ** 1.5).item()
    assert s["skewness"] == pytest.approx(skew, rel=1e-9)
    big = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    assert delta_statistics(torch.zeros_like(big), big)["skewness"] == pytest.approx(0.995, abs=0.05)
    # a constant |delta| has sigma = 0 and s = 0; an unchanged source has no median
    assert delta_statistics(torch.zeros(4), T([1.0, -1.0, 1.0, -1.0]))["skewness"] == 0.0
    unchanged = task([[1.0, 2.0]], base=[1.0, 2.0])
    assert rsaf.finish_statistics({"x": rsaf.tensor_statistics(unchanged)})["rate_median"] == [None]


def test_rsaf_keep_ratio_moves_with_rate_and_skewness_within_clip():
    settings = {"k0": 0.5, "a": 0.5, "b": 0.1, "k_min": 0.1, "k_max": 0.9}
    assert keep_ratio(1.0, 0.0, 1.0, **settings) == pytest.approx(0.5)
    assert keep_ratio(2.0, 1.0, 1.0, **settings) > keep_ratio(1.0, 1.0, 1.0, **settings)
    assert keep_ratio(1.0, 9.4, 1.0, **settings) < keep_ratio(1.0, 1.0, 1.0, **settings)
    assert keep_ratio(1.0, 1.0, 1.0, **settings) == pytest.approx(0.5 / 1.1)
    assert keep_ratio(1.0, -3.0, 1.0, **settings) == pytest.approx(0.5)  # negative skew counts as 0
    assert keep_ratio(100.0, 0.0, 1.0, **settings) == 0.9
    assert keep_ratio(1e-4, 0.0, 1.0, **settings) == 0.1
    # and through the method: a source with a larger change keeps more
    g = torch.Generator().manual_seed(3)
    base = torch.randn(50, generator=g)
    noise = torch.randn(50, generator=g)
    t = task([base + 0.1 * noise, base + 0.4 * noise], base=base, statistics={"rate_median": [0.2, 0.2]})
    k_small, k_large = MERGE_METHODS.get("rsaf")().keep_ratios(t)
    assert 0.1 <= k_small < k_large <= 0.9
    with pytest.raises(ConfigError, match="k_min"):
        MERGE_METHODS.get("rsaf")().keep_ratios(
            task(t.models, base=base, statistics=t.statistics, k_min=0.95)
        )
    with pytest.raises(RuntimeError, match="statistics"):
        MERGE_METHODS.get("rsaf")().merge(task(t.models, base=base))


# --- fp32 math and edge cases -----------------------------------------------------------------------------------

ALL_WITH_BASE = [
    ("task_arithmetic", {}),
    ("ties", {}),
    ("dare_linear", {}),
    ("dare_ties", {}),
    ("breadcrumbs", {"gamma": 0.1}),
    ("breadcrumbs_ties", {"gamma": 0.1}),
    ("della", {"epsilon": 0.1}),
    ("della_linear", {"epsilon": 0.1}),
    ("sce", {}),
    ("model_stock", {}),
    ("rsaf", {}),
]


def edge_task(method, models, base, **params):
    extra = dict(ALL_WITH_BASE)[method]
    model_params = [{"weight": 1.0, "density": 0.5, **extra} for _ in models]
    statistics = {"rate_median": [0.1] * len(models)} if method == "rsaf" else None
    return task(
        models, base=base, model_params=model_params, statistics=statistics, select_topk=0.5, **params
    )


@pytest.mark.parametrize("method", [m for m, _ in ALL_WITH_BASE])
def test_bf16_inputs_give_the_fp32_result(method):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 16, generator=g).bfloat16()
    models = [(base.float() + 0.05 * torch.randn(8, 16, generator=g)).bfloat16() for _ in range(2)]
    out16 = MERGE_METHODS.get(method)().merge(edge_task(method, models, base))
    out32 = MERGE_METHODS.get(method)().merge(edge_task(method, [m.float() for m in models], base.float()))
    assert out16.dtype == torch.float32
    assert torch.equal(out16, out32)
    # and the result is not just the bf16 rounding of itself: fp32 math kept precision bf16 cannot hold
    assert not torch.equal(out32, out32.bfloat16().float())


@pytest.mark.parametrize("method", [m for m, _ in ALL_WITH_BASE])
def test_all_zero_deltas_give_the_base(method):
    base = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    out = MERGE_METHODS.get(method)().merge(edge_task(method, [base.clone(), base.clone()], base))
    assert torch.equal(out, base)


@pytest.mark.parametrize("method", [m for m, _ in ALL_WITH_BASE] + ["slerp", "linear"])
def test_methods_leave_borrowed_tensors_alone_and_overwrite_owned_ones_to_the_same_result(method):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(8, 16, generator=g)
    models = [base + 0.05 * torch.randn(8, 16, generator=g) for _ in range(1 if method == "slerp" else 2)]

    def make(owned: bool) -> TensorTask:
        ins = [m.clone() for m in models] if owned else models
        if method == "slerp":
            t = task(ins, base=base.clone() if owned else base, t=0.3)
        elif method == "linear":
            t = task(ins, model_params=[{"weight": 1.0}, {"weight": 2.0}])
        else:
            t = edge_task(method, ins, base.clone() if owned else base)
        t.owned = owned
        return t

    originals = [t.clone() for t in (base, *models)]
    borrowed = MERGE_METHODS.get(method)().merge(make(owned=False))
    assert all(torch.equal(t, o) for t, o in zip((base, *models), originals, strict=True))
    assert torch.equal(MERGE_METHODS.get(method)().merge(make(owned=True)), borrowed)


def test_slerp_and_linear_fp32_from_bf16():
    v0 = T([1.0, 0.3]).bfloat16()
    v1 = T([0.2, 1.0]).bfloat16()
    out = merge("slerp", task([v1], base=v0, t=0.3))
    assert out.dtype == torch.float32
    assert torch.equal(out, merge("slerp", task([v1.float()], base=v0.float(), t=0.3)))
    out = merge("linear", task([v0, v1], model_params=[{"weight": 1.0}, {"weight": 2.0}]))
    assert out.dtype == torch.float32


def test_density_giving_zero_entries_keeps_one_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="polyfuse.merge"):
        out = magnitude_trim(T(DARE_TAU), 0.1, name="tiny.weight")
    close(out, [0.4, 0.0, 0.0, 0.0])
    assert "tiny.weight" in caplog.text and "keeping the largest" in caplog.text


@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs", "della_linear"])
def test_density_one_or_more_leaves_the_task_vector_untouched(method):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(30, generator=g)
    model = base + torch.randn(30, generator=g)
    for density in (1.0, 1.5):
        params = [{"weight": 1.0, "density": density, "gamma": 0.1, "epsilon": 0.1}]
        out = merge(method, task([model], base=base, model_params=params))
        close(out, model, atol=1e-6)
