"""ram, ramplus_tl, sce and arcee_fusion against mergekit 0.1.5, the torch reference and edge
cases (deltas at epsilon, identical experts, sign conflicts, ties, large tensors)."""
from __future__ import annotations

import warnings

import pytest
import torch

import fastmerge
import fastmerge.ops as F
from fastmerge import _native
from fastmerge.errors import InvalidArgumentError
from fastmerge.ops import _reference as R

from conftest import BF16_FLOOR_FACTOR
from helpers import assert_close, bf16_errors, make_group, mergekit_merge, randn

ODD_SHAPES = [(), (1,), (4097,), (3, 5, 7), (64, 97)]
RAM_PARAMS = [{}, {"epsilon": 0.5}, {"r": 0.7, "alpha": 0.9, "epsilon": 0.3}]


def delta_scale(x, base):
    return float((x.double() - base.double()).abs().max()) if x.numel() else 1.0


def ram_group(shape, experts=3, seed=0, dtype=torch.float32):
    """Deltas ~N(0, 1) with ~40% of each expert's elements exactly unchanged, so that every
    contributor count 0..T occurs; epsilon in RAM_PARAMS splits the rest."""
    base, ex = make_group(shape, experts, seed=seed, dtype=dtype)
    out = []
    for t, e in enumerate(ex):
        keep = randn(shape, seed=seed + 100 + t) > -0.25
        out.append(torch.where(keep, e, base))
    return base, out


# ---------------------------------------------------------------------------------------------
# ram / ramplus_tl
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("params", RAM_PARAMS, ids=str)
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_matches_mergekit_fp32_exactly(method, params, shape):
    pytest.importorskip("mergekit")
    if method == "ram":
        params = {k: v for k, v in params.items() if k == "epsilon"}
    base, ex = ram_group(shape, seed=len(shape))
    want = mergekit_merge(method, [base] + ex, params)
    got = getattr(F, method)(base, ex, **params)
    assert_close(got, want, "mergekit_exact")
    assert_close(got, getattr(R, method)(base, ex, **params), "exact")


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_deltas_at_epsilon(method):
    """|d| > epsilon is strict, in fp32: deltas one ulp either side of fp32(epsilon)."""
    pytest.importorskip("mergekit")
    eps = torch.tensor(1e-5, dtype=torch.float32)
    values = torch.stack([eps, torch.nextafter(eps, torch.tensor(1.0)),
                          torch.nextafter(eps, torch.tensor(0.0)), -eps, 2 * eps, torch.tensor(0.0)])
    base = torch.zeros(6 * 6 * 6)
    grid = torch.cartesian_prod(torch.arange(6), torch.arange(6), torch.arange(6))
    ex = [values[grid[:, t]] for t in range(3)]
    for params in ({}, {"epsilon": 1e-5}):
        want = mergekit_merge(method, [base] + ex, params)
        assert_close(getattr(F, method)(base, ex, **params), want, "mergekit_exact")


def test_ramplus_tl_lambda_cases():
    """No unique elements (rho = shared / eps, clamped to alpha), no shared ones (lambda 1), an
    expert that changes nothing."""
    pytest.importorskip("mergekit")
    base = randn((300,), seed=1)
    d = randn((300,), seed=2)
    cases = [
        [base + d, base + 2 * d],          # everything shared
        [base + d, base.clone()],          # everything unique to expert 0
        [base + d, base + d, base + d],    # identical experts
    ]
    for ex in cases:
        for params in ({}, {"r": 2.0, "alpha": 0.05}):
            want = mergekit_merge("ramplus_tl", [base] + ex, params)
            assert_close(F.ramplus_tl(base, ex, **params), want, "mergekit_exact")
            want = mergekit_merge("ram", [base] + ex, {})
            assert_close(F.ram(base, ex), want, "mergekit_exact")


