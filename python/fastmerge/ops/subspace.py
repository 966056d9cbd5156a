"""Subspace merges of task vectors: TSV-M, Iso-C and Iso-CTS.

Each op takes base + experts, merges the task vectors d_t = expert_t - base and returns
base + alpha * merged, rounded once to the output dtype. 2-D tensors use the subspace method;
every other tensor (biases, norms, 1-D or 3-D+) gets the mean task vector, as FusionBench and the
papers' code do. ops/_reference/subspace.py states each algorithm step by step.

`exact=True` runs the algorithm as written, with full SVDs. The default fast mode computes the
same quantities without them:
* the top singular triplets of each task vector from the eigh of its smaller Gram matrix (a
  GEMM plus an eigh, a fraction of an SVD's cost): in fp32 while the kept eigenvalues stay
  above 1e-2 of the largest, in float64 down to 1e-12, by SVD below that;
* Iso-CTS's task-specific SVDs shrink to (k - common)-row problems in the complement basis the
  common eigh already gives;
* orthogonal polar factors by ops.polar's routes (Jacobi for small matrices, the Gram matrix
  for larger ones: in fp32 up to condition number 50 here, error at most 4e-4, in float64 up to
  1e7, which TSV-M's concatenated bases approach when tasks share directions; an SVD for
  numerically rank-deficient ones), the right-hand factor of TSV-M and Iso-CTS applied as
  G^(-1/2) @ V without forming it;
* Iso-C's mean singular value is trace(P^T M) / k from the polar factor P of the sum M.
Fast and exact mode agree to ~1e-5 relative on realistic task vectors and within 1e-2 on
strongly overlapping ones (tests/ops/test_subspace.py); benchmarks/bench_subspace.py times both.
Where the kept singular values span many decades, the fast mode's float64 steps are the more
accurate of the two: exact mode's fp32 SVDs lose the small triplets (TSV-M with singular values
i^-2 over 768x3072 x 8: exact mode 8e-4..1e-1 off a float64 merge, fast mode 3e-6).
One exception is inherent to the methods: when the matrix whose polar factor is taken is rank
deficient (Iso-C's sum of LoRA-sized task vectors whose total rank is below min(m, n), say),
the factor is not unique. Both modes then agree on the range and complete the null space with
orthonormal directions scaled like the rest, but not with the same directions (neither does
the papers' code across LAPACK builds). DC-Merge has a second: it keeps only the top 1e-3 of
the entries in the cover basis, so where two entries nearly tie at that cut (task vectors with
identical spectra, say), any roundoff, that of a different LAPACK build included, can swap
which one is kept.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ._validate import (
    check_decomposable,
    check_experts,
    check_same_layout,
    check_scalar,
    check_tensor,
    finite_per_matrix,
    kernel_output,
    resolve_out_dtype,
)
from .svd import (_polar, eigenvalues_above, float64_gram_pays, gram, largest_eigenvalue,
                  polar_product)
from ._reference.subspace import (
    _keep_top_count,
    _sign_elected_mean,
    cart_rank,
    iso_cts_split,
)
from ..errors import InvalidArgumentError

# The fast mode takes singular triplets from the eigh of a Gram matrix, whose eigenvalues are
# the squared singular values: accurate to fp32 while the kept eigenvalues are above these
# fractions of the largest (fp32 Gram, float64 Gram); below both, an SVD. Squaring costs the
# fp32 route accuracy near the cut: TSV-M on power-law task vectors with a noise floor
# (768x3072 x 8, sigma_i ~ i^-a) was off from a float64 merge by 3e-2 at a ratio of 9e-4,
# 1.5e-4 at 4.4e-3 and at most 1.3e-4 from 1e-2 on; the float64 route stayed within 4e-4 down
# to 1e-12 (where fp32 SVDs, exact mode's, are themselves off by 1e-1).
_FP32_GRAM_MIN_RATIO = 1e-2
_FP64_GRAM_MIN_RATIO = 1e-12
_GRAM_ROUTES = ((torch.float32, _FP32_GRAM_MIN_RATIO), (torch.float64, _FP64_GRAM_MIN_RATIO))


def _deltas(base, experts, alpha, out_dtype) -> Tuple[torch.Tensor, torch.Tensor, float,
                                                      torch.dtype]:
    base = check_tensor(base, "base")
    experts = check_experts(experts)
    check_same_layout(base, "base", experts, [f"experts[{i}]" for i in range(len(experts))])
    alpha = check_scalar(alpha, "alpha")
    dtype = resolve_out_dtype(out_dtype, base.dtype)
    b = base.detach().float()
    # One recycled buffer (no stacked copy, and no page faults on a fresh allocation: ~25 ms
    # of a 768x3072 x 8 merge). Half-precision experts are promoted inside the subtraction;
    # float64 ones are rounded to fp32 first, as the numerics contract has it.
    deltas = kernel_output((len(experts), *b.shape), torch.float32, b.device)
    for i, e in enumerate(experts):
        e = e.detach()
        torch.sub(e.float() if e.dtype == torch.float64 else e, b, out=deltas[i])
    if base.dim() == 2 and not bool(finite_per_matrix(deltas).all()):
        # decomposed: NaN/Inf would fail inside LAPACK. One pass over the deltas; the inputs
        # are searched only to name the one at fault.
        check_decomposable(base, "base")
        for i, e in enumerate(experts):
            check_decomposable(e, f"experts[{i}]")
        check_decomposable(deltas, "the task vectors (expert - base overflows float32)")
    return b, deltas, alpha, dtype


def _finish(base: torch.Tensor, merged: torch.Tensor, alpha: float, dtype) -> torch.Tensor:
    out = kernel_output(base.shape, torch.float32, base.device)
    torch.add(base, merged, alpha=alpha, out=out)
    return out if dtype == torch.float32 else out.to(dtype)


# The merges' polar factors take polar's all-fp32 Gram route down to an eigenvalue ratio of
# 4e-4 (condition number 50; ops.polar alone stops at 1e-2). The factor's error is then at most
# 4e-4 (two clusters of singular values; 1e-5..1e-4 on graded spectra, where an fp32 SVD's is
# 2e-5), well inside the fast mode's 1e-2, and TSV-M's decorrelated right basis (768x3072 x 8
# tasks, condition ~45) costs 75 instead of 130 ms: what its 5x target needs.
_MERGE_POLAR_FP32_MIN_RATIO = 4e-4


def _fast_polar(x: torch.Tensor, left: Optional[torch.Tensor] = None) -> torch.Tensor:
    """left @ polar(x), or polar(x), with the merges' fp32 bound."""
    if left is None:
        return _polar(x.float(), None, _MERGE_POLAR_FP32_MIN_RATIO)
    return polar_product(left, x, fp32_min_ratio=_MERGE_POLAR_FP32_MIN_RATIO)


