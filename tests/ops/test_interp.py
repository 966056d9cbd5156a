"""slerp, nearswap and model_stock against the reference, closed-form cases and mergekit 0.1.5."""
from __future__ import annotations

import math

import pytest
import torch

import fastmerge.ops as F
from fastmerge.errors import InvalidArgumentError
from fastmerge.ops import _reference as R

from conftest import BF16_FLOOR_FACTOR
from helpers import assert_close, bf16_errors, make_group, mergekit_merge, randn

ODD_SHAPES = [(), (1,), (4097,), (3, 5, 7)]


# ---------------------------------------------------------------------------------------------
# slerp
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.7, -0.25])
def test_slerp_matches_reference(shape, t, dtype, device):
    a, (b,) = make_group(shape, 1, seed=1, dtype=dtype, device=device)
    out = F.slerp(a, b, t)
    assert out.dtype == dtype and out.shape == a.shape
    expected = R.slerp(a, b, t)
    assert_close(out, expected.to(dtype), "interp", scale=float(expected.abs().max()))


def test_slerp_endpoints_and_closed_form():
    a = randn((1000,), seed=2)
    b = randn((1000,), seed=3)
    assert torch.equal(F.slerp(a, b, 0.0), a)
    assert torch.equal(F.slerp(a, b, 1.0), b)
    # closed form on the unit circle: a = e0, b = (cos th, sin th) -> angle t*th
    th = 1.1
    u = torch.tensor([1.0, 0.0])
    v = torch.tensor([math.cos(th), math.sin(th)])
    for t in (0.25, 0.5, 0.9):
        got = F.slerp(u, v, t).double()
        want = torch.tensor([math.cos(t * th), math.sin(t * th)], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=0, atol=4e-7), t
    # the norm is interpolated between equal norms: stays on the sphere
    a, b = a / a.norm() * 3, b / b.norm() * 3
    assert math.isclose(float(F.slerp(a, b, 0.4).norm()), 3.0, rel_tol=1e-5)


def test_slerp_collinear_falls_back_to_lerp_and_zero_counts_as_orthogonal():
    a = randn((513,), seed=4)
    t = torch.tensor(0.3)
    for b in (2.5 * a, -a, a * (1 + 1e-4)):  # |cos| > 0.9995: linear interpolation
        out = F.slerp(a, b, 0.3)
        lerp = (1 - t) * a + t * b
        assert torch.allclose(out, lerp, rtol=0, atol=2e-7 * float(lerp.abs().max()))
        assert_close(out, R.slerp(a, b, 0.3), "interp")
    # a zero vector's norm counts as 1 (mergekit): dot = 0, theta = pi/2
    out = F.slerp(a, torch.zeros_like(a), 0.3)
    want = math.sin(0.7 * math.pi / 2) * a.double()
    assert torch.allclose(out.double(), want, rtol=0, atol=4e-7 * float(want.abs().max()))
    z = torch.zeros(7)
    assert torch.equal(F.slerp(z, z, 0.5), z)


def test_slerp_non_contiguous_and_mixed_dtypes():
    a = randn((30, 40), seed=5)
    b = randn((40, 30), seed=6).t()
    assert torch.equal(F.slerp(a.t(), b.t(), 0.4), F.slerp(a.t().contiguous(), b.t().contiguous(), 0.4))
    out = F.slerp(a.to(torch.bfloat16), b.to(torch.float16), 0.4)
    assert out.dtype == torch.bfloat16
    expected = R.slerp(a.to(torch.bfloat16), b.to(torch.float16), 0.4)
    assert_close(out, expected.to(torch.bfloat16), "interp", scale=float(expected.abs().max()))
    o = F.slerp(a.to(torch.bfloat16), b, 0.4, out_dtype=torch.float32)
    assert o.dtype == torch.float32
    assert_close(o, R.slerp(a.to(torch.bfloat16), b, 0.4), "interp")


@pytest.mark.parametrize("shape", [(4097,), (3, 5, 7), (64, 300)], ids=str)
@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_slerp_matches_mergekit_fp32(shape, t):
    pytest.importorskip("mergekit")
    a, (b,) = make_group(shape, 1, seed=7)
    expected = mergekit_merge("slerp", [a, b], {"t": t})
    assert_close(F.slerp(a, b, t), expected, "mergekit_reduction")


@pytest.mark.parametrize("shape", [(0,), (4, 0)], ids=str)
def test_slerp_empty(shape):
    x = torch.empty(shape)
    assert F.slerp(x, x, 0.5).shape == shape


