"""fastmerge.integrations.mergekit: mergekit's own entry points (merge_tensors,
merge_state_dicts, run_merge, the mergekit-yaml CLI) with and without the patch."""
import warnings

import pytest
import torch

pytest.importorskip("mergekit")

from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.api import merge_state_dicts, merge_tensors  # noqa: E402

from fastmerge.integrations import mergekit as fmk  # noqa: E402
from helpers import spy_on_ops  # noqa: E402

WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(autouse=True)
def restore_registry():
    before = dict(registry._METHODS)
    yield
    fmk.unpatch()
    assert registry._METHODS == before


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into the fastmerge ops, to tell the kernels from mergekit's own code."""
    return spy_on_ops(monkeypatch, ("generalized_task_arithmetic", "linear", "slerp", "nearswap",
                                    "model_stock", "ram", "ramplus_tl", "sce", "arcee_fusion"))


def group(shape=(300, 200), experts=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    ex = [base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(experts)]
    return base.to(dtype), [e.to(dtype) for e in ex]


CASES = {
    "task_arithmetic": {"weight": WEIGHTS, "lambda": 0.8},
    "ties": {"weight": WEIGHTS, "density": [0.5, 0.7, 0.3]},
    "breadcrumbs": {"weight": WEIGHTS, "density": 0.6, "gamma": 0.05},
    "breadcrumbs_ties": {"weight": WEIGHTS, "density": 0.6, "gamma": 0.05},
    "linear": {"weight": [0.1] + WEIGHTS},
    "model_stock": {"filter_wise": True},
}


@pytest.mark.parametrize("method", list(CASES))
def test_deterministic_methods_match_mergekit_fp32(method, kernel_calls):
    base, experts = group()
    inputs = [base] + experts
    want = merge_tensors(inputs, method, parameters=CASES[method], base_index=0, name="w")
    assert kernel_calls == []
    with fmk.patch():
        got = merge_tensors(inputs, method, parameters=CASES[method], base_index=0, name="w")
    assert kernel_calls, "the patched method did not run a fastmerge kernel"
    scale = float((want - base).abs().max())
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        # elements tied at the top-k threshold may differ; none are in continuous inputs
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * scale)
    else:
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * scale)


def test_slerp_and_nearswap_match_mergekit(kernel_calls):
    base, (other,) = group(experts=1)
    want = merge_tensors([base, other], "slerp", parameters={"t": 0.3}, base_index=0)
    near = merge_tensors([base, other], "nearswap", parameters={"t": 0.05}, base_index=0)
    with fmk.patch():
        got = merge_tensors([base, other], "slerp", parameters={"t": 0.3}, base_index=0)
        got_near = merge_tensors([base, other], "nearswap", parameters={"t": 0.05}, base_index=0)
    assert kernel_calls == ["slerp", "nearswap"]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_near, near)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_agree_in_distribution_and_follow_torch_seed(method, kernel_calls):
    base, experts = group(shape=(400, 300))
    params = {"weight": WEIGHTS, "density": 0.5}
    if "della" in method:
        params["epsilon"] = 0.1
    want = merge_tensors([base] + experts, method, parameters=params, base_index=0, name="w")
    with fmk.patch():
        torch.manual_seed(7)
        got = merge_tensors([base] + experts, method, parameters=params, base_index=0, name="w")
        torch.manual_seed(7)
        again = merge_tensors([base] + experts, method, parameters=params, base_index=0, name="w")
        torch.manual_seed(8)
        other = merge_tensors([base] + experts, method, parameters=params, base_index=0, name="w")
    assert kernel_calls
    assert torch.equal(got, again) and not torch.equal(got, other)
    d_got, d_want = (got - base).reshape(-1), (want - base).reshape(-1)
    ratio = float(d_got.norm() / d_want.norm())
    cos = float(torch.nn.functional.cosine_similarity(d_got, d_want, dim=0))
    assert 0.8 < ratio < 1.25 and cos > 0.4, (ratio, cos)


