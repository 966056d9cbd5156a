"""Drop-in acceleration of PEFT's merge utilities (peft.utils.merge_utils, PEFT 0.21.2).

patch() replaces task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties, prune,
magnitude_based_pruning, random_pruning, calculate_majority_sign_mask and disjoint_merge with
wrappers that keep PEFT's signatures, argument handling, warnings and output dtypes and run
fastmerge's fused kernels; the names are replaced in merge_utils and wherever PEFT imported
them (peft.tuners.lora.model, so LoraModel.add_weighted_adapter's linear, ties, dare_linear,
dare_ties and magnitude_prune combinations, and the merge step of their *_svd variants, run on
the kernels). "lora_svd" also replaces the SVD step of those *_svd combinations
(LoraModel._svd_generalized_task_arithmetic_weighted_adapter; see _peft_lora_svd.py: "svd"
decomposes the weighted sum in factored form, the others take their top triplets from a
float64 Gram eigh instead of a full SVD). unpatch() restores every name. patch() is also a
context manager. Nothing happens on import.

PEFT's conventions differ from mergekit's, and the kernel follows PEFT's here: the sign
election votes on the pruned tensors before weights are applied, the disjoint merge divides by
the number of agreeing tensors, magnitude pruning keeps int(density * numel) elements (possibly
none), and DARE divides kept values by density. There is no base: the task tensors are the
deltas.

What a wrapper cannot serve goes to PEFT's own code, with a warning once per reason: inputs
that need autograd, float64 inputs (PEFT computes them in float64, the kernels in float32),
devices without fastmerge kernels, weights that are not one per task tensor (or not finite), a
majority_sign_mask that is not a bool tensor of the task tensors' shape. Calls PEFT itself
rejects or treats specially (bad arguments, density < 0, DARE with density 0, which PEFT turns
into NaN by dividing by zero) go to PEFT's code silently, so they behave exactly as before.

Differences that remain, by design: fastmerge computes in float32 and rounds once (PEFT
computes in the promoted input dtype; the output dtype is PEFT's), keeps the lowest indices
among magnitudes tied at the top-k threshold (torch.topk keeps an unspecified subset), and
draws DARE's masks from Philox keyed by a seed taken from torch's global generator, so
torch.manual_seed still makes runs reproducible, but the masks differ from torch.bernoulli's:
random functions agree with PEFT in distribution, not element by element.
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
import threading
import warnings
from importlib import metadata
from numbers import Real
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from ..errors import FastmergeError
from . import _peft_lora_svd

SUPPORTED_VERSIONS = ("0.21.2",)
MERGE_FUNCTIONS = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
UTILS_FUNCTIONS = MERGE_FUNCTIONS + ("prune", "magnitude_based_pruning", "random_pruning",
                                     "calculate_majority_sign_mask", "disjoint_merge")
LORA_SVD = "lora_svd"  # LoraModel's SVD step of add_weighted_adapter's *_svd combinations
FUNCTIONS = UTILS_FUNCTIONS + (LORA_SVD,)
_SIGN_METHODS = {"total": "sum", "frequency": "count"}


class PeftVersionError(FastmergeError):
    """The installed PEFT is not a version whose merge_utils fastmerge reproduces."""


# name -> PEFT's original function; (module, attribute, original) of every replaced binding
_originals: Dict[str, Callable] = {}
_bindings: List[Tuple[object, str, Callable]] = []
_warned: set = set()
_inside_peft = threading.local()  # depth of PEFT's own functions running as a fallback


class _Fallback:
    """A kernel's answer: PEFT's own function serves this call (reason None: silently)."""

    def __init__(self, reason: Optional[str] = None):
        self.reason = reason


_PEFT = _Fallback()  # PEFT's own code, no warning: arguments PEFT itself rejects or special-cases


def _merge_utils():
    try:
        version = metadata.version("peft")
    except metadata.PackageNotFoundError:
        raise PeftVersionError("peft is not installed (pip install peft==0.21.2)") from None
    if version not in SUPPORTED_VERSIONS:
        raise PeftVersionError(
            f"fastmerge reproduces PEFT {', '.join(SUPPORTED_VERSIONS)}'s merge_utils; peft "
            f"{version} is installed. Its merge functions may have changed, so it is not patched.")
    from peft.utils import merge_utils
    import peft.tuners.lora.model  # noqa: F401  (imports merge_utils names: patch them there)

    return merge_utils


# ---- checks ----


def _reason(tensors, weights=None) -> Optional[str]:
    """Why the kernels cannot serve these tensors (None: they can)."""
    import torch

    from .. import _native

    everything = list(tensors) + ([weights] if isinstance(weights, torch.Tensor) else [])
    if torch.is_grad_enabled() and any(t.requires_grad for t in everything):
        return "inputs that require grad (the kernels do not record autograd)"
    if any(t.dtype == torch.float64 for t in everything):
        return "float64 inputs (PEFT computes them in float64, the kernels in float32)"
    if any(t.dtype not in (torch.float32, torch.float16, torch.bfloat16) for t in tensors):
        return "task tensors that are not float32/float16/bfloat16"
    if not _native.available():
        return "this installation without fastmerge._C"
    devices = {t.device.type for t in tensors}
    if devices - {"cpu", "cuda"}:
        return f"tensors on {', '.join(sorted(devices - {'cpu', 'cuda'}))}"
    if "cuda" in devices and not _native.native().build_info()["cuda"]:
        return "CUDA tensors with a fastmerge build without CUDA kernels"
    return None


def _task_list(task_tensors):
    """The task tensors as a list when they stack (same shape and device), else None."""
    import torch

    if isinstance(task_tensors, torch.Tensor) or not isinstance(task_tensors, (list, tuple)):
        return None
    tensors = list(task_tensors)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    first = tensors[0]
    if any(t.shape != first.shape or t.device != first.device for t in tensors):
        return None
    return tensors


def _weights(weights, tensors):
    """One float per task tensor from PEFT's weights (a tensor broadcast per task by
    reshape_weight_task_tensors), or a _Fallback."""
    import torch

    if not isinstance(weights, torch.Tensor) or weights.device != tensors[0].device:
        return _PEFT  # PEFT's own error
    count = len(tensors)
    if weights.numel() == 1 and weights.dim() <= tensors[0].dim() + 1:
        values = [float(weights.reshape(()))] * count
    elif (weights.dim() >= 1 and weights.shape[0] == count and weights.numel() == count
          and weights.dim() <= tensors[0].dim() + 1):
        values = [float(v) for v in weights.detach().reshape(-1).tolist()]
    else:
        return _Fallback("weights that are not one per task tensor")
    if not all(math.isfinite(v) for v in values):
        return _Fallback("weights that are not finite")
    return values


def _result_dtype(tensors, weights=None, at_least_float32: bool = False):
    """The dtype PEFT's arithmetic promotes to (stack, * weights, / a float32 count)."""
    import torch

    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if weights is not None:
        dtype = torch.promote_types(dtype, weights.dtype)
    if at_least_float32:
        dtype = torch.promote_types(dtype, torch.float32)
    return dtype


