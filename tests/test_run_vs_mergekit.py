"""`fastmerge run` against `mergekit-yaml` (0.1.5) on the same YAML, for every method: the same
tensor names, values within the numerics contract, and a merged model that transformers loads
and runs. Both tools run in-process here (mergekit through its run_merge API) to keep the
suite fast; test_run_cli.py covers the command line."""
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("mergekit")
pytest.importorskip("transformers")

from fastmerge import synthetic  # noqa: E402
from helpers import load_weights  # noqa: E402
from fastmerge.config import parse_config  # noqa: E402
from fastmerge.executor import MergeOptions, run_merge  # noqa: E402

WEIGHTS = (0.6, 0.3, 0.45)


def run_mergekit(text: str, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions as MkOptions, run_merge as mk_run
    import yaml

    mk_run(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
           MkOptions(quiet=True, copy_tokenizer=True, random_seed=0))


def run_fastmerge(text: str, out: Path, tmp: Path) -> None:
    cfg = tmp / "config.yml"
    cfg.write_text(text)
    run_merge(parse_config(text, cfg), out, MergeOptions(quiet=True))


def merge_both(text: str, tmp_path: Path, label: str = ""):
    """The same config merged by fastmerge and by mergekit: (ours, theirs) tensor dicts, with
    the same tensor names asserted."""
    ours_dir, theirs_dir = tmp_path / f"ours{label}", tmp_path / f"theirs{label}"
    run_fastmerge(text, ours_dir, tmp_path)
    run_mergekit(text, theirs_dir)
    ours, theirs = load_weights(ours_dir), load_weights(theirs_dir)
    assert sorted(ours) == sorted(theirs), label
    return ours, theirs


def assert_matches_mergekit(text: str, tmp_path: Path, label: str = ""):
    """merge_both, and every tensor of the same shape and dtype, equal within fp32 reduction
    order; returns (ours, theirs)."""
    ours, theirs = merge_both(text, tmp_path, label)
    for name in theirs:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape and a.dtype == b.dtype, (label, name)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (label, name)
    return ours, theirs


def models_block(family, params) -> str:
    lines = ["models:"]
    for i, path in enumerate(family.experts):
        p = ", ".join(f"{k}: {v[i] if isinstance(v, (list, tuple)) else v}" for k, v in params.items())
        lines += [f"  - model: {path}", f"    parameters: {{{p}}}"]
    return "\n".join(lines)


def config_for(method: str, family, dtype: str) -> str:
    base = f"base_model: {family.base}\n"
    if method == "slerp":
        return (f"merge_method: slerp\n{base}models:\n  - model: {family.base}\n"
                f"  - model: {family.experts[0]}\n"
                f"parameters:\n  t: [{{filter: mlp, value: [0.1, 0.9]}}, {{value: 0.4}}]\n"
                f"dtype: {dtype}\n")
    if method == "nearswap":
        return (f"merge_method: nearswap\n{base}models:\n  - model: {family.base}\n"
                f"  - model: {family.experts[1]}\n"
                f"parameters:\n  t: [0.0005, 0.003]\ndtype: {dtype}\n")
    if method == "model_stock":
        return f"merge_method: model_stock\n{base}{models_block(family, {})}\ndtype: {dtype}\n"
    if method == "arcee_fusion":
        return (f"merge_method: arcee_fusion\n{base}models:\n  - model: {family.base}\n"
                f"  - model: {family.experts[2]}\ndtype: {dtype}\n")
    if method in CONSENSUS_PARAMS:
        return (f"merge_method: {method}\n{base}{models_block(family, {})}\n"
                f"parameters:\n{CONSENSUS_PARAMS[method]}dtype: {dtype}\n")
    if method == "linear":
        return (f"merge_method: linear\n{models_block(family, {'weight': WEIGHTS})}\n"
                f"dtype: {dtype}\n")
    params = {"weight": WEIGHTS}
    if method != "task_arithmetic":
        params["density"] = [0.5, 0.7, 0.3]
    extra = ""
    if "breadcrumbs" in method:
        extra = "  gamma: 0.05\n"
    if "della" in method:
        extra = "  epsilon: 0.1\n"
    # a gradient over layers and a filter, as real configs use them
    return (f"merge_method: {method}\n{base}{models_block(family, params)}\n"
            f"parameters:\n  lambda: [0.8, 1.2]\n{extra}dtype: {dtype}\n")


@pytest.fixture(scope="module")
def family32(tmp_path_factory):
    return synthetic.build_family(tmp_path_factory.mktemp("fp32"), preset="tiny", experts=3,
                                  dtype=torch.float32, seed=3)


# shared parameters of the consensus methods (epsilon near the deltas' size: mixed counts)
CONSENSUS_PARAMS = {
    "ram": "  epsilon: [0.001, 0.003]\n",
    "ramplus_tl": "  epsilon: 0.002\n  r: 0.5\n  alpha: [0.1, 0.6]\n",
    "sce": "  select_topk: [{filter: mlp, value: 0.3}, {value: 1.0}]\n  int8_mask: true\n",
}
DETERMINISTIC = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "linear",
                 "slerp", "nearswap", "model_stock", "ram", "ramplus_tl", "sce", "arcee_fusion"]
