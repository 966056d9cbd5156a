"""Argument checking shared by the public ops, and the hand-off of tensors to _C.

Validation with good messages happens here; the C++ side keeps only the checks that prevent
faults. Every failure is an InvalidArgumentError naming the argument and the value.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Sequence, Union

import torch
import torch.utils.dlpack

from .. import _native
from .._params import check_scalar, check_seed, per_expert, stream_hash  # noqa: F401
from ..errors import InvalidArgumentError
from ..host_kernels import RECYCLED_OUTPUT_BYTES

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PerExpert = Union[float, Sequence[float], torch.Tensor]


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise InvalidArgumentError(f"{name} has layout {x.layout}; fastmerge merges dense (strided) "
                                   "tensors: call .to_dense() first")
    if x.dtype == torch.float64:
        return x  # computed in fp32 like every other input (numerics contract)
    if x.dtype not in KERNEL_DTYPES:
        raise InvalidArgumentError(
            f"{name} has dtype {x.dtype}; fastmerge merges float32, float16 and bfloat16 tensors"
        )
    return x


def check_experts(experts, name: str = "experts", minimum: int = 1) -> List[torch.Tensor]:
    if isinstance(experts, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a list of tensors, got a single tensor")
    try:
        items = list(experts)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be a list of tensors, got {type(experts).__name__}") from None
    if len(items) < minimum:
        raise InvalidArgumentError(f"{name} needs at least {minimum} tensor(s), got {len(items)}")
    return [check_tensor(t, f"{name}[{i}]") for i, t in enumerate(items)]


def finite_per_matrix(x: torch.Tensor) -> torch.Tensor:
    """Whether each matrix of x [..., m, n] is free of NaN/Inf, as a bool tensor of x's batch
    shape. A sum is one read pass without temporaries (isfinite makes several); NaN and Inf
    survive it, so a finite sum proves a finite matrix and only the rest (a non-finite entry,
    or finite values whose sum overflows) get the exact check."""
    finite = torch.isfinite(x.sum((-2, -1)))
    if not bool(finite.all()):
        finite = torch.isfinite(x).flatten(-2).all(-1)
    return finite


def check_decomposable(x: torch.Tensor, name: str) -> None:
    """Inputs that reach an SVD or eigh must be finite: LAPACK refuses NaN/Inf (a
    LinAlgError from deep inside), so name the argument instead."""
    if not x.is_floating_point() or bool(torch.isfinite(x.sum())):
        return  # a finite sum proves finite entries in one pass (see finite_per_matrix)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise InvalidArgumentError(f"{name} has {bad} NaN/Inf value(s); this op decomposes its "
                                   f"inputs (SVD/eigh), which needs finite values")


def check_same_layout(reference: torch.Tensor, ref_name: str, tensors: Sequence[torch.Tensor],
                      names: Sequence[str]) -> None:
    for t, n in zip(tensors, names):
        if t.shape != reference.shape:
            raise InvalidArgumentError(
                f"{n} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(reference.shape)}"
            )
        if t.device != reference.device:
            raise InvalidArgumentError(f"{n} is on {t.device} but {ref_name} is on {reference.device}")


def resolve_out_dtype(out_dtype, default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default if default in KERNEL_DTYPES or default == torch.float64 else torch.float32
    if out_dtype not in KERNEL_DTYPES and out_dtype != torch.float64:
        raise InvalidArgumentError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    return out_dtype


def check_out(out, reference: torch.Tensor, out_dtype, inputs: Sequence[tuple]) -> torch.dtype:
    """Checks a caller's out= tensor against the result it will receive; returns its dtype,
    which is the result's. inputs: (name, tensor or None) pairs that out must not overlap (the
    kernels read inputs while they write out)."""
    if not isinstance(out, torch.Tensor):
        raise InvalidArgumentError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != reference.shape:
        raise InvalidArgumentError(f"out has shape {tuple(out.shape)} but the result has shape "
                                   f"{tuple(reference.shape)}")
    if out.device != reference.device:
        raise InvalidArgumentError(f"out is on {out.device} but the inputs are on {reference.device}")
    if out.dtype not in KERNEL_DTYPES and out.dtype != torch.float64:
        raise InvalidArgumentError(f"out has dtype {out.dtype}; results are float32, float16, "
                                   "bfloat16 or float64")
    if out_dtype is not None and out_dtype != out.dtype:
        raise InvalidArgumentError(f"out_dtype={out_dtype} disagrees with out, which has dtype {out.dtype}")
    if out.requires_grad:
        raise InvalidArgumentError("out requires grad; fastmerge ops do not record autograd history")
    if _overlaps_itself(out):
        raise InvalidArgumentError(f"out is a view whose elements share memory (shape "
                                   f"{tuple(out.shape)}, strides {tuple(out.stride())}, e.g. an "
                                   "expanded one); pass a tensor of its own")
    if out.is_neg() or out.is_conj():
        raise InvalidArgumentError("out is a lazily negated view; pass a materialised tensor")
    for name, t in inputs:
        if t is not None and _shares_memory(out, t):
            raise InvalidArgumentError(f"out overlaps {name} in memory; pass a separate tensor")
    return out.dtype


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of t may share memory: taken from the smallest stride up, each
    dimension must step past everything the smaller ones span (conservative, like
    _shares_memory; every layout torch creates for a fresh or sliced tensor passes)."""
    span = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride < span:
            return True
        span = stride * (size - 1) + span
    return False


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte extents of a and b in one storage intersect (a conservative test)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def extent(t: torch.Tensor):
        first = t.storage_offset()
        last = first + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return first * t.element_size(), (last + 1) * t.element_size()

    (a_lo, a_hi), (b_lo, b_hi) = extent(a), extent(b)
    return a_lo < b_hi and b_lo < a_hi


