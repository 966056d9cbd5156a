"""kv_merge (csrc/ops/kvmerge) against the pure-torch reference written from KVMerger's algorithm,
hand-computed sets on constructed keys, the equal-length budget contract, dtypes, layouts,
thread counts and argument errors."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastmerge
from fastmerge.errors import InvalidArgumentError, NativeKernelError
from fastmerge.ops import kv_merge
from fastmerge.ops import kv_merge_budget as ops_budget
from fastmerge.ops._reference import kvmerge as R

from helpers import assert_close


def smooth_keys(shape, seed, dtype=torch.float32, drift=0.35):
    """Keys that wander slowly along the sequence, so adjacent similarities spread over (-1, 1)
    like real post-RoPE keys (tie-free with probability ~1)."""
    g = torch.Generator().manual_seed(seed)
    B, H, S, D = shape
    steps = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    walk = torch.zeros_like(steps)
    walk[..., 0, :] = steps[..., 0, :]
    for i in range(1, S):
        walk[..., i, :] = walk[..., i - 1, :] + drift * steps[..., i, :]
    return walk.to(dtype)


def inputs(shape, seed, dtype=torch.float32, value_dim=None):
    B, H, S, D = shape
    g = torch.Generator().manual_seed(seed + 1000)
    keys = smooth_keys(shape, seed, dtype)
    values = torch.randn(B, H, S, value_dim or D, generator=g).to(dtype)
    scores = torch.rand(B, H, S, generator=g).to(dtype)
    return keys, values, scores


def check_against_reference(keys, values, scores, msg="", **kw):
    k, v, pos = kv_merge(keys, values, scores, return_positions=True, **kw)
    def as_computed(t):  # float64 inputs are computed as float32 (numerics contract)
        return t.cpu().float() if t.dtype == torch.float64 else t.cpu()

    rk, rv, rpos = R.kv_merge(as_computed(keys), as_computed(values), as_computed(scores), **kw)
    assert k.dtype == (keys.dtype if keys.dtype != torch.float64 else torch.float32)
    assert torch.equal(pos.cpu(), rpos), f"{msg} positions differ"
    assert_close(k.cpu(), rk.to(k.dtype), "kvmerge", msg=f"{msg} keys")
    assert_close(v.cpu(), rv.to(v.dtype), "kvmerge", msg=f"{msg} values")
    return k, v, pos


# (B, H_kv, S, D), ratio, eps, sigma, window, sinks
CASES = [
    ((1, 1, 2, 4), 1.0, -1.0, 1.0, 0, 0),          # smallest mergeable cache
    ((1, 2, 7, 8), 0.5, -1.0, 2.0, 1, 1),          # odd S
    ((2, 2, 33, 16), 0.4, 0.0, 3.0, 4, 2),         # B > 1, eps 0
    ((1, 4, 129, 32), 0.7, 0.3, 5.0, 8, 4),        # GQA-like kv heads, partial candidates
    ((3, 1, 65, 8), 1.0, -1.0, 0.5, 0, 0),         # merge everything possible
    ((1, 2, 300, 64), 0.25, 0.5, 10.0, 32, 4),     # high eps limits the budget
    ((1, 1, 4100, 16), 0.6, -1.0, 4.0, 16, 4),     # several similarity work items
    ((2, 2, 16, 8), 0.5, -1.0, 1.0, 10, 6),        # sinks + window == S: nothing to merge
    ((2, 2, 16, 8), 0.5, -1.0, 1.0, 30, 30),       # sinks + window > S
    ((1, 2, 40, 8), 0.0, -1.0, 1.0, 0, 0),         # ratio 0
    ((1, 2, 40, 8), 0.9, 1.0, 1.0, 0, 0),          # eps 1: no two random keys are parallel
]


@pytest.mark.parametrize("shape,ratio,eps,sigma,window,sinks", CASES)
def test_matches_reference(device, shape, ratio, eps, sigma, window, sinks):
    keys, values, scores = inputs(shape, seed=sum(shape), value_dim=shape[-1] + 3)
    kw = dict(ratio=ratio, eps=eps, sigma=sigma, window=window, sinks=sinks)
    k, v, pos = check_against_reference(keys.to(device), values.to(device), scores.to(device),
                                        msg=str(shape), **kw)
    lo, hi = R.mergeable_range(shape[2], window, sinks)
    assert k.shape[2] >= shape[2] - int(ratio * (hi - lo))
    # sinks and recent tokens are never merged: they come out unchanged at their positions
    kept = list(range(0, lo)) + list(range(hi, shape[2]))
    out_len = k.shape[2]
    tail = list(range(out_len - (shape[2] - hi), out_len))
    head = list(range(lo))
    assert pos[..., head + tail].cpu().tolist() == torch.tensor(kept).expand(
        shape[0], shape[1], len(kept)).tolist()
    assert torch.equal(k[..., head + tail, :].cpu(), keys[..., kept, :])
    assert torch.equal(v[..., head + tail, :].cpu(), values[..., kept, :])


def test_budget_is_exact_when_eps_allows(device):
    """eps=-1: every head removes exactly int(ratio * M) tokens."""
    B, H, S, D = 2, 3, 101, 16
    keys, values, scores = inputs((B, H, S, D), seed=5)
    for ratio in (0.1, 0.33, 0.5, 0.99):
        k, v = kv_merge(keys.to(device), values.to(device), scores.to(device), ratio=ratio,
                        window=8, sinks=3)
        M = S - 8 - 3
        assert k.shape == (B, H, S - int(ratio * M), D) and v.shape == k.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(device, dtype):
    keys, values, scores = inputs((2, 2, 97, 32), seed=11, dtype=dtype)
    k, v, _ = check_against_reference(keys.to(device), values.to(device), scores.to(device),
                                      ratio=0.6, eps=0.1, sigma=4.0, window=5, sinks=2,
                                      msg=str(dtype))
    assert v.dtype == k.dtype


def test_mixed_dtypes(device):
    keys, values, scores = inputs((1, 2, 50, 16), seed=12)
    k, v, _ = check_against_reference(keys.bfloat16().to(device), values.half().to(device),
                                      scores.double().to(device), ratio=0.5, eps=-1.0, sigma=3.0,
                                      window=0, sinks=0)
    assert k.dtype == torch.bfloat16 and v.dtype == torch.float16


def test_non_contiguous(device):
    """(B, S, H, D) storage seen as (B, H, S, D), as a permuted view of a fused projection."""
    B, H, S, D = 2, 3, 45, 16
    keys, values, scores = inputs((B, H, S, D), seed=13)
    k_nc = keys.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3).to(device)
    v_nc = torch.cat([values, values], dim=-1)[..., ::2].to(device)  # strided last dim
    s_nc = scores.transpose(1, 2).contiguous().transpose(1, 2).to(device)
    assert not k_nc.is_contiguous() and not v_nc.is_contiguous() and not s_nc.is_contiguous()
    kw = dict(ratio=0.5, eps=-1.0, sigma=2.0, window=3, sinks=2)
    a = kv_merge(k_nc, v_nc, s_nc, return_positions=True, **kw)
    b = kv_merge(keys.to(device), torch.cat([values, values], dim=-1)[..., ::2].contiguous().to(device),
                 scores.to(device), return_positions=True, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_constructed_sets_exact():
    """Hand-built keys: tokens 2..4 share a direction (similarity 1), 7..8 too, all other
    neighbours are orthogonal. eps=0.5 leaves exactly 3 candidate pairs; ratio=1 merges them."""
    D = 8
    e = torch.eye(D, dtype=torch.float64)
    rows = [e[0], e[1], 1.0 * e[2], 2.0 * e[2], 3.0 * e[2], e[3], e[4], e[5], 0.5 * e[5], e[6]]
    keys = torch.stack(rows).float()[None, None]
    S = keys.shape[2]
    values = torch.arange(S * 3, dtype=torch.float32).reshape(1, 1, S, 3)
    scores = torch.tensor([[[0.0, 0.0, 0.2, 0.9, 0.1, 0.0, 0.0, 0.3, 0.3, 0.0]]])
    sigma = 1.5
    k, v, pos = kv_merge(keys, values, scores, ratio=1.0, eps=0.5, sigma=sigma,
                         return_positions=True)
    assert pos.tolist() == [[[0, 1, 3, 5, 6, 7, 9]]]  # pivots 3 (top score) and 7 (tie: lower)
    # set {2, 3, 4}, pivot 3 (key 2 e2): distances^2 1, 0, 1
    w = torch.tensor([math.exp(-1 / (2 * sigma ** 2)), 1.0, math.exp(-1 / (2 * sigma ** 2))],
                     dtype=torch.float64)
    w = w / w.sum()
    want_k = (w[:, None] * keys[0, 0, 2:5].double()).sum(0)
    want_v = (w[:, None] * values[0, 0, 2:5].double()).sum(0)
    assert torch.allclose(k[0, 0, 2].double(), want_k, rtol=1e-6, atol=0)
    assert torch.allclose(v[0, 0, 2].double(), want_v, rtol=1e-6, atol=0)
    # set {7, 8}, pivot 7 (key e5): distance^2 0.25
    w2 = torch.tensor([1.0, math.exp(-0.25 / (2 * sigma ** 2))], dtype=torch.float64)
    w2 = w2 / w2.sum()
    assert torch.allclose(v[0, 0, 5].double(), (w2[:, None] * values[0, 0, 7:9].double()).sum(0),
                          rtol=1e-6, atol=0)
    # untouched tokens are exact copies
    for out, src in ((0, 0), (1, 1), (3, 5), (4, 6), (6, 9)):
        assert torch.equal(k[0, 0, out], keys[0, 0, src]) and torch.equal(v[0, 0, out], values[0, 0, src])


def test_budget_prefers_most_similar_pairs():
    """ratio caps the merges: with a budget of one pair, the most similar pair wins."""
    D = 4
    rows = [[1, 0, 0, 0], [1, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0.1], [0, 0, 0, 1], [1, 1, 1, 1]]
    keys = torch.tensor(rows, dtype=torch.float32)[None, None]
    scores = torch.zeros(1, 1, 6)
    values = torch.randn(1, 1, 6, 2)
    # M = 6, int(0.2 * 6) = 1 pair: (2, 3) has similarity 0.995 > (0, 1) 0.894
    _, _, pos = kv_merge(keys, values, scores, ratio=0.2, eps=0.5, return_positions=True)
    assert pos.tolist() == [[[0, 1, 2, 4, 5]]]
    _, _, pos = kv_merge(keys, values, scores, ratio=0.4, eps=0.5, return_positions=True)
    assert pos.tolist() == [[[0, 2, 4, 5]]]
    # eps above both similarities: nothing is a candidate
    k, _, pos = kv_merge(keys, values, scores, ratio=0.4, eps=0.999, return_positions=True)
    assert pos.tolist() == [[[0, 1, 2, 3, 4, 5]]] and torch.equal(k, keys)


def test_heads_share_the_smallest_budget():
    """One head without candidates keeps every head at full length (dense outputs)."""
    keys, values, scores = inputs((1, 2, 30, 8), seed=3)
    same = keys.clone()
    same[0, 1] = keys[0, 1, :1].expand(30, 8) * torch.arange(1, 31.0)[:, None]  # all parallel
    eye = torch.eye(8).repeat(4, 1)[:30]                                      # orthogonal run
    same[0, 0] = eye
    k, v = kv_merge(same, values, scores, ratio=0.5, eps=0.9)
    assert k.shape[2] == 30 and torch.equal(k, same) and torch.equal(v, values)
    k, v = kv_merge(same[:, 1:], values[:, 1:], scores[:, 1:], ratio=0.5, eps=0.9)
    assert k.shape[2] == 15


def test_eps_one_merges_identical_keys_only():
    keys, values, scores = inputs((1, 1, 20, 8), seed=4)
    keys[0, 0, 5:9] = keys[0, 0, 5]  # four identical keys: 3 pairs of similarity 1
    _, _, pos = kv_merge(keys, values, scores, ratio=1.0, eps=1.0, return_positions=True)
    assert pos.shape[2] == 17
    check_against_reference(keys, values, scores, ratio=1.0, eps=1.0, sigma=1.0, window=0, sinks=0)


def test_ratio_zero_is_identity():
    keys, values, scores = inputs((2, 2, 40, 8), seed=6, dtype=torch.bfloat16)
    k, v = kv_merge(keys, values, scores, ratio=0.0)
    assert torch.equal(k, keys) and torch.equal(v, values)
    assert k.data_ptr() != keys.data_ptr()


def test_nan_scores_count_as_minus_infinity():
    keys, values, scores = inputs((1, 1, 24, 8), seed=7)
    scores[0, 0, ::3] = float("nan")
    check_against_reference(keys, values, scores, ratio=1.0, eps=-1.0, sigma=2.0, window=0,
                            sinks=0)


def test_thread_count_independent(restore_threads):
    keys, values, scores = inputs((1, 3, 5000, 32), seed=8)
    kw = dict(ratio=0.5, eps=0.2, sigma=3.0, window=16, sinks=4, return_positions=True)
    restore_threads(1)
    a = kv_merge(keys, values, scores, **kw)
    restore_threads(2)
    b = kv_merge(keys, values, scores, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_numpy_scalars_are_accepted_as_arguments():
    import numpy as np

    keys, values, scores = inputs((1, 2, 30, 8), seed=15)
    want = kv_merge(keys, values, scores, ratio=0.5, sigma=2.0, window=3, sinks=1)
    got = kv_merge(keys, values, scores, ratio=np.float32(0.5), sigma=np.float64(2.0),
                   window=np.int64(3), sinks=np.int32(1))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_vanishing_sigma_keeps_each_pivot():
    """With 2 sigma^2 below the smallest double every token but the pivot weighs 0 and the
    pivot 1 (not 0 / 0): each output token is its pivot's key and value."""
    keys, values, scores = inputs((1, 2, 30, 8), seed=11)
    k, v, pos = kv_merge(keys, values, scores, ratio=0.5, sigma=1e-200, return_positions=True)
    index = pos[..., None]
    assert torch.equal(k, keys.gather(2, index.expand(-1, -1, -1, 8)))
    assert torch.equal(v, values.gather(2, index.expand(-1, -1, -1, 8)))
    check_against_reference(keys, values, scores, ratio=0.5, eps=-1.0, sigma=1e-200, window=0,
                            sinks=0)


