"""The pure-torch reference checked against independent statements of the semantics: published
Philox known answers, FNV-1a vectors, Python-sorted top-k, mergekit 0.1.5 itself; plus the
fallback path that serves the reference when _C is missing."""
from __future__ import annotations

import warnings

import pytest
import torch

import fastmerge
import fastmerge.ops as F
from fastmerge import _native
from fastmerge.ops import _reference as R

from helpers import (
    DETERMINISTIC_METHODS,
    GTA_METHODS,
    assert_close,
    make_group,
    mergekit_merge,
    mergekit_params,
    priority_positions,
    randn,
    ref_gta,
    ref_method,
    run_method,
)

M32 = 0xFFFFFFFF


def philox_python(ctr, key):
    """Philox4x32-10 on Python ints, straight from Salmon et al. (SC'11)."""
    c = list(ctr)
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k1) & M32, p0 & M32]
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return tuple(c)


# Known-answer vectors of philox4x32_10 from the Random123 distribution (kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    assert philox_python(ctr, key) == expected
    cs = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    got = R.philox4x32_10(*cs, key[0], key[1])
    assert tuple(int(w) for w in got) == expected


def test_philox_words_follow_the_counter_layout():
    # element i: word i % 4 of block (i // 4 low, i // 4 high, expert, stream), key = seed halves
    seed, stream, expert = 0x0123456789ABCDEF, 0xDEADBEEF, 7
    n = 23
    words = R.philox_words(n, seed, stream, expert).tolist()
    for i in range(n):
        block = philox_python((i // 4 & M32, i // 4 >> 32, expert, stream),
                              (seed & M32, seed >> 32))
        assert words[i] == block[i % 4], i
    # a counter above 2^32 (element index > 2^34) exercises the high counter word
    blocks = torch.tensor([2**32 + 5], dtype=torch.int64)
    got = R.philox4x32_10(blocks & M32, blocks >> 32, torch.tensor([1]), torch.tensor([2]), 3, 4)
    assert tuple(int(w) for w in got) == philox_python((5, 1, 1, 2), (3, 4))


def test_uniforms_are_24_bit_and_uniform():
    u = R.philox_uniforms(200_000, seed=1, stream=2, expert=0)
    assert u.dtype == torch.float32
    words = R.philox_words(200_000, 1, 2, 0)
    assert torch.equal(u.double(), (words >> 8).double() / 2**24)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    # mean of 2e5 U(0,1): sd = 0.2887 / sqrt(2e5) = 6.5e-4
    assert abs(float(u.double().mean()) - 0.5) < 6 * 6.5e-4


def test_stream_hash_is_fnv1a():
    from fastmerge.ops._validate import stream_hash

    # FNV-1a 32-bit test vectors (Fowler/Noll/Vo reference).
    assert stream_hash("") == 0x811C9DC5
    assert stream_hash("a") == 0xE40C292C
    assert stream_hash("foobar") == 0xBF9CF968


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5, 7), (50, 40)])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.5, 0.999, 1.0])
def test_reference_magnitude_mask_matches_python_sort(shape, density):
    x = randn(shape, seed=3)
    # some exact ties, including +0 / -0
    flat = x.reshape(-1)
    if flat.numel() >= 7:
        flat[1] = -flat[5]
        flat[2] = 0.0
        flat[3] = -0.0
    n = flat.numel()
    k = 0 if density <= 0 else n if density >= 1 else max(1, int(density * n))
    expected = (priority_positions(x) < k).reshape(shape)
    assert torch.equal(R.magnitude_mask(x, density), expected)


def test_reference_della_rank_norm_by_hand():
    # dim 1 is the rank axis; ties: the lower index ranks higher
    x = torch.tensor([[[3.0, 1.0], [-3.0, 2.0], [0.5, 2.0]]])  # (1, 3, 2)
    got = R.della_rank_norm(x.reshape(-1), x.shape).reshape(1, 3, 2)
    # column 0: |3| (index 0) > |-3| (index 1, tie -> lower) > 0.5 -> ranks 2, 1, 0
    # column 1: 1 < 2 (index 1) and 2 (index 2): index 1 ranks higher -> 0, 2, 1
    expected = torch.tensor([[[1.0, 0.0], [0.5, 1.0], [0.0, 0.5]]])
    assert torch.equal(got, expected)
    assert torch.equal(R.della_rank_norm(torch.tensor([4.0]), (1,)), torch.tensor([0.5]))


@pytest.mark.parametrize("method", DETERMINISTIC_METHODS)
@pytest.mark.parametrize("shape", [(4097,), (3, 5, 7), (64, 33)])
def test_reference_equals_mergekit_fp32(method, shape):
    pytest.importorskip("mergekit")
    base, experts = make_group(shape, 3, seed=11)
    weight = [0.6, 1.0, -0.3]
    density = None if method == "task_arithmetic" else 0.35
    gamma = 0.05 if method.startswith("breadcrumbs") else None
    expected = mergekit_merge(method, [base] + experts,
                              mergekit_params(method, weight, density, gamma=gamma))
    got = ref_method(method, base, experts, weight, density if density is not None else 1.0,
                     gamma=gamma if gamma is not None else 0.01)
    assert_close(got, expected, "mergekit_exact")


def test_reference_handles_empty_and_zero_dim():
    e = torch.empty(0, 3)
    out = ref_gta(e, [e, e], [1.0, 1.0], density=0.5, sparsification="magnitude", consensus="sum")
    assert out.shape == (0, 3)
    z = torch.tensor(2.0)
    out = ref_gta(z, [torch.tensor(3.0)], 1.0, density=0.5, sparsification="magnitude")
    assert out.shape == () and float(out) == 3.0
    assert R.magnitude_mask(torch.empty(0), 0.5).shape == (0,)


@pytest.fixture
def without_native(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@pytest.mark.parametrize("method", sorted(GTA_METHODS))
def test_fallback_without_native_matches_native(method):
    """Without _C the public ops serve the reference (with the same dtype handling)."""
    base, experts = make_group((33, 17), 2, seed=5, dtype=torch.bfloat16)
    weight, density = [0.7, 0.4], 0.4
    native = run_method(method, base, experts, weight, density)
    import fastmerge._native as nat

    saved = nat._C
    try:
        nat._C = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fallback = run_method(method, base, experts, weight, density)
    finally:
        nat._C = saved
    assert fallback.dtype == native.dtype == torch.bfloat16
    sp, _, _, rescale = GTA_METHODS[method]
    assert_close(native, fallback, "l1_rescale" if rescale else "exact",
                 scale=float((fallback.float() - base.float()).abs().max()))


def test_fallback_other_ops(without_native):
    x = randn((40, 9), seed=2)
    y = randn((40, 9), seed=3)
    assert fastmerge.ops.magnitude_mask(x, 0.3).dtype == torch.bool
    assert F.slerp(x, y, 0.3, out_dtype=torch.float16).dtype == torch.float16
    assert F.model_stock(x, [y, x * 2], filter_wise=True).shape == (40, 9)
    with pytest.raises(fastmerge.NativeUnavailableError):
        fastmerge.set_num_threads(1)