def _exact_polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def _svd_top(x: torch.Tensor, count: int):
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[..., :count], s[..., :count], vh[..., :count, :]


def _gram_eig(x: torch.Tensor, dtype=torch.float64):
    """Eigenpairs (descending) of the smaller Gram matrix of every matrix in x, computed in
    dtype: (x in dtype, tall, eigenvalues, eigenvectors); tall means the eigenvectors are right
    singular vectors."""
    t, tall, g = _smaller_gram(x, dtype)
    return (t, tall, *_descending_eigh(g))


def _smaller_gram(x: torch.Tensor, dtype):
    """(x in dtype, tall, the smaller Gram matrix of every matrix in x)."""
    t = x.to(dtype)
    tall = t.shape[-2] > t.shape[-1]
    return t, tall, gram(t.mT if tall else t)


def _descending_eigh(g: torch.Tensor):
    eigenvalues, vectors = torch.linalg.eigh(g)
    return eigenvalues.flip(-1).clamp_min(0), vectors.flip(-1)


def _keeps_enough(g: torch.Tensor, count: int, min_ratio: float) -> bool:
    """Whether every Gram matrix of g likely has `count` eigenvalues from min_ratio of its
    largest on (an inertia count, a lower bound on the largest: lenient near the boundary,
    where the eigenvalues decide)."""
    thresholds = min_ratio * largest_eigenvalue(g)
    if not bool(torch.isfinite(thresholds).all()):
        return True  # let the eigh and its checks decide
    return bool((eigenvalues_above(g, thresholds) >= count).all())


