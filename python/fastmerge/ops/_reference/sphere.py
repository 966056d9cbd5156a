"""Sphere family (csrc/ops/sphere): nuslerp, multislerp, karcher (mergekit 0.1.5).

Each method's result is a combination of its (delta) inputs, so it is stated here as mergekit's
formulas on the inputs' Gram matrix (fp64 sums of the fp32 values) giving coefficients c_j,
then out = base + sum_j c_j (x_j - base) in fp32, summed in input order.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import math

import torch

from ...errors import InvalidArgumentError
from .common import _f32, _scalar


def _sphere_deltas(tensors, base):
    ref = base if base is not None else tensors[0]
    b = _f32(base) if base is not None else None
    return b, [(_f32(x).to(ref.device) - b) if b is not None else _f32(x).to(ref.device)
               for x in tensors]


def _sphere_combine(deltas, coefs, b, shape):
    out = None
    for d, c in zip(deltas, coefs):
        out = c * d if out is None else out + c * d
    if b is not None:
        out = b + out
    return out.reshape(shape)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, base: Optional[torch.Tensor] = None,
            dim: int = -1, flatten: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's nuslerp per vector (see fastmerge._params.sphere_layout): norms clamped at
    1e-7, cos clamped to [-1, 1], linear where (1 - cos^2) <= eps^2 in fp32, else the slerp
    coefficients sin((1-t)θ)/sin θ and sin(tθ)/sin θ (fp32) on the raw (delta) vectors."""
    from ..._params import sphere_layout

    outer, length, inner = sphere_layout(v0.shape, dim, flatten)
    b, (d0, d1) = _sphere_deltas([v0, v1], base)
    if d0.numel() == 0:
        return d0.reshape(v0.shape)
    x0 = d0.reshape(outer, length, inner).double()
    x1 = d1.reshape(outer, length, inner).double()
    na = (x0 * x0).sum(1).sqrt().clamp(min=1e-7)
    nb = (x1 * x1).sum(1).sqrt().clamp(min=1e-7)
    cos = ((x0 * x1).sum(1) / (na * nb)).clamp(-1.0, 1.0).float()
    one = torch.ones_like(cos)
    colinear = (one - cos * cos) <= _scalar(eps * eps, cos.device)
    omt, tf = _scalar(1.0 - t, cos.device), _scalar(t, cos.device)
    theta = torch.acos(torch.where(colinear, one, cos))
    sin_theta = torch.sin(theta)
    ca = torch.where(colinear, omt * one, torch.sin(omt * theta) / sin_theta).unsqueeze(1)
    cb = torch.where(colinear, tf * one, torch.sin(tf * theta) / sin_theta).unsqueeze(1)
    out = ca * d0.reshape(outer, length, inner) + cb * d1.reshape(outer, length, inner)
    if b is not None:
        out = b.reshape(outer, length, inner) + out
    return out.reshape(v0.shape)


def _gram(deltas) -> List[List[float]]:
    x = torch.stack([d.double() for d in deltas])
    return (x @ x.T).cpu().tolist()


def _quad(g, x, y) -> float:
    return sum(x[j] * sum(g[j][k] * y[k] for k in range(len(y))) for j in range(len(x)))


