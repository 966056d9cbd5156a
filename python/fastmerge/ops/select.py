"""Exact magnitude top-k (csrc/ops/select)."""
from __future__ import annotations

import torch

from .. import _native
from . import _reference
from ._validate import capsule, check_scalar, check_tensor, cuda_stream, kernel_input, use_native


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the k = max(1, int(density * numel)) largest |x| (all for density >= 1,
    none for density <= 0); among equal magnitudes the lowest flat indices are kept."""
    x = check_tensor(x, "x")
    density = check_scalar(density, "density", low=0.0, high=1.0)
    if not use_native(x.device):
        return _reference.magnitude_mask(x, density)
    xin = kernel_input(x)
    mask = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    _native.native().magnitude_mask(capsule(xin), density, capsule(mask), cuda_stream(x.device))
    return mask.view(torch.bool)
