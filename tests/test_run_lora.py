"""`fastmerge run` with KnOTS on PEFT LoRA adapters of a tiny random Llama: the merged adapter
loads back into PEFT, and every module's merged update is the dense KnOTS reference computed
from the updates PEFT itself builds from the source adapters."""
import json
import shutil
import warnings

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from fastmerge.errors import ConfigError, FastmergeError, MergeInputError  # noqa: E402
from fastmerge.executor import MergeOptions, run_merge  # noqa: E402
from fastmerge.ops._reference import lowrank as ref  # noqa: E402

ADAPTERS = [
    # (r, alpha, target modules, extra LoraConfig arguments)
    (4, 8, ["q_proj", "v_proj", "embed_tokens"], {}),
    (6, 6, ["q_proj", "v_proj", "o_proj"], dict(use_rslora=True)),
    (4, 16, ["q_proj", "o_proj", "embed_tokens"],
     dict(rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"o_proj": 3})),
]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def make_adapter(path, seed, **lora_config):
    """A saved PEFT LoRA adapter of tiny_llama with random (non-zero) factors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **lora_config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(root / f"adapter{i}", 100 + i, r=r, lora_alpha=alpha,
                         target_modules=targets, **extra)
            for i, (r, alpha, targets, extra) in enumerate(ADAPTERS)]


def peft_updates(path):
    """module name -> the update PEFT builds for the adapter at path, as B @ A (float64)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_llama(), path)
    updates = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and ("default" in getattr(module, "lora_A", {})
                                                    or "default" in getattr(
                                                        module, "lora_embedding_A", {})):
            delta = module.get_delta_weight("default").detach().double()
            embedding = "default" in module.lora_embedding_A
            updates[name] = delta.T if embedding else delta
    return updates


def write_config(tmp_path, method, adapters, weights, **parameters):
    lines = [f"merge_method: {method}", "models:"]
    for path, w in zip(adapters, weights):
        lines += [f"  - model: {path}", f"    parameters: {{weight: {w}}}"]
    if parameters:
        lines.append("parameters:")
        lines += [f"  {k}: {v}" for k, v in parameters.items()]
    config = tmp_path / "knots.yml"
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.mark.parametrize("method,density", [("knots", 0.5), ("knots", 1.0),
                                            ("knots_dare_ties", 0.6)])
def test_knots_run_matches_the_reference_and_loads_in_peft(tmp_path, adapter_dirs, method,
                                                           density):
    weights = [1.0, 0.5, 1.5]
    config = write_config(tmp_path, method, adapter_dirs, weights, density=density, **{"lambda": 0.8})
    out = tmp_path / "merged"
    summary = run_merge(config, out, MergeOptions(quiet=True, seed=5))
    assert summary.tensors > 0

    sources = [peft_updates(p) for p in adapter_dirs]
    merged = peft_updates(out)
    expected_modules = set().union(*sources)
    assert set(merged) == expected_modules
    saved = json.loads((out / "adapter_config.json").read_text())
    for module in sorted(expected_modules):
        have = [(u[module], w) for u, w in zip(sources, weights) if module in u]
        expected = ref.knots([u for u, _ in have], weights=[w for _, w in have], density=density,
                             sparsification="random" if "dare" in method else "magnitude",
                             lambda_=0.8, seed=5, name=f"{module}.weight")
        got = merged[module]
        err = float((got - expected).norm() / expected.norm())
        assert err < 1e-5, (module, err)
    # The merged adapter carries the whole update: scaling 1 at rank r_1 + ... + r_T.
    assert saved["r"] == saved["lora_alpha"] and not saved["use_rslora"]


def test_merged_adapter_adapts_exactly_the_merged_modules(tmp_path):
    """Sources that select their modules differently (a name list restricted to one layer, a
    regex, an exclusion): PEFT loads the merged adapter on exactly the union of their modules,
    each with its merged update, and creates no module without saved factors."""
    adapters = [
        make_adapter(tmp_path / "a", 1, r=4, target_modules=["q_proj"], layers_to_transform=[0]),
        make_adapter(tmp_path / "b", 2, r=3, target_modules=r".*\.v_proj"),
        make_adapter(tmp_path / "c", 3, r=2, target_modules=["o_proj", "q_proj"],
                     exclude_modules=["model.layers.0.self_attn.o_proj"]),
    ]
    weights = [1.0, 0.7, 1.2]
    config = write_config(tmp_path, "knots", adapters, weights, density=1.0)
    run_merge(config, tmp_path / "merged", MergeOptions(quiet=True))
    sources = [peft_updates(p) for p in adapters]
    merged = peft_updates(tmp_path / "merged")
    assert set(merged) == set().union(*sources)
    for module, got in merged.items():
        have = [(u[module], w) for u, w in zip(sources, weights) if module in u]
        expected = ref.knots([u for u, _ in have], weights=[w for _, w in have], density=1.0,
                             sparsification="magnitude", lambda_=1.0, seed=0,
                             name=f"{module}.weight")
        assert float((got - expected).norm() / expected.norm()) < 1e-5, module


