"""Pure-torch reference implementations: the test oracle, the fallback when _C is missing, and a
readable statement of what every native op computes.

Semantics are mergekit 0.1.5's merge methods computed in fp32 (inputs of any float dtype are
converted to fp32 first; the caller rounds the fp32 result once to the output dtype), with the
improvements of DESIGN.md's numerics contract:

* magnitude top-k keeps exactly k = max(1, int(density * numel)) elements, ordered by (|x|
  descending, flat index ascending), so ties go to the lowest flat indices;
* random masks come from a counter-based Philox4x32-10 stream keyed by (seed, tensor name,
  expert index), one draw per element index (bit-identical to csrc/include/fastmerge/philox.h);
* DELLA ranks |delta| along dim 1 (mergekit's argsort(dim=1)) with ties ranking the lower index
  higher, and a one-element rank group gets rank_norm 0.5.

Everything is vectorised torch and runs on any device torch supports; nothing here is tuned for
speed. Functions return fp32 tensors of the input shape (magnitude_mask returns bool).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import math

import torch

# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_NAN_KEY = 0x7FC00000  # every NaN shares one magnitude key, above +inf (0x7F800000)
_L1_EPS = 1e-7         # mergekit's rescaled_masked_tensor eps


def _f32(t: torch.Tensor) -> torch.Tensor:
    """fp32 copy of t, flattened in logical (row-major) order."""
    return t.detach().to(torch.float32).reshape(-1)


def _scalar(value: float, device) -> torch.Tensor:
    """value rounded to fp32, as a 0-d tensor on device."""
    return torch.tensor(value, dtype=torch.float32, device=device)


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys that order |x| exactly: the bit pattern of the fp32 |x| (NaNs share one key
    above +inf). Integer keys avoid any question of how a float sort orders -0.0 or NaN."""
    bits = _f32(x).abs().view(torch.int32).to(torch.int64)
    return torch.where(bits > 0x7F800000, torch.full_like(bits, _NAN_KEY), bits)