RANDOM = ["dare_ties", "dare_linear", "della", "della_linear"]


def _assert_loads_and_runs(out: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.arange(1, 9).reshape(1, -1)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_deterministic_methods_match_mergekit_fp32(method, family32, tmp_path):
    text = config_for(method, family32, "float32")
    ours, theirs = merge_both(text, tmp_path)
    base = load_weights(family32.base)
    for name in theirs:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, name
        ref = base.get(name, b)
        scale = float((b.double() - ref.double()).abs().max()) + 1e-30
        err = float((a.double() - b.double()).abs().max())
        # fp32 on both sides: differences are reduction order (and the few elements tied at
        # the top-k threshold, which mergekit picks arbitrarily and we pick by index)
        mismatch = (a - b).abs() > 1e-5 * scale + 1e-6 * b.abs()
        if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
            assert float(mismatch.float().mean()) < 1e-3, (name, err, scale)
        elif method == "arcee_fusion":
            # mergekit's fp32 KL of close models carries rounding noise (up to ~2% relative
            # here; ours is fp64): elements whose importance sits that close to the threshold
            # may flip (tests/ops/test_consensus.py checks that only those do)
            assert float(mismatch.float().mean()) < 1e-2, (name, err, scale)
        else:
            assert err <= 1e-5 * scale + 1e-6 * float(b.abs().max()), (name, err, scale)
    _assert_loads_and_runs(tmp_path / "ours")


@pytest.mark.parametrize("method", RANDOM)
def test_random_methods_agree_with_mergekit_in_distribution(method, family32, tmp_path):
    text = config_for(method, family32, "float32")
    ours, theirs = merge_both(text, tmp_path)
    base = load_weights(family32.base)
    name = "model.layers.1.mlp.up_proj.weight"
    d_ours = (ours[name] - base[name]).double()
    d_theirs = (theirs[name] - base[name]).double()
    # different random masks, same expected update: similar size, same direction
    ratio = float(d_ours.norm() / d_theirs.norm())
    cos = float(torch.nn.functional.cosine_similarity(d_ours.reshape(-1), d_theirs.reshape(-1), dim=0))
    assert 0.7 < ratio < 1.4 and cos > 0.4, (ratio, cos)
    _assert_loads_and_runs(tmp_path / "ours")


def test_bf16_ties_is_closer_to_the_fp32_merge_than_mergekit(tmp_path):
    fam = synthetic.build_family(tmp_path / "bf16", preset="tiny", experts=3,
                                 dtype=torch.bfloat16, seed=5)
    text = config_for("ties", fam, "bfloat16")
    ours, theirs = merge_both(text, tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    base = load_weights(fam.base)
    name = "model.layers.2.self_attn.q_proj.weight"
    d_ours = ours[name].double() - base[name].double()
    d_theirs = theirs[name].double() - base[name].double()
    cos = float(torch.nn.functional.cosine_similarity(d_ours.reshape(-1), d_theirs.reshape(-1), dim=0))
    assert cos > 0.97, cos
    _assert_loads_and_runs(tmp_path / "ours")


def test_passthrough_layer_stacking_matches_mergekit(family32, tmp_path):
    a, b = family32.base, family32.experts[0]
    text = (f"merge_method: passthrough\nslices:\n"
            f"  - sources: [{{model: {a}, layer_range: [0, 3]}}]\n"
            f"  - sources: [{{model: {b}, layer_range: [1, 4]}}]\n"
            f"dtype: float32\n")
    ours, theirs = merge_both(text, tmp_path)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    import json

    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    _assert_loads_and_runs(tmp_path / "ours")


def _tiny_qwen2(path: Path, layer_types, seed: int) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=len(layer_types), num_attention_heads=4,
                         num_key_value_heads=2, max_window_layers=0, sliding_window=8,
                         use_sliding_window=True, layer_types=list(layer_types))
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def test_layer_stacking_keeps_per_layer_config_lists_loadable(tmp_path):
    """A config with layer_types (Qwen2/3, Gemma 2/3) must list one entry per output layer:
    mergekit stops with the 4-entry list of its reference model; fastmerge takes each stacked
    layer's entry from the layer it copies, and transformers loads the result."""
    full, sliding = "full_attention", "sliding_attention"
    a = _tiny_qwen2(tmp_path / "a", [full, sliding, full, sliding], seed=1)
    b = _tiny_qwen2(tmp_path / "b", [sliding, sliding, full, full], seed=2)
    text = (f"merge_method: passthrough\nslices:\n"
            f"  - sources: [{{model: {a}, layer_range: [0, 3]}}]\n"
            f"  - sources: [{{model: {b}, layer_range: [1, 4]}}]\n"
            f"dtype: float32\n")
    out = tmp_path / "ours"
    run_fastmerge(text, out, tmp_path)
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    assert cfg["layer_types"] == [full, sliding, full, sliding, full, full]
    _assert_loads_and_runs(out)


def test_tied_embeddings_handled_as_mergekit_does(family32, tmp_path):
    """All tied: no lm_head in the output. Untied base with tied experts: the base's head is
    merged with the experts' embeddings."""
    fam = synthetic.build_family(tmp_path / "tied", preset="tiny", experts=2,
                                 dtype=torch.float32, seed=9, tie_word_embeddings=True)
    mixed = (f"merge_method: task_arithmetic\nbase_model: {family32.base}\n"
             f"{models_block(fam, {'weight': WEIGHTS})}\ndtype: float32\n")
    for label, text, has_head in [("tied", config_for("task_arithmetic", fam, "float32"), False),
                                  ("mixed", mixed, True)]:
        ours, theirs = merge_both(text, tmp_path, f"-{label}")
        assert ("lm_head.weight" in ours) == has_head, label
        for name in theirs:
            assert torch.allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6), (label, name)
        _assert_loads_and_runs(tmp_path / f"ours-{label}")


