"""fastmerge.integrations.peft: PEFT's own merge_utils functions and
LoraModel.add_weighted_adapter with and without the patch."""
import contextlib
import inspect
import math
import sys
import types
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

import peft.tuners.lora.model as lora_module  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import merge_utils as mu  # noqa: E402

from fastmerge.integrations import peft as fpeft  # noqa: E402
from helpers import spy_on_ops  # noqa: E402

from conftest import SIGMAS  # noqa: E402

ORIGINAL = {name: getattr(mu, name) for name in fpeft.UTILS_FUNCTIONS}
LORA_NAMES = ("dare_linear", "dare_ties", "magnitude_prune", "task_arithmetic", "ties")
WEIGHTS = torch.tensor([0.6, -0.35, 1.2])


@pytest.fixture(autouse=True)
def restore_peft():
    fpeft._warned.clear()
    yield
    fpeft.unpatch()
    for name, original in ORIGINAL.items():
        assert getattr(mu, name) is original, name
    for name in LORA_NAMES:
        assert getattr(lora_module, name) is ORIGINAL[name], name


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into the fastmerge ops, to tell the kernels from PEFT's own code."""
    return spy_on_ops(monkeypatch, ("generalized_task_arithmetic", "majority_sign_mask",
                                    "disjoint_merge", "lowrank_svd"))


def tasks(shape=(64, 300), count=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(count)]


def distinct_bf16(count=3, seed=0, sign_seed=100):
    """(64, 64) bf16 tensors whose magnitudes are the 4096 distinct bf16 values in
    [2^-20, 2^12), permuted, with random signs: no magnitude ties at any top-k threshold."""
    magnitudes = torch.arange(0x3580, 0x4580, dtype=torch.int16).view(torch.bfloat16)
    assert magnitudes.numel() == 4096 and float(magnitudes[0]) == 2.0 ** -20
    out = []
    for t in range(count):
        g = torch.Generator().manual_seed(seed + t)
        perm = torch.randperm(4096, generator=g)
        sign = torch.where(torch.rand(4096, generator=g) < 0.5, -1.0, 1.0).to(torch.bfloat16)
        out.append((magnitudes[perm] * sign).reshape(64, 64))
    return out


def assert_matches(got, want, rel=1e-6):
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = float(want.abs().max()) if want.numel() else 0.0
    assert torch.allclose(got, want, rtol=rel, atol=rel * scale), float((got - want).abs().max())


# ---------------------------------------------------------------------------------------------
# Deterministic functions: the patched ones give PEFT's results (fp32, tie-free inputs)
# ---------------------------------------------------------------------------------------------

DETERMINISTIC = {
    "task_arithmetic": lambda t, w: mu.task_arithmetic(t, w),
    "magnitude_prune": lambda t, w: mu.magnitude_prune(t, w, 0.3),
    "magnitude_prune_tiny": lambda t, w: mu.magnitude_prune(t, w, 0.001),  # k = 0 on small shapes
    "ties_total": lambda t, w: mu.ties(t, w, 0.3),
    "ties_frequency": lambda t, w: mu.ties(t, w, 0.4, majority_sign_method="frequency"),
    "ties_dense": lambda t, w: mu.ties(t, w, 0.9, "total"),
    "prune_magnitude": lambda t, w: mu.prune(t[0], 0.2, "magnitude"),
    "prune_magnitude_rescale": lambda t, w: mu.prune(t[1], 0.2, "magnitude", rescale=True),
    "magnitude_based_pruning": lambda t, w: mu.magnitude_based_pruning(t[2], 0.45),
    "mask_total": lambda t, w: mu.calculate_majority_sign_mask(torch.stack(t)),
    "mask_frequency": lambda t, w: mu.calculate_majority_sign_mask(torch.stack(t), "frequency"),
    "disjoint_merge": lambda t, w: mu.disjoint_merge(
        torch.stack(t), ORIGINAL["calculate_majority_sign_mask"](torch.stack(t))),
}


