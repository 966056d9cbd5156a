"""Pure-torch references of the subspace merges, written step by step from the papers'
algorithms with full SVDs (torch.linalg.svd), as their authors' code runs them:

* TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
  Merging", CVPR 2025): each task vector keeps its top int(k / T) singular triplets; the
  concatenated left and right singular vectors are orthogonalised (U V^T of their SVDs);
  merged = U_orth diag(S_cat) V_orth.
* Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025): the sum of the task vectors with its singular values
  replaced by their mean.
* Iso-CTS (same paper): the top singular vectors of the sum (the common subspace) plus, per
  task, the top singular vectors of the task vector projected off the common subspace; both
  sets orthogonalised, all singular values replaced by their mean.
* CART (Choi et al., 2024): the weight average plus the low-rank parts of the task vectors
  centred at it.
* DC-Merge (Zhang et al., CVPR 2026): TSV-M's truncation and orthogonalised basis, then the
  task vectors merged inside that basis by sparsification, sign election and a block-diagonal
  restriction.

Tensors that are not 2-D get the mean task vector. Every function returns the merged task
vector (fp32); callers add alpha times it to the base.
"""
from __future__ import annotations

from typing import List

import torch


def _mean(deltas: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack(deltas).mean(0)


def _orthogonalise(x: torch.Tensor) -> torch.Tensor:
    try:
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        # LAPACK's fp32 divide-and-conquer SVD can fail to converge on the nearly rank-deficient
        # concatenated bases of large layers (seen at 4096x4096 x 4 tasks); float64 converges.
        u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return (u @ vh).to(x.dtype)
    return u @ vh


def tsv(deltas: List[torch.Tensor]) -> torch.Tensor:
    deltas = [d.float() for d in deltas]
    if deltas[0].dim() != 2:
        return _mean(deltas)
    m, n = deltas[0].shape
    k = min(m, n)
    per_task = int(k / len(deltas))
    sum_u = torch.zeros(m, k, device=deltas[0].device)
    sum_s = torch.zeros(k, device=deltas[0].device)
    sum_v = torch.zeros(k, n, device=deltas[0].device)
    for i, d in enumerate(deltas):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        sum_u[:, i * per_task:(i + 1) * per_task] = u[:, :per_task]
        sum_s[i * per_task:(i + 1) * per_task] = s[:per_task]
        sum_v[i * per_task:(i + 1) * per_task, :] = vh[:per_task, :]
    return _orthogonalise(sum_u) @ torch.diag(sum_s) @ _orthogonalise(sum_v)


def iso_c(deltas: List[torch.Tensor]) -> torch.Tensor:
    deltas = [d.float() for d in deltas]
    if deltas[0].dim() != 2:
        return _mean(deltas)
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    return u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh


def iso_cts_split(k: int, tasks: int, common_space_fraction: float):
    """(common dims, dims per task): the task-specific part rounded to a multiple of T."""
    common = int(k * common_space_fraction)
    specific_total = round((k - common) / tasks) * tasks
    common = k - specific_total
    return common, int((k - common) / tasks)


def iso_cts(deltas: List[torch.Tensor], common_space_fraction: float = 0.8) -> torch.Tensor:
    deltas = [d.float() for d in deltas]
    if deltas[0].dim() != 2:
        return _mean(deltas)
    m, n = deltas[0].shape
    k = min(m, n)
    tasks = len(deltas)
    common, per_task = iso_cts_split(k, tasks, common_space_fraction)
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    u_c, s_c, v_c = u[:, :common], s[:common], vh[:common, :]
    comb_u = torch.zeros(m, k, device=deltas[0].device)
    comb_s = torch.zeros(k, device=deltas[0].device)
    comb_v = torch.zeros(k, n, device=deltas[0].device)
    for i, d in enumerate(deltas):
        u_t, s_t, vh_t = torch.linalg.svd(d - u_c @ (u_c.T @ d), full_matrices=False)
        comb_u[:, i * per_task:(i + 1) * per_task] = u_t[:, :per_task]
        comb_s[i * per_task:(i + 1) * per_task] = s_t[:per_task]
        comb_v[i * per_task:(i + 1) * per_task, :] = vh_t[:per_task, :]
    start = tasks * per_task
    comb_u[:, start:start + common] = u_c
    comb_s[start:start + common] = s_c
    comb_v[start:start + common, :] = v_c
    iso = torch.full_like(comb_s, float(comb_s.mean()))
    return _orthogonalise(comb_u) @ torch.diag(iso) @ _orthogonalise(comb_v)


def _keep_top_fraction(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """x with all but its top max(1, int(fraction * numel)) magnitudes zeroed (ties at the
    threshold kept)."""
    return _keep_top_count(x, max(1, int(fraction * x.numel())))


def _keep_top_count(x: torch.Tensor, count: int) -> torch.Tensor:
    """x with all but its top `count` magnitudes zeroed (ties at the threshold kept); all of x
    when count reaches its size (the threshold of a zero-padded matrix is then 0)."""
    flat = x.abs().reshape(-1)
    if count >= flat.numel():
        return x
    threshold = torch.topk(flat, count).values.min()
    return x * (x.abs() >= threshold)


def _sign_elected_mean(stacked: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint mean: per element, the mean of the entries whose sign is the sign of
    their sum (zero where the sum is zero)."""
    total = stacked.sum(0)
    agree = torch.sign(stacked) == torch.sign(total).unsqueeze(0)
    mean = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return torch.where(total == 0, torch.zeros_like(mean), mean)


def dc_merge(deltas: List[torch.Tensor], keep_fraction: float = 1e-3) -> torch.Tensor:
    """DC-Merge (Zhang et al., "DC-Merge: Improving Model Merging with Directional
    Consistency", CVPR 2026), as its released code runs it: each task vector truncated to its
    top int(k / T) singular triplets; the concatenated singular vectors orthogonalised into a
    shared "cover" basis; each truncated task vector expressed in that basis (a k x k matrix),
    sparsified to its top keep_fraction entries, the T matrices merged by TIES' sign election
    and disjoint mean, restricted to the block diagonal (task t's own block of the basis) and
    mapped back."""
    deltas = [d.float() for d in deltas]
    if deltas[0].dim() != 2:
        return _mean(deltas)
    m, n = deltas[0].shape
    k = min(m, n)
    tasks = len(deltas)
    per_task = int(k / tasks)
    sum_u = torch.zeros(m, k, device=deltas[0].device)
    sum_v = torch.zeros(k, n, device=deltas[0].device)
    truncated = []
    for i, d in enumerate(deltas):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        sum_u[:, i * per_task:(i + 1) * per_task] = u[:, :per_task]
        sum_v[i * per_task:(i + 1) * per_task, :] = vh[:per_task, :]
        truncated.append(u[:, :per_task] @ torch.diag(s[:per_task]) @ vh[:per_task, :])
    cover_u, cover_v = _orthogonalise(sum_u), _orthogonalise(sum_v)
    inner = [_keep_top_fraction(cover_u.T @ t @ cover_v.T, keep_fraction) for t in truncated]
    merged = _sign_elected_mean(torch.stack(inner))
    block = k // tasks
    mask = torch.zeros_like(merged)
    for i in range(tasks):
        mask[i * block:(i + 1) * block, i * block:(i + 1) * block] = 1
    return cover_u @ (merged * mask) @ cover_v


def cart_rank(k: int, rank_ratio: float) -> int:
    """CART's kept rank: max(1, int(rank_ratio * k))."""
    return max(1, int(rank_ratio * k))


def cart(deltas: List[torch.Tensor], rank_ratio: float = 0.08, lambda_: float = 1.0
         ) -> torch.Tensor:
    """CART (Choi et al., "Revisiting Weight Averaging for Model Merging", 2024): the weight
    average plus lambda times the sum of the rank-k approximations of the task vectors centred
    at that average, k = max(1, int(rank_ratio * min(m, n))); returned as a task vector (the
    average's offset from the base included)."""
    deltas = [d.float() for d in deltas]
    average = _mean(deltas)
    if deltas[0].dim() != 2 or average.numel() == 0:
        return average
    rank = cart_rank(min(deltas[0].shape), rank_ratio)
    total = torch.zeros_like(average)
    for d in deltas:
        u, s, vh = torch.linalg.svd(d - average, full_matrices=False)
        total += u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank, :]
    return average + lambda_ * total


def opcm_split(s: torch.Tensor, alpha: float) -> int:
    """OPCM's split rank: the first index where the cumulative share of the singular values
    exceeds alpha (0 when none does)."""
    return int((s.cumsum(0) / s.sum() > alpha).float().argmax())


def opcm_project(previous: torch.Tensor, task: torch.Tensor, alpha: float) -> torch.Tensor:
    """OPCM's cleaning of a new task vector against the merged one (Tang et al., "Merging Models
    on the Fly Without Retraining: A Sequential Approach to Scalable Continual Model Merging",
    NeurIPS 2025), with full SVDs: in the singular bases of the previous merged task vector,
    the new task vector loses its diagonal and its block on the top `split` directions."""
    u, s, vh = torch.linalg.svd(previous.float(), full_matrices=True)
    split = opcm_split(s, alpha)
    projected = u.T @ task.float() @ vh.T
    projected.diagonal().fill_(0)
    projected[:split, :split] = 0
    return u @ projected @ vh


def opcm(base: dict, models: List[dict], alpha: float = 0.5) -> dict:
    """OPCM over models that arrive one at a time: the first model is the merged model; each
    next one is added as merged = base + (lambda_prev * (merged - base) + cleaned) / 1, with
    2-D tensors cleaned by opcm_project and every other tensor added as is, then the whole
    task vector rescaled to the running mean of the task vectors' norms (lambda_t tracks the
    scale)."""
    def norm(state):
        return float(torch.sqrt(sum(((state[k].float() - base[k].float()) ** 2).sum()
                                    for k in base)))

    merged = {k: models[0][k].float().clone() for k in base}
    norms = [norm(models[0])]
    previous_lambda = 1.0
    for model in models[1:]:
        norms.append(norm(model))
        average = sum(norms) / len(norms)
        for k, b in base.items():
            prev_tv = merged[k] - b.float()
            task_tv = model[k].float() - b.float()
            if b.dim() == 2:
                task_tv = opcm_project(prev_tv, task_tv, alpha)
            merged[k] = b.float() + previous_lambda * prev_tv + task_tv
        merged_norm = norm(merged)
        previous_lambda = merged_norm / average
        for k, b in base.items():
            merged[k] = b.float() + (merged[k] - b.float()) * (average / merged_norm)
    return merged