def test_filters_of_a_tied_expert_match_the_heads_name(family32, tmp_path):
    """An expert without lm_head gives its embeddings for the head; its per-model filters
    still match lm_head (the name asked for), not embed_tokens."""
    fam = synthetic.build_family(tmp_path / "tied", preset="tiny", experts=2,
                                 dtype=torch.float32, seed=9, tie_word_embeddings=True)
    text = (f"merge_method: task_arithmetic\nbase_model: {family32.base}\nmodels:\n"
            f"  - model: {fam.experts[0]}\n"
            f"    parameters: {{weight: [{{filter: lm_head, value: 0.9}}, {{value: 0.2}}]}}\n"
            f"  - model: {fam.experts[1]}\n"
            f"    parameters: {{weight: [{{filter: embed, value: 0.7}}, {{value: 0.3}}]}}\n"
            f"dtype: float32\n")
    assert_matches_mergekit(text, tmp_path)


def test_mixed_input_dtypes_without_dtype_merge_in_the_promoted_dtype(family32, tmp_path):
    fam16 = synthetic.build_family(tmp_path / "bf16", preset="tiny", experts=1,
                                   dtype=torch.bfloat16, seed=4)
    text = (f"merge_method: task_arithmetic\nbase_model: {fam16.base}\nmodels:\n"
            f"  - model: {family32.experts[0]}\n    parameters: {{weight: 0.4}}\n"
            f"  - model: {fam16.experts[0]}\n    parameters: {{weight: 0.6}}\n")
    ours, _ = assert_matches_mergekit(text, tmp_path)
    assert all(t.dtype == torch.float32 for t in ours.values())


def test_post_layer_tensors_take_as_many_models_as_the_first_slice(family32, tmp_path):
    """mergekit pairs the last slice's models with the first slice's count of weights: a
    third model that joins in the last slice is left out of the final norm and the head."""
    b, e0, e1 = family32.base, family32.experts[0], family32.experts[1]
    text = (f"merge_method: task_arithmetic\nbase_model: {b}\nslices:\n"
            f"  - sources:\n      - {{model: {b}, layer_range: [0, 2]}}\n"
            f"      - {{model: {e0}, layer_range: [0, 2]}}\n"
            f"  - sources:\n      - {{model: {b}, layer_range: [2, 4]}}\n"
            f"      - {{model: {e0}, layer_range: [2, 4]}}\n"
            f"      - {{model: {e1}, layer_range: [2, 4]}}\n"
            f"parameters:\n  weight: 0.5\ndtype: float32\n")
    assert_matches_mergekit(text, tmp_path)


