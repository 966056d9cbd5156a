"""nuslerp, multislerp and karcher (csrc/ops/sphere) against mergekit 0.1.5's own functions,
the pure-torch reference, closed forms and edge cases (colinear, antipodal, zero inputs)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastmerge
import fastmerge.ops as F
from fastmerge import _native, host_kernels
from fastmerge.dtypes import BY_NAME as DTYPES
from fastmerge.errors import InvalidArgumentError
from fastmerge.ops import _reference as R

from conftest import BF16_FLOOR_FACTOR
from helpers import assert_close, bf16_errors, make_group, mergekit_merge, randn, rel_l2_delta, ulp

pytest.importorskip("mergekit")

from mergekit.merge_methods.karcher import karcher_merge_tensors  # noqa: E402
from mergekit.merge_methods.nuslerp import nuslerp as mk_nuslerp  # noqa: E402

SHAPES = [(), (1,), (4097,), (3, 5, 7), (64, 300)]
# nuslerp vector layouts: (dim, flatten) as mergekit's nuslerp takes them
LAYOUTS = [(-1, True), (-1, False), (0, False)]


def assert_mergekit_close(ours, theirs, base=None, rel=1e-5, msg=""):
    """Native vs mergekit in fp32: the same formulas, but mergekit sums norms and dots in fp32
    elementwise where we accumulate fp64 Gram statistics, and folds divisions differently:
    |err| <= rel * max|merged delta| (the result without a base) + 2 fp32 ulps of the value."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, msg
    o, m = ours.double(), theirs.double()
    if m.numel() == 0:
        return
    ref = base.double() if base is not None else torch.zeros_like(m)
    scale = float((m - ref).abs().max())
    bound = rel * scale + 2 * ulp(m, torch.float32)
    err = (o - m).abs()
    worst = int(torch.argmax((err - bound).reshape(-1)))
    assert bool((err <= bound).all()), (
        f"{msg} at {worst}: got {float(o.reshape(-1)[worst])} want {float(m.reshape(-1)[worst])} "
        f"(scale {scale})")


def mk_nuslerp_full(t, v0, v1, base=None, dim=-1, flatten=False):
    if base is None:
        return mk_nuslerp(t, v0, v1, dim=dim, flatten=flatten)
    return base + mk_nuslerp(t, v0 - base, v1 - base, dim=dim, flatten=flatten)


def mk_multislerp(tensors, weights, base=None, **params):
    inputs = ([base] if base is not None else []) + list(tensors)
    return mergekit_merge("multislerp", inputs, {"weight": list(weights), **params},
                          base_index=0 if base is not None else None)


# ---------------------------------------------------------------------------------------------
# nuslerp
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dim,flatten", LAYOUTS)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("t", [0.3, 0.75, -0.2, 1.4])
def test_nuslerp_matches_mergekit_fp32(shape, dim, flatten, with_base, t):
    base, (a, b) = make_group(shape, 2, seed=1, delta_scale=0.3)
    w0 = base if with_base else None
    out = F.nuslerp(t, a, b, base=w0, dim=dim, flatten=flatten)
    assert_mergekit_close(out, mk_nuslerp_full(t, a, b, w0, dim, flatten), w0)


def test_nuslerp_every_dim_of_a_3d_tensor():
    base, (a, b) = make_group((6, 7, 9), 2, seed=2)
    for dim in (0, 1, 2, -2, -3):
        for w0 in (None, base):
            out = F.nuslerp(0.4, a, b, base=w0, dim=dim)
            assert_mergekit_close(out, mk_nuslerp_full(0.4, a, b, w0, dim, False), w0, msg=str(dim))


@pytest.mark.parametrize("shape", SHAPES + [(2, 3000)], ids=str)
@pytest.mark.parametrize("dim,flatten", LAYOUTS)
def test_nuslerp_matches_reference(shape, dim, flatten, dtype, device):
    base, (a, b) = make_group(shape, 2, seed=3, dtype=dtype, device=device)
    for w0 in (None, base):
        out = F.nuslerp(0.35, a, b, base=w0, dim=dim, flatten=flatten)
        assert out.dtype == dtype and out.shape == a.shape
        expected = R.nuslerp(0.35, a, b, base=w0, dim=dim, flatten=flatten)
        assert_close(out, expected.to(dtype), "interp", scale=float(expected.abs().max()))