def _real(value) -> bool:
    """A plain real number (not a bool, not a tensor)."""
    return isinstance(value, Real) and not isinstance(value, bool) and type(value).__module__ != "torch"


def _density(density, tensors, *, random: bool):
    """density for the kernel, PEFT's warnings for density >= 1, or a _Fallback."""
    if not _real(density):
        return _PEFT
    density = float(density)
    if math.isnan(density) or density < 0:
        return _PEFT  # PEFT raises
    if density >= 1:
        for _ in tensors:  # prune() warns for every task tensor
            warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will "
                          f"be performed.", stacklevel=5)
        return 1.0
    if random and density == 0:
        return _PEFT  # PEFT divides by zero (NaN): keep its result
    return density


def _torch_seed(device) -> int:
    """A seed drawn from torch's global generator of the tensors' device, where PEFT's
    torch.bernoulli draws (each GPU's generator on its own)."""
    import torch

    return int(torch.randint(0, 2**62, (), dtype=torch.int64, device=device))


# ---- kernels (each returns the result or a _Fallback) ----


def _merge(task_tensors, weights, density=None, majority_sign_method="total", *,
           sparsification=None, consensus=False):
    """task_arithmetic / magnitude_prune / dare_linear (consensus False) and ties / dare_ties."""
    from .. import ops

    tensors = _task_list(task_tensors)
    if tensors is None:
        return _PEFT
    reason = _reason(tensors, weights)
    if reason:
        return _Fallback(reason)
    values = _weights(weights, tensors)
    if isinstance(values, _Fallback):
        return values
    options = {}
    if consensus:
        if majority_sign_method not in _SIGN_METHODS:
            return _PEFT
        options.update(consensus=_SIGN_METHODS[majority_sign_method], normalize="count",
                       sign_from="unweighted")
    if sparsification is not None:
        d = _density(density, tensors, random=sparsification == "random")
        if isinstance(d, _Fallback):
            return d
        options.update(density=d, sparsification=sparsification, min_keep=0)
        if sparsification == "random":
            options.update(rescale="density", seed=_torch_seed(tensors[0].device))
    out_dtype = _result_dtype(tensors, weights, at_least_float32=consensus)
    return ops.generalized_task_arithmetic(None, tensors, values, out_dtype=out_dtype, **options)