def test_non_finite_keys_outside_merged_sets_are_copied():
    keys, values, scores = inputs((1, 1, 24, 8), seed=12)
    keys[0, 0, -1, 0] = float("inf")  # a recent token: never merged
    keys[0, 0, 0, 1] = float("nan")   # a sink
    k, v = kv_merge(keys, values, scores, ratio=1.0, window=2, sinks=1)
    rk, rv, _ = R.kv_merge(keys, values, scores, ratio=1.0, eps=-1.0, sigma=1.0, window=2, sinks=1)
    for got in (k, rk):
        assert torch.equal(got[0, 0, -1], keys[0, 0, -1])
        assert torch.equal(got[0, 0, 0].nan_to_num(), keys[0, 0, 0].nan_to_num())
    assert torch.equal(v[0, 0, [0, -1]], values[0, 0, [0, -1]])
    assert torch.equal(rv[0, 0, [0, -1]], values[0, 0, [0, -1]])


def test_signed_zero_similarities_tie_by_index():
    """Keys too small for the similarity floor give similarities that round to +0 or -0: one
    value, so the lower index goes first, as for any other tie."""
    keys = torch.randn(1, 1, 24, 8, generator=torch.Generator().manual_seed(14)) * 1e-30
    sims = R.adjacent_similarity(keys)
    assert bool((sims == 0).all()) and bool(torch.signbit(sims).any()) and \
        bool((~torch.signbit(sims)).any())
    values, scores = torch.randn(1, 1, 24, 3), torch.rand(1, 1, 24)
    check_against_reference(keys, values, scores, ratio=0.3, eps=-1.0, sigma=1.0, window=0,
                            sinks=0)


