"""Guarded import of the compiled extension and the build description."""
from __future__ import annotations

from typing import Any, Dict, Optional

from .errors import NativeUnavailableError

try:
    from . import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - exercised only in broken installs
    _C = None
    _IMPORT_ERROR = exc


def available() -> bool:
    return _C is not None


def native():
    """The _C module, or a NativeUnavailableError saying why it is missing."""
    if _C is None:
        raise NativeUnavailableError(f"fastmerge._C could not be imported: {_IMPORT_ERROR}")
    return _C


def build_info() -> Dict[str, Any]:
    """What this installation was built with: version, CUDA archs, CPU SIMD level, threads."""
    from . import __version__

    if _C is None:
        return {"version": __version__, "native": False, "cuda": False, "cuda_archs": [],
                "cpu_simd": None, "threads": 1, "error": str(_IMPORT_ERROR)}
    info = dict(_C.build_info())
    info["native"] = True
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels, in every thread of the process (results never depend
    on it). Until it is called, and after set_num_threads(0), the kernels follow the calling
    thread's OpenMP count.

    The kernels use the process's OpenMP runtime; where torch shares it (as the CPU wheels
    do), this also sets torch's intra-op thread count in the calling thread.
    """
    native().set_num_threads(int(n))


def get_num_threads() -> int:
    return int(native().get_num_threads())


def requested_num_threads() -> int:
    """What set_num_threads last set for the process (0: nothing, OpenMP's count applies)."""
    return int(native().requested_num_threads())
