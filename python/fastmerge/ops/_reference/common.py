"""Shared helpers of the references: fp32 flattening, magnitude keys and priority order, the
keep count, ordered sums, and Philox4x32-10 (csrc/include/fastmerge/philox.h) with int64
arithmetic.
"""
from __future__ import annotations

from typing import List, Optional

import torch


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
    from .._validate import stream_hash  # FNV-1a of the UTF-8 name, shared with the native path

    return stream_hash(name)


def _sequential_sum(values: List[torch.Tensor], start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """v0 + v1 + ... left to right (the order of a sum over a short leading dim)."""
    total = values[0] if start is None else start + values[0]
    for v in values[1:]:
        total = total + v
    return total
