"""Consensus merges (csrc/ops/consensus): ram, ramplus_tl, sce, arcee_fusion.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from .common import _MASK32, _f32, _scalar, _sequential_sum, magnitude_keys, priority_order


def _ram_terms(base: torch.Tensor, experts: Sequence[torch.Tensor], epsilon: float):
    """fp32 base, deltas, nonzero masks and contributor counts of mergekit's RAM methods."""
    b = _f32(base)
    deltas = [_f32(e).to(b.device) - b for e in experts]
    nonzero = [d.abs() > epsilon for d in deltas]
    count = torch.zeros_like(b, dtype=torch.int64)
    for nz in nonzero:
        count = count + nz.to(torch.int64)
    return b, deltas, nonzero, count


def _ram_merge(base, experts, epsilon, lambdas) -> torch.Tensor:
    b, deltas, nonzero, count = _ram_terms(base, experts, epsilon)
    unique = (count == 1).to(torch.float32)
    overlap = (count > 1).to(torch.float32)
    divisor = count.clamp(min=1).to(torch.float32)
    terms = []
    for d, nz, lam in zip(deltas, nonzero, lambdas):
        tvz = d * nz.to(torch.float32)
        terms.append((tvz * unique) * lam + (tvz * overlap) / divisor)
    merged = _sequential_sum(terms, torch.zeros_like(b))
    return (b + merged).reshape(base.shape)


def ram(base: torch.Tensor, experts: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """mergekit's ram: nz_i = |d_i| > epsilon, c = sum_i nz_i; elements only one expert changes
    take its delta, elements several change take the mean of their deltas."""
    return _ram_merge(base, experts, epsilon, [_scalar(1.0, base.device)] * len(experts))


def ramplus_tl_lambdas(base, experts, r: float, alpha: float, epsilon: float) -> List[torch.Tensor]:
    """Per-expert factors lambda_i = 1 + r * clamp(shared_i / max(unique_i, eps), 0, alpha) (fp32)."""
    _, _, nonzero, count = _ram_terms(base, experts, epsilon)
    out = []
    for nz in nonzero:
        shared = (nz & (count > 1)).sum().to(torch.float32)
        unique = (nz & (count == 1)).sum().to(torch.float32)
        rho = shared / unique.clamp(min=_scalar(epsilon, unique.device))
        rho = rho.clamp(min=0.0).minimum(_scalar(alpha, rho.device))
        out.append(1.0 + _scalar(r, rho.device) * rho)
    return out


def ramplus_tl(base: torch.Tensor, experts: Sequence[torch.Tensor], r: float = 0.1,
               alpha: float = 0.2, epsilon: float = 1e-5) -> torch.Tensor:
    """mergekit's ramplus_tl: ram with each expert's unique deltas scaled by lambda_i."""
    return _ram_merge(base, experts, epsilon, ramplus_tl_lambdas(base, experts, r, alpha, epsilon))


def sce_keep_mask(deltas: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """sce's selection: the k = int(count_nonzero(var) * select_topk) elements of largest
    population variance across the experts (computed in fp64, ranked as fp32, ties to the lowest
    flat index); all for select_topk >= 1, none for <= 0."""
    n = deltas[0].numel()
    device = deltas[0].device
    if select_topk >= 1:
        return torch.ones(n, dtype=torch.bool, device=device)
    if select_topk <= 0:
        return torch.zeros(n, dtype=torch.bool, device=device)
    stacked = torch.stack([d.double() for d in deltas])
    mean = stacked.sum(dim=0) / len(deltas)
    var = ((stacked - mean) ** 2).sum(dim=0) / len(deltas)
    var = var.float()
    nonzero = int((var != 0).sum())
    k = int(torch.tensor(float(nonzero), dtype=torch.float32) * torch.tensor(select_topk, dtype=torch.float32))
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    if k > 0:
        mask[priority_order(magnitude_keys(var))[:k]] = True
    return mask


def sce(base: torch.Tensor, experts: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """mergekit's sce: optional variance top-k of the deltas, TIES "sum" sign election, weights
    mean(m_i^2) (fp64 sums) normalised by their sum (1/N when the sum is below 1e-6), then
    base + sum_i m_i w_i e_i / max(sum_i w_i e_i, 1e-6)."""
    b = _f32(base)
    deltas = [_f32(e).to(b.device) - b for e in experts]
    if b.numel() == 0:
        return b.reshape(base.shape)
    keep = sce_keep_mask(deltas, select_topk).to(torch.float32)
    masked = [d * keep for d in deltas]
    weights = [float((m.double() ** 2).sum() / m.numel()) for m in masked]
    weights = torch.tensor(weights, dtype=torch.float32)
    total = _sequential_sum(list(weights))
    if abs(float(total)) < 1e-6:
        weights = torch.ones_like(weights) / len(masked)
    else:
        weights = weights / total
    majority = torch.where(_sequential_sum(masked, torch.zeros_like(b)) >= 0, 1.0, -1.0)
    num, den = torch.zeros_like(b), torch.zeros_like(b)
    for m, w in zip(masked, weights.to(b.device)):
        ew = w * (torch.sign(m) == majority).to(torch.float32)
        num = num + m * ew
        den = den + ew
    return (b + num / den.clamp(min=1e-6)).reshape(base.shape)


def fusion_order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering fp32 values ascending (-0 == +0, NaN last), as csrc order_key."""
    bits = _f32(x).view(torch.int32).to(torch.int64) & _MASK32
    bits = torch.where((bits & 0x7FFFFFFF) > 0x7F800000, torch.full_like(bits, 0x7FC00000), bits)
    bits = torch.where(bits == 0x80000000, torch.zeros_like(bits), bits)
    return torch.where(bits >= 0x80000000, bits ^ _MASK32, bits | 0x80000000)


def arcee_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|p - b| * KL(P || Q) per row of the last dim, P = softmax(p) + 1e-8, Q = softmax(b) + 1e-8.
    The KL is computed in fp64 and rounded to fp32 per row (mergekit's fp32 KL of close models
    is dominated by rounding noise, ~1e-3 relative); the product is fp32."""
    b, p = base.detach().float(), other.detach().float().to(base.device)
    shape = b.shape if b.dim() else (1,)
    b, p = b.reshape(shape), p.reshape(shape)
    eps = 1e-8
    bd, pd = b.double(), p.double()
    pp = torch.exp(pd - p.amax(dim=-1, keepdim=True).double())
    pp = pp / pp.sum(dim=-1, keepdim=True) + eps
    qq = torch.exp(bd - b.amax(dim=-1, keepdim=True).double())
    qq = qq / qq.sum(dim=-1, keepdim=True) + eps
    kl = (pp * torch.log(pp / qq)).sum(dim=-1, keepdim=True).float()
    return ((p - b).abs() * kl).reshape(base.shape)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """mergekit's arcee_fusion with exact order statistics: keep other's delta where the
    importance is >= median + 1.5 (q3 - q1), the quantiles sorted[int(q (n - 1))] of all
    elements (mergekit samples 1e6 elements with replacement above 1e6)."""
    b = _f32(base)
    p = _f32(other).to(b.device)
    n = b.numel()
    if n == 0:
        return b.reshape(base.shape)
    importance = _f32(arcee_importance(base, other))
    ordered = importance[torch.sort(fusion_order_keys(importance), stable=True).indices]
    q1, median, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    threshold = median + _scalar(1.5, b.device) * (q3 - q1)
    keep = (importance >= threshold).to(torch.float32)
    return (b + (p - b) * keep).reshape(base.shape)
