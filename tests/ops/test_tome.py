"""ToMe ops (fastmerge.ops.tome_*) against the step-by-step torch reference of ToMe's published
algorithm (ops/_reference/tome.py): indices exactly on tie-free inputs, merged values within the
named tolerance, our documented tie-break on tied inputs, and the same result for any thread
count and for both CPU paths (bf16-screened and exact)."""
import warnings

import pytest
import torch

import fastmerge.ops as F
from fastmerge import _native
from fastmerge.errors import InvalidArgumentError
from fastmerge.ops import _reference as R
from fastmerge.ops.tome import maps_from_scores
from fastmerge.ops._validate import capsule

from helpers import assert_close

TOKEN_FLAGS = [(False, False), (True, False), (True, True), (False, True)]
GAP = 1e-5  # well above the fp32 error of a similarity (~1e-6)


def _separated(metric: torch.Tensor, class_token: bool, distill_token: bool) -> bool:
    """True when row maxima and their order are decided by more than GAP (fp64 scores)."""
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    if distill_token:
        b = b[:, 1:]
    if class_token:
        a = a[:, 1:]
    if a.shape[1] == 0 or b.shape[1] == 0:
        return True
    s = a @ b.transpose(1, 2)
    if s.shape[2] > 1:
        top = s.topk(2, dim=2).values
        if bool(((top[..., 0] - top[..., 1]) <= GAP).any()):
            return False
    best = s.max(dim=2).values.sort(dim=1).values
    return not bool(((best[:, 1:] - best[:, :-1]) <= GAP).any())


def tie_free(B, N, C, *, seed, class_token=False, distill_token=False, dtype=torch.float32):
    for attempt in range(200):
        g = torch.Generator().manual_seed(seed * 1000 + attempt)
        metric = torch.randn(B, N, C, generator=g, dtype=torch.float64).to(dtype)
        if _separated(metric, class_token, distill_token):
            return metric
    raise AssertionError("no tie-free metric found")


def reference(metric, r, class_token, distill_token):
    """(clamped r, ToMe's maps), the maps None when r <= 0 (ToMe does nothing)."""
    r = R.tome_clamp_r(metric.shape[1], r, class_token, distill_token)
    return r, (R.tome_match(metric, r, class_token, distill_token) if r > 0 else (None,) * 3)


@pytest.mark.parametrize("class_token,distill_token", TOKEN_FLAGS)
@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 8, 13, 64, 197])
@pytest.mark.parametrize("r_fraction", [0.0, 0.25, 0.5, 2.0])
def test_match_and_merge_match_reference(N, r_fraction, class_token, distill_token):
    B, C = 3, 16
    metric = tie_free(B, N, C, seed=N, class_token=class_token, distill_token=distill_token)
    r_in = int(round(r_fraction * N))
    maps = F.tome_match(metric, r_in, class_token=class_token, distill_token=distill_token)
    r, (unm, src, dst) = reference(metric, r_in, class_token, distill_token)
    assert maps.r == r and maps.tokens == N and maps.merged_tokens == N - r
    if r > 0:
        assert torch.equal(maps.unm_idx, unm) and torch.equal(maps.src_idx, src)
        assert torch.equal(maps.dst_idx, dst)
    x = torch.randn(B, N, 24)
    merged, size = F.tome_merge(x, maps)
    if r == 0:  # ToMe does nothing
        assert torch.equal(merged, x) and torch.equal(size, torch.ones(B, N, 1))
        return
    ref_x, ref_size = R.tome_merge_wavg(x, unm, src, dst, None, distill_token)
    assert_close(merged, ref_x, "tome_merge")
    assert torch.equal(size, ref_size)
    assert_close(F.tome_unmerge(merged, maps), R.tome_unmerge(ref_x, unm, src, dst, N, distill_token),
                 "tome_merge")
    assert torch.equal(F.tome_merge_source(None, maps),
                       R.tome_merge_source(None, unm, src, dst, N, distill_token))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("class_token,distill_token", TOKEN_FLAGS[:3])