def test_optional_base_missing_from_a_slice_is_refused_as_mergekit_does(family32, tmp_path):
    e0, e1 = family32.experts[0], family32.experts[1]
    text = (f"merge_method: nuslerp\nbase_model: {family32.base}\nslices:\n  - sources:\n"
            f"      - {{model: {e0}, layer_range: [0, 4], parameters: {{weight: 0.3}}}}\n"
            f"      - {{model: {e1}, layer_range: [0, 4], parameters: {{weight: 0.7}}}}\n"
            f"dtype: float32\n")
    from fastmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="not among the models of a slice"):
        run_fastmerge(text, tmp_path / "ours", tmp_path)
    assert not (tmp_path / "ours").exists()
    with pytest.raises(ValueError, match="Base input is not present"):
        run_mergekit(text, tmp_path / "theirs")


def test_tokenizer_source_base_drops_the_vocabulary_padding_as_mergekit_does(family32, tmp_path):
    """The synthetic tokenizer has fewer tokens than config.vocab_size (padding rows, as in
    Qwen2.5): embeddings and head keep one row per token, and vocab_size follows."""
    import json

    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(family32.base).get_vocab())
    padded = json.loads((family32.base / "config.json").read_text())["vocab_size"]
    assert tokens < padded  # the case under test
    text = (f"merge_method: task_arithmetic\nbase_model: {family32.base}\n"
            f"{models_block(family32, {'weight': WEIGHTS})}\ntokenizer_source: base\n"
            f"dtype: float32\n")
    ours, _ = assert_matches_mergekit(text, tmp_path)
    assert ours["model.embed_tokens.weight"].shape[0] == ours["lm_head.weight"].shape[0] == tokens
    for out in ("ours", "theirs"):
        assert json.loads((tmp_path / out / "config.json").read_text())["vocab_size"] == tokens
    _assert_loads_and_runs(tmp_path / "ours")


