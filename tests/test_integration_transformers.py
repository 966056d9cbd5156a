"""KVMergePress on a random-init tiny Llama (grouped-query attention, DynamicCache): cache
lengths after prefill, deterministic generation, ratio 0 == no press, the compressed cache ==
kv_merge of the uncompressed cache, and the attention scores against eager attention weights."""
from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from fastmerge.errors import InvalidArgumentError  # noqa: E402
from fastmerge.integrations.transformers import KVMergePress  # noqa: E402
from fastmerge.ops import kv_merge, kv_merge_budget  # noqa: E402
from fastmerge.ops._reference import kvmerge as R  # noqa: E402
from helpers import run_in_step  # noqa: E402

PROMPT = 70


def tiny_llama(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def prompt(batch=1, length=PROMPT, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, length), generator=g)


def cache_kwarg(model) -> str:
    """transformers 5.25 renamed forward's past_key_values to cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefill(model, ids):
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg(model): cache})
    return cache


def test_cache_length_after_prefill():
    model = tiny_llama()
    press = KVMergePress(ratio=0.5, eps=-1.0, sigma=3.0, window=8, sinks=2)
    ids = prompt(batch=2)
    with press(model):
        cache = prefill(model, ids)
    expected = PROMPT - int(0.5 * (PROMPT - 8 - 2))
    for layer in cache.layers:
        assert layer.keys.shape == (2, 2, expected, 16) and layer.values.shape == layer.keys.shape
    # hooks are gone after the context: a new prefill keeps every token
    cache = prefill(model, ids)
    assert cache.layers[0].keys.shape[2] == PROMPT


def test_generation_runs_and_is_deterministic():
    model = tiny_llama()
    press = KVMergePress(ratio=0.6, eps=-1.0, sigma=3.0, window=8, sinks=2)
    ids = prompt()
    outs = []
    for _ in range(2):
        with press(model), torch.no_grad():
            outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                       do_sample=False, output_scores=True,
                                       return_dict_in_generate=True, pad_token_id=0))
    assert outs[0].sequences.shape == (1, PROMPT + 12)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].scores, outs[1].scores):
        assert torch.equal(a, b)
    # the merged cache changes what the model sees (the press did something)
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                               do_sample=False, output_scores=True, return_dict_in_generate=True,
                               pad_token_id=0)
    assert not torch.equal(plain.scores[1], outs[0].scores[1])
    assert torch.equal(plain.scores[0], outs[0].scores[0])  # prefill logits use the full cache


def test_ratio_zero_matches_no_press():
    model = tiny_llama()
    ids = prompt(batch=2, seed=3)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
              output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        with KVMergePress(ratio=0.0, window=4, sinks=1)(model):
            pressed = model.generate(ids, **kw)
    assert torch.equal(plain.sequences, pressed.sequences)
    for a, b in zip(plain.scores, pressed.scores):
        assert torch.equal(a, b)


def captured_attention_inputs(model, ids):
    """Per layer: the hidden states and position embeddings the attention module received."""
    seen = {}

    def hook(module, args, kwargs):
        seen[module.layer_idx] = (kwargs["hidden_states"].detach(), kwargs["position_embeddings"])

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in model.model.layers]
    try:
        cache = prefill(model, ids)
    finally:
        for h in handles:
            h.remove()
    return cache, seen


def test_compressed_cache_is_kv_merge_of_the_full_cache():
    model = tiny_llama()
    ids = prompt(batch=2, seed=4)
    press = KVMergePress(ratio=0.7, eps=0.0, sigma=4.0, window=6, sinks=3, score_window=5)
    full, seen = captured_attention_inputs(model, ids)
    with press(model):
        merged = prefill(model, ids)
    # every layer removes the smallest of the layers' own budgets
    removed = min(kv_merge_budget(layer.keys, ratio=0.7, eps=0.0, window=6, sinks=3)
                  for layer in full.layers)
    for i, layer in enumerate(model.model.layers):
        hidden, pe = seen[i]
        keys, values = full.layers[i].keys, full.layers[i].values
        scores = press.attention_scores(layer.self_attn, hidden, keys, pe)
        want_k, want_v = kv_merge(keys, values, scores, ratio=0.7, eps=0.0, sigma=4.0, window=6,
                                  sinks=3, max_removed=removed)
        assert want_k.shape[2] == PROMPT - removed
        assert torch.equal(merged.layers[i].keys, want_k)
        assert torch.equal(merged.layers[i].values, want_v)
        # and the op agrees with the algorithm's reference on this real cache
        rk, rv, _ = R.kv_merge(keys, values, scores, ratio=0.7, eps=0.0, sigma=4.0, window=6,
                               sinks=3, max_removed=removed)
        assert rk.shape == want_k.shape
        assert torch.allclose(want_k, rk, rtol=1e-6, atol=1e-6)
        assert torch.allclose(want_v, rv, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_layers_with_different_budgets_keep_one_length_and_generate(attn):
    """With eps > -1 each layer alone would remove a different number of tokens; the cache
    must keep one length (eager attention sizes its mask from layer 0) and decode on."""
    model = tiny_llama(attn)
    ids = prompt(seed=4)
    full = prefill(model, ids)
    eps = 0.1
    budgets = [kv_merge_budget(layer.keys, ratio=0.9, eps=eps, window=4, sinks=2)
               for layer in full.layers]
    assert len(set(budgets)) > 1, budgets  # the case under test
    press = KVMergePress(ratio=0.9, eps=eps, sigma=4.0, window=4, sinks=2)
    with press(model), torch.no_grad():
        cache = prefill(model, ids)
        assert {layer.keys.shape[2] for layer in cache.layers} == {PROMPT - min(budgets)}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                             do_sample=False)
    assert out.shape == (1, PROMPT + 5)


def test_scores_match_eager_attention_weights():
    """The press's scores equal the eager attention probabilities of the last score_window
    queries, summed over those queries and the two query heads of each kv head."""
    model = tiny_llama(attn="eager")
    ids = prompt(seed=5)
    press = KVMergePress(ratio=0.5, score_window=7)
    full, seen = captured_attention_inputs(model, ids)
    with torch.no_grad():
        attn = model(ids, output_attentions=True).attentions  # per layer (B, H, S, S)
    for i, layer in enumerate(model.model.layers):
        hidden, pe = seen[i]
        scores = press.attention_scores(layer.self_attn, hidden, full.layers[i].keys, pe)
        a = attn[i][:, :, -7:, :].sum(2)  # (B, H, S)
        want = a.view(1, 2, 2, PROMPT).sum(2)  # query heads 0,1 -> kv 0; 2,3 -> kv 1
        assert scores.shape == (1, 2, PROMPT)
        assert torch.allclose(scores, want, rtol=1e-5, atol=1e-6)


def test_one_press_serves_concurrent_prefills():
    """Two threads prefill through one model and press at once (both past the first layer
    before either finishes): each cache is merged as it would be alone."""
    model = tiny_llama()
    press = KVMergePress(ratio=0.5, eps=-1.0, sigma=3.0, window=8, sinks=2)
    prompts = [prompt(batch=1, length=60, seed=3), prompt(batch=2, length=80, seed=4)]
    with press(model):
        alone = [prefill(model, ids) for ids in prompts]
        together = run_in_step([lambda ids=ids: prefill(model, ids) for ids in prompts],
                               model.model.layers[0].self_attn)
    for got, want in zip(together, alone):
        for a, b in zip(got.layers, want.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_presses_copy_pickle_and_convert_like_dataclasses():
    import copy
    import dataclasses
    import pickle

    press = KVMergePress(ratio=0.3, window=4)
    assert dataclasses.asdict(press)["ratio"] == 0.3
    for twin in (copy.deepcopy(press), pickle.loads(pickle.dumps(press)),
                 dataclasses.replace(press, sinks=2)):
        assert (twin.ratio, twin.window) == (0.3, 4) and twin._pending() == []
    model, ids = tiny_llama(), prompt()
    with copy.deepcopy(press)(model):
        copied = prefill(model, ids)
    with press(model):
        original = prefill(model, ids)
    assert torch.equal(copied.layers[0].keys, original.layers[0].keys)


def test_bad_press_arguments():
    with pytest.raises(InvalidArgumentError, match="ratio"):
        KVMergePress(ratio=2.0)
    with pytest.raises(InvalidArgumentError, match="score_window"):
        KVMergePress(score_window=0)
    with pytest.raises(InvalidArgumentError, match="attention modules"):
        with KVMergePress()(torch.nn.Linear(2, 2)):
            pass
