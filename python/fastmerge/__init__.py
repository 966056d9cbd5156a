"""fastmerge: fused C++/CUDA kernels for model merging.

Importing the package does not import torch: `fastmerge run` on the CPU streams checkpoints
through the kernels on numpy views and never needs it (torch takes about a second to import).
`fastmerge.ops` and the build helpers load it on first use, torch first so that its OpenMP and
CUDA libraries are the ones _C then shares.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import FastmergeError, InvalidArgumentError, NativeUnavailableError  # noqa: E402

_LAZY = {"ops": None, "build_info": "_native", "get_num_threads": "_native",
         "set_num_threads": "_native", "ContinualMerger": "continual"}

__all__ = [
    "ContinualMerger",
    "FastmergeError",
    "InvalidArgumentError",
    "NativeUnavailableError",
    "build_info",
    "get_num_threads",
    "set_num_threads",
    "ops",
    "__version__",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastmerge' has no attribute {name!r}")
    import importlib

    import torch  # noqa: F401  (before _C, see above)

    if _LAZY[name] is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