def test_dtypes_and_sizes(dtype, class_token, distill_token):
    B, N, C = 2, 50, 32
    metric = tie_free(B, N, C, seed=7, class_token=class_token, distill_token=distill_token,
                      dtype=dtype)
    maps = F.tome_match(metric, 12, class_token=class_token, distill_token=distill_token)
    r, (unm, src, dst) = reference(metric, 12, class_token, distill_token)
    assert torch.equal(maps.src_idx, src) and torch.equal(maps.dst_idx, dst)
    assert torch.equal(maps.unm_idx, unm)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, N, 40, generator=g).to(dtype)
    size = torch.randint(1, 5, (B, N, 1), generator=g).to(dtype)
    merged, merged_size = F.tome_merge(x, maps, size)
    assert merged.dtype == dtype and merged_size.dtype == dtype
    ref_x, ref_size = R.tome_merge_wavg(x, unm, src, dst, size, distill_token)
    assert_close(merged, ref_x, "tome_merge")
    assert torch.equal(merged_size.float(), ref_size)
    # A second merge with the returned sizes (as in consecutive ToMe layers).
    maps2 = F.tome_match(merged.float(), 5, class_token=class_token, distill_token=distill_token)
    again, again_size = F.tome_merge(merged, maps2, merged_size)
    ref2 = R.tome_merge_wavg(merged, maps2.unm_idx, maps2.src_idx, maps2.dst_idx, merged_size,
                             distill_token)
    assert_close(again, ref2[0], "tome_merge")
    assert torch.equal(again_size.float(), ref2[1])
    assert float(again_size.float().sum()) == float(size.float().sum())  # sizes are conserved


def test_non_contiguous_inputs():
    base = tie_free(2, 64, 48, seed=11, class_token=True)
    metric = base.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not metric.is_contiguous()
    maps = F.tome_match(metric, 20, class_token=True)
    r, (unm, src, dst) = reference(base, 20, True, False)
    assert torch.equal(maps.src_idx, src) and torch.equal(maps.unm_idx, unm)
    x = torch.randn(2, 64, 30)[:, :, ::2]
    merged, _ = F.tome_merge(x, maps)
    assert_close(merged, R.tome_merge_wavg(x, unm, src, dst)[0], "tome_merge")


def test_row_maxima_values_match_reference():
    metric = torch.randn(2, 300, 40)
    best = torch.empty(2, 150)
    idx = torch.empty(2, 150, dtype=torch.int64)
    _native.native().tome_scores(capsule(metric), True, True, None, capsule(best), capsule(idx), 0)
    scores = R.tome_scores(metric, True, True)
    assert torch.isinf(best[:, 0]).all() and (idx[:, 0] == 0).all()
    picked = scores[:, 1:].gather(2, idx[:, 1:, None])[..., 0]
    assert_close(best[:, 1:], scores[:, 1:].max(dim=2).values, "tome_similarity", scale=1.0)
    assert_close(picked, best[:, 1:], "tome_similarity", scale=1.0)
    assert (idx[:, 1:] > 0).all()  # the distill token (b-token 0) never receives


def test_tie_break_on_identical_tokens():
    """All tokens equal: every similarity ties, so our rule decides everything: row maxima
    at the lowest b index (1 with a distill token), edges by ascending a index."""
    B, N, r = 2, 11, 4
    metric = torch.ones(B, N, 8)
    maps = F.tome_match(metric, r)
    assert maps.src_idx.tolist() == [[0, 1, 2, 3]] * B
    assert maps.dst_idx.tolist() == [[0, 0, 0, 0]] * B
    assert maps.unm_idx.tolist() == [[4, 5]] * B
    maps = F.tome_match(metric, r, class_token=True, distill_token=True)
    assert maps.src_idx.tolist() == [[1, 2, 3, 4]] * B
    assert maps.dst_idx.tolist() == [[1, 1, 1, 1]] * B
    assert maps.unm_idx.tolist() == [[0, 5]] * B


