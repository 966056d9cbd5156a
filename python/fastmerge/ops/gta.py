"""Fused generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della*, linear.

Every op here is one call of the fused kernel (csrc/ops/gta): per expert, delta = expert - base
is sparsified (magnitude top-k, Philox Bernoulli, breadcrumbs outliers or DELLA's rank-based
probabilities; optional L1 rescale), weighted, sign-elected (TIES consensus) and summed, in fp32
with one rounding to the output dtype. Method names, parameter names and defaults are
mergekit 0.1.5's.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _native
from . import _reference
from .._params import CONSENSUS, SPARSIFICATION, della_rank_axis, gta_arguments  # noqa: F401
from ..errors import InvalidArgumentError
from ._validate import (
    KERNEL_DTYPES,
    PerExpert,
    capsule,
    check_experts,
    check_out,
    check_same_layout,
    check_tensor,
    cuda_stream,
    kernel_input,
    kernel_output,
    resolve_out_dtype,
    use_native,
)

def generalized_task_arithmetic(
    base: Optional[torch.Tensor],
    experts: Sequence[torch.Tensor],
    weight: PerExpert,
    *,
    density: PerExpert = 1.0,
    sparsification: Optional[str] = None,
    consensus: Optional[str] = None,
    rescale: Union[bool, str] = False,
    normalize: Union[bool, str] = False,
    lambda_: float = 1.0,
    gamma: PerExpert = 0.01,
    epsilon: PerExpert = 0.15,
    seed: int = 0,
    name: str = "",
    out_dtype: Optional[torch.dtype] = None,
    sign_from: str = "weighted",
    min_keep: int = 1,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The general form behind every task-vector op. base=None merges the experts themselves
    (deltas against zero), as linear merging and standalone sparsification do.

    Defaults are mergekit's conventions; PEFT's merge_utils conventions are options:
    rescale="density" (kept values / density; True or "l1" is mergekit's L1 rescale),
    normalize="count" (divide by the number of agreeing experts, or of all experts without
    consensus; True or "weights" divides by their weights' sum), sign_from="unweighted" (the
    sign election votes and agrees on the sparsified deltas before weights) and min_keep=0
    (magnitude keeps int(density * numel) elements, possibly none; mergekit keeps at least 1).

    out: a tensor of the result's shape on the inputs' device to write the result into (and
    return), as torch's out= arguments do; its dtype is the result's. It must not overlap an
    input. Reusing one avoids allocating, and faulting in, a fresh output per call."""
    experts = check_experts(experts)
    if base is not None:
        base = check_tensor(base, "base")
        reference, ref_name = base, "base"
        others, names = experts, [f"experts[{i}]" for i in range(len(experts))]
    else:
        reference, ref_name = experts[0], "experts[0]"
        others, names = experts[1:], [f"experts[{i}]" for i in range(1, len(experts))]
    check_same_layout(reference, ref_name, others, names)
    args = gta_arguments(len(experts), reference.shape, weight=weight, density=density,
                         sparsification=sparsification, consensus=consensus, rescale=rescale,
                         normalize=normalize, lambda_=lambda_, gamma=gamma, epsilon=epsilon,
                         seed=seed, name=name, sign_from=sign_from, min_keep=min_keep)
    kernel_args = args.pop("kernel")
    if out is None:
        dtype = resolve_out_dtype(out_dtype, reference.dtype)
    else:
        inputs = [("base", base)] + [(f"experts[{i}]", e) for i, e in enumerate(experts)]
        dtype = check_out(out, reference, out_dtype, inputs)

    if not use_native(reference.device):
        result = _reference.generalized_task_arithmetic(base, experts, **args).to(dtype)
        return result if out is None else out.copy_(result)

    base_in = kernel_input(base) if base is not None else None
    expert_in = [kernel_input(e) for e in experts]
    direct = out is not None and out.is_contiguous() and out.dtype in KERNEL_DTYPES
    result = out if direct else kernel_output(reference.shape, dtype, reference.device)
    _native.native().gta_merge(
        capsule(base_in) if base_in is not None else None,
        [capsule(e) for e in expert_in],
        capsule(result),
        *kernel_args,
        cuda_stream(reference.device),
    )
    if out is not None:
        return out if direct else out.copy_(result)
    return result.to(dtype) if result.dtype != dtype else result


def task_arithmetic(base, experts, weight, *, lambda_=1.0, normalize=False, out_dtype=None, out=None):
    """base + lambda * sum_t weight_t (expert_t - base) (Ilharco et al., 2023)."""
    return generalized_task_arithmetic(base, experts, weight, lambda_=lambda_, normalize=normalize,
                                       out_dtype=out_dtype, out=out)


def ties(base, experts, weight, density, *, lambda_=1.0, normalize=True, consensus="sum",
         rescale=False, out_dtype=None, out=None):
    """TIES-merging (Yadav et al., 2023): exact magnitude top-k, sign election, disjoint mean."""
    return generalized_task_arithmetic(base, experts, weight, density=density,
                                       sparsification="magnitude", consensus=consensus,
                                       rescale=rescale, normalize=normalize, lambda_=lambda_,
                                       out_dtype=out_dtype, out=out)


def dare_ties(base, experts, weight, density, *, seed=0, name="", lambda_=1.0, normalize=False,
              rescale=True, out_dtype=None, out=None):
    """DARE (Yu et al., 2024) drop with L1 rescale, then TIES sign election."""
    return generalized_task_arithmetic(base, experts, weight, density=density,
                                       sparsification="random", consensus="sum", rescale=rescale,
                                       normalize=normalize, lambda_=lambda_, seed=seed, name=name,
                                       out_dtype=out_dtype, out=out)