def test_nuslerp_closed_form_on_a_circle():
    th = 1.1
    u = torch.tensor([1.0, 0.0])
    v = torch.tensor([math.cos(th), math.sin(th)]) * 3.0  # raw vectors: norms are not mixed
    for t in (0.25, 0.5, 0.9):
        got = F.nuslerp(t, u, v).double()
        want = (math.sin((1 - t) * th) * u.double() + math.sin(t * th) * v.double()) / math.sin(th)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), t
    # the endpoints
    a, b = randn((50, 20), seed=4), randn((50, 20), seed=5)
    assert torch.allclose(F.nuslerp(0.0, a, b, dim=-1), a, rtol=0, atol=1e-6)
    assert torch.allclose(F.nuslerp(1.0, a, b, dim=0), b, rtol=0, atol=1e-6)


def mk_colinear(v0, v1, dim, flatten):
    """mergekit's own colinear test per vector (fp32 normalised dot), broadcast to the shape."""
    x0, x1 = (v0.reshape(-1), v1.reshape(-1)) if flatten else (v0.transpose(dim, -1),
                                                                 v1.transpose(dim, -1))
    u0 = x0 / x0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = x1 / x1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    mask = ((1 - cos.square()) <= 1e-16).expand_as(x0)
    return mask.reshape(v0.shape) if flatten else mask.transpose(dim, -1)


def test_nuslerp_colinear_antiparallel_and_zero_vectors():
    a = randn((8, 33), seed=6)
    t = 0.3
    for b in (2.5 * a, -a, -0.5 * a):  # cos = +-1 exactly: (1 - t) a + t b
        for dim, flatten in LAYOUTS:
            out = F.nuslerp(t, a, b, dim=dim, flatten=flatten)
            lerp = torch.tensor(1 - t) * a + torch.tensor(t) * b
            assert torch.allclose(out, lerp, rtol=0, atol=1e-6 * float(lerp.abs().max()))
            want = mk_nuslerp(t, a, b, dim=dim, flatten=flatten)
            # mergekit's fp32 cosine of exactly (anti)parallel vectors lands on +-1 or one ulp
            # inside; inside, its slerp branch divides by sin(theta) ~ 3e-4, which for
            # antiparallel vectors blows the result up (x1e3). Where it took its colinear
            # branch we agree; parallel vectors agree everywhere (the branches meet there).
            same = mk_colinear(a, b, dim, flatten) if float((a * b).sum()) < 0 else \
                torch.ones_like(a, dtype=torch.bool)
            assert bool(same.any())
            assert_mergekit_close(out[same], want[same], msg=f"{dim} {flatten}")
    # rows mixing colinear and general pairs: each row takes its own branch
    b = randn((8, 33), seed=7)
    b[::2] = a[::2] * 3.0
    out = F.nuslerp(t, a, b, dim=-1)
    assert_mergekit_close(out, mk_nuslerp(t, a, b, dim=-1))
    # a zero vector has norm clamped to 1e-7: cos = 0, theta = pi/2 -> sin(t pi/2) * other
    z = torch.zeros_like(a)
    out = F.nuslerp(t, z, a, dim=-1)
    assert torch.allclose(out.double(), math.sin(t * math.pi / 2) * a.double(), rtol=0, atol=1e-6)
    assert_mergekit_close(out, mk_nuslerp(t, z, a, dim=-1))
    assert torch.equal(F.nuslerp(t, z, z), z)
    # with a base: identical models give the base back
    assert torch.equal(F.nuslerp(t, a, a, base=a, flatten=True), a)