def test_bf16_patched_is_closer_to_the_fp32_merge():
    base, experts = group(dtype=torch.bfloat16)
    params = {"weight": WEIGHTS, "density": 0.5}
    exact = merge_tensors([base.float()] + [e.float() for e in experts], "ties",
                          parameters=params, base_index=0)
    theirs = merge_tensors([base] + experts, "ties", parameters=params, base_index=0)
    with fmk.patch():
        ours = merge_tensors([base] + experts, "ties", parameters=params, base_index=0)
    assert ours.dtype == torch.bfloat16
    delta = (exact - base.float()).norm()
    assert (ours.float() - exact).norm() / delta < (theirs.float() - exact).norm() / delta


def test_merge_state_dicts_through_the_patch(kernel_calls):
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.LayerNorm(16)) for _ in range(3)]
    states = [m.state_dict() for m in models]
    params = {"weight": [0.6, 0.4], "density": 0.5}
    want = merge_state_dicts(states, "ties", parameters=params, base=0)
    with fmk.patch():
        got = merge_state_dicts(states, "ties", parameters=params, base=0)
    assert kernel_calls and sorted(got) == sorted(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name


def test_fallbacks_warn_once_and_give_mergekit_results(kernel_calls):
    base, experts = group()
    params = {"weight": WEIGHTS, "density": 0.5}
    leaf = base.clone().requires_grad_(True)
    want = merge_tensors([leaf] + experts, "ties", parameters=params, base_index=0)
    with fmk.patch():
        with pytest.warns(RuntimeWarning, match="require grad"):
            got = merge_tensors([leaf] + experts, "ties", parameters=params, base_index=0)
        assert got.requires_grad and torch.equal(got, want)
        d64 = [t.double() for t in [base] + experts]
        with pytest.warns(RuntimeWarning, match="float32/float16/bfloat16"):
            got64 = merge_tensors(d64, "ties", parameters=params, base_index=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once only
            merge_tensors(d64, "ties", parameters=params, base_index=0)
    assert kernel_calls == []
    assert torch.equal(got64, merge_tensors(d64, "ties", parameters=params, base_index=0))


@pytest.mark.parametrize("method,params", [
    ("ties", {"weight": WEIGHTS, "density": 1.5}),
    ("breadcrumbs", {"weight": WEIGHTS, "density": -0.1, "gamma": 0.01}),
    ("linear", {"weight": [1e-9, 0.0, 0.0, 0.0]}),    # normalised by a sum below 1e-8
    ("linear", {"weight": [0.0, 0.1, 0.2, -0.3]}),    # a float32 sum of exactly 0
], ids=str)
def test_arguments_the_kernels_do_not_take_go_to_mergekit(method, params, kernel_calls):
    """Densities outside [0, 1] and linear weights summing to (almost) zero: mergekit merges
    them (or divides by zero), so its own code serves them, with the same result."""
    base, experts = group(shape=(7, 5))
    inputs = [base] + experts
    want = merge_tensors(inputs, method, parameters=params, base_index=0, name="w")
    with fmk.patch(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mergekit's own ... serves", once
        got = merge_tensors(inputs, method, parameters=params, base_index=0, name="w")
    assert kernel_calls == []
    assert torch.equal(got.nan_to_num(7.0, 8.0, 9.0), want.nan_to_num(7.0, 8.0, 9.0))


@pytest.mark.parametrize("method,params", [("ramplus_tl", {"r": 0.3, "alpha": 0.5}),
                                           ("arcee_fusion", {})], ids=str)
def test_half_precision_results_keep_mergekit_s_float32(method, params, kernel_calls):
    base, experts = group(shape=(40, 30), dtype=torch.bfloat16)
    inputs = [base] + experts[:1 if method == "arcee_fusion" else 3]
    want = merge_tensors(inputs, method, parameters=params, base_index=0, name="w")
    with fmk.patch():
        got = merge_tensors(inputs, method, parameters=params, base_index=0, name="w")
    assert kernel_calls
    assert want.dtype == got.dtype == torch.float32


def test_karcher_of_0d_half_tensors_keeps_mergekit_s_float32():
    inputs = [torch.tensor(v, dtype=torch.bfloat16) for v in (1.5, -0.5, 0.25)]
    want = merge_tensors(inputs, "karcher", parameters={})
    with fmk.patch():
        got = merge_tensors(inputs, "karcher", parameters={})
    assert want.dtype == got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6)


def test_mergekit_yaml_leaves_the_caller_s_patches_in_place(tmp_path):
    from fastmerge import cli

    fmk.patch(["ties"])

    assert cli.main(["mergekit-yaml", "--help"]) == 0
    assert fmk.is_patched("ties") and not fmk.is_patched("slerp")


def test_patch_and_unpatch_swap_registry_entries():
    original = registry._METHODS["ties"]
    handle = fmk.patch(["ties"])
    assert fmk.is_patched("ties") and registry._METHODS["ties"] is not original
    assert registry._METHODS["ties"].spec is original.spec
    assert not fmk.is_patched("slerp")
    fmk.patch(["ties"])  # idempotent
    fmk.unpatch()
    assert registry._METHODS["ties"] is original and not fmk.is_patched("ties")
    assert "ties" in repr(handle)
    with pytest.raises(fmk.FastmergeError, match="passthrough"):
        fmk.patch(["passthrough"])


def test_unsupported_mergekit_version_is_refused(monkeypatch):
    original = registry._METHODS["ties"]
    monkeypatch.setattr(fmk.metadata, "version", lambda name: "0.2.0")
    with pytest.raises(fmk.MergekitVersionError, match="0.2.0"):
        fmk.patch()
    assert registry._METHODS["ties"] is original


def test_mergekit_yaml_command_runs_patched(tmp_path, kernel_calls):
    from safetensors.torch import load_file

    from fastmerge import cli, synthetic

    fam = synthetic.build_family(tmp_path / "m", preset="tiny", experts=2, dtype=torch.float32)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {fam.base}\nmodels:\n"
                   + "".join(f"  - model: {e}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                             for e in fam.experts))
    assert cli.main(["mergekit-yaml", str(cfg), str(tmp_path / "out")]) == 0
    assert kernel_calls and not fmk.is_patched()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    import yaml

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(cfg.read_text())),
              str(tmp_path / "plain"), MergeOptions(quiet=True))
    ours, theirs = load_file(tmp_path / "out" / "model.safetensors"), load_file(
        tmp_path / "plain" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5), name


CONSENSUS_CASES = {
    "ram": {"epsilon": 0.05},
    "ramplus_tl": {"r": 0.3, "alpha": 0.5, "epsilon": 0.05},
    "sce": {"select_topk": 0.4},
}


@pytest.mark.parametrize("method", list(CONSENSUS_CASES))
def test_consensus_methods_match_mergekit_fp32(method, kernel_calls):
    base, experts = group()
    inputs = [base] + experts
    params = CONSENSUS_CASES[method]
    want = merge_tensors(inputs, method, parameters=params, base_index=0, name="w")
    assert kernel_calls == []
    with fmk.patch([method]):
        got = merge_tensors(inputs, method, parameters=params, base_index=0, name="w")
        only_base = merge_tensors([base], method, parameters=params, base_index=0, name="w")
    assert kernel_calls == [method]
    assert torch.equal(only_base, base)
    scale = float((want - base).abs().max())
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * scale)


