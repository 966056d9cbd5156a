"""Element types without torch: what a checkpoint's tensors are, in every spelling we meet them
(safetensors codes, config names, numpy storage, DLPack), so that the streaming path of
`fastmerge run` on the CPU never has to import torch (about a second of every run).

numpy has no bfloat16 or float8: their bytes are held in unsigned integer arrays of the same
width, and the DLPack descriptor handed to the kernels says what they really are.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, Tuple, Union

# DLPack type codes (dlpack.h)
DL_INT, DL_UINT, DL_FLOAT, DL_BFLOAT, DL_BOOL = 0, 1, 2, 4, 6


@dataclass(frozen=True)
class DType:
    name: str                 # torch's name: "bfloat16"
    code: str                 # safetensors' code: "BF16"
    itemsize: int
    is_floating_point: bool
    storage: str              # numpy dtype that holds the bytes
    dlpack: Tuple[int, int]   # (type code, bits)

    @property
    def torch(self):
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.name)

    def __repr__(self) -> str:
        return self.name


_ALL = [
    DType("float64", "F64", 8, True, "float64", (DL_FLOAT, 64)),
    DType("float32", "F32", 4, True, "float32", (DL_FLOAT, 32)),
    DType("float16", "F16", 2, True, "float16", (DL_FLOAT, 16)),
    DType("bfloat16", "BF16", 2, True, "uint16", (DL_BFLOAT, 16)),
    DType("float8_e4m3fn", "F8_E4M3", 1, True, "uint8", (DL_FLOAT, 8)),
    DType("float8_e5m2", "F8_E5M2", 1, True, "uint8", (DL_FLOAT, 8)),
    DType("int64", "I64", 8, False, "int64", (DL_INT, 64)),
    DType("int32", "I32", 4, False, "int32", (DL_INT, 32)),
    DType("int16", "I16", 2, False, "int16", (DL_INT, 16)),
    DType("int8", "I8", 1, False, "int8", (DL_INT, 8)),
    DType("uint64", "U64", 8, False, "uint64", (DL_UINT, 64)),
    DType("uint32", "U32", 4, False, "uint32", (DL_UINT, 32)),
    DType("uint16", "U16", 2, False, "uint16", (DL_UINT, 16)),
    DType("uint8", "U8", 1, False, "uint8", (DL_UINT, 8)),
    DType("bool", "BOOL", 1, False, "bool", (DL_BOOL, 8)),
]
BY_NAME: Dict[str, DType] = {d.name: d for d in _ALL}
BY_CODE: Dict[str, DType] = {d.code: d for d in _ALL}

float32, float16, bfloat16 = BY_NAME["float32"], BY_NAME["float16"], BY_NAME["bfloat16"]
KERNEL_DTYPES = (float32, float16, bfloat16)  # what the merge kernels read and write


def as_dtype(value: Union[DType, str, object]) -> DType:
    """A DType from a DType, a name ("bfloat16") or a torch dtype (without importing torch)."""
    if isinstance(value, DType):
        return value
    if isinstance(value, str) and value in BY_NAME:
        return BY_NAME[value]
    text = str(value)
    if text.startswith("torch.") and text[6:] in BY_NAME and "torch" in sys.modules:
        return BY_NAME[text[6:]]
    raise ValueError(f"not a dtype fastmerge knows: {value!r}")


def promoted_float(dtypes) -> DType:
    """torch.promote_types over floating dtypes, without torch: the widest, and float32 for
    float16 with bfloat16 (neither holds the other). Float8 types only promote to themselves in
    torch; mixed with another, the wider one is taken."""
    result = None
    for d in dtypes:
        if result is None or d == result:
            result = d
        elif {d.name, result.name} == {"float16", "bfloat16"}:
            result = float32
        elif d.itemsize > result.itemsize:
            result = d
    if result is None:
        raise ValueError("promoted_float: no dtypes")
    return result