# ---------------------------------------------------------------------------------------------
# model_stock
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ODD_SHAPES + [(6, 33)], ids=str)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("experts", [2, 3])
def test_model_stock_matches_reference(shape, filter_wise, experts, dtype, device):
    base, ex = make_group(shape, experts, seed=10, dtype=dtype, device=device)
    out = F.model_stock(base, ex, filter_wise=filter_wise)
    assert out.dtype == dtype and out.shape == base.shape
    expected = R.model_stock(base, ex, filter_wise=filter_wise)
    assert_close(out, expected.to(dtype), "interp", scale=float(expected.abs().max()))


def test_model_stock_closed_forms():
    base = randn((8, 50), seed=11)
    o = randn((8, 50), seed=12)
    # identical task vectors: cos = 1, t = T / T = 1 -> the experts' average (= each expert)
    out = F.model_stock(base, [base + o, base + o, base + o])
    assert torch.allclose(out, base + o, rtol=0, atol=4e-7 * float((base + o).abs().max()))
    # opposite task vectors: cos = -1, denominator 1 + (2-1)(-1) = 0 -> keep base (t = 0)
    assert torch.equal(F.model_stock(base, [base + o, base - o]), base)
    # orthogonal task vectors: cos = 0 -> t = 0 -> base
    o2 = torch.zeros_like(o)
    o2[:, 0] = 1.0
    o1 = torch.zeros_like(o)
    o1[:, 1] = 1.0
    assert torch.equal(F.model_stock(base, [base + o1, base + o2]), base)
    # filter_wise: rows are independent; cos per row from the formula in fp64
    o3 = randn((8, 50), seed=13)
    out = F.model_stock(base, [base + o, base + o3], filter_wise=True).double()
    cos = torch.nn.functional.cosine_similarity(o.double(), o3.double(), dim=1).unsqueeze(1)
    t = 2 * cos / (1 + cos)
    avg = (2 * base.double() + o.double() + o3.double()) / 2
    want = t * avg + (1 - t) * base.double()
    assert torch.allclose(out, want, rtol=0, atol=2e-6 * float(want.abs().max()))


def test_model_stock_filter_wise_1d_is_one_row():
    base, ex = make_group((300,), 2, seed=14)
    assert torch.equal(F.model_stock(base, ex, filter_wise=True), F.model_stock(base, ex))


def test_model_stock_non_contiguous():
    base, ex = make_group((20, 30), 3, seed=15)
    bt, et = base.t(), [e.t() for e in ex]
    for fw in (False, True):
        assert torch.equal(F.model_stock(bt, et, filter_wise=fw),
                           F.model_stock(bt.contiguous(), [e.contiguous() for e in et], filter_wise=fw))


@pytest.mark.parametrize("shape", [(4097,), (3, 5, 7), (64, 300)], ids=str)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit_fp32(shape, filter_wise):
    pytest.importorskip("mergekit")
    base, ex = make_group(shape, 3, seed=16)
    expected = mergekit_merge("model_stock", [base] + ex, {"filter_wise": filter_wise})
    out = F.model_stock(base, ex, filter_wise=filter_wise)
    assert_close(out, expected, "mergekit_reduction")


# ---------------------------------------------------------------------------------------------
# Threads, bf16 accuracy
# ---------------------------------------------------------------------------------------------

def test_same_result_for_1_and_2_threads(restore_threads):
    base, ex = make_group((300, 1000), 3, seed=17, dtype=torch.bfloat16)
    def run():
        return (F.slerp(base, ex[0], 0.3), F.model_stock(base, ex),
                F.model_stock(base, ex, filter_wise=True))
    restore_threads(1)
    one = run()
    restore_threads(2)
    two = run()
    for x, y in zip(one, two):
        assert torch.equal(x, y)


@pytest.mark.parametrize("op", ["slerp", "model_stock", "model_stock_filter_wise"])
def test_bf16_within_rounding_floor_of_fp32_oracle(op, record_property):
    pytest.importorskip("mergekit")
    base, ex = make_group((64, 256), 3, seed=18, dtype=torch.bfloat16, base_scale=0.02,
                          delta_scale=0.01)
    if op == "slerp":
        method, inputs, params = "slerp", [base, ex[0]], {"t": 0.35}
        ours = F.slerp(base, ex[0], 0.35)
    else:
        fw = op.endswith("filter_wise")
        method, inputs, params = "model_stock", [base] + ex, {"filter_wise": fw}
        ours = F.model_stock(base, ex, filter_wise=fw)
    oracle = mergekit_merge(method, [x.float() for x in inputs], params)
    theirs = mergekit_merge(method, inputs, params)
    floor, ours_err = bf16_errors(op, ours, theirs, oracle, base, record_property)
    assert ours.dtype == torch.bfloat16
    assert ours_err <= BF16_FLOOR_FACTOR * floor