def _quantised(B, N, C, seed):
    """Many exactly repeated tokens: heavy ties in similarity and in the edge order."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(6, C, generator=g)
    return protos[torch.randint(0, 6, (B, N), generator=g)]


def _maps_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[:6], b[:6]))


@pytest.mark.parametrize("class_token", [False, True])
def test_same_result_for_1_and_2_threads(class_token, restore_threads):
    for metric in (_quantised(3, 1500, 40, seed=1), torch.randn(5, 1100, 24)):
        restore_threads(1)
        one = F.tome_match(metric, 400, class_token=class_token)
        x1 = F.tome_merge(metric, one)[0]
        restore_threads(2)
        two = F.tome_match(metric, 400, class_token=class_token)
        assert _maps_equal(one, two)
        assert torch.equal(F.tome_merge(metric, two)[0], x1)


@pytest.mark.parametrize("make", ["random", "quantised", "near_duplicates"])
def test_screened_path_equals_exact_path(make, monkeypatch):
    """The bf16-screened CPU path must give the canonical scores: maps identical to the
    exact fp32 path, including on ties and on rows with many near-maximal columns."""
    g = torch.Generator().manual_seed(5)
    if make == "random":
        metric = torch.randn(2, 2100, 72, generator=g)
    elif make == "quantised":
        metric = _quantised(2, 2100, 72, seed=2)
    else:  # tiny perturbations of a few prototypes: many columns within the bf16 error
        metric = _quantised(2, 2100, 72, seed=3) + 1e-4 * torch.randn(2, 2100, 72, generator=g)
    for class_token, distill_token in TOKEN_FLAGS:
        monkeypatch.setenv("FASTMERGE_TOME_SCREEN", "1")
        screened = F.tome_match(metric, 700, class_token=class_token, distill_token=distill_token)
        monkeypatch.setenv("FASTMERGE_TOME_SCREEN", "0")
        exact = F.tome_match(metric, 700, class_token=class_token, distill_token=distill_token)
        assert _maps_equal(screened, exact)


@pytest.mark.parametrize("class_token,distill_token", TOKEN_FLAGS)
def test_torch_map_builder_equals_native(class_token, distill_token):
    """The maps the CUDA path builds with torch sorts equal the CPU kernel's."""
    for metric in (torch.randn(3, 91, 16), _quantised(2, 120, 16, seed=4)):
        B, N, _ = metric.shape
        na = (N + 1) // 2
        best = torch.empty(B, na)
        idx = torch.empty(B, na, dtype=torch.int64)
        _native.native().tome_scores(capsule(metric), class_token, distill_token, None,
                                     capsule(best), capsule(idx), 0)
        for r in (1, 17, 40):
            native = F.tome_match(metric, r, class_token=class_token, distill_token=distill_token)
            built = maps_from_scores(best, idx, native.r, N, class_token, distill_token)
            assert _maps_equal(native, built)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("class_token,distill_token", TOKEN_FLAGS)
def test_without_native_kernels_equals_native(B, class_token, distill_token, monkeypatch):
    """The path of a build without _C (and, for the maps, of CUDA): scores from the torch
    reference, maps from maps_from_scores, returned through the custom op."""
    metric, x = torch.randn(B, 37, 12), torch.randn(B, 37, 5)
    native = F.tome_match(metric, 9, class_token=class_token, distill_token=distill_token)
    monkeypatch.setattr(_native, "_C", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fallback = F.tome_match(metric, 9, class_token=class_token, distill_token=distill_token)
        assert _maps_equal(fallback, native)
        assert all(t.is_contiguous() for t in fallback[:6])
        assert_close(F.tome_merge(x, fallback)[0], F.tome_merge(x, native)[0], "exact")


def test_nan_metric_is_deterministic():
    metric = torch.randn(1, 40, 8)
    metric[0, 6] = 0.0  # zero norm: NaN similarities, ranked above every number
    a = F.tome_match(metric, 10)
    b = F.tome_match(metric, 10)
    assert _maps_equal(a, b)
    assert int(a.src_idx[0, 0]) == 3  # the NaN row is the first edge


def test_merge_source_propagates_nan_like_torch_amax():
    # A NaN in any token a row holds makes that row's entry NaN, whichever member comes first.
    B, N = 2, 31
    metric = tie_free(B, N, 8, seed=5)
    maps = F.tome_match(metric, 9)
    r, (unm, src, dst) = reference(metric, 9, False, False)
    g = torch.Generator().manual_seed(6)
    source = torch.rand(B, N, 17, generator=g)
    source[0, 1::3, 2] = float("nan")     # b tokens: the first member of a destination row
    source[1, 0::4, 5] = float("nan")     # a tokens: merged sources and kept tokens
    got = F.tome_merge_source(source, maps)
    want = R.tome_merge_source(source, unm, src, dst, N)
    assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(-7.0), want.nan_to_num(-7.0))


