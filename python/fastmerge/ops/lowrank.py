"""Merges of low-rank (LoRA) updates in factored form: KnOTS, and the thin SVD of a sum of
low-rank products.

A LoRA update is dW = B @ A with B (m x r) and A (r x n), r much smaller than m and n. Methods
that decompose sums or concatenations of such updates (KnOTS, PEFT's add_weighted_adapter
"svd") need only their top r_1 + ... + r_T singular triplets, and those follow from QR
factorisations of the stacked factors and the SVD of an (r_1 + ... + r_T)-square core: about
m R^2 + n R^2 operations for R = sum r_i, instead of a dense m x n matrix and its O(m n min(m, n))
SVD. The small parts run in float64, so the factored route is as accurate as a float64 SVD of
the dense matrix (the reference, `exact=True`).

Singular values at or below 1e-6 of the largest are treated as zero: below what float32
factors resolve (float32 rounding of a dense update leaves spurious directions near 1e-7 of the
largest), they are the rank deficiency of shared or repeated directions, carry no update and
are dropped. KnOTS's top-k counts the coordinates of the directions kept, so the threshold is
part of the method's definition.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import InvalidArgumentError
from .._params import per_expert
from ._validate import check_decomposable, check_scalar, resolve_out_dtype
from .gta import generalized_task_arithmetic

# Relative singular-value floor below which a direction counts as absent (see module doc).
RANK_TOLERANCE = 1e-6
KNOTS_SPARSIFICATIONS = ("magnitude", "random")


def _check_factors(lefts, rights, left_name: str, right_name: str):
    """Validates paired factors: lefts[i] (m x r_i), rights[i] (r_i x n), one device."""
    if isinstance(lefts, torch.Tensor) or isinstance(rights, torch.Tensor):
        raise InvalidArgumentError(f"{left_name} and {right_name} must be sequences of tensors")
    try:
        lefts, rights = list(lefts), list(rights)
    except TypeError:
        raise InvalidArgumentError(f"{left_name} and {right_name} must be sequences of tensors, "
                                   f"got {type(lefts).__name__} and "
                                   f"{type(rights).__name__}") from None
    if not lefts or len(lefts) != len(rights):
        raise InvalidArgumentError(f"{left_name} and {right_name} must be non-empty and of equal "
                                   f"length, got {len(lefts)} and {len(rights)}")
    m = n = None
    for i, (b, a) in enumerate(zip(lefts, rights)):
        for x, what in ((b, f"{left_name}[{i}]"), (a, f"{right_name}[{i}]")):
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
                raise InvalidArgumentError(f"{what} must be a 2-D floating-point tensor, got "
                                           f"{getattr(x, 'shape', type(x).__name__)}")
            if x.device != lefts[0].device:
                raise InvalidArgumentError(f"{what} is on {x.device}, {left_name}[0] on "
                                           f"{lefts[0].device}")
            check_decomposable(x, what)
        if b.shape[1] != a.shape[0]:
            raise InvalidArgumentError(f"{left_name}[{i}] is {list(b.shape)} and {right_name}[{i}] "
                                       f"{list(a.shape)}: their inner (rank) sizes differ")
        if m is None:
            m, n = b.shape[0], a.shape[1]
        elif (b.shape[0], a.shape[1]) != (m, n):
            raise InvalidArgumentError(f"{left_name}[{i}] @ {right_name}[{i}] is "
                                       f"{b.shape[0]} x {a.shape[1]}, the first product {m} x {n}")
    return lefts, rights


def _kept(s: torch.Tensor) -> int:
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    return int((s > s[0] * RANK_TOLERANCE).sum())


def _weights(weights, count: int) -> List[float]:
    """A float or one finite float per update (a list or a tensor)."""
    return per_expert(weights, count, "weights")


def lowrank_svd(lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor], *,
                weights=1.0, exact: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh), float32, of sum_i weights[i] * lefts[i] @ rights[i] (lefts[i]
    m x r_i, rights[i] r_i x n) without forming it: U is m x k, S k, Vh k x n with k the
    numerical rank (at most r_1 + ... + r_T), singular values descending. exact=True forms the
    dense sum and runs torch.linalg.svd in float64 (the reference route)."""
    lefts, rights = _check_factors(lefts, rights, "lefts", "rights")
    w = _weights(weights, len(lefts))
    if exact:
        dense = sum(wi * (b.double() @ a.double()) for wi, b, a in zip(w, lefts, rights))
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    else:
        stacked_left = torch.cat([wi * b.double() for wi, b in zip(w, lefts)], dim=1)
        stacked_right = torch.cat([a.double() for a in rights], dim=0)
        q_left, r_left = torch.linalg.qr(stacked_left)
        q_right, r_right = torch.linalg.qr(stacked_right.mT)
        u_core, s, vh_core = torch.linalg.svd(r_left @ r_right.mT, full_matrices=False)
        u, vh = q_left @ u_core, vh_core @ q_right.mT
    k = _kept(s)
    return u[:, :k].float(), s[:k].float(), vh[:k].float()