def test_ram_identical_experts_and_single_expert():
    base, (e,) = make_group((513,), 1, seed=3)
    assert torch.equal(F.ram(base, [e]), e) or torch.allclose(F.ram(base, [e]), e, rtol=0, atol=1e-6)
    # three identical deltas: d/3 summed three times, as mergekit does
    want = (base + (((e - base) / 3) + ((e - base) / 3) + ((e - base) / 3)))
    assert torch.equal(F.ram(base, [e, e, e]), want)


# ---------------------------------------------------------------------------------------------
# sce
# ---------------------------------------------------------------------------------------------

TOPK = [1.0, 0.5, 0.1, 0.0]


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("topk", TOPK)
def test_sce_matches_mergekit_fp32(topk, shape):
    pytest.importorskip("mergekit")
    base, ex = make_group(shape, 3, seed=7 + len(shape), delta_scale=0.01)
    for params in ({"select_topk": topk}, {"select_topk": topk, "int8_mask": True}):
        want = mergekit_merge("sce", [base] + ex, params)
        got = F.sce(base, ex, select_topk=topk)
        # the weights mean(m_i^2) are fp64 sums here, fp32 cascades in mergekit
        assert_close(got, want, "mergekit_reduction")
    assert_close(got, R.sce(base, ex, topk), "exact")


def test_sce_sign_conflicts_and_identical_experts():
    pytest.importorskip("mergekit")
    base = randn((4097,), seed=9)
    d = randn((4097,), seed=10, scale=0.01)
    cases = [
        [base + d, base - d],              # full conflict: the sum is 0 -> +1 wins
        [base + d, base - 2 * d, base + 0.5 * d],
        [base + d, base + d, base + d],    # zero variance: select_topk < 1 keeps nothing
        [base.clone(), base.clone()],      # no change at all: weights 1/N
    ]
    for ex in cases:
        for topk in TOPK:
            want = mergekit_merge("sce", [base] + ex, {"select_topk": topk})
            got = F.sce(base, ex, select_topk=topk)
            assert_close(got, want, "mergekit_reduction")
            assert_close(got, R.sce(base, ex, topk), "exact")


def test_sce_variance_ties_go_to_the_lowest_index():
    """Quantised deltas: many equal variances at the threshold; the reference keeps the lowest
    flat indices and so must the kernel (on the exact and the sampled selection path)."""
    for shape in [(4097,), (600, 1000)]:
        base = torch.zeros(shape)
        ex = [randn(shape, seed=20 + t).mul(2).round().div(64) for t in range(3)]
        for topk in (0.5, 0.3, 0.05):
            assert_close(F.sce(base, ex, select_topk=topk), R.sce(base, ex, topk), "exact")
            keep = R.sce_keep_mask([e - base for e in ex], topk)
            nonzero = int((torch.stack(ex).var(dim=0, unbiased=False) != 0).sum())
            assert int(keep.sum()) == int(nonzero * topk)


def test_sce_large_tensor_sampled_selection():
    base, ex = make_group((700, 1000), 4, seed=11, delta_scale=0.01)
    for topk in (0.9, 0.5, 0.01, 1e-6):
        assert_close(F.sce(base, ex, select_topk=topk), R.sce(base, ex, topk), "exact")


# ---------------------------------------------------------------------------------------------
# arcee_fusion
# ---------------------------------------------------------------------------------------------

