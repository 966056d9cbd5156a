"""Drop-in acceleration for mergekit 0.1.5.

mergekit looks its merge methods up by name in one registry (`mergekit.merge_methods.registry`)
every time it merges, whichever entry point is used: `mergekit-yaml`, `run_merge`,
`merge_tensors` or `merge_state_dicts`. patch() replaces the methods fastmerge implements with
wrappers that keep mergekit's specification (parameters, defaults, input rules) and run the
fused kernels; unpatch() puts the originals back. Nothing happens on import.

What a wrapper cannot serve goes to mergekit's own code, with a warning once per reason:
inputs that need autograd, float64 inputs (mergekit computes them in float64, the kernels in
float32), devices without fastmerge kernels, a linear merge whose weights sum to zero.

Differences that remain, by design: fastmerge computes in float32 and rounds once (mergekit
computes in the inputs' dtype), keeps the lowest indices among magnitudes tied at the top-k
threshold, and draws DARE/DELLA masks from Philox keyed by a seed taken from torch's global
generator (so mergekit's --random-seed still makes runs reproducible) and the tensor name.
"""
from __future__ import annotations

import warnings
from importlib import metadata
from typing import Callable, Dict, Iterable, Optional

from ..errors import FastmergeError

SUPPORTED_VERSIONS = ("0.1.5",)
GTA_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
               "breadcrumbs_ties", "della", "della_linear")
CONSENSUS_METHODS = ("ram", "ramplus_tl", "sce", "arcee_fusion")
SPHERE_METHODS = ("nuslerp", "multislerp", "karcher")
METHODS = (GTA_METHODS + ("linear", "slerp", "nearswap", "model_stock") + CONSENSUS_METHODS
           + SPHERE_METHODS)


class MergekitVersionError(FastmergeError):
    """The installed mergekit is not a version whose semantics fastmerge reproduces."""


_originals: Dict[str, object] = {}
_warned: set = set()


def _registry():
    version = None
    try:
        version = metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        raise MergekitVersionError("mergekit is not installed (pip install mergekit==0.1.5)") from None
    if version not in SUPPORTED_VERSIONS:
        raise MergekitVersionError(
            f"fastmerge reproduces mergekit {', '.join(SUPPORTED_VERSIONS)}; mergekit {version} is "
            f"installed. Its methods may have changed, so it is not patched.")
    from mergekit.merge_methods import registry

    return registry


def _fallback_reason(group) -> Optional[str]:
    import torch

    from .. import _native

    tensors = [e.tensor for e in group.entries]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "inputs that require grad (the kernels do not record autograd)"
    if any(t.dtype not in (torch.float32, torch.float16, torch.bfloat16) for t in tensors):
        return "inputs that are not float32/float16/bfloat16"
    devices = {t.device.type for t in tensors}
    if not _native.available():
        return "this installation without fastmerge._C"
    if devices - {"cpu", "cuda"}:
        return f"tensors on {', '.join(sorted(devices - {'cpu', 'cuda'}))}"
    if "cuda" in devices and not _native.native().build_info()["cuda"]:
        return "CUDA tensors with a fastmerge build without CUDA kernels"
    return None


def _say_once(method: str, reason: str) -> None:
    if (method, reason) not in _warned:
        _warned.add((method, reason))
        warnings.warn(f"fastmerge: mergekit's own {method} serves {reason}", RuntimeWarning,
                      stacklevel=4)


def _torch_seed(device) -> int:
    """A seed drawn from torch's global generator of the tensors' device, where mergekit's own
    random methods draw (under its multi-GPU executor each device's generator is its own, so
    the draws do not depend on thread timing)."""
    import torch

    return int(torch.randint(0, 2**62, (), dtype=torch.int64, device=device))