def test_arcee_fusion_matches_mergekit_fp32(kernel_calls):
    base, (other,) = group(experts=1)
    other = base + 5 * (other - base)  # well-separated importances: no threshold flips
    want = merge_tensors([base, other], "arcee_fusion", parameters={}, base_index=0, name="w")
    with fmk.patch(["arcee_fusion"]):
        got = merge_tensors([base, other], "arcee_fusion", parameters={}, base_index=0, name="w")
    assert kernel_calls == ["arcee_fusion"]
    assert int((got != want).sum()) <= 2


# ---- sphere family: nuslerp, multislerp, karcher ----

@pytest.fixture
def sphere_calls(monkeypatch):
    return spy_on_ops(monkeypatch, ("nuslerp", "multislerp", "karcher"))


SPHERE_CASES = {  # method, parameters, with a base model, experts
    "nuslerp_base": ("nuslerp", {"weight": [0.3, 0.7]}, True, 2),
    "nuslerp_rows": ("nuslerp", {"weight": [0.3, 0.7], "nuslerp_flatten": False}, False, 2),
    "nuslerp_row_wise": ("nuslerp", {"weight": [1.0, 0.5], "nuslerp_flatten": False,
                                     "nuslerp_row_wise": True}, True, 2),
    "multislerp_base": ("multislerp", {"weight": WEIGHTS}, True, 3),
    "multislerp": ("multislerp", {"weight": WEIGHTS, "normalize_weights": False, "eps": 1e-6},
                   False, 3),
    "multislerp_one": ("multislerp", {"weight": [0.4]}, True, 1),
    "karcher": ("karcher", {"max_iter": 5, "tol": 1e-6}, True, 3),  # the base is an input
    "karcher_two": ("karcher", {}, False, 2),
}