def test_empty_value_dim():
    keys, _, scores = inputs((1, 2, 20, 8), seed=13)
    values = torch.zeros(1, 2, 20, 0)
    k, v, _ = check_against_reference(keys, values, scores, ratio=0.5, eps=-1.0, sigma=1.0,
                                      window=0, sinks=0)
    assert v.shape == (1, 2, k.shape[2], 0)


@pytest.mark.parametrize("shape", [(1, 1, 0, 4), (1, 1, 1, 4), (0, 2, 5, 4)])
def test_degenerate_shapes(shape):
    keys, values, scores = (torch.randn(shape), torch.randn(shape), torch.rand(shape[:3]))
    k, v, pos = kv_merge(keys, values, scores, ratio=1.0, return_positions=True)
    assert torch.equal(k, keys) and torch.equal(v, values) and pos.shape == shape[:3]


def test_argument_errors():
    keys, values, scores = inputs((1, 2, 10, 4), seed=9)
    bad = [
        (dict(ratio=1.5), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(ratio=0.5, sigma=0.0), "sigma"),
        (dict(ratio=0.5, sigma=float("inf")), "sigma"),
        (dict(ratio=0.5, eps=float("nan")), "eps"),
        (dict(ratio=0.5, window=-1), "window"),
        (dict(ratio=0.5, sinks=1.5), "sinks"),
    ]
    for kw, name in bad:
        with pytest.raises(InvalidArgumentError, match=name):
            kv_merge(keys, values, scores, **kw)
    with pytest.raises(InvalidArgumentError, match="keys must have shape"):
        kv_merge(keys[0], values, scores, ratio=0.5)
    with pytest.raises(InvalidArgumentError, match="values must have shape"):
        kv_merge(keys, values[:, :1], scores, ratio=0.5)
    with pytest.raises(InvalidArgumentError, match="scores must have shape"):
        kv_merge(keys, values, scores[..., :-1], ratio=0.5)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        kv_merge(keys.long(), values, scores, ratio=0.5)