def test_merge_gradient_matches_reference():
    metric = tie_free(2, 30, 8, seed=9, class_token=True)
    maps = F.tome_match(metric, 9, class_token=True)
    size = torch.randint(1, 4, (2, 30, 1)).float()
    x = torch.randn(2, 30, 6, dtype=torch.float32, requires_grad=True)
    w = torch.randn(2, 21, 6)
    (F.tome_merge(x, maps, size)[0] * w).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    out = R.tome_merge_wavg(x_ref, maps.unm_idx, maps.src_idx, maps.dst_idx, size)[0]
    (out * w).sum().backward()
    assert_close(x.grad, x_ref.grad, "tome_merge")


def test_ops_compile():
    metric = tie_free(2, 40, 16, seed=13, class_token=True)
    x = torch.randn(2, 40, 8)

    def step(metric, x):
        maps = F.tome_match(metric, 10, class_token=True)
        merged, size = F.tome_merge(x, maps)
        return merged, size, F.tome_unmerge(merged, maps), F.tome_merge_source(None, maps)

    eager = step(metric, x)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(metric, x)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_float64_inputs_compute_in_float32():
    metric = tie_free(2, 20, 8, seed=17).double()
    maps = F.tome_match(metric, 5)
    _, (unm, src, dst) = reference(metric, 5, False, False)
    assert torch.equal(maps.src_idx, src)
    x, size = torch.randn(2, 20, 4, dtype=torch.float64), torch.full((2, 20, 1), 2.0).double()
    merged, merged_size = F.tome_merge(x, maps, size)
    assert merged.dtype == torch.float32 and merged_size.dtype == torch.float32
    assert_close(merged, R.tome_merge_wavg(x, unm, src, dst, size)[0], "tome_merge")


def test_errors_name_the_value():
    with pytest.raises(InvalidArgumentError, match="metric must be"):
        F.tome_match(torch.randn(4, 8), 2)
    with pytest.raises(InvalidArgumentError, match="r must be an int"):
        F.tome_match(torch.randn(1, 4, 8), 1.5)
    with pytest.raises(InvalidArgumentError, match="int64"):
        F.tome_match(torch.zeros(1, 4, 8, dtype=torch.int64), 1)
    maps = F.tome_match(torch.randn(1, 10, 8), 2)
    with pytest.raises(InvalidArgumentError, match=r"x has shape \(1, 9, 4\)"):
        F.tome_merge(torch.randn(1, 9, 4), maps)
    with pytest.raises(InvalidArgumentError, match="size has shape"):
        F.tome_merge(torch.randn(1, 10, 4), maps, torch.ones(1, 10))
    with pytest.raises(InvalidArgumentError, match="size is on meta but x is on cpu"):
        F.tome_merge(torch.randn(1, 10, 4), maps, torch.ones(1, 10, 1, device="meta"))


@pytest.mark.parametrize("field", ["offsets", "members", "dest"])
def test_maps_of_another_index_dtype_are_refused(field):
    """The kernels read offsets/members as int64: narrower maps would be read past their end."""
    x = torch.randn(1, 6, 4)
    maps = F.tome_match(torch.randn(1, 6, 4), 2)
    narrow = maps._replace(**{field: getattr(maps, field).to(torch.uint8)})
    with pytest.raises(InvalidArgumentError, match=f"maps.{field} must be an int64"):
        F.tome_merge(x, narrow)


def test_native_merge_refuses_maps_of_another_dtype():
    from fastmerge import _native
    from fastmerge.errors import NativeKernelError
    from fastmerge.ops._validate import capsule

    x = torch.randn(1, 6, 4)
    maps = F.tome_match(torch.randn(1, 6, 4), 2)
    out = torch.empty(1, 4, 4)
    with pytest.raises(NativeKernelError, match="int64"):
        _native.native().tome_merge(capsule(x), None, capsule(maps.offsets.to(torch.uint8)),
                                    capsule(maps.members), capsule(out), None, True, 0)


