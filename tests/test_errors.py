"""Bad input raises a fastmerge.FastmergeError subclass whose message names the argument and the
value at fault."""
from __future__ import annotations

import math

import pytest
import torch

import fastmerge
import fastmerge.ops as F


def raises(fn, *fragments):
    with pytest.raises(fastmerge.FastmergeError) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, fastmerge.InvalidArgumentError)
    return message


B = torch.zeros(3, 4)
E = [torch.ones(3, 4), torch.full((3, 4), 2.0)]


def test_error_hierarchy():
    assert issubclass(fastmerge.InvalidArgumentError, fastmerge.FastmergeError)
    assert issubclass(fastmerge.InvalidArgumentError, ValueError)
    assert issubclass(fastmerge.NativeUnavailableError, fastmerge.FastmergeError)


@pytest.mark.parametrize("call", [
    lambda e: F.ties(B, [E[0], e], [1.0, 1.0], 0.5),
    lambda e: F.task_arithmetic(B, [E[0], e], [1.0, 1.0]),
    lambda e: F.dare_linear(B, [E[0], e], [1.0, 1.0], 0.5),
    lambda e: F.della(B, [E[0], e], [1.0, 1.0], 0.5),
    lambda e: F.model_stock(B, [E[0], e]),
])
def test_mismatched_shapes(call):
    raises(lambda: call(torch.ones(4, 3)), "experts[1]", "(4, 3)", "(3, 4)")


def test_mismatched_shapes_other_ops():
    raises(lambda: F.slerp(B, torch.ones(12), 0.5), "other", "(12,)", "(3, 4)")
    raises(lambda: F.linear([B, torch.ones(2, 4)], [1.0, 1.0]), "experts[1]", "(2, 4)")


def test_mismatched_devices():
    meta = torch.empty(3, 4, device="meta")
    raises(lambda: F.ties(B, [E[0], meta], [1.0, 1.0], 0.5), "experts[1]", "meta", "cpu")
    raises(lambda: F.ties(meta, E, [1.0, 1.0], 0.5), "experts[0]", "cpu", "meta")
    raises(lambda: F.slerp(B, meta, 0.5), "other", "meta")
    raises(lambda: F.model_stock(B, [meta, E[0]]), "experts[0]", "meta")
    raises(lambda: F.linear([B, meta], [1.0, 1.0]), "experts[1]", "meta")


@pytest.mark.parametrize("int_dtype", [torch.int32, torch.int64, torch.int8, torch.bool,
                                       torch.uint8])
def test_integer_dtypes(int_dtype):
    bad = torch.zeros(3, 4, dtype=int_dtype)
    name = str(int_dtype)
    raises(lambda: F.ties(bad, E, [1.0, 1.0], 0.5), "base", name)
    raises(lambda: F.ties(B, [E[0], bad], [1.0, 1.0], 0.5), "experts[1]", name)
    raises(lambda: F.magnitude_mask(bad, 0.5), "x", name)
    raises(lambda: F.slerp(B, bad, 0.5), "other", name)
    raises(lambda: F.model_stock(bad, E), "base", name)


def test_complex_dtype():
    bad = torch.zeros(3, 4, dtype=torch.complex64)
    raises(lambda: F.task_arithmetic(B, [bad], 1.0), "experts[0]", "complex64")


@pytest.mark.parametrize("density", [-0.1, 1.5, float("nan"), float("inf")])
def test_density_outside_unit_interval(density):
    text = repr(float(density)) if math.isfinite(density) else str(float(density))
    raises(lambda: F.ties(B, E, [1.0, 1.0], density), "density", text)
    raises(lambda: F.magnitude_mask(B, density), "density", text)
    raises(lambda: F.dare_drop(B, density), "density", text)
    raises(lambda: F.ties(B, E, [1.0, 1.0], [0.5, density]), "density[1]", text)