@pytest.mark.parametrize("eps", [-1.0, 0.1, 0.4])
def test_budget_is_what_kv_merge_removes_and_max_removed_caps_it(device, eps, monkeypatch):
    keys, values, scores = (t.to(device) for t in inputs((2, 3, 300, 16), seed=8))
    kw = dict(ratio=0.6, eps=eps, window=8, sinks=2)
    merged = kv_merge(keys, values, scores, sigma=3.0, **kw)
    n = ops_budget(keys, **kw)
    assert keys.shape[2] - merged[0].shape[2] == n > 0
    capped = kv_merge(keys, values, scores, sigma=3.0, max_removed=n // 2,
                      return_positions=True, **kw)
    assert capped[0].shape[2] == keys.shape[2] - n // 2
    rk, rv, rpos = R.kv_merge(keys.cpu(), values.cpu(), scores.cpu(), sigma=3.0,
                              max_removed=n // 2, **kw)
    assert torch.equal(capped[2].cpu(), rpos)
    assert_close(capped[0].cpu(), rk, "kvmerge", msg="keys")
    from fastmerge import _native

    monkeypatch.setattr(_native, "_C", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert ops_budget(keys, **kw) == n  # the torch path counts alike
    with pytest.raises(InvalidArgumentError, match="max_removed"):
        kv_merge(keys, values, scores, max_removed=-1, **kw)


def test_apply_refuses_a_budget_the_plan_did_not_give(device):
    """The native apply trusts the plan's `removed`; any other must raise, not run past the
    set bounds (on the GPU they would be left unwritten)."""
    from fastmerge import _native
    from fastmerge.ops._validate import capsule, cuda_stream

    keys, values, scores = (t.to(device) for t in inputs((1, 2, 40, 8), seed=3))
    B, H, S, D = keys.shape
    lo, hi = R.mergeable_range(S, 4, 2)
    C, stream = _native.native(), cuda_stream(keys.device)
    sims = torch.empty(B, H, S - 1, device=device)
    removed = C.kv_merge_plan(capsule(keys), capsule(sims), B * H, S, D, lo, hi, 10, 0.99,
                              stream)
    assert 0 <= removed < 10  # eps 0.99: few candidate pairs on random keys
    out_len = S - (removed + 1)
    k_out = torch.empty(B, H, out_len, D, device=device)
    v_out = torch.empty_like(k_out)
    with pytest.raises(NativeKernelError, match=f"sets, expected {out_len}"):
        C.kv_merge_apply(capsule(keys), capsule(values), capsule(scores), capsule(sims),
                         capsule(k_out), capsule(v_out), 0, B * H, S, D, D, lo, hi, 10, 0.99,
                         5.0, removed + 1, stream)


def test_native_passes_refuse_views_that_would_read_out_of_bounds(device):
    """What ops.kv_merge never passes, a direct _C call might: a mergeable range past the
    sequence (the candidate loops index sims by it) or sims of another dtype."""
    from fastmerge import _native
    from fastmerge.ops._validate import capsule, cuda_stream

    keys, values, scores = (t.to(device) for t in inputs((1, 1, 8, 4), seed=16))
    S, D = 8, 4
    C, stream = _native.native(), cuda_stream(keys.device)
    sims = torch.empty(1, 1, S - 1, device=device)
    with pytest.raises(NativeKernelError, match="mergeable range"):
        C.kv_merge_plan(capsule(keys), capsule(sims), 1, S, D, 0, S + 40, 3, -1.0, stream)
    removed = C.kv_merge_plan(capsule(keys), capsule(sims), 1, S, D, 0, S, 3, -1.0, stream)
    k_out = torch.empty(1, 1, S - removed, D, device=device)
    v_out = torch.empty_like(k_out)
    with pytest.raises(NativeKernelError, match="sims must be float32"):
        C.kv_merge_apply(capsule(keys), capsule(values), capsule(scores), capsule(sims.half()),
                         capsule(k_out), capsule(v_out), 0, 1, S, D, D, 0, S, 3, -1.0, 1.0,
                         removed, stream)


def test_native_is_used():
    assert fastmerge.build_info().get("native", True)
    from fastmerge import _native

    assert hasattr(_native.native(), "kv_merge_plan")


cuda_only = pytest.mark.skipif(
    not torch.cuda.is_available() or not fastmerge.build_info().get("cuda"),
    reason="needs a CUDA device and a CUDA build")


@cuda_only
@pytest.mark.parametrize("shape,ratio,eps", [((1, 8, 32768, 128), 0.5, -1.0),
                                             ((2, 4, 3001, 64), 0.95, -1.0),
                                             ((3, 2, 777, 96), 0.6, 0.4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_and_is_deterministic(shape, ratio, eps, dtype):
    keys, values, scores = inputs(shape, seed=21, dtype=dtype)
    kw = dict(ratio=ratio, eps=eps, sigma=5.0, window=64, sinks=4, return_positions=True)
    cpu = kv_merge(keys, values, scores, **kw)
    gpu = kv_merge(keys.cuda(), values.cuda(), scores.cuda(), **kw)
    again = kv_merge(keys.cuda(), values.cuda(), scores.cuda(), **kw)
    for x, y in zip(gpu, again):
        assert torch.equal(x, y)
    assert torch.equal(gpu[2].cpu(), cpu[2])
    assert_close(gpu[0].cpu(), cpu[0], "kvmerge", msg="keys")
    assert_close(gpu[1].cpu(), cpu[1], "kvmerge", msg="values")


# ---- property test: random caches and parameters against the reference ----

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(B=st.integers(1, 2), H=st.integers(1, 3), S=st.integers(2, 80), D=st.integers(1, 20),
       ratio=st.floats(0.0, 1.0), eps=st.sampled_from([-1.0, -0.3, 0.0, 0.2, 0.6, 0.95]),
       sigma=st.floats(0.2, 10.0), window=st.integers(0, 90), sinks=st.integers(0, 90),
       drift=st.sampled_from([0.05, 0.35, 2.0]), seed=st.integers(0, 2**20),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_matches_reference(B, H, S, D, ratio, eps, sigma, window, sinks, drift, seed,
                                    dtype):
    g = torch.Generator().manual_seed(seed)
    keys = smooth_keys((B, H, S, D), seed, dtype, drift=drift)
    values = torch.randn(B, H, S, D + 3, generator=g).to(dtype)
    scores = torch.rand(B, H, S, generator=g).to(dtype)
    check_against_reference(keys, values, scores, ratio=ratio, eps=eps, sigma=sigma,
                            window=window, sinks=sinks)