def test_zero_channels_match_like_equal_scores():
    """No channels: every similarity is 0, so each a-token's best is the first eligible b-token
    and the edges keep token order, as with identical tokens."""
    maps = F.tome_match(torch.randn(2, 9, 0), 3)
    same = F.tome_match(torch.ones(2, 9, 4), 3)
    assert _maps_equal(maps, same)
    merged, size = F.tome_merge(torch.randn(2, 9, 0), maps)
    assert merged.shape == (2, 6, 0) and torch.equal(size, F.tome_merge(torch.ones(2, 9, 1), same)[1])


# ---- CUDA against the CPU kernels: the same canonical similarities and reduction order ----

cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not _native.build_info().get("cuda"),
    reason="needs a CUDA device and a CUDA build")


@cuda
@pytest.mark.parametrize("class_token,distill_token", TOKEN_FLAGS)
@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 13, 5), (2, 197, 64), (2, 1100, 40),
                                   (3, 9, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_equals_cpu(shape, dtype, class_token, distill_token):
    B, N, C = shape
    for metric in (torch.randn(B, N, C).to(dtype), _quantised(B, N, C, seed=6).to(dtype)):
        r = N // 3
        cpu = F.tome_match(metric, r, class_token=class_token, distill_token=distill_token)
        gpu = F.tome_match(metric.cuda(), r, class_token=class_token, distill_token=distill_token)
        assert _maps_equal([t.cpu() for t in gpu[:6]], cpu)
        x = torch.randn(B, N, 33).to(dtype)
        size = torch.randint(1, 4, (B, N, 1)).to(dtype)
        for s in (None, size):
            got = F.tome_merge(x.cuda(), gpu, None if s is None else s.cuda())
            want = F.tome_merge(x, cpu, s)
            assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
        assert torch.equal(F.tome_merge_source(None, gpu).cpu(), F.tome_merge_source(None, cpu))
        assert torch.equal(F.tome_unmerge(x.cuda()[:, :N - cpu.r], gpu).cpu(),
                           F.tome_unmerge(x[:, :N - cpu.r], cpu))


# ---- property test: random shapes, r and token flags against ToMe's algorithm ----

from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(B=st.integers(1, 3), N=st.integers(1, 70), C=st.integers(2, 24), r=st.integers(0, 40),
       flags=st.sampled_from(TOKEN_FLAGS), seed=st.integers(0, 2**20),
       sized=st.booleans())
def test_property_match_and_merge_match_reference(B, N, C, r, flags, seed, sized):
    class_token, distill_token = flags
    g = torch.Generator().manual_seed(seed)
    metric = None
    for _ in range(20):  # a draw whose maxima are separated, else skip the example
        candidate = torch.randn(B, N, C, generator=g, dtype=torch.float64).float()
        if _separated(candidate, class_token, distill_token):
            metric = candidate
            break
    assume(metric is not None)
    maps = F.tome_match(metric, r, class_token=class_token, distill_token=distill_token)
    clamped, (unm, src, dst) = reference(metric, r, class_token, distill_token)
    assert maps.r == clamped and maps.merged_tokens == N - clamped
    x = torch.randn(B, N, 5, generator=g)
    size = torch.randint(1, 5, (B, N, 1), generator=g).float() if sized else None
    merged, merged_size = F.tome_merge(x, maps, size)
    if clamped == 0:
        assert torch.equal(merged, x)
        return
    assert torch.equal(maps.unm_idx, unm) and torch.equal(maps.src_idx, src)
    assert torch.equal(maps.dst_idx, dst)
    ref_x, ref_size = R.tome_merge_wavg(x, unm, src, dst, size, distill_token)
    assert_close(merged, ref_x, "tome_merge")
    assert torch.equal(merged_size, ref_size)
    assert torch.equal(F.tome_merge_source(None, maps),
                       R.tome_merge_source(None, unm, src, dst, N, distill_token))