@pytest.mark.parametrize("shape", [(4097,), (64, 300), (3, 5, 7), (1,)], ids=str)
@pytest.mark.parametrize("case", sorted(DETERMINISTIC))
def test_deterministic_functions_match_peft_fp32(case, shape, kernel_calls):
    t = tasks(shape)
    want = DETERMINISTIC[case](t, WEIGHTS)
    assert kernel_calls == []
    with fpeft.patch():
        got = DETERMINISTIC[case](t, WEIGHTS)
    assert kernel_calls, "the patched function did not run a fastmerge kernel"
    if want.dtype == torch.bool:
        assert torch.equal(got, want)
    else:
        assert_matches(got, want)


@pytest.mark.parametrize("weights", [torch.tensor(0.7), torch.tensor([0.5]), torch.tensor([[0.2], [-1.0], [0.4]]),
                                     torch.tensor([1, 2, -1]), torch.tensor([0.5, 0.25, 2.0], dtype=torch.bfloat16)],
                         ids=["0d", "one", "column", "int", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_weight_shapes_and_dtypes_give_peft_dtype(weights, dtype, kernel_calls):
    t = [x.to(dtype) for x in distinct_bf16()] if dtype != torch.float32 else tasks((40, 50))
    if dtype == torch.float16:
        t = [x * 2.0 ** -5 for x in t]  # inside float16's range (bf16 values are exact there)
    for fn in (lambda: mu.task_arithmetic(t, weights), lambda: mu.ties(t, weights, 0.5),
               lambda: mu.magnitude_prune(t, weights, 0.5)):
        want = fn()
        with fpeft.patch():
            got = fn()
        assert got.dtype == want.dtype and got.shape == want.shape
        # fastmerge rounds once from fp32: compare against PEFT within the output's rounding
        # plus PEFT's own intermediate roundings when it computes in a 16-bit dtype
        tol = 1e-6 if want.dtype == torch.float32 and dtype == torch.float32 else 2e-2
        assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))
    assert kernel_calls


def _rel_error(x, oracle):
    return float((x.double() - oracle.double()).norm() / oracle.double().norm())


@pytest.mark.parametrize("case", ["task_arithmetic", "ties_total", "magnitude_prune"])
@pytest.mark.parametrize("weights", [WEIGHTS, torch.tensor([1, 2, -1])], ids=["float", "int"])
def test_bf16_at_least_as_close_to_fp32_oracle_as_peft(case, weights):
    t16 = distinct_bf16(seed=3)  # tie-free: the top-k selections are the oracle's
    oracle = DETERMINISTIC[case]([x.float() for x in t16], weights.float())
    peft_result = DETERMINISTIC[case](t16, weights)
    with fpeft.patch():
        ours = DETERMINISTIC[case](t16, weights)
    assert ours.dtype == peft_result.dtype
    # the output dtype's rounding is the floor both share
    assert _rel_error(ours, oracle) <= _rel_error(peft_result, oracle) * 1.001 + 1e-7


# ---------------------------------------------------------------------------------------------
# Random functions: the same distribution (Philox masks, not torch.bernoulli's)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("rescale", [False, True])
def test_random_prune_kept_fraction_and_rescale(density, rescale, kernel_calls):
    x = tasks((300, 700), count=1, seed=4)[0]
    n = x.numel()
    with fpeft.patch():
        torch.manual_seed(0)
        a = mu.prune(x, density, "random", rescale=rescale)
        b = mu.random_pruning(x, density, rescale)
    assert kernel_calls == ["generalized_task_arithmetic"] * 2
    bound = SIGMAS * math.sqrt(n * density * (1 - density)) + 1
    for out in (a, b):
        kept = out != 0
        assert abs(int(kept.sum()) - density * n) <= bound
        expected = x[kept] / density if rescale else x[kept]
        assert torch.allclose(out[kept], expected, rtol=1e-6, atol=0)
    assert not torch.equal(a, b)  # a fresh seed from torch's generator per call