def _norm_of(g, x) -> float:
    s = _quad(g, x, x)
    return math.sqrt(s) if s > 0 else (0.0 if s == s else s)


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], *,
               base: Optional[torch.Tensor] = None, normalize_weights: bool = True,
               eps: float = 1e-8) -> torch.Tensor:
    """mergekit's multislerp on the flattened (delta) tensors, in fp64 on their Gram matrix:
    unit_i = x_i / (|x_i| + eps), mean = sum w_i unit_i, mean_hat = mean / |mean|, tangent =
    sum w_i (unit_i - <unit_i, mean_hat> mean_hat), tn = |tangent| + eps, result =
    (mean_hat cos tn + tangent sin(tn)/tn) * sum_i w_i |x_i| (+ base). One input: returned
    as is. |mean| < eps: two inputs are interpolated linearly, more raise."""
    from ..._params import MULTISLERP_ANTIPODAL

    shape = tuple(tensors[0].shape)
    if len(tensors) == 1:
        return _f32(tensors[0]).reshape(shape)
    b, deltas = _sphere_deltas(tensors, base)
    if deltas[0].numel() == 0:
        return deltas[0].reshape(shape)
    n = len(deltas)
    g = _gram(deltas)
    w = [float(x) for x in weights]
    if normalize_weights:
        total = sum(w)
        w = [x / total for x in w]
    norm = [math.sqrt(g[i][i]) for i in range(n)]
    denom = [norm[i] + eps for i in range(n)]
    m = [w[i] / denom[i] for i in range(n)]
    mean_norm = _norm_of(g, m)
    if mean_norm < eps:
        if n != 2:
            raise InvalidArgumentError(MULTISLERP_ANTIPODAL)
        return _sphere_combine(deltas, [_scalar(x, b.device if b is not None else deltas[0].device)
                                        for x in w], b, shape)
    mh = [x / mean_norm for x in m]
    along = sum(w[i] * sum(g[i][k] * mh[k] for k in range(n)) / denom[i] for i in range(n))
    tangent = [m[i] - along * mh[i] for i in range(n)]
    tn = _norm_of(g, tangent) + eps
    avg_norm = sum(norm[i] * w[i] for i in range(n))
    sinc = 1.0 if tn == 0 else math.sin(tn) / tn
    coefs = [avg_norm * (mh[i] * math.cos(tn) + tangent[i] * sinc) for i in range(n)]
    dev = deltas[0].device
    return _sphere_combine(deltas, [_scalar(c, dev) for c in coefs], b, shape)


def karcher(tensors: Sequence[torch.Tensor], alphas: Sequence[float], *, max_iter: int = 10,
            tol: float = 1e-5) -> torch.Tensor:
    """mergekit's karcher_merge_tensors on the flattened tensors, in fp64 on their Gram matrix:
    the mean is a combination of the unit vectors of the inputs with norm > tol, started at
    their alpha-weighted (renormalised) mean (the first such unit if that is below tol), moved
    at most max_iter times along sum_a alpha_a θ_a/sin θ_a (u_a - cos θ_a mean) (θ_a < tol
    skipped; stop when that step is below tol) and renormalised; scaled by sum_i alpha_i |x_i|
    over all inputs. One input: returned as is; no input above tol: zeros."""
    shape = tuple(tensors[0].shape)
    if len(tensors) == 1:
        return _f32(tensors[0]).reshape(shape)
    _, xs = _sphere_deltas(tensors, None)
    if xs[0].numel() == 0:
        return xs[0].reshape(shape)
    n = len(xs)
    g = _gram(xs)
    norm = [math.sqrt(g[i][i]) for i in range(n)]
    valid = [i for i in range(n) if norm[i] > tol]
    coefs = [0.0] * n
    if valid:
        k = len(valid)
        gu = [[g[i][j] / (norm[i] * norm[j]) for j in valid] for i in valid]
        alpha_sum = sum(alphas[i] for i in valid)
        if alpha_sum == 0:
            raise InvalidArgumentError("karcher: the alphas of the inputs with norm above tol sum "
                                       "to zero")
        alpha = [alphas[i] / alpha_sum for i in valid]
        c = list(alpha)
        mean_norm = _norm_of(gu, c)
        c = [1.0] + [0.0] * (k - 1) if mean_norm < tol else [x / mean_norm for x in c]
        for _ in range(max_iter):
            dots = [min(1.0, max(-1.0, sum(gu[a][b] * c[b] for b in range(k)))) for a in range(k)]
            tangent = [0.0] * k
            for a in range(k):
                theta = math.acos(dots[a])
                if theta < tol:
                    continue
                f = alpha[a] * (theta / math.sin(theta))
                tangent[a] += f
                for b in range(k):
                    tangent[b] -= f * dots[a] * c[b]
            tn = _norm_of(gu, tangent)
            if tn < tol or tn == 0:
                break
            c = [math.cos(tn) * c[b] + (math.sin(tn) / tn) * tangent[b] for b in range(k)]
            un = _norm_of(gu, c)
            if un > tol:
                c = [x / un for x in c]
        scale = sum(alphas[i] * norm[i] for i in range(n))
        for a, i in enumerate(valid):
            coefs[i] = scale * c[a] / norm[i]
    dev = xs[0].device
    return _sphere_combine(xs, [_scalar(x, dev) for x in coefs], None, shape)