@pytest.mark.parametrize("case", list(SPHERE_CASES))
def test_sphere_methods_match_mergekit_fp32(case, sphere_calls):
    method, params, with_base, count = SPHERE_CASES[case]
    base, experts = group(experts=count)
    inputs = ([base] if with_base else []) + experts
    base_index = 0 if with_base else None
    want = merge_tensors(inputs, method, parameters=params, base_index=base_index, name="w")
    assert sphere_calls == []
    with fmk.patch():
        got = merge_tensors(inputs, method, parameters=params, base_index=base_index, name="w")
    assert sphere_calls == [method]
    ref = base if with_base and method != "karcher" else torch.zeros_like(base)
    scale = float((want - ref).abs().max())
    assert got.dtype == want.dtype
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-5 * scale)


def test_sphere_patched_errors_and_fallbacks(sphere_calls):
    base, (x, y) = group(experts=2)
    # more than two inputs whose unit mean vanishes: mergekit's ValueError either way
    inputs, params = [x, -x, y], {"weight": [1.0, 1.0, 0.0]}
    with pytest.raises(ValueError, match="antipodal"):
        merge_tensors(inputs, "multislerp", parameters=params, base_index=None)
    with fmk.patch():
        with pytest.raises(ValueError, match="antipodal"):
            merge_tensors(inputs, "multislerp", parameters=params, base_index=None)
        # weights summing to zero: mergekit divides by zero; its own code serves that
        with pytest.warns(RuntimeWarning, match="multislerp"):
            merge_tensors([x, y], "multislerp", parameters={"weight": [1.0, -1.0]},
                          base_index=None)
    assert sphere_calls == ["multislerp"]


def test_sphere_bf16_patched_is_closer_to_the_fp32_merge():
    base, experts = group(dtype=torch.bfloat16, experts=2)
    for method, params in (("nuslerp", {"weight": [0.3, 0.7]}), ("multislerp", {"weight": [0.5, 0.5]}),
                           ("karcher", {})):
        inputs = [base] + experts
        exact = merge_tensors([t.float() for t in inputs], method, parameters=params, base_index=0)
        theirs = merge_tensors(inputs, method, parameters=params, base_index=0)
        with fmk.patch([method]):
            ours = merge_tensors(inputs, method, parameters=params, base_index=0)
        assert ours.dtype == torch.bfloat16
        ref = base.float() if method != "karcher" else 0
        delta = (exact - ref).norm()
        assert (ours.float() - exact).norm() / delta <= (theirs.float() - exact).norm() / delta, method


# ---- property test: random parameters, patched vs mergekit's own code (fp32) ----

from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_weight = st.floats(-1.0, 2.0).map(lambda v: round(v, 3))
_density = st.floats(0.0, 1.0).map(lambda v: round(v, 3))
_positive = st.floats(0.05, 1.5)