def kernel_input(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, kernel dtype (float64 is computed in fp32), no autograd, and torch's lazy
    negation applied (DLPack hands over the stored values, not the negated ones)."""
    t = t.detach().resolve_neg()
    if t.dtype == torch.float64:
        t = t.float()
    return t.contiguous()


# CPU results of RECYCLED_OUTPUT_BYTES or more come from _C's recycled output buffers
# (bind_memory.cpp): a fresh torch.empty of that size is untouched memory whose page faults can
# cost as much as the merge that fills it. Smaller ones come from torch's allocator.
_DLPACK_FLOATS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def kernel_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    dtype = torch.float32 if dtype == torch.float64 else dtype
    shape = tuple(int(s) for s in shape)
    if (torch.device(device).type == "cpu" and _native.available()
            and math.prod(shape) * dtype.itemsize >= RECYCLED_OUTPUT_BYTES):
        return torch.utils.dlpack.from_dlpack(_native.native().output_buffer(list(shape), _DLPACK_FLOATS[dtype]))
    return torch.empty(shape, dtype=dtype, device=device)


def capsule(t: torch.Tensor):
    return torch.utils.dlpack.to_dlpack(t)


def cuda_stream(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(torch.cuda.current_stream(device).cuda_stream)


_warned_fallback = set()


def use_native(device: torch.device) -> bool:
    """True when _C can run on device; otherwise warn once and use the torch reference."""
    if device.type not in ("cpu", "cuda"):
        reason = f"device {device.type} has no fastmerge kernels"
    elif not _native.available():
        reason = "fastmerge._C is not available"
    elif device.type == "cuda" and not _native.native().build_info()["cuda"]:
        reason = "this fastmerge build has no CUDA kernels"
    else:
        return True
    if reason not in _warned_fallback:
        _warned_fallback.add(reason)
        warnings.warn(f"{reason}; falling back to the pure-torch reference", RuntimeWarning, stacklevel=3)
    return False
