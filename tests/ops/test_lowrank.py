"""Factored low-rank merges (ops/lowrank.py): lowrank_svd and concatenated_svd against dense
float64 SVDs, KnOTS against the dense reference written from the paper
(ops/_reference/lowrank.py), in both the factored default and exact mode."""
import pytest
import torch

from fastmerge import ops
from fastmerge.errors import InvalidArgumentError
from fastmerge.ops._reference import lowrank as ref


def adapters(m, n, ranks, seed=0, scale=0.05):
    """LoRA factors as training leaves them: B (m x r) and A (r x n), products of size ~scale."""
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(m, r, generator=g) * scale for r in ranks]
    as_ = [torch.randn(r, n, generator=g) / n ** 0.5 for r in ranks]
    return bs, as_


def dense(bs, as_):
    return [b.double() @ a.double() for b, a in zip(bs, as_)]


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_orthonormal_columns(u, tol=1e-5):
    eye = torch.eye(u.shape[1], dtype=torch.float64)
    assert float((u.double().mT @ u.double() - eye).abs().max()) < tol


# ---- lowrank_svd: the SVD of a weighted sum of products ----

@pytest.mark.parametrize("m,n,ranks", [(64, 48, [4, 4, 4]), (30, 200, [8, 3]),
                                       (200, 20, [16, 16]), (12, 10, [8, 8, 8])])
@pytest.mark.parametrize("exact", [False, True])
def test_lowrank_svd_is_the_svd_of_the_weighted_sum(m, n, ranks, exact, device):
    bs, as_ = adapters(m, n, ranks, seed=m + n)
    weights = [0.5, -1.25, 2.0][:len(ranks)]
    u, s, vh = ops.lowrank_svd([b.to(device) for b in bs], [a.to(device) for a in as_],
                               weights=weights, exact=exact)
    assert u.device.type == device.type
    u, s, vh = u.cpu(), s.cpu(), vh.cpu()
    total = sum(w * d for w, d in zip(weights, dense(bs, as_)))
    expected = torch.linalg.svdvals(total)
    k = s.numel()
    assert k == min(m, n, sum(ranks))
    assert torch.allclose(s.double(), expected[:k], rtol=1e-5, atol=1e-7 * float(expected[0]))
    assert rel_err((u * s) @ vh, total) < 1e-5
    assert_orthonormal_columns(u)
    assert_orthonormal_columns(vh.mT)
    assert bool((s[:-1] >= s[1:]).all())


def test_lowrank_svd_drops_the_directions_a_rank_deficient_sum_lacks():
    bs, as_ = adapters(50, 40, [6, 6], seed=3)
    bs[1] = bs[0].clone()                    # the second update reuses the first's columns
    u, s, vh = ops.lowrank_svd(bs, as_)
    assert s.numel() == 6                    # the sum B0 (A0 + A1) has rank 6, not 12
    assert rel_err((u * s) @ vh, sum(dense(bs, as_))) < 1e-5


def test_lowrank_svd_of_zero_updates_is_empty():
    bs, as_ = adapters(20, 10, [3, 3])
    u, s, vh = ops.lowrank_svd([torch.zeros_like(b) for b in bs], as_)
    assert (u.shape, s.shape, vh.shape) == ((20, 0), (0,), (0, 10))


# ---- concatenated_svd: KnOTS's decomposition ----

@pytest.mark.parametrize("m,n,ranks", [(64, 48, [4, 4, 4]), (40, 90, [8, 2, 5]),
                                       (20, 300, [16, 16])])
def test_concatenated_svd_factored_matches_the_dense_decomposition(m, n, ranks):
    bs, as_ = adapters(m, n, ranks, seed=7)
    u, s, blocks = ops.concatenated_svd(bs, as_)
    u_e, s_e, blocks_e = ops.concatenated_svd(bs, as_, exact=True)
    assert torch.allclose(s, s_e, rtol=1e-10, atol=1e-12 * float(s_e[0]))
    # Each task's update is recovered from the shared basis and its own coordinates.
    for d, v in zip(dense(bs, as_), blocks):
        assert rel_err(u @ (s.unsqueeze(1) * v), d) < 1e-10
    stacked = torch.cat(blocks, dim=1)
    assert_orthonormal_columns(u, 1e-10)
    assert_orthonormal_columns(stacked.mT, 1e-10)
    assert s.numel() == min(m, sum(ranks))


# ---- KnOTS ----

CASES = [("magnitude", 1.0), ("magnitude", 0.5), ("magnitude", 0.1), ("random", 0.3),
         ("random", 1.0)]