def test_per_expert_lists_of_wrong_length():
    raises(lambda: F.ties(B, E, [1.0, 1.0, 1.0], 0.5), "weight", "3", "2 experts")
    raises(lambda: F.ties(B, E, [1.0, 1.0], [0.5]), "density", "2 experts")
    raises(lambda: F.ties(B, E, "heavy", 0.5), "weight", "'heavy'")


def test_empty_expert_list():
    raises(lambda: F.ties(B, [], [], 0.5), "experts", "0")
    raises(lambda: F.task_arithmetic(B, [], 1.0), "experts", "0")
    raises(lambda: F.linear([], 1.0), "experts", "0")
    raises(lambda: F.model_stock(B, [E[0]]), "experts", "at least 2", "1")
    raises(lambda: F.ties(B, E[0], 1.0, 0.5), "experts", "single tensor")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights(value):
    raises(lambda: F.ties(B, E, [1.0, value], 0.5), "weight[1]", str(value))
    message = raises(lambda: F.task_arithmetic(B, E, value), "weight", str(value))
    assert "weight[" not in message  # one value given: named as given
    raises(lambda: F.linear(E, torch.tensor([value, 1.0])), "weight[0]", str(value))
    raises(lambda: F.ties(B, E, [1.0, 1.0], 0.5, lambda_=value), "lambda_", str(value))
    raises(lambda: F.slerp(B, E[0], value), "t", str(value))


@pytest.mark.parametrize("density,epsilon", [(0.5, 0.6), (0.1, 0.1), (0.9, 0.15), (0.3, 0.5)])
def test_della_epsilon_out_of_range(density, epsilon):
    msg = raises(lambda: F.della(B, E, [1.0, 1.0], density, epsilon=epsilon), "epsilon",
                 str(epsilon), str(density))
    assert "expert 0" in msg
    raises(lambda: F.della_linear(B, E, [1.0, 1.0], [0.5, density], epsilon=[0.1, epsilon]),
           "expert 1", str(epsilon))


def test_della_epsilon_outside_unit_interval():
    raises(lambda: F.della(B, E, [1.0, 1.0], 0.5, epsilon=-0.1), "epsilon", "-0.1")
    raises(lambda: F.della(B, E, [1.0, 1.0], 0.5, epsilon=1.5), "epsilon", "1.5")


def test_gamma_outside_unit_interval():
    raises(lambda: F.breadcrumbs(B, E, [1.0, 1.0], 0.5, gamma=-0.5), "gamma", "-0.5")


def test_bad_enumerations_and_scalars():
    raises(lambda: F.generalized_task_arithmetic(B, E, 1.0, sparsification="topk"),
           "sparsification", "'topk'")
    raises(lambda: F.generalized_task_arithmetic(B, E, 1.0, consensus="majority"),
           "consensus", "'majority'")
    raises(lambda: F.dare_ties(B, E, 1.0, 0.5, seed=-1), "seed", "-1")
    raises(lambda: F.dare_ties(B, E, 1.0, 0.5, seed=2**64), "seed", str(2**64))
    raises(lambda: F.dare_ties(B, E, 1.0, 0.5, seed=1.5), "seed", "1.5")
    raises(lambda: F.dare_ties(B, E, 1.0, 0.5, name=7), "name", "7")
    raises(lambda: F.ties(B, E, 1.0, 0.5, out_dtype=torch.int32), "out_dtype", "int32")
    raises(lambda: F.model_stock(B, E, filter_wise="yes"), "filter_wise", "'yes'")
    raises(lambda: F.slerp(B, E[0], "half"), "t", "'half'")
    raises(lambda: F.ties("base", E, 1.0, 0.5), "base", "str")


# ---- property test: any argument types give a result or a FastmergeError ----

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_tensors = st.builds(lambda shape, dtype: torch.randn(shape).to(dtype),
                     st.lists(st.integers(0, 4), max_size=3),
                     st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                      torch.int32, torch.bool]))
