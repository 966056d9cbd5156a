"""fastmerge.ops.batched_svd against torch.linalg.svd (LAPACK, float64 where it is the oracle)
and against the defining properties of a thin SVD: reconstruction, orthonormal singular
vectors, non-negative singular values in descending order."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastmerge
from fastmerge import ops
from fastmerge.errors import InvalidArgumentError

SHAPES = [(1, 1), (5, 3), (3, 5), (1, 7), (7, 1), (64, 64), (4, 100, 30), (2, 3, 30, 100),
          (300, 40), (256, 256), (400, 40), (2, 12, 200), (3, 1, 9), (9, 1)]


def random_matrix(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def with_spectrum(m, n, singular_values, seed=0):
    """A random m x n matrix with exactly these singular values (float64)."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    q1, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q1 @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ q2.T


def check_svd(x, u, s, vh, tol=2e-5):
    *batch, m, n = x.shape
    k = min(m, n)
    assert u.shape == (*batch, m, k) and s.shape == (*batch, k) and vh.shape == (*batch, k, n)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    x64 = x.double()
    scale = max(float(torch.linalg.matrix_norm(x64, ord=2).max()) if x.numel() else 0.0, 1e-30)
    rebuilt = (u.double() * s.double().unsqueeze(-2)) @ vh.double()
    assert float((rebuilt - x64).abs().max()) <= tol * scale
    eye = torch.eye(k, dtype=torch.float64)
    assert float((u.double().mT @ u.double() - eye).abs().max()) <= tol
    assert float((vh.double() @ vh.double().mT - eye).abs().max()) <= tol
    assert bool((s >= 0).all())
    assert bool((s[..., :-1] >= s[..., 1:]).all()), "singular values must descend"
    expected = torch.linalg.svdvals(x64)
    assert float((s.double() - expected).abs().max()) <= tol * scale


@pytest.mark.parametrize("shape", SHAPES)
def test_random_matrices_decompose(shape):
    x = random_matrix(shape)
    check_svd(x, *ops.batched_svd(x))


@given(batch=st.integers(1, 3), m=st.integers(1, 40), n=st.integers(1, 40),
       rank=st.integers(0, 40), exponent=st.integers(-100, 100), repeated=st.booleans(),
       seed=st.integers(0, 2**20))
