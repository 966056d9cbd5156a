"""Pure-torch references of the low-rank (LoRA) merges, written from the algorithms with dense
matrices and full float64 SVDs, as their authors' code runs them:

* KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025): the updates
  dW_i = B_i A_i are concatenated column-wise, X = [dW_1 ... dW_T] = U diag(s) V^T (directions
  with s at or below 1e-6 of the largest dropped); task i's coordinates are diag(s) V_i^T
  (V_i: its n rows of V); those are merged by TIES (magnitude top-k), or DARE then the TIES
  election (random), keeping agreeing values and averaging over the tasks that kept them,
  times lambda; the merged update is U times that.
* PEFT's add_weighted_adapter "svd": the weighted sum of the updates, truncated to its top
  new_rank singular triplets, returned as (U_r diag(s_r), Vh_r).

The merge step on the coordinates is the GTA reference (reference/gta.py), so random masks
are the same Philox masks the ops draw.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..._params import gta_arguments
from .gta import generalized_task_arithmetic

RANK_TOLERANCE = 1e-6


def knots(updates: Sequence[torch.Tensor], *, weights: Sequence[float], density: float,
          sparsification: str, lambda_: float, seed: int = 0, name: str = "") -> torch.Tensor:
    """The merged dense update (m x n, float64) of the dense updates dW_i (each m x n)."""
    n = updates[0].shape[1]
    x = torch.cat([u.double() for u in updates], dim=1)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = s > s[0] * RANK_TOLERANCE if s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    u, s, vh = u[:, keep], s[keep], vh[keep]
    coordinates: List[torch.Tensor] = [(s.unsqueeze(1) * vh[:, i * n:(i + 1) * n]).float()
                                       for i in range(len(updates))]
    if not coordinates[0].numel():
        return torch.zeros(x.shape[0], n, dtype=torch.float64)
    random = sparsification == "random"
    args = gta_arguments(len(updates), coordinates[0].shape, weight=list(weights),
                         density=density, sparsification=sparsification, consensus="sum",
                         normalize="count", rescale="density" if random else False,
                         lambda_=lambda_, seed=seed, name=name, sign_from="unweighted")
    args.pop("kernel")
    merged = generalized_task_arithmetic(None, coordinates, **args)
    return u @ merged.double()


def svd_truncated_sum(updates: Sequence[torch.Tensor], weights: Sequence[float],
                      new_rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "svd" combination: (U_r diag(s_r), Vh_r) of sum_i w_i dW_i, float64."""
    total = sum(w * u.double() for w, u in zip(weights, updates))
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return u[:, :new_rank] * s[:new_rank], vh[:new_rank]
