"""KV-cache merging, KVMerger-style (Wang et al. 2024, "Model Tells You Where to Merge:
Adaptive KV Cache Merging for LLMs on Long-Context Tasks"), per (batch, kv head).

The contract (fastmerge.ops.kv_merge documents it for users) written out step by step in
vectorised float64 torch. For one (batch, head) with keys k_0..k_{S-1}:

1. Mergeable tokens are [sinks, S - window): the first `sinks` (attention sinks) and the last
   `window` (recent) tokens are never merged. M = their count (0 when sinks + window >= S).
2. Adjacent similarities sim_i = <k_i, k_{i+1}> / max(|k_i| |k_{i+1}|, 1e-12), i in [0, S-1),
   computed in float64 and rounded to float32 (the value compared and ordered below).
3. Candidate pairs: both tokens mergeable and sim_i >= eps (NaN is never a candidate). A
   merging set is a run of consecutive tokens linked by selected pairs (KVMerger's greedy
   clustering of consecutive similar keys); merging a run of r tokens removes r - 1 tokens, so
   removing n tokens means selecting n pairs.
4. Budget: target = int(ratio * M) tokens removed per head, capped by the head's candidate
   count; every head removes the same n = min over (batch, head) of that capped target, so the
   outputs stay dense (B, H, S - n, D). The n selected pairs of a head are its candidates with
   the highest similarity, ties to the lower index.
5. Pivot of a set: the token with the highest score (NaN counts as -inf), ties to the lower
   index. Gaussian-kernel weights w_i = exp(-|k_i - k_p|^2 / (2 sigma^2)) over the set (the
   pivot's own weight is 1), normalised to sum 1; merged key = sum_i w_i k_i, merged value =
   sum_i w_i v_i with the same weights; it sits at the pivot's position. Unmerged tokens are
   copied unchanged.
6. Output in position order (sets are runs, so pivot order is set order), with positions[j] =
   the pivot index of output token j.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

SIM_FLOOR = 1e-12  # |k_i| |k_j| below this: similarity 0 (zero keys are not "similar")


def mergeable_range(seq_len: int, window: int, sinks: int) -> Tuple[int, int]:
    """[lo, hi) of the tokens that may be merged (lo == hi: none)."""
    lo = min(sinks, seq_len)
    hi = max(lo, seq_len - window)
    return lo, hi


def removal_target(seq_len: int, ratio: float, window: int, sinks: int) -> int:
    lo, hi = mergeable_range(seq_len, window, sinks)
    return int(ratio * (hi - lo))


def adjacent_similarity(keys: torch.Tensor) -> torch.Tensor:
    """sim_i of every (batch, head) as float32, shape (B, H, S - 1)."""
    k = keys.double()
    dot = (k[..., :-1, :] * k[..., 1:, :]).sum(-1)
    norm = k.pow(2).sum(-1).sqrt()
    den = (norm[..., :-1] * norm[..., 1:]).clamp_min(SIM_FLOOR)
    return (dot / den).float()


def candidate_pairs(sims: torch.Tensor, seq_len: int, eps: float, window: int,
                    sinks: int) -> torch.Tensor:
    lo, hi = mergeable_range(seq_len, window, sinks)
    idx = torch.arange(max(seq_len - 1, 0), device=sims.device)
    inside = (idx >= lo) & (idx + 1 < hi)
    return inside & (sims >= eps)


def select_pairs(keys: torch.Tensor, *, ratio: float, eps: float, window: int,
                 sinks: int, max_removed: Optional[int] = None) -> Tuple[torch.Tensor, int]:
    """(selected (B, H, S - 1) bool, n removed per head)."""
    B, H, S, _ = keys.shape
    if S < 2:
        return torch.zeros(B, H, 0, dtype=torch.bool, device=keys.device), 0
    sims = adjacent_similarity(keys)
    cand = candidate_pairs(sims, S, eps, window, sinks)
    target = removal_target(S, ratio, window, sinks)
    if max_removed is not None:
        target = min(target, max_removed)
    per_head = cand.sum(-1).clamp_max(target)
    n = int(per_head.min()) if per_head.numel() else 0
    flat = torch.where(cand, sims, torch.full_like(sims, float("-inf"))).reshape(B * H, S - 1)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices  # ties: lower index
    selected = torch.zeros_like(flat, dtype=torch.bool)
    selected.scatter_(1, order[:, :n], True)
    return selected.reshape(B, H, S - 1), n


def kv_merge(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, *, ratio: float,
             eps: float, sigma: float, window: int, sinks: int,
             max_removed: Optional[int] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(merged keys, merged values) as float32 (B, H, S', D) / (B, H, S', Dv), and the pivot
    positions (B, H, S') int64."""
    B, H, S, D = keys.shape
    Dv = values.shape[-1]
    selected, n = select_pairs(keys, ratio=ratio, eps=eps, window=window, sinks=sinks,
                               max_removed=max_removed)
    out_len = S - n
    k = keys.double().reshape(B * H, S, D)
    v = values.double().reshape(B * H, S, Dv)
    s = scores.double().reshape(B * H, S).nan_to_num(nan=float("-inf"))
    starts = torch.ones(B * H, S, dtype=torch.bool, device=keys.device)
    starts[:, 1:] = ~selected.reshape(B * H, max(S - 1, 0))
    group = starts.long().cumsum(-1) - 1  # set index of every token within its head
    head = torch.arange(B * H, device=keys.device)[:, None]
    gid = (head * out_len + group).reshape(-1)
    token = torch.arange(S, device=keys.device).expand(B * H, S).reshape(-1)
    groups = B * H * out_len
    best = torch.full((groups,), float("-inf"), dtype=torch.float64, device=keys.device)
    best = best.scatter_reduce(0, gid, s.reshape(-1), reduce="amax")
    is_best = s.reshape(-1) == best[gid]
    pivot = torch.full((groups,), S, dtype=torch.long, device=keys.device)
    pivot = pivot.scatter_reduce(0, gid, torch.where(is_best, token, torch.full_like(token, S)),
                                 reduce="amin")
    flat_k = k.reshape(B * H * S, D)
    flat_v = v.reshape(B * H * S, Dv)
    pivot_row = (gid // max(out_len, 1)) * S + pivot[gid]
    dist2 = (flat_k - flat_k[pivot_row]).pow(2).sum(-1)
    # the pivot (distance 0) weighs 1 even when 2 sigma^2 underflows, and a one-token set
    # copies its token exactly even when that key is not finite
    is_pivot = token == pivot[gid]
    w = torch.where(is_pivot | (dist2 == 0), 1.0, torch.exp(-dist2 / (2.0 * sigma * sigma)))
    den = torch.zeros(groups, dtype=torch.float64, device=keys.device).index_add_(0, gid, w)
    num_k = torch.zeros(groups, D, dtype=torch.float64, device=keys.device)
    num_k.index_add_(0, gid, w[:, None] * flat_k)
    num_v = torch.zeros(groups, Dv, dtype=torch.float64, device=keys.device)
    num_v.index_add_(0, gid, w[:, None] * flat_v)
    merged_k = (num_k / den[:, None]).float().reshape(B, H, out_len, D)
    merged_v = (num_v / den[:, None]).float().reshape(B, H, out_len, Dv)
    return merged_k, merged_v, pivot.reshape(B, H, out_len)
