"""Argument checking shared by the public ops, and the hand-off of tensors to _C.

Validation with good messages happens here; the C++ side keeps only the checks that prevent
faults. Every failure is an InvalidArgumentError naming the argument and the value.
"""
from __future__ import annotations

import math
import warnings
from numbers import Real
from typing import List, Optional, Sequence, Union

import torch
import torch.utils.dlpack

from .. import _native
from ..errors import InvalidArgumentError

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PerExpert = Union[float, Sequence[float], torch.Tensor]


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
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


def check_same_layout(reference: torch.Tensor, ref_name: str, tensors: Sequence[torch.Tensor],
                      names: Sequence[str]) -> None:
    for t, n in zip(tensors, names):
        if t.shape != reference.shape:
            raise InvalidArgumentError(
                f"{n} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(reference.shape)}"
            )
        if t.device != reference.device:
            raise InvalidArgumentError(f"{n} is on {t.device} but {ref_name} is on {reference.device}")


def per_expert(value: PerExpert, count: int, name: str, *, low: Optional[float] = None,
               high: Optional[float] = None) -> List[float]:
    """A float or one value per expert -> list of finite floats within [low, high]."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
        if len(value) == 1:
            value = value[0]
    if isinstance(value, Real) and not isinstance(value, bool):
        values = [float(value)] * count
    else:
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError(name)
            values = [float(v) for v in value]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{name} must be a float or one float per expert, got {value!r}") from None
        if len(values) != count:
            raise InvalidArgumentError(f"{name} has {len(values)} values for {count} experts: {values}")
    for i, v in enumerate(values):
        label = name if count == 1 else f"{name}[{i}]"
        if not math.isfinite(v):
            raise InvalidArgumentError(f"{label} must be finite, got {v}")
        if low is not None and v < low or high is not None and v > high:
            raise InvalidArgumentError(f"{label} must lie in [{low}, {high}], got {v}")
    return values


def check_scalar(value, name: str, *, low: Optional[float] = None, high: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidArgumentError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise InvalidArgumentError(f"{name} must be finite, got {v}")
    if low is not None and v < low or high is not None and v > high:
        raise InvalidArgumentError(f"{name} must lie in [{low}, {high}], got {v}")
    return v


def resolve_out_dtype(out_dtype, default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default if default in KERNEL_DTYPES or default == torch.float64 else torch.float32
    if out_dtype not in KERNEL_DTYPES and out_dtype != torch.float64:
        raise InvalidArgumentError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    return out_dtype


def stream_hash(name: str) -> int:
    """32-bit FNV-1a of the tensor name's UTF-8 bytes: the Philox stream of random masks."""
    h = 0x811C9DC5
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InvalidArgumentError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return seed


# ---- hand-off to the kernels ----

def kernel_input(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, kernel dtype (float64 is computed in fp32), no autograd."""
    t = t.detach()
    if t.dtype == torch.float64:
        t = t.float()
    return t.contiguous()


def kernel_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32 if dtype == torch.float64 else dtype, device=device)


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
