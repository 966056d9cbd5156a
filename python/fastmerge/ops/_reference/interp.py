"""Interpolation merges (csrc/ops/interp): nearswap, slerp, model_stock.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .common import _f32, _scalar, _sequential_sum


_SLERP_EPS = 1e-8

_SLERP_DOT_THRESHOLD = 0.9995


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's nearswap in fp32: w = clamp(t / max(|a - b|, 1e-6), 0, 1), w b + (1 - w) a."""
    a, b = base.float(), other.float()
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


def slerp(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's slerp over the flattened tensors: dot of the normalised vectors (norms <= 1e-8
    count as 1), clamped to [-1, 1]; |dot| > 0.9995 falls back to linear interpolation.
    Statistics are accumulated in fp64, the coefficients computed in fp32."""
    a, b = _f32(base), _f32(other).to(base.device)
    aa = (a.double() * a.double()).sum()
    bb = (b.double() * b.double()).sum()
    ab = (a.double() * b.double()).sum()
    na, nb = aa.sqrt(), bb.sqrt()
    na = torch.where(na > _SLERP_EPS, na, torch.ones_like(na))
    nb = torch.where(nb > _SLERP_EPS, nb, torch.ones_like(nb))
    dot = (ab / (na * nb)).float().clamp(-1.0, 1.0)
    t32 = _scalar(t, a.device)
    one = torch.ones_like(t32)
    if bool(dot.abs() > _SLERP_DOT_THRESHOLD):
        coef_a, coef_b = one - t32, t32
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((one - t32) * theta) / sin_theta
        coef_b = torch.sin(t32 * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(base.shape)


def model_stock(base: torch.Tensor, experts: Sequence[torch.Tensor], *,
                filter_wise: bool = False) -> torch.Tensor:
    """mergekit's model_stock: t = T cos / (1 + (T-1) cos) from the mean pairwise cosine of the
    task vectors (per row of the last dim when filter_wise and base is >= 2-D, else over the
    whole tensor); t = 0 where |1 + (T-1) cos| < 1e-6; result t * mean(experts) + (1-t) * base.
    Dot products are accumulated in fp64, everything else is fp32."""
    shape = tuple(base.shape)
    count = len(experts)
    if filter_wise and base.dim() >= 2:
        row_len = shape[-1]
    else:
        row_len = max(base.numel(), 1)
    w0 = _f32(base)
    ws = [_f32(e).to(base.device) for e in experts]
    if w0.numel() == 0:
        return w0.reshape(shape)
    rows = w0.numel() // row_len
    offsets = [(w - w0).double().reshape(rows, row_len) for w in ws]
    norms = [o.pow(2).sum(dim=-1).sqrt() for o in offsets]
    cos_sum = torch.zeros(rows, dtype=torch.float32, device=w0.device)
    pairs = 0
    for i in range(count):
        for j in range(i + 1, count):
            norm_product = (norms[i] * norms[j]).float().clamp(min=1e-6)
            dot = (offsets[i] * offsets[j]).sum(dim=-1).float()
            cos_sum = cos_sum + (dot / norm_product).clamp(-1.0, 1.0)
            pairs += 1
    cos_theta = cos_sum / torch.full_like(cos_sum, float(pairs)) if pairs else cos_sum
    denominator = 1.0 + torch.full_like(cos_theta, float(count - 1)) * cos_theta
    ratio = (torch.full_like(cos_theta, float(count)) * cos_theta) / denominator
    ratio = torch.where(denominator.abs() < 1e-6, torch.zeros_like(ratio), ratio)
    ratio = ratio.reshape(rows, 1)
    average = _sequential_sum([w.reshape(rows, row_len) for w in ws])
    average = average / torch.full_like(average, float(count))
    out = ratio * average + (1.0 - ratio) * w0.reshape(rows, row_len)
    return out.reshape(shape)