def dare_linear(base, experts, weight, density, *, seed=0, name="", lambda_=1.0, normalize=False,
                rescale=True, out_dtype=None, out=None):
    """DARE drop with L1 rescale, summed without sign election."""
    return generalized_task_arithmetic(base, experts, weight, density=density,
                                       sparsification="random", consensus=None, rescale=rescale,
                                       normalize=normalize, lambda_=lambda_, seed=seed, name=name,
                                       out_dtype=out_dtype, out=out)


def breadcrumbs(base, experts, weight, density, *, gamma=0.01, lambda_=1.0, normalize=False,
                rescale=False, out_dtype=None, out=None):
    """Model Breadcrumbs (Davari & Belilovsky, 2023): drop the largest gamma and the smallest
    magnitudes, keeping density of each task vector."""
    return generalized_task_arithmetic(base, experts, weight, density=density, gamma=gamma,
                                       sparsification="magnitude_outliers", consensus=None,
                                       rescale=rescale, normalize=normalize, lambda_=lambda_,
                                       out_dtype=out_dtype, out=out)


def breadcrumbs_ties(base, experts, weight, density, *, gamma=0.01, lambda_=1.0, normalize=False,
                     rescale=False, out_dtype=None, out=None):
    """Breadcrumbs sparsification with TIES sign election."""
    return generalized_task_arithmetic(base, experts, weight, density=density, gamma=gamma,
                                       sparsification="magnitude_outliers", consensus="sum",
                                       rescale=rescale, normalize=normalize, lambda_=lambda_,
                                       out_dtype=out_dtype, out=out)


def della(base, experts, weight, density, *, epsilon=0.15, seed=0, name="", lambda_=1.0,
          normalize=True, rescale=True, out_dtype=None, out=None):
    """DELLA (Deep et al., 2024): magnitude-ranked drop probabilities, rescale, sign election."""
    return generalized_task_arithmetic(base, experts, weight, density=density, epsilon=epsilon,
                                       sparsification="della_magprune", consensus="sum",
                                       rescale=rescale, normalize=normalize, lambda_=lambda_,
                                       seed=seed, name=name, out_dtype=out_dtype, out=out)


def della_linear(base, experts, weight, density, *, epsilon=0.15, seed=0, name="", lambda_=1.0,
                 normalize=False, rescale=True, out_dtype=None, out=None):
    """DELLA drop without sign election."""
    return generalized_task_arithmetic(base, experts, weight, density=density, epsilon=epsilon,
                                       sparsification="della_magprune", consensus=None,
                                       rescale=rescale, normalize=normalize, lambda_=lambda_,
                                       seed=seed, name=name, out_dtype=out_dtype, out=out)


def linear(experts, weight, *, normalize=True, out_dtype=None, out=None):
    """Weighted average sum_t w_t x_t / sum_t w_t (Wortsman et al., 2022); mergekit's linear."""
    return generalized_task_arithmetic(None, experts, weight, normalize=normalize,
                                       out_dtype=out_dtype, out=out)


def dare_drop(x, density, *, seed=0, name="", rescale=True, out_dtype=None, out=None):
    """DARE's drop on one tensor: keep each element with probability density (Philox stream of
    (seed, name, expert 0)), rescaled to the original L1 norm when rescale."""
    return generalized_task_arithmetic(None, [x], 1.0, density=density, sparsification="random",
                                       rescale=rescale, seed=seed, name=name, out_dtype=out_dtype, out=out)


# ---- PEFT's TIES steps on stacked tensors ----


def _check_stacked(stacked, name: str = "stacked") -> torch.Tensor:
    stacked = check_tensor(stacked, name)
    if stacked.dim() < 1:
        raise InvalidArgumentError(f"{name} needs a leading task dimension, got a 0-d tensor")
    return stacked


def majority_sign_mask(stacked: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES sign election on tensors stacked along dim 0: a bool mask of stacked's shape,
    True where sign(x_t) equals the majority sign (vote = sum_t x_t for "sum", the count of
    signs for "count"; a vote >= 0 elects +; zeros never agree). PEFT's
    calculate_majority_sign_mask ("total" = "sum", "frequency" = "count")."""
    stacked = _check_stacked(stacked)
    if method not in ("sum", "count"):
        raise InvalidArgumentError(f"method must be 'sum' or 'count', got {method!r}")
    if not use_native(stacked.device):
        return _reference.majority_sign_mask(stacked, method)
    x = kernel_input(stacked)
    mask = torch.empty(stacked.shape, dtype=torch.bool, device=stacked.device)
    _native.native().gta_sign_mask(capsule(x), capsule(mask), CONSENSUS[method],
                                   cuda_stream(stacked.device))
    return mask


def disjoint_merge(stacked: torch.Tensor, mask: torch.Tensor, *,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Mean of the tensors stacked along dim 0 where mask (bool, stacked's shape) is True:
    sum_t x_t * mask_t / max(1, sum_t mask_t), in fp32, rounded once to out_dtype (default
    stacked's dtype). PEFT's disjoint_merge."""
    stacked = _check_stacked(stacked)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise InvalidArgumentError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.shape != stacked.shape or mask.device != stacked.device:
        raise InvalidArgumentError(
            f"mask has shape {tuple(mask.shape)} on {mask.device}, stacked {tuple(stacked.shape)} "
            f"on {stacked.device}")
    dtype = resolve_out_dtype(out_dtype, stacked.dtype)
    if not use_native(stacked.device):
        return _reference.disjoint_merge(stacked, mask).to(dtype)
    x = kernel_input(stacked)
    out = kernel_output(stacked.shape[1:], dtype, stacked.device)
    _native.native().gta_disjoint_merge(capsule(x), capsule(mask.contiguous()), capsule(out),
                                        cuda_stream(stacked.device))
    return out.to(dtype) if out.dtype != dtype else out
