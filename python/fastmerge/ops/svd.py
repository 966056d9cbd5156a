"""Singular value decompositions for subspace merges (csrc/ops/svd).

batched_svd runs one-sided Jacobi on every matrix of a batch at once: the shape of work that
subspace merges produce (one small matrix per task, head or block), where a LAPACK/cuSOLVER call
per matrix spends most of its time in launch and dispatch overhead. Clearly rectangular CPU
matrices are first reduced to their square R factor by torch's QR.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _native
from ..errors import InvalidArgumentError
from ._validate import (capsule, check_seed, check_tensor, cuda_stream, finite_per_matrix,
                        kernel_input, use_native)


def batched_svd(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of every matrix in x [..., m, n]: U [..., m, k], S [..., k], Vh [..., k, n] with
    k = min(m, n) and x = U @ diag(S) @ Vh, singular values in descending order.

    Computed in fp32 whatever x's float dtype (float64 input is rounded to fp32 first) and
    returned as fp32. Singular vectors are unique only up to sign (and rotation within repeated
    singular values); the vectors of numerically zero singular values are completed to an
    orthonormal set, as torch.linalg.svd's are. Non-finite input gives non-finite output.
    On the CPU, min(m, n) above 64 goes to LAPACK (torch.linalg.svd), which is faster there,
    and clearly rectangular smaller matrices (aspect >= 8, or >= 4 from min(m, n) = 64) are
    reduced by a QR first.
    """
    x = check_tensor(x, "x")
    if x.dim() < 2:
        raise InvalidArgumentError(f"x must have at least 2 dims [..., m, n], got shape "
                                   f"{tuple(x.shape)}")
    *batch_shape, m, n = x.shape
    k = min(m, n)
    if not use_native(x.device) or (x.device.type == "cuda" and k > _CUDA_MAX_COLUMNS):
        u, s, vh = torch.linalg.svd(x.detach().float(), full_matrices=False)
        return u, s, vh
    if x.device.type == "cpu" and k > _CPU_JACOBI_MAX_COLUMNS:
        return _lapack_svd(x.detach().float())
    batch = 1
    for d in batch_shape:
        batch *= d
    flat = kernel_input(x).reshape(batch, m, n)
    if x.device.type == "cpu" and batch and k and _reduce_by_qr_first(m, n):
        u, s, vh = _svd_after_qr(flat, m >= n)
        return (u.reshape(*batch_shape, m, k), s.reshape(*batch_shape, k),
                vh.reshape(*batch_shape, k, n))
    return _jacobi_svd(flat, batch_shape, x.device)


# Largest min(m, n) the CPU Jacobi takes; LAPACK's SVD overtakes it above. Measured on the
# 2-core EPYC, Gaussian matrices, batched_svd vs torch.linalg.svd (min of 7):
#   16 x 512: 2.1x, 32 x 256: 1.6x, 48 x 128: 1.3x, 64 x 64: 1.07x, 72 x 64: 0.88x,
#   96 x 64: 0.76x, 128 x 16: 0.63x, 256 x 16: 0.40x.
_CPU_JACOBI_MAX_COLUMNS = 64


def _lapack_svd(a: torch.Tensor):
    """torch.linalg.svd of every finite matrix of a [..., m, n]; NaN factors for the others
    (which LAPACK refuses), as the Jacobi kernel gives."""
    finite = finite_per_matrix(a)
    if bool(finite.all()):
        return torch.linalg.svd(a, full_matrices=False)
    *batch_shape, m, n = a.shape
    k = min(m, n)
    u = torch.full((*batch_shape, m, k), float("nan"))
    s = torch.full((*batch_shape, k), float("nan"))
    vh = torch.full((*batch_shape, k, n), float("nan"))
    if bool(finite.any()):
        u[finite], s[finite], vh[finite] = torch.linalg.svd(a[finite], full_matrices=False)
    return u, s, vh


