"""Token merging (csrc/ops/tome): ToMe's bipartite soft matching without the similarity matrix.

`tome_match` finds every a-token's most similar b-token by streaming over the b-tokens (O(N)
extra memory instead of the N^2/4 score matrix), selects the r best edges and returns the
index maps; `tome_merge` is ToMe's size-weighted merge (merge_wavg) as an ordered per-token
reduction (no float atomics, results independent of the thread count), `tome_unmerge` and
`tome_merge_source` complete the set. All four are torch custom ops (`fastmerge::tome_*`) with
fake implementations, so models using them compile with torch.compile.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .. import _native
from ..errors import InvalidArgumentError
from . import _reference
from ._validate import capsule, check_tensor, cuda_stream, kernel_input, use_native

_I64 = torch.int64


class TomeMaps(NamedTuple):
    """Index maps of one ToMe match over [B, N] tokens (a = even tokens, b = odd tokens).

    unm_idx [B, na - r], src_idx [B, r], dst_idx [B, r]: ToMe's maps (a-/b-local indices):
    kept a-tokens (ascending with a class token, else in edge order), merged a-tokens in edge
    order, and their destination b-tokens. offsets [B, N' + 1] / members [B, N]: the tokens of
    each of the N' = N - r output rows (kept token first, then its sources in edge order: the
    summation order of the merge); dest [B, N]: the output row holding every token.
    """
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    offsets: torch.Tensor
    members: torch.Tensor
    dest: torch.Tensor
    r: int
    tokens: int
    class_token: bool
    distill_token: bool

    @property
    def merged_tokens(self) -> int:
        return self.tokens - self.r


# ---- maps from row maxima (the CUDA path and the fallback; the CPU kernel builds them in C++) ----

def _order_key(v: torch.Tensor) -> torch.Tensor:
    """int64 key in [0, 2^32) ordering floats (-0 == +0, NaN above +inf): tome_order_key."""
    u = (v.float() + 0.0).view(torch.int32).to(_I64) & 0xFFFFFFFF
    key = torch.where(u >= 0x80000000, (~u) & 0xFFFFFFFF, u | 0x80000000)
    return torch.where(torch.isnan(v), torch.full_like(key, 0xFFFFFFFF), key)


def _dst_rows(j: torch.Tensor, n_unm: int, distill_token: bool) -> torch.Tensor:
    if distill_token:
        return torch.where(j == 0, torch.ones_like(j), j + n_unm)
    return j + n_unm


def maps_from_scores(node_max: torch.Tensor, node_idx: torch.Tensor, r: int, tokens: int,
                     class_token: bool, distill_token: bool) -> TomeMaps:
    """The maps from every a-token's best similarity and b-token, with sorts of unique
    composite keys (similarity descending, then a index ascending): deterministic anywhere."""
    B, na = node_max.shape
    nb, n_unm, dev = tokens // 2, na - r, node_max.device
    a_index = torch.arange(na, device=dev)
    edge_key = (_order_key(node_max) - 2**31) * 2**32 + (2**32 - 1 - a_index)
    order = torch.argsort(edge_key, dim=1, descending=True)
    # Own, contiguous storage: the custom op may not return views of one tensor (it refuses
    # aliasing outputs), and its fake implementation promises contiguous strides.
    src = order[:, :r].clone()
    dst = node_idx.to(_I64).gather(1, src)
    unm = order[:, r:].contiguous()
    if class_token:
        unm = unm.sort(dim=1).values
    unm_rows = torch.arange(n_unm, device=dev)
    if distill_token:
        unm_rows = torch.where(unm_rows > 0, unm_rows + 1, unm_rows)
    dest = torch.empty(B, tokens, dtype=_I64, device=dev)
    dest[:, 1::2] = _dst_rows(torch.arange(nb, device=dev), n_unm, distill_token)
    dest.scatter_(1, 2 * unm, unm_rows.expand(B, n_unm))
    src_rows = _dst_rows(dst, n_unm, distill_token)
    dest.scatter_(1, 2 * src, src_rows)
    # Members sorted by (row, 0 for the kept token / 1 + edge rank for a source).
    rank = torch.zeros(B, tokens, dtype=_I64, device=dev)
    rank.scatter_(1, 2 * src, torch.arange(1, r + 1, device=dev).expand(B, r))
    members = torch.argsort(dest * (r + 1) + rank, dim=1)
    # Row boundaries in the sorted rows (no atomics, also under deterministic algorithms).
    sorted_rows = dest.gather(1, members)
    bounds = torch.arange(tokens - r + 1, device=dev).expand(B, tokens - r + 1).contiguous()
    offsets = torch.searchsorted(sorted_rows, bounds)
    return TomeMaps(unm, src, dst, offsets, members, dest, r, tokens, class_token, distill_token)


def _reference_scores(metric: torch.Tensor, class_token: bool, distill_token: bool):
    scores = _reference.tome_scores(metric, class_token, distill_token)
    best = scores.max(dim=-1).values
    idx = (scores == best[..., None]).to(torch.uint8).argmax(dim=-1)  # first maximum
    return best, idx


# ---- custom ops ----

def _match_shapes(metric: torch.Tensor, r: int):
    B, N, _ = metric.shape
    na = (N + 1) // 2
    return [(B, na - r), (B, r), (B, r), (B, N - r + 1), (B, N), (B, N)]


@torch.library.custom_op("fastmerge::tome_match", mutates_args=())
def _tome_match_op(metric: torch.Tensor, r: int, class_token: bool, distill_token: bool
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor, torch.Tensor]:
    B, N, _ = metric.shape
    if not use_native(metric.device):
        best, idx = _reference_scores(metric, class_token, distill_token)
        return tuple(maps_from_scores(best, idx, r, N, class_token, distill_token)[:6])
    m = kernel_input(metric)
    if m.device.type == "cuda":
        na = (N + 1) // 2
        normed = torch.empty(m.shape, dtype=torch.float32, device=m.device)
        best = torch.empty(B, na, dtype=torch.float32, device=m.device)
        idx = torch.empty(B, na, dtype=_I64, device=m.device)
        if B and N:
            _native.native().tome_scores(capsule(m), class_token, distill_token, capsule(normed),
                                         capsule(best), capsule(idx), cuda_stream(m.device))
        return tuple(maps_from_scores(best, idx, r, N, class_token, distill_token)[:6])
    outs = [torch.empty(s, dtype=_I64) for s in _match_shapes(m, r)]
    if B and N:
        _native.native().tome_match(capsule(m), r, class_token, distill_token,
                                    *[capsule(t) for t in outs])
    return tuple(outs)


@_tome_match_op.register_fake
def _(metric, r, class_token, distill_token):
    return tuple(metric.new_empty(s, dtype=_I64) for s in _match_shapes(metric, r))


def _size_dtype(x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.dtype:
    """Merged sizes keep size's dtype (x's without sizes); float64 is computed as float32."""
    dtype = size.dtype if size is not None else x.dtype
    return torch.float32 if dtype == torch.float64 else dtype


def _merge_native(x: torch.Tensor, size: Optional[torch.Tensor], offsets, members, amax: bool):
    B, _, C = x.shape
    rows = offsets.shape[1] - 1
    xin = kernel_input(x)
    out = torch.empty(B, rows, C, dtype=xin.dtype, device=x.device)
    size_out = None
    if not amax:
        size_out = torch.empty(B, rows, 1, dtype=_size_dtype(x, size), device=x.device)
    if B and rows:
        _native.native().tome_merge(
            capsule(xin), capsule(kernel_input(size)) if size is not None else None,
            capsule(offsets.contiguous()), capsule(members.contiguous()), capsule(out),
            capsule(size_out) if size_out is not None else None, amax, cuda_stream(x.device))
    return out, size_out


def _merge_fallback(x, size, offsets, members, dest, amax: bool):
    """Same reduction with torch ops (no _C for this device)."""
    B, N, C = x.shape
    rows = offsets.shape[1] - 1
    xf = x.float()
    idx = dest[..., None].expand(B, N, C)
    if amax:
        out = torch.full((B, rows, C), -float("inf"), device=x.device)
        return out.scatter_reduce(1, idx, xf, reduce="amax"), None
    w = torch.ones(B, N, 1, device=x.device) if size is None else size.float()
    acc = torch.zeros(B, rows, C, device=x.device).scatter_add(1, idx, xf * w)
    total = torch.zeros(B, rows, 1, device=x.device).scatter_add(1, dest[..., None], w)
    out_dtype = torch.float32 if x.dtype == torch.float64 else x.dtype
    return (acc / total).to(out_dtype), total.to(_size_dtype(x, size))


@torch.library.custom_op("fastmerge::tome_merge", mutates_args=())
def _tome_merge_op(x: torch.Tensor, size: Optional[torch.Tensor], offsets: torch.Tensor,
                   members: torch.Tensor, dest: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if not use_native(x.device):
        return _merge_fallback(x, size, offsets, members, dest, amax=False)
    return _merge_native(x, size, offsets, members, amax=False)


@_tome_merge_op.register_fake
def _(x, size, offsets, members, dest):
    B, _, C = x.shape
    rows = offsets.shape[1] - 1
    out_dtype = torch.float32 if x.dtype == torch.float64 else x.dtype
    return (x.new_empty((B, rows, C), dtype=out_dtype),
            x.new_empty((B, rows, 1), dtype=_size_dtype(x, size)))


def _merge_setup_context(ctx, inputs, output):
    x, size, offsets, members, dest = inputs
    ctx.save_for_backward(size, dest, output[1])
    ctx.x_dtype = x.dtype


def _merge_backward(ctx, grad_out, grad_size):
    # out[o] = sum_t x[t] w_t / W_o  =>  dx[t] = dout[dest[t]] * w_t / W_dest[t]; sizes are
    # token counts (no gradient), as in ToMe.
    size, dest, size_out = ctx.saved_tensors
    B, N = dest.shape
    g = (grad_out.float() / size_out.float()).gather(1, dest[..., None].expand(B, N, grad_out.shape[-1]))
    if size is not None:
        g = g * size.float()
    return g.to(ctx.x_dtype), None, None, None, None


_tome_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup_context)


@torch.library.custom_op("fastmerge::tome_merge_source", mutates_args=())
def _tome_merge_source_op(source: torch.Tensor, offsets: torch.Tensor, members: torch.Tensor,
                          dest: torch.Tensor) -> torch.Tensor:
    if not use_native(source.device):
        return _merge_fallback(source, None, offsets, members, dest, amax=True)[0]
    return _merge_native(source, None, offsets, members, amax=True)[0]


@_tome_merge_source_op.register_fake
def _(source, offsets, members, dest):
    B, _, C = source.shape
    out_dtype = torch.float32 if source.dtype == torch.float64 else source.dtype
    return source.new_empty((B, offsets.shape[1] - 1, C), dtype=out_dtype)


# ---- public ops ----

def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a bool, got {value!r}")
    return value


def _identity_maps(B: int, N: int, device, class_token: bool, distill_token: bool) -> TomeMaps:
    na = (N + 1) // 2
    ar = torch.arange(N, device=device)
    empty = torch.empty(B, 0, dtype=_I64, device=device)
    return TomeMaps(torch.arange(na, device=device).expand(B, na).clone(), empty, empty.clone(),
                    torch.arange(N + 1, device=device).expand(B, N + 1).clone(),
                    ar.expand(B, N).clone(), ar.expand(B, N).clone(), 0, N, class_token,
                    distill_token)


def tome_match(metric: torch.Tensor, r: int, *, class_token: bool = False,
               distill_token: bool = False) -> TomeMaps:
    """ToMe's bipartite soft matching of metric [B, N, C] (fp32/fp16/bf16, computed in fp32).

    Tokens split alternately into a (even) and b (odd) after L2 normalisation; every a-token's
    best b-token is found by streaming over b (the similarity matrix is never stored); the r
    edges of highest similarity merge their a-token into its b-token. r is clamped to
    (N - protected) // 2 (protected: the class token, a-token 0, never merges; the distill
    token, b-token 0, never receives), r <= 0 matches nothing (identity maps, as ToMe).

    Deterministic tie-break: the lowest b index wins a row maximum; edges are ordered by
    similarity descending, then a index ascending; NaN similarity ranks above every number.
    Similarities are sequential fp32 dot products of the normalised tokens (on CPU screened
    with bf16 dot products where AVX512-BF16 exists, then re-scored exactly), identical on
    every device and thread count. On tie-free inputs the maps equal ToMe's.
    """
    metric = check_tensor(metric, "metric")
    if metric.dim() != 3:
        raise InvalidArgumentError(f"metric must be [B, N, C], got shape {tuple(metric.shape)}")
    if isinstance(r, bool) or not isinstance(r, int):
        raise InvalidArgumentError(f"r must be an int, got {r!r}")
    class_token = _check_flag(class_token, "class_token")
    distill_token = _check_flag(distill_token, "distill_token")
    B, N, _ = metric.shape
    r = _reference.tome_clamp_r(N, r, class_token, distill_token)
    if r == 0:
        return _identity_maps(B, N, metric.device, class_token, distill_token)
    maps = _tome_match_op(metric, r, class_token, distill_token)
    return TomeMaps(*maps, r, N, class_token, distill_token)


def _check_maps(maps) -> None:
    if not isinstance(maps, TomeMaps):
        raise InvalidArgumentError(f"maps must be the TomeMaps that tome_match returned, got "
                                   f"{type(maps).__name__}")
    for field in ("offsets", "members", "dest"):
        t = getattr(maps, field)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            raise InvalidArgumentError(f"maps.{field} must be an int64 tensor, as tome_match "
                                       f"returns it, got {getattr(t, 'dtype', type(t).__name__)}")


def _check_tokens(x: torch.Tensor, maps: TomeMaps, name: str) -> None:
    _check_maps(maps)
    if x.dim() != 3 or x.shape[0] != maps.dest.shape[0] or x.shape[1] != maps.tokens:
        raise InvalidArgumentError(
            f"{name} has shape {tuple(x.shape)}; the maps expect [{maps.dest.shape[0]}, "
            f"{maps.tokens}, C]")
    if x.device != maps.dest.device:
        raise InvalidArgumentError(f"{name} is on {x.device} but the maps are on {maps.dest.device}")


def tome_merge(x: torch.Tensor, maps: TomeMaps, size: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """ToMe's merge_wavg: x [B, N, C] -> ([B, N - r, C], size [B, N - r, 1]). Each output token
    is sum(x_t * size_t) / sum(size_t) over the tokens it holds (size None: every token 1), in
    fp32, rounded once to x's dtype; the returned size is that sum (dtype of size, else x's).
    Summed in a fixed order (kept token, then sources in edge order): no atomics."""
    x = check_tensor(x, "x")
    _check_tokens(x, maps, "x")
    if size is not None:
        size = check_tensor(size, "size")
        if size.shape != x.shape[:2] + (1,):
            raise InvalidArgumentError(
                f"size has shape {tuple(size.shape)}, expected {tuple(x.shape[:2]) + (1,)}")
        if size.device != x.device:
            raise InvalidArgumentError(f"size is on {size.device} but x is on {x.device}")
    if maps.r == 0:  # ToMe does nothing
        return x, (torch.ones_like(x[..., :1]) if size is None else size)
    return _tome_merge_op(x, size, maps.offsets, maps.members, maps.dest)


def tome_unmerge(x: torch.Tensor, maps: TomeMaps) -> torch.Tensor:
    """ToMe's unmerge: x [B, N - r, C] -> [B, N, C], every original token taking the value of
    the merged token that holds it (a gather: exact, deterministic)."""
    x = check_tensor(x, "x")
    _check_maps(maps)
    B, N = maps.dest.shape
    if x.dim() != 3 or x.shape[0] != B or x.shape[1] != maps.merged_tokens:
        raise InvalidArgumentError(
            f"x has shape {tuple(x.shape)}; the maps expect [{B}, {maps.merged_tokens}, C]")
    if x.device != maps.dest.device:
        raise InvalidArgumentError(f"x is on {x.device} but the maps are on {maps.dest.device}")
    return x.gather(1, maps.dest[..., None].expand(B, N, x.shape[-1]))


def tome_merge_source(source: Optional[torch.Tensor], maps: TomeMaps) -> torch.Tensor:
    """ToMe's merge_source: source [B, N, N0] (None: the identity over the N tokens, fp32) ->
    [B, N - r, N0], each row the elementwise max over the tokens it holds."""
    _check_maps(maps)
    B, N = maps.dest.shape
    if source is None:
        source = torch.eye(N, device=maps.dest.device)[None].expand(B, N, N)
    source = check_tensor(source, "source")
    _check_tokens(source, maps, "source")
    if maps.r == 0:
        return source
    return _tome_merge_source_op(source, maps.offsets, maps.members, maps.dest)
