"""KV-cache merging for transformers causal LMs, used like a kvpress press:

    press = KVMergePress(ratio=0.5, eps=-1.0, sigma=5.0, window=32, sinks=4)
    with press(model):
        out = model.generate(input_ids, max_new_tokens=64)

Entering press(model) registers a forward hook on every attention module (Llama, Mistral,
Qwen2/Qwen3 style: q_proj, optional q_norm, rotary position embeddings, grouped-query
attention) and on the model itself; leaving it removes them. Nothing happens on import.

After an attention layer's prefill forward (the call that filled an empty cache layer, so the
layer's cache length equals the number of tokens of the call), the layer's hook scores its
keys; when the model's forward ends, every layer prefilled in it has its DynamicCache keys and
values replaced by fastmerge.ops.kv_merge of them, all removing the same number of tokens (the
smallest kv_merge_budget among the layers: with eps > -1 the layers' own budgets differ, and
attention masks are sized from one layer's cache length):

* scores: the attention the last `score_window` prompt queries pay to every key (softmax of
  q k^T / sqrt(d) with the causal mask, fp32), summed over those queries and over the query
  heads of each key-value group: shape (batch, kv_heads, seq). This is SnapKV's observation
  window; it costs O(score_window * seq) memory per head, never the full seq x seq matrix;
* kv_merge(keys, values, scores, ratio, eps, sigma, window, sinks) with the press's settings
  (see its docstring: every kv head of a layer keeps the same, dense length).

The attention output of the prefill itself is computed on the full cache; later tokens attend
to the merged cache. Call the model the press was entered with (its forward hook merges).
Decoding steps are left alone. generate() derives position ids from the attention mask, so new
tokens keep their true RoPE positions while the cache is shorter.

Limits: a decoding loop written by hand must pass position_ids (the cache is shorter than the
positions it covers; generate() derives them from the attention mask); batches must not
contain padding (the 2D attention mask is not compressed along with the cache); a prompt fed
in several forward calls is compressed after its first call only; only full-attention
DynamicCache layers are compressed (sliding-window layers are skipped).
Tested with transformers 5.23 and 5.25 (DynamicCache.layers; 5.25 names the attention's cache
argument `cache`, earlier releases `past_key_values`: both are read); the older
key_cache/value_cache lists are handled the same way but not covered by the tests.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch

from ..errors import InvalidArgumentError
from ..ops import kv_merge, kv_merge_budget


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    found = [m for m in model.modules()
             if hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "layer_idx")
             and hasattr(m, "head_dim")]
    if not found:
        raise InvalidArgumentError(
            f"{type(model).__name__} has no attention modules with q_proj/k_proj/layer_idx "
            "(KVMergePress supports Llama/Mistral/Qwen2-style causal LMs)")
    return found


@dataclass
class KVMergePress:
    """KVMerger-style KV-cache merging after prefill (see the module docstring).

    ratio: fraction of each layer's mergeable tokens to remove (0 leaves the cache untouched);
    eps: cosine-similarity threshold of adjacent keys that may merge (-1: any pair, the budget
    alone decides); sigma: Gaussian kernel width of the merge weights; window: recent tokens
    never merged; sinks: first tokens never merged; score_window: prompt queries whose attention
    scores the tokens (pivot choice)."""

    ratio: float = 0.5
    eps: float = -1.0
    sigma: float = 5.0
    window: int = 32
    sinks: int = 4
    score_window: int = 32

    def __post_init__(self):
        # per thread (one press may serve several threads' forwards at once): the layers
        # prefilled in its running forward, as (read, write, scores, budget). Not a field, so
        # presses still copy, pickle and convert with dataclasses.asdict.
        self._threads = threading.local()
        if isinstance(self.score_window, bool) or not isinstance(self.score_window, int) \
                or self.score_window < 1:
            raise InvalidArgumentError(f"score_window must be an int >= 1, got {self.score_window!r}")
        # kv_merge validates the rest; check them now so a bad press fails before generate()
        probe = torch.zeros(1, 1, 2, 1)
        kv_merge(probe, probe, probe[..., 0], ratio=self.ratio, eps=self.eps, sigma=self.sigma,
                 window=self.window, sinks=self.sinks)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_threads"]  # running forwards' layers belong to this object only
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._threads = threading.local()

    # ---- scoring ----

    def attention_scores(self, module: torch.nn.Module, hidden_states: torch.Tensor,
                         keys: torch.Tensor, position_embeddings) -> torch.Tensor:
        """(batch, kv_heads, seq) fp32: attention from the last score_window queries of the
        prefill to every key (causal), summed over those queries and each group's query heads."""
        B, L, _ = hidden_states.shape
        S = keys.shape[-2]
        kv_heads, head_dim = keys.shape[1], keys.shape[-1]
        w = min(self.score_window, L)
        h = hidden_states[:, L - w:]
        q = module.q_proj(h).view(B, w, -1, head_dim)
        if getattr(module, "q_norm", None) is not None:
            q = module.q_norm(q)
        q = q.transpose(1, 2)  # (B, H, w, D)
        cos, sin = position_embeddings
        cos, sin = cos[:, L - w:].unsqueeze(1), sin[:, L - w:].unsqueeze(1)
        q = (q * cos) + (_rotate_half(q) * sin)
        heads = q.shape[1]
        group = heads // kv_heads
        qf = q.float().reshape(B, kv_heads, group * w, head_dim)
        logits = torch.matmul(qf, keys.float().transpose(-1, -2)) / math.sqrt(head_dim)
        logits = logits.view(B, kv_heads, group, w, S)
        query_pos = torch.arange(S - w, S, device=keys.device)[:, None]
        future = torch.arange(S, device=keys.device)[None, :] > query_pos  # (w, S)
        logits = logits.masked_fill(future, float("-inf"))
        return torch.softmax(logits, dim=-1).sum(dim=(2, 3))

    # ---- the hook ----

    def compress(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                 max_removed: Optional[int] = None):
        """(keys, values) of one layer's cache after merging."""
        return kv_merge(keys, values, scores, ratio=self.ratio, eps=self.eps, sigma=self.sigma,
                        window=self.window, sinks=self.sinks, max_removed=max_removed)

    def budget(self, keys: torch.Tensor) -> int:
        """Tokens kv_merge would remove from this layer's cache on its own."""
        return kv_merge_budget(keys, ratio=self.ratio, eps=self.eps, window=self.window,
                               sinks=self.sinks)

    def _pending(self) -> list:
        pending = getattr(self._threads, "pending", None)
        if pending is None:
            pending = self._threads.pending = []
        return pending

    def start_forward(self, model, args, kwargs):
        self._threads.pending = []

    def finish_forward(self, model, args, kwargs, output):
        """After the model's forward: every layer prefilled in it is merged, all by the
        smallest budget among them, so the layers keep one cache length (attention masks
        are sized from one layer's length)."""
        pending, self._threads.pending = self._pending(), []
        if not pending:
            return output
        removed = min(budget for *_, budget in pending)
        with torch.no_grad():
            for read, write, scores, _ in pending:
                write(*self.compress(*read(), scores, max_removed=removed))
        return output

    def forward_hook(self, module, args, kwargs, output):
        # transformers 5.25 renamed the attention's past_key_values argument to cache
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        position_embeddings = kwargs.get("position_embeddings")
        if cache is None or hidden_states is None or position_embeddings is None or self.ratio == 0:
            return output
        idx = module.layer_idx
        layers = getattr(cache, "layers", None)
        if layers is not None:  # transformers >= 4.56: one object per layer
            if idx >= len(layers):
                return output
            layer = layers[idx]
            if getattr(layer, "is_sliding", False) or getattr(layer, "keys", None) is None:
                return output

            def read(layer=layer):
                return layer.keys, layer.values

            def write(keys, values, layer=layer):
                layer.keys, layer.values = keys, values
        elif hasattr(cache, "key_cache"):  # older DynamicCache: lists of tensors
            if idx >= len(cache.key_cache):
                return output

            def read(cache=cache, idx=idx):
                return cache.key_cache[idx], cache.value_cache[idx]

            def write(keys, values, cache=cache, idx=idx):
                cache.key_cache[idx], cache.value_cache[idx] = keys, values
        else:
            return output
        keys, _ = read()
        if keys.dim() != 4 or keys.shape[-2] != hidden_states.shape[1]:
            return output  # a decoding step or a continued prompt: not a prefill
        # Scored now (the layer's inputs are at hand), merged when the model's forward ends.
        with torch.no_grad():
            scores = self.attention_scores(module, hidden_states, keys, position_embeddings)
            self._pending().append((read, write, scores, self.budget(keys)))
        return output

    @contextlib.contextmanager
    def __call__(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        handles = []
        try:
            for module in _attention_modules(model):
                handles.append(module.register_forward_hook(self.forward_hook, with_kwargs=True))
            handles.append(model.register_forward_pre_hook(self.start_forward, with_kwargs=True))
            handles.append(model.register_forward_hook(self.finish_forward, with_kwargs=True))
            yield model
        finally:
            for handle in handles:
                handle.remove()


def press(ratio: float = 0.5, **kwargs) -> KVMergePress:
    """KVMergePress(ratio=ratio, **kwargs)."""
    return KVMergePress(ratio=ratio, **kwargs)


__all__ = ["KVMergePress", "press"]
