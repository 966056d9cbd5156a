"""ToMe's bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR
2023), step by step with torch ops, as the paper and its public code describe it:

1. normalise the metric rows by their L2 norm; split tokens alternately into a (even) and b (odd);
2. scores = a @ b^T (the full matrix); a class token's row and a distill token's column are -inf;
3. every a-token's best b-token (row max / argmax); edges sorted by that similarity, descending;
4. the first r edges merge their a-token into its best b-token, the rest stay (sorted by index
   when there is a class token);
5. merge: [unmerged a-tokens, b-tokens] (with a distill token: [unm[0], dst[0], unm[1:],
   dst[1:]]) where each b-token absorbs its sources by scatter_reduce; merge_wavg weights by
   token size; unmerge copies every merged token back to its sources' positions;
   merge_source tracks which original tokens each output token holds (amax).

Ties are resolved by torch (max and argsort), so indices are only comparable on tie-free
inputs. Results are fp32 (x is converted first).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def tome_clamp_r(tokens: int, r: int, class_token: bool, distill_token: bool) -> int:
    protected = int(class_token) + int(distill_token)
    return max(0, min(int(r), (tokens - protected) // 2))


def tome_scores(metric: torch.Tensor, class_token: bool = False, distill_token: bool = False):
    """The full [B, na, nb] score matrix of step 2 (fp32)."""
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    return scores


def tome_match(metric: torch.Tensor, r: int, class_token: bool = False,
               distill_token: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unm_idx [B, na - r], src_idx [B, r], dst_idx [B, r]); r already clamped."""
    scores = tome_scores(metric, class_token, distill_token)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx = edge_idx[..., r:]
    src_idx = edge_idx[..., :r]
    dst_idx = node_idx.gather(dim=-1, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=-1).values
    return unm_idx, src_idx, dst_idx


def _layout(unm: torch.Tensor, dst: torch.Tensor, distill_token: bool) -> torch.Tensor:
    if distill_token:
        return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)


def tome_merge_sum(x: torch.Tensor, unm_idx, src_idx, dst_idx, distill_token: bool = False,
                   reduce: str = "sum") -> torch.Tensor:
    """ToMe's merge(x, mode): gathers and one scatter_reduce (include_self) into the b-tokens."""
    a, b = x[..., ::2, :], x[..., 1::2, :]
    n, _, c = a.shape
    unm = a.gather(dim=-2, index=unm_idx[..., None].expand(n, unm_idx.shape[1], c))
    src = a.gather(dim=-2, index=src_idx[..., None].expand(n, src_idx.shape[1], c))
    dst = b.scatter_reduce(-2, dst_idx[..., None].expand(n, dst_idx.shape[1], c), src, reduce=reduce)
    return _layout(unm, dst, distill_token)


def tome_merge_wavg(x: torch.Tensor, unm_idx, src_idx, dst_idx, size: Optional[torch.Tensor] = None,
                    distill_token: bool = False):
    """merge_wavg: (sum of x * size) / (sum of size) per merged token; returns (x, size)."""
    x = x.float()
    size = torch.ones_like(x[..., :1]) if size is None else size.float()
    merged = tome_merge_sum(x * size, unm_idx, src_idx, dst_idx, distill_token)
    merged_size = tome_merge_sum(size, unm_idx, src_idx, dst_idx, distill_token)
    return merged / merged_size, merged_size


def tome_merge_source(source: Optional[torch.Tensor], unm_idx, src_idx, dst_idx, tokens: int,
                      distill_token: bool = False) -> torch.Tensor:
    """merge_source: the [B, N', N0] 0/1 matrix of original tokens per output token."""
    if source is None:
        source = torch.eye(tokens)[None].expand(unm_idx.shape[0], tokens, tokens)
    return tome_merge_sum(source.float(), unm_idx, src_idx, dst_idx, distill_token, reduce="amax")


def tome_unmerge(x: torch.Tensor, unm_idx, src_idx, dst_idx, tokens: int,
                 distill_token: bool = False) -> torch.Tensor:
    """unmerge: every original token gets the value of the output token that holds it."""
    x = x.float()
    n, _, c = x.shape
    n_unm = unm_idx.shape[1]
    if distill_token:
        unm = torch.cat([x[:, :1], x[:, 2:n_unm + 1]], dim=1)
        dst = torch.cat([x[:, 1:2], x[:, n_unm + 1:]], dim=1)
    else:
        unm, dst = x[:, :n_unm], x[:, n_unm:]
    out = torch.zeros(n, tokens, c, dtype=x.dtype, device=x.device)
    out[:, 1::2] = dst
    out.scatter_(1, (2 * unm_idx)[..., None].expand(n, n_unm, c), unm)
    src = dst.gather(1, dst_idx[..., None].expand(n, dst_idx.shape[1], c))
    out.scatter_(1, (2 * src_idx)[..., None].expand(n, src_idx.shape[1], c), src)
    return out