def _triplets_from_gram(t, tall, eigenvalues, vectors, count: int):
    s = eigenvalues[..., :count].sqrt()
    vectors = vectors[..., :count]
    if tall:
        u, vh = (t @ vectors) / s.unsqueeze(-2), vectors.mT
    else:
        u, vh = vectors, (vectors.mT @ t) / s.unsqueeze(-1)
    return u.float(), s.float(), vh.float()


def _kept_ratios(eigenvalues, count: int) -> torch.Tensor:
    """Per matrix: the smallest kept eigenvalue over the largest (1 when nothing is kept)."""
    if count == 0:
        return torch.ones(eigenvalues.shape[:-1], dtype=eigenvalues.dtype,
                          device=eigenvalues.device)
    top = eigenvalues[..., 0].clamp_min(1e-300)
    return eigenvalues[..., count - 1] / top


def _kept_ratio(eigenvalues, count: int) -> float:
    """Smallest kept eigenvalue over the largest, over the batch (1 when nothing is kept)."""
    return float(_kept_ratios(eigenvalues, count).min())


def _top_triplets(d: torch.Tensor, count: int, exact: bool):
    """Top `count` singular triplets of every matrix in d [..., m, n]: full SVDs in exact mode;
    otherwise from the eigh of the smaller Gram matrix: in fp32 when the kept eigenvalues stand
    well above fp32 roundoff, in float64 when they are smaller (more accurate than an fp32 SVD,
    and not slower except for square matrices above 1024, which go to the SVD instead), and by
    SVD when even float64 would lose them.
    Each matrix takes the first route accurate for it. The first matrix goes alone and the rest
    start from the route it needed: the task vectors of one layer have alike spectra, and a
    failed try costs a GEMM and an eigh."""
    *batch_shape, m, n = d.shape
    if exact:
        return _svd_top(d, count)
    flat, scale = _gram_safe_scaling(d.reshape(-1, m, n))
    head, route = _routed_triplets(flat[:1], count, first_route=0, screen=True)
    parts = [head]
    if flat.shape[0] > 1:
        parts.append(_routed_triplets(flat[1:], count, first_route=route)[0])
    u, s, vh = (torch.cat([p[i] for p in parts]) for i in range(3))
    if scale is not None:
        s = s * scale.unsqueeze(-1)
    return (u.reshape(*batch_shape, m, -1), s.reshape(*batch_shape, -1),
            vh.reshape(*batch_shape, -1, n))


# Entries beyond 2^±40 would overflow (or lose to underflow) the fp32 Gram matrix
# (n * |x|^2 must stay below 3.4e38); such matrices are scaled by a power of two, which is exact.
_GRAM_SAFE_EXPONENT = 40


def _gram_safe_scaling(flat: torch.Tensor):
    """(flat scaled so that every matrix's largest magnitude lies in [0.5, 2), per-matrix
    scale) when some matrix has entries outside the safe range; (flat, None) otherwise."""
    if flat.numel() == 0:
        return flat, None
    flat_d = flat.detach()  # largest magnitude without an abs() temporary (7x faster)
    amax = torch.maximum(flat_d.amax((-2, -1)), -flat_d.amin((-2, -1)))
    exponent = torch.frexp(amax).exponent
    needs = (amax > 0) & (exponent.abs() > _GRAM_SAFE_EXPONENT)
    if not bool(needs.any()):
        return flat, None
    # 2^128 is not a float32: entries from 2^127 on are scaled into [1, 2) instead
    scale = torch.ldexp(torch.ones_like(amax), torch.where(needs, exponent.clamp_max(127), 0))
    return flat / scale[:, None, None], scale