def test_property_decomposes_any_shape_rank_and_scale(batch, m, n, rank, exponent, repeated,
                                                      seed):
    # Rank-deficient, repeated singular values and magnitudes far from 1 in one draw.
    g = torch.Generator().manual_seed(seed)
    k = min(m, n, rank)
    values = torch.rand(batch, k, generator=g, dtype=torch.float64) + 0.1
    if repeated and k > 1:
        values[:, k // 2:] = values[:, :1]
    left = torch.linalg.qr(torch.randn(batch, m, max(k, 1), generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(batch, n, max(k, 1), generator=g, dtype=torch.float64))[0]
    x = ((left[..., :k] * values.unsqueeze(-2)) @ right[..., :k].mT * 2.0 ** exponent).float()
    check_svd(x, *ops.batched_svd(x))


@pytest.mark.parametrize("m,n", [(40, 12), (12, 40)])
def test_singular_vectors_match_lapack_up_to_sign(m, n):
    x = with_spectrum(m, n, [10.0 - i * 0.7 for i in range(min(m, n))], seed=1)
    u, s, vh = ops.batched_svd(x.float())
    u_ref, s_ref, vh_ref = torch.linalg.svd(x, full_matrices=False)
    # Distinct, well separated singular values: each vector is unique up to its sign.
    cos_u = (u.double() * u_ref).sum(0).abs()
    cos_v = (vh.double() * vh_ref).sum(1).abs()
    assert float((cos_u - 1).abs().max()) < 1e-5
    assert float((cos_v - 1).abs().max()) < 1e-5
    assert torch.allclose(s.double(), s_ref, rtol=0, atol=1e-5 * float(s_ref[0]))


def test_rank_deficient_input_gets_orthonormal_completion():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 5, generator=g) @ torch.randn(5, 40, generator=g)
    u, s, vh = ops.batched_svd(x)
    check_svd(x, u, s, vh)
    assert float(s[5:].max()) <= 1e-5 * float(s[0])


@pytest.mark.parametrize("m,n", [(64, 64), (64, 40), (40, 64), (256, 256), (640, 40), (40, 640)])
def test_one_numerically_zero_direction_is_completed(m, n):
    """One singular value below fp32 resolution and generic singular vectors: the completion
    has a one-dimensional complement to find, which no canonical vector covers by much (the
    largest component of a random unit vector in 64 dims is ~0.3). It used to give up."""
    k = min(m, n)
    values = [1.0 + 0.1 * i for i in range(k - 1)][::-1] + [1e-9]
    x = with_spectrum(m, n, values, seed=5).float()
    u, s, vh = ops.batched_svd(x)
    check_svd(x, u, s, vh)
    assert float(s[-1]) <= 1e-5


@pytest.mark.parametrize("m,n", [(400, 24), (24, 400), (300, 70)])
def test_rectangular_matrices_reduced_by_qr_first(m, n, monkeypatch):
    """Clearly rectangular matrices go through QR + Jacobi on R (CPU): the same decomposition as Jacobi on the
    whole matrix, also for rank-deficient and ill-conditioned inputs."""
    from fastmerge.ops import svd as svd_module

    from fastmerge.ops.svd import _reduce_by_qr_first

    assert _reduce_by_qr_first(m, n)
    low_rank = with_spectrum(m, n, [5.0, 2.0, 1.0], seed=6).float()
    graded = with_spectrum(m, n, torch.logspace(0, -6, 24).tolist(), seed=7).float()
    for x in (random_matrix((m, n), seed=8), low_rank, graded):
        u, s, vh = ops.batched_svd(x)
        check_svd(x, u, s, vh)
        monkeypatch.setattr(svd_module, "_reduce_by_qr_first", lambda m, n: False)
        whole = ops.batched_svd(x)
        monkeypatch.undo()
        assert torch.allclose(s, whole[1], rtol=0, atol=2e-6 * float(s[0]))
        # Well separated leading singular values: the vectors agree up to sign.
        assert torch.allclose((u[:, :3] * whole[0][:, :3]).sum(0).abs(), torch.ones(3), atol=1e-4)
    assert float(ops.batched_svd(low_rank)[1][3:].max()) <= 1e-5 * 5.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_matrix_gives_non_finite_values_and_leaves_others_alone(bad):
    x = random_matrix((3, 40, 24), seed=9)
    x[1, 7, 5] = bad
    u, s, vh = ops.batched_svd(x)
    assert not bool(s[1].isfinite().all())
    if bad != bad:
        # A NaN reaches every column: NaN values and Vh, U the orthonormal completion.
        assert bool(s[1].isnan().all()) and bool(vh[1].isnan().all())
        eye = torch.eye(24, dtype=torch.float64)
        assert float((u[1].double().mT @ u[1].double() - eye).abs().max()) <= 1e-6
    for i in (0, 2):
        check_svd(x[i], u[i], s[i], vh[i])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_matrix_among_large_ones_leaves_the_others_alone(bad):
    """Above 64 columns the CPU hands the batch to LAPACK, which refuses non-finite matrices:
    those get NaN factors and the rest are decomposed, as the Jacobi kernel does below."""
    x = random_matrix((3, 90, 80), seed=10)
    x[1, 7, 5] = bad
    u, s, vh = ops.batched_svd(x)
    assert not bool(s[1].isfinite().all())
    for i in (0, 2):
        check_svd(x[i], u[i], s[i], vh[i])


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (3, 5, 5)])
def test_zero_matrix(shape):
    x = torch.zeros(shape)
    u, s, vh = ops.batched_svd(x)
    assert bool((s == 0).all())
    check_svd(x, u, s, vh)