def concatenated_svd(lefts: Sequence[torch.Tensor], rights: Sequence[torch.Tensor], *,
                     exact: bool = False):
    """Thin SVD of the column-wise concatenation [B_1 A_1, ..., B_T A_T] (m x T n), float64:
    (U m x k, S k, [Vh_1, ..., Vh_T] each k x n), k the numerical rank. Factored: QR of the
    stacked B's (m x R) and of each A_i^T (the concatenation's right factor is block-diagonal,
    so its QR is the block diagonal of theirs), then the SVD of the R x R core."""
    lefts, rights = _check_factors(lefts, rights, "lora_b", "lora_a")
    n = rights[0].shape[1]
    if exact:
        dense = torch.cat([b.double() @ a.double() for b, a in zip(lefts, rights)], dim=1)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        blocks = list(vh.split(n, dim=1))
    else:
        q_left, r_left = torch.linalg.qr(torch.cat([b.double() for b in lefts], dim=1))
        q_rights, r_rights = zip(*(torch.linalg.qr(a.double().mT) for a in rights))
        core = r_left @ torch.block_diag(*r_rights).mT
        u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
        u = q_left @ u_core
        widths = [q.shape[1] for q in q_rights]
        blocks = [part @ q.mT for part, q in zip(vh_core.split(widths, dim=1), q_rights)]
    k = _kept(s)
    return u[:, :k], s[:k], [b[:k] for b in blocks]


def knots(lora_b: Sequence[torch.Tensor], lora_a: Sequence[torch.Tensor], *, weights=1.0,
          density: float = 1.0, sparsification: str = "magnitude", lambda_: float = 1.0,
          seed: int = 0, name: str = "", exact: bool = False,
          out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025) on the
    LoRA updates dW_i = lora_b[i] @ lora_a[i] (each m x n; fold each adapter's scaling into
    its lora_b): the SVD U diag(S) [V_1^T ... V_T^T] of their concatenation [dW_1 ... dW_T]
    aligns the tasks in one basis; the tasks' coordinates diag(S) V_i^T are merged by TIES
    (sparsification="magnitude": each keeps its top density fraction by magnitude) or DARE-TIES
    ("random": each element kept with probability density, kept values divided by density,
    Philox masks keyed by seed and name), a sum-of-values sign election, and the mean over the
    tasks that agree, with per-task weights; the result is scaled by lambda_.

    Returns the merged update in factored form (B, A): B = U (m x k), A = lambda_ * merged
    (k x n), k the rank of the concatenation (at most r_1 + ... + r_T); B @ A is the dense
    update. Top-k and sign election run per call (per layer); the authors' code selects top-k
    over all layers of a model at once. exact=True decomposes the dense concatenation with
    torch.linalg.svd (float64), the default the factors (see module doc); both agree to
    float64 roundoff, up to the rotation freedom of repeated singular values."""
    if not isinstance(exact, bool):
        raise InvalidArgumentError(f"exact must be a bool, got {exact!r}")
    if sparsification not in KNOTS_SPARSIFICATIONS:
        raise InvalidArgumentError(f"sparsification must be one of {KNOTS_SPARSIFICATIONS}, "
                                   f"got {sparsification!r}")
    density = check_scalar(density, "density")
    if not 0.0 < density <= 1.0:
        raise InvalidArgumentError(f"density must be in (0, 1], got {density}")
    lambda_ = check_scalar(lambda_, "lambda_")
    lora_b, lora_a = _check_factors(lora_b, lora_a, "lora_b", "lora_a")
    w = _weights(weights, len(lora_b))
    dtype = resolve_out_dtype(out_dtype, lora_b[0].dtype)
    u, _s, blocks = concatenated_svd(lora_b, lora_a, exact=exact)
    m, n = lora_b[0].shape[0], lora_a[0].shape[1]
    if u.shape[1] == 0:  # every update is zero
        zeros = torch.zeros(m, 0, dtype=dtype, device=lora_b[0].device)
        return zeros, torch.zeros(0, n, dtype=dtype, device=lora_b[0].device)
    coordinates = [(_s.unsqueeze(1) * v).float().contiguous() for v in blocks]
    random = sparsification == "random"
    merged = generalized_task_arithmetic(
        None, coordinates, w, density=density, sparsification=sparsification,
        consensus="sum", normalize="count", rescale="density" if random else False,
        lambda_=lambda_, seed=seed, name=name, sign_from="unweighted")
    return u.to(dtype), merged.to(dtype)


__all__ = ["concatenated_svd", "knots", "lowrank_svd"]
