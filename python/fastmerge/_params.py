"""Argument checks and the argument list of the merge kernels, without torch: shared by the
public ops (fastmerge.ops) and the streaming path of `fastmerge run`, which must not import
torch on the CPU."""
from __future__ import annotations

import math
from numbers import Real
from typing import List, Optional, Sequence

from .errors import InvalidArgumentError

SPARSIFICATION = {None: 0, "magnitude": 1, "random": 2, "magnitude_outliers": 3, "della_magprune": 4}
CONSENSUS = {None: 0, "sum": 1, "count": 2}
RESCALE = {False: 0, "l1": 1, "density": 2}  # True means "l1" (mergekit's rescale)
NORMALIZE = {False: 0, "weights": 1, "count": 2}  # True means "weights" (mergekit's normalize)
SIGN_FROM = ("weighted", "unweighted")


def _mode(value, table: dict, name: str, alias_true: str):
    """A truth value or one of the table's strings -> the canonical key (False or a string)."""
    if isinstance(value, str):
        if value in table:
            return value
        choices = ", ".join(repr(k) for k in table if k)
        raise InvalidArgumentError(f"{name} must be True, False, {choices}; got {value!r}")
    try:
        truth = bool(value)
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of several values
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r:.100}") from None
    return alias_true if truth else False


def della_rank_axis(shape: Sequence[int]):
    """(outer, len, inner) of mergekit's DELLA ranking: argsort along dim 1 after <2-D tensors
    are unsqueezed to one row (0-d tensors count as one element)."""
    shape = list(shape)
    if len(shape) == 0:
        return 1, 1, 1
    if len(shape) == 1:
        return 1, shape[0], 1
    inner = 1
    for s in shape[2:]:
        inner *= s
    return shape[0], shape[1], inner



def _as_python_scalar(value):
    """A 0-d torch tensor or numpy array as the number it holds (what `t=torch.tensor(0.5)` or
    a value read with numpy means); anything else as given."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and \
            not isinstance(value, (bool, Real)):
        return value.item()
    return value


def per_expert(value, count: int, name: str, *, low: Optional[float] = None,
               high: Optional[float] = None) -> List[float]:
    """A float or one value per expert -> list of finite floats within [low, high]."""
    value = _as_python_scalar(value)
    if hasattr(value, "detach") and hasattr(value, "reshape"):  # a torch tensor
        value = value.detach().cpu().reshape(-1).tolist()
        if len(value) == 1:
            value = value[0]
    if isinstance(value, Real) and not isinstance(value, bool):
        values = [float(value)] * count
        given_once = True  # a bad value is named as given, not as weight[0]
    else:
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError(name)
            values = [float(v) for v in value]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{name} must be a float or one float per expert, got {value!r}") from None
        if len(values) != count:
            raise InvalidArgumentError(f"{name} has {len(values)} values for {count} experts: {values}")
        given_once = count == 1
    for i, v in enumerate(values):
        label = name if given_once else f"{name}[{i}]"
        if not math.isfinite(v):
            raise InvalidArgumentError(f"{label} must be finite, got {v}")
        if low is not None and v < low or high is not None and v > high:
            raise InvalidArgumentError(f"{label} must lie in [{low}, {high}], got {v}")
    return values


def check_scalar(value, name: str, *, low: Optional[float] = None, high: Optional[float] = None) -> float:
    value = _as_python_scalar(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidArgumentError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise InvalidArgumentError(f"{name} must be finite, got {v}")
    if low is not None and v < low or high is not None and v > high:
        raise InvalidArgumentError(f"{name} must lie in [{low}, {high}], got {v}")
    return v


def stream_hash(name: str) -> int:
    """32-bit FNV-1a of the tensor name's UTF-8 bytes: the Philox stream of random masks."""
    h = 0x811C9DC5
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InvalidArgumentError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return seed


# ---- hand-off to the kernels ----