def test_knots_output_model_runs_forward(tmp_path, adapter_dirs):
    config = write_config(tmp_path, "knots", adapter_dirs, [1, 1, 1], density=0.3)
    run_merge(config, tmp_path / "merged", MergeOptions(quiet=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "merged")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
        plain = tiny_llama()(ids).logits
    assert logits.shape == (2, 9, 64) and torch.isfinite(logits).all()
    assert not torch.allclose(logits, plain)  # the merged adapter does change the model


def test_knots_rejects_a_checkpoint_that_is_not_an_adapter(tmp_path, adapter_dirs):
    plain = tmp_path / "plain"
    tiny_llama().save_pretrained(plain)
    config = write_config(tmp_path, "knots", [adapter_dirs[0], plain], [1, 1])
    with pytest.raises(FastmergeError, match="not a PEFT LoRA adapter"):
        run_merge(config, tmp_path / "out", MergeOptions(quiet=True))


def test_knots_names_an_adapter_without_factors(tmp_path, adapter_dirs):
    from safetensors.torch import save_file

    empty = tmp_path / "empty"
    shutil.copytree(adapter_dirs[0], empty)
    save_file({}, str(empty / "adapter_model.safetensors"))
    config = write_config(tmp_path, "knots", [empty, adapter_dirs[1]], [1, 1])
    with pytest.raises(MergeInputError, match="holds no LoRA factor pairs"):
        run_merge(config, tmp_path / "out", MergeOptions(quiet=True))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_knots_refuses_adapters_that_change_the_base(tmp_path, adapter_dirs, init):
    changed = tmp_path / "changed"
    shutil.copytree(adapter_dirs[0], changed)
    cfg = json.loads((changed / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (changed / "adapter_config.json").write_text(json.dumps(cfg))
    config = write_config(tmp_path, "knots", [changed, adapter_dirs[1]], [1, 1])
    with pytest.raises(MergeInputError, match="changes the base weights"):
        run_merge(config, tmp_path / "out", MergeOptions(quiet=True))


def test_knots_rejects_dora_adapters(tmp_path, adapter_dirs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"],
                                                        use_dora=True))
    model.save_pretrained(tmp_path / "dora")
    config = write_config(tmp_path, "knots", [adapter_dirs[0], tmp_path / "dora"], [1, 1])
    with pytest.raises(MergeInputError, match="DoRA"):
        run_merge(config, tmp_path / "out", MergeOptions(quiet=True))


def _rank_zero(data: bytes) -> bytes:
    """The same adapter file with every factor pair cut to rank 0."""
    from safetensors.torch import load, save

    tensors = load(data)
    return save({k: v[:0] if ".lora_A" in k else v[:, :0] for k, v in tensors.items()})


def _broken_copy(tmp_path, adapter_dir, name, config_edit=None, weights=None):
    broken = tmp_path / name
    shutil.copytree(adapter_dir, broken)
    if config_edit is not None:
        text = (broken / "adapter_config.json").read_text()
        (broken / "adapter_config.json").write_text(config_edit(json.loads(text)))
    if weights is not None:
        data = (broken / "adapter_model.safetensors").read_bytes()
        (broken / "adapter_model.safetensors").write_bytes(weights(data))
    return broken


@pytest.mark.parametrize("name, config_edit, weights, fragment", [
    ("list_config", lambda c: "[1, 2]", None, "not an object"),
    ("text_alpha", lambda c: json.dumps({**c, "lora_alpha": "eight"}), None, "lora_alpha"),
    ("nan_alpha", lambda c: json.dumps({**c, "lora_alpha": float("nan")}), None, "lora_alpha"),
    ("list_alpha_pattern", lambda c: json.dumps({**c, "alpha_pattern": ["q_proj"]}), None,
     "alpha_pattern"),
    ("bad_regex", lambda c: json.dumps({**c, "alpha_pattern": {"(": 4}}), None,
     "regular expression"),
    ("truncated_weights", None, lambda b: b[:len(b) // 2], "adapter_model.safetensors"),
    ("rank_zero", None, lambda b: _rank_zero(b), "rank 0"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_knots_refuses_broken_adapters_by_name(tmp_path, adapter_dirs, name, config_edit, weights,
                                               fragment):
    broken = _broken_copy(tmp_path, adapter_dirs[1], name, config_edit, weights)
    config = write_config(tmp_path, "knots", [adapter_dirs[0], broken], [1, 1])
    with pytest.raises(FastmergeError, match=fragment):
        run_merge(config, tmp_path / "out", MergeOptions(quiet=True))
    assert not (tmp_path / "out").exists()


def test_knots_refuses_slices(tmp_path, adapter_dirs):
    config = tmp_path / "slices.yml"
    config.write_text(f"merge_method: knots\nslices:\n  - sources:\n"
                      f"      - model: {adapter_dirs[0]}\n        layer_range: [0, 2]\n"
                      f"      - model: {adapter_dirs[1]}\n        layer_range: [0, 2]\n")
    with pytest.raises(ConfigError, match="models:"):
        run_merge(config, tmp_path / "out", MergeOptions(quiet=True))