# The CUDA Jacobi keeps per-column statistics in shared memory (kMaxCudaColumns in
# svd_cuda.cu); larger min(m, n) go to torch.linalg.svd (cuSOLVER) instead.
_CUDA_MAX_COLUMNS = 2048

# CPU matrices whose long side is at least this many times the short side k are first reduced
# by a QR of their tall orientation (LAPACK), so that Jacobi sweeps k x k instead of k x len
# columns. Measured on the 2-core EPYC, whole batched_svd, QR route vs Jacobi alone:
#   k = 32:  0.81x / 0.90x / 0.97x / 1.14x at aspect 3 / 4 / 6 / 8
#   k = 64:  1.0x  / 1.12x / 1.6-1.9x / 1.8-2.3x
#   k = 104: 1.45x / 1.66x / 2.1x / 2.6x   (k = 128 alike)
_QR_FIRST_ASPECT = 8
_QR_FIRST_ASPECT_WIDE_K = 4   # from k >= 64 on
_QR_WIDE_K = 64


def _reduce_by_qr_first(m: int, n: int) -> bool:
    k = min(m, n)
    aspect = _QR_FIRST_ASPECT_WIDE_K if k >= _QR_WIDE_K else _QR_FIRST_ASPECT
    return max(m, n) >= aspect * k


def _svd_after_qr(flat: torch.Tensor, tall: bool):
    """A = Q R (tall) or A^T = Q R (wide), R = U_r S Vh_r by Jacobi: A = (Q U_r) S Vh_r or
    A = Vh_r^T S (Q U_r)^T. Q has orthonormal columns, so Q U_r keeps those of U_r, completed
    singular vectors of a rank-deficient R included."""
    q, r = torch.linalg.qr((flat if tall else flat.mT).float(), mode="reduced")
    u_r, s, vh_r = _jacobi_svd(r, [r.shape[0]], r.device)
    long_side = q @ u_r
    return (long_side, s, vh_r) if tall else (vh_r.mT.contiguous(), s, long_side.mT.contiguous())


def _jacobi_svd(flat: torch.Tensor, batch_shape, device):
    batch, m, n = flat.shape
    k = min(m, n)
    flat = flat.contiguous()
    u = torch.empty((batch, m, k), dtype=torch.float32, device=device)
    s = torch.empty((batch, k), dtype=torch.float32, device=device)
    vh = torch.empty((batch, k, n), dtype=torch.float32, device=device)
    if batch and k:
        _native.native().batched_svd(capsule(flat), capsule(u), capsule(s), capsule(vh),
                                     cuda_stream(device))
    return (u.reshape(*batch_shape, m, k), s.reshape(*batch_shape, k),
            vh.reshape(*batch_shape, k, n))


def _check_matrix(x, name: str) -> torch.Tensor:
    x = check_tensor(x, name)
    if x.dim() < 2:
        raise InvalidArgumentError(f"{name} must have at least 2 dims [..., m, n], got shape "
                                   f"{tuple(x.shape)}")
    return x