@pytest.mark.parametrize("function", ["dare_linear", "dare_ties"])
def test_dare_moments_match_peft(function, kernel_calls):
    t = tasks((400, 500), seed=5)
    w, density = torch.tensor([0.6, 0.9, 0.3]), 0.3
    torch.manual_seed(1)
    want = getattr(mu, function)(t, w, density)
    with fpeft.patch():
        torch.manual_seed(1)
        got = getattr(mu, function)(t, w, density)
    assert kernel_calls == ["generalized_task_arithmetic"]
    assert got.dtype == want.dtype and got.shape == want.shape
    n = want.numel()
    for stat in (lambda z: (z != 0).double().mean(), lambda z: z.double().abs().mean(),
                 lambda z: z.double().pow(2).mean()):
        a, b = float(stat(got)), float(stat(want))
        assert abs(a - b) <= 0.02 * abs(b), (a, b)
    # unbiased: the mean error against the unpruned merge is noise of the size of its sd
    if function == "dare_linear":
        full = mu.task_arithmetic(t, w)
        for out in (got, want):
            err = (out - full).double()
            assert abs(float(err.mean())) <= SIGMAS * float(err.std()) / math.sqrt(n)


def test_random_functions_follow_torch_manual_seed():
    t = tasks((50, 60), seed=6)
    with fpeft.patch():
        torch.manual_seed(7)
        a = mu.dare_ties(t, WEIGHTS, 0.5)
        torch.manual_seed(7)
        b = mu.dare_ties(t, WEIGHTS, 0.5)
        c = mu.dare_ties(t, WEIGHTS, 0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# LoraModel.add_weighted_adapter on a tiny model
# ---------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 16)

    def forward(self, x):
        return self.fc2(self.fc1(self.emb(x)))


def lora_model(dtype=torch.float32):
    torch.manual_seed(8)
    targets = ["emb", "fc1", "fc2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  init_lora_weights=False), adapter_name="one")
        model.add_adapter("two", LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                            init_lora_weights=False))
        model.add_adapter("three", LoraConfig(r=4, lora_alpha=4, target_modules=targets,
                                              init_lora_weights=False))
    model = model.to(dtype)
    if dtype == torch.bfloat16:
        # Random bf16 factors repeat magnitudes (about 110 distinct in 128), so top-k
        # thresholds fall on ties, which torch.topk and fastmerge break differently. Give
        # every factor distinct magnitudes (random bf16 values of [2^-12, 2^4), signed).
        pool = torch.arange(0x3980, 0x4180, dtype=torch.int16).view(torch.bfloat16)
        g = torch.Generator().manual_seed(10)
        for name, p in model.named_parameters():
            if "lora_" in name:
                pick = pool[torch.randperm(pool.numel(), generator=g)[:p.numel()]]
                sign = torch.where(torch.rand(p.numel(), generator=g) < 0.5, -1.0, 1.0)
                p.data = (pick * sign.to(torch.bfloat16) * 2.0 ** -4).reshape(p.shape)
    return model


def merged_adapter(model, name):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(f".{name}")
            or f".{name}." in k}


def weighted(combination, patched, dtype=torch.float32, seed=9, **kw):
    model = lora_model(dtype)
    torch.manual_seed(seed)
    # The *_svd combinations merge get_delta_weight(), which records autograd: the kernels
    # serve them under no_grad (with grad, PEFT's own functions do, with a warning).
    quiet = torch.no_grad() if combination.endswith("svd") else contextlib.nullcontext()
    with (fpeft.patch() if patched else contextlib.nullcontext()), quiet:
        model.add_weighted_adapter(["one", "two", "three"], [0.7, -0.4, 1.1], "merged",
                                   combination_type=combination, **kw)
    return merged_adapter(model, "merged")


