"""Token Merging (ToMe) for timm Vision Transformers (ViT, DeiT, DeiT distilled, LayerScale).

patch(model, r) makes every transformer block merge r tokens between its attention and its
MLP, as ToMe does (Bolya et al., ICLR 2023): the block's keys, averaged over heads, are the
similarity metric; fastmerge.ops.tome_match / tome_merge do the bipartite matching and the
size-weighted merge (fused kernels, torch custom ops, so a patched model compiles with
torch.compile). With prop_attn, attention adds log(token size) to its logits (proportional
attention; passed to scaled_dot_product_attention as an additive mask when timm uses fused
attention). The class token (and a DeiT distill token) never merge.

r is an int (per layer), a list (per layer, padded with zeros) or a (r, inflection) schedule,
ToMe's parse_r; set model.r later to change it. With trace_source, model._tome_info["source"]
holds the [B, N', N0] source matrix after a forward. unpatch(model) restores the original
classes exactly. patch() is never applied on import, and timm is imported only by patch().
"""
from __future__ import annotations

import threading
import weakref
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..errors import FastmergeError, InvalidArgumentError
from ..ops import tome_match, tome_merge, tome_merge_source

_ORIGINAL = "_fastmerge_tome_original"
_classes: Dict[type, type] = {}


def parse_r(num_layers: int, r) -> list:
    """ToMe's r schedule as one r per layer: an int (constant), a list (padded with zeros), or
    (r, inflection) with inflection in [-1, 1]: r per layer moves linearly from
    int(r * (1 - inflection)) to 2 r minus that (inflection -1: ToMe's decreasing schedule)."""
    if isinstance(r, list):
        return list(r) + [0] * max(0, num_layers - len(r))
    inflection = 0.0
    if isinstance(r, tuple):
        r, inflection = r
    first = int(r * (1.0 - inflection))
    last = 2 * r - first
    step = (last - first) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(first + step * i) for i in range(num_layers)]


def _attention(attn, x: torch.Tensor, size: Optional[torch.Tensor]):
    """timm's Attention forward with log(size) added to the logits; also returns the keys
    averaged over heads (ToMe's metric)."""
    B, N, _ = x.shape
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)
    if attn.fused_attn:
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        x = attn.attn_drop(logits.softmax(dim=-1)) @ v
    x = x.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        x = norm(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x)), k.mean(1)


class _Pass:
    """One pass over the blocks: r per layer, the running token sizes and source, and the sizes
    each block saw (for recomputations under gradient checkpointing)."""

    def __init__(self, r: list):
        self.r, self.size, self.source = r, None, None
        self.layer_sizes: list = [None] * len(r)


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (checkpointed blocks run
    again there). Under torch.compile recomputation happens inside the compiled graphs, and
    the query would break the graph: False."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _current_pass(info: dict, layer: int) -> _Pass:
    """This thread's pass (concurrent forwards of one model, as in a server, keep their own
    sizes), started at block 0 of a forward. A block recomputed in a backward pass (gradient
    checkpointing) belongs to the pass that ran it: this thread's, or on a thread that ran no
    forward (autograd's device threads on CUDA), the model's latest; a recomputed block 0
    starts nothing, or that device thread would keep a stale pass for the next step."""
    threads = info["passes"]
    if layer == 0 and not _in_backward():  # a forward starts a pass
        model = info["model"]()
        threads.current = _Pass(parse_r(info["layers"], model.r))
        info["latest"] = threads.current
    current = getattr(threads, "current", None)
    return current if current is not None else info["latest"]


def _block_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                   is_causal: bool = False) -> torch.Tensor:
    if attn_mask is not None or is_causal:
        raise FastmergeError("a ToMe-patched timm block takes no attn_mask / is_causal")
    info, layer = self._tome_info, self._tome_layer
    state = _current_pass(info, layer)
    if state.size is not None and state.size.shape[1] != x.shape[1]:
        # A recomputation (gradient checkpointing) after the pass went on merging: this
        # block's input sizes are the ones it saw in the pass.
        state.size = state.layer_sizes[layer]
    state.layer_sizes[layer] = state.size
    size = state.size if info["prop_attn"] else None
    x_attn, metric = _attention(self.attn, self.norm1(x), size)
    x = x + self.drop_path1(self.ls1(x_attn))
    r = state.r[layer]
    if r > 0:
        maps = tome_match(metric, r, class_token=info["class_token"],
                          distill_token=info["distill_token"])
        if info["trace_source"]:
            state.source = tome_merge_source(state.source, maps)
        x, state.size = tome_merge(x, maps, state.size)
    # what the latest forward ended with (module doc): the sizes, and the source if traced
    info["size"], info["source"] = state.size, state.source
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _patched_class(cls: type, methods: dict) -> type:
    if cls not in _classes:
        _classes[cls] = type(f"ToMe{cls.__name__}", (cls,), {**methods, _ORIGINAL: cls})
    return _classes[cls]


def _check_r(r):
    if isinstance(r, bool):
        raise InvalidArgumentError(f"r must be an int, a list of ints or (r, inflection), got {r!r}")
    if isinstance(r, int):
        return r
    if isinstance(r, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in r):
        return r
    if (isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], int)
            and isinstance(r[1], (int, float)) and -1.0 <= float(r[1]) <= 1.0):
        return r
    raise InvalidArgumentError(f"r must be an int, a list of ints or (r, inflection), got {r!r}")


def patch(model: torch.nn.Module, r=0, *, trace_source: bool = False,
          prop_attn: bool = True) -> torch.nn.Module:
    """Applies ToMe to a timm VisionTransformer in place (and returns it); see the module doc."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise InvalidArgumentError(
            f"patch() takes a timm VisionTransformer, got {type(model).__name__}")
    if hasattr(type(model), _ORIGINAL):
        raise FastmergeError("this model is already ToMe-patched; unpatch() it first")
    if getattr(model, "num_reg_tokens", 0):
        raise InvalidArgumentError(
            f"the model has {model.num_reg_tokens} register tokens; ToMe protects only the class "
            f"and distill tokens")
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise InvalidArgumentError(
                f"blocks[{i}] is a {type(block).__name__} with {type(block.attn).__name__}; "
                f"ToMe patches timm's Block with Attention only")
    model._tome_info = {
        "model": weakref.ref(model), "layers": len(blocks),
        "passes": threading.local(), "latest": _Pass([0] * len(blocks)),
        "size": None, "source": None,
        "trace_source": bool(trace_source), "prop_attn": bool(prop_attn),
        "class_token": getattr(model, "cls_token", None) is not None,
        "distill_token": getattr(model, "dist_token", None) is not None,
    }
    model.r = _check_r(r)
    model.__class__ = _patched_class(type(model), {})  # marks the model as patched
    for i, block in enumerate(blocks):
        block._tome_info = model._tome_info
        block._tome_layer = i
        block.__class__ = _patched_class(type(block), {"forward": _block_forward})
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Restores the classes patch() replaced and removes its attributes."""
    for module in model.modules():
        original = getattr(type(module), _ORIGINAL, None)
        if original is None:
            continue
        module.__class__ = original
        for name in ("_tome_info", "_tome_layer", "r"):
            if name in module.__dict__:
                delattr(module, name)
    return model