_anything = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(),
                      st.text(max_size=3), st.lists(st.floats(), max_size=4), _tensors,
                      st.lists(_tensors, max_size=3))

# Each op called with a tensor x, a tensor list (or anything) xs, and three arbitrary values.
_CALLS = {
    "ties": lambda x, xs, a, b, c: F.ties(x, xs, a, b),
    "dare_ties": lambda x, xs, a, b, c: F.dare_ties(x, xs, a, b, seed=c),
    "task_arithmetic": lambda x, xs, a, b, c: F.task_arithmetic(x, xs, a, lambda_=b),
    "linear": lambda x, xs, a, b, c: F.linear(xs, a, normalize=b),
    "breadcrumbs": lambda x, xs, a, b, c: F.breadcrumbs(x, xs, a, b, gamma=c),
    "della": lambda x, xs, a, b, c: F.della(x, xs, a, b, epsilon=c),
    "slerp": lambda x, xs, a, b, c: F.slerp(x, x, a),
    "nearswap": lambda x, xs, a, b, c: F.nearswap(x, x, a),
    "model_stock": lambda x, xs, a, b, c: F.model_stock(x, xs, filter_wise=a),
    "magnitude_mask": lambda x, xs, a, b, c: F.magnitude_mask(x, a),
    "nuslerp": lambda x, xs, a, b, c: F.nuslerp(a, x, x, dim=b),
    "multislerp": lambda x, xs, a, b, c: F.multislerp(xs, a, eps=b),
    "karcher": lambda x, xs, a, b, c: F.karcher(xs, alphas=a, max_iter=b, tol=c),
    "sce": lambda x, xs, a, b, c: F.sce(x, xs, select_topk=a),
    "ram": lambda x, xs, a, b, c: F.ram(x, xs, epsilon=a),
    "arcee_fusion": lambda x, xs, a, b, c: F.arcee_fusion(x, x),
    "tsv": lambda x, xs, a, b, c: F.tsv(x, xs, alpha=a, exact=b),
    "iso_cts": lambda x, xs, a, b, c: F.iso_cts(x, xs, common_space_fraction=a),
    "batched_svd": lambda x, xs, a, b, c: F.batched_svd(x),
    "randomized_svd": lambda x, xs, a, b, c: F.randomized_svd(x, a, oversample=b, n_iter=c),
    "polar": lambda x, xs, a, b, c: F.polar(x),
    "tome_match": lambda x, xs, a, b, c: F.tome_match(x, a, class_token=b),
    "kv_merge": lambda x, xs, a, b, c: F.kv_merge(x, x, x, ratio=a, eps=b, sigma=c, window=2,
                                                  sinks=1),
    "ties_options": lambda x, xs, a, b, c: F.ties(x, xs, 1.0, 0.5, normalize=a, consensus=b,
                                                  lambda_=c),
    "dare_options": lambda x, xs, a, b, c: F.dare_linear(x, xs, 1.0, 0.5, seed=a, name=b,
                                                         rescale=c),
    "out_dtype": lambda x, xs, a, b, c: F.task_arithmetic(x, xs, 1.0, out_dtype=a),
    "nuslerp_options": lambda x, xs, a, b, c: F.nuslerp(0.5, x, x, dim=a, flatten=b, eps=c),
    "knots": lambda x, xs, a, b, c: F.knots(xs, xs, weights=a),
    "lowrank_svd": lambda x, xs, a, b, c: F.lowrank_svd(xs, b, weights=a),
    "tome_merge": lambda x, xs, a, b, c: F.tome_merge(x, F.tome_match(x, 1), a),
}


@pytest.mark.skipif(not fastmerge.build_info()["native"], reason="needs fastmerge._C")
def test_native_checks_raise_a_fastmerge_error():
    """A check in C++ (here: merge maps that index past the tokens) is a NativeKernelError,
    which the CLI reports without a traceback, not a bare RuntimeError."""
    maps = F.tome_match(torch.randn(2, 33, 16), 8)
    corrupt = maps._replace(members=maps.members.clone().fill_(10**6))
    with pytest.raises(fastmerge.errors.NativeKernelError, match="corrupt merge members"):
        F.tome_merge(torch.randn(2, 33, 5), corrupt)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")