def _routed_triplets(d: torch.Tensor, count: int, first_route: int, screen: bool = False):
    """(u, s, vh) of the batch d [b, m, n] with each matrix on the first accurate route from
    first_route on, and the last route any matrix needed. With screen, a Gram route that only
    an SVD would follow (large square matrices, whose eigh takes seconds) is first screened by
    an inertia count (4096 x 4096: 0.7 s instead of a 5 s eigh thrown away)."""
    routes = _GRAM_ROUTES if float64_gram_pays(*d.shape[-2:]) else _GRAM_ROUTES[:1]
    if first_route >= len(routes):
        return _svd_top(d, count), len(routes)
    dtype, min_ratio = routes[first_route]
    t, tall, g = _smaller_gram(d, dtype)
    if screen and len(routes) == 1 and not _keeps_enough(g, count, min_ratio):
        return _svd_top(d, count), len(routes)
    eigenvalues, vectors = _descending_eigh(g)
    accurate = _kept_ratios(eigenvalues, count) >= min_ratio
    if bool(accurate.all()):
        return _triplets_from_gram(t, tall, eigenvalues, vectors, count), first_route
    redo, route = _routed_triplets(d[~accurate], count, first_route + 1)
    if not bool(accurate.any()):
        return redo, route
    done = _triplets_from_gram(t[accurate], tall, eigenvalues[accurate], vectors[accurate],
                               count)
    out = []
    for kept, again in zip(done, redo):
        merged = kept.new_empty((d.shape[0], *kept.shape[1:]))
        merged[accurate], merged[~accurate] = kept, again
        out.append(merged)
    return tuple(out), route


def _tsv_matrix(d: torch.Tensor, exact: bool) -> torch.Tensor:
    tasks, m, n = d.shape
    rank = int(min(m, n) / tasks)
    if rank == 0:  # more tasks than dimensions: nothing is kept (as the reference)
        return torch.zeros(m, n, device=d.device)
    u, s, vh = _top_triplets(d, rank, exact)
    u_cat = u.permute(1, 0, 2).reshape(m, tasks * rank)
    v_cat = vh.reshape(tasks * rank, n)
    if exact:
        return (_exact_polar(u_cat) * s.reshape(-1)) @ _exact_polar(v_cat)
    return _fast_polar(v_cat, left=_fast_polar(u_cat) * s.reshape(-1))


def _iso_c_matrix(d: torch.Tensor, exact: bool) -> torch.Tensor:
    total = d.sum(0)
    k = min(total.shape)
    if exact:
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        return (u * s.mean()) @ vh
    p = _fast_polar(total)
    nuclear = (p * total).sum()  # trace(P^T M) = sum of the singular values
    return p * (nuclear / k)


def _iso_cts_fast_parts(d: torch.Tensor, common: int, per_task: int):
    """Iso-CTS's common and task-specific triplets from Gram matrices; None when a kept
    singular value is too small for that route."""
    tasks, m, n = d.shape
    t, tall, eigenvalues, vectors = _gram_eig(d.sum(0))
    if _kept_ratio(eigenvalues, common) < _FP64_GRAM_MIN_RATIO:
        return None
    u_c, s_c, v_c = _triplets_from_gram(t, tall, eigenvalues, vectors, common)
    if per_task == 0:
        return u_c, s_c, v_c, None
    if not tall:
        # Every left singular vector of the sum is known: the part of d_t off the common
        # subspace is U_perp (U_perp^T d_t), so its SVD is that of the small U_perp^T d_t.
        complement = vectors[:, common:].float()
        u_t, s_t, vh_t = _top_triplets(complement.mT @ d, per_task, exact=False)
        u_t = complement @ u_t
    else:
        u_t, s_t, vh_t = _top_triplets(d - u_c @ (u_c.mT @ d), per_task, exact=False)
    return u_c, s_c, v_c, (u_t, s_t, vh_t)