def priority_order(keys: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices sorted by (key descending, index ascending) along dim: a stable descending sort
    keeps equal keys in index order."""
    return torch.sort(keys, dim=dim, descending=True, stable=True).indices


def magnitude_keep_count(density: float, n: int) -> int:
    """mergekit's magnitude(): density >= 1 keeps all, <= 0 none, else max(1, int(density * n))."""
    if n <= 0 or density <= 0.0:
        return 0
    if density >= 1.0:
        return n
    return max(1, int(density * n))


def _priority_range_mask(flat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the elements whose priority position (0 = largest |x|, ties to lower index) lies
    in [start, stop)."""
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if stop > start:
        mask[priority_order(magnitude_keys(flat))[start:stop]] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Philox4x32-10 (csrc/include/fastmerge/philox.h) with int64 arithmetic
# ---------------------------------------------------------------------------------------------

_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mul_hi_lo(a: torch.Tensor, m: int):
    """(high 32 bits, low 32 bits) of a * m for uint32 values a (int64 tensor) and constant m,
    without overflowing int64: m is split into 16-bit halves."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    lo_part = a * m_lo                       # < 2^48
    hi_part = a * m_hi                       # < 2^48; a*m = hi_part * 2^16 + lo_part
    low = lo_part + ((hi_part & 0xFFFF) << 16)  # < 2^49
    return (hi_part >> 16) + (low >> 32), low & _MASK32


def philox4x32_10(c0, c1, c2, c3, key0: int, key1: int):
    """Ten Philox rounds on counters (int64 tensors holding uint32 values) -> four words."""
    k0, k1 = key0 & _MASK32, key1 & _MASK32
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(c0, _PHILOX_M0)
        hi1, lo1 = _mul_hi_lo(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def philox_words(n: int, seed: int, stream: int, expert: int, device=None) -> torch.Tensor:
    """The uint32 word (as int64) of every element index i < n: word i % 4 of the Philox block
    at counter (i // 4 low 32 bits, i // 4 high 32 bits, expert, stream), key (seed low 32 bits,
    seed high 32 bits)."""
    blocks = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    c0 = blocks & _MASK32
    c1 = blocks >> 32
    c2 = torch.full_like(blocks, expert & _MASK32)
    c3 = torch.full_like(blocks, stream & _MASK32)
    words = philox4x32_10(c0, c1, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)
    return torch.stack(words, dim=1).reshape(-1)[:n]


def philox_uniforms(n: int, seed: int, stream: int, expert: int, device=None) -> torch.Tensor:
    """fp32 uniforms in [0, 1): (word >> 8) * 2^-24, exactly representable."""
    return (philox_words(n, seed, stream, expert, device) >> 8).to(torch.float32) * (2.0 ** -24)


def _stream_hash(name: str) -> int:
    from ._validate import stream_hash  # FNV-1a of the UTF-8 name, shared with the native path

    return stream_hash(name)


# ---------------------------------------------------------------------------------------------
# Sparsification (mergekit.sparsify) of one flat fp32 delta
# ---------------------------------------------------------------------------------------------

def della_rank_norm(delta: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """DELLA's normalised rank of every element, flat fp32: ranks of |delta| along dim 1 of
    shape (mergekit argsorts along dim 1 after unsqueezing <2-D tensors to one row), ascending
    magnitude = ascending rank, ties ranking the lower index higher; rank_norm = (r-1)/(len-1),
    0.5 for a one-element group."""
    from .gta import della_rank_axis  # (outer, len, inner); imported late: gta imports us

    outer, length, inner = della_rank_axis(shape)
    if length <= 1:
        return torch.full((delta.numel(),), 0.5, dtype=torch.float32, device=delta.device)
    keys = magnitude_keys(delta).reshape(outer, length, inner)
    order = priority_order(keys, dim=1)  # position 0 = largest |delta| (lowest index on ties)
    position = torch.empty_like(order)
    steps = torch.arange(length, device=delta.device).reshape(1, length, 1).expand_as(order)
    position.scatter_(1, order, steps)
    rank0 = (length - 1) - position      # 0 = smallest magnitude
    # float(rank0) / float(len - 1), one fp32 division (exact ints; correctly rounded quotient)
    numerator = rank0.to(torch.float32)
    denominator = torch.full_like(numerator, float(length - 1))
    return (numerator / denominator).reshape(-1)


def sparsify(
    delta: torch.Tensor,
    *,
    method: Optional[str],
    density: float,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    rescale=False,
    seed: int = 0,
    stream: int = 0,
    expert: int = 0,
    shape: Sequence[int] = (),
    min_keep: int = 1,
) -> torch.Tensor:
    """mergekit's sparsify() in fp32 on a flat delta: the masked (and, with rescale, rescaled)
    delta. Dropped elements are +0.0 (mergekit multiplies by the mask, giving -0.0 or NaN for
    inf; only the sign of zero differs on finite data). Methods without a mask (None, density
    >= 1) return delta untouched and never rescale, as mergekit does.

    rescale: True or "l1" is mergekit's L1 rescale; "density" divides the kept values by the
    density (PEFT's prune(rescale=True)), as kept * fp32(1 / density). min_keep: magnitude
    keeps max(min_keep, int(density * n)) elements (mergekit 1, PEFT 0)."""
    n = delta.numel()
    if rescale is True:
        rescale = "l1"
    if method is None or density >= 1.0:
        return delta
    if method == "magnitude":
        k = magnitude_keep_count(density, n)
        if min_keep != 1 and 0.0 < density < 1.0:
            k = min(n, max(min_keep, int(density * n)))
        if k == 0:
            return torch.zeros_like(delta)
        keep = _priority_range_mask(delta, 0, k)
    elif method == "magnitude_outliers":
        # mergekit keeps ascending-magnitude ranks [n_bot, n_bot + target_n): in priority order
        # (descending) that is positions [n - n_bot - target_n, n - n_bot).
        target_n = int(density * n) if density > 0.0 else 0
        n_top = int(gamma * n)
        n_bot = max(0, n - target_n - n_top)
        keep = _priority_range_mask(delta, n - n_bot - target_n, n - n_bot)
    elif method == "random":
        if density <= 0.0:
            return torch.zeros_like(delta)
        u = philox_uniforms(n, seed, stream, expert, delta.device)
        keep = u < _scalar(density, delta.device)
    elif method == "della_magprune":
        if density <= 0.0:
            return torch.zeros_like(delta)
        if not (density + epsilon < 1.0 and density - epsilon > 0.0):
            raise ValueError(
                f"della: density +/- epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}"
            )
        rank_norm = della_rank_norm(delta, shape)
        # prob = float32(d - eps) + (rank_norm * 2) * float32(eps), each step rounded to fp32
        prob_base = _scalar(density - epsilon, delta.device)
        prob_span = _scalar(epsilon, delta.device)
        prob = prob_base + (rank_norm * 2.0) * prob_span
        u = philox_uniforms(n, seed, stream, expert, delta.device)
        keep = u < prob
    else:
        raise ValueError(f"unknown sparsification {method!r}")

    zero = torch.zeros_like(delta)
    masked = torch.where(keep, delta, zero)
    if rescale == "density":
        return torch.where(keep, delta * _scalar(1.0 / density, delta.device), zero)
    if rescale:
        # mergekit's rescaled_masked_tensor with the L1 norm, fp32 sums. The factor applies to
        # the kept elements only: dropped ones stay exactly 0 even when the factor is NaN
        # (NaN or inf in the delta), where mergekit's masked * factor would spread the NaN.
        before = delta.abs().sum()
        after = masked.abs().sum()
        eps = _scalar(_L1_EPS, delta.device)
        if not bool(before < eps) and not bool(after < eps):
            masked = torch.where(keep, delta * (before / after), zero)
    return masked


# ---------------------------------------------------------------------------------------------
# Combination (mergekit's GeneralizedTaskArithmeticMerge.merge_group in fp32)
# ---------------------------------------------------------------------------------------------

def _sequential_sum(values: List[torch.Tensor], start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """v0 + v1 + ... left to right (the order of a sum over a short leading dim)."""
    total = values[0] if start is None else start + values[0]
    for v in values[1:]:
        total = total + v
    return total


def combine(
    contributions: List[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: Optional[str],
    normalize,
    lambda_: float,
    electors: Optional[List[torch.Tensor]] = None,
) -> torch.Tensor:
    """Merged delta from the weighted, sparsified deltas v_t = sparsify(delta_t) * w_t.

    normalize: True or "weights" divides by the (agreeing) weights' sum, "count" by the number
    of (agreeing) experts (PEFT's disjoint_merge). electors: what the sign election votes and
    agrees on (PEFT: the unweighted s_t); default the contributions themselves (mergekit)."""
    device = contributions[0].device
    zero = torch.zeros_like(contributions[0])
    if normalize is True:
        normalize = "weights"
    if consensus is None:
        mixed = _sequential_sum(contributions)
        if normalize == "count":
            mixed = mixed / _scalar(float(len(contributions)), device)
        elif normalize:
            divisor = _scalar(0.0, device)
            for w in weights:  # fp32 sum of the weights
                divisor = divisor + _scalar(w, device)
            if bool(divisor.abs() < 1e-8):
                divisor = _scalar(1.0, device)
            mixed = mixed / divisor
    else:
        # TIES sign election (mergekit get_mask): majority sign of the summed deltas ("sum") or
        # of the summed signs ("count"); ties (vote == 0) elect +. Zeros never agree.
        electors = contributions if electors is None else electors
        if consensus == "sum":
            vote = _sequential_sum(electors)
        elif consensus == "count":
            vote = _sequential_sum([torch.sign(v) for v in electors])
        else:
            raise ValueError(f"unknown consensus {consensus!r}")
        positive = vote >= 0
        agree = [torch.where(positive, e > 0, e < 0) for e in electors]
        mixed = _sequential_sum([torch.where(a, v, zero) for a, v in zip(agree, contributions)],
                                start=zero)
        shares = [1.0] * len(weights) if normalize == "count" else weights
        divisor = _sequential_sum(
            [torch.where(a, _scalar(w, device), zero) for a, w in zip(agree, shares)],
            start=zero)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        if normalize:
            mixed = mixed / divisor
    if lambda_ != 1.0:
        mixed = mixed * _scalar(lambda_, device)
    return mixed


def generalized_task_arithmetic(
    base: Optional[torch.Tensor],
    experts: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    epsilons: Sequence[float],
    sparsification: Optional[str],
    consensus: Optional[str],
    rescale: bool,
    normalize: bool,
    lambda_: float,
    seed: int,
    name: str,
    sign_from: str = "weighted",
    min_keep: int = 1,
) -> torch.Tensor:
    """base + lambda * combine(sparsify(expert_t - base) * weight_t), fp32, base's shape.
    base=None: the deltas are the experts themselves and nothing is added back.
    sign_from="unweighted": the sign election votes and agrees on sparsify(delta_t) (PEFT)."""
    reference = base if base is not None else experts[0]
    shape = tuple(reference.shape)
    b = _f32(base) if base is not None else None
    stream = _stream_hash(name)
    contributions, sparse = [], []
    for t, expert in enumerate(experts):
        delta = _f32(expert).to(reference.device)
        if b is not None:
            delta = delta - b
        kept = sparsify(delta, method=sparsification, density=densities[t], gamma=gammas[t],
                        epsilon=epsilons[t], rescale=rescale, seed=seed, stream=stream,
                        expert=t, shape=shape, min_keep=min_keep)
        sparse.append(kept)
        contributions.append(kept * _scalar(weights[t], kept.device))
    if sign_from not in ("weighted", "unweighted"):
        raise ValueError(f"unknown sign_from {sign_from!r}")
    mixed = combine(contributions, weights, consensus=consensus, normalize=normalize,
                    lambda_=lambda_, electors=sparse if sign_from == "unweighted" else None)
    out = b + mixed if b is not None else mixed
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------

def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask (x's shape) of the k = max(1, int(density * numel)) largest |x|; all for
    density >= 1, none for density <= 0; equal magnitudes go to the lowest flat indices."""
    flat = _f32(x)
    k = magnitude_keep_count(density, flat.numel())
    return _priority_range_mask(flat, 0, k).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Interpolation
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Consensus merges (csrc/ops/consensus): ram, ramplus_tl, sce, arcee_fusion
# ---------------------------------------------------------------------------------------------

def _ram_terms(base: torch.Tensor, experts: Sequence[torch.Tensor], epsilon: float):
    """fp32 base, deltas, nonzero masks and contributor counts of mergekit's RAM methods."""
    b = _f32(base)
    deltas = [_f32(e).to(b.device) - b for e in experts]
    nonzero = [d.abs() > epsilon for d in deltas]
    count = torch.zeros_like(b, dtype=torch.int64)
    for nz in nonzero:
        count = count + nz.to(torch.int64)
    return b, deltas, nonzero, count


def _ram_merge(base, experts, epsilon, lambdas) -> torch.Tensor:
    b, deltas, nonzero, count = _ram_terms(base, experts, epsilon)
    unique = (count == 1).to(torch.float32)
    overlap = (count > 1).to(torch.float32)
    divisor = count.clamp(min=1).to(torch.float32)
    terms = []
    for d, nz, lam in zip(deltas, nonzero, lambdas):
        tvz = d * nz.to(torch.float32)
        terms.append((tvz * unique) * lam + (tvz * overlap) / divisor)
    merged = _sequential_sum(terms, torch.zeros_like(b))
    return (b + merged).reshape(base.shape)


def ram(base: torch.Tensor, experts: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """mergekit's ram: nz_i = |d_i| > epsilon, c = sum_i nz_i; elements only one expert changes
    take its delta, elements several change take the mean of their deltas."""
    return _ram_merge(base, experts, epsilon, [_scalar(1.0, base.device)] * len(experts))


def ramplus_tl_lambdas(base, experts, r: float, alpha: float, epsilon: float) -> List[torch.Tensor]:
    """Per-expert factors lambda_i = 1 + r * clamp(shared_i / max(unique_i, eps), 0, alpha) (fp32)."""
    _, _, nonzero, count = _ram_terms(base, experts, epsilon)
    out = []
    for nz in nonzero:
        shared = (nz & (count > 1)).sum().to(torch.float32)
        unique = (nz & (count == 1)).sum().to(torch.float32)
        rho = shared / unique.clamp(min=_scalar(epsilon, unique.device))
        rho = rho.clamp(min=0.0).minimum(_scalar(alpha, rho.device))
        out.append(1.0 + _scalar(r, rho.device) * rho)
    return out


def ramplus_tl(base: torch.Tensor, experts: Sequence[torch.Tensor], r: float = 0.1,
               alpha: float = 0.2, epsilon: float = 1e-5) -> torch.Tensor:
    """mergekit's ramplus_tl: ram with each expert's unique deltas scaled by lambda_i."""
    return _ram_merge(base, experts, epsilon, ramplus_tl_lambdas(base, experts, r, alpha, epsilon))


def sce_keep_mask(deltas: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """sce's selection: the k = int(count_nonzero(var) * select_topk) elements of largest
    population variance across the experts (computed in fp64, ranked as fp32, ties to the lowest
    flat index); all for select_topk >= 1, none for <= 0."""
    n = deltas[0].numel()
    device = deltas[0].device
    if select_topk >= 1:
        return torch.ones(n, dtype=torch.bool, device=device)
    if select_topk <= 0:
        return torch.zeros(n, dtype=torch.bool, device=device)
    stacked = torch.stack([d.double() for d in deltas])
    mean = stacked.sum(dim=0) / len(deltas)
    var = ((stacked - mean) ** 2).sum(dim=0) / len(deltas)
    var = var.float()
    nonzero = int((var != 0).sum())
    k = int(torch.tensor(float(nonzero), dtype=torch.float32) * torch.tensor(select_topk, dtype=torch.float32))
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    if k > 0:
        mask[priority_order(magnitude_keys(var))[:k]] = True
    return mask


def sce(base: torch.Tensor, experts: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """mergekit's sce: optional variance top-k of the deltas, TIES "sum" sign election, weights
    mean(m_i^2) (fp64 sums) normalised by their sum (1/N when the sum is below 1e-6), then
    base + sum_i m_i w_i e_i / max(sum_i w_i e_i, 1e-6)."""
    b = _f32(base)
    deltas = [_f32(e).to(b.device) - b for e in experts]
    if b.numel() == 0:
        return b.reshape(base.shape)
    keep = sce_keep_mask(deltas, select_topk).to(torch.float32)
    masked = [d * keep for d in deltas]
    weights = [float((m.double() ** 2).sum() / m.numel()) for m in masked]
    weights = torch.tensor(weights, dtype=torch.float32)
    total = _sequential_sum(list(weights))
    if abs(float(total)) < 1e-6:
        weights = torch.ones_like(weights) / len(masked)
    else:
        weights = weights / total
    majority = torch.where(_sequential_sum(masked, torch.zeros_like(b)) >= 0, 1.0, -1.0)
    num, den = torch.zeros_like(b), torch.zeros_like(b)
    for m, w in zip(masked, weights.to(b.device)):
        ew = w * (torch.sign(m) == majority).to(torch.float32)
        num = num + m * ew
        den = den + ew
    return (b + num / den.clamp(min=1e-6)).reshape(base.shape)


def fusion_order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering fp32 values ascending (-0 == +0, NaN last), as csrc order_key."""
    bits = _f32(x).view(torch.int32).to(torch.int64) & _MASK32
    bits = torch.where((bits & 0x7FFFFFFF) > 0x7F800000, torch.full_like(bits, 0x7FC00000), bits)
    bits = torch.where(bits == 0x80000000, torch.zeros_like(bits), bits)
    return torch.where(bits >= 0x80000000, bits ^ _MASK32, bits | 0x80000000)


def arcee_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|p - b| * KL(P || Q) per row of the last dim, P = softmax(p) + 1e-8, Q = softmax(b) + 1e-8.
    The KL is computed in fp64 and rounded to fp32 per row (mergekit's fp32 KL of close models
    is dominated by rounding noise, ~1e-3 relative); the product is fp32."""
    b, p = base.detach().float(), other.detach().float().to(base.device)
    shape = b.shape if b.dim() else (1,)
    b, p = b.reshape(shape), p.reshape(shape)
    eps = 1e-8
    bd, pd = b.double(), p.double()
    pp = torch.exp(pd - p.amax(dim=-1, keepdim=True).double())
    pp = pp / pp.sum(dim=-1, keepdim=True) + eps
    qq = torch.exp(bd - b.amax(dim=-1, keepdim=True).double())
    qq = qq / qq.sum(dim=-1, keepdim=True) + eps
    kl = (pp * torch.log(pp / qq)).sum(dim=-1, keepdim=True).float()
    return ((p - b).abs() * kl).reshape(base.shape)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """mergekit's arcee_fusion with exact order statistics: keep other's delta where the
    importance is >= median + 1.5 (q3 - q1), the quantiles sorted[int(q (n - 1))] of all
    elements (mergekit samples 1e6 elements with replacement above 1e6)."""
    b = _f32(base)
    p = _f32(other).to(b.device)
    n = b.numel()
    if n == 0:
        return b.reshape(base.shape)
    importance = _f32(arcee_importance(base, other))
    ordered = importance[torch.sort(fusion_order_keys(importance), stable=True).indices]
    q1, median, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    threshold = median + _scalar(1.5, b.device) * (q3 - q1)
    keep = (importance >= threshold).to(torch.float32)
    return (b + (p - b) * keep).reshape(base.shape)


# ---------------------------------------------------------------------------------------------
# Sign election and disjoint merge on stacked tensors (PEFT's merge_utils, in fp32)
# ---------------------------------------------------------------------------------------------

def majority_sign_mask(stacked: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Bool mask (stacked's shape): sign(x_t) == majority, the majority +1 where the vote
    (sum_t x_t for "sum", sum_t sign(x_t) for "count", fp32 in t order) is >= 0, else -1."""
    if stacked.shape[0] == 0:
        return torch.zeros(stacked.shape, dtype=torch.bool, device=stacked.device)
    rows = [_f32(r) for r in stacked.unbind(0)]
    if method == "sum":
        vote = _sequential_sum(rows)
    elif method == "count":
        vote = _sequential_sum([torch.sign(r) for r in rows])
    else:
        raise ValueError(f"unknown method {method!r}")
    positive = vote >= 0
    return torch.stack([torch.where(positive, r > 0, r < 0) for r in rows]).reshape(stacked.shape)


def disjoint_merge(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t x_t * mask_t / max(1, sum_t mask_t), fp32 in t order, stacked.shape[1:]."""
    if stacked.shape[0] == 0:
        return torch.zeros(stacked.shape[1:], dtype=torch.float32, device=stacked.device)
    rows = [_f32(r) for r in stacked.unbind(0)]
    on = [m.reshape(-1).to(torch.float32) for m in mask.unbind(0)]
    mixed = _sequential_sum([r * m for r, m in zip(rows, on)])
    kept = _sequential_sum(on)
    return (mixed / torch.clamp(kept, min=1.0)).reshape(stacked.shape[1:])


__all__ = [
    "arcee_fusion",
    "arcee_importance",
    "combine",
    "disjoint_merge",
    "majority_sign_mask",
    "della_rank_norm",
    "generalized_task_arithmetic",
    "magnitude_keep_count",
    "magnitude_keys",
    "magnitude_mask",
    "model_stock",
    "philox4x32_10",
    "philox_uniforms",
    "philox_words",
    "priority_order",
    "ram",
    "ramplus_tl",
    "sce",
    "slerp",
    "sparsify",
]



# ---------------------------------------------------------------------------------------------
# Sphere family: nuslerp, multislerp, karcher (mergekit 0.1.5)
# ---------------------------------------------------------------------------------------------
# Each method's result is a combination of its (delta) inputs, so it is stated here as
# mergekit's formulas on the inputs' Gram matrix (fp64 sums of the fp32 values) giving
# coefficients c_j, then out = base + sum_j c_j (x_j - base) in fp32, summed in input order.

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
    from .._params import sphere_layout

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
    from .._params import MULTISLERP_ANTIPODAL
    from ..errors import InvalidArgumentError

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


__all__ += ["karcher", "multislerp", "nuslerp"]
