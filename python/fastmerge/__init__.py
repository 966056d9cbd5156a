"""fastmerge: fused C++/CUDA kernels for model merging."""
from __future__ import annotations

__version__ = "0.1.0"

# torch first: its OpenMP and CUDA libraries should be the ones loaded before _C's.
import torch  # noqa: E402,F401

from .errors import FastmergeError, InvalidArgumentError, NativeUnavailableError  # noqa: E402
from ._native import build_info, get_num_threads, set_num_threads  # noqa: E402
from . import ops  # noqa: E402

__all__ = [
    "FastmergeError",
    "InvalidArgumentError",
    "NativeUnavailableError",
    "build_info",
    "get_num_threads",
    "set_num_threads",
    "ops",
    "__version__",
]