def _iso_cts_matrix(d: torch.Tensor, common_space_fraction: float, exact: bool) -> torch.Tensor:
    tasks, m, n = d.shape
    k = min(m, n)
    common, per_task = iso_cts_split(k, tasks, common_space_fraction)
    if common < 0:  # the authors' code fails on a shape here
        raise InvalidArgumentError(
            f"iso_cts: common_space_fraction {common_space_fraction} leaves {k - common} "
            f"task-specific dims (a multiple of {tasks} tasks) for a {m}x{n} matrix of rank "
            f"{k}; use a larger fraction")
    parts = None if exact else _iso_cts_fast_parts(d, common, per_task)
    if parts is None:
        u_c, s_c, v_c = _svd_top(d.sum(0), common)
        specific = (_svd_top(d - u_c @ (u_c.mT @ d), per_task) if per_task else None)
    else:
        u_c, s_c, v_c, specific = parts
    pieces_u, pieces_s, pieces_v = [], [], []
    if specific is not None:
        u_t, s_t, vh_t = specific
        pieces_u.append(u_t.permute(1, 0, 2).reshape(m, tasks * per_task))
        pieces_s.append(s_t.reshape(-1))
        pieces_v.append(vh_t.reshape(tasks * per_task, n))
    comb_u = torch.cat(pieces_u + [u_c], dim=1)
    comb_s = torch.cat(pieces_s + [s_c])
    comb_v = torch.cat(pieces_v + [v_c], dim=0)
    if exact:
        return (_exact_polar(comb_u) * comb_s.mean()) @ _exact_polar(comb_v)
    return _fast_polar(comb_v, left=_fast_polar(comb_u) * comb_s.mean())


def _dc_merge_matrix(d: torch.Tensor, keep_fraction: float, exact: bool) -> torch.Tensor:
    tasks, m, n = d.shape
    k = min(m, n)
    rank = int(k / tasks)
    if rank == 0:
        return torch.zeros(m, n, device=d.device)
    u, s, vh = _top_triplets(d, rank, exact)
    orthogonal = _exact_polar if exact else _fast_polar
    cover_u = orthogonal(u.permute(1, 0, 2).reshape(m, tasks * rank))
    cover_v = orthogonal(vh.reshape(tasks * rank, n))
    # Each truncated task vector in the cover basis, (U_c^T U_t) S_t (V_t V_c^T), without
    # forming U_t S_t V_t. The reference pads the basis to k columns; the padding is orthogonal
    # to every task's singular vectors, so those rows and columns are zero and only the count
    # kept by the sparsification (a fraction of k^2) depends on it.
    inner = ((cover_u.mT @ u) * s.unsqueeze(-2)) @ (vh @ cover_v.mT)
    # The authors keep max(1, int(f k^2)) entries of the zero-padded k x k matrix: that count
    # (all entries when it reaches the cover's size, the rest being zeros).
    keep = max(1, int(keep_fraction * k * k))
    inner = torch.stack([_keep_top_count(x, keep) for x in inner])
    merged = _sign_elected_mean(inner)
    blocks = torch.block_diag(*[torch.ones(rank, rank, device=d.device)] * tasks)
    return cover_u @ (merged * blocks) @ cover_v


def _cart_matrix(d: torch.Tensor, rank_ratio: float, lambda_: float, exact: bool) -> torch.Tensor:
    tasks, m, n = d.shape
    average = d.mean(0)
    if average.numel() == 0:
        return average
    rank = cart_rank(min(m, n), rank_ratio)
    u, s, vh = _top_triplets(d - average, rank, exact)
    # sum_t U_t S_t V_t as one GEMM over the concatenated factors
    low_rank = (u * s.unsqueeze(-2)).permute(1, 0, 2).reshape(m, tasks * rank) @ \
        vh.reshape(tasks * rank, n)
    return average + lambda_ * low_rank


def _check_exact(exact) -> bool:
    if not isinstance(exact, bool):
        raise InvalidArgumentError(f"exact must be a bool, got {exact!r}")
    return exact