def _gta_kernel(original) -> Callable:
    sparsification = original.sparsification_method.value if original.sparsification_method else None
    consensus = original.consensus_method.value if original.consensus_method else None

    def merge(group, parameters):
        from .. import ops

        base, entries = group.base.tensor, group.non_base
        if not entries:
            return base
        ids = [e.id for e in entries]
        densities = [parameters["density"][i] for i in ids]
        if not all(0.0 <= float(d) <= 1.0 for d in densities):
            return None  # mergekit merges with such densities (no pruning, or none kept)
        extra = {key: [parameters[key][i] for i in ids] for key in ("gamma", "epsilon")
                 if key in parameters}
        seed = _torch_seed(base.device) if sparsification in ("random", "della_magprune") else 0
        return ops.generalized_task_arithmetic(
            base, [e.tensor for e in entries], [parameters["weight"][i] for i in ids],
            density=densities, sparsification=sparsification,
            consensus=consensus, rescale=parameters["rescale"],
            normalize=parameters["normalize"], lambda_=parameters["lambda"], seed=seed,
            name=group.metadata.name or "", out_dtype=base.dtype, **extra)

    return merge


def _linear(group, parameters):
    from .. import ops

    import torch

    weights = [parameters["weight"][e.id] for e in group.entries]
    if parameters["normalize"] and abs(float(torch.tensor(weights).sum())) < 1e-8:
        return None  # mergekit divides by this (fp32) sum unguarded; the kernel would not
    first = group.entries[0].tensor
    return ops.linear([e.tensor for e in group.entries], weights,
                      normalize=parameters["normalize"], out_dtype=first.dtype)


def _slerp(group, parameters):
    from .. import ops

    (other,) = group.non_base
    return ops.slerp(group.base.tensor, other.tensor, parameters["t"])


def _nearswap(group, parameters):
    from .. import ops

    (other,) = group.non_base
    return ops.nearswap(group.base.tensor, other.tensor, parameters["t"])


def _model_stock(group, parameters):
    from .. import ops

    return ops.model_stock(group.base.tensor, [e.tensor for e in group.non_base],
                           filter_wise=parameters["filter_wise"])


def _consensus_kernel(name: str, keys) -> Callable:
    """ram, ramplus_tl, sce: the base and any number of experts, shared scalar parameters."""

    def merge(group, parameters):
        from .. import ops

        if not group.non_base:
            return group.base.tensor
        base = group.base.tensor
        out_dtype = _float32_promoted(base.dtype) if name == "ramplus_tl" else None
        return getattr(ops, name)(base, [e.tensor for e in group.non_base],
                                  out_dtype=out_dtype, **{k: parameters[k] for k in keys})

    return merge


def _arcee_fusion(group, parameters):
    from .. import ops

    (other,) = group.non_base
    base = group.base.tensor
    return ops.arcee_fusion(base, other.tensor, out_dtype=_float32_promoted(base.dtype))


def _float32_promoted(dtype):
    """mergekit's ramplus_tl and arcee_fusion scale by a float32 tensor (ratio of counts, a
    float mask), so their results are float32 for half-precision inputs."""
    import torch

    return torch.promote_types(dtype, torch.float32)


def _nuslerp(group, parameters):
    from .. import ops
    from .._params import nuslerp_t

    v0, v1 = group.non_base
    t = nuslerp_t([parameters["weight"][e.id] for e in (v0, v1)])
    return ops.nuslerp(t, v0.tensor, v1.tensor, base=group.base.tensor if group.base else None,
                       dim=0 if parameters["nuslerp_row_wise"] else -1,
                       flatten=parameters["nuslerp_flatten"])


def _multislerp(group, parameters):
    from .. import ops

    entries = group.non_base
    weights = [parameters["weight"][e.id] for e in entries]
    if len(entries) > 1 and parameters["normalize_weights"] and sum(weights) == 0:
        return None  # mergekit divides by zero; let it
    return ops.multislerp([e.tensor for e in entries], weights,
                          base=group.base.tensor if group.base else None,
                          normalize_weights=parameters["normalize_weights"], eps=parameters["eps"])