@pytest.mark.parametrize("sparsification,density", CASES)
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("m,n,ranks", [(64, 48, [4, 4, 4]), (96, 40, [8, 2, 5, 3])])
def test_knots_matches_the_dense_reference(sparsification, density, exact, m, n, ranks, device):
    bs, as_ = adapters(m, n, ranks, seed=len(ranks))
    weights = [1.0, 0.5, 2.0, 1.5][:len(ranks)]
    b, a = ops.knots([x.to(device) for x in bs], [x.to(device) for x in as_], weights=weights,
                     density=density, sparsification=sparsification, lambda_=0.6, seed=11,
                     name="layer.q_proj", exact=exact)
    assert b.dtype == a.dtype == torch.float32 and b.device.type == a.device.type == device.type
    b, a = b.cpu(), a.cpu()
    assert b.shape[0] == m and a.shape[1] == n and b.shape[1] == a.shape[0]
    expected = ref.knots(dense(bs, as_), weights=weights, density=density,
                         sparsification=sparsification, lambda_=0.6, seed=11,
                         name="layer.q_proj")
    # cuSOLVER rounds the float64 decomposition differently; the GTA kernels agree exactly
    assert rel_err(b @ a, expected) < (2e-6 if device.type == "cpu" else 1e-5)


def test_knots_of_one_adapter_at_full_density_is_its_update():
    bs, as_ = adapters(70, 30, [5])
    b, a = ops.knots(bs, as_)
    assert rel_err(b @ a, dense(bs, as_)[0]) < 1e-6


def test_knots_of_identical_adapters_is_their_common_update():
    bs, as_ = adapters(40, 36, [4])
    b, a = ops.knots(bs * 3, as_ * 3, density=0.4)
    # [D, D, D] = U (sqrt(3) S) [V^T, V^T, V^T] / sqrt(3): every task's coordinates are D's
    # own S V^T, TIES keeps the same entries of each, the signs agree and the mean of equal
    # values is that value, so the merge is what one copy alone gives.
    alone_b, alone_a = ops.knots(bs, as_, density=0.4)
    assert rel_err(b @ a, alone_b @ alone_a) < 1e-5
    assert rel_err(alone_b @ alone_a, dense(bs, as_)[0]) > 0.1  # density 0.4 did prune


def test_knots_result_does_not_depend_on_the_singular_vectors_signs():
    bs, as_ = adapters(50, 44, [4, 4], seed=5)
    # Negating a factor pair leaves every update unchanged but flips directions of the SVD.
    flipped_b = [bs[0], -bs[1]]
    flipped_a = [as_[0], -as_[1]]
    one = ops.knots(bs, as_, density=0.3)
    two = ops.knots(flipped_b, flipped_a, density=0.3)
    assert rel_err(two[0] @ two[1], one[0] @ one[1]) < 1e-6


def test_knots_of_zero_updates_is_an_empty_factor_pair():
    bs, as_ = adapters(20, 16, [2, 2])
    b, a = ops.knots([torch.zeros_like(x) for x in bs], as_)
    assert b.shape == (20, 0) and a.shape == (0, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_knots_half_precision_factors(dtype):
    bs, as_ = adapters(48, 32, [4, 4], seed=9)
    low_b, low_a = [b.to(dtype) for b in bs], [a.to(dtype) for a in as_]
    b, a = ops.knots(low_b, low_a, density=0.5)
    assert b.dtype == a.dtype == dtype
    expected = ref.knots(dense(low_b, low_a), weights=[1.0, 1.0], density=0.5,
                         sparsification="magnitude", lambda_=1.0)
    assert rel_err(b.double() @ a.double(), expected) < 2e-2  # factors rounded to dtype


@pytest.mark.parametrize("kwargs,match", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"),
    (dict(sparsification="della"), "sparsification"), (dict(exact=1), "exact"),
    (dict(weights=[1.0]), "weights"),
])
def test_knots_rejects_bad_arguments(kwargs, match):
    bs, as_ = adapters(10, 8, [2, 2])
    with pytest.raises(InvalidArgumentError, match=match):
        ops.knots(bs, as_, **kwargs)


@pytest.mark.parametrize("op", ["knots", "lowrank_svd", "concatenated_svd"])
def test_non_finite_factors_are_refused_by_name(op):
    bs, as_ = adapters(10, 8, [2, 2])
    as_[1] = as_[1].clone()
    as_[1][0, 0] = float("inf")
    with pytest.raises(InvalidArgumentError, match=r"\[1\] has 1 NaN/Inf"):
        getattr(ops, op)(bs, as_)


def test_knots_rejects_mismatched_factors():
    bs, as_ = adapters(10, 8, [2, 3])
    with pytest.raises(InvalidArgumentError, match="rank"):
        ops.knots(bs, [as_[1], as_[0]])
    with pytest.raises(InvalidArgumentError, match="12 x 8"):
        ops.knots([bs[0], torch.zeros(12, 3)], as_)
    with pytest.raises(InvalidArgumentError, match="equal"):
        ops.knots(bs, as_[:1])