def _task_arithmetic(task_tensors, weights):
    return _merge(task_tensors, weights)


def _magnitude_prune(task_tensors, weights, density):
    return _merge(task_tensors, weights, density, sparsification="magnitude")


def _ties(task_tensors, weights, density, majority_sign_method="total"):
    return _merge(task_tensors, weights, density, majority_sign_method,
                  sparsification="magnitude", consensus=True)


def _dare_linear(task_tensors, weights, density):
    return _merge(task_tensors, weights, density, sparsification="random")


def _dare_ties(task_tensors, weights, density, majority_sign_method="total"):
    return _merge(task_tensors, weights, density, majority_sign_method,
                  sparsification="random", consensus=True)


def _prune_one(tensor, density: float, random: bool, rescale: bool):
    from .. import ops

    options = dict(density=density, sparsification="random" if random else "magnitude",
                   out_dtype=tensor.dtype)
    if random:
        options.update(seed=_torch_seed(tensor.device), rescale="density" if rescale else False)
    else:
        options.update(min_keep=0)
    return ops.generalized_task_arithmetic(None, [tensor], 1.0, **options)


def _single(tensor):
    """A _Fallback when this one tensor cannot be served, else None."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        return _PEFT
    reason = _reason([tensor])
    return _Fallback(reason) if reason else None


def _prune(tensor, density, method, rescale=False):
    stop = _single(tensor)
    if stop:
        return stop
    if method not in ("magnitude", "random") or not _real(density) or not density >= 0:
        return _PEFT  # PEFT raises (or compares a tensor density)
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be "
                      f"performed.", stacklevel=3)
        return tensor  # PEFT returns the tensor itself
    if method == "random" and density == 0:
        return _PEFT  # PEFT: zeros, or NaN when rescaling; keep its result
    return _prune_one(tensor, float(density), method == "random", bool(rescale))


def _magnitude_based_pruning(tensor, density):
    stop = _single(tensor)
    if stop:
        return stop
    if not _real(density) or not 0 <= density <= 1:
        return _PEFT  # PEFT: topk errors (or NaN density)
    return _prune_one(tensor, float(density), False, False)


def _random_pruning(tensor, density, rescale):
    stop = _single(tensor)
    if stop:
        return stop
    if not _real(density) or not 0 < density <= 1:
        return _PEFT  # PEFT: bernoulli errors, or density 0 (NaN when rescaling)
    return _prune_one(tensor, float(density), True, bool(rescale))


def _calculate_majority_sign_mask(tensor, method="total"):
    from .. import ops

    stop = _single(tensor)
    if stop:
        return stop
    if method not in _SIGN_METHODS or tensor.dim() < 1:
        return _PEFT
    return ops.majority_sign_mask(tensor, _SIGN_METHODS[method])


def _disjoint_merge(task_tensors, majority_sign_mask):
    import torch

    from .. import ops

    stop = _single(task_tensors)
    if stop:
        return stop
    if task_tensors.dim() < 1 or not isinstance(majority_sign_mask, torch.Tensor):
        return _PEFT
    if (majority_sign_mask.dtype != torch.bool or majority_sign_mask.shape != task_tensors.shape
            or majority_sign_mask.device != task_tensors.device):
        return _Fallback("a majority_sign_mask that is not a bool tensor of the task tensors' shape")
    if torch.is_grad_enabled() and majority_sign_mask.requires_grad:
        return _Fallback("inputs that require grad (the kernels do not record autograd)")
    return ops.disjoint_merge(task_tensors, majority_sign_mask,
                              out_dtype=_result_dtype([task_tensors], at_least_float32=True))


_KERNELS = {
    "task_arithmetic": _task_arithmetic,
    "magnitude_prune": _magnitude_prune,
    "ties": _ties,
    "dare_linear": _dare_linear,
    "dare_ties": _dare_ties,
    "prune": _prune,
    "magnitude_based_pruning": _magnitude_based_pruning,
    "random_pruning": _random_pruning,
    "calculate_majority_sign_mask": _calculate_majority_sign_mask,
    "disjoint_merge": _disjoint_merge,
}


def _say_once(function: str, reason: str) -> None:
    if (function, reason) not in _warned:
        _warned.add((function, reason))
        warnings.warn(f"fastmerge: PEFT's own {function} serves {reason}", RuntimeWarning,
                      stacklevel=3)


def _wrapper(name: str, original: Callable) -> Callable:
    signature = inspect.signature(original)

    def peft_serves(args, kwargs):
        # PEFT's merge functions call its other ones (prune, calculate_majority_sign_mask,
        # disjoint_merge) through merge_utils' globals, which are patched: inside PEFT's own
        # code they stay PEFT's, without further warnings.
        _inside_peft.depth = getattr(_inside_peft, "depth", 0) + 1
        try:
            return original(*args, **kwargs)
        finally:
            _inside_peft.depth -= 1

    @functools.wraps(original)
    def accelerated(*args, **kwargs):
        if getattr(_inside_peft, "depth", 0):
            return original(*args, **kwargs)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return peft_serves(args, kwargs)  # PEFT's own error
        bound.apply_defaults()
        result = _KERNELS[name](**bound.arguments)
        if isinstance(result, _Fallback):
            if result.reason:
                _say_once(name, result.reason)
            return peft_serves(args, kwargs)
        return result

    accelerated.__fastmerge_original__ = original
    return accelerated


# ---- patch / unpatch ----


class _Patched:
    """Returned by patch(): also a context manager that unpatches on exit."""

    def __init__(self, functions: Iterable[str]):
        self.functions = tuple(functions)

    def __enter__(self) -> "_Patched":
        return self

    def __exit__(self, *exc) -> None:
        unpatch()

    def __repr__(self) -> str:
        return f"<fastmerge patch of peft.utils.merge_utils: {', '.join(self.functions)}>"


def _peft_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "peft" or name.startswith("peft."))]


def patch(functions: Iterable[str] = FUNCTIONS) -> _Patched:
    """Routes these PEFT merge_utils functions (default: all fastmerge implements) to
    fastmerge's kernels, in merge_utils and in every loaded peft module that imported them.
    Idempotent; raises PeftVersionError for an unsupported PEFT."""
    merge_utils = _merge_utils()
    functions = tuple(functions)
    unknown = [f for f in functions if f not in FUNCTIONS]
    if unknown:
        raise FastmergeError(f"fastmerge cannot accelerate {', '.join(unknown)}; it can: "
                             f"{', '.join(FUNCTIONS)}")
    new = {}
    if LORA_SVD in functions and LORA_SVD not in _originals:
        _patch_lora_svd()
    for name in functions:
        if name in _originals or name == LORA_SVD:
            continue
        original = getattr(merge_utils, name)
        _originals[name] = original
        new[original] = _wrapper(name, original)
    if new:
        for module in _peft_modules():
            for attribute, value in list(vars(module).items()):
                try:
                    replacement = new.get(value) if callable(value) else None
                except TypeError:  # unhashable
                    replacement = None
                if replacement is not None:
                    _bindings.append((module, attribute, value))
                    setattr(module, attribute, replacement)
    return _Patched(sorted(_originals))


def unpatch() -> None:
    """Puts PEFT's own functions back everywhere patch() replaced them (and in peft modules
    imported since, which picked the wrappers up from merge_utils)."""
    if not _originals:
        return
    if LORA_SVD in _originals:
        from peft.tuners.lora.model import LoraModel

        setattr(LoraModel, _peft_lora_svd.METHOD, _originals[LORA_SVD])
    for module, attribute, original in reversed(_bindings):
        setattr(module, attribute, original)
    _bindings.clear()
    for module in _peft_modules():
        for attribute, value in list(vars(module).items()):
            if getattr(type(value), "__name__", "") != "function":
                continue
            original = getattr(value, "__fastmerge_original__", None)
            if original is not None:
                setattr(module, attribute, original)
    _originals.clear()


def _patch_lora_svd() -> None:
    from peft.tuners.lora.model import LoraModel

    original = getattr(LoraModel, _peft_lora_svd.METHOD)
    _originals[LORA_SVD] = original
    setattr(LoraModel, _peft_lora_svd.METHOD, _peft_lora_svd.accelerated(original))


def is_patched(function: str = "ties") -> bool:
    return function in _originals
