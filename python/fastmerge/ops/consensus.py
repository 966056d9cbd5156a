"""Consensus merges (csrc/ops/consensus): mergekit 0.1.5's ram, ramplus_tl, sce and
arcee_fusion as fused kernels (fp32 arithmetic, one rounding to the output dtype)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _native
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


# The CUDA kernels take the experts as one by-value parameter struct of this many pointers
# (kMaxExperts in consensus_cuda.cu); more go through the torch reference on the device.
_CUDA_MAX_EXPERTS = 32


def _with_experts(kernel: str, base, experts, out_dtype, scalars: Sequence[float],
                  reference) -> torch.Tensor:
    base = check_tensor(base, "base")
    experts = check_experts(experts)
    check_same_layout(base, "base", experts, [f"experts[{i}]" for i in range(len(experts))])
    dtype = resolve_out_dtype(out_dtype, base.dtype)
    beyond_cuda_kernel = base.device.type == "cuda" and len(experts) > _CUDA_MAX_EXPERTS
    if not use_native(base.device) or beyond_cuda_kernel:
        return reference().to(dtype)
    b = kernel_input(base)
    ins = [kernel_input(e) for e in experts]
    out = kernel_output(base.shape, dtype, base.device)
    if base.numel():
        getattr(_native.native(), kernel)(capsule(b), [capsule(e) for e in ins], capsule(out),
                                          *scalars, cuda_stream(base.device))
    return out.to(dtype) if out.dtype != dtype else out


def ram(base: torch.Tensor, experts: Sequence[torch.Tensor], *, epsilon: float = 1e-5,
        out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Reinforced Agent Merging (mergekit's ram): an element changed (|delta| > epsilon) by one
    expert takes that expert's delta; changed by several, the mean of their deltas."""
    epsilon = check_scalar(epsilon, "epsilon")
    return _with_experts("ram", base, experts, out_dtype, (epsilon,),
                         lambda: _reference.ram(base, experts, epsilon))


def ramplus_tl(base: torch.Tensor, experts: Sequence[torch.Tensor], *, r: float = 0.1,
               alpha: float = 0.2, epsilon: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """RAM+ tensor-local (mergekit's ramplus_tl): ram with each expert's unique deltas scaled by
    1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha), from its counts of elements it
    shares with other experts and changes alone."""
    r = check_scalar(r, "r")
    alpha = check_scalar(alpha, "alpha")
    epsilon = check_scalar(epsilon, "epsilon")
    return _with_experts("ramplus_tl", base, experts, out_dtype, (r, alpha, epsilon),
                         lambda: _reference.ramplus_tl(base, experts, r, alpha, epsilon))


def sce(base: torch.Tensor, experts: Sequence[torch.Tensor], *, select_topk: float = 1.0,
        out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """SCE (mergekit's sce): keep the select_topk fraction of the nonzero-variance elements with
    the largest variance across the experts' deltas (all when >= 1, none when <= 0; ties to the
    lowest flat index), elect signs by the sum of the deltas, and average the agreeing deltas
    weighted by each expert's mean squared (masked) delta."""
    select_topk = check_scalar(select_topk, "select_topk")
    return _with_experts("sce", base, experts, out_dtype, (select_topk,),
                         lambda: _reference.sce(base, experts, select_topk))


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, *,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Arcee Fusion (mergekit's arcee_fusion): take other's value where its importance
    |other - base| * KL(softmax(other row) || softmax(base row)) (rows along the last dim) is at
    least median + 1.5 * (q3 - q1) of all importances, base's elsewhere. The quantiles are the
    exact order statistics sorted[int(q * (n - 1))]; mergekit estimates them from a random
    sample of 1e6 elements when the tensor is larger."""
    base = check_tensor(base, "base")
    other = check_tensor(other, "other")
    check_same_layout(base, "base", [other], ["other"])
    dtype = resolve_out_dtype(out_dtype, base.dtype)
    if not use_native(base.device):
        return _reference.arcee_fusion(base, other).to(dtype)
    b, p = kernel_input(base), kernel_input(other)
    out = kernel_output(base.shape, dtype, base.device)
    if base.numel():
        row_len = base.shape[-1] if base.dim() else 1
        _native.native().arcee_fusion(capsule(b), capsule(p), capsule(out), row_len,
                                      cuda_stream(base.device))
    return out.to(dtype) if out.dtype != dtype else out
