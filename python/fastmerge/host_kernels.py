"""The merge kernels on numpy arrays in host memory, without torch.

`fastmerge run` on the CPU reads checkpoints as numpy views of the file pages and hands them to
the same _C kernels the torch ops call. The kernels take DLPack capsules; numpy cannot describe
bfloat16, so the capsules are built here with the element type spelled out (the arrays hold the
bytes, DType says what they are). _C borrows a capsule for the duration of the call only.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from . import _native
from ._params import check_scalar, gta_arguments, model_stock_rows
from .dtypes import KERNEL_DTYPES, DType

DL_CPU = 1


@dataclass
class HostArray:
    """A C-contiguous array whose bytes are elements of dtype (numpy holds bf16 as uint16)."""
    data: np.ndarray
    dtype: DType

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @staticmethod
    def empty(shape: Sequence[int], dtype: DType) -> "HostArray":
        shape = tuple(int(s) for s in shape)
        storage = np.dtype(dtype.storage)
        if (storage.name in _RECYCLED_STORAGE and _native.available() and hasattr(np, "from_dlpack")
                and math.prod(shape) * storage.itemsize >= RECYCLED_OUTPUT_BYTES):
            capsule = _native.native().output_buffer(list(shape), storage.name, versioned=True)
            try:
                return HostArray(np.from_dlpack(_ExportedBuffer(capsule)), dtype)
            except BufferError:  # numpy < 2.1 reads only unversioned DLPack (as read-only arrays)
                pass
        return HostArray(np.empty(shape, dtype=storage), dtype)


# Results at least this large come from _C's recycled output buffers (bind_memory.cpp), here and
# in the torch ops (ops/_validate.py): fresh pages cost a fault and a zeroing each on first write.
RECYCLED_OUTPUT_BYTES = 4 << 20
_RECYCLED_STORAGE = ("float32", "float16", "uint16")


class _ExportedBuffer:
    """What np.from_dlpack takes: an object whose __dlpack__ returns the capsule (once)."""

    def __init__(self, capsule):
        self._capsule = capsule

    def __dlpack__(self, stream=None, max_version=None, **_):
        if max_version is None or max_version[0] < 1:
            raise BufferError("fastmerge output buffers are exported as versioned DLPack (1.0)")
        return self._capsule

    def __dlpack_device__(self):
        return (DL_CPU, 0)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class _Borrowed:
    """A DLPack capsule describing an array; keeps what it points to alive while referenced."""

    def __init__(self, x: HostArray):
        if not x.data.flags.c_contiguous:
            raise ValueError("host kernels need C-contiguous arrays")
        self.array = x.data
        ndim = x.data.ndim
        self.shape = (ctypes.c_int64 * max(ndim, 1))(*x.data.shape)
        code, bits = x.dtype.dlpack
        self.managed = _DLManagedTensor()
        t = self.managed.dl_tensor
        t.data = x.data.ctypes.data if x.data.size else None
        t.device = _DLDevice(DL_CPU, 0)
        t.ndim = ndim
        t.dtype = _DLDataType(code, bits, 1)
        t.shape = ctypes.cast(self.shape, ctypes.POINTER(ctypes.c_int64))
        t.strides = None  # compact row-major
        t.byte_offset = 0
        self.capsule = _capsule_new(ctypes.addressof(self.managed), b"dltensor", None)


def supports(dtypes: Sequence[DType]) -> bool:
    """True when the kernels read and write every one of these dtypes."""
    return _native.available() and all(d in KERNEL_DTYPES for d in dtypes)


def gta(base: Optional[HostArray], experts: List[HostArray], out_dtype: DType,
        **params) -> HostArray:
    """Generalized task arithmetic (as fastmerge.ops.generalized_task_arithmetic)."""
    reference = base if base is not None else experts[0]
    args = gta_arguments(len(experts), reference.shape, **params)
    out = HostArray.empty(reference.shape, out_dtype)
    held = [_Borrowed(e) for e in experts]
    held_base = _Borrowed(base) if base is not None else None
    held_out = _Borrowed(out)
    _native.native().gta_merge(held_base.capsule if held_base else None,
                               [h.capsule for h in held], held_out.capsule, *args["kernel"], 0)
    return out


def _pairwise(kernel: str, a: HostArray, b: HostArray, t: float, out_dtype: DType) -> HostArray:
    out = HostArray.empty(a.shape, out_dtype)
    if out.data.size:
        ha, hb, ho = _Borrowed(a), _Borrowed(b), _Borrowed(out)
        getattr(_native.native(), kernel)(ha.capsule, hb.capsule, ho.capsule,
                                          check_scalar(t, "t"), 0)
    return out


def slerp(a: HostArray, b: HostArray, t: float, out_dtype: DType) -> HostArray:
    return _pairwise("slerp", a, b, t, out_dtype)


def nearswap(a: HostArray, b: HostArray, t: float, out_dtype: DType) -> HostArray:
    return _pairwise("nearswap", a, b, t, out_dtype)


def model_stock(base: HostArray, experts: List[HostArray], filter_wise: bool,
                out_dtype: DType) -> HostArray:
    out = HostArray.empty(base.shape, out_dtype)
    if out.data.size:
        hb, ho = _Borrowed(base), _Borrowed(out)
        held = [_Borrowed(e) for e in experts]
        _native.native().model_stock(hb.capsule, [h.capsule for h in held], ho.capsule,
                                     model_stock_rows(base.shape, filter_wise), 0)
    return out


# Exponent bits that mark Inf/NaN in formats numpy cannot test directly.
_NON_FINITE_BITS = {"bfloat16": 0x7F80, "float8_e5m2": 0x7C}


def count_non_finite(x) -> int:
    """How many elements of a HostArray or torch tensor are NaN or +-Inf."""
    if isinstance(x, HostArray):
        if x.dtype.name in _NON_FINITE_BITS:
            mask = _NON_FINITE_BITS[x.dtype.name]
            return int(np.count_nonzero((x.data & mask) == mask))
        if x.dtype.name == "float8_e4m3fn":  # no infinities; NaN is S.1111.111
            return int(np.count_nonzero((x.data & 0x7F) == 0x7F))
        if x.dtype.is_floating_point:
            return int(np.count_nonzero(~np.isfinite(x.data)))
        return 0
    import torch

    return int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0


def _with_experts(kernel: str, base: HostArray, experts: List[HostArray], out_dtype: DType,
                  *scalars: float) -> HostArray:
    out = HostArray.empty(base.shape, out_dtype)
    if out.data.size:
        hb, ho = _Borrowed(base), _Borrowed(out)
        held = [_Borrowed(e) for e in experts]
        getattr(_native.native(), kernel)(hb.capsule, [h.capsule for h in held], ho.capsule,
                                          *scalars, 0)
    return out


def ram(base: HostArray, experts: List[HostArray], epsilon: float, out_dtype: DType) -> HostArray:
    """mergekit's ram (as fastmerge.ops.ram)."""
    return _with_experts("ram", base, experts, out_dtype, check_scalar(epsilon, "epsilon"))