def test_repeated_singular_values():
    x = with_spectrum(30, 20, [3.0] * 8 + [1.0] * 8 + [0.5] * 4, seed=3).float()
    u, s, vh = ops.batched_svd(x)
    check_svd(x, u, s, vh)
    expected = torch.tensor([3.0] * 8 + [1.0] * 8 + [0.5] * 4)
    assert torch.allclose(s, expected, atol=1e-5)


def test_ill_conditioned_matrix():
    values = torch.logspace(0, -6, 24).tolist()
    x = with_spectrum(48, 24, values, seed=4).float()
    u, s, vh = ops.batched_svd(x)
    check_svd(x, u, s, vh)
    # Absolute accuracy relative to the largest singular value (what fp32 can promise).
    assert torch.allclose(s.double(), torch.linalg.svdvals(x.double()), rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_decomposed_in_fp32(dtype):
    x = random_matrix((3, 20, 12), seed=5, dtype=dtype)
    u, s, vh = ops.batched_svd(x)
    check_svd(x.float(), u, s, vh)


def test_non_contiguous_input():
    x = random_matrix((2, 30, 20), seed=6).transpose(-1, -2)  # [2, 20, 30], strided
    assert not x.is_contiguous()
    check_svd(x, *ops.batched_svd(x))


def test_empty_batch_and_empty_matrices():
    u, s, vh = ops.batched_svd(torch.zeros(0, 4, 3))
    assert u.shape == (0, 4, 3) and s.shape == (0, 3) and vh.shape == (0, 3, 3)
    u, s, vh = ops.batched_svd(torch.zeros(2, 0, 5))
    assert u.shape == (2, 0, 0) and s.shape == (2, 0) and vh.shape == (2, 0, 5)


def test_results_do_not_depend_on_thread_count(restore_threads):
    x = random_matrix((9, 33, 17), seed=7)
    restore_threads(1)
    one = ops.batched_svd(x)
    restore_threads(2)
    two = ops.batched_svd(x)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_each_matrix_of_a_batch_is_decomposed_on_its_own():
    x = random_matrix((5, 16, 9), seed=8)
    u, s, vh = ops.batched_svd(x)
    for i in range(5):
        ui, si, vhi = ops.batched_svd(x[i])
        assert torch.equal(u[i], ui) and torch.equal(s[i], si) and torch.equal(vh[i], vhi)


def test_fallback_without_native_kernels(monkeypatch):
    from fastmerge.ops import svd as svd_module

    monkeypatch.setattr(svd_module, "use_native", lambda device: False)
    x = random_matrix((2, 10, 7), seed=9)
    check_svd(x, *ops.batched_svd(x))


@pytest.mark.parametrize("bad", [torch.zeros(5), torch.zeros(3, 3, dtype=torch.int32), "x"])
def test_bad_input_is_refused(bad):
    with pytest.raises(InvalidArgumentError):
        ops.batched_svd(bad)


def test_error_type_is_fastmerge_error():
    assert issubclass(InvalidArgumentError, fastmerge.FastmergeError)


# ---- randomized_svd ----

def decaying(m, n, seed=10, noise=1e-3):
    """Fast spectral decay plus a noise floor: the shape of real task vectors."""
    k = min(m, n)
    values = (torch.exp(-torch.arange(k, dtype=torch.float64) / 6.0)).tolist()
    g = torch.Generator().manual_seed(seed + 1)
    return (with_spectrum(m, n, values, seed=seed)
            + noise * torch.randn(m, n, generator=g, dtype=torch.float64) / (m * n) ** 0.25)


@pytest.mark.parametrize("m,n", [(120, 80), (80, 120), (300, 64)])
def test_randomized_svd_is_near_optimal_on_decaying_spectra(m, n, device):
    x = decaying(m, n)
    rank = 12
    u, s, vh = ops.randomized_svd(x.float().to(device), rank)
    assert u.shape == (m, rank) and s.shape == (rank,) and vh.shape == (rank, n)
    assert u.device.type == device.type
    u, s, vh = u.cpu(), s.cpu(), vh.cpu()
    exact = torch.linalg.svdvals(x)
    best = float(exact[rank:].square().sum().sqrt())  # Eckart-Young: the optimal error
    err = float(torch.linalg.matrix_norm(x - (u.double() * s.double()) @ vh.double()))
    assert err <= 1.05 * best + 1e-5
    assert torch.allclose(s.double(), exact[:rank], rtol=1e-3, atol=1e-6)
    eye = torch.eye(rank, dtype=torch.float64)
    assert float((u.double().mT @ u.double() - eye).abs().max()) < 1e-5
    assert float((vh.double() @ vh.double().mT - eye).abs().max()) < 1e-5


def test_randomized_svd_batches_and_seeds():
    x = torch.stack([decaying(60, 40, seed=s).float() for s in range(3)])
    u, s, vh = ops.randomized_svd(x, 5, seed=3)
    assert u.shape == (3, 60, 5)
    again = ops.randomized_svd(x, 5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((u, s, vh), again))
    for i in range(3):
        assert torch.allclose(s[i].double(), torch.linalg.svdvals(x[i].double())[:5], rtol=1e-3)


def test_randomized_svd_full_rank_is_exact():
    x = random_matrix((30, 20), seed=11)
    u, s, vh = ops.randomized_svd(x, 20, n_iter=0)
    check_svd(x, u, s, vh, tol=5e-5)


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(rank=31), dict(rank=2.0),
                                    dict(rank=3, oversample=-1), dict(rank=3, n_iter=True),
                                    dict(rank=3, seed="a")])
