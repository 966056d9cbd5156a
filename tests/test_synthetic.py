"""fastmerge.synthetic: offline Llama checkpoint families that transformers loads, with experts
that differ from the base by the requested relative amount, reproducibly from the seed."""
import json
import os

import pytest
import torch
from helpers import load_weights

pytest.importorskip("transformers")

from fastmerge import synthetic  # noqa: E402
from fastmerge.errors import InvalidArgumentError  # noqa: E402

DELTA_SCALE = 0.1


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    # a small shard size so the tiny model is sharded with an index, as real checkpoints are
    return synthetic.build_family(tmp_path_factory.mktemp("tiny"), preset="tiny", experts=3,
                                  seed=1, delta_scale=DELTA_SCALE, max_shard_size="200KB")


def test_layout_and_files(family):
    assert family.base == family.root / "base"
    assert family.experts == [family.root / f"expert_{i}" for i in range(3)]
    for model_dir in [family.base, *family.experts]:
        for name in ("config.json", "generation_config.json", "model.safetensors.index.json",
                     "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert (model_dir / name).is_file(), (model_dir, name)
        assert len(list(model_dir.glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((family.base / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert config["dtype"] == "bfloat16" and config["num_hidden_layers"] == 4


def test_weights_match_the_preset(family):
    weights = load_weights(family.base)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    count = sum(t.numel() for t in weights.values())
    assert count == family.preset.parameter_count()
    assert family.nbytes() == 2 * count
    assert sorted(load_weights(family.experts[0])) == sorted(weights)


def test_base_loads_offline_and_gives_finite_logits(family, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.arange(1, 17).reshape(1, -1)).logits
    assert logits.shape == (1, 16, family.preset.vocab_size)
    assert torch.isfinite(logits).all()


def test_experts_differ_from_the_base_by_delta_scale(family):
    base = load_weights(family.base)
    deltas = []
    for expert in family.experts:
        weights = load_weights(expert)
        for name, b in base.items():
            d = weights[name].double() - b.double()
            # every parameter moves, norms included, by about delta_scale of its own size
            ratio = float(d.norm() / b.double().norm())
            tolerance = 0.15 if b.numel() >= 4096 else 0.5  # few elements: a noisy estimate
            assert abs(ratio / DELTA_SCALE - 1) < tolerance, (expert.name, name, ratio)
        name = "model.layers.1.mlp.up_proj.weight"
        deltas.append((weights[name].double() - base[name].double()).reshape(-1))
    # a shared component: experts agree in direction, cosine ~0.25, but are not copies
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            cos = float(torch.nn.functional.cosine_similarity(deltas[i], deltas[j], dim=0))
            assert 0.15 < cos < 0.35, (i, j, cos)


def test_same_seed_reproduces_and_another_seed_differs(family, tmp_path):
    def build(seed, where):
        return synthetic.build_family(tmp_path / where, preset="tiny", experts=2, seed=seed,
                                      delta_scale=DELTA_SCALE, with_tokenizer=False, threads=1)

    again = build(1, "again")  # one thread here, the default count in the fixture
    for ours, theirs in zip([family.base, *family.experts[:2]], [again.base, *again.experts]):
        a, b = load_weights(ours), load_weights(theirs)
        assert all(torch.equal(a[n], b[n]) for n in a), ours.name
    other = build(2, "other")
    name = "model.layers.0.self_attn.q_proj.weight"
    for ours, theirs in zip([family.base, *family.experts[:2]], [other.base, *other.experts]):
        assert not torch.equal(load_weights(ours)[name], load_weights(theirs)[name])
    assert not (other.base / "tokenizer.json").exists()


def test_reuse_skips_the_build_only_when_the_arguments_match(tmp_path):
    first = synthetic.build_family(tmp_path, preset="tiny", experts=1, with_tokenizer=False)
    stamp = os.stat(first.experts[0] / "model.safetensors").st_mtime_ns
    synthetic.build_family(tmp_path, preset="tiny", experts=1, with_tokenizer=False, reuse=True)
    assert os.stat(first.experts[0] / "model.safetensors").st_mtime_ns == stamp
    rebuilt = synthetic.build_family(tmp_path, preset="tiny", experts=1, seed=7,
                                     with_tokenizer=False, reuse=True)
    assert rebuilt.base.exists()
    assert json.loads((tmp_path / "family.json").read_text())["seed"] == 7


def test_tied_embeddings_have_no_lm_head(tmp_path):
    from transformers import AutoModelForCausalLM

    fam = synthetic.build_family(tmp_path, preset="tiny", experts=1, dtype=torch.float32,
                                 tie_word_embeddings=True, with_tokenizer=False)
    for model_dir in (fam.base, fam.experts[0]):
        weights = load_weights(model_dir)
        assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
        assert sum(t.numel() for t in weights.values()) == fam.preset.parameter_count(True)
        assert all(t.dtype == torch.float32 for t in weights.values())
    model = AutoModelForCausalLM.from_pretrained(fam.experts[0])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_loads_and_round_trips(family, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(family.experts[0])
    assert len(tokenizer) <= family.preset.vocab_size
    text = "hello world: the merged model, 3 experts!"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 3
    assert tokenizer.unk_token_id not in ids
    assert len(ids) < len(text)  # the word merges apply
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_presets_and_argument_checks(tmp_path):
    assert {"tiny", "demo", "0.5b", "8b"} <= set(synthetic.PRESETS)
    assert 20e6 <= synthetic.PRESETS["demo"].parameter_count() <= 40e6
    assert 0.45e9 <= synthetic.PRESETS["0.5b"].parameter_count() <= 0.6e9
    # Llama-3-8B has 8.03B parameters
    assert abs(synthetic.PRESETS["8b"].parameter_count() / 8.03e9 - 1) < 0.01
    with pytest.raises(InvalidArgumentError, match="unknown preset"):
        synthetic.build_family(tmp_path, preset="70b")
    with pytest.raises(InvalidArgumentError, match="experts"):
        synthetic.build_family(tmp_path, experts=0)