def test_nuslerp_non_contiguous_mixed_dtypes_and_errors():
    base, (a, b) = make_group((30, 40), 2, seed=8)
    at, bt, wt = a.t(), b.t(), base.t()
    for dim, flatten in LAYOUTS:
        assert torch.equal(F.nuslerp(0.4, at, bt, base=wt, dim=dim, flatten=flatten),
                           F.nuslerp(0.4, at.contiguous(), bt.contiguous(), base=wt.contiguous(),
                                     dim=dim, flatten=flatten))
    out = F.nuslerp(0.4, a.to(torch.bfloat16), b.half(), base=base, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    expected = R.nuslerp(0.4, a.to(torch.bfloat16), b.half(), base=base)
    assert_close(out, expected, "interp")
    assert F.nuslerp(0.4, a, b, base=base.half()).dtype == torch.float16  # the base's dtype
    with pytest.raises(InvalidArgumentError, match="shape"):
        F.nuslerp(0.4, a, b[:5])
    with pytest.raises(InvalidArgumentError, match="dim"):
        F.nuslerp(0.4, a, b, dim=2)
    with pytest.raises(InvalidArgumentError, match="flatten"):
        F.nuslerp(0.4, a, b, flatten=1)
    with pytest.raises(InvalidArgumentError, match="t"):
        F.nuslerp(float("nan"), a, b)
    assert F.nuslerp(0.5, torch.empty(0, 3), torch.empty(0, 3), dim=0).shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# multislerp
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_matches_mergekit_fp32(shape, count, with_base):
    base, xs = make_group(shape, count, seed=10, delta_scale=0.3, base_scale=0.5)
    w0 = base if with_base else None
    weights = [0.5, 0.2, 0.9, 0.4][:count]
    out = F.multislerp(xs, weights, base=w0)
    assert_mergekit_close(out, mk_multislerp(xs, weights, w0), w0)


@pytest.mark.parametrize("params", [{"normalize_weights": False}, {"eps": 1e-4},
                                    {"normalize_weights": False, "eps": 0.0}], ids=str)
def test_multislerp_parameters_match_mergekit(params):
    base, xs = make_group((40, 50), 3, seed=11)
    weights = [0.3, -0.2, 1.1]
    for w0 in (None, base):
        out = F.multislerp(xs, weights, base=w0, **params)
        assert_mergekit_close(out, mk_multislerp(xs, weights, w0, **params), w0)


@pytest.mark.parametrize("shape", SHAPES + [(3, 70000)], ids=str)
def test_multislerp_matches_reference(shape, dtype, device):
    base, xs = make_group(shape, 3, seed=12, dtype=dtype, device=device)
    for w0 in (None, base):
        out = F.multislerp(xs, [0.2, 0.5, 0.3], base=w0)
        assert out.dtype == dtype and out.shape == xs[0].shape
        expected = R.multislerp(xs, [0.2, 0.5, 0.3], base=w0)
        assert_close(out, expected.to(dtype), "interp", scale=float(expected.abs().max()))


def test_multislerp_one_input_is_returned_unchanged():
    base, (x,) = make_group((20, 30), 1, seed=13)
    assert torch.equal(F.multislerp([x], [0.3]), x)
    assert torch.equal(F.multislerp([x], [0.3], base=base), x)  # mergekit ignores the base too
    assert torch.equal(mk_multislerp([x], [0.3], base), x)
    half = x.to(torch.bfloat16)
    assert torch.equal(F.multislerp([half], [1.0], base=base.to(torch.bfloat16)), half)


def test_multislerp_antipodal_two_inputs_fall_back_to_linear():
    # small integers: every delta is exact in fp32, so -(x - base) is exactly antipodal
    base = torch.round(randn((64, 30), seed=14) * 8)
    x = base + torch.round(randn((64, 30), seed=15) * 8)
    anti = base - (x - base)  # with equal weights the unit mean vanishes exactly
    for w0, a, b in ((base, x, anti), (None, x, -x)):
        out = F.multislerp([a, b], [1.0, 1.0], base=w0)
        want = mk_multislerp([a, b], [1.0, 1.0], w0)
        assert_mergekit_close(out, want, w0)
        ref = w0 if w0 is not None else torch.zeros_like(x)
        assert float((out - ref).abs().max()) <= 1e-6 * float(x.abs().max()) + 1e-6
    # all-zero deltas: the mean is zero -> linear, i.e. zero delta
    z = torch.zeros(7, 5)
    assert torch.equal(F.multislerp([z, z], [0.4, 0.6]), z)
    assert torch.equal(F.multislerp([base, base], [0.4, 0.6], base=base), base)


def test_multislerp_antipodal_more_inputs_raise_like_mergekit():
    x, c = randn((40, 30), seed=15), randn((40, 30), seed=16)
    inputs, weights = [x, -x, c], [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="antipodal"):
        mk_multislerp(inputs, weights)
    with pytest.raises(InvalidArgumentError, match="antipodal"):
        F.multislerp(inputs, weights)
    with pytest.raises(InvalidArgumentError, match="antipodal"):
        R.multislerp(inputs, weights)
    host = [host_kernels.HostArray(t.numpy(), DTYPES["float32"]) for t in inputs]
    with pytest.raises(InvalidArgumentError, match="antipodal"):
        host_kernels.multislerp(None, host, weights, DTYPES["float32"])
    z = torch.zeros(9)
    with pytest.raises(InvalidArgumentError, match="antipodal"):
        F.multislerp([z, z, z], [1.0, 1.0, 1.0])


def test_multislerp_closed_form_and_errors():
    # orthogonal unit-norm inputs with equal weights: the normalised bisector, norm 1
    e0, e1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    out = F.multislerp([e0, e1], [1.0, 1.0])
    # avg_norm = (1 + 2) / 2; direction (1, 1, 0) / sqrt 2 (units carry the eps)
    want = torch.tensor([1.5 / math.sqrt(2), 1.5 / math.sqrt(2), 0.0])
    assert torch.allclose(out, want, rtol=0, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="sum to zero"):
        F.multislerp([e0, e1], [1.0, -1.0])
    with pytest.raises(InvalidArgumentError, match="weights"):
        F.multislerp([e0, e1], [1.0])
    with pytest.raises(InvalidArgumentError, match="weights must be given, got None"):
        F.multislerp([e0, e1], None)
    with pytest.raises(InvalidArgumentError, match="shape"):
        F.multislerp([e0, e1[:2]], [1.0, 1.0])
    with pytest.raises(InvalidArgumentError, match="normalize_weights"):
        F.multislerp([e0, e1], [1.0, 1.0], normalize_weights="yes")


@pytest.mark.parametrize("native", [True, False])
def test_karcher_alphas_summing_to_zero_are_refused(native, monkeypatch):
    """The mean's weights are alphas / their sum over the inputs above tol: a zero sum (mergekit
    would divide by it) is refused by name instead of giving NaN."""
    xs = [randn((6, 7), seed=i) for i in range(3)]
    if not native:
        monkeypatch.setattr(_native, "_C", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(fastmerge.FastmergeError, match="alphas .* sum to zero"):
            F.karcher(xs, alphas=[1.0, -1.0, 0.0])
        # the sum counts only inputs above tol: the zero tensor's alpha takes no part
        with pytest.raises(fastmerge.FastmergeError, match="alphas .* sum to zero"):
            F.karcher(xs[:2] + [torch.zeros(6, 7)], alphas=[1.0, -1.0, 5.0])



# ---------------------------------------------------------------------------------------------
# karcher
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_karcher_matches_mergekit_fp32(shape, count):
    _, xs = make_group(shape, count, seed=20, delta_scale=0.7)
    out = F.karcher(xs)
    want = karcher_merge_tensors(xs, [1.0 / count] * count)
    assert_mergekit_close(out, want)
    if count == 1:
        assert torch.equal(out, xs[0])


@pytest.mark.parametrize("max_iter,tol", [(0, 1e-5), (1, 1e-5), (3, 1e-6), (50, 1e-7),
                                          (10, 0.5)])
def test_karcher_iterations_and_tolerance_match_mergekit(max_iter, tol):
    xs = [randn((50, 40), seed=21 + i, mean=0.3 * i) for i in range(3)]
    out = F.karcher(xs, max_iter=max_iter, tol=tol)
    assert_mergekit_close(out, karcher_merge_tensors(xs, [1 / 3] * 3, max_iter=max_iter, tol=tol))
    alphas = [0.2, 0.5, 0.3]
    out = F.karcher(xs, alphas=alphas, max_iter=max_iter, tol=tol)
    assert_mergekit_close(out, karcher_merge_tensors(xs, alphas, max_iter=max_iter, tol=tol))


def test_karcher_zero_and_tiny_inputs():
    xs = [randn((30, 20), seed=30 + i) for i in range(3)]
    z = torch.zeros(30, 20)
    tiny = xs[0] * 1e-9  # norm <= tol: takes no part, but counts in the scale
    for inputs in ([xs[0], z], [z, xs[1], xs[2]], [xs[0], tiny, xs[1]], [z, tiny, xs[2]]):
        n = len(inputs)
        out = F.karcher(inputs)
        assert_mergekit_close(out, karcher_merge_tensors(inputs, [1 / n] * n))
    # below tol but far from zero: no part in the direction, its norm still counts in the scale
    small = xs[2] / xs[2].norm() * 0.3
    for inputs in ([xs[0], small], [small, xs[1], xs[0]]):
        n = len(inputs)
        out = F.karcher(inputs, tol=1.0)
        assert_mergekit_close(out, karcher_merge_tensors(inputs, [1 / n] * n, tol=1.0))
    # no input above tol: zeros
    assert torch.equal(F.karcher([z, z]), z)
    assert torch.equal(F.karcher([z, tiny]), z)
    assert torch.equal(karcher_merge_tensors([z, tiny], [0.5, 0.5]), z)


def test_karcher_closed_forms():
    # two orthogonal directions: the geodesic midpoint, scaled by the mean norm
    e0, e1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    out = F.karcher([e0, e1], max_iter=50, tol=1e-9)
    want = torch.tensor([3.0 / math.sqrt(2), 3.0 / math.sqrt(2)])
    assert torch.allclose(out, want, rtol=0, atol=1e-6)
    # antipodal pair: the unit mean vanishes -> the first unit, from which the other's
    # direction is undefined (theta = pi: 0/0). mergekit's fp32 steps along rounding noise
    # there; every answer is a unit direction times the mean norm.
    a = randn((100,), seed=31)
    out = F.karcher([a, -a])
    assert math.isclose(float(out.norm()), float(a.norm()), rel_tol=1e-6)
    assert math.isclose(float(karcher_merge_tensors([a, -a], [0.5, 0.5]).norm()),
                        float(a.norm()), rel_tol=1e-5)
    # identical directions: that direction with the mean norm
    out = F.karcher([a, 3 * a])
    assert torch.allclose(out, 2 * a, rtol=0, atol=2e-6 * float(a.abs().max()))


def test_karcher_matches_reference_and_bad_arguments(dtype, device):
    xs = [randn((70, 1000), seed=32 + i, dtype=dtype, device=device, mean=0.1 * i)
          for i in range(3)]
    out = F.karcher(xs, max_iter=7)
    expected = R.karcher(xs, [1 / 3] * 3, max_iter=7, tol=1e-5)
    assert out.dtype == dtype
    assert_close(out, expected.to(dtype), "interp", scale=float(expected.abs().max()))
    with pytest.raises(InvalidArgumentError, match="max_iter"):
        F.karcher(xs, max_iter=2.5)
    with pytest.raises(InvalidArgumentError, match="alphas"):
        F.karcher(xs, alphas=[1.0])
    with pytest.raises(InvalidArgumentError, match="tol"):
        F.karcher(xs, tol=-1.0)
    # negative max_iter: no iterations (range(max_iter), as mergekit)
    assert torch.equal(F.karcher(xs, max_iter=-3), F.karcher(xs, max_iter=0))


# ---------------------------------------------------------------------------------------------
# bf16 / fp16 accuracy, threads, fallback, host kernels
# ---------------------------------------------------------------------------------------------

def _merges(base, xs):
    """(label, fastmerge result, mergekit on the same inputs, base of the merged delta)."""
    return [
        ("nuslerp_flat_base", F.nuslerp(0.35, xs[0], xs[1], base=base, flatten=True),
         lambda b, x: mk_nuslerp_full(0.35, x[0], x[1], b, -1, True), base),
        ("nuslerp_rows", F.nuslerp(0.35, xs[0], xs[1]),
         lambda b, x: mk_nuslerp_full(0.35, x[0], x[1], None, -1, False), None),
        ("nuslerp_cols_base", F.nuslerp(0.35, xs[0], xs[1], base=base, dim=0),
         lambda b, x: mk_nuslerp_full(0.35, x[0], x[1], b, 0, False), base),
        ("multislerp_base", F.multislerp(xs, [0.2, 0.5, 0.3], base=base),
         lambda b, x: mk_multislerp(x, [0.2, 0.5, 0.3], b), base),
        ("karcher", F.karcher(xs), lambda b, x: karcher_merge_tensors(x, [1 / 3] * 3), None),
    ]


def test_bf16_within_rounding_floor_of_fp32_oracle(record_property):
    base, xs = make_group((64, 256), 3, seed=40, dtype=torch.bfloat16, base_scale=0.02,
                          delta_scale=0.01)
    for label, ours, mk, ref in _merges(base, xs):
        oracle = mk(base.float(), [x.float() for x in xs])
        theirs = mk(base, xs)
        floor, ours_err = bf16_errors(label, ours, theirs, oracle, ref, record_property)
        assert ours.dtype == torch.bfloat16, label
        assert ours_err <= BF16_FLOOR_FACTOR * floor, (label, ours_err, floor)


def test_fp16_within_rounding_floor_of_fp32_oracle():
    base, xs = make_group((64, 256), 3, seed=41, dtype=torch.float16, base_scale=0.02,
                          delta_scale=0.01)
    for label, ours, mk, ref in _merges(base, xs):
        oracle = mk(base.float(), [x.float() for x in xs])
        floor = rel_l2_delta(oracle.half(), oracle, ref)
        assert ours.dtype == torch.float16, label
        assert rel_l2_delta(ours, oracle, ref) <= BF16_FLOOR_FACTOR * floor, label


def test_same_result_for_1_and_2_threads(restore_threads):
    base, xs = make_group((300, 1000), 3, seed=42, dtype=torch.bfloat16)
    tall = [randn((70000, 3), seed=43 + i) for i in range(2)]  # long strided columns

    def run():
        return ([F.nuslerp(0.3, xs[0], xs[1], base=base, dim=d, flatten=f) for d, f in LAYOUTS]
                + [F.nuslerp(0.6, tall[0], tall[1], dim=0), F.nuslerp(0.6, tall[0], tall[1]),
                   F.multislerp(xs, [0.2, 0.3, 0.5], base=base), F.karcher(xs)])
    restore_threads(1)
    one = run()
    restore_threads(2)
    two = run()
    for x, y in zip(one, two):
        assert torch.equal(x, y)


@pytest.fixture
def without_native(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def test_fallback_without_native_matches_native():
    base, xs = make_group((33, 17), 3, seed=44, dtype=torch.bfloat16)

    def run():
        return [F.nuslerp(0.3, xs[0], xs[1], base=base, dim=0, flatten=False),
                F.nuslerp(0.3, xs[0], xs[1], out_dtype=torch.float32),
                F.multislerp(xs, [0.2, 0.3, 0.5], base=base), F.karcher(xs, max_iter=4)]
    native = run()
    saved = _native._C
    try:
        _native._C = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fallback = run()
            with pytest.raises(InvalidArgumentError, match="antipodal"):
                F.multislerp([xs[0], -xs[0], xs[1]], [1.0, 1.0, 0.0])
    finally:
        _native._C = saved
    for a, b in zip(native, fallback):
        assert a.dtype == b.dtype
        assert_close(a, b, "interp", scale=float(b.float().abs().max()))


def test_host_kernels_match_torch_ops():
    base, xs = make_group((40, 60), 3, seed=45, dtype=torch.bfloat16)
    bf16, f32 = DTYPES["bfloat16"], DTYPES["float32"]

    def host(t):
        return host_kernels.HostArray(t.view(torch.uint16).numpy().copy(), bf16)

    def back(h):
        return torch.from_numpy(h.data.copy()).view(torch.bfloat16) if h.dtype is bf16 \
            else torch.from_numpy(h.data.copy())

    hb, hx = host(base), [host(x) for x in xs]
    for dim, flatten in LAYOUTS:
        got = back(host_kernels.nuslerp(hb, hx[0], hx[1], 0.3, bf16, dim=dim, flatten=flatten))
        assert torch.equal(got, F.nuslerp(0.3, xs[0], xs[1], base=base, dim=dim, flatten=flatten))
    got = back(host_kernels.multislerp(hb, hx, [0.2, 0.3, 0.5], f32, normalize_weights=False))
    assert torch.equal(got, F.multislerp(xs, [0.2, 0.3, 0.5], base=base, normalize_weights=False,
                                         out_dtype=torch.float32))
    got = back(host_kernels.karcher(hx, bf16, max_iter=3, tol=1e-6))
    assert torch.equal(got, F.karcher(xs, max_iter=3, tol=1e-6))


def test_exported():
    assert {"nuslerp", "multislerp", "karcher"} <= set(fastmerge.ops.__all__)


def test_methods_registered_with_mergekit_parameters():
    from fastmerge.methods.registry import get_method

    nus = get_method("nuslerp")
    assert nus.optional_base and not nus.uses_base and (nus.min_non_base, nus.max_non_base) == (2, 2)
    assert nus.parameter("weight").required and nus.parameter("nuslerp_flatten").default is True
    assert nus.parameter("nuslerp_row_wise").default is False
    ms = get_method("multislerp")
    assert ms.optional_base and ms.min_non_base == 1 and ms.parameter("eps").default == 1e-8
    assert ms.parameter("normalize_weights").default is True
    k = get_method("karcher")
    assert not k.uses_base and not k.optional_base
    max_iter = k.parameter("max_iter")
    assert max_iter.default == 10 and k.parameter("tol").default == 1e-5
    # ints as mergekit's pydantic validation takes them
    for value, want in ((3, 3), (3.0, 3), ("4", 4), (" 5.0 ", 5), (True, 1), (-2, -2)):
        assert max_iter.coerce(value) == want
    for bad in (2.5, "2.5", "three", None, float("inf")):
        with pytest.raises(ValueError):
            max_iter.coerce(bad)


# ---------------------------------------------------------------------------------------------
# property tests: random shapes, layouts, weights and dtypes against the pure-torch reference
# ---------------------------------------------------------------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_shapes = st.lists(st.integers(1, 9), min_size=0, max_size=3)
_dtypes = st.sampled_from([torch.float32, torch.bfloat16])


@given(shape=_shapes, layout=st.sampled_from(LAYOUTS), with_base=st.booleans(),
       t=st.floats(-0.5, 1.5), dtype=_dtypes, seed=st.integers(0, 2**20))
def test_property_nuslerp_matches_reference(shape, layout, with_base, t, dtype, seed):
    dim, flatten = layout
    if not shape and not flatten:
        return  # a 0-d tensor has no dim to interpolate along
    base, (a, b) = make_group(shape, 2, seed=seed, dtype=dtype, delta_scale=0.3)
    w0 = base if with_base else None
    out = F.nuslerp(t, a, b, base=w0, dim=dim, flatten=flatten)
    expected = R.nuslerp(t, a, b, base=w0, dim=dim, flatten=flatten)
    assert_close(out, expected.to(dtype), "interp", scale=float(expected.abs().max()))


@given(shape=_shapes, count=st.integers(1, 5), with_base=st.booleans(), data=st.data(),
       dtype=_dtypes, seed=st.integers(0, 2**20))
def test_property_multislerp_matches_reference(shape, count, with_base, data, dtype, seed):
    base, xs = make_group(shape, count, seed=seed, dtype=dtype, delta_scale=0.5)
    weights = data.draw(st.lists(st.floats(0.05, 2.0), min_size=count, max_size=count),
                        label="weights")
    w0 = base if with_base else None
    try:
        expected = R.multislerp(xs, weights, base=w0)
    except InvalidArgumentError:  # balanced antipodal units (one-element vectors: +-1)
        with pytest.raises(InvalidArgumentError, match="antipodal"):
            F.multislerp(xs, weights, base=w0)
        return
    out = F.multislerp(xs, weights, base=w0)
    assert_close(out, expected.to(dtype), "interp", scale=float(expected.abs().max()))


@given(shape=_shapes, count=st.integers(1, 5), data=st.data(), dtype=_dtypes,
       seed=st.integers(0, 2**20))
def test_property_karcher_matches_reference(shape, count, data, dtype, seed):
    _, xs = make_group(shape, count, seed=seed, dtype=dtype, delta_scale=0.5)
    alphas = data.draw(st.lists(st.floats(0.05, 2.0), min_size=count, max_size=count),
                       label="alphas")
    out = F.karcher(xs, alphas=alphas, max_iter=7, tol=1e-5)
    expected = R.karcher(xs, alphas, max_iter=7, tol=1e-5)
    assert_close(out, expected.to(dtype), "interp", scale=float(expected.abs().max()))