def test_randomized_svd_bad_arguments(kwargs):
    with pytest.raises(InvalidArgumentError):
        ops.randomized_svd(torch.zeros(30, 40), **kwargs)


# ---- Gram matrices (block rows above the threshold) ----

@pytest.mark.parametrize("shape", [(40, 7), (255, 30), (257, 19), (3, 301, 45), (2, 768, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_matches_the_full_product(shape, dtype):
    from fastmerge.ops.svd import gram

    y = random_matrix(shape, seed=16).to(dtype)
    want = y.double() @ y.double().mT
    got = gram(y)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert float((got.double() - want).abs().max()) <= tol * float(want.abs().max())


# ---- polar ----

@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (3, 50, 20), (600, 300), (300, 600),
                                   (2, 400, 260)])
def test_polar_is_u_vh_of_the_svd(shape, device):
    x = random_matrix(shape, seed=12)
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    p = ops.polar(x.to(device))
    assert p.dtype == torch.float32 and p.shape == x.shape and p.device.type == device.type
    p = p.cpu()
    assert float((p.double() - u @ vh).abs().max()) < 2e-5


def test_polar_recovers_the_orthogonal_factor():
    q = with_spectrum(500, 300, [1.0] * 300, seed=13)            # orthonormal columns
    spd = with_spectrum(300, 300, torch.linspace(5, 0.1, 300).tolist(), seed=14)
    spd = (spd + spd.T) / 2
    lam, v = torch.linalg.eigh(spd)
    h = v @ torch.diag(lam.abs()) @ v.T                          # symmetric positive definite
    p = ops.polar((q @ h).float())
    assert float((p.double() - q).abs().max()) < 2e-5


@pytest.mark.parametrize("m,n,condition", [(600, 300, 1e6), (300, 700, 2e5), (300, 300, 2e5)])
def test_polar_of_an_ill_conditioned_matrix_matches_a_float64_svd(m, n, condition, device):
    # The float64 Gram route stays accurate far past where an fp32 SVD loses the factor (that
    # was the fallback above condition 1e5, off by 1e-2..1e-1 on these).
    k = min(m, n)
    clustered = [1.0] * (k - k // 10) + [1.0 / condition] * (k // 10)
    x = with_spectrum(m, n, clustered, seed=20).float()
    p = ops.polar(x.to(device)).cpu().double()
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)  # of the fp32 input itself
    truth = u @ vh
    assert float((p - truth).norm() / truth.norm()) < 1e-3


def _float64_polar(x):
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u @ vh


def _graded(m, n, condition, seed):
    k = min(m, n)
    return with_spectrum(m, n, torch.logspace(0, -math.log10(condition), k).tolist(),
                         seed=seed).float()


@pytest.mark.parametrize("m,n", [(600, 300), (300, 700), (300, 300)])
def test_polar_of_a_well_conditioned_matrix_stays_within_its_fp32_bound(m, n, device):
    # Condition 9 (Gram eigenvalue ratio 1.2e-2) takes the fp32 Gram route; two clusters of
    # singular values are its worst case (error ~2e-7 / ratio).
    k = min(m, n)
    x = with_spectrum(m, n, [1.0] * (k - k // 2) + [1 / 9.0] * (k // 2), seed=21).float()
    truth = _float64_polar(x)
    p = ops.polar(x.to(device)).cpu()
    assert float((p.double() - truth).norm() / truth.norm()) < 2.5e-5


@pytest.mark.parametrize("m,n", [(600, 300), (300, 700)])
def test_polar_just_past_the_fp32_bound_is_float64_accurate(m, n):
    # Condition 14 (ratio 5e-3) is past the fp32 route's bound; the fp32 route would be off by
    # ~3e-5 on these two clusters, the float64 route is off by ~1e-6.
    k = min(m, n)
    x = with_spectrum(m, n, [1.0] * (k - k // 2) + [1 / 14.0] * (k // 2), seed=22).float()
    truth = _float64_polar(x)
    assert float((ops.polar(x).double() - truth).norm() / truth.norm()) < 1e-5


def test_polar_routes_each_matrix_of_a_batch_on_its_own(device):
    well, ill = _graded(500, 200, 5.0, seed=23), _graded(500, 200, 1e5, seed=24)
    batch = torch.stack([ill, well, ill * 2]).to(device)
    p = ops.polar(batch)
    for got, x, tol in zip(p.cpu(), batch.cpu(), (1e-3, 1e-5, 1e-3)):
        truth = _float64_polar(x)
        assert float((got.double() - truth).norm() / truth.norm()) < tol
    assert torch.equal(p[1], ops.polar(well.to(device)))


def test_the_fp32_screen_separates_conditions_clearly_apart_from_its_bound():
    from fastmerge.ops.svd import _clears_eigenvalue_ratio, gram

    # Gram eigenvalue ratios 1/condition^2 against a bound of 1e-2 (condition 10)
    conditions = [1.0, 3.0, 8.0, 20.0, 100.0, 1e6]
    y = torch.stack([_graded(300, 120, c, seed=29) for c in conditions])
    passed = _clears_eigenvalue_ratio(gram(y.mT), 1e-2).tolist()
    assert passed == [True, True, True, False, False, False]


def test_polar_checks_the_fp32_screen_with_the_eigenvalues(monkeypatch):
    # The shifted-Cholesky screen only saves an eigh; a matrix it wrongly passes must still get
    # the float64 route once the fp32 eigenvalues show its condition.
    from fastmerge.ops import svd

    ill, well = _graded(400, 200, 1e4, seed=25), _graded(400, 200, 3.0, seed=26)
    for screened in ([True, True], [True, True, False]):  # whole batch, and a part of it
        monkeypatch.setattr(svd, "_clears_eigenvalue_ratio",
                            lambda g, ratio, screened=screened: torch.tensor(screened))
        x = torch.stack([ill, well, ill][:len(screened)])
        p = ops.polar(x)
        for got, one, tol in zip(p, x, (1e-4, 1e-5, 1e-4)):
            truth = _float64_polar(one)
            assert float((got.double() - truth).norm() / truth.norm()) < tol


@pytest.mark.parametrize("shape,condition", [((200, 700), 3.0), ((200, 700), 30.0),
                                             ((200, 700), 1e4), ((700, 200), 3.0),
                                             ((40, 90), 3.0), ((300, 300), 3.0)], ids=str)
def test_polar_product_is_left_times_the_polar_factor(shape, condition, device):
    from fastmerge.ops.svd import polar_product

    x = _graded(*shape, condition, seed=27)
    left = random_matrix((5, shape[0]), seed=28)
    want = left.double() @ _float64_polar(x)
    got = polar_product(left.to(device), x.to(device))
    assert got.dtype == torch.float32 and got.shape == want.shape
    got = got.cpu()
    assert float((got.double() - want).norm() / want.norm()) < 1e-4


@given(m=st.integers(65, 260), n=st.integers(65, 260), batch=st.integers(1, 3),
       log_condition=st.floats(0.0, 6.0), clustered=st.booleans(), seed=st.integers(0, 2**16))
def test_polar_is_accurate_on_every_route(m, n, batch, log_condition, clustered, seed):
    # Conditions 1..1e6 reach the fp32 Gram route (up to 10), the float64 one, and batches
    # mixing both (each matrix gets its own condition); all stay within the 3e-4 of a float64
    # SVD that polar documents up to condition 1e6 (2e-5 on the fp32 route).
    k = min(m, n)
    xs = []
    for i in range(batch):
        condition = 10.0 ** (log_condition * (i + 1) / batch)
        if clustered:
            values = [1.0] * (k - k // 4) + [1.0 / condition] * (k // 4)
        else:
            values = torch.logspace(0, -math.log10(condition), k).tolist()
        xs.append(with_spectrum(m, n, values, seed=seed + i).float())
    x = torch.stack(xs)
    p = ops.polar(x)
    for got, one in zip(p, x):
        truth = _float64_polar(one)
        condition = float(torch.linalg.cond(one.double()))
        bound = 2.5e-5 if condition <= 10 else 3e-4
        assert float((got.double() - truth).norm() / truth.norm()) < bound


@pytest.mark.parametrize("shape", [(3, 40, 30), (2, 300, 700)], ids=str)  # Jacobi, Gram route
def test_polar_of_a_non_finite_matrix_is_nan_and_leaves_the_batch_alone(shape, device):
    x = random_matrix(shape, seed=18)
    x[1, 0, 0] = float("nan")
    x = x.to(device)
    p = ops.polar(x)
    assert bool(p[1].isnan().all())
    others = [i for i in range(shape[0]) if i != 1]
    assert torch.equal(p[others], ops.polar(x[others]))


def test_polar_of_a_rank_deficient_large_matrix_is_still_orthonormal():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(400, 5, generator=g) @ torch.randn(5, 300, generator=g)
    p = ops.polar(x).double()
    assert float((p.mT @ p - torch.eye(300, dtype=torch.float64)).abs().max()) < 1e-4


def test_polar_of_a_finite_matrix_whose_entries_sum_past_float32_is_not_treated_as_nan():
    # The finiteness check sums each matrix first; a finite sum proves finiteness, an overflowing
    # one must fall back to the entry-wise check rather than condemn the matrix.
    x = random_matrix((3, 40, 30), seed=19)
    x[0] *= 1e37  # entries ~1e37: their sum overflows, the matrix is finite
    x[2, 3, 3] = float("inf")
    p = ops.polar(x)
    assert bool(p[0].isfinite().all())
    assert float((p[0].mT @ p[0] - torch.eye(30)).abs().max()) < 1e-4
    assert bool(p[2].isnan().all()) and bool(p[1].isfinite().all())


# ---- inertia counts ----

def test_eigenvalues_above_counts_as_eigvalsh_does():
    from fastmerge.ops.svd import eigenvalues_above

    g = torch.Generator().manual_seed(30)
    two_by_two = 0
    for k in (1, 2, 5, 17, 60):
        a = torch.randn(4, k, k, generator=g, dtype=torch.float64)
        a = a + a.mT  # indefinite: Bunch-Kaufman takes 2x2 pivots
        thresholds = torch.randn(4, generator=g, dtype=torch.float64)
        want = (torch.linalg.eigvalsh(a) > thresholds[:, None]).sum(-1)
        assert torch.equal(eigenvalues_above(a, thresholds), want)
        shifted = a - thresholds[:, None, None] * torch.eye(k, dtype=torch.float64)
        two_by_two += int((torch.linalg.ldl_factor(shifted).pivots < 0).sum())
    assert two_by_two > 0  # the 2x2 blocks were exercised
