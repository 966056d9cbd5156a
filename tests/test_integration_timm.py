"""fastmerge.integrations.timm: ToMe on random-init timm ViTs (ViT-Tiny, DeiT-Tiny distilled,
LayerScale), against the unpatched model (r=0, unpatch) and against a step-by-step ToMe
forward built from the pure-torch reference ops (ops/_reference/tome.py)."""
import concurrent.futures

import pytest
import torch

from fastmerge.errors import FastmergeError, InvalidArgumentError
from fastmerge.ops import _reference as R

from helpers import assert_close, run_in_step
from timm_env import import_timm

timm = import_timm()
from fastmerge.integrations import timm as tome_timm  # noqa: E402

MODELS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "layerscale": ("vit_tiny_patch16_224", {"init_values": 1e-5}),
}


def make(kind, **extra):
    name, kw = MODELS[kind]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=96, **kw, **extra).eval()


def images(batch=2):
    return torch.randn(batch, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def run(model, x):
    with torch.no_grad():
        return model(x)


def block_token_counts(model, x):
    counts = []
    hooks = [b.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for b in model.blocks]
    run(model, x)
    for h in hooks:
        h.remove()
    return counts


def expected_counts(tokens, schedule, protected):
    out = []
    for r in schedule:
        tokens -= max(0, min(r, (tokens - protected) // 2))
        out.append(tokens)
    return out


# ---- the step-by-step ToMe forward (reference ops, unfused attention) ----

def reference_forward(model, x, schedule, prop_attn=True):
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        size = None
        for block, r in zip(model.blocks, schedule):
            attn = block.attn
            y = block.norm1(h)
            B, N, _ = y.shape
            qkv = attn.qkv(y).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            logits = (q * attn.scale) @ k.transpose(-2, -1)
            if prop_attn and size is not None:
                logits = logits + size.log()[:, None, None, :, 0]
            y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)
            h = h + block.ls1(attn.proj(y))
            r = R.tome_clamp_r(N, r, class_token, distill_token)
            if r > 0:
                unm, src, dst = R.tome_match(k.mean(1), r, class_token, distill_token)
                h, size = R.tome_merge_wavg(h, unm, src, dst, size, distill_token)
            h = h + block.ls2(block.mlp(block.norm2(h)))
        return model.forward_head(model.norm(h))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_r0_equals_unpatched_and_unpatch_restores(kind):
    model = make(kind)
    x = images()
    before = run(model, x)
    classes = [type(m) for m in model.modules()]
    tome_timm.patch(model, r=0)
    assert torch.equal(run(model, x), before)
    model.r = 6
    assert not torch.allclose(run(model, x), before)
    tome_timm.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert not hasattr(model, "_tome_info") and not hasattr(model.blocks[0], "_tome_layer")
    assert torch.equal(run(model, x), before)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("r", [4, 13, [0, 20, 3], (5, -1.0)])
def test_token_counts_and_values_match_reference(kind, r):
    model = make(kind)
    x = images()
    protected = 1 + int(kind == "deit_distilled")
    tokens = 36 + protected  # 96 / 16 = 6 x 6 patches
    schedule = tome_timm.parse_r(len(model.blocks), r)
    expected = reference_forward(model, x, schedule)
    tome_timm.patch(model, r=r)
    assert block_token_counts(model, x) == expected_counts(tokens, schedule, protected)
    assert_close(run(model, x), expected, "tome_model")


def test_parse_r_follows_tome_schedule():
    # ToMe's parse_r: int -> constant; list padded with zeros; (r, inflection) linear from
    # int(r (1 - inflection)) to 2 r - that over the layers.
    assert tome_timm.parse_r(4, 8) == [8, 8, 8, 8]
    assert tome_timm.parse_r(4, [1, 2]) == [1, 2, 0, 0]
    assert tome_timm.parse_r(5, (8, -1.0)) == [16, 12, 8, 4, 0]
    assert tome_timm.parse_r(3, (10, 0.5)) == [5, 10, 15]


def test_fused_and_unfused_attention_agree_with_proportional_attention():
    fused, plain = make("vit"), make("vit")
    for block in plain.blocks:
        block.attn.fused_attn = False
    x = images()
    tome_timm.patch(fused, r=8)
    tome_timm.patch(plain, r=8)
    assert_close(run(fused, x), run(plain, x), "tome_model")


def test_trace_source_and_prop_attn_off():
    model = make("vit")
    x = images(batch=3)
    schedule = [8] * len(model.blocks)
    expected = reference_forward(model, x, schedule, prop_attn=False)
    tome_timm.patch(model, r=8, trace_source=True, prop_attn=False)
    assert_close(run(model, x), expected, "tome_model")
    source = model._tome_info["source"]
    size = model._tome_info["size"]
    assert source.shape == (3, expected_counts(37, schedule, 1)[-1], 37)
    assert torch.equal(source.sum(dim=1), torch.ones(3, 37))  # every token in one group
    assert torch.equal(source.sum(dim=2, keepdim=True), size)  # group sizes are token sizes
    assert source.shape[1] == block_token_counts(model, x)[-1]


def test_compiled_patched_model_matches_eager():
    model = make("deit_distilled")
    x = images()
    tome_timm.patch(model, r=6)
    eager = run(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    assert_close(run(compiled, x), eager, "tome_model")


def test_training_backward_flows_through_merges():
    model = make("layerscale")
    tome_timm.patch(model, r=5)
    model.train()
    model(images()).square().sum().backward()
    for block in model.blocks:
        assert float(block.attn.qkv.weight.grad.abs().sum()) > 0
    assert float(model.patch_embed.proj.weight.grad.abs().sum()) > 0


def test_forward_intermediates_merges_as_forward_does():
    """A pass that does not go through forward_features (timm's forward_intermediates), first
    and after a forward of another batch size, merges with the current schedule."""
    model = tome_timm.patch(make("vit"), r=6)
    x = images()
    with torch.no_grad():
        for _ in range(2):
            final, _ = model.forward_intermediates(x, output_fmt="NLC")
            assert_close(final, model.forward_features(x), "exact")
            model(images(batch=3))
    assert final.shape[1] == expected_counts(37, [6] * 12, 1)[-1]


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointed blocks run again in the backward pass, after the later blocks merged:
    each must see the token sizes it saw in the forward pass."""
    grads = []
    for checkpointing in (False, True):
        model = tome_timm.patch(make("layerscale"), r=5)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        model(images()).square().sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()
                                if p.grad is not None]))
    assert grads[0].shape == grads[1].shape
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_concurrent_forwards_keep_their_own_token_sizes():
    """One patched model serving several threads (an inference server): each forward merges
    with its own token sizes, as if it ran alone."""
    model = tome_timm.patch(make("vit"), r=6)
    xs = [images(batch) for batch in (2, 3)]
    alone = [run(model, x) for x in xs]
    # both forwards past block 0 (where a pass starts) before either goes on
    together = run_in_step([lambda x=x: run(model, x) for x in xs], model.blocks[1])
    for got, want in zip(together, alone):
        assert torch.equal(got, want)


def test_checkpointed_steps_with_the_backward_on_another_thread():
    """On CUDA, autograd recomputes checkpointed blocks on its own long-lived device thread.
    Every step's recomputation must use that step's token sizes (a recomputed block 0 used to
    leave a stale pass on that thread for the next step)."""
    backward_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one, long-lived
    grads = {}
    for checkpointing in (False, True):
        model = tome_timm.patch(make("layerscale"), r=5)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        for step, batch in enumerate((2, 3)):
            model.zero_grad()
            loss = model(images(batch)).square().sum()
            backward_thread.submit(loss.backward).result()
            grads[checkpointing, step] = torch.cat(
                [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    backward_thread.shutdown()
    for step in (0, 1):
        assert torch.allclose(grads[False, step], grads[True, step], rtol=1e-4, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="VisionTransformer"):
        tome_timm.patch(torch.nn.Linear(2, 2))
    with pytest.raises(InvalidArgumentError, match="register tokens"):
        tome_timm.patch(make("vit", reg_tokens=4, no_embed_class=True))
    model = make("vit")
    with pytest.raises(InvalidArgumentError, match="r must be"):
        tome_timm.patch(model, r=1.5)
    tome_timm.patch(model, r=2)
    with pytest.raises(FastmergeError, match="already"):
        tome_timm.patch(model, r=2)