def fusion_threshold(importance):
    s = importance.reshape(-1).sort().values
    n = s.numel()
    q1, med, q3 = (s[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    return float(med + 1.5 * (q3 - q1))


@pytest.mark.parametrize("shape", ODD_SHAPES + [(2, 3, 4097)], ids=str)
def test_arcee_fusion_matches_mergekit_fp32(shape):
    """Well-separated models: the KL is far above fp32 noise and the results are identical."""
    pytest.importorskip("mergekit")
    base, (other,) = make_group(shape, 1, seed=12 + len(shape))
    want = mergekit_merge("arcee_fusion", [base, other], {})
    got = F.arcee_fusion(base, other)
    assert_close(got, want, "mergekit_exact")
    assert_close(got, R.arcee_fusion(base, other), "exact")


def test_arcee_fusion_close_models_differ_only_at_the_threshold():
    """Close models: mergekit's fp32 KL carries rounding noise (~1e-3 relative; ours is fp64),
    so elements whose importance lies that close to the threshold may flip, no others."""
    pytest.importorskip("mergekit")
    base, (other,) = make_group((512, 600), 1, seed=13, delta_scale=0.01)
    want = mergekit_merge("arcee_fusion", [base, other], {})
    got = F.arcee_fusion(base, other)
    assert_close(got, R.arcee_fusion(base, other), "exact")
    importance = R.arcee_importance(base, other)
    threshold = fusion_threshold(importance)
    flipped = got != want
    assert int(flipped.sum()) <= got.numel() // 500
    assert bool(((importance[flipped] - threshold).abs() <= 0.05 * threshold).all())
    # where they agree on the mask they agree on the value
    assert torch.equal(got[~flipped], want[~flipped])


def test_arcee_fusion_above_one_million_matches_mergekit_in_distribution():
    """Above 1e6 elements mergekit's quantiles come from a random sample of 1e6 (with
    replacement); ours are the exact order statistics. Thresholds and kept sets agree closely."""
    pytest.importorskip("mergekit")
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion, _compute_importance

    base, (other,) = make_group((1100, 1000), 1, seed=14)
    got = F.arcee_fusion(base, other)
    importance = R.arcee_importance(base, other)
    ours_threshold = fusion_threshold(importance)
    kept = importance >= ours_threshold
    assert torch.equal(got, base + (other - base) * kept)
    torch.manual_seed(0)
    mk_importance = _compute_importance(other, base)
    _, theirs_threshold = DynamicThresholdFusion().compute_fusion_mask(mk_importance)
    theirs_kept = mk_importance >= theirs_threshold
    assert abs(float(theirs_threshold) / ours_threshold - 1) < 0.01
    n = got.numel()
    assert abs(int(kept.sum()) - int(theirs_kept.sum())) < 0.002 * n
    assert int((kept != theirs_kept).sum()) < 0.002 * n


def test_arcee_fusion_ties_and_degenerate_inputs():
    # equal models: KL 0, importance 0 everywhere, threshold 0: every element "kept" (= other)
    x = randn((50, 40), seed=15)
    assert torch.equal(F.arcee_fusion(x, x.clone()), x)
    # quantised deltas: many equal importances at the quantiles
    base = randn((300, 64), seed=16)
    other = base + randn((300, 64), seed=17).round() / 4
    assert_close(F.arcee_fusion(base, other), R.arcee_fusion(base, other), "exact")
    pytest.importorskip("mergekit")
    for b, o in [(torch.tensor(1.5), torch.tensor(0.25)), (base, other)]:
        assert_close(F.arcee_fusion(b, o), mergekit_merge("arcee_fusion", [b, o], {}), "mergekit_exact")


def test_arcee_fusion_large_tensor_exact_quantiles():
    base, (other,) = make_group((900, 1000), 1, seed=18, delta_scale=0.3)
    assert_close(F.arcee_fusion(base, other), R.arcee_fusion(base, other), "exact")


# ---------------------------------------------------------------------------------------------
# every op: dtypes, layouts, threads, fallback, errors
# ---------------------------------------------------------------------------------------------

def run(op, base, ex):
    if op == "arcee_fusion":
        return F.arcee_fusion(base, ex[0])
    if op == "sce":
        return F.sce(base, ex, select_topk=0.4)
    if op == "ramplus_tl":
        return F.ramplus_tl(base, ex, epsilon=0.005)
    return F.ram(base, ex, epsilon=0.005)


def run_ref(op, base, ex):
    if op == "arcee_fusion":
        return R.arcee_fusion(base, ex[0])
    if op == "sce":
        return R.sce(base, ex, 0.4)
    if op == "ramplus_tl":
        return R.ramplus_tl(base, ex, epsilon=0.005)
    return R.ram(base, ex, epsilon=0.005)


OPS = ["ram", "ramplus_tl", "sce", "arcee_fusion"]


@pytest.mark.parametrize("op", OPS)
def test_native_matches_reference_in_every_dtype(op, dtype, device):
    base, ex = make_group((37, 129), 3, seed=19, dtype=dtype, device=device, delta_scale=0.01)
    got = run(op, base, ex)
    assert got.dtype == dtype and got.shape == base.shape
    assert_close(got, run_ref(op, base, ex).to(dtype), "exact")


@pytest.mark.parametrize("op", ["ram", "ramplus_tl", "sce"])
def test_more_experts_than_the_cuda_kernel_takes(op, device):
    """33 experts: one past the CUDA kernels' parameter struct, which hands over to the torch
    reference on the GPU; the CPU kernel takes any number."""
    base, ex = make_group((19, 23), 33, seed=29, dtype=torch.float32, device=device,
                          delta_scale=0.01)
    assert_close(run(op, base, ex), run_ref(op, base, ex), "exact")


@pytest.mark.parametrize("op", ["ram", "ramplus_tl", "sce"])
def test_bf16_within_rounding_floor_of_fp32_oracle(op, record_property):
    pytest.importorskip("mergekit")
    base, ex = make_group((64, 256), 3, seed=21, dtype=torch.bfloat16, base_scale=0.02,
                          delta_scale=0.01 if op != "arcee_fusion" else 0.05)
    inputs = [base] + (ex[:1] if op == "arcee_fusion" else ex)
    params = {"sce": {"select_topk": 0.4}, "ram": {"epsilon": 0.005},
              "ramplus_tl": {"epsilon": 0.005}}.get(op, {})
    ours = run(op, base, ex)
    oracle = mergekit_merge(op, [x.float() for x in inputs], params)
    theirs = mergekit_merge(op, inputs, params)
    floor, ours_err = bf16_errors(op, ours, theirs, oracle, base, record_property)
    assert ours.dtype == torch.bfloat16
    assert ours_err <= BF16_FLOOR_FACTOR * floor


def test_arcee_fusion_bf16_selects_as_fp32_does():
    """arcee_fusion's result is base or other element by element (rounded once), so bf16 inputs
    give exactly the fp32 computation on the same values; mergekit's bf16 run computes the
    softmax and KL in bf16 and moves the threshold."""
    pytest.importorskip("mergekit")
    base, (other,) = make_group((64, 256), 1, seed=21, dtype=torch.bfloat16, base_scale=0.02,
                                delta_scale=0.05)
    ours = F.arcee_fusion(base, other)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, F.arcee_fusion(base.float(), other.float()).to(torch.bfloat16))
    oracle = mergekit_merge("arcee_fusion", [base.float(), other.float()], {})
    theirs = mergekit_merge("arcee_fusion", [base, other], {})
    ours_flips = int((ours.float() != oracle).sum())
    theirs_flips = int((theirs.float() != oracle.to(torch.bfloat16).float()).sum())
    print(f"arcee_fusion bf16: {ours_flips} mask flips vs the fp32 oracle, mergekit-bf16 {theirs_flips}")
    assert ours_flips <= max(2, theirs_flips)


@pytest.mark.parametrize("op", OPS)
def test_mixed_dtypes_out_dtype_and_non_contiguous(op):
    base, ex = make_group((40, 33), 3, seed=22, delta_scale=0.01)
    mixed = [ex[0].to(torch.bfloat16), ex[1].to(torch.float16), ex[2]]
    want = run_ref(op, base, [m.float() for m in mixed])
    got = run(op, base, mixed)
    assert_close(got, want, "exact")
    # a transposed (non-contiguous) view of every input
    bt, et = base.t().contiguous(), [e.t().contiguous() for e in ex]
    got_t = run(op, bt.t().contiguous().t(), [e.t() for e in [x.t().contiguous() for x in et]])
    assert got_t.shape == bt.shape
    assert_close(got_t, run_ref(op, bt, et), "exact")
    if op == "arcee_fusion":
        out = F.arcee_fusion(base, ex[0], out_dtype=torch.float16)
    else:
        out = getattr(F, op)(base, ex, out_dtype=torch.float16)
    assert out.dtype == torch.float16
    # float64 inputs are computed in fp32
    assert run(op, base.double(), [e.double() for e in ex]).dtype == torch.float64


@pytest.mark.parametrize("op", OPS)
def test_results_do_not_depend_on_thread_count(op, restore_threads):
    base, ex = make_group((700, 1000), 3, seed=23, delta_scale=0.01)
    restore_threads(1)
    one = run(op, base, ex)
    restore_threads(2)
    two = run(op, base, ex)
    assert torch.equal(one, two)


@pytest.mark.parametrize("op", OPS)
def test_fallback_without_native_matches_native(op, monkeypatch):
    base, ex = make_group((33, 17), 3, seed=24, dtype=torch.bfloat16, delta_scale=0.05)
    native = run(op, base, ex)
    monkeypatch.setattr(_native, "_C", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fallback = run(op, base, ex)
    assert fallback.dtype == native.dtype == torch.bfloat16
    assert_close(native, fallback, "exact")


def test_empty_tensors_and_errors():
    e = torch.empty(0, 3)
    for op in OPS:
        assert run(op, e, [e, e, e]).shape == (0, 3)
    x = randn((4, 5), seed=25)
    with pytest.raises(InvalidArgumentError):
        F.ram(x, [x[:, :4]])
    with pytest.raises(InvalidArgumentError):
        F.sce(x, [])
    with pytest.raises(InvalidArgumentError):
        F.sce(x, [x], select_topk=float("nan"))
    with pytest.raises(InvalidArgumentError):
        F.arcee_fusion(x, x.t())
    with pytest.raises(InvalidArgumentError):
        F.ramplus_tl(x, x)  # a single tensor, not a list
    assert isinstance(fastmerge.ops.ram(x, [x]), torch.Tensor)


# ---------------------------------------------------------------------------------------------
# property tests against the pure-torch reference (bit-exact)
# ---------------------------------------------------------------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(shape=st.lists(st.integers(1, 9), min_size=0, max_size=3), experts=st.integers(1, 5),
       quantise=st.booleans(), topk=st.floats(0.0, 1.0), epsilon=st.sampled_from([0.0, 0.005, 0.02]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**20))
def test_property_consensus_ops_match_reference(shape, experts, quantise, topk, epsilon, dtype,
                                                seed):
    base, ex = make_group(shape, experts, seed=seed, dtype=torch.float64, delta_scale=0.01)
    if quantise:  # equal variances, exact zeros and sign conflicts
        ex = [base + torch.round((e - base) * 200) / 200 for e in ex]
    base, ex = base.to(dtype), [e.to(dtype) for e in ex]
    assert_close(F.ram(base, ex, epsilon=epsilon), R.ram(base, ex, epsilon=epsilon).to(dtype),
                 "exact")
    assert_close(F.ramplus_tl(base, ex, epsilon=epsilon),
                 R.ramplus_tl(base, ex, epsilon=epsilon).to(dtype), "exact")
    assert_close(F.sce(base, ex, select_topk=topk), R.sce(base, ex, topk).to(dtype), "exact")
    if len(shape) >= 1:
        assert_close(F.arcee_fusion(base, ex[0]), R.arcee_fusion(base, ex[0]).to(dtype), "exact")
