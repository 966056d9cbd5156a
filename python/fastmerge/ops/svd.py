"""Singular value decompositions for subspace merges (csrc/ops/svd).

batched_svd runs one-sided Jacobi on every matrix of a batch at once: the shape of work that
subspace merges produce (one small matrix per task, head or block), where a LAPACK/cuSOLVER call
per matrix spends most of its time in launch and dispatch overhead.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _native
from ..errors import InvalidArgumentError
from ._validate import capsule, check_tensor, cuda_stream, kernel_input, use_native


def batched_svd(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of every matrix in x [..., m, n]: U [..., m, k], S [..., k], Vh [..., k, n] with
    k = min(m, n) and x = U @ diag(S) @ Vh, singular values in descending order.

    Computed in fp32 whatever x's float dtype (float64 input is rounded to fp32 first) and
    returned as fp32. Singular vectors are unique only up to sign (and rotation within repeated
    singular values); the vectors of numerically zero singular values are completed to an
    orthonormal set, as torch.linalg.svd's are. Non-finite input gives non-finite output.
    """
    x = check_tensor(x, "x")
    if x.dim() < 2:
        raise InvalidArgumentError(f"x must have at least 2 dims [..., m, n], got shape "
                                   f"{tuple(x.shape)}")
    *batch_shape, m, n = x.shape
    k = min(m, n)
    if not use_native(x.device):
        u, s, vh = torch.linalg.svd(x.detach().float(), full_matrices=False)
        return u, s, vh
    batch = 1
    for d in batch_shape:
        batch *= d
    flat = kernel_input(x).reshape(batch, m, n)
    u = torch.empty((batch, m, k), dtype=torch.float32, device=x.device)
    s = torch.empty((batch, k), dtype=torch.float32, device=x.device)
    vh = torch.empty((batch, k, n), dtype=torch.float32, device=x.device)
    if batch and k:
        _native.native().batched_svd(capsule(flat), capsule(u), capsule(s), capsule(vh),
                                     cuda_stream(x.device))
    return (u.reshape(*batch_shape, m, k), s.reshape(*batch_shape, k),
            vh.reshape(*batch_shape, k, n))
