"""KV-cache merging, KVMerger-style (csrc/ops/kvmerge): shrink a long-context KV cache by
merging runs of similar consecutive keys into their most-attended token, in O(S * D) time and
O(S) extra memory per (batch, kv head), deterministic on CPU and CUDA.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Tuple, Union

import torch

from .. import _native
from ..errors import InvalidArgumentError
from ._reference import kvmerge as _ref
from ._validate import capsule, check_tensor, cuda_stream, kernel_input, kernel_output, use_native


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise InvalidArgumentError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _check_float(value, name: str, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or v < low or v > high or (low_open and v <= low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidArgumentError(f"{name} must be in {bound}, got {value!r}")
    return v


def _check_inputs(keys, values, scores):
    keys = check_tensor(keys, "keys")
    values = check_tensor(values, "values")
    scores = check_tensor(scores, "scores")
    if keys.dim() != 4:
        raise InvalidArgumentError(
            f"keys must have shape (batch, kv_heads, seq, head_dim), got {tuple(keys.shape)}")
    B, H, S, _ = keys.shape
    if values.dim() != 4 or tuple(values.shape[:3]) != (B, H, S):
        raise InvalidArgumentError(
            f"values must have shape ({B}, {H}, {S}, value_dim) like keys, got {tuple(values.shape)}")
    if tuple(scores.shape) != (B, H, S):
        raise InvalidArgumentError(
            f"scores must have shape ({B}, {H}, {S}) (one per key), got {tuple(scores.shape)}")
    for t, n in ((values, "values"), (scores, "scores")):
        if t.device != keys.device:
            raise InvalidArgumentError(f"{n} is on {t.device} but keys is on {keys.device}")
    return keys, values, scores


def kv_merge(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, *, ratio: float,
             eps: float = -1.0, sigma: float = 1.0, window: int = 0, sinks: int = 0,
             return_positions: bool = False, max_removed: Optional[int] = None
             ) -> Union[Tuple[torch.Tensor, torch.Tensor],
                        Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """KVMerger-style merging of a KV cache, independently per (batch, kv head).

    keys (B, H, S, D) are post-RoPE keys, values (B, H, S, Dv), scores (B, H, S) the aggregated
    attention each token received (e.g. summed over queries and the query heads of its group).
    Per (batch, head):

    * tokens [0, sinks) and [S - window, S) are never merged; the M tokens between are
      mergeable (M = 0 when sinks + window >= S);
    * sim_i = <k_i, k_{i+1}> / max(|k_i| |k_{i+1}|, 1e-12) (fp64, rounded to fp32); a pair
      (i, i+1) of mergeable tokens is a candidate when sim_i >= eps (NaN never is);
    * budget: each head would remove int(ratio * M) tokens, capped by its candidate count;
      every head removes the same n = the smallest of those numbers over (batch, head), so
      the outputs are dense (B, H, S - n, ...). ratio caps the merging, eps restricts it:
      eps=-1 makes every mergeable pair a candidate (ratio alone decides, n = int(ratio * M)
      whenever int(ratio * M) < M); with a high eps a head with few similar keys limits n;
    * the n candidate pairs of highest similarity (ties: lower index) are merged; runs of
      consecutive merged pairs form merging sets (a run of r tokens becomes one token);
    * a set's pivot is its token with the highest score (NaN counts as -inf, ties: lower
      index); with w_i = exp(-|k_i - k_p|^2 / (2 sigma^2)) (the pivot's own weight is 1)
      normalised over the set, the merged key is sum_i w_i k_i and the merged value
      sum_i w_i v_i; it sits at the pivot's position. Other tokens are copied exactly;
    * output tokens stay in position order.

    Arithmetic is fp64 inside, results are rounded once to the input dtypes (float64 inputs are
    computed as float32). Returns (keys, values), plus the pivot positions (B, H, S - n) int64
    (the original index of every output token) when return_positions.

    max_removed caps n further (several caches merged to one length: kv_merge_budget of each,
    then their smallest as max_removed of every call).
    """
    keys, values, scores = _check_inputs(keys, values, scores)
    ratio = _check_float(ratio, "ratio", 0.0, 1.0)
    eps = _check_float(eps, "eps")
    sigma = _check_float(sigma, "sigma", 0.0, math.inf, low_open=True)
    if math.isinf(sigma):
        raise InvalidArgumentError(f"sigma must be finite, got {sigma!r}")
    window = _check_int(window, "window")
    sinks = _check_int(sinks, "sinks")
    if max_removed is not None:
        max_removed = _check_int(max_removed, "max_removed")
    if not isinstance(return_positions, bool):
        raise InvalidArgumentError(f"return_positions must be a bool, got {return_positions!r}")
    B, H, S, D = keys.shape
    Dv = values.shape[-1]
    device = keys.device
    lo, hi = _ref.mergeable_range(S, window, sinks)
    target = _ref.removal_target(S, ratio, window, sinks)
    if max_removed is not None:
        target = min(target, max_removed)
    kdtype = keys.dtype if keys.dtype != torch.float64 else torch.float32
    vdtype = values.dtype if values.dtype != torch.float64 else torch.float32
    if S < 2 or target == 0 or B * H == 0 or D == 0:
        out = (keys.detach().to(kdtype, copy=True), values.detach().to(vdtype, copy=True))
        if return_positions:
            pos = torch.arange(S, device=device).expand(B, H, S).contiguous()
            return out + (pos,)
        return out
    if not use_native(device):
        k, v, pos = _ref.kv_merge(keys, values, scores, ratio=ratio, eps=eps,
                                   sigma=sigma, window=window, sinks=sinks,
                                   max_removed=max_removed)
        out = (k.to(kdtype), v.to(vdtype))
        return out + (pos,) if return_positions else out
    k_in, v_in, s_in = kernel_input(keys), kernel_input(values), kernel_input(scores)
    sims = torch.empty(B, H, S - 1, dtype=torch.float32, device=device)
    C = _native.native()
    stream = cuda_stream(device)
    removed = C.kv_merge_plan(capsule(k_in), capsule(sims), B * H, S, D, lo, hi, target, eps,
                              stream)
    out_len = S - removed
    k_out = kernel_output((B, H, out_len, D), kdtype, device)
    v_out = kernel_output((B, H, out_len, Dv), vdtype, device)
    pos = torch.empty(B, H, out_len, dtype=torch.int64, device=device) if return_positions else None
    C.kv_merge_apply(capsule(k_in), capsule(v_in), capsule(s_in), capsule(sims), capsule(k_out),
                     capsule(v_out), pos.data_ptr() if pos is not None else 0, B * H, S, D, Dv,
                     lo, hi, target, eps, sigma, removed, stream)
    if return_positions:
        return k_out, v_out, pos
    return k_out, v_out


def kv_merge_budget(keys: torch.Tensor, *, ratio: float, eps: float = -1.0, window: int = 0,
                    sinks: int = 0) -> int:
    """The number of tokens kv_merge removes from every (batch, head) of keys with these
    settings: int(ratio * M), capped by the smallest candidate count over (batch, head).
    Several caches (a model's layers) merge to one length when each kv_merge call gets the
    smallest of their budgets as max_removed."""
    keys = check_tensor(keys, "keys")
    if keys.dim() != 4:
        raise InvalidArgumentError(
            f"keys must have shape (batch, kv_heads, seq, head_dim), got {tuple(keys.shape)}")
    ratio = _check_float(ratio, "ratio", 0.0, 1.0)
    eps = _check_float(eps, "eps")
    window = _check_int(window, "window")
    sinks = _check_int(sinks, "sinks")
    B, H, S, D = keys.shape
    target = _ref.removal_target(S, ratio, window, sinks)
    if S < 2 or target == 0 or B * H == 0 or D == 0:
        return 0
    lo, hi = _ref.mergeable_range(S, window, sinks)
    if not use_native(keys.device):
        candidates = _ref.candidate_pairs(_ref.adjacent_similarity(keys), S, eps, window, sinks)
        return int(candidates.sum(-1).clamp_max(target).min())
    k_in = kernel_input(keys)
    sims = torch.empty(B, H, S - 1, dtype=torch.float32, device=keys.device)
    return int(_native.native().kv_merge_plan(capsule(k_in), capsule(sims), B * H, S, D, lo, hi,
                                              target, eps, cuda_stream(keys.device)))