def ramplus_tl(base: HostArray, experts: List[HostArray], r: float, alpha: float, epsilon: float,
               out_dtype: DType) -> HostArray:
    """mergekit's ramplus_tl (as fastmerge.ops.ramplus_tl)."""
    return _with_experts("ramplus_tl", base, experts, out_dtype, check_scalar(r, "r"),
                         check_scalar(alpha, "alpha"), check_scalar(epsilon, "epsilon"))


def sce(base: HostArray, experts: List[HostArray], select_topk: float,
        out_dtype: DType) -> HostArray:
    """mergekit's sce (as fastmerge.ops.sce)."""
    return _with_experts("sce", base, experts, out_dtype, check_scalar(select_topk, "select_topk"))


def arcee_fusion(base: HostArray, other: HostArray, out_dtype: DType) -> HostArray:
    """mergekit's arcee_fusion with exact quantiles (as fastmerge.ops.arcee_fusion)."""
    out = HostArray.empty(base.shape, out_dtype)
    if out.data.size:
        hb, hp, ho = _Borrowed(base), _Borrowed(other), _Borrowed(out)
        row_len = base.shape[-1] if base.shape else 1
        _native.native().arcee_fusion(hb.capsule, hp.capsule, ho.capsule, row_len, 0)
    return out


# ---- sphere family (as fastmerge.ops.nuslerp / multislerp / karcher) ----

def nuslerp(base: Optional[HostArray], v0: HostArray, v1: HostArray, t: float, out_dtype: DType,
            *, dim: int = -1, flatten: bool = False, eps: float = 1e-8) -> HostArray:
    from ._params import sphere_layout

    layout = sphere_layout(v0.shape, dim, flatten)
    out = HostArray.empty(v0.shape, out_dtype)
    if out.data.size:
        held = [_Borrowed(x) for x in (v0, v1, out)]
        hb = _Borrowed(base) if base is not None else None
        _native.native().nuslerp(hb.capsule if hb else None, held[0].capsule, held[1].capsule,
                                 held[2].capsule, *layout, check_scalar(t, "t"),
                                 check_scalar(eps, "eps", low=0.0), 0)
    return out


def multislerp(base: Optional[HostArray], inputs: List[HostArray], weights, out_dtype: DType, *,
               normalize_weights: bool = True, eps: float = 1e-8) -> HostArray:
    from ._params import MULTISLERP_ANTIPODAL, sphere_arguments
    from .errors import InvalidArgumentError

    args = sphere_arguments(len(inputs), weights=weights, normalize_weights=normalize_weights,
                            eps=eps)
    out = HostArray.empty(inputs[0].shape, out_dtype)
    if out.data.size:
        held = [_Borrowed(x) for x in inputs]
        hb, ho = (_Borrowed(base) if base is not None else None), _Borrowed(out)
        if not _native.native().multislerp(hb.capsule if hb else None, [h.capsule for h in held],
                                           ho.capsule, args["weights"], normalize_weights,
                                           args["eps"], 0):
            raise InvalidArgumentError(MULTISLERP_ANTIPODAL)
    return out


def karcher(inputs: List[HostArray], out_dtype: DType, *, max_iter: int = 10,
            tol: float = 1e-5) -> HostArray:
    from ._params import sphere_arguments

    n = len(inputs)
    args = sphere_arguments(n, alphas=[1.0 / n] * n, max_iter=max_iter, tol=tol)
    out = HostArray.empty(inputs[0].shape, out_dtype)
    if out.data.size:
        held = [_Borrowed(x) for x in inputs]
        ho = _Borrowed(out)
        _native.native().karcher([h.capsule for h in held], ho.capsule, args["alphas"],
                                 args["max_iter"], args["tol"], 0)
    return out
