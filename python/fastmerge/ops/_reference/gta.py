"""Generalized task arithmetic (csrc/ops/gta): mergekit.sparsify on one flat fp32 delta,
mergekit's GeneralizedTaskArithmeticMerge.merge_group in fp32, magnitude selection, and PEFT's
sign election and disjoint merge on stacked tensors.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .common import (
    _L1_EPS,
    _f32,
    _priority_range_mask,
    _scalar,
    _sequential_sum,
    _stream_hash,
    magnitude_keep_count,
    magnitude_keys,
    philox_uniforms,
    priority_order,
)


def della_rank_norm(delta: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """DELLA's normalised rank of every element, flat fp32: ranks of |delta| along dim 1 of
    shape (mergekit argsorts along dim 1 after unsqueezing <2-D tensors to one row), ascending
    magnitude = ascending rank, ties ranking the lower index higher; rank_norm = (r-1)/(len-1),
    0.5 for a one-element group."""
    from ..gta import della_rank_axis  # (outer, len, inner); imported late: gta imports us

    outer, length, inner = della_rank_axis(shape)
    if length <= 1:
        return torch.full((delta.numel(),), 0.5, dtype=torch.float32, device=delta.device)
    keys = magnitude_keys(delta).reshape(outer, length, inner)
    order = priority_order(keys, dim=1)  # position 0 = largest |delta| (lowest index on ties)
    position = torch.empty_like(order)
    steps = torch.arange(length, device=delta.device).reshape(1, length, 1).expand_as(order)
    position.scatter_(1, order, steps)
    rank0 = (length - 1) - position      # 0 = smallest magnitude
    # float(rank0) / float(len - 1), one fp32 division (exact ints; correctly rounded quotient)
    numerator = rank0.to(torch.float32)
    denominator = torch.full_like(numerator, float(length - 1))
    return (numerator / denominator).reshape(-1)


def sparsify(
    delta: torch.Tensor,
    *,
    method: Optional[str],
    density: float,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    rescale=False,
    seed: int = 0,
    stream: int = 0,
    expert: int = 0,
    shape: Sequence[int] = (),
    min_keep: int = 1,
) -> torch.Tensor:
    """mergekit's sparsify() in fp32 on a flat delta: the masked (and, with rescale, rescaled)
    delta. Dropped elements are +0.0 (mergekit multiplies by the mask, giving -0.0 or NaN for
    inf; only the sign of zero differs on finite data). Methods without a mask (None, density
    >= 1) return delta untouched and never rescale, as mergekit does.

    rescale: True or "l1" is mergekit's L1 rescale; "density" divides the kept values by the
    density (PEFT's prune(rescale=True)), as kept * fp32(1 / density). min_keep: magnitude
    keeps max(min_keep, int(density * n)) elements (mergekit 1, PEFT 0)."""
    n = delta.numel()
    if rescale is True:
        rescale = "l1"
    if method is None or density >= 1.0:
        return delta
    if method == "magnitude":
        k = magnitude_keep_count(density, n)
        if min_keep != 1 and 0.0 < density < 1.0:
            k = min(n, max(min_keep, int(density * n)))
        if k == 0:
            return torch.zeros_like(delta)
        keep = _priority_range_mask(delta, 0, k)
    elif method == "magnitude_outliers":
        # mergekit keeps ascending-magnitude ranks [n_bot, n_bot + target_n): in priority order
        # (descending) that is positions [n - n_bot - target_n, n - n_bot).
        target_n = int(density * n) if density > 0.0 else 0
        n_top = int(gamma * n)
        n_bot = max(0, n - target_n - n_top)
        keep = _priority_range_mask(delta, n - n_bot - target_n, n - n_bot)
    elif method == "random":
        if density <= 0.0:
            return torch.zeros_like(delta)
        u = philox_uniforms(n, seed, stream, expert, delta.device)
        keep = u < _scalar(density, delta.device)
    elif method == "della_magprune":
        if density <= 0.0:
            return torch.zeros_like(delta)
        if not (density + epsilon < 1.0 and density - epsilon > 0.0):
            raise ValueError(
                f"della: density +/- epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}"
            )
        rank_norm = della_rank_norm(delta, shape)
        # prob = float32(d - eps) + (rank_norm * 2) * float32(eps), each step rounded to fp32
        prob_base = _scalar(density - epsilon, delta.device)
        prob_span = _scalar(epsilon, delta.device)
        prob = prob_base + (rank_norm * 2.0) * prob_span
        u = philox_uniforms(n, seed, stream, expert, delta.device)
        keep = u < prob
    else:
        raise ValueError(f"unknown sparsification {method!r}")

    zero = torch.zeros_like(delta)
    masked = torch.where(keep, delta, zero)
    if rescale == "density":
        return torch.where(keep, delta * _scalar(1.0 / density, delta.device), zero)
    if rescale:
        # mergekit's rescaled_masked_tensor with the L1 norm, fp32 sums. The factor applies to
        # the kept elements only: dropped ones stay exactly 0 even when the factor is NaN
        # (NaN or inf in the delta), where mergekit's masked * factor would spread the NaN.
        before = delta.abs().sum()
        after = masked.abs().sum()
        eps = _scalar(_L1_EPS, delta.device)
        if not bool(before < eps) and not bool(after < eps):
            masked = torch.where(keep, delta * (before / after), zero)
    return masked


def combine(
    contributions: List[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: Optional[str],
    normalize,
    lambda_: float,
    electors: Optional[List[torch.Tensor]] = None,
) -> torch.Tensor:
    """Merged delta from the weighted, sparsified deltas v_t = sparsify(delta_t) * w_t.

    normalize: True or "weights" divides by the (agreeing) weights' sum, "count" by the number
    of (agreeing) experts (PEFT's disjoint_merge). electors: what the sign election votes and
    agrees on (PEFT: the unweighted s_t); default the contributions themselves (mergekit)."""
    device = contributions[0].device
    zero = torch.zeros_like(contributions[0])
    if normalize is True:
        normalize = "weights"
    if consensus is None:
        mixed = _sequential_sum(contributions)
        if normalize == "count":
            mixed = mixed / _scalar(float(len(contributions)), device)
        elif normalize:
            divisor = _scalar(0.0, device)
            for w in weights:  # fp32 sum of the weights
                divisor = divisor + _scalar(w, device)
            if bool(divisor.abs() < 1e-8):
                divisor = _scalar(1.0, device)
            mixed = mixed / divisor
    else:
        # TIES sign election (mergekit get_mask): majority sign of the summed deltas ("sum") or
        # of the summed signs ("count"); ties (vote == 0) elect +. Zeros never agree.
        electors = contributions if electors is None else electors
        if consensus == "sum":
            vote = _sequential_sum(electors)
        elif consensus == "count":
            vote = _sequential_sum([torch.sign(v) for v in electors])
        else:
            raise ValueError(f"unknown consensus {consensus!r}")
        positive = vote >= 0
        agree = [torch.where(positive, e > 0, e < 0) for e in electors]
        mixed = _sequential_sum([torch.where(a, v, zero) for a, v in zip(agree, contributions)],
                                start=zero)
        shares = [1.0] * len(weights) if normalize == "count" else weights
        divisor = _sequential_sum(
            [torch.where(a, _scalar(w, device), zero) for a, w in zip(agree, shares)],
            start=zero)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        if normalize:
            mixed = mixed / divisor
    if lambda_ != 1.0:
        mixed = mixed * _scalar(lambda_, device)
    return mixed


def generalized_task_arithmetic(
    base: Optional[torch.Tensor],
    experts: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    epsilons: Sequence[float],
    sparsification: Optional[str],
    consensus: Optional[str],
    rescale: bool,
    normalize: bool,
    lambda_: float,
    seed: int,
    name: str,
    sign_from: str = "weighted",
    min_keep: int = 1,
) -> torch.Tensor:
    """base + lambda * combine(sparsify(expert_t - base) * weight_t), fp32, base's shape.
    base=None: the deltas are the experts themselves and nothing is added back.
    sign_from="unweighted": the sign election votes and agrees on sparsify(delta_t) (PEFT)."""
    reference = base if base is not None else experts[0]
    shape = tuple(reference.shape)
    b = _f32(base) if base is not None else None
    stream = _stream_hash(name)
    contributions, sparse = [], []
    for t, expert in enumerate(experts):
        delta = _f32(expert).to(reference.device)
        if b is not None:
            delta = delta - b
        kept = sparsify(delta, method=sparsification, density=densities[t], gamma=gammas[t],
                        epsilon=epsilons[t], rescale=rescale, seed=seed, stream=stream,
                        expert=t, shape=shape, min_keep=min_keep)
        sparse.append(kept)
        contributions.append(kept * _scalar(weights[t], kept.device))
    if sign_from not in ("weighted", "unweighted"):
        raise ValueError(f"unknown sign_from {sign_from!r}")
    mixed = combine(contributions, weights, consensus=consensus, normalize=normalize,
                    lambda_=lambda_, electors=sparse if sign_from == "unweighted" else None)
    out = b + mixed if b is not None else mixed
    return out.reshape(shape)


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask (x's shape) of the k = max(1, int(density * numel)) largest |x|; all for
    density >= 1, none for density <= 0; equal magnitudes go to the lowest flat indices."""
    flat = _f32(x)
    k = magnitude_keep_count(density, flat.numel())
    return _priority_range_mask(flat, 0, k).reshape(x.shape)


def majority_sign_mask(stacked: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Bool mask (stacked's shape): sign(x_t) == majority, the majority +1 where the vote
    (sum_t x_t for "sum", sum_t sign(x_t) for "count", fp32 in t order) is >= 0, else -1."""
    if stacked.shape[0] == 0:
        return torch.zeros(stacked.shape, dtype=torch.bool, device=stacked.device)
    rows = [_f32(r) for r in stacked.unbind(0)]
    if method == "sum":
        vote = _sequential_sum(rows)
    elif method == "count":
        vote = _sequential_sum([torch.sign(r) for r in rows])
    else:
        raise ValueError(f"unknown method {method!r}")
    positive = vote >= 0
    return torch.stack([torch.where(positive, r > 0, r < 0) for r in rows]).reshape(stacked.shape)


def disjoint_merge(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t x_t * mask_t / max(1, sum_t mask_t), fp32 in t order, stacked.shape[1:]."""
    if stacked.shape[0] == 0:
        return torch.zeros(stacked.shape[1:], dtype=torch.float32, device=stacked.device)
    rows = [_f32(r) for r in stacked.unbind(0)]
    on = [m.reshape(-1).to(torch.float32) for m in mask.unbind(0)]
    mixed = _sequential_sum([r * m for r, m in zip(rows, on)])
    kept = _sequential_sum(on)
    return (mixed / torch.clamp(kept, min=1.0)).reshape(stacked.shape[1:])
