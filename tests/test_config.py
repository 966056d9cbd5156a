"""mergekit YAML configs: parsing errors, and parameter values (gradients, filters, precedence)
checked against mergekit 0.1.5's own resolver."""
import math

import pytest

from fastmerge.config import coerce_bool, coerce_float, evaluate_setting, parse_config
from fastmerge.errors import ConfigError, FastmergeError

TIES = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 0.5, density: 0.5}
  - model: b
    parameters: {weight: 0.5, density: 0.5}
dtype: bfloat16
"""


def test_parses_models_config_into_one_slice():
    c = parse_config(TIES)
    assert c.merge_method == "ties" and c.base_model == "base"
    assert [s.model for s in c.slices[0].sources] == ["a", "b"]
    assert c.slices[0].sources[0].parameters == {"weight": 0.5, "density": 0.5}
    assert c.referenced_models() == ["base", "a", "b"]
    assert not c.uses_slices


@pytest.mark.parametrize("text, must_say", [
    (TIES + "frobnicate: 3\n", ["frobnicate", "merge_method", "slices"]),
    (TIES.replace("ties", "magic_merge"), ["magic_merge", "dare_ties", "slerp", "task_arithmetic"]),
    (TIES.replace("weight: 0.5, density", "wieght: 0.5, density"), ["wieght", "weight", "density"]),
    (TIES + "tokenizer_source: union\n", ["union", "base"]),
    (TIES.replace("dtype: bfloat16", "dtype: int4"), ["int4", "bfloat16"]),
    ("merge_method: ties\nbase_model: b\n", ["models", "slices"]),
    (TIES + "slices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n", ["models", "slices"]),
    (TIES.replace("model: a", "model: a+lora"), ["LoRA"]),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [3, 1]}]\n",
     ["layer_range", "[3, 1]"]),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: a}]\n", ["layer_range"]),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: {value: 1, fliter: x}}\n",
     ["fliter"]),
    ("merge_method: [ties\n", ["YAML"]),
])
def test_bad_configs_name_the_problem_and_the_alternatives(text, must_say):
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert isinstance(info.value, FastmergeError)
    for word in must_say:
        assert word in str(info.value), (word, str(info.value))


def test_slices_must_have_equal_lengths():
    text = """
merge_method: slerp
base_model: a
slices:
  - sources:
      - {model: a, layer_range: [0, 4]}
      - {model: b, layer_range: [0, 3]}
parameters: {t: 0.5}
"""
    with pytest.raises(ConfigError, match="same number of layers"):
        parse_config(text)


def test_coercions_follow_yaml_spellings():
    assert coerce_float("1e-3") == 0.001 and coerce_float(2) == 2.0
    assert coerce_bool("yes") is True and coerce_bool("False") is False and coerce_bool(1) is True
    with pytest.raises(ValueError):
        coerce_float("lots")
    with pytest.raises(ValueError):
        coerce_bool("maybe")


# ---- against mergekit's resolver ----

mergekit_config = pytest.importorskip("mergekit.config")


def _mergekit_value(setting, tensor_name, t, kind):
    from mergekit.config import InputModelDefinition, evaluate_setting as mk_evaluate
    from pydantic import TypeAdapter

    parsed = InputModelDefinition.model_validate(
        {"model": "m", "parameters": {"p": setting}}).parameters["p"]
    validate = TypeAdapter(float if kind == "float" else bool).validate_python
    return mk_evaluate(tensor_name, parsed, t, validate=validate)


SETTINGS = [
    0.3, 1, "0.25", [0.0, 1.0], [0.2, 0.8, 0.4], [1, 0.5, 0.25, 0.125, 0.0625],
    [{"filter": "mlp", "value": 0.2}, {"value": 0.7}],
    [{"filter": "self_attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": 0.4}],
    [{"filter": "*", "value": [0.0, 0.5, 1.0]}],
    {"filter": "mlp", "value": 0.9},
    [{"filter": "norm", "value": 0.1}],
]
NAMES = ["model.layers.3.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.norm.weight", "lm_head.weight"]


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("t", [0.0, 0.1, 1 / 3, 0.5, 0.77, 1.0])
def test_float_settings_match_mergekit(setting, t):
    for name in NAMES:
        ours = evaluate_setting(setting, name, t, coerce_float)
        theirs = _mergekit_value(setting, name, t, "float")
        if theirs is None:
            assert ours is None, (name, ours)
        else:
            assert ours is not None and math.isclose(ours, theirs, rel_tol=1e-12, abs_tol=1e-15), \
                (name, ours, theirs)


@pytest.mark.parametrize("setting", [True, "false", [True, False], [False, True, False],
                                     [{"filter": "mlp", "value": [True, False]}, {"value": False}]],
                         ids=str)
@pytest.mark.parametrize("t", [0.0, 0.49, 0.5, 0.99, 1.0])
def test_bool_settings_match_mergekit(setting, t):
    for name in NAMES:
        assert evaluate_setting(setting, name, t, coerce_bool) == \
            _mergekit_value(setting, name, t, "bool")
