"""Fused GTA merges (task_arithmetic, ties, dare_*, breadcrumbs*, della*, linear, dare_drop,
generalized_task_arithmetic) against the pure-torch reference and mergekit 0.1.5."""
from __future__ import annotations

import math
import re

import pytest
import torch

import fastmerge
import fastmerge.ops as F
from fastmerge.ops import _reference as R

from conftest import BF16_FLOOR_FACTOR
from helpers import (
    GTA_METHODS,
    RANDOM_METHODS,
    assert_close,
    binomial_bound,
    make_group,
    mergekit_gta,
    mergekit_merge,
    mergekit_params,
    nudge_threshold_ties,
    randn,
    ref_gta,
    ref_method,
    bf16_errors,
    misses_since,
    run_method,
    sampled_positions,
    window_misses,
)

ODD_SHAPES = [(), (1,), (4097,), (3, 5, 7)]
ALL_METHODS = sorted(GTA_METHODS)


def _tol(rescale: bool) -> str:
    return "l1_rescale" if rescale else "exact"


def _delta_scale(expected: torch.Tensor, base) -> float:
    """Largest finite |merged delta|: the scale of reduction tolerances."""
    b = base.float() if base is not None else torch.zeros_like(expected)
    d = (expected.float() - b).abs()
    d = d[torch.isfinite(d)]
    return float(d.max()) if d.numel() else 0.0


def check_against_reference(out, expected32, base, rescale, msg=""):
    """out (any dtype) vs the fp32 reference rounded once to out's dtype."""
    expected = expected32.to(out.dtype)
    assert out.dtype == expected.dtype and out.shape == expected.shape, msg
    assert_close(out, expected, _tol(rescale), scale=_delta_scale(expected32, base), msg=msg,
                 exclude=getattr(expected32, "vote_ambiguous", None))


# ---------------------------------------------------------------------------------------------
# Native vs reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_methods_match_reference(method, shape, dtype, device):
    base, experts = make_group(shape, 3, seed=1, dtype=dtype, device=device)
    weight, density = [0.6, 1.0, 0.35], [0.3, 0.5, 0.7]
    kw = {}
    if method in RANDOM_METHODS:
        kw = dict(seed=1234, name="model.layers.0.mlp.up_proj.weight")
    out = run_method(method, base, experts, weight, density, **kw)
    expected = ref_method(method, base, experts, weight, density, **kw)
    check_against_reference(out, expected, base, GTA_METHODS[method][3], msg=method)


@pytest.mark.parametrize("sparsification", [None, "magnitude", "random", "magnitude_outliers",
                                            "della_magprune"])
@pytest.mark.parametrize("consensus", [None, "sum", "count"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lambda_", [1.0, 0.37])
def test_generalized_options_match_reference(sparsification, consensus, rescale, normalize,
                                             lambda_):
    shape = (13, 29, 3)
    base, experts = make_group(shape, 3, seed=7)
    weight = [0.9, -0.4, 0.55]  # a negative weight flips that expert's vote
    kw = dict(density=[0.25, 0.6, 0.45], gamma=[0.02, 0.1, 0.0], epsilon=[0.2, 0.1, 0.05],
              sparsification=sparsification, consensus=consensus, rescale=rescale,
              normalize=normalize, lambda_=lambda_, seed=99, name="w")
    out = F.generalized_task_arithmetic(base, experts, weight, **kw)
    expected = ref_gta(base, experts, weight, **kw)
    has_rescale = rescale and sparsification is not None
    check_against_reference(out, expected, base, has_rescale)


@pytest.mark.parametrize("sparsification", [None, "magnitude", "random", "magnitude_outliers",
                                            "della_magprune"])
@pytest.mark.parametrize("consensus", [None, "sum", "count"])
def test_without_base_matches_reference(sparsification, consensus):
    """base=None: the experts themselves are the deltas and nothing is added back."""
    _, experts = make_group((9, 50), 3, seed=17)
    kw = dict(density=[0.3, 0.5, 0.7], sparsification=sparsification, consensus=consensus,
              rescale=True, normalize=True, lambda_=1.5, seed=2, name="nb")
    out = F.generalized_task_arithmetic(None, experts, [0.4, -0.8, 1.1], **kw)
    expected = ref_gta(None, experts, [0.4, -0.8, 1.1], **kw)
    check_against_reference(out, expected, None, sparsification is not None)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_non_finite_inputs_match_reference(method):
    """inf and NaN deltas: NaN ranks above inf in top-k, never agrees in sign election."""
    base, experts = make_group((6, 70), 3, seed=18)
    experts[0][0, :5] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30, -1e30])
    experts[2][3, 7] = float("nan")
    kw = dict(seed=1, name="nf") if method in RANDOM_METHODS else {}
    for rescale in (False, True):
        out = run_method(method, base, experts, [0.5, 1.0, 0.7], 0.4, rescale=rescale, **kw) \
            if method != "task_arithmetic" else F.task_arithmetic(base, experts, [0.5, 1.0, 0.7])
        expected = ref_method(method, base, experts, [0.5, 1.0, 0.7], 0.4, rescale=rescale, **kw)
        check_against_reference(out, expected, base, rescale)


@pytest.mark.parametrize("sparsification", ["magnitude", "random", "magnitude_outliers",
                                            "della_magprune"])
@pytest.mark.parametrize("density", [0.0, 1e-4, 1.0])
def test_edge_densities_match_reference(sparsification, density):
    base, experts = make_group((17, 19), 2, seed=3)
    kw = dict(density=density, sparsification=sparsification, consensus="sum", rescale=True,
              normalize=True, epsilon=min(0.15, density / 2) if 0 < density < 1 else 0.15)
    out = F.generalized_task_arithmetic(base, experts, [1.0, 0.5], **kw)
    expected = ref_gta(base, experts, [1.0, 0.5], **kw)
    check_against_reference(out, expected, base, True)
    if density == 0.0:  # mergekit: everything dropped, the merge is the base
        assert torch.equal(out, base)


def test_density_zero_and_one_semantics():
    """Independent of the reference: density 1 keeps every delta unscaled, density 0 none."""
    base, experts = make_group((31, 7), 2, seed=4)
    for method in ALL_METHODS:
        if method == "task_arithmetic":
            continue
        full = run_method(method, base, experts, [1.0, 1.0], 1.0, normalize=False)
        if GTA_METHODS[method][1] is None:
            expected = base + ((experts[0] - base) + (experts[1] - base))
            assert torch.equal(full, expected), method
        none = run_method(method, base, experts, [1.0, 1.0], 0.0)
        assert torch.equal(none, base), method


def test_linear_matches_reference_and_formula(dtype):
    _, experts = make_group((5, 4097), 3, seed=8, dtype=dtype)
    weight = [0.2, 0.5, 0.3]
    for normalize in (False, True):
        out = F.linear(experts, weight, normalize=normalize)
        expected = ref_gta(None, experts, weight, normalize=normalize)
        check_against_reference(out, expected, None, False)
    # formula, independently: sum w x / sum w in fp64
    x64 = [e.double() for e in experts]
    formula = sum(w * x for w, x in zip(weight, x64)) / sum(weight)
    assert torch.allclose(F.linear(experts, weight, out_dtype=torch.float32).double(), formula,
                          rtol=0, atol=8 * 2**-24 * float(formula.abs().max()) + 4 * 2**-24)