def _orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def randomized_svd(x: torch.Tensor, rank: int, *, oversample: int = 8, n_iter: int = 2,
                   seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of every matrix in x [..., m, n] by randomized range finding (Halko,
    Martinsson and Tropp, 2011): U [..., m, rank], S [..., rank], Vh [..., rank, n].

    A Gaussian sketch of rank + oversample columns (drawn on the CPU from `seed`, so every
    device sees the same sketch) is refined by n_iter power iterations, each re-orthonormalised
    by QR; the small projected matrix is decomposed by batched_svd. All GEMMs and QRs are
    torch's (BLAS / cuBLAS) in fp32. The error is close to the best rank-`rank` error when the
    spectrum decays; on flat spectra raise n_iter.
    """
    x = _check_matrix(x, "x")
    *batch_shape, m, n = x.shape
    k = min(m, n)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise InvalidArgumentError(f"rank must be an int in [1, min(m, n) = {k}], got {rank!r}")
    for name, value in (("oversample", oversample), ("n_iter", n_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgumentError(f"{name} must be a non-negative int, got {value!r}")
    seed = check_seed(seed)
    a = x.detach().to(torch.float32)
    width = min(rank + oversample, k)
    generator = torch.Generator().manual_seed(seed)
    sketch = torch.randn((*batch_shape, n, width), generator=generator).to(a.device)
    q = _orthonormal_basis(a @ sketch)
    for _ in range(n_iter):
        q = _orthonormal_basis(a @ _orthonormal_basis(a.mT @ q))
    u_small, s, vh = batched_svd(q.mT @ a)
    u = q @ u_small
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


# Largest min(m, n) decomposed by Jacobi inside polar(); larger matrices use the Gram matrix.
# On the CPU, LAPACK's float64 eigh overtakes the Jacobi kernel early (2-core EPYC, polar via
# Jacobi vs the Gram route: 64x64 x 64: 23 vs 26 ms; 96x96: 1.8 vs 0.6 ms; 256x256 x 16: 229 vs
# 107 ms; 200x600 x 8: 126 vs 37 ms). On CUDA, one kernel for the whole batch beats a
# cuSOLVER call per matrix up to 256 (unmeasured on a GPU so far).
_POLAR_JACOBI_LIMIT = {"cpu": 64, "cuda": 256}
# Smallest eigenvalue ratio of the float64 Gram matrix (1 / condition number squared) for which
# polar() applies it; below, the matrix is numerically rank deficient at fp32 (condition number
# above ~1/eps32 = 1e7) and torch.linalg.svd completes its null space. Up to there the Gram
# route is the more accurate one: measured against a float64 SVD on graded and clustered
# spectra (300x700, 768x3072), its factor was within 3e-4 up to condition 1e6 and 2e-2 at 1e7,
# where an fp32 SVD's was off by 2e-2..3e-2 at 2e5 and 1e-1..4e-1 at 1e6..1e7.
_POLAR_GRAM_MIN_RATIO = 1e-14
# Above this eigenvalue ratio (condition number below 100), the float64 route applies the
# factor in fp32.
_POLAR_FP32_MIN_RATIO = 1e-4
# From this eigenvalue ratio on (condition number up to 10), the Gram matrix, its eigh and the
# product are all fp32, at half the float64 cost. The fp32 eigh dominates the factor's error,
# ~2e-7 / ratio at worst: measured against a float64 SVD on graded and two-cluster spectra
# (65..3072 x 65..768), at most 1.7e-5 at condition 10 (an fp32 SVD's is 0.5-2e-5 there), but
# 4e-4 at 50, where an fp32 SVD's stays at 2e-5. The same bound as _FP32_GRAM_MIN_RATIO of the
# subspace merges' triplets.
_POLAR_FP32_GRAM_MIN_RATIO = 1e-2
# Power iterations behind the largest-eigenvalue estimate of the fp32 route's screen.
_POWER_ITERATIONS = 20


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of every matrix in x [..., m, n]: U @ Vh of its thin SVD,
    the nearest matrix with orthonormal columns (m >= n) or rows (m < n) in Frobenius norm.

    Small matrices (min(m, n) <= 64 on the CPU, 256 on CUDA) go through batched_svd, larger
    ones through the smaller Gram matrix G = X^T X = V diag(L) V^T (eigh): factor =
    X (V diag(L^-1/2) V^T), a Gram GEMM, an eigh and one GEMM with X, a third of an SVD's time
    for rectangular matrices and about the same for square ones up to 1024. Well-conditioned
    matrices (condition number up to 10, screened by a shifted Cholesky factorisation) take
    this route in fp32 (error at most 2e-5, as an fp32 SVD's), the others in float64, which is
    far more accurate than an fp32 SVD on ill-conditioned ones.
    Larger square-ish matrices (aspect below 2), where the float64 GEMMs and eigh cost more
    than the SVD, and numerically rank-deficient ones (condition number above 1e7, where the
    factor is not unique) are decomposed by torch.linalg.svd, which completes a null space with
    orthonormal directions. The result is fp32. A matrix with NaN/Inf entries gets an all-NaN
    factor and leaves the others of the batch alone, as in batched_svd.
    """
    return _polar(_check_matrix(x, "x"))


def polar_product(left: torch.Tensor, x: torch.Tensor, *,
                  fp32_min_ratio: float = _POLAR_FP32_GRAM_MIN_RATIO) -> torch.Tensor:
    """left @ polar(x) (fp32), cheaper than forming the factor when x is wide: where polar
    applies G^(-1/2) in fp32 (condition number below 100) the factor is G^(-1/2) @ x, so the
    product is (left @ G^(-1/2)) @ x. fp32_min_ratio: see _polar."""
    return _polar(_check_matrix(x, "x"), left.to(torch.float32), fp32_min_ratio)


def _polar(x: torch.Tensor, left: Optional[torch.Tensor] = None,
           fp32_min_ratio: float = _POLAR_FP32_GRAM_MIN_RATIO) -> torch.Tensor:
    """left @ polar(x) (left None: polar(x)), with the smallest Gram eigenvalue ratio that
    takes the all-fp32 route (callers that tolerate a larger error may lower it)."""
    *_, m, n = x.shape
    a = x.detach().to(torch.float32)
    if min(m, n) == 0:
        return _with_left(torch.zeros_like(a), left)
    finite = finite_per_matrix(a)  # LAPACK refuses the others
    if not bool(finite.all()):
        out = torch.full_like(a, float("nan"))
        if bool(finite.any()):
            out[finite] = _polar(a[finite], None, fp32_min_ratio)
        return _with_left(out, left)
    if min(m, n) <= _POLAR_JACOBI_LIMIT.get(a.device.type, 64):
        u, _, vh = batched_svd(a)
        return _with_left(u @ vh, left)
    if not float64_gram_pays(m, n):
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        return _with_left(u @ vh, left)
    return _gram_polar(a, left, fp32_min_ratio)


# Largest square-ish min(m, n) for which a float64 Gram eigh plus its GEMMs costs no more than
# an fp32 SVD. Measured on the 2-core EPYC (polar, Gram route vs SVD): 768: 76 vs 68 ms,
# 1024: 198 vs 217 ms, 2048: 1.6 vs 1.5 s, 4096: ~17 vs ~12 s (float64 GEMMs alone ~1.7 s each).
_SQUARE_FLOAT64_GRAM_LIMIT = 1024


def float64_gram_pays(m: int, n: int) -> bool:
    """Whether decomposing the m x n matrix through its smaller Gram matrix in float64 (a GEMM,
    an eigh, GEMMs back) costs no more than an fp32 SVD: for clearly rectangular matrices
    (aspect >= 2) the Gram matrix is much smaller than the matrix, for square ones only up to
    1024."""
    return max(m, n) >= 2 * min(m, n) or min(m, n) <= _SQUARE_FLOAT64_GRAM_LIMIT


# Rows from which gram() computes only the blocks on and above the diagonal, and its block rows.
_SYMMETRIC_GRAM_MIN_ROWS = 256
_SYMMETRIC_GRAM_PARTS = 4


def gram(y: torch.Tensor) -> torch.Tensor:
    """y @ y^T for every matrix in y [..., m, k]. From 256 rows on, one GEMM per block row
    computes the blocks on and above the diagonal and the rest is mirrored: 5/8 of a full
    GEMM's multiply-adds with four block rows (a 768 x 3072 fp32 batch of 8: 100 ms instead of
    150 ms on the 2-core EPYC)."""
    m = y.shape[-2]
    if m < _SYMMETRIC_GRAM_MIN_ROWS:
        return y @ y.mT
    step = -(-m // _SYMMETRIC_GRAM_PARTS)
    out = y.new_empty(*y.shape[:-2], m, m)
    for i0 in range(0, m, step):
        block = y[..., i0:i0 + step, :] @ y[..., i0:, :].mT
        out[..., i0:, i0:i0 + step] = block.mT
        out[..., i0:i0 + step, i0:] = block
    return out


def _gram_polar(a: torch.Tensor, left: Optional[torch.Tensor], fp32_min_ratio: float
                ) -> torch.Tensor:
    """polar() through the smaller Gram matrix, per matrix (see _gram_inverse_roots). With left:
    left @ polar(a); for a single wide a whose factor is applied in fp32, as
    (left @ G^(-1/2)) @ a, one k x k x n GEMM fewer than forming the factor."""
    *batch_shape, m, n = a.shape
    wide = m < n
    y = (a.mT if wide else a).reshape(-1, max(m, n), min(m, n))  # tall: X^T X is the smaller
    roots, explicit, factors = _gram_inverse_roots(y, fp32_min_ratio)
    if not bool(explicit.any()):
        if left is not None and wide and y.shape[0] == 1:
            return (left @ roots[0]) @ a.reshape(m, n)
        factor = y @ roots
    elif bool(explicit.all()):
        factor = factors
    else:
        factor = torch.empty_like(y)
        factor[~explicit] = y[~explicit] @ roots[~explicit]
        factor[explicit] = factors
    return _with_left(_untall(factor, batch_shape, wide), left)


def _gram_inverse_roots(y: torch.Tensor, fp32_min_ratio: float):
    """For every tall matrix Y of y [b, m, k]: (roots [b, k, k] fp32, explicit [b] bool,
    factors [explicit.sum(), m, k]) such that Y @ roots[i] is Y's polar factor, or, where
    explicit[i], the next row of factors is (its product needs float64, or an SVD).
    Well-conditioned matrices (Gram eigenvalue ratio from fp32_min_ratio on) take an all-fp32
    route, screened first by a shifted Cholesky factorisation; the rest a float64 Gram matrix."""
    b, _, k = y.shape
    gram32 = gram(y.mT)
    fp32 = _clears_eigenvalue_ratio(gram32, fp32_min_ratio)
    roots = torch.empty(b, k, k, dtype=torch.float32, device=y.device)
    if bool(fp32.any()):
        tried = fp32.nonzero().squeeze(1)
        inverse_root, accurate = _fp32_inverse_root(gram32[tried], fp32_min_ratio)
        roots[tried[accurate]] = inverse_root[accurate]
        fp32[tried[~accurate]] = False
    rest = (~fp32).nonzero().squeeze(1)
    explicit = torch.zeros(b, dtype=torch.bool, device=y.device)
    factors = y.new_empty(0, *y.shape[1:])
    if rest.numel():
        rest_y = y if rest.numel() == b else y[rest]  # index (a copy) only a part
        y64 = rest_y.to(torch.float64)
        inverse_root, fp32_product = _float64_inverse_root(y64)
        if inverse_root is None:  # numerically rank deficient: the SVD completes a null space
            u, _, vh = torch.linalg.svd(rest_y, full_matrices=False)
            explicit[rest], factors = True, u @ vh
        elif fp32_product:
            roots[rest] = inverse_root.to(torch.float32)
        else:
            explicit[rest] = True
            factors = (y64 @ inverse_root).to(torch.float32)
    return roots, explicit, factors


def _with_left(factor: torch.Tensor, left: Optional[torch.Tensor]) -> torch.Tensor:
    return factor if left is None else left @ factor


def _untall(factor: torch.Tensor, batch_shape, wide: bool) -> torch.Tensor:
    factor = factor.reshape(*batch_shape, *factor.shape[-2:])
    return factor.mT if wide else factor


def _clears_eigenvalue_ratio(g: torch.Tensor, min_ratio: float) -> torch.Tensor:
    """Per symmetric positive semi-definite matrix of g [b, k, k]: whether its smallest
    eigenvalue likely exceeds min_ratio times its largest, by a Cholesky factorisation of
    g - min_ratio * lambda_max * I (it succeeds when that is positive definite), lambda_max
    estimated by power iteration. A screen before an eigh (a tenth of its cost): the estimate
    is a lower bound and fp32 Cholesky misjudges near the boundary, so the caller checks the
    eigenvalues it then gets."""
    largest = largest_eigenvalue(g)
    return (torch.linalg.cholesky_ex(_shifted(g, min_ratio * largest)).info == 0) & (largest > 0)


def largest_eigenvalue(g: torch.Tensor) -> torch.Tensor:
    """A lower bound on the largest eigenvalue of every symmetric positive semi-definite matrix
    of g [b, k, k], close to it: the Rayleigh quotient after a few power iterations from a
    fixed start (NaN where g is not finite)."""
    k = g.shape[-1]
    start = torch.randn(k, 1, generator=torch.Generator().manual_seed(0)).to(g)
    x = start.expand(g.shape[0], k, 1)
    for _ in range(_POWER_ITERATIONS):
        x = g @ x
        x = x / x.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    return (x.mT @ (g @ x)).reshape(-1)


def _shifted(g: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    return g - shifts.reshape(-1, 1, 1) * torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)


def eigenvalues_above(g: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """How many eigenvalues of every symmetric matrix of g [b, k, k] exceed thresholds[b], by
    Sylvester's law of inertia: g - t I = L D L^T (Bunch-Kaufman, 1x1 and 2x2 diagonal blocks)
    has as many positive eigenvalues as D. A third of the operations of an eigh's reduction."""
    ld, pivots, _ = torch.linalg.ldl_factor_ex(_shifted(g, thresholds))
    diagonal = ld.diagonal(dim1=-2, dim2=-1).tolist()
    below = ld.diagonal(offset=-1, dim1=-2, dim2=-1).tolist()
    counts = []
    for d, e, p in zip(diagonal, below, pivots.tolist()):
        positive, i = 0, 0
        while i < len(d):
            if p[i] < 0:  # a 2x2 block at rows i, i + 1: its eigenvalues' signs
                det = d[i] * d[i + 1] - e[i] * e[i]
                positive += 1 if det < 0 else (2 if d[i] + d[i + 1] > 0 else 0)
                i += 2
            else:
                positive += d[i] > 0
                i += 1
        counts.append(positive)
    return torch.tensor(counts, dtype=torch.int64)


def _inverse_root(eigenvalues: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """G^(-1/2) = V diag(L^-1/2) V^T from the eigenpairs of G."""
    return (vectors * eigenvalues.rsqrt().unsqueeze(-2)) @ vectors.mT


def _fp32_inverse_root(gram32: torch.Tensor, min_ratio: float):
    """(G^(-1/2) for every matrix G of gram32 from its fp32 eigh, whether each is accurate: its
    eigenvalue ratio is at least min_ratio)."""
    eigenvalues, vectors = torch.linalg.eigh(gram32)
    top = eigenvalues[..., -1].clamp_min(1e-30)
    accurate = eigenvalues[..., 0] >= min_ratio * top
    return _inverse_root(eigenvalues.clamp_min(1e-30), vectors), accurate


def _float64_inverse_root(y64: torch.Tensor):
    """(G^(-1/2) for every tall float64 matrix Y of y64 [b, m, k], G = Y^T Y, whether
    Y @ G^(-1/2) may run in fp32), or (None, False) when a matrix is numerically rank
    deficient. The product's error in fp32 is ~eps32 * cond(Y): fp32 while the eigenvalue
    ratio is above 1e-4 (condition number below 100)."""
    eigenvalues, vectors = torch.linalg.eigh(gram(y64.mT))
    top = eigenvalues[..., -1:].clamp_min(1e-300)
    ratio = float((eigenvalues[..., :1] / top).min()) if y64.shape[0] else 1.0
    if not ratio > _POLAR_GRAM_MIN_RATIO:
        return None, False
    return _inverse_root(eigenvalues, vectors), ratio > _POLAR_FP32_MIN_RATIO