def tsv(base: torch.Tensor, experts: Sequence[torch.Tensor], *, alpha: float = 1.0,
        exact: bool = False, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """TSV-M (Task Singular Vectors merge): each task keeps its top int(k / T) singular triplets,
    the concatenated singular vectors are orthogonalised (decorrelating the tasks), and the
    task vector is rebuilt from them; base + alpha * that."""
    exact = _check_exact(exact)
    b, d, alpha, dtype = _deltas(base, experts, alpha, out_dtype)
    merged = _tsv_matrix(d, exact) if d.dim() == 3 else d.mean(0)
    return _finish(b, merged, alpha, dtype)


def iso_c(base: torch.Tensor, experts: Sequence[torch.Tensor], *, alpha: float = 1.0,
          exact: bool = False, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Iso-C: the sum of the task vectors with a flat spectrum (every singular value replaced by
    their mean); base + alpha * that."""
    exact = _check_exact(exact)
    b, d, alpha, dtype = _deltas(base, experts, alpha, out_dtype)
    merged = _iso_c_matrix(d, exact) if d.dim() == 3 else d.mean(0)
    return _finish(b, merged, alpha, dtype)


def iso_cts(base: torch.Tensor, experts: Sequence[torch.Tensor], *, alpha: float = 1.0,
            common_space_fraction: float = 0.8, exact: bool = False,
            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Iso-CTS: the top common_space_fraction of the summed task vector's singular directions,
    plus each task's top directions off that common subspace, orthogonalised, with a flat
    spectrum; base + alpha * that."""
    exact = _check_exact(exact)
    fraction = check_scalar(common_space_fraction, "common_space_fraction")
    if not 0.0 <= fraction <= 1.0:
        raise InvalidArgumentError(f"common_space_fraction must be in [0, 1], got {fraction}")
    b, d, alpha, dtype = _deltas(base, experts, alpha, out_dtype)
    merged = _iso_cts_matrix(d, fraction, exact) if d.dim() == 3 else d.mean(0)
    return _finish(b, merged, alpha, dtype)


def dc_merge(base: torch.Tensor, experts: Sequence[torch.Tensor], *, alpha: float = 1.0,
             keep_fraction: float = 1e-3, exact: bool = False,
             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """DC-Merge: TSV-M's per-task truncation and decorrelated basis, with the task vectors
    merged inside that basis (each sparsified to its top keep_fraction entries, sign-elected,
    restricted to its own block); base + alpha * that."""
    exact = _check_exact(exact)
    fraction = check_scalar(keep_fraction, "keep_fraction")
    if not 0.0 < fraction <= 1.0:
        raise InvalidArgumentError(f"keep_fraction must be in (0, 1], got {fraction}")
    b, d, alpha, dtype = _deltas(base, experts, alpha, out_dtype)
    merged = _dc_merge_matrix(d, fraction, exact) if d.dim() == 3 else d.mean(0)
    return _finish(b, merged, alpha, dtype)


def cart(base: torch.Tensor, experts: Sequence[torch.Tensor], *, alpha: float = 1.0,
         rank_ratio: float = 0.08, lambda_: float = 1.0, exact: bool = False,
         out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """CART (Centered Arithmetic with Rank-reduced Task vectors): the experts' average plus
    lambda_ times the sum of each expert's offset from that average reduced to rank
    max(1, int(rank_ratio * min(m, n))); base + alpha * (that - base). Every 2-D tensor given
    is low-ranked; `fastmerge run` does so for attention and MLP weights only, as the authors'
    code does (the rest is averaged)."""
    exact = _check_exact(exact)
    ratio = check_scalar(rank_ratio, "rank_ratio")
    if not 0.0 < ratio <= 1.0:
        raise InvalidArgumentError(f"rank_ratio must be in (0, 1], got {ratio}")
    lam = check_scalar(lambda_, "lambda_")
    b, d, alpha, dtype = _deltas(base, experts, alpha, out_dtype)
    merged = _cart_matrix(d, ratio, lam, exact) if d.dim() == 3 else d.mean(0)
    return _finish(b, merged, alpha, dtype)


__all__: List[str] = ["cart", "dc_merge", "iso_c", "iso_cts", "tsv"]