def test_linear_zero_weight_sum_is_not_normalized():
    _, experts = make_group((9,), 2, seed=8)
    out = F.linear(experts, [1.0, -1.0])
    assert torch.equal(out, ref_gta(None, experts, [1.0, -1.0], normalize=True))
    assert torch.equal(out, experts[0] - experts[1])


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("shape", ODD_SHAPES + [(64, 1000)], ids=str)
def test_dare_drop_matches_reference(shape, rescale, dtype):
    x = randn(shape, seed=2, dtype=dtype)
    out = F.dare_drop(x, 0.3, seed=5, name="x", rescale=rescale)
    expected = ref_gta(None, [x], 1.0, density=0.3, sparsification="random", rescale=rescale,
                       seed=5, name="x")
    check_against_reference(out, expected, None, rescale)


def test_random_masks_are_keyed_by_seed_name_expert_and_index():
    x = randn((4099,), seed=2) + 10.0  # no zeros: nonzero <=> kept
    kept = lambda **kw: F.dare_drop(x, 0.5, rescale=False, **kw) != 0  # noqa: E731
    a = kept(seed=1, name="a")
    assert torch.equal(a, kept(seed=1, name="a"))
    assert not torch.equal(a, kept(seed=2, name="a"))
    assert not torch.equal(a, kept(seed=1, name="b"))
    assert not torch.equal(a, kept(seed=2**40 + 1, name="a"))  # high seed word matters
    # counted by element index: a prefix of the tensor gets the prefix of the mask
    assert torch.equal(F.dare_drop(x[:1001], 0.5, seed=1, name="a", rescale=False) != 0, a[:1001])
    # expert index: the second expert's mask is stream (seed, name, 1)
    zero = torch.zeros_like(x)
    two = F.generalized_task_arithmetic(zero, [zero, x], [1.0, 1.0], density=0.5,
                                        sparsification="random", seed=1, name="a")
    words = R.philox_uniforms(x.numel(), 1, fastmerge.ops._validate.stream_hash("a"), 1)
    assert torch.equal(two != 0, words < 0.5)


@pytest.mark.parametrize("count", [1, 2, 5, 8, 9, 12])
@pytest.mark.parametrize("mixed", [False, True], ids=["same_dtype", "mixed_dtypes"])
def test_expert_counts(count, mixed):
    """1..12 experts: fixed-count kernels and the general path, same or mixed storage dtypes."""
    base, experts = make_group((5, 301), count, seed=13, dtype=torch.bfloat16)
    if mixed:
        experts = [e.to(torch.float16 if t % 2 else torch.float32) for t, e in enumerate(experts)]
    weight = [0.3 + 0.1 * t * (-1) ** t for t in range(count)]
    density = [0.2 + 0.6 * t / max(count - 1, 1) for t in range(count)]
    for method in ALL_METHODS:
        kw = dict(seed=3, name="n") if method in RANDOM_METHODS else {}
        out = run_method(method, base, experts, weight, density, **kw)
        expected = ref_method(method, base, experts, weight, density, **kw)
        check_against_reference(out, expected, base, GTA_METHODS[method][3], msg=method)
    for normalize in (False, True):
        out = F.linear(experts, weight, normalize=normalize, out_dtype=torch.float32)
        check_against_reference(out, ref_gta(None, experts, weight, normalize=normalize), None,
                                False)


@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (1, 5), (7, 1, 3), (2, 3, 4, 5), (3, 1, 1)],
                         ids=str)
@pytest.mark.parametrize("rescale", [False, True])
def test_della_rank_axis_shapes(shape, rescale):
    """DELLA ranks along dim 1 (one-element groups get rank_norm 0.5)."""
    base, experts = make_group(shape, 2, seed=14)
    out = F.della(base, experts, [1.0, 0.5], [0.3, 0.6], epsilon=0.2, seed=5, rescale=rescale)
    expected = ref_method("della", base, experts, [1.0, 0.5], [0.3, 0.6], epsilon=0.2, seed=5,
                          rescale=rescale)
    check_against_reference(out, expected, base, rescale)


# ---------------------------------------------------------------------------------------------
# Layouts, dtypes, out_dtype
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ALL_METHODS)
def test_non_contiguous_inputs(method):
    base, experts = make_group((23, 41), 2, seed=9)
    weight, density = [0.8, 0.6], 0.4
    # transposed views
    bt, et = base.t(), [e.t() for e in experts]
    assert not bt.is_contiguous()
    out = run_method(method, bt, et, weight, density)
    same = run_method(method, bt.contiguous(), [e.contiguous() for e in et], weight, density)
    assert torch.equal(out, same)
    check_against_reference(out, ref_method(method, bt, et, weight, density), bt,
                            GTA_METHODS[method][3])
    # strided slices
    bs, es = base[::2, 1::3], [e[::2, 1::3] for e in experts]
    out = run_method(method, bs, es, weight, density)
    same = run_method(method, bs.contiguous(), [e.contiguous() for e in es], weight, density)
    assert torch.equal(out, same)


@pytest.mark.parametrize("base_dtype,expert_dtypes", [
    (torch.bfloat16, (torch.float16, torch.float32)),
    (torch.float16, (torch.bfloat16, torch.bfloat16)),
    (torch.float32, (torch.bfloat16, torch.float16)),
])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_mixed_dtypes(method, base_dtype, expert_dtypes):
    base, experts = make_group((7, 300), 2, seed=12)
    base = base.to(base_dtype)
    experts = [e.to(d) for e, d in zip(experts, expert_dtypes)]
    weight, density = [0.5, 0.9], 0.3
    out = run_method(method, base, experts, weight, density)
    assert out.dtype == base_dtype
    expected = ref_method(method, base, experts, weight, density)
    check_against_reference(out, expected, base, GTA_METHODS[method][3])
    # out_dtype override: one rounding of the same fp32 result
    for od in (torch.float32, torch.float16, torch.bfloat16):
        o = run_method(method, base, experts, weight, density, out_dtype=od)
        assert o.dtype == od
        check_against_reference(o, expected, base, GTA_METHODS[method][3])


def test_float64_inputs_compute_in_fp32():
    base, experts = make_group((100,), 2, seed=3, dtype=torch.float64)
    out = F.ties(base, experts, [1.0, 1.0], 0.5)
    assert out.dtype == torch.float64
    assert torch.equal(out, ref_method("ties", base, experts, [1.0, 1.0], 0.5).double())


