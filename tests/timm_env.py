"""timm for the tests that need it. This machine's torchvision wheel is built for CUDA and its
C extension does not load with the CPU torch, which makes `import timm` fail with "operator
torchvision::nms does not exist"; defining the two operator schemas lets torchvision's
pure-Python parts import (nothing here calls them)."""
import pytest
import torch

_torchvision_stub = None  # keeps the library registration alive


def _define_torchvision_ops() -> None:
    global _torchvision_stub
    try:
        torch.ops.torchvision.nms  # noqa: B018 - raises when the extension did not load
        return
    except (AttributeError, RuntimeError):
        pass
    if _torchvision_stub is None:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_stub = lib


def import_timm():
    """The timm module, or pytest.skip when timm is not installed."""
    try:
        _define_torchvision_ops()
    except Exception:  # pragma: no cover - torchvision absent or already fine
        pass
    return pytest.importorskip("timm")