def _karcher(group, parameters):
    from .. import ops

    tensors = [e.tensor for e in group.entries]
    # 0-d half tensors divided by mergekit's float32 0-d norms come out float32 (type promotion
    # among 0-d tensors); any other shape keeps its dtype
    out_dtype = (_float32_promoted(tensors[0].dtype)
                 if len(tensors) > 1 and tensors[0].dim() == 0 else None)
    return ops.karcher(tensors, max_iter=parameters["max_iter"], tol=parameters["tol"],
                       out_dtype=out_dtype)


def _wrapper_class():
    from mergekit.merge_methods.base import GroupMergeMethod

    class Accelerated(GroupMergeMethod):
        """mergekit's method `original`, merged by a fastmerge kernel where it can be."""

        def __init__(self, original, kernel):
            self.spec = original.spec
            self.original = original
            self.kernel = kernel

        def merge_group(self, group, /, **parameters):
            reason = _fallback_reason(group) if group.entries else "an empty group"
            result = None if reason else self.kernel(group, parameters)
            if result is None:
                _say_once(self.spec.name, reason or "this input")
                (result,) = self.original((group,), parameters=parameters)
            return result

    return Accelerated


class _Patched:
    """Returned by patch(): also a context manager that unpatches on exit."""

    def __init__(self, methods: Iterable[str]):
        self.methods = tuple(methods)

    def __enter__(self) -> "_Patched":
        return self

    def __exit__(self, *exc) -> None:
        unpatch()

    def __repr__(self) -> str:
        return f"<fastmerge patch of mergekit: {', '.join(self.methods)}>"


def patch(methods: Iterable[str] = METHODS) -> _Patched:
    """Routes these mergekit methods (default: all fastmerge implements) to fastmerge's
    kernels. Idempotent; raises MergekitVersionError for an unsupported mergekit."""
    registry = _registry()
    accelerated = _wrapper_class()
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FastmergeError(f"fastmerge cannot accelerate {', '.join(unknown)}; it can: "
                             f"{', '.join(METHODS)}")
    for name in methods:
        if name in _originals:
            continue
        original = registry._METHODS[name]
        if name in GTA_METHODS:
            kernel = _gta_kernel(original)
        else:
            kernel = {"linear": _linear, "slerp": _slerp, "nearswap": _nearswap,
                      "model_stock": _model_stock,
                      "ram": _consensus_kernel("ram", ("epsilon",)),
                      "ramplus_tl": _consensus_kernel("ramplus_tl", ("r", "alpha", "epsilon")),
                      "sce": _consensus_kernel("sce", ("select_topk",)),
                      "arcee_fusion": _arcee_fusion, "nuslerp": _nuslerp,
                      "multislerp": _multislerp, "karcher": _karcher}[name]
        _originals[name] = original
        registry._METHODS[name] = accelerated(original, kernel)
    return _Patched(sorted(_originals))


def unpatch(methods: Optional[Iterable[str]] = None) -> None:
    """Puts mergekit's own methods back (these, or every patched one)."""
    names = [m for m in (_originals if methods is None else methods) if m in _originals]
    if not names:
        return
    from mergekit.merge_methods import registry

    for name in names:
        registry._METHODS[name] = _originals.pop(name)


def is_patched(method: str = "ties") -> bool:
    return method in _originals


def run_mergekit_yaml(args) -> int:
    """mergekit's own `mergekit-yaml` command line, with the methods patched."""
    import click
    from mergekit.scripts.run_yaml import main

    added = [m for m in METHODS if m not in _originals]  # the caller's own patches stay
    patch()
    try:
        result = main.main(args=list(args), prog_name="fastmerge mergekit-yaml",
                           standalone_mode=False)
    except click.ClickException as exc:  # bad arguments: mergekit's own message
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    finally:
        unpatch(added)
    return result if isinstance(result, int) else 0