@pytest.mark.parametrize("combination,kw", [
    ("linear", {}),
    ("ties", dict(density=0.5)),
    ("ties", dict(density=0.3, majority_sign_method="frequency")),
    ("magnitude_prune", dict(density=0.4)),
    ("ties_svd", dict(density=0.5)),
    ("svd", {}),
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_weighted_adapter_deterministic_matches_peft(combination, kw, dtype, kernel_calls):
    want = weighted(combination, False, dtype, **kw)
    assert kernel_calls == []
    got = weighted(combination, True, dtype, **kw)
    assert kernel_calls, "add_weighted_adapter did not reach a fastmerge kernel"
    assert want.keys() == got.keys() and len(want) == 6
    for key in want:
        assert got[key].dtype == want[key].dtype  # PEFT leaves *_svd factors in float32
        if dtype == torch.float32 and not combination.endswith("svd"):
            assert_matches(got[key], want[key], rel=1e-6)
        elif not combination.endswith("svd"):
            # PEFT computes in fp32 too (fp32 weights) and rounds to bf16 once, as we do
            assert torch.equal(got[key], want[key]), key
    if dtype == torch.float32 and combination.endswith("svd"):
        assert_same_svd_factors(got, want, rel=1e-4)  # SVD amplifies 1-ulp differences
    if dtype == torch.bfloat16 and combination.endswith("svd"):
        # the merged delta B @ A is bf16 before PEFT's SVD: magnitudes tie at the top-k
        # threshold there, and the kernel keeps other tied elements than torch.topk
        for layer in ("fc1", "fc2"):
            a, b = (f"base_model.model.{layer}.lora_{x}.merged.weight" for x in "AB")
            p_got, p_want = got[b].float() @ got[a].float(), want[b].float() @ want[a].float()
            assert float((p_got - p_want).norm() / p_want.norm()) <= 1e-3


def svd_factor_pairs(adapter):
    """(name, lora_A, lora_B) per layer of a merged adapter's state (embeddings included)."""
    pairs = []
    for key in adapter:
        if ".lora_A." in key or ".lora_embedding_A." in key:
            other = key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
            pairs.append((key, adapter[key], adapter[other]))
    return pairs


def assert_same_svd_factors(got, want, rel):
    """Singular vectors are defined up to sign: the factors must agree component by component
    after matching signs, and so must their products."""
    for key, a_got, b_got in svd_factor_pairs(got):
        a_want, b_want = dict((k, (a, b)) for k, a, b in svd_factor_pairs(want))[key]
        signs = torch.sign((a_got * a_want).sum(dim=1, keepdim=True))  # components: rows of A
        signs[signs == 0] = 1
        assert_matches(a_got * signs, a_want, rel=rel)
        assert_matches(b_got * signs.mT, b_want, rel=rel)
        assert_matches(b_got @ a_got, b_want @ a_want, rel=rel)


def test_add_weighted_adapter_cat_does_not_use_merge_utils(kernel_calls):
    want = weighted("cat", False)
    got = weighted("cat", True)
    assert kernel_calls == []  # cat concatenates the LoRA factors; nothing to merge
    for key in want:
        assert torch.equal(got[key], want[key])


@pytest.mark.parametrize("combination", ["dare_linear", "dare_ties"])
def test_add_weighted_adapter_random_in_distribution(combination, kernel_calls):
    want = weighted(combination, False, density=0.5)
    got = weighted(combination, True, density=0.5)
    assert len(kernel_calls) == 6  # lora_A and lora_B of three layers
    kept_ours = sum(int((v != 0).sum()) for v in got.values())
    kept_peft = sum(int((v != 0).sum()) for v in want.values())
    total = sum(v.numel() for v in want.values())
    # dare_linear keeps an element of the merged factor unless all three draws drop it
    p = 1 - 0.5 ** 3 if combination == "dare_linear" else None
    if p is not None:
        bound = SIGMAS * math.sqrt(total * p * (1 - p)) + 1
        assert abs(kept_ours - p * total) <= bound and abs(kept_peft - p * total) <= bound
    else:
        assert abs(kept_ours - kept_peft) <= 0.15 * kept_peft
    for key in want:
        a, b = float(got[key].abs().mean()), float(want[key].abs().mean())
        assert abs(a - b) <= 0.35 * b, key  # 128-element factors: loose, but catches scale bugs


# ---------------------------------------------------------------------------------------------
# PEFT's own edge behaviour survives the patch
# ---------------------------------------------------------------------------------------------

def test_density_at_least_one_warns_like_peft_and_prune_returns_the_tensor(kernel_calls):
    t = tasks((20, 30))
    with warnings.catch_warnings(record=True) as peft_warnings:
        warnings.simplefilter("always")
        want = mu.ties(t, WEIGHTS, 1.0)
    with fpeft.patch(), warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        got = mu.ties(t, WEIGHTS, 1.0)
        same = mu.prune(t[0], 1.5, "magnitude")
    assert_matches(got, want)
    assert same is t[0]
    assert [str(w.message) for w in ours][:3] == [str(w.message) for w in peft_warnings]
    assert all(w.category is UserWarning for w in ours)


def test_peft_errors_and_special_cases_are_peft_s(kernel_calls):
    t = tasks((10, 10))
    with fpeft.patch():
        with pytest.raises(ValueError, match="Density should be >= 0"):
            mu.ties(t, WEIGHTS, -0.1)
        with pytest.raises(ValueError, match="Unknown method"):
            mu.prune(t[0], 0.5, "nope")
        with pytest.raises(RuntimeError, match="Unimplemented mask method"):
            mu.calculate_majority_sign_mask(torch.stack(t), "nope")
        with pytest.raises(TypeError):
            mu.ties(t)
        nan = mu.dare_linear(t, WEIGHTS, 0.0)  # PEFT divides by density 0
    assert kernel_calls == []
    assert torch.isnan(nan).all()


# ---------------------------------------------------------------------------------------------
# Fallbacks, patching, version
# ---------------------------------------------------------------------------------------------

def test_fallbacks_warn_once_per_reason_and_give_peft_results(kernel_calls):
    t = tasks((30, 40))
    grad = [x.clone().requires_grad_(True) for x in t]
    wide = torch.rand(3, 30)  # a weight per task and row: broadcast by PEFT, not a kernel case
    stacked = torch.stack(t)
    float_mask = (stacked > 0).float()
    cases = [
        (lambda: mu.ties(grad, WEIGHTS, 0.5), "require grad"),
        (lambda: mu.task_arithmetic([x.double() for x in t], WEIGHTS), "float64"),
        (lambda: mu.magnitude_prune(t, WEIGHTS.double(), 0.5), "float64"),
        (lambda: mu.task_arithmetic([x.T for x in t], wide.unsqueeze(-1).transpose(1, 2)),
         "one per task"),
        (lambda: mu.disjoint_merge(stacked, float_mask), "bool tensor"),
    ]
    for fn, reason in cases:
        want = fn()
        with fpeft.patch():
            with pytest.warns(RuntimeWarning, match=reason):
                got = fn()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the second call is silent
                again = fn()
        assert torch.equal(got.detach(), want.detach()) and torch.equal(again.detach(), want.detach())
    assert kernel_calls == []
    # once per function and reason: another function warns for the same reason again
    with fpeft.patch(), pytest.warns(RuntimeWarning, match="float64"):
        mu.ties([x.double() for x in t], WEIGHTS, 0.5)


def test_a_fallback_runs_peft_s_own_steps_without_more_warnings(kernel_calls):
    """PEFT's ties calls prune, calculate_majority_sign_mask and disjoint_merge through
    merge_utils' (patched) globals: inside a fallback they stay PEFT's, and silent."""
    grad = [x.requires_grad_(True) for x in tasks((30, 40))]
    want = ORIGINAL["ties"](grad, WEIGHTS, 0.5)
    with fpeft.patch(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = mu.ties(grad, WEIGHTS, 0.5)
    assert [str(w.message) for w in seen] == [
        "fastmerge: PEFT's own ties serves inputs that require grad (the kernels do not record autograd)"]
    assert kernel_calls == []
    assert torch.equal(got, want) and got.requires_grad
    got.sum().backward()
    assert grad[0].grad is not None


def test_patch_replaces_every_imported_name_and_unpatch_restores_them():
    bindings_before = {(m, a) for m in list(sys.modules.values()) if m and getattr(m, "__name__", "").startswith("peft")
                       for a, v in vars(m).items() if any(v is o for o in ORIGINAL.values())}
    assert ("peft.tuners.lora.model", "ties") in {(m.__name__, a) for m, a in bindings_before}
    handle = fpeft.patch()
    assert all(fpeft.is_patched(name) for name in fpeft.FUNCTIONS)
    for module, attribute in bindings_before:
        value = getattr(module, attribute)
        assert value is not ORIGINAL[attribute] and value.__wrapped__ is ORIGINAL[attribute]
    assert inspect.signature(mu.ties) == inspect.signature(ORIGINAL["ties"])
    assert mu.ties.__doc__ == ORIGINAL["ties"].__doc__
    assert fpeft.patch() is not None and mu.ties.__wrapped__ is ORIGINAL["ties"]  # idempotent
    # a peft module imported while patched picks the wrapper up; unpatch restores it too
    late = types.ModuleType("peft._fastmerge_late_import")
    sys.modules[late.__name__] = late
    try:
        exec("from peft.utils.merge_utils import ties, prune", late.__dict__)
        assert late.ties is mu.ties and late.ties is not ORIGINAL["ties"]
        with handle:
            pass  # the context manager unpatches on exit
        assert not fpeft.is_patched()
        for module, attribute in bindings_before:
            assert getattr(module, attribute) is ORIGINAL[attribute]
        assert late.ties is ORIGINAL["ties"] and late.prune is ORIGINAL["prune"]
    finally:
        del sys.modules[late.__name__]


def test_patch_a_subset_and_reject_unknown_names():
    with fpeft.patch(["ties"]):
        assert fpeft.is_patched("ties") and not fpeft.is_patched("dare_ties")
        assert lora_module.ties is mu.ties is not ORIGINAL["ties"]
        assert lora_module.dare_ties is ORIGINAL["dare_ties"]
    with pytest.raises(fpeft.FastmergeError, match="cannot accelerate"):
        fpeft.patch(["svd"])
    assert not fpeft.is_patched("ties")


def test_unsupported_peft_version_is_refused(monkeypatch):
    monkeypatch.setattr(fpeft.metadata, "version", lambda name: "0.13.0")
    with pytest.raises(fpeft.PeftVersionError, match="0.13.0"):
        fpeft.patch()
    assert not fpeft.is_patched()
    assert mu.ties is ORIGINAL["ties"]


def test_import_alone_patches_nothing():
    import importlib

    importlib.reload(fpeft)
    assert all(getattr(mu, name) is ORIGINAL[name] for name in fpeft.UTILS_FUNCTIONS)
    assert not fpeft.is_patched()


# ---------------------------------------------------------------------------------------------
# The SVD step of add_weighted_adapter's *_svd combinations
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("combination,kw", [
    ("svd", dict(svd_rank=2)),
    ("svd", dict(svd_rank=12)),          # the sum's full rank: every direction kept
    ("svd", dict(svd_rank=14)),          # above it: PEFT keeps round-off directions, we zeros
    ("magnitude_prune_svd", dict(density=0.6)),
    ("ties_svd", dict(density=0.4, svd_rank=7)),
], ids=str)
def test_svd_combinations_give_peft_factors_up_to_sign(combination, kw, kernel_calls):
    want = weighted(combination, False, **kw)
    got = weighted(combination, True, **kw)
    rank = kw.get("svd_rank", 4)
    for key, a, b in svd_factor_pairs(got):
        assert a.shape[0] == rank and b.shape[1] == rank, key
    if kw.get("svd_rank") == 14:
        for key, a_got, b_got in svd_factor_pairs(got):
            a_want, b_want = {k: (a, b) for k, a, b in svd_factor_pairs(want)}[key]
            assert_matches(b_got @ a_got, b_want @ a_want, rel=1e-4)
            assert float(a_got[12:].abs().max()) == 0.0
    else:
        assert_same_svd_factors(got, want, rel=1e-4)
    expected = "lowrank_svd" if combination == "svd" else "generalized_task_arithmetic"
    assert expected in kernel_calls


def test_the_svd_combination_never_forms_the_dense_update(monkeypatch):
    # get_delta_weight is the only way PEFT's layers form B @ A: the factored path avoids it.
    from peft.tuners.lora import layer

    def refuse(self, adapter):
        raise AssertionError("dense update formed")

    model = lora_model()
    for cls in (layer.Linear, layer.Embedding):
        monkeypatch.setattr(cls, "get_delta_weight", refuse)
    with fpeft.patch(), torch.no_grad():
        model.add_weighted_adapter(["one", "two", "three"], [0.7, -0.4, 1.1], "merged",
                                   combination_type="svd")
    monkeypatch.undo()
    with torch.no_grad():
        model.add_weighted_adapter(["one", "two", "three"], [0.7, -0.4, 1.1], "peft",
                                   combination_type="svd")
    ours, peft_own = merged_adapter(model, "merged"), merged_adapter(model, "peft")
    for key, a, b in svd_factor_pairs(ours):
        other = key.replace(".merged", ".peft")
        a_want, b_want = {k: (a, b) for k, a, b in svd_factor_pairs(peft_own)}[other]
        assert_matches(b @ a, b_want @ a_want, rel=1e-4)


def test_the_merged_svd_adapter_runs_in_peft_as_peft_own_does():
    x = torch.randint(0, 50, (3, 7))
    outputs = []
    for patched in (False, True):
        model = lora_model()
        with (fpeft.patch() if patched else contextlib.nullcontext()), torch.no_grad():
            model.add_weighted_adapter(["one", "two", "three"], [0.7, -0.4, 1.1], "merged",
                                       combination_type="svd", svd_rank=6)
            model.set_adapter("merged")
            outputs.append(model(x))
    assert_matches(outputs[1], outputs[0], rel=1e-5)


def test_svd_clamp_is_served_by_peft_with_a_warning():
    want = weighted("svd", False, svd_clamp=0.9)
    fpeft._warned.clear()
    with pytest.warns(RuntimeWarning, match="svd_clamp"):
        got = weighted("svd", True, svd_clamp=0.9)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_svd_driver_is_left_to_peft_and_torch():
    """A driver is torch's to check (CUDA only): the patched call fails where PEFT's does."""
    with pytest.raises(RuntimeError) as theirs:
        weighted("svd", False, svd_driver="gesvd")
    fpeft._warned.clear()
    with pytest.warns(RuntimeWarning, match="svd_driver"), pytest.raises(RuntimeError) as ours:
        weighted("svd", True, svd_driver="gesvd")
    assert str(ours.value) == str(theirs.value)


def test_unpatch_restores_the_lora_svd_method():
    from peft.tuners.lora.model import LoraModel

    original = LoraModel._svd_generalized_task_arithmetic_weighted_adapter
    with fpeft.patch():
        assert fpeft.is_patched("lora_svd")
        assert LoraModel._svd_generalized_task_arithmetic_weighted_adapter is not original
    assert LoraModel._svd_generalized_task_arithmetic_weighted_adapter is original
    with fpeft.patch(["ties"]):
        assert LoraModel._svd_generalized_task_arithmetic_weighted_adapter is original


# ---------------------------------------------------------------------------------------------
# Property test: random shapes, weights and densities, patched vs PEFT (fp32, continuous inputs)
# ---------------------------------------------------------------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_RANDOM_CALLS = {
    "task_arithmetic": lambda t, w, d, m: mu.task_arithmetic(t, w),
    "magnitude_prune": lambda t, w, d, m: mu.magnitude_prune(t, w, d),
    "ties": lambda t, w, d, m: mu.ties(t, w, d, majority_sign_method=m),
    "prune": lambda t, w, d, m: mu.prune(t[0], d, "magnitude", rescale=bool(int(d * 1000) % 2)),
    "magnitude_based_pruning": lambda t, w, d, m: mu.magnitude_based_pruning(t[-1], d),
    "calculate_majority_sign_mask": lambda t, w, d, m: mu.calculate_majority_sign_mask(
        torch.stack(t), m),
}


@given(function=st.sampled_from(sorted(_RANDOM_CALLS)),
       shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), count=st.integers(1, 4),
       data=st.data(), density=st.floats(0.01, 0.99), method=st.sampled_from(["total", "frequency"]),
       seed=st.integers(0, 2**20))
def test_property_patched_functions_match_peft_fp32(function, shape, count, data, density,
                                                    method, seed):
    t = tasks(tuple(shape), count, seed=seed)
    weights = torch.tensor(data.draw(st.lists(st.floats(-2.0, 2.0), min_size=count,
                                              max_size=count), label="weights"))
    call = _RANDOM_CALLS[function]
    want = call(t, weights, density, method)
    with fpeft.patch():
        got = call(t, weights, density, method)
    if want.dtype == torch.bool:
        assert torch.equal(got, want)
    else:
        assert_matches(got, want)
