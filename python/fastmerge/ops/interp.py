"""Interpolation merges (csrc/ops/interp): slerp, nearswap and model_stock."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _native
from ..errors import InvalidArgumentError
from . import _reference
from ._validate import (
    capsule,
    check_experts,
    check_same_layout,
    check_scalar,
    check_tensor,
    cuda_stream,
    kernel_input,
    kernel_output,
    resolve_out_dtype,
    use_native,
)


def _pairwise(kernel: str, base, other, t, out_dtype) -> torch.Tensor:
    """Checks and runs a two-model kernel with a scalar t (slerp, nearswap)."""
    base = check_tensor(base, "base")
    other = check_tensor(other, "other")
    check_same_layout(base, "base", [other], ["other"])
    t = check_scalar(t, "t")
    dtype = resolve_out_dtype(out_dtype, base.dtype)
    if not use_native(base.device):
        return getattr(_reference, kernel)(base, other, t).to(dtype)
    a, b = kernel_input(base), kernel_input(other)
    out = kernel_output(base.shape, dtype, base.device)
    if base.numel():
        getattr(_native.native(), kernel)(capsule(a), capsule(b), capsule(out), t,
                                          cuda_stream(base.device))
    return out.to(dtype) if out.dtype != dtype else out


def slerp(base: torch.Tensor, other: torch.Tensor, t: float, *,
          out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Spherical interpolation from base (t=0) to other (t=1) over the flattened tensors, with
    mergekit's fallback to linear interpolation for nearly collinear inputs (|cos| > 0.9995)."""
    return _pairwise("slerp", base, other, t, out_dtype)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float, *,
             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """NearSwap (mergekit): per element, the other model's value where the two differ by at
    most t, blending back toward the base as they drift apart:
    w = clamp(t / max(|base - other|, 1e-6), 0, 1), out = w * other + (1 - w) * base."""
    return _pairwise("nearswap", base, other, t, out_dtype)


# The CUDA model_stock kernel unrolls its Gram statistics for at most this many experts; more
# go through the torch reference on the device (same semantics, fp32 inputs, float64 Gram).
_CUDA_STOCK_MAX_EXPERTS = 8


def model_stock(base: torch.Tensor, experts: Sequence[torch.Tensor], *, filter_wise: bool = False,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Model Stock (Jang et al., 2024): interpolate the experts' average toward base by the
    ratio derived from the mean pairwise cosine of the task vectors; per row when filter_wise."""
    base = check_tensor(base, "base")
    experts = check_experts(experts, minimum=2)
    check_same_layout(base, "base", experts, [f"experts[{i}]" for i in range(len(experts))])
    if not isinstance(filter_wise, bool):
        raise InvalidArgumentError(f"filter_wise must be a bool, got {filter_wise!r}")
    dtype = resolve_out_dtype(out_dtype, base.dtype)
    beyond_cuda_kernel = base.device.type == "cuda" and len(experts) > _CUDA_STOCK_MAX_EXPERTS
    if not use_native(base.device) or beyond_cuda_kernel:
        return _reference.model_stock(base, experts, filter_wise=filter_wise).to(dtype)
    # filter_wise reduces over the last dim (a 1-D tensor is one row); otherwise one flat row.
    rows = 1
    if filter_wise and base.dim() >= 2:
        rows = base.numel() // base.shape[-1] if base.shape[-1] else 1
    b = kernel_input(base)
    ins = [kernel_input(e) for e in experts]
    out = kernel_output(base.shape, dtype, base.device)
    if base.numel():
        _native.native().model_stock(capsule(b), [capsule(e) for e in ins], capsule(out), rows,
                                     cuda_stream(base.device))
    return out.to(dtype) if out.dtype != dtype else out