def _per_model(count, values):
    return st.one_of(values, st.lists(values, min_size=count, max_size=count))


# method -> (parameters for n non-base models, base_index used); deterministic methods only
_PARAMETERS = {
    "task_arithmetic": lambda n: st.fixed_dictionaries(
        {"weight": _per_model(n, _weight)}, optional={"lambda": _weight, "normalize": st.booleans()}),
    "ties": lambda n: st.fixed_dictionaries(
        {"weight": _per_model(n, _weight), "density": _per_model(n, _density)},
        optional={"lambda": _weight, "normalize": st.booleans(), "int8_mask": st.booleans()}),
    "breadcrumbs_ties": lambda n: st.fixed_dictionaries(
        {"weight": _per_model(n, _weight), "density": _per_model(n, _density)},
        optional={"gamma": st.floats(0.0, 0.5), "normalize": st.booleans()}),
    "linear": lambda n: st.fixed_dictionaries({"weight": _per_model(n + 1, _weight)},
                                              optional={"normalize": st.booleans()}),
    "model_stock": lambda n: st.fixed_dictionaries({}, optional={"filter_wise": st.booleans()}),
    "slerp": lambda n: st.fixed_dictionaries({"t": _weight}),
    "nearswap": lambda n: st.fixed_dictionaries({"t": st.floats(1e-4, 2.0)}),
    "ramplus_tl": lambda n: st.fixed_dictionaries(
        {}, optional={"epsilon": st.floats(0.0, 0.2), "r": st.floats(0.0, 1.0),
                      "alpha": st.floats(0.0, 1.0)}),
    "sce": lambda n: st.fixed_dictionaries({}, optional={"select_topk": _density}),
    "multislerp": lambda n: st.fixed_dictionaries(
        {"weight": _per_model(n + 1, _positive)}, optional={"normalize_weights": st.booleans()}),
    "karcher": lambda n: st.fixed_dictionaries(
        {}, optional={"max_iter": st.integers(0, 20), "tol": st.sampled_from([1e-5, 1e-3, 0.1])}),
}
_NO_BASE = ("multislerp", "karcher")


@given(method=st.sampled_from(sorted(_PARAMETERS)), models=st.integers(1, 4),
       shape=st.lists(st.integers(1, 12), min_size=1, max_size=2), seed=st.integers(0, 2**20),
       data=st.data())
def test_property_patched_methods_match_mergekit_fp32(method, models, shape, seed, data):
    models = 1 if method in ("slerp", "nearswap") else max(models, 2 if method == "model_stock" else 1)
    parameters = data.draw(_PARAMETERS[method](models), label="parameters")
    base, experts = group(tuple(shape), models, seed=seed)
    base_index = None if method in _NO_BASE else 0
    if method == "model_stock":
        # t = 2 cos / (1 + cos) amplifies fp32-vs-fp64 cosine differences as cos -> -1 (our
        # statistics are fp64, mergekit's fp32): compare where the ratio is well conditioned
        for rows in (1, shape[0] if len(shape) == 2 else 1):  # whole tensor, filter-wise
            a, b = [(e - base).double().reshape(rows, -1) for e in experts[:2]]
            assume(bool((torch.nn.functional.cosine_similarity(a, b, dim=-1) > -0.9).all()))

    def merge():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the zero-sum linear fallback warns
            return merge_tensors([base] + experts, method, parameters=dict(parameters),
                                 base_index=base_index, name="model.layers.0.mlp.up_proj.weight")

    want = merge()
    with fmk.patch():
        got = merge()
    assert got.shape == want.shape and got.dtype == want.dtype
    # a zero-sum normalised linear merge is NaN in both (0/0)
    scale = float((want.double() - base.double()).abs().nan_to_num(0.0).max())
    assert torch.allclose(got.double(), want.double(), rtol=1e-6, atol=1e-5 * scale + 1e-30,
                          equal_nan=True), (method, parameters)
