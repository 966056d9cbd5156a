"""Spherical merges (csrc/ops/sphere): mergekit 0.1.5's nuslerp, multislerp and karcher.

Each is one statistics pass (the inputs' Gram matrices, accumulated in fp64), mergekit's
formulas on those numbers, and one fp32 output pass rounded once to the output dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _native
from .._params import MULTISLERP_ANTIPODAL, sphere_arguments, sphere_layout
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


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a bool, got {value!r}")
    return value


def _finish(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out.to(dtype) if out.dtype != dtype else out


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, base: Optional[torch.Tensor] = None,
            dim: int = -1, flatten: bool = False, eps: float = 1e-8,
            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit's nuslerp: spherical interpolation from v0 (t=0) to v1 (t=1) of every vector
    along dim (of the whole tensor when flatten), applied to the raw vectors:
    sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1 with cos(theta) the cosine of
    the vectors (norms clamped at 1e-7), and (1-t) v0 + t v1 where 1 - cos^2 <= eps^2.
    With base: base + nuslerp(t, v0 - base, v1 - base), fused."""
    v0 = check_tensor(v0, "v0")
    v1 = check_tensor(v1, "v1")
    others, names = [v1], ["v1"]
    if base is not None:
        others.append(check_tensor(base, "base"))
        names.append("base")
    check_same_layout(v0, "v0", others, names)
    t = check_scalar(t, "t")
    eps = check_scalar(eps, "eps", low=0.0)
    layout = sphere_layout(v0.shape, dim, _check_bool(flatten, "flatten"))
    dtype = resolve_out_dtype(out_dtype, (base if base is not None else v0).dtype)
    if not use_native(v0.device):
        return _reference.nuslerp(t, v0, v1, base=base, dim=dim, flatten=flatten, eps=eps).to(dtype)
    a, b = kernel_input(v0), kernel_input(v1)
    w0 = kernel_input(base) if base is not None else None
    out = kernel_output(v0.shape, dtype, v0.device)
    if v0.numel():
        _native.native().nuslerp(capsule(w0) if w0 is not None else None, capsule(a), capsule(b),
                                 capsule(out), *layout, t, eps, cuda_stream(v0.device))
    return _finish(out, dtype)


# The CUDA output pass of multislerp / karcher takes at most this many inputs (kernel
# parameters); more go through the torch reference on the device.
_CUDA_MAX_INPUTS = 64


def _beyond_cuda_kernel(device: torch.device, count: int) -> bool:
    return device.type == "cuda" and count > _CUDA_MAX_INPUTS


def _given(**arguments) -> None:
    """sphere_arguments skips what is None (not an argument of that op): these must be given."""
    for name, value in arguments.items():
        if value is None:
            raise InvalidArgumentError(f"{name} must be given, got None")


def multislerp(tensors: Sequence[torch.Tensor], weights, *, base: Optional[torch.Tensor] = None,
               normalize_weights: bool = True, eps: float = 1e-8,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit's multislerp: barycentric interpolation on the hypersphere of the flattened
    (delta) tensors: the weighted mean of the unit vectors x_i / (|x_i| + eps), normalised,
    mapped through the tangent space, scaled by sum_i w_i |x_i| (weights normalised to sum 1
    when normalize_weights), plus base. One tensor is returned unchanged (base or not); two
    whose weighted unit mean vanishes are interpolated linearly; more raise
    InvalidArgumentError (mergekit raises ValueError)."""
    tensors = check_experts(tensors, "tensors", minimum=1)
    _given(weights=weights, eps=eps)
    names = [f"tensors[{i}]" for i in range(1, len(tensors))]
    others = list(tensors[1:])
    if base is not None:
        others.append(check_tensor(base, "base"))
        names.append("base")
    check_same_layout(tensors[0], "tensors[0]", others, names)
    args = sphere_arguments(len(tensors), weights=weights, normalize_weights=normalize_weights,
                            eps=eps)
    dtype = resolve_out_dtype(out_dtype, tensors[0].dtype)
    device = tensors[0].device
    if not use_native(device) or _beyond_cuda_kernel(device, len(tensors)):
        return _reference.multislerp(tensors, args["weights"], base=base,
                                     normalize_weights=normalize_weights, eps=args["eps"]).to(dtype)
    xs = [kernel_input(x) for x in tensors]
    w0 = kernel_input(base) if base is not None else None
    out = kernel_output(tensors[0].shape, dtype, device)
    if out.numel():
        ok = _native.native().multislerp(capsule(w0) if w0 is not None else None,
                                         [capsule(x) for x in xs], capsule(out), args["weights"],
                                         normalize_weights, args["eps"], cuda_stream(device))
        if not ok:
            raise InvalidArgumentError(MULTISLERP_ANTIPODAL)
    return _finish(out, dtype)


def karcher(tensors: Sequence[torch.Tensor], *, alphas=None, max_iter: int = 10,
            tol: float = 1e-5, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """mergekit's karcher (karcher_merge_tensors): the weighted Karcher mean of the flattened
    tensors' directions on the unit hypersphere (inputs with norm <= tol take no part; at most
    max_iter Riemannian gradient steps, stopping when the step is below tol), scaled by
    sum_i alpha_i |x_i|. alphas default to uniform (mergekit's method)."""
    tensors = check_experts(tensors, "tensors", minimum=1)
    _given(max_iter=max_iter, tol=tol)
    check_same_layout(tensors[0], "tensors[0]", tensors[1:],
                      [f"tensors[{i}]" for i in range(1, len(tensors))])
    n = len(tensors)
    args = sphere_arguments(n, alphas=[1.0 / n] * n if alphas is None else alphas,
                            max_iter=max_iter, tol=tol)
    dtype = resolve_out_dtype(out_dtype, tensors[0].dtype)
    device = tensors[0].device
    if not use_native(device) or _beyond_cuda_kernel(device, len(tensors)):
        return _reference.karcher(tensors, args["alphas"], max_iter=args["max_iter"],
                                  tol=args["tol"]).to(dtype)
    xs = [kernel_input(x) for x in tensors]
    out = kernel_output(tensors[0].shape, dtype, device)
    if out.numel():
        _native.native().karcher([capsule(x) for x in xs], capsule(out), args["alphas"],
                                 args["max_iter"], args["tol"], cuda_stream(device))
    return _finish(out, dtype)