# ---------------------------------------------------------------------------------------------
# nearswap
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ODD_SHAPES + [(0, 3)], ids=str)
@pytest.mark.parametrize("t", [0.0, 0.05, 0.5, 3.0, -0.1])
def test_nearswap_matches_reference(shape, t, dtype, device):
    a, (b,) = make_group(shape, 1, seed=4, dtype=dtype, device=device, delta_scale=0.2)
    out = F.nearswap(a, b, t)
    assert out.dtype == dtype and out.shape == a.shape
    # elementwise in fp32, one rounding: the same bits as the reference
    assert torch.equal(out, R.nearswap(a, b, t).to(dtype))


def test_nearswap_formula_by_hand():
    a = torch.tensor([0.0, 1.0, 1.0, 5.0, 2.0])
    b = torch.tensor([0.05, 1.5, 1.0, 1.0, -2.0])
    t = 0.1
    # |a - b| = .05 (<= t: take b), .5 (w = .2), 0 (clamped to 1e-6: w = 1), 4 (w = .025), 4
    w = torch.tensor([1.0, 0.2, 1.0, 0.025, 0.025])
    assert torch.allclose(F.nearswap(a, b, t), w * b + (1 - w) * a, rtol=1e-6, atol=1e-7)


def test_nearswap_special_values_propagate_like_mergekit():
    a = torch.tensor([1.0, float("nan"), 1.0, float("inf"), 0.0])
    b = torch.tensor([float("nan"), 1.0, float("inf"), 1.0, 0.0])
    got = F.nearswap(a, b, 0.3)
    want = R.nearswap(a, b, 0.3)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    assert torch.equal(got[finite], want[finite])


@pytest.mark.parametrize("t", [0.01, 0.1, 0.7])
def test_nearswap_matches_mergekit_bit_for_bit_fp32(t):
    pytest.importorskip("mergekit")
    a, (b,) = make_group((513, 129), 1, seed=6, delta_scale=0.3)
    expected = mergekit_merge("nearswap", [a, b], {"t": t})
    assert torch.equal(F.nearswap(a, b, t), expected)


def test_nearswap_mixed_dtypes_and_bad_arguments():
    a, (b,) = make_group((300,), 1, seed=7, dtype=torch.bfloat16)
    out = F.nearswap(a, b.float(), 0.2, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, R.nearswap(a, b.float(), 0.2))
    with pytest.raises(InvalidArgumentError, match="shape"):
        F.nearswap(a, b[:10], 0.2)
    with pytest.raises(InvalidArgumentError, match="t"):
        F.nearswap(a, b, float("nan"))


# ---------------------------------------------------------------------------------------------
# property tests against the pure-torch reference
# ---------------------------------------------------------------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_shapes = st.lists(st.integers(1, 9), min_size=0, max_size=3)
_dtypes = st.sampled_from([torch.float32, torch.bfloat16])


@given(shape=_shapes, t=st.floats(-0.5, 1.5), dtype=_dtypes,
       scale=st.sampled_from([1e-3, 0.3, 3.0]), seed=st.integers(0, 2**20))
def test_property_slerp_and_nearswap_match_reference(shape, t, dtype, scale, seed):
    a, (b,) = make_group(shape, 1, seed=seed, dtype=dtype, delta_scale=scale)
    expected = R.slerp(a, b, t)
    assert_close(F.slerp(a, b, t), expected.to(dtype), "interp", scale=float(expected.abs().max()))
    assert torch.equal(F.nearswap(a, b, abs(t)), R.nearswap(a, b, abs(t)).to(dtype))


@given(shape=_shapes, experts=st.integers(2, 5), filter_wise=st.booleans(), dtype=_dtypes,
       seed=st.integers(0, 2**20))
def test_property_model_stock_matches_reference(shape, experts, filter_wise, dtype, seed):
    base, ex = make_group(shape, experts, seed=seed, dtype=dtype)
    expected = R.model_stock(base, ex, filter_wise=filter_wise)
    out = F.model_stock(base, ex, filter_wise=filter_wise)
    assert_close(out, expected.to(dtype), "interp", scale=float(expected.abs().max()))