def test_tokenizer_source_base_refuses_vocabularies_it_would_have_to_permute(family32, tmp_path):
    import json

    from fastmerge.errors import ConfigError

    expert = tmp_path / "expert"
    shutil.copytree(family32.experts[0], expert)
    tok = json.loads((expert / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[5:7]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (expert / "tokenizer.json").write_text(json.dumps(tok))
    text = (f"merge_method: task_arithmetic\nbase_model: {family32.base}\nmodels:\n"
            f"  - model: {expert}\n    parameters: {{weight: 0.5}}\ntokenizer_source: base\n")
    with pytest.raises(ConfigError, match="2 of the base's tokens other ids"):
        run_fastmerge(text, tmp_path / "ours", tmp_path)


# ---- sphere family: nuslerp, multislerp, karcher ----

from types import SimpleNamespace  # noqa: E402


def sphere_config(case: str, family, dtype: str = "float32") -> str:
    base = f"base_model: {family.base}\n"
    two = {"weight": [0.35, 0.9]}
    experts2 = SimpleNamespace(experts=family.experts[:2])
    if case == "nuslerp_base":  # task vectors, flattened (mergekit's default)
        return f"merge_method: nuslerp\n{base}{models_block(experts2, two)}\ndtype: {dtype}\n"
    if case == "nuslerp_rows":  # no base, per row of the last dim
        return (f"merge_method: nuslerp\n{models_block(experts2, two)}\n"
                f"parameters:\n  nuslerp_flatten: false\ndtype: {dtype}\n")
    if case == "nuslerp_row_wise":  # task vectors, per column (dim 0)
        return (f"merge_method: nuslerp\n{base}{models_block(experts2, two)}\n"
                f"parameters:\n  nuslerp_flatten: false\n  nuslerp_row_wise: true\n"
                f"dtype: {dtype}\n")
    if case == "multislerp_base":
        return (f"merge_method: multislerp\n{base}{models_block(family, {'weight': WEIGHTS})}\n"
                f"dtype: {dtype}\n")
    if case == "multislerp":
        return (f"merge_method: multislerp\n{models_block(family, {'weight': WEIGHTS})}\n"
                f"parameters:\n  normalize_weights: false\n  eps: 1e-7\ndtype: {dtype}\n")
    if case == "karcher":  # the base model is one more input (mergekit ignores base roles)
        return (f"merge_method: karcher\n{base}{models_block(family, {})}\n"
                f"parameters:\n  max_iter: 5\n  tol: 1e-6\ndtype: {dtype}\n")
    raise KeyError(case)


SPHERE_CASES = ["nuslerp_base", "nuslerp_rows", "nuslerp_row_wise", "multislerp_base",
                "multislerp", "karcher"]


@pytest.mark.parametrize("case", SPHERE_CASES)
def test_sphere_methods_match_mergekit_fp32(case, family32, tmp_path):
    ours, theirs = merge_both(sphere_config(case, family32), tmp_path)
    base = load_weights(family32.base)
    with_base = case.endswith("_base") or case == "nuslerp_row_wise"
    for name in theirs:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, name
        ref = base[name].double() if with_base and name in base else torch.zeros_like(b.double())
        # the scale of what was merged: the merged delta with a base, the result without one
        scale = float((b.double() - ref).abs().max()) + 1e-30
        err = float((a.double() - b.double()).abs().max())
        # fp32 on both sides (mergekit's elementwise sums vs our fp64 Gram statistics)
        assert err <= 1e-5 * scale + 1e-6 * float(b.abs().max()), (name, err, scale)
    _assert_loads_and_runs(tmp_path / "ours")


# ---- property test: random configs of the deterministic methods, both tools ----

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_VALUE = st.floats(0.05, 0.95).map(lambda v: round(v, 3))


def _setting(value=_VALUE):
    """A scalar, a gradient over the layers, or a filter list ending in a default."""
    filters = st.lists(st.fixed_dictionaries(
        {"value": st.one_of(value, st.lists(value, min_size=2, max_size=3))},
        optional={"filter": st.sampled_from(["mlp", "self_attn", "q_proj", "norm", "embed"])}),
        min_size=1, max_size=3).map(lambda entries: entries + [{"value": 0.5}])
    return st.one_of(value, st.lists(value, min_size=2, max_size=4), filters)


_SMALL = st.floats(5e-4, 4e-3).map(lambda v: round(v, 5))  # near the deltas' size
# method -> (per-model parameters, global parameters with their value strategies)
_RANDOM_CONFIGS = {
    "task_arithmetic": (["weight"], {"lambda": _VALUE}), "ties": (["weight", "density"], {}),
    "breadcrumbs_ties": (["weight", "density"], {"gamma": _VALUE}), "linear": (["weight"], {}),
    "slerp": ([], {"t": _VALUE}), "nearswap": ([], {"t": _SMALL}), "ram": ([], {"epsilon": _SMALL}),
    "ramplus_tl": ([], {"r": _VALUE, "alpha": _VALUE}), "sce": ([], {"select_topk": _VALUE}),
    "model_stock": ([], {}), "nuslerp": (["weight"], {}), "multislerp": (["weight"], {}),
    "karcher": ([], {}),
}


@st.composite
def _random_config(draw, family):
    method = draw(st.sampled_from(sorted(_RANDOM_CONFIGS)))
    per_model, shared = _RANDOM_CONFIGS[method]
    experts = [str(e) for e in family.experts][:draw(st.integers(1, 3))]
    base = str(family.base)
    doc = {"merge_method": method, "dtype": "float32"}
    if method in ("slerp", "nearswap"):
        experts = [base, experts[0]]
    elif method == "nuslerp":
        experts = [str(e) for e in family.experts[:2]]
    elif method == "model_stock" and len(experts) < 2:
        experts = [str(e) for e in family.experts[:2]]
    elif method in ("multislerp", "karcher"):
        experts = [base] + experts   # the base is one more input
    if method not in ("linear", "nuslerp", "multislerp", "karcher"):
        doc["base_model"] = base
    doc["models"] = [{"model": m, **({"parameters": {p: draw(_setting()) for p in per_model}}
                                     if per_model else {})} for m in experts]
    parameters = {name: draw(_setting(value)) for name, value in shared.items()}
    if parameters:
        doc["parameters"] = parameters
    return doc


def test_random_configs_match_mergekit_fp32(family32, tmp_path):
    import yaml

    base = load_weights(family32.base)

    @settings(deadline=None, suppress_health_check=list(HealthCheck))
    @given(_random_config(family32))
    def check(doc):
        text = yaml.safe_dump(doc)
        for d in ("ours", "theirs"):
            shutil.rmtree(tmp_path / d, ignore_errors=True)
        ours, theirs = merge_both(text, tmp_path)
        for name, b in theirs.items():
            a, ref = ours[name].double(), base.get(name, b).double()
            scale = float((b.double() - ref).abs().max()) + 1e-30
            mismatch = (a - b.double()).abs() > 1e-5 * scale + 1e-6 * b.double().abs()
            # TIES-like: elements tied at the top-k threshold (mergekit keeps arbitrary ones)
            limit = 1e-3 if "ties" in doc["merge_method"] else 0.0
            assert float(mismatch.float().mean()) <= limit, (text, name)

    check()
