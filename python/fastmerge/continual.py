"""Continual merging: models that arrive one at a time (OPCM).

OPCM (Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to
Scalable Continual Model Merging", NeurIPS 2025) keeps one merged model. Each new model's task
vector is cleaned against the merged task vector's singular bases (per 2-D weight: its diagonal
and its block on the top directions, those holding an `alpha` share of the singular values, are
removed), added, and the sum rescaled to the running mean of the task vectors' norms. Memory is
the base and the merged model, whatever the number of models; ops/_reference/subspace.py states
the algorithm with full SVDs (`exact=True` runs exactly that).

The default fast mode takes the merged task vector's singular triplets from its float64 Gram
matrix (GEMM + eigh) and applies the cleaning as
    cleaned = T - U_s (U_s^T T V_s) V_s^T - sum_{i >= s} (u_i^T T v_i) u_i v_i^T,
which is what zeroing those entries of U^T T V does, without forming the full m x n bases.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch

from .errors import InvalidArgumentError
from .ops._reference.subspace import opcm_project, opcm_split
from .ops._validate import check_decomposable, check_scalar, check_tensor
from .ops.subspace import _gram_eig, _kept_ratio, _triplets_from_gram

# The cleaning needs every singular triplet of the merged task vector, so the Gram route is
# taken only while the smallest kept eigenvalue stays above this share of the largest.
_GRAM_MIN_RATIO = 1e-12


def _is_matrix(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2


def _clean(previous: torch.Tensor, task: torch.Tensor, alpha: float) -> torch.Tensor:
    """opcm_project without the full m x n singular bases."""
    k = min(previous.shape)
    t, tall, eigenvalues, vectors = _gram_eig(previous)
    if _kept_ratio(eigenvalues, k) < _GRAM_MIN_RATIO:
        return opcm_project(previous, task, alpha)  # rank-deficient: full SVD
    u, s, vh = _triplets_from_gram(t, tall, eigenvalues, vectors, k)
    split = opcm_split(s, alpha)
    v = vh.mT
    cleaned = task - u[:, :split] @ ((u[:, :split].mT @ task @ v[:, :split]) @ vh[:split])
    rest_u, rest_v = u[:, split:], v[:, split:]
    diagonal = ((rest_u.mT @ task) * rest_v.mT).sum(1)  # u_i^T T v_i for i >= split
    return cleaned - (rest_u * diagonal) @ rest_v.mT


def _global_norm(tensors) -> float:
    """The L2 norm over all the tensors, which may sit on different devices (a model spread
    over several GPUs): each tensor's fp32 sum of squares, added on the CPU."""
    return float(torch.sqrt(sum((t ** 2).sum().cpu() for t in tensors)))


class ContinualMerger:
    """OPCM continual merging of models given one at a time as state dicts of tensors.

    >>> merger = ContinualMerger(base_state, alpha=0.5)
    >>> for state in finetuned_states:   # any number, one in memory at a time
    ...     merger.add(state)
    >>> merged = merger.state_dict()

    `is_matrix(name, tensor)` decides which tensors get the SVD cleaning (default: every 2-D
    tensor; FusionBench applies it to nn.Linear weights only, so pass a predicate that excludes
    embeddings to match it). Tensors are merged in fp32 on their device; `state_dict()` returns
    them in the base's dtypes. Integer and bool tensors (step counters, index buffers) are not
    merged but carried over from the base, as `fastmerge run` copies them.
    """

    def __init__(self, base: Mapping[str, torch.Tensor], *, alpha: float = 0.5,
                 exact: bool = False,
                 is_matrix: Optional[Callable[[str, torch.Tensor], bool]] = None):
        alpha = check_scalar(alpha, "alpha")
        if not 0.0 <= alpha <= 1.0:
            raise InvalidArgumentError(f"alpha must be in [0, 1], got {alpha}")
        if not isinstance(exact, bool):
            raise InvalidArgumentError(f"exact must be a bool, got {exact!r}")
        if not base:
            raise InvalidArgumentError("base must hold at least one tensor")
        self.alpha = alpha
        self.exact = exact
        self._is_matrix = is_matrix or _is_matrix
        if not isinstance(base, Mapping):
            raise InvalidArgumentError(f"base must be a state dict (name -> tensor), got "
                                       f"{type(base).__name__}")
        self._buffers = {k: v.detach() for k, v in base.items()
                         if isinstance(v, torch.Tensor) and not v.is_floating_point()
                         and not v.is_complex()}
        self._base = {k: check_tensor(v, f"base[{k!r}]").detach() for k, v in base.items()
                      if k not in self._buffers}
        if not self._base:
            raise InvalidArgumentError("base holds no floating-point tensor to merge")
        self._order = list(base.keys())
        self._merged: Optional[Dict[str, torch.Tensor]] = None   # fp32 merged weights
        self._norms = []
        self._lambda = 1.0
        self.count = 0

    def _task_vector(self, name: str, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if name not in state:
            raise InvalidArgumentError(f"model {self.count} has no tensor {name!r}")
        x = check_tensor(state[name], f"model {self.count}[{name!r}]")
        if x.shape != self._base[name].shape:
            raise InvalidArgumentError(f"model {self.count}[{name!r}] has shape {tuple(x.shape)}, "
                                       f"base has {tuple(self._base[name].shape)}")
        if self._is_matrix(name, self._base[name]):  # decomposed when the next model comes
            check_decomposable(x, f"model {self.count}[{name!r}]")
        # A model loaded on the CPU for a base on the GPU (one at a time, as they arrive)
        # merges on the base tensor's device.
        return x.detach().to(self._base[name].device).float() - self._base[name].float()

    def _merged_norm(self) -> float:
        return _global_norm(m - self._base[k].float() for k, m in self._merged.items())

    def add(self, state: Mapping[str, torch.Tensor]) -> None:
        """Merges one more fine-tuned model (a state dict with the base's tensor names)."""
        if not isinstance(state, Mapping):
            raise InvalidArgumentError(f"model {self.count} must be a state dict (name -> "
                                       f"tensor), got {type(state).__name__}")
        with torch.no_grad():
            deltas = {k: self._task_vector(k, state) for k in self._base}
            self._norms.append(_global_norm(deltas.values()))
            if self._merged is None:
                self._merged = {k: self._base[k].float() + d for k, d in deltas.items()}
                self.count = 1
                return
            average = sum(self._norms) / len(self._norms)
            for k, task in deltas.items():
                base = self._base[k].float()
                previous = self._merged[k] - base
                if self._is_matrix(k, self._base[k]):
                    task = (opcm_project(previous, task, self.alpha) if self.exact
                            else _clean(previous, task, self.alpha))
                self._merged[k] = base + self._lambda * previous + task
            norm = self._merged_norm()
            scale = average / norm if norm > 0 else 1.0
            self._lambda = norm / average if average > 0 else 1.0
            for k, m in self._merged.items():
                base = self._base[k].float()
                self._merged[k] = base + (m - base) * scale
            self.count += 1

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The merged model, in the base's dtypes."""
        if self._merged is None:
            raise InvalidArgumentError("no model has been added yet")
        return {k: (self._buffers[k].clone() if k in self._buffers
                    else self._merged[k].to(self._base[k].dtype)) for k in self._order}
