"""timm for the tests that need it, on machines whose torch is a CPU build.

timm imports torchvision at import time (FrozenBatchNorm2d, transforms, datasets) although a
ViT uses none of it, and PyPI has no CPU torchvision wheel for Linux: the CUDA wheel's C
extension does not load next to the CPU torch, and once installed it also breaks
`import transformers`. So the test setup installs timm without its dependencies (README), and:

* torchvision absent: timm is imported with placeholder torchvision modules that exist only
  during that import (their classes raise if ever instantiated); they are removed from
  sys.modules and the import system afterwards, so transformers still sees no torchvision;
* a torchvision whose extension failed to load: its two operator schemas are defined so that its
  pure-Python parts import (nothing here calls them).
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

_torchvision_ops = None  # keeps the operator-schema registration alive


class _Unavailable(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"  # enum-like members (InterpolationMode.NEAREST)


class _Placeholder(metaclass=_Unavailable):
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__}: torchvision is not installed")


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(name, (_Placeholder,), {})


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _import_timm_without_torchvision():
    finder = _PlaceholderFinder()
    sys.meta_path.insert(0, finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            if isinstance(sys.modules[name], _PlaceholderModule):
                del sys.modules[name]
    return timm


def _define_torchvision_ops() -> None:
    global _torchvision_ops
    try:
        torch.ops.torchvision.nms  # noqa: B018 - raises when the extension did not load
        return
    except (AttributeError, RuntimeError):
        pass
    if _torchvision_ops is None:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_ops = lib


def import_timm():
    """The timm module, or pytest.skip when timm is not installed."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    if importlib.util.find_spec("torchvision") is None:
        return _import_timm_without_torchvision()
    _define_torchvision_ops()
    return pytest.importorskip("timm")