def test_sparse_inputs_are_refused_by_name():
    raises(lambda: F.linear([E[0].to_sparse(), E[1]], 0.5), "experts[0]", "sparse_coo",
           "to_dense")
    raises(lambda: F.ties(B.to_sparse_csr(), E, 1.0, 0.5), "base", "sparse_csr")


def test_outputs_sharing_memory_are_refused():
    out = torch.empty(1).expand(12).reshape(3, 4)
    raises(lambda: F.ties(B, E, 1.0, 0.5, out=out), "out", "share memory")
    rows_overlap = torch.empty(10).as_strided((3, 4), (2, 1))
    raises(lambda: F.ties(B, E, 1.0, 0.5, out=rows_overlap), "out", "share memory")
    for fine in (torch.empty(4, 3).mT, torch.empty(3, 8)[:, ::2], torch.empty(6, 4)[1:4]):
        assert torch.equal(F.ties(B, E, 1.0, 0.5, out=fine), F.ties(B, E, 1.0, 0.5))
    negated = torch.zeros(3, 4)._neg_view()
    raises(lambda: F.ties(B, E, 1.0, 0.5, out=negated), "out", "negated")


def test_lazily_negated_inputs_are_read_negated():
    """torch's neg bit (e.g. the imaginary part of a conjugate) is not in the stored values
    DLPack hands over: inputs are resolved first."""
    negated = torch.randn(3, 4)._neg_view()
    assert negated.is_neg()
    plain = negated.resolve_neg()
    assert torch.equal(F.linear([negated], 1.0), plain)
    assert torch.equal(F.task_arithmetic(negated, E, 0.5), F.task_arithmetic(plain, E, 0.5))
    assert torch.equal(F.ties(B, [negated, E[1]], 1.0, 0.5), F.ties(B, [plain, E[1]], 1.0, 0.5))


def test_tome_ops_check_their_maps():
    x = torch.randn(2, 9, 4)
    for call in (lambda: F.tome_merge(x, None), lambda: F.tome_unmerge(x, (1, 2)),
                 lambda: F.tome_merge_source(None, "maps")):
        raises(call, "maps must be the TomeMaps")


def test_zero_dim_arrays_and_tensors_are_scalars():
    """A scalar argument given as a 0-d tensor or numpy array (torch.tensor(0.5), a value read
    with numpy) is that number; a 0-d bool is refused as a bool is."""
    import numpy as np

    x = torch.arange(-5.0, 7.0)
    for zero_dim in (np.array(0.25), torch.tensor(0.25)):
        assert torch.equal(F.magnitude_mask(x, zero_dim), F.magnitude_mask(x, 0.25))
        assert torch.equal(F.slerp(B, E[0], zero_dim), F.slerp(B, E[0], 0.25))
        assert torch.equal(F.ties(B, E, zero_dim, 0.5), F.ties(B, E, 0.25, 0.5))
    raises(lambda: F.slerp(B, E[0], np.array(True)), "t must be a real number")
    raises(lambda: F.magnitude_mask(x, torch.tensor(True)), "density must be a real number")


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5])
def test_randomized_svd_seed_range(seed):
    raises(lambda: F.randomized_svd(torch.randn(8, 6), 2, seed=seed), "seed")


@given(op=st.sampled_from(sorted(_CALLS)), x=_tensors,
       xs=st.one_of(st.lists(_tensors, min_size=1, max_size=3), _anything),
       a=_anything, b=_anything, c=_anything)
def test_property_any_arguments_give_a_result_or_a_fastmerge_error(op, x, xs, a, b, c):
    try:
        _CALLS[op](x, xs, a, b, c)
    except fastmerge.FastmergeError:
        pass
