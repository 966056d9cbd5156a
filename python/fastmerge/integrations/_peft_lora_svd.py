"""The SVD step of PEFT's LoraModel.add_weighted_adapter (the "svd", "ties_svd",
"dare_linear_svd", "dare_ties_svd" and "magnitude_prune_svd" combinations), PEFT 0.21.2.

PEFT forms every adapter's dense update, combines them, and runs a full
torch.linalg.svd(full_matrices=True) of the m x n result to keep new_rank triplets. Here:
* "svd" combines nothing elementwise, so the weighted sum of the updates, sum_i w_i s_i B_i A_i,
  is decomposed in factored form (ops.lowrank_svd: QR of the stacked factors and an SVD of the
  (r_1 + ... + r_T)-square core), never as an m x n matrix;
* the other *_svd combinations need the dense combined update (their pruning and sign election
  are elementwise; those steps run on fastmerge's kernels through the patched merge_utils); its
  top new_rank triplets come from the eigh of its smaller Gram matrix in float64.
Both return PEFT's (lora_A, lora_B) = (Vh_r, U_r diag(S_r)). Singular vectors are defined up to
sign (and up to rotation among equal singular values), so the factors can differ from PEFT's by
per-component signs; their product, the merged adapter's update, is the same.

PEFT's own code serves conv layers, DoRA, adapters not in float32, svd_clamp (the clamped
factors depend on the SVD's sign convention) and a new_rank above the update's smaller side.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import ops as F
from ..ops.subspace import _FP64_GRAM_MIN_RATIO, _gram_eig, _kept_ratio, _triplets_from_gram

METHOD = "_svd_generalized_task_arithmetic_weighted_adapter"


def _reason(adapters, new_rank, target, clamp, driver=None) -> Optional[str]:
    """Why PEFT's own code must serve this layer, or None."""
    from peft.tuners.lora import layer

    convolutions = tuple(getattr(layer, name) for name in ("Conv1d", "Conv2d", "Conv3d")
                         if hasattr(layer, name))
    if isinstance(target, convolutions):
        return "conv layers"
    if clamp is not None:
        return "svd_clamp (clamped factors depend on the SVD's sign convention)"
    if driver is not None:
        return "svd_driver (torch validates it, and it only applies on CUDA)"
    used = [a for a in adapters if a in target.lora_A or a in target.lora_embedding_A]
    if not used:
        return None  # PEFT raises its own error
    if any(target.use_dora.get(a, False) for a in used):
        return "DoRA adapters"
    for a in used:
        b, lora_a = _factors(target, a)
        if b.dtype != torch.float32 or lora_a.dtype != torch.float32:
            return "adapters not in float32"
    b, lora_a = _factors(target, used[0])
    if new_rank > min(b.shape[0], lora_a.shape[1]):
        return "new_rank above the update's smaller side"
    return None


def _factors(target, adapter):
    """(B, A) whose product is the update in the orientation PEFT decomposes (out x in for
    Linear, embedding_dim x num_embeddings for Embedding), without the scaling."""
    if adapter in target.lora_A:
        return target.lora_B[adapter].weight, target.lora_A[adapter].weight
    return target.lora_embedding_B[adapter], target.lora_embedding_A[adapter]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


def _top_triplets_fp64(delta: torch.Tensor, count: int):
    t, tall, eigenvalues, vectors = _gram_eig(delta, torch.float64)
    kept = min(count, int((eigenvalues > 0).sum()))
    if _kept_ratio(eigenvalues, kept) < _FP64_GRAM_MIN_RATIO:
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        return u[:, :kept].float(), s[:kept].float(), vh[:kept].float()
    return _triplets_from_gram(t, tall, eigenvalues, vectors, kept)


def accelerated(original: Callable) -> Callable:
    def svd_weighted_adapter(self, combination_type, adapters, weights, new_rank, target,
                             target_lora_A, target_lora_B, density, majority_sign_method,
                             clamp=None, full_matrices=True, driver=None):
        from .peft import _say_once  # the integration's once-per-reason warning

        def peft_own():
            return original(self, combination_type, adapters, weights, new_rank, target,
                            target_lora_A, target_lora_B, density, majority_sign_method,
                            clamp=clamp, full_matrices=full_matrices, driver=driver)

        reason = _reason(adapters, new_rank, target, clamp, driver)
        if reason is not None:
            _say_once("add_weighted_adapter SVD", reason)
            return peft_own()
        used = [(a, w) for a, w in zip(adapters, weights)
                if a in target.lora_A or a in target.lora_embedding_A]
        if not used:
            return peft_own()
        with torch.no_grad():
            if combination_type == "svd":
                lefts, rights = zip(*(_factors(target, a) for a, _ in used))
                scaled = [float(w) * target.scaling[a] for a, w in used]
                u, s, vh = F.lowrank_svd([b.detach() for b in lefts],
                                         [x.detach() for x in rights], weights=scaled)
                u, s, vh = u[:, :new_rank], s[:new_rank], vh[:new_rank]
            else:
                delta = _combined_update(combination_type, used, target, density,
                                         majority_sign_method)
                if delta is None:
                    return peft_own()
                u, s, vh = _top_triplets_fp64(delta, new_rank)
            lora_b = _pad_rows((u * s).mT, new_rank).mT.contiguous()
            lora_a = _pad_rows(vh, new_rank).contiguous()
        return lora_a, lora_b

    svd_weighted_adapter.__fastmerge_original__ = original
    svd_weighted_adapter.__name__ = METHOD
    return svd_weighted_adapter


def _combined_update(combination_type, used, target, density, majority_sign_method):
    """The dense combined update as PEFT forms it (its merge functions, patched or not, from
    peft.tuners.lora.model), in the orientation PEFT decomposes; None for a type PEFT should
    report itself."""
    from peft.tuners.lora import model as lora_model

    combine = {
        "ties_svd": lambda d, w: lora_model.ties(d, w, density, majority_sign_method),
        "dare_linear_svd": lambda d, w: lora_model.dare_linear(d, w, density),
        "dare_ties_svd": lambda d, w: lora_model.dare_ties(d, w, density, majority_sign_method),
        "magnitude_prune_svd": lambda d, w: lora_model.magnitude_prune(d, w, density),
    }.get(combination_type)
    if combine is None:
        return None
    deltas = [target.get_delta_weight(a).detach() for a, _ in used]
    weights = torch.tensor([w for _, w in used]).to(deltas[0].device)
    delta = combine(deltas, weights)
    is_embedding = any(a in target.lora_embedding_A for a, _ in used)
    if getattr(target, "fan_in_fan_out", False) or is_embedding:
        delta = delta.T
    return delta
