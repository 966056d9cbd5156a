"""`fastmerge run` on random mergekit configs: every registered checkpoint method with parameter
values mostly in range, sometimes not (NaN, strings, out-of-range densities), as scalars,
gradients or filter lists, with and without a base. Each run must finish with a model that has
every tensor of the base, written byte for byte the same by the host-kernel (numpy) and torch
paths, or fail with a FastmergeError, never another exception."""
from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import fastmerge.methods.builtin  # noqa: F401  (registers the methods)
from fastmerge import host_kernels, synthetic
from fastmerge.config import parse_config
from fastmerge.errors import FastmergeError
from fastmerge.executor import MergeOptions, run_merge
from fastmerge.methods import registry

CHECKPOINT_METHODS = [m for m in registry.method_names()
                      if registry.get_method(m).inputs == "checkpoints"]
GOOD = {"float": st.floats(0.05, 0.95), "optional_float": st.floats(0.05, 0.95),
        "bool": st.booleans(), "int": st.integers(1, 5)}
BAD = st.sampled_from([-0.5, 1.5, float("nan"), "x", None, 0.0, 1.0])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return synthetic.build_family(tmp_path_factory.mktemp("family"), preset="tiny", experts=3)


def setting(kind: str):
    good = GOOD[kind]
    numeric = kind in ("float", "optional_float")
    gradient = st.lists(good, min_size=2, max_size=4) if numeric else good
    filters = st.lists(st.fixed_dictionaries(
        {"value": good}, optional={"filter": st.sampled_from(["mlp", "self_attn", "q_proj"])}),
        min_size=1, max_size=3)
    return st.one_of(good, good, good, gradient, filters, BAD)


@st.composite
def configs(draw, paths):
    name = draw(st.sampled_from(CHECKPOINT_METHODS))
    spec = registry.get_method(name)
    with_base = spec.uses_base or (spec.optional_base and draw(st.booleans()))
    count = draw(st.integers(1, 3))
    models = paths[1:1 + count]
    shared, per_model = {}, [{} for _ in models]
    for p in spec.parameters:
        if p.required is False and draw(st.integers(0, 3)) == 0:
            continue
        if p.scope == "SHARED" or draw(st.booleans()):
            shared[p.name] = draw(setting(p.kind))
        else:
            for params in per_model:
                params[p.name] = draw(setting(p.kind))
    doc = {"merge_method": name,
           "models": [{"model": m, **({"parameters": p} if p else {})}
                      for m, p in zip(models, per_model)],
           "dtype": draw(st.sampled_from(["bfloat16", "float16", "float32"]))}
    if with_base:
        doc["base_model"] = paths[0]
    if shared:
        doc["parameters"] = shared
    return doc


def _shards(directory):
    return {f.name: f.read_bytes() for f in sorted(directory.glob("*.safetensors"))}


def test_random_configs_merge_or_raise_fastmerge_errors(family, tmp_path, monkeypatch):
    paths = [str(family.base)] + [str(e) for e in family.experts]
    with safe_open(str(next(family.base.glob("*.safetensors"))), "pt") as f:
        some_base_tensor = next(iter(f.keys()))
    outcomes = {"merged": 0, "refused": 0}

    @settings(deadline=None, suppress_health_check=list(HealthCheck))
    @given(configs(paths))
    def run(doc):
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        try:
            run_merge(parse_config(yaml.safe_dump(doc)), out, MergeOptions(quiet=True))
        except FastmergeError:
            outcomes["refused"] += 1
            assert not out.exists() or not (out / "config.json").exists()
            return
        outcomes["merged"] += 1
        # The torch path (CUDA, or dtypes the host kernels do not read) writes the same bytes.
        torch_out = tmp_path / "torch"
        shutil.rmtree(torch_out, ignore_errors=True)
        with monkeypatch.context() as patched:
            patched.setattr(host_kernels, "supports", lambda dtypes: False)
            run_merge(parse_config(yaml.safe_dump(doc)), torch_out, MergeOptions(quiet=True))
        assert _shards(out) == _shards(torch_out), doc
        names = set()
        for shard in out.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as f:
                names.update(f.keys())
                if some_base_tensor in f.keys():
                    assert torch.isfinite(f.get_tensor(some_base_tensor).float()).all()
        assert some_base_tensor in names

    run()
    assert outcomes["merged"] > 0, outcomes