def gta_arguments(count: int, shape: Sequence[int], *, weight, density=1.0,
                  sparsification: Optional[str] = None, consensus: Optional[str] = None,
                  rescale=False, normalize=False, lambda_: float = 1.0,
                  gamma=0.01, epsilon=0.15, seed: int = 0, name: str = "",
                  sign_from: str = "weighted", min_keep: int = 1) -> dict:
    """Checks the parameters of a merge of `count` experts of this shape; returns them as the
    reference implementation takes them (keys) plus `kernel`: the tuple _C.gta_merge takes
    after the tensors. rescale: False, True/"l1" (mergekit) or "density" (PEFT); normalize:
    False, True/"weights" (mergekit) or "count" (PEFT); sign_from: "weighted" (mergekit) or
    "unweighted" (PEFT); min_keep: magnitude top-k floor (mergekit 1, PEFT 0)."""
    if not (sparsification is None or isinstance(sparsification, str)) or \
            sparsification not in SPARSIFICATION:
        raise InvalidArgumentError(
            f"sparsification must be one of {sorted(k for k in SPARSIFICATION if k)} or None, "
            f"got {sparsification!r}")
    if not (consensus is None or isinstance(consensus, str)) or consensus not in CONSENSUS:
        raise InvalidArgumentError(f"consensus must be 'sum', 'count' or None, got {consensus!r}")
    weights = per_expert(weight, count, "weight")
    densities = per_expert(density, count, "density", low=0.0, high=1.0)
    gammas = per_expert(gamma, count, "gamma", low=0.0, high=1.0)
    epsilons = per_expert(epsilon, count, "epsilon", low=0.0, high=1.0)
    if sparsification == "della_magprune":
        for i, (d, e) in enumerate(zip(densities, epsilons)):
            if 0.0 < d < 1.0 and not (d + e < 1.0 and d - e > 0.0):
                raise InvalidArgumentError(
                    f"della needs density +/- epsilon inside (0, 1): expert {i} has "
                    f"density={d}, epsilon={e}")
    rescale = _mode(rescale, RESCALE, "rescale", "l1")
    normalize = _mode(normalize, NORMALIZE, "normalize", "weights")
    if sign_from not in SIGN_FROM:
        raise InvalidArgumentError(f"sign_from must be 'weighted' or 'unweighted', got {sign_from!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise InvalidArgumentError(f"min_keep must be an integer >= 0, got {min_keep!r}")
    lam = check_scalar(lambda_, "lambda_")
    seed = check_seed(seed)
    if not isinstance(name, str):
        raise InvalidArgumentError(f"name must be a string, got {name!r}")
    outer, length, inner = della_rank_axis(shape)
    kernel = (SPARSIFICATION[sparsification], CONSENSUS[consensus], RESCALE[rescale],
              bool(normalize), lam, seed, stream_hash(name), weights, densities, gammas,
              epsilons, outer, length, inner, normalize == "count", sign_from == "unweighted",
              min_keep)
    return dict(weights=weights, densities=densities, gammas=gammas, epsilons=epsilons,
                sparsification=sparsification, consensus=consensus, rescale=rescale,
                normalize=normalize, lambda_=lam, seed=seed, name=name, sign_from=sign_from,
                min_keep=min_keep, kernel=kernel)


def model_stock_rows(shape: Sequence[int], filter_wise: bool) -> int:
    """Rows the kernel reduces over: the last dim per row when filter_wise (a 1-D tensor is one
    row), otherwise one flat row."""
    if filter_wise and len(shape) >= 2 and shape[-1]:
        return math.prod(shape) // shape[-1]
    return 1


# ---- sphere family (nuslerp, multislerp, karcher) ----

MULTISLERP_ANTIPODAL = (
    "multislerp: the weighted sum of the input tensors is zero. This occurs when antipodal "
    "vectors or sets of vectors have weights that exactly balance out (e.g., vectors a,-a with "
    "equal weights). Try using different weights if you have antipodal vectors.")


def sphere_layout(shape: Sequence[int], dim=-1, flatten: bool = False):
    """(outer, len, inner) of the vectors nuslerp normalises: one vector of every element when
    flatten, else the vectors along dim (vector (o, i) holds elements o*len*inner + l*inner + i).
    A 0-d tensor is one vector of one element (dim 0 or -1), as in mergekit."""
    if not isinstance(flatten, bool):
        raise InvalidArgumentError(f"flatten must be a bool, got {flatten!r}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise InvalidArgumentError(f"dim must be an int, got {dim!r}")
    shape = [int(s) for s in shape]
    ndim = max(len(shape), 1)
    if not flatten and not -ndim <= dim < ndim:
        raise InvalidArgumentError(f"dim {dim} is out of range for a tensor of shape {tuple(shape)}")
    if flatten or not shape:
        return 1, math.prod(shape), 1
    d = dim % ndim
    return math.prod(shape[:d]), shape[d], math.prod(shape[d + 1:])


def nuslerp_t(weights: Sequence[float]) -> float:
    """mergekit's nuslerp interpolation factor: weights[1] / sum (0.5 when |sum| < 1e-6)."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def sphere_arguments(count: int, *, weights=None, normalize_weights=None, alphas=None, eps=None,
                     max_iter=None, tol=None):
    """Checked arguments of multislerp (weights, normalize_weights, eps) and karcher (alphas,
    max_iter, tol)."""
    out = {}
    if weights is not None:
        out["weights"] = per_expert(weights, count, "weights")
        if normalize_weights and sum(out["weights"]) == 0:
            raise InvalidArgumentError(
                f"multislerp: the weights {out['weights']} sum to zero and normalize_weights "
                "divides by their sum")
    if normalize_weights is not None and not isinstance(normalize_weights, bool):
        raise InvalidArgumentError(f"normalize_weights must be a bool, got {normalize_weights!r}")
    if alphas is not None:
        out["alphas"] = per_expert(alphas, count, "alphas")
    if eps is not None:
        out["eps"] = check_scalar(eps, "eps", low=0.0)
    if tol is not None:
        out["tol"] = check_scalar(tol, "tol", low=0.0)
    if max_iter is not None:
        if isinstance(max_iter, bool) or not isinstance(max_iter, int):
            raise InvalidArgumentError(f"max_iter must be an int, got {max_iter!r}")
        out["max_iter"] = min(max(max_iter, 0), 2**31 - 1)  # range(max_iter), as mergekit
    return out