def _same_values(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Elementwise: identical bit patterns, or both zero (the sign of a zero result is not part
    of the contract: mergekit's own linear merge turns -0.0 into +0.0), or both NaN."""
    g16, w16 = got.view(torch.int16), want.view(torch.int16)
    return (g16 == w16) | ((got == 0) & (want == 0)) | (torch.isnan(got) & torch.isnan(want))


@pytest.mark.parametrize("dtype_", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_every_16bit_value_converts_exactly(dtype_):
    """Loading and storing follow the contract: every fp16/bf16 bit pattern (subnormals, inf,
    NaN) loads exactly, and fp32 results round to nearest-even like torch's .to()."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype_)
    out = F.linear([x], 1.0, normalize=False)  # x * 1.0, stored in x's dtype
    bad = (~_same_values(out, x)).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} values differ, e.g. {x[bad[:5]].tolist()} -> {out[bad[:5]].tolist()}"
    up = F.linear([x], 1.0, normalize=False, out_dtype=torch.float32)
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(up), nan)
    assert torch.equal(up[~nan], x[~nan].float())
    # fp32 -> 16-bit rounding over all exponents, ties, subnormals and overflow
    g = torch.Generator().manual_seed(0)
    y = torch.randint(-2**31, 2**31 - 1, (1 << 18,), generator=g, dtype=torch.int64)
    y = y.to(torch.int32).view(torch.float32)
    y = torch.cat([y, torch.tensor([65504.0, 65519.99, 65520.0, 2.0**-25, 2.0**-24 * 1.5,
                                    1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8,
                                    -0.0, float("inf"), float("-inf")])])
    down = F.linear([y], 1.0, normalize=False, out_dtype=dtype_)
    expected = y.to(dtype_)
    bad = (~_same_values(down, expected)).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} roundings differ, e.g. {y[bad[:5]].tolist()}"


# ---------------------------------------------------------------------------------------------
# Large tensors: the sample-window top-k path, heavy ties, an adversarial sample
# ---------------------------------------------------------------------------------------------

LARGE = (600, 700)  # 420000 > 4 * 65536 elements


@pytest.mark.parametrize("method,rescale", [("ties", False), ("ties", True),
                                            ("breadcrumbs_ties", False), ("breadcrumbs", True),
                                            ("dare_ties", True), ("della", True)])
@pytest.mark.parametrize("shape", [LARGE, (LARGE[0] * LARGE[1],)], ids=["2d", "1d"])
def test_large_tensor_matches_reference(method, rescale, shape):
    base, experts = make_group(shape, 2, seed=21, dtype=torch.bfloat16)
    kw = dict(seed=3, name="big") if method in RANDOM_METHODS else {}
    kw["rescale"] = rescale
    out = run_method(method, base, experts, [0.7, 0.5], [0.2, 0.6], **kw)
    expected = ref_method(method, base, experts, [0.7, 0.5], [0.2, 0.6], **kw)
    check_against_reference(out, expected, base, rescale)


@pytest.mark.parametrize("rescale", [False, True])
def test_large_tensor_heavy_ties_keeps_exactly_k_lowest_indices(rescale):
    """bf16 deltas quantised to 1/8: a few dozen distinct magnitudes, so the threshold value is
    shared by tens of thousands of elements. Exactly k are kept, and on the threshold the
    lowest flat indices."""
    g = torch.Generator().manual_seed(5)
    q = torch.round(torch.randn(LARGE, generator=g) * 8) / 8
    q[q == 0] = 0.125  # no zero deltas: kept <=> nonzero
    x = q.to(torch.bfloat16)
    n = x.numel()
    for density in (0.1, 0.37, 0.5):
        k = max(1, int(density * n))
        out = F.generalized_task_arithmetic(None, [x], 1.0, density=density,
                                            sparsification="magnitude", rescale=rescale)
        kept = (out != 0).reshape(-1)
        assert int(kept.sum()) == k, density
        mags = x.float().abs().reshape(-1)
        threshold = float(mags[kept].min())
        assert bool((mags[~kept] <= threshold).all())
        on = (mags == threshold).nonzero().flatten()
        kept_on = kept[on]
        m = int(kept_on.sum())
        assert 0 < m < on.numel(), "threshold group straddles k (test data precondition)"
        assert bool(kept_on[:m].all()) and not bool(kept_on[m:].any()), "not the lowest indices"
        expected = ref_gta(None, [x], 1.0, density=density, sparsification="magnitude",
                           rescale=rescale)
        check_against_reference(out, expected, None, rescale)
        if rescale:  # L1 preserved
            assert math.isclose(float(out.double().abs().sum()), float(x.double().abs().sum()),
                                rel_tol=1e-2)  # bf16 output rounding


@pytest.mark.parametrize("rescale", [False, True])
def test_adversarial_sample_positions(rescale):
    """Every sampled position holds a tiny value, so the sample's window misses the k-th
    element; the exact fallback must still keep the right k (and the right L1)."""
    n = 6 * 65536 + 5
    x = randn((n,), seed=6)
    x[sampled_positions(n)] *= 1e-3
    for density in (0.3, 0.9):
        out = F.generalized_task_arithmetic(None, [x], 1.0, density=density,
                                            sparsification="magnitude", rescale=rescale)
        expected = ref_gta(None, [x], 1.0, density=density, sparsification="magnitude",
                           rescale=rescale)
        check_against_reference(out, expected, None, rescale)
        assert int((out != 0).sum()) == int(density * n)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della"])
@pytest.mark.parametrize("shape", [(4097,), (300, 700)], ids=str)
def test_replayed_random_masks_beside_keep_all_and_drop_all(method, shape):
    """Rescaled random masks are packed in the statistics pass and replayed in the fused merge;
    experts of density 1 (keep all) and 0 (drop all) ride along as constant masks."""
    base, experts = make_group(shape, 4, seed=12, dtype=torch.bfloat16)
    weight, density = [0.7, 0.5, 0.9, 0.4], [0.4, 1.0, 0.0, 0.65]
    kw = dict(seed=9, name="replay", rescale=True)
    if method == "della":
        density = [0.4, 0.99, 0.0, 0.65]  # della needs density +/- epsilon inside (0, 1)
        kw["epsilon"] = 0.005
    out = run_method(method, base, experts, weight, density, **kw)
    expected = ref_method(method, base, experts, weight, density, **kw)
    check_against_reference(out, expected, base, True, msg=method)


@pytest.mark.parametrize("rescale", [False, True])
def test_biased_samples_retry_one_side_per_expert(rescale):
    """Each expert's sampled elements are scaled a few percent (one down, one up), so both first
    windows miss, on opposite sides; each is retried over its side alone. The merge, and with
    rescale the L1 each retry gathers, still match the reference."""
    n = 6 * 65536 + 5
    base, experts = make_group((n,), 2, seed=8)
    sampled = sampled_positions(n)
    for expert, factor in zip(experts, (0.96, 1.03)):
        expert[sampled] = base[sampled] + (expert[sampled] - base[sampled]) * factor
    before = window_misses()
    out = F.ties(base, experts, [0.6, 0.8], 0.4, rescale=rescale)
    assert misses_since(before) == {"retried": 2, "rescanned_whole": 0}
    expected = ref_method("ties", base, experts, [0.6, 0.8], 0.4, rescale=rescale)
    check_against_reference(out, expected, base, rescale)


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ALL_METHODS + ["linear"])
def test_same_result_for_1_and_2_threads(method, restore_threads):
    base, experts = make_group((300, 1000), 2, seed=31)  # > 4 chunks, sample-window path
    def merge():
        if method == "linear":
            return F.linear(experts, [0.3, 0.7])
        kw = dict(seed=4, name="t") if method in RANDOM_METHODS else {}
        return run_method(method, base, experts, [0.8, 0.5], 0.3, **kw)
    restore_threads(1)
    one = merge()
    restore_threads(2)
    two = merge()
    assert torch.equal(one, two)


# ---------------------------------------------------------------------------------------------
# mergekit 0.1.5, fp32, tie-free inputs
# ---------------------------------------------------------------------------------------------

MERGEKIT_CASES = [
    ("task_arithmetic", dict()),
    ("task_arithmetic", dict(normalize=True, lambda_=0.8)),
    ("ties", dict(density=0.3)),
    ("ties", dict(density=[0.2, 0.5, 0.9], normalize=False, lambda_=1.3)),
    ("ties", dict(density=0.3, rescale=True)),
    ("breadcrumbs", dict(density=0.3, gamma=0.05)),
    ("breadcrumbs", dict(density=[0.1, 0.9, 0.5], gamma=[0.0, 0.05, 0.3], normalize=True)),
    ("breadcrumbs", dict(density=[0.8, 1.0, 0.02], gamma=[0.5, 0.2, 1.0])),  # n_bot = 0 cases
    ("breadcrumbs_ties", dict(density=0.3, gamma=0.05, lambda_=0.5)),
    ("breadcrumbs_ties", dict(density=0.4, gamma=0.02, rescale=True)),
]


@pytest.mark.parametrize("method,params", MERGEKIT_CASES)
@pytest.mark.parametrize("shape", [(4097,), (3, 5, 7), (64, 300)], ids=str)
def test_deterministic_methods_match_mergekit_fp32(method, params, shape):
    pytest.importorskip("mergekit")
    base, experts = make_group(shape, 3, seed=40)
    weight = [0.5, 1.0, -0.7]
    params = dict(params)
    density = params.pop("density", None)
    expected = mergekit_merge(method, [base] + experts, mergekit_params(
        method, weight, density, gamma=params.get("gamma"), lambda_=params.get("lambda_"),
        normalize=params.get("normalize"), rescale=params.get("rescale")))
    out = run_method(method, base, experts, weight, density, **params)
    tol = "mergekit_reduction" if params.get("rescale") else "mergekit_exact"
    ambiguous = None
    if params.get("rescale"):
        ambiguous = getattr(ref_method(method, base, experts, weight, density,
                                       **{k: v for k, v in params.items() if k != "lambda_"},
                                       lambda_=params.get("lambda_", 1.0)),
                            "vote_ambiguous", None)
    assert_close(out, expected, tol, exclude=ambiguous)


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("sparsification", [None, "magnitude", "magnitude_outliers"])
@pytest.mark.parametrize("normalize", [False, True])
def test_generalized_consensus_matches_mergekit_fp32(consensus, sparsification, normalize):
    pytest.importorskip("mergekit")
    base, experts = make_group((37, 41), 4, seed=41)
    weight, density = [0.5, 1.0, 0.7, -0.2], [0.3, 0.6, 0.5, 0.9]
    method = mergekit_gta(consensus, sparsification, normalize, False)
    p = {"weight": weight, "density": density, "lambda": 0.9}
    if sparsification == "magnitude_outliers":
        p["gamma"] = 0.03
    expected = mergekit_merge(method, [base] + experts, p)
    out = F.generalized_task_arithmetic(base, experts, weight, density=density, gamma=0.03,
                                        sparsification=sparsification, consensus=consensus,
                                        normalize=normalize, lambda_=0.9)
    assert_close(out, expected, "mergekit_exact")


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_matches_mergekit_fp32(normalize):
    pytest.importorskip("mergekit")
    _, experts = make_group((64, 129), 3, seed=42)
    weight = [0.2, 0.5, 0.6]
    expected = mergekit_merge("linear", experts, {"weight": weight, "normalize": normalize},
                              base_index=None)
    out = F.linear(experts, weight, normalize=normalize)
    # mergekit's addcmul_ may fuse multiply and add: see the tolerance table
    assert_close(out, expected, "mergekit_reduction")


def test_wrapper_defaults_match_mergekit_registry():
    pytest.importorskip("mergekit")
    import inspect

    from mergekit import merge_methods

    for method, (_, _, normalize, rescale) in GTA_METHODS.items():
        spec = {p.name: p.default for p in merge_methods.get(method).spec.parameters}
        assert spec["normalize"] == normalize and spec["rescale"] == rescale, method
        sig = inspect.signature(getattr(F, method)).parameters
        assert sig["normalize"].default == spec["normalize"], method
        if "rescale" in sig:
            assert sig["rescale"].default == spec["rescale"], method
        for name in ("gamma", "epsilon"):
            if name in spec:
                assert sig[name].default == spec[name], (method, name)


# ---------------------------------------------------------------------------------------------
# bf16 accuracy vs an fp32 oracle
# ---------------------------------------------------------------------------------------------

def _threshold_ks(method, n, density, gamma):
    if method in ("ties",):
        return [max(1, int(density * n))]
    if method.startswith("breadcrumbs"):
        target = int(density * n)
        n_bot = max(0, n - target - int(gamma * n))
        return [n - n_bot, n - n_bot - target]
    return []


BF16_CASES = [
    ("task_arithmetic", dict()),
    ("ties", dict(density=0.3)),
    ("ties", dict(density=0.3, rescale=True)),
    ("breadcrumbs", dict(density=0.3, gamma=0.05)),
    ("breadcrumbs_ties", dict(density=0.3, gamma=0.05)),
]


@pytest.mark.parametrize("method,params", BF16_CASES)
def test_bf16_within_rounding_floor_of_fp32_oracle(method, params, record_property):
    """Ours in bf16 vs mergekit run on fp32 copies of the same bf16 inputs. Threshold ties are
    nudged away first so that every tie-breaking rule selects the same elements."""
    pytest.importorskip("mergekit")
    base, experts = make_group((64, 64), 3, seed=50, dtype=torch.bfloat16, base_scale=0.02,
                               delta_scale=0.01)
    n = base.numel()
    density, gamma = params.get("density", 1.0), params.get("gamma", 0.01)
    ks = _threshold_ks(method, n, density, gamma)
    experts = nudge_threshold_ties(base, experts, [ks] * len(experts))
    weight = [0.5, 1.0, 0.7]
    p = mergekit_params(method, weight, params.get("density"), gamma=params.get("gamma"),
                        rescale=params.get("rescale"))
    oracle = mergekit_merge(method, [base.float()] + [e.float() for e in experts], p)
    kw = {k: v for k, v in params.items() if k != "density"}
    ours = run_method(method, base, experts, weight, params.get("density"), **kw)
    theirs = mergekit_merge(method, [base] + experts, p)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    floor, ours_err = bf16_errors(f"{method} {params}", ours, theirs, oracle, base, record_property)
    assert ours_err <= BF16_FLOOR_FACTOR * floor


def test_bf16_linear_within_rounding_floor(record_property):
    pytest.importorskip("mergekit")
    _, experts = make_group((64, 64), 3, seed=51, dtype=torch.bfloat16, base_scale=0.02,
                            delta_scale=0.01)
    weight = [0.3, 0.3, 0.4]
    oracle = mergekit_merge("linear", [e.float() for e in experts], {"weight": weight},
                            base_index=None)
    ours = F.linear(experts, weight)
    theirs = mergekit_merge("linear", experts, {"weight": weight}, base_index=None)
    floor, ours_err = bf16_errors("linear", ours, theirs, oracle, None, record_property)
    assert ours_err <= BF16_FLOOR_FACTOR * floor


# ---------------------------------------------------------------------------------------------
# Random methods vs mergekit, by distribution
# ---------------------------------------------------------------------------------------------

def _della_probs(shape, x, density, epsilon):
    """DELLA keep probabilities from ranks along dim 1 (computed with argsort here)."""
    rows = x.reshape(shape[0], shape[1])
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double()  # 0 = smallest (tie-free data)
    return (density - epsilon) + ranks / (shape[1] - 1) * 2 * epsilon


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.8])
def test_kept_fraction_within_binomial_bound(method, density):
    shape = (200, 1000)
    x = randn(shape, seed=60)  # no zeros, tie-free
    zero = torch.zeros(shape)
    eps = min(0.15, density / 2, (1 - density) / 2)
    if method == "dare_linear":
        probs = torch.full((x.numel(),), density, dtype=torch.float64)
        kw, mk = {}, {}
    else:
        probs = _della_probs(shape, x, density, eps).reshape(-1)
        kw, mk = dict(epsilon=eps), dict(epsilon=eps)
    ours = run_method(method, zero, [x], 1.0, density, rescale=False, seed=8, name="k", **kw)
    kept = (ours != 0).reshape(-1)
    bound = binomial_bound(probs)
    assert abs(int(kept.sum()) - float(probs.sum())) <= bound
    if method == "della_linear":  # larger magnitudes are kept more often, by the rank formula
        top = (x.abs() >= x.abs().median(dim=1, keepdim=True).values).reshape(-1)
        for part in (top, ~top):
            assert abs(int(kept[part].sum()) - float(probs[part].sum())) <= binomial_bound(probs[part])
    if pytest.importorskip("mergekit"):
        torch.manual_seed(0)
        theirs = mergekit_merge(method, [zero, x], {"weight": 1.0, "density": density,
                                                     "rescale": False, **mk})
        assert abs(int((theirs != 0).sum()) - float(probs.sum())) <= bound


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_rescale_preserves_l1(method):
    shape = (100, 1000)
    x = randn(shape, seed=61)
    zero = torch.zeros(shape)
    for density in (0.05, 0.3, 0.9):
        kw = dict(epsilon=min(0.1, density / 2, (1 - density) / 2)) if method == "della_linear" else {}
        ours = run_method(method, zero, [x], 1.0, density, seed=2, name="l1", **kw)
        assert int((ours != 0).sum()) < x.numel()
        assert math.isclose(float(ours.double().abs().sum()), float(x.double().abs().sum()),
                            rel_tol=1e-5)
    # single-tensor dare_drop too
    d = F.dare_drop(x, 0.2, seed=1, name="l1")
    assert math.isclose(float(d.double().abs().sum()), float(x.double().abs().sum()), rel_tol=1e-5)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_merge_moments_match_mergekit(method):
    """Mean and mean square of the merged delta: ours vs mergekit's, each an average of n
    independent elements; bound = SIGMAS standard deviations estimated from the data."""
    pytest.importorskip("mergekit")
    from conftest import SIGMAS

    shape = (400, 1000)
    base, experts = make_group(shape, 3, seed=62, delta_scale=1.0)
    experts = [e + 0.3 for e in experts]  # deltas with a nonzero mean
    weight, density = [0.5, 1.0, 0.7], 0.4
    kw = dict(epsilon=0.1) if method.startswith("della") else {}
    ours = run_method(method, base, experts, weight, density, seed=9, name="m", **kw) - base
    torch.manual_seed(1)
    theirs = mergekit_merge(method, [base] + experts,
                            mergekit_params(method, weight, density, **kw)) - base
    n = ours.numel()
    a, b = ours.double().reshape(-1), theirs.double().reshape(-1)
    # E[m^2] >= Var[m] for every element: a conservative standard deviation of the mean
    sd_mean = math.sqrt(float((a * a).sum() + (b * b).sum())) / n
    assert abs(float(a.mean() - b.mean())) <= SIGMAS * sd_mean, (float(a.mean()), float(b.mean()))
    sd_sq = math.sqrt(float((a ** 4).sum() + (b ** 4).sum())) / n
    assert abs(float((a * a).mean() - (b * b).mean())) <= SIGMAS * sd_sq
    # DARE's constant keep probability with L1 rescale is unbiased: the mean is the weighted mean
    # delta (DELLA is not: it keeps large magnitudes more often)
    expected = sum(w * float((e.double() - base.double()).mean()) for w, e in zip(weight, experts))
    if method == "dare_linear":
        assert abs(float(a.mean()) - expected) <= SIGMAS * sd_mean


# ---------------------------------------------------------------------------------------------
# Empty tensors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0), (2, 0, 3)], ids=str)
def test_empty_tensors(shape):
    """torch gives contiguous empty tensors strides like (1, 1) for shape (4, 0)."""
    base = torch.empty(shape)
    for method in ALL_METHODS:
        out = run_method(method, base, [torch.empty(shape)] * 2, [1.0, 1.0], 0.5)
        assert out.shape == shape and out.dtype == base.dtype, method
    assert F.linear([base, base], [1.0, 1.0]).shape == shape


# ---------------------------------------------------------------------------------------------
# Property tests (hypothesis): ties, dare vs reference
# ---------------------------------------------------------------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_shapes = st.lists(st.integers(1, 12), min_size=0, max_size=3)
_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
_weights = st.floats(-2.0, 2.0, allow_nan=False, width=32)


@given(shape=_shapes, experts=st.integers(1, 4), data=st.data(),
       dtypes=st.lists(_dtypes, min_size=5, max_size=5), quantise=st.booleans(),
       normalize=st.booleans(), consensus=st.sampled_from(["sum", "count"]),
       lambda_=st.sampled_from([1.0, 0.5, 2.0]), seed=st.integers(0, 2**16))
def test_property_ties_matches_reference(shape, experts, data, dtypes, quantise, normalize,
                                         consensus, lambda_, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    ex = [base + torch.randn(shape, generator=g) for _ in range(experts)]
    if quantise:  # many equal magnitudes and exact zeros
        base = torch.round(base * 2) / 2
        ex = [torch.round(e * 2) / 2 for e in ex]
    base = base.to(dtypes[0])
    ex = [e.to(d) for e, d in zip(ex, dtypes[1:])]
    weight = data.draw(st.lists(_weights, min_size=experts, max_size=experts), label="weight")
    density = data.draw(st.lists(st.floats(0.0, 1.0), min_size=experts, max_size=experts),
                        label="density")
    out = F.ties(base, ex, weight, density, normalize=normalize, consensus=consensus,
                 lambda_=lambda_)
    expected = ref_gta(base, ex, weight, density=density, sparsification="magnitude",
                       consensus=consensus, normalize=normalize, lambda_=lambda_)
    check_against_reference(out, expected, base, False)


@given(shape=_shapes, experts=st.integers(1, 3), data=st.data(), dtype=_dtypes,
       linear=st.booleans(), seed=st.integers(0, 2**64 - 1), name=st.text(max_size=8))
def test_property_dare_matches_reference(shape, experts, data, dtype, linear, seed, name):
    g = torch.Generator().manual_seed(seed % 2**32)
    base = torch.randn(shape, generator=g).to(dtype)
    ex = [(base.float() + torch.randn(shape, generator=g)).to(dtype) for _ in range(experts)]
    weight = data.draw(st.lists(_weights, min_size=experts, max_size=experts), label="weight")
    density = data.draw(st.lists(st.floats(0.0, 1.0), min_size=experts, max_size=experts),
                        label="density")
    fn = F.dare_linear if linear else F.dare_ties
    # without rescale the result is bit-exact; with it, within the L1-reduction tolerance
    out = fn(base, ex, weight, density, seed=seed, name=name, rescale=False)
    expected = ref_gta(base, ex, weight, density=density, sparsification="random",
                       consensus=None if linear else "sum", seed=seed, name=name)
    check_against_reference(out, expected, base, False)
    out = fn(base, ex, weight, density, seed=seed, name=name)
    expected = ref_gta(base, ex, weight, density=density, sparsification="random",
                       consensus=None if linear else "sum", rescale=True, seed=seed, name=name)
    check_against_reference(out, expected, base, True)


# ---------------------------------------------------------------------------------------------
# PEFT's merge_utils conventions (options; defaults stay mergekit's)
# ---------------------------------------------------------------------------------------------

def ref_options(base, experts, weight, **kw):
    """The reference with every option, through the same argument checks as the op."""
    from fastmerge._params import gta_arguments

    args = gta_arguments(len(experts), (base if base is not None else experts[0]).shape,
                         weight=weight, **kw)
    args.pop("kernel")
    return R.generalized_task_arithmetic(base, list(experts), **args)


@pytest.mark.parametrize("with_base", [False, True], ids=["no_base", "base"])
@pytest.mark.parametrize("rescale", [False, "density"])
@pytest.mark.parametrize("normalize", ["count", "weights"])
@pytest.mark.parametrize("sign_from", ["weighted", "unweighted"])
@pytest.mark.parametrize("consensus", [None, "sum", "count"])
@pytest.mark.parametrize("sparsification", [None, "magnitude", "random"])
def test_peft_options_match_reference(sparsification, consensus, sign_from, normalize, rescale,
                                      with_base):
    base, experts = make_group((13, 29, 3), 3, seed=41)
    base = base if with_base else None
    weight = [0.9, -0.4, 0.0]  # negative and zero weights: weighted and unweighted votes differ
    kw = dict(density=[0.25, 0.6, 0.45], sparsification=sparsification, consensus=consensus,
              sign_from=sign_from, normalize=normalize, rescale=rescale, min_keep=0, seed=5,
              name="peft")
    out = F.generalized_task_arithmetic(base, experts, weight, **kw)
    expected = ref_options(base, experts, weight, **kw)
    check_against_reference(out, expected, base, False)


@pytest.mark.parametrize("shape", ODD_SHAPES + [(64, 1000)], ids=str)
def test_peft_ties_options_match_reference_in_every_dtype(shape, dtype):
    _, experts = make_group(shape, 4, seed=42, dtype=dtype)
    for sparsification, rescale in (("magnitude", False), ("random", "density")):
        kw = dict(density=0.3, sparsification=sparsification, consensus="sum",
                  sign_from="unweighted", normalize="count", rescale=rescale, min_keep=0, seed=9)
        out = F.generalized_task_arithmetic(None, experts, [0.7, 1.2, -0.3, 0.5], **kw)
        expected = ref_options(None, experts, [0.7, 1.2, -0.3, 0.5], **kw)
        check_against_reference(out, expected, None, False, msg=sparsification)


def test_min_keep_is_the_top_k_floor():
    x = torch.arange(1, 51, dtype=torch.float32)  # |x| distinct: the top k are the last k
    for density, min_keep, kept in ((0.01, 1, 1), (0.01, 0, 0), (0.05, 0, 2), (0.05, 5, 5),
                                    (0.5, 0, 25), (0.5, 60, 50)):
        out = F.generalized_task_arithmetic(None, [x], 1.0, density=density,
                                            sparsification="magnitude", min_keep=min_keep)
        assert int((out != 0).sum()) == kept, (density, min_keep)
        assert torch.equal(out[50 - kept:], x[50 - kept:])


def test_unweighted_sign_election_and_count_divisor_by_hand():
    s = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([-0.6, 1.0, 2.0]), torch.tensor([0.0, 0.0, -0.5])]
    w = [0.2, -1.0, 3.0]
    def merge(**kw):
        return F.generalized_task_arithmetic(None, s, w, consensus="sum", **kw).tolist()
    # weighted votes (mergekit): v = [0.2, 0.6, 0] / [0.2, -1, 0] / [0.2, -2, -1.5] elect
    # + / - / -, and the divisor is the agreeing weights' signed sum
    assert merge(normalize=True) == pytest.approx([0.8 / (0.2 - 1.0), -1.0 / -1.0, -3.5 / 2.0])
    # unweighted votes (PEFT): s sums [0.4, 2, 2.5] all elect +; agreeing s > 0, summed as s * w
    assert merge(sign_from="unweighted", normalize="count") == pytest.approx(
        [0.2 / 1, (0.2 - 1.0) / 2, (0.2 - 2.0) / 2])
    assert merge(sign_from="unweighted", normalize=True) == pytest.approx(
        [0.2 / 0.2, (0.2 - 1.0) / (0.2 - 1.0), (0.2 - 2.0) / (0.2 - 1.0)])
    # count divisor with weighted votes: divide by how many agree, not by their weights
    assert merge(normalize="count") == pytest.approx([0.8 / 2, -1.0 / 1, -3.5 / 2])
    # without consensus, "count" divides by the number of experts
    out = F.generalized_task_arithmetic(None, s, w, normalize="count")
    assert out.tolist() == pytest.approx([(0.2 + 0.6) / 3, (0.2 - 1.0) / 3, (0.2 - 2.0 - 1.5) / 3])


def test_density_rescale_divides_kept_values_by_density():
    x = randn((100, 37), seed=43)
    out = F.generalized_task_arithmetic(None, [x], 1.0, density=0.3, sparsification="random",
                                        rescale="density", seed=11)
    kept = out != 0
    assert torch.equal(out[kept], x[kept] * torch.tensor(1.0 / 0.3, dtype=torch.float32))
    plain = F.generalized_task_arithmetic(None, [x], 1.0, density=0.3, sparsification="random",
                                          seed=11)
    assert torch.equal(kept, plain != 0)  # the same mask: only the scale differs
    # magnitude top-k scales too; no mask (density 1) means no rescale
    top = F.generalized_task_arithmetic(None, [x], 1.0, density=0.3, sparsification="magnitude",
                                        rescale="density")
    assert torch.equal(top[top != 0], x[top != 0] * torch.tensor(1.0 / 0.3))
    assert torch.equal(F.generalized_task_arithmetic(None, [x], 1.0, density=1.0,
                                                     sparsification="random", rescale="density"), x)


@pytest.mark.parametrize("sparsification", ["magnitude", "random"])
def test_peft_options_same_result_for_1_and_2_threads(sparsification, restore_threads):
    _, experts = make_group((300, 1000), 3, seed=44)
    def merge():
        return F.generalized_task_arithmetic(
            None, experts, [0.5, -0.2, 1.0], density=0.2, sparsification=sparsification,
            consensus="count", sign_from="unweighted", normalize="count", min_keep=0,
            rescale="density" if sparsification == "random" else False, seed=3)
    restore_threads(1)
    one = merge()
    restore_threads(2)
    assert torch.equal(one, merge())


@pytest.mark.parametrize("kw", [dict(sign_from="both"), dict(normalize="mean"),
                                dict(rescale="l2"), dict(min_keep=-1), dict(min_keep=0.5)],
                         ids=str)
def test_peft_option_values_are_checked(kw):
    with pytest.raises(fastmerge.InvalidArgumentError):
        F.generalized_task_arithmetic(None, [torch.ones(3)], 1.0, **kw)


# ---- majority_sign_mask and disjoint_merge on stacked tensors ----

STACKED_SHAPES = [(1,), (3,), (2, 4097), (4, 5, 7), (3, 1, 1), (0, 5), (2, 0)]


@pytest.mark.parametrize("shape", STACKED_SHAPES, ids=str)
@pytest.mark.parametrize("method", ["sum", "count"])
def test_majority_sign_mask_matches_reference(shape, method, dtype):
    x = randn(shape, seed=45, dtype=dtype)
    if x.numel() > 3:
        x.view(-1)[:3] = 0.0  # zeros never agree
    mask = F.majority_sign_mask(x, method)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert torch.equal(mask, R.majority_sign_mask(x, method))


@pytest.mark.parametrize("shape", STACKED_SHAPES, ids=str)
def test_disjoint_merge_matches_reference(shape, dtype):
    x = randn(shape, seed=46, dtype=dtype)
    mask = randn(shape, seed=47) > 0.3
    out = F.disjoint_merge(x, mask)
    assert out.dtype == dtype and out.shape == x.shape[1:]
    assert torch.equal(out, R.disjoint_merge(x, mask).to(dtype))
    assert torch.equal(F.disjoint_merge(x, mask, out_dtype=torch.float32), R.disjoint_merge(x, mask))


def test_sign_mask_and_disjoint_merge_by_hand_and_non_finite():
    x = torch.tensor([[1.0, -2.0, 0.0, float("nan"), float("inf")],
                      [-3.0, 1.0, 0.0, 1.0, 1.0],
                      [1.0, 0.5, -1.0, 1.0, float("-inf")]])
    total = F.majority_sign_mask(x, "sum")
    # votes: -1 (-), -0.5 (-), -1 (-), NaN (-), NaN (-)
    assert total.tolist() == [[False, True, False, False, False],
                              [True, False, False, False, False],
                              [False, False, True, False, True]]
    frequency = F.majority_sign_mask(x, "count")
    # sign counts: 1 (+), 0 (+), -1 (-); torch.sign(NaN) is NaN, so the vote of column 3 is NaN
    assert frequency[:, :3].tolist() == [[True, False, False], [False, True, False],
                                         [True, True, True]]
    assert frequency.tolist() == R.majority_sign_mask(x, "count").tolist()
    merged = F.disjoint_merge(x, total)
    # masked-out NaN and inf times 0 are NaN, as PEFT's x * mask gives
    assert merged[:3].tolist() == [-3.0, -2.0, -1.0]
    assert math.isnan(merged[3]) and math.isnan(merged[4])


def test_stacked_ops_non_contiguous_and_threads(restore_threads):
    x = randn((700, 3, 300), seed=48).transpose(0, 1)  # (3, 700, 300), non-contiguous
    mask = randn((3, 700, 300), seed=49) > 0
    restore_threads(1)
    one = (F.majority_sign_mask(x, "sum"), F.disjoint_merge(x, mask))
    restore_threads(2)
    two = (F.majority_sign_mask(x, "sum"), F.disjoint_merge(x, mask))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.equal(one[0], R.majority_sign_mask(x, "sum"))
    assert torch.equal(one[1], R.disjoint_merge(x, mask))


def test_stacked_ops_check_arguments():
    with pytest.raises(fastmerge.InvalidArgumentError):
        F.majority_sign_mask(torch.tensor(1.0))
    with pytest.raises(fastmerge.InvalidArgumentError):
        F.majority_sign_mask(torch.ones(2, 3), "total")
    with pytest.raises(fastmerge.InvalidArgumentError):
        F.disjoint_merge(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(fastmerge.InvalidArgumentError):
        F.disjoint_merge(torch.ones(2, 3), torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# out=: the result written into a caller's tensor
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ALL_METHODS)
def test_out_receives_the_same_result(method, device):
    # Large enough for the sample-window top-k, the streaming store and several chunks.
    base, ex = make_group((700, 1031), 3, seed=31, dtype=torch.bfloat16, device=device)
    weight, density = [0.5, 0.3, 0.2], 0.4
    fresh = run_method(method, base, ex, weight, density)
    out = torch.full_like(fresh, float("nan"))
    returned = run_method(method, base, ex, weight, density, out=out)
    assert returned is out
    assert torch.equal(out, fresh)


@pytest.mark.parametrize("layout", ["transposed", "float32", "float64"])
def test_out_of_another_layout_or_dtype(layout, device):
    base, ex = make_group((40, 70), 3, seed=32, device=device)
    weight = [0.2, 0.5, 0.3]
    if layout == "transposed":
        out = torch.empty(70, 40, device=device).t()
        expected = F.ties(base, ex, weight, 0.3)
    else:
        dtype = torch.float32 if layout == "float32" else torch.float64
        out = torch.empty(40, 70, dtype=dtype, device=device)
        base, ex = base.to(torch.bfloat16), [e.to(torch.bfloat16) for e in ex]
        expected = F.ties(base, ex, weight, 0.3, out_dtype=dtype)
    assert F.ties(base, ex, weight, 0.3, out=out) is out
    assert out.dtype == expected.dtype and torch.equal(out, expected)


def test_out_matches_mergekit_on_tie_free_data():
    pytest.importorskip("mergekit")
    base, ex = make_group((64, 129), 3, seed=33)
    out = torch.empty_like(base)
    F.ties(base, ex, [0.3, 0.3, 0.4], 0.5, out=out)
    expected = mergekit_merge("ties", [base] + ex, {"weight": [0.3, 0.3, 0.4], "density": 0.5})
    assert torch.equal(out, expected.to(out.dtype))


@pytest.mark.parametrize("case", ["base", "expert_view", "shape", "dtype_clash", "grad", "type"])
def test_bad_out_names_the_problem(case):
    base, ex = make_group((16, 8), 2, seed=34)
    kwargs = {}
    if case == "base":
        kwargs["out"], words = base, "overlaps base"
    elif case == "expert_view":
        kwargs["out"], words = ex[1][:, :], "overlaps experts[1]"
    elif case == "shape":
        kwargs["out"], words = torch.empty(8, 16), "shape (8, 16)"
    elif case == "dtype_clash":
        kwargs["out"], kwargs["out_dtype"], words = torch.empty(16, 8), torch.bfloat16, "disagrees"
    elif case == "grad":
        kwargs["out"], words = torch.empty(16, 8, requires_grad=True), "requires grad"
    else:
        kwargs["out"], words = [0.0] * 128, "must be a torch.Tensor"
    with pytest.raises(fastmerge.FastmergeError, match=re.escape(words)):
        F.ties(base, ex, [0.5, 0.5], 0.5, **kwargs)


def test_out_disjoint_views_of_one_buffer_are_allowed():
    base, ex = make_group((16, 8), 2, seed=35)
    buffer = torch.empty(2, 16, 8)
    F.ties(base, ex, [0.5, 0.5], 0.5, out=buffer[0])
    F.task_arithmetic(base, ex, [0.5, 0.5], out=buffer[1])
    assert torch.equal(buffer[0], F.ties(base, ex, [0.5, 0.5], 0.5))
    assert torch.equal(buffer[1], F.task_arithmetic(base, ex, [0.5, 0.5]))


@pytest.mark.parametrize("offset", [0, 3])
def test_large_outputs_match_small_ones(offset):
    """Outputs of 8 MiB and more are written with non-temporal stores (where 64-byte aligned:
    offset 3 is not); an elementwise merge must equal the same merge done in small pieces."""
    base, ex = make_group((2400, 1000), 3, seed=36)
    weight = [0.2, 0.5, 0.3]
    buffer = torch.full((base.numel() + 16,), float("nan"))
    out = buffer[offset:offset + base.numel()].view(base.shape)
    F.task_arithmetic(base, ex, weight, out=out)
    pieces = [F.task_arithmetic(base[r:r + 100], [e[r:r + 100] for e in ex], weight)
              for r in range(0, 2400, 100)]
    assert torch.equal(out, torch.cat(pieces))
    assert torch.isnan(buffer[:offset]).all() and torch.isnan(buffer[offset + base.numel():]).all()


@pytest.mark.parametrize("shape", [(300, 1001), (70001,), (4097,)])
def test_rescaled_drop_keeps_the_same_elements_as_plain_drop(shape):
    """With the L1 rescale, the statistics pass draws the keep decisions and the merge pass
    reuses them (packed as bits); without it, the merge pass draws them itself. Both must keep
    the same elements, across chunks and a partial last word."""
    x = randn(shape, seed=37, dtype=torch.bfloat16)
    x[x == 0] = 1.0
    plain = F.dare_drop(x, 0.3, seed=5, name="w", rescale=False, out_dtype=torch.float32)
    rescaled = F.dare_drop(x, 0.3, seed=5, name="w", rescale=True, out_dtype=torch.float32)
    assert torch.equal(plain != 0, rescaled != 0)
    kept = plain != 0
    scale = x.float().abs().sum() / plain.abs().sum()
    assert_close(rescaled[kept], plain[kept] * scale, "l1_rescale", scale=float(rescaled.abs().max()))
    base, ex = make_group(shape, 3, seed=38, dtype=torch.bfloat16)  # and within a merge
    merged = F.dare_linear(base, ex, [0.2, 0.3, 0.5], 0.4, seed=9, name="m")
    expected = ref_method("dare_linear", base, ex, [0.2, 0.3, 0.5], 0.4, seed=9, name="m")
    check_against_reference(merged, expected, base, rescale=True)


@pytest.mark.parametrize("shape", [(40, 1024), (40, 1000), (6, 64, 3)])
def test_rescaled_della_keeps_the_same_elements_as_plain_della(shape):
    """DELLA's keep decisions are packed by the statistics pass when every rank slab starts on
    a 64-element word ((40, 1024), (6, 64, 3)), and drawn again by the merge pass otherwise."""
    base, ex = make_group(shape, 2, seed=39, dtype=torch.bfloat16)
    weight = [0.6, 0.4]
    kept = []
    for rescale in (False, True):
        for e in range(2):  # one expert at a time: its kept deltas are the nonzero ones
            merged = F.della_linear(base, [ex[e]], [weight[e]], 0.4, epsilon=0.1, seed=4, name="d",
                                    rescale=rescale, out_dtype=torch.float32)
            kept.append(merged != base.float())
    assert all(torch.equal(kept[e], kept[2 + e]) for e in range(2))
    merged = F.della(base, ex, weight, 0.4, epsilon=0.1, seed=4, name="d")
    expected = ref_method("della", base, ex, weight, 0.4, epsilon=0.1, seed=4, name="d")
    check_against_reference(merged, expected, base, rescale=True)


@given(method=st.sampled_from(ALL_METHODS), shape=_shapes, experts=st.integers(1, 4),
       data=st.data(), dtype=_dtypes, gamma=st.sampled_from([0.0, 0.01, 0.2]),
       epsilon=st.sampled_from([0.0, 0.05, 0.15]), seed=st.integers(0, 2**32 - 1),
       name=st.text(max_size=6))
def test_property_every_gta_method_matches_reference(method, shape, experts, data, dtype, gamma,
                                                     epsilon, seed, name):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    ex = [(base + torch.randn(shape, generator=g)).to(dtype) for _ in range(experts)]
    base = base.to(dtype)
    weight = data.draw(st.lists(_weights, min_size=experts, max_size=experts), label="weight")
    density = data.draw(st.lists(st.floats(0.0, 1.0), min_size=experts, max_size=experts),
                        label="density")
    kw = {}
    if method in RANDOM_METHODS:
        kw.update(seed=seed, name=name)
    if method.startswith("breadcrumbs"):
        kw.update(gamma=gamma)
    if method.startswith("della"):
        kw.update(epsilon=epsilon)
    try:
        expected = ref_method(method, base, ex, weight, density, **kw)
    except (fastmerge.InvalidArgumentError, ValueError):  # e.g. della's density +- epsilon outside [0, 1]
        with pytest.raises(fastmerge.InvalidArgumentError):
            run_method(method, base, ex, weight, density, **kw)
        return
    out = run_method(method, base, ex, weight, density, **kw)
    check_against_reference(out, expected, base, GTA_METHODS[method][3], msg=method)
