"""fastmerge.ContinualMerger (OPCM) against the step-by-step reference with full SVDs
(ops/_reference/subspace.py: opcm, opcm_project)."""
import gc
import weakref

import pytest
import torch

import fastmerge
from fastmerge.errors import InvalidArgumentError
from fastmerge.ops._reference import subspace as ref

SHAPES = {"layer.weight": (48, 32), "wide.weight": (16, 40), "layer.bias": (48,), "scale": ()}


def states(count, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = []
    for _ in range(count):
        models.append({k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(dtype)
                       for k, v in base.items()})
    return {k: v.to(dtype) for k, v in base.items()}, models


def merge(base, models, **kwargs):
    merger = fastmerge.ContinualMerger(base, **kwargs)
    for m in models:
        merger.add(m)
    return merger


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("exact,tol", [(True, 1e-5), (False, 1e-4)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_matches_the_reference(exact, tol, alpha, device):
    base, models = states(5, seed=1)
    on = lambda state: {k: v.to(device) for k, v in state.items()}  # noqa: E731
    ours = merge(on(base), [on(m) for m in models], alpha=alpha, exact=exact).state_dict()
    assert all(v.device.type == device.type for v in ours.values())
    ours = {k: v.cpu() for k, v in ours.items()}
    expected = ref.opcm(base, models, alpha)
    for k in base:
        delta_ours, delta_ref = ours[k] - base[k], expected[k] - base[k]
        assert rel_err(delta_ours, delta_ref) < tol, k


@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (25, 25)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.99, 1.0])
def test_fast_cleaning_equals_zeroing_in_the_singular_bases(shape, alpha):
    from fastmerge.continual import _clean

    g = torch.Generator().manual_seed(2)
    previous, task = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    assert rel_err(_clean(previous, task, alpha), ref.opcm_project(previous, task, alpha)) < 1e-5


def test_cleaning_removes_the_top_block_and_the_diagonal():
    g = torch.Generator().manual_seed(3)
    previous, task = torch.randn(20, 12, generator=g), torch.randn(20, 12, generator=g)
    cleaned = ref.opcm_project(previous, task, 0.5)
    u, s, vh = torch.linalg.svd(previous, full_matrices=True)
    split = ref.opcm_split(s, 0.5)
    inner = u.T @ cleaned @ vh.T
    assert split > 0
    assert float(inner[:split, :split].abs().max()) < 1e-5
    assert float(inner.diagonal().abs().max()) < 1e-5
    assert float(inner[split:, :split].abs().max()) > 1e-2  # the rest is kept


def test_one_model_is_returned_as_is_and_dtypes_follow_the_base():
    base, models = states(1, seed=4, dtype=torch.bfloat16)
    out = merge(base, models).state_dict()
    for k in base:
        assert out[k].dtype == torch.bfloat16
        assert torch.equal(out[k], models[0][k])


def test_the_merger_keeps_no_reference_to_added_models():
    base, models = states(3, seed=5)
    merger = fastmerge.ContinualMerger(base)
    probe = weakref.ref(models[1]["layer.weight"])
    for m in models:
        merger.add(m)
    models.clear()
    gc.collect()
    assert probe() is None
    assert merger.count == 3


def test_the_norm_of_the_merged_task_vector_is_the_mean_norm():
    base, models = states(4, seed=6)
    merged = merge(base, models).state_dict()

    def norm(state):
        return float(torch.sqrt(sum(((state[k] - base[k]) ** 2).sum() for k in base)))

    expected = sum(norm(m) for m in models) / len(models)
    assert abs(norm(merged) - expected) < 1e-4 * expected


@pytest.mark.parametrize("kwargs", [dict(alpha=1.5), dict(alpha="x"), dict(exact=1)])
def test_bad_arguments(kwargs):
    base, _ = states(1)
    with pytest.raises(InvalidArgumentError):
        fastmerge.ContinualMerger(base, **kwargs)


def test_integer_buffers_are_carried_over_from_the_base():
    base, models = states(2)
    base = {**base, "steps": torch.tensor(7), "index": torch.arange(4)}
    merger = fastmerge.ContinualMerger(base)
    for m in models:
        merger.add({**m, "steps": torch.tensor(99), "index": torch.arange(4) + 1})
    merged = merger.state_dict()
    assert list(merged) == list(base)
    assert torch.equal(merged["steps"], torch.tensor(7))
    assert torch.equal(merged["index"], torch.arange(4))


def test_non_finite_matrices_are_refused_by_name():
    base, models = states(2)
    merger = fastmerge.ContinualMerger(base)
    merger.add(models[0])
    bad = dict(models[1])
    bad["layer.weight"] = bad["layer.weight"].clone()
    bad["layer.weight"][0, 0] = float("nan")
    with pytest.raises(InvalidArgumentError, match=r"model 1\['layer.weight'\] has 1 NaN/Inf"):
        merger.add(bad)
    for not_a_state in (None, [1, 2]):
        with pytest.raises(InvalidArgumentError, match="state dict"):
            merger.add(not_a_state)


def test_bad_models():
    base, models = states(1)
    merger = fastmerge.ContinualMerger(base)
    with pytest.raises(InvalidArgumentError, match="no model"):
        merger.state_dict()
    with pytest.raises(InvalidArgumentError, match="has no tensor"):
        merger.add({k: v for k, v in models[0].items() if k != "scale"})
    bad = dict(models[0])
    bad["layer.weight"] = torch.zeros(3, 3)
    with pytest.raises(InvalidArgumentError, match="shape"):
        merger.add(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_models_loaded_on_the_cpu_merge_on_the_bases_gpu():
    """One model at a time from torch.load (CPU) into a base on the GPU."""
    base, models = states(3, seed=4)
    on_gpu = merge({k: v.cuda() for k, v in base.items()}, models).state_dict()
    assert all(v.is_cuda for v in on_gpu.values())
    on_cpu = merge(base, models).state_dict()
    for k in base:
        assert rel_err(on_gpu[k].cpu() - base[k], on_cpu[k] - base[k]) < 1e-4, k
