"""Test helpers: input generators, the reference wrapper, tolerance checks, mergekit calls."""
from __future__ import annotations

import math
import threading
from typing import Callable, Dict, List, Optional, Sequence

import torch

import fastmerge.ops as F
from fastmerge.ops import _reference as R
from fastmerge.ops._validate import stream_hash

from conftest import TOLERANCES

# Method -> (sparsification, consensus, default normalize, default rescale): mergekit 0.1.5's
# registry (mergekit/merge_methods/registry.py), written out independently of fastmerge.
GTA_METHODS: Dict[str, tuple] = {
    "task_arithmetic": (None, None, False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", None, False, True),
    "breadcrumbs": ("magnitude_outliers", None, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
    "della": ("della_magprune", "sum", True, True),
    "della_linear": ("della_magprune", None, False, True),
}
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")
DETERMINISTIC_METHODS = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")

_MANTISSA = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8, torch.float64: 53}
_MIN_EXP = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126, torch.float64: -1022}


# ---- inputs ----

def randn(shape, *, seed: int, dtype=torch.float32, device="cpu", scale=1.0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale + mean
    return x.to(dtype).to(device)


def make_group(shape, experts: int = 3, *, seed: int = 0, dtype=torch.float32, device="cpu",
               base_scale=1.0, delta_scale=1.0):
    """base ~ N(0, base_scale), expert_t = base + N(0, delta_scale), each rounded to dtype."""
    base64 = randn(shape, seed=seed, dtype=torch.float64, scale=base_scale)
    base = base64.to(dtype).to(device)
    ex = [(base64 + randn(shape, seed=seed + 1 + t, dtype=torch.float64, scale=delta_scale))
          .to(dtype).to(device) for t in range(experts)]
    return base, ex


def per_expert(value, count):
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)] * count


def run_method(method: str, base, experts, weight, density=None, **kw):
    """Calls the fastmerge wrapper of a GTA method by name."""
    fn = getattr(F, method)
    if method == "task_arithmetic":
        return fn(base, experts, weight, **kw)
    return fn(base, experts, weight, density, **kw)


def ref_method(method: str, base, experts, weight, density=1.0, *, gamma=0.01, epsilon=0.15,
               seed=0, name="", lambda_=1.0, normalize=None, rescale=None, consensus="default",
               sparsification="default"):
    """The pure-torch reference of a GTA method by name (fp32 result)."""
    sp, cons, norm, resc = GTA_METHODS[method]
    return ref_gta(base, experts, weight, density=density, gamma=gamma, epsilon=epsilon,
                   seed=seed, name=name, lambda_=lambda_,
                   normalize=norm if normalize is None else normalize,
                   rescale=resc if rescale is None else rescale,
                   consensus=cons if consensus == "default" else consensus,
                   sparsification=sp if sparsification == "default" else sparsification)


def ref_gta(base, experts, weight, *, density=1.0, gamma=0.01, epsilon=0.15, seed=0, name="",
            lambda_=1.0, normalize=False, rescale=False, consensus=None, sparsification=None):
    """The reference result (fp32). With L1 rescale and "sum" sign election it carries
    `vote_ambiguous`: the elements whose vote is so close to zero that an L1 sum in another
    reduction order may elect the other sign (see vote_ambiguous)."""
    n = len(experts)
    out = R.generalized_task_arithmetic(
        base, list(experts), weights=per_expert(weight, n), densities=per_expert(density, n),
        gammas=per_expert(gamma, n), epsilons=per_expert(epsilon, n),
        sparsification=sparsification, consensus=consensus, rescale=rescale,
        normalize=normalize, lambda_=lambda_, seed=seed, name=name)
    if rescale and sparsification is not None and consensus == "sum":
        out.vote_ambiguous = vote_ambiguous(
            base, experts, weight, density=density, gamma=gamma, epsilon=epsilon, seed=seed,
            name=name, sparsification=sparsification)
    return out


# Relative margin of the sign vote below which the elected sign is not determined by the
# L1-rescale tolerance: the factors differ by up to TOLERANCES["l1_rescale"].rel between
# reduction orders, and so may the vote.
VOTE_MARGIN = 2 * TOLERANCES["l1_rescale"].rel


def vote_ambiguous(base, experts, weight, *, density, gamma, epsilon, seed, name, sparsification):
    """|sum_t v_t| <= VOTE_MARGIN * sum_t |v_t| for the rescaled contributions v_t."""
    reference = base if base is not None else experts[0]
    n = len(experts)
    weights, dens = per_expert(weight, n), per_expert(density, n)
    gammas, eps = per_expert(gamma, n), per_expert(epsilon, n)
    b = base.detach().float().reshape(-1) if base is not None else None
    vote = magnitude = None
    for t, e in enumerate(experts):
        d = e.detach().float().reshape(-1)
        if b is not None:
            d = d - b
        v = R.sparsify(d, method=sparsification, density=dens[t], gamma=gammas[t],
                       epsilon=eps[t], rescale=True, seed=seed, stream=stream_hash(name),
                       expert=t, shape=tuple(reference.shape)) * weights[t]
        vote = v if vote is None else vote + v
        magnitude = v.abs() if magnitude is None else magnitude + v.abs()
    return ((vote.abs() <= VOTE_MARGIN * magnitude) & (magnitude > 0)).reshape(reference.shape)


# ---- comparisons ----

def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of dtype's values at |x| (fp64 tensor)."""
    a = x.detach().double().abs()
    exp = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a))))
    exp = torch.clamp(exp, min=_MIN_EXP[dtype])
    return torch.exp2(exp - (_MANTISSA[dtype] - 1))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: str, *,
                 scale: Optional[float] = None, out_dtype=None, msg: str = "",
                 exclude: Optional[torch.Tensor] = None) -> None:
    """|actual - expected| <= rel * scale + ulps * ulp_out(expected) (see conftest's table).
    Both must have the same shape; NaNs must coincide. `exclude` (bool, same shape) masks out
    elements whose expected value is not determined within the tolerance (sign votes at 0);
    they must be rare."""
    t = TOLERANCES[tol]
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    if exclude is not None and t.rel > 0:
        exclude = exclude.detach().cpu().reshape(a.shape)
        # rare on continuous data (~1e-5); quantised data cancels exactly more often
        assert int(exclude.sum()) <= max(2, exclude.numel() // 50), f"{msg} too many ambiguous votes"
        a, e = a[~exclude], e[~exclude]
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{msg} NaN positions differ"
    a, e = a[~nan_a], e[~nan_e]
    if a.numel() == 0:
        return
    inf = torch.isinf(e) | torch.isinf(a)
    assert torch.equal(a[inf], e[inf]), f"{msg} infinities differ"
    a, e = a[~inf], e[~inf]
    if a.numel() == 0:
        return
    if t.rel == 0.0 and t.ulps == 0.0:
        if not torch.equal(a, e):
            bad = (a != e).nonzero()[:5].flatten().tolist()
            raise AssertionError(f"{msg} not bit-exact ({tol}): {int((a != e).sum())} of {a.numel()} "
                                 f"differ, e.g. flat {bad}: got {a[bad].tolist()} expected {e[bad].tolist()}")
        return
    dtype = out_dtype or actual.dtype
    s = float(e.abs().max()) if scale is None else float(scale)
    bound = t.rel * s + t.ulps * ulp(e, dtype)
    err = (a - e).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{msg} outside tolerance {tol}: at {worst} got {float(a[worst])!r} expected "
        f"{float(e[worst])!r} (|err|={float(err[worst]):.3g} > bound {float(bound[worst]):.3g})")


def rel_l2_delta(x: torch.Tensor, oracle: torch.Tensor, base: Optional[torch.Tensor]) -> float:
    """||x - oracle|| / ||oracle - base||: relative L2 error of a merged delta."""
    o = oracle.detach().cpu().double()
    b = base.detach().cpu().double() if base is not None else torch.zeros_like(o)
    return float((x.detach().cpu().double() - o).norm() / (o - b).norm())


def bf16_errors(label, ours, theirs, oracle, base, record_property):
    """Relative L2 errors of the merged delta against an fp32 oracle: the bf16 rounding floor,
    ours and mergekit's own bf16 run; recorded on the test report and printed."""
    floor = rel_l2_delta(oracle.to(torch.bfloat16), oracle, base)
    ours_err, theirs_err = rel_l2_delta(ours, oracle, base), rel_l2_delta(theirs, oracle, base)
    record_property("bf16_floor", floor)
    record_property("bf16_fastmerge_err", ours_err)
    record_property("bf16_mergekit_err", theirs_err)
    print(f"{label}: floor {floor:.4%} fastmerge {ours_err:.4%} mergekit-bf16 {theirs_err:.4%}")
    return floor, ours_err


def binomial_bound(probabilities: torch.Tensor) -> float:
    """SIGMAS standard deviations of a sum of independent Bernoulli(p_i)."""
    from conftest import SIGMAS

    return SIGMAS * math.sqrt(float((probabilities * (1 - probabilities)).sum())) + 1.0


def priority_positions(x: torch.Tensor) -> torch.Tensor:
    """Position of every element in the (|x| desc, index asc) order, computed with Python
    sorting (independent of torch.sort and of the reference)."""
    vals = [abs(v) for v in x.detach().double().reshape(-1).tolist()]
    order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    pos = torch.empty(len(vals), dtype=torch.int64)
    pos[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(vals))
    return pos


# ---- mergekit ----

def mergekit_merge(method, tensors: Sequence[torch.Tensor], parameters: dict, base_index=0):
    from mergekit.merge_methods.api import merge_tensors

    return merge_tensors(list(tensors), method, parameters=parameters, base_index=base_index)


def mergekit_gta(consensus: Optional[str], sparsification: Optional[str], normalize: bool,
                 rescale: bool):
    """A mergekit GeneralizedTaskArithmeticMerge with any consensus (e.g. 'count', which no
    registered method uses)."""
    from mergekit.merge_methods.generalized_task_arithmetic import (
        ConsensusMethod,
        GeneralizedTaskArithmeticMerge,
    )
    from mergekit.sparsify import SparsificationMethod

    return GeneralizedTaskArithmeticMerge(
        consensus_method=ConsensusMethod(consensus) if consensus else None,
        sparsification_method=SparsificationMethod(sparsification) if sparsification else None,
        default_normalize=normalize, default_rescale=rescale,
        method_name=f"custom_{consensus}_{sparsification}", method_pretty_name=None,
        method_reference_url=None)


def mergekit_params(method: str, weight, density=None, *, gamma=None, epsilon=None,
                    lambda_=None, normalize=None, rescale=None):
    p = {"weight": list(weight) if isinstance(weight, (list, tuple)) else weight}
    for key, value in (("density", density), ("gamma", gamma), ("epsilon", epsilon),
                       ("lambda", lambda_), ("normalize", normalize), ("rescale", rescale)):
        if value is not None:
            p[key] = value
    return p


def nudge_threshold_ties(base: torch.Tensor, experts, ks_per_expert):
    """Makes the deltas of bf16/fp16 experts tie-free at the given top-k boundaries by moving
    the lower-priority members of a straddling tie group one step of the expert's dtype
    toward base (which strictly lowers their |delta|). Returns new experts."""
    out = []
    b = base.double().reshape(-1)
    for e, ks in zip(experts, ks_per_expert):
        e = e.clone()
        for _ in range(100):
            flat = e.reshape(-1)
            mags = (flat.double() - b).abs()
            order = sorted(range(mags.numel()), key=lambda i: (-float(mags[i]), i))
            changed = False
            for k in ks:
                if not 0 < k < mags.numel():
                    continue
                m = float(mags[order[k - 1]])
                if float(mags[order[k]]) != m:
                    continue
                # members of the tie group at positions >= k move below m
                for pos in range(k, mags.numel()):
                    i = order[pos]
                    if float(mags[i]) != m:
                        break
                    toward = -1.0 if float(flat[i]) > float(b[i]) else 1.0
                    flat[i] = _step(flat[i], toward)
                changed = True
            if not changed:
                break
        out.append(e)
    return out


def _step(value: torch.Tensor, direction: float) -> torch.Tensor:
    """The neighbour of a bf16/fp16/fp32 scalar in direction (+1 up, -1 down)."""
    dt = value.dtype
    if dt == torch.float32:
        return torch.nextafter(value, torch.tensor(direction * math.inf, dtype=dt))
    bits = value.reshape(1).view(torch.int16).to(torch.int32)
    v = float(value)
    if v == 0.0:
        new = 1 if direction > 0 else (0x8001 - 0x10000)
    elif (v > 0) == (direction > 0):
        new = int(bits) + 1
    else:
        new = int(bits) - 1
    return torch.tensor([new], dtype=torch.int32).to(torch.int16).view(dt)[0]


def window_misses() -> dict:
    """The native top-k's count of sample windows that missed so far (retried on one side,
    rescanned whole): tests compare it before and after a call."""
    from fastmerge import _C

    return dict(_C.topk_window_misses())


def misses_since(before: dict) -> dict:
    after = window_misses()
    return {key: after[key] - before[key] for key in after}


def sampled_positions(n: int, samples: int = 1 << 16, run: int = 16) -> torch.Tensor:
    """Positions the native top-k planner samples (csrc/ops/select/select_plan.cpp,
    sample_position), under both of its layouts so far: plain even spacing and evenly spaced
    runs of `run` consecutive elements. Tests shrink these elements so that the sample misses
    the k-th largest and the exact fallback has to run."""
    j = torch.arange(samples, dtype=torch.float64)
    even = ((j + 0.5) * n / samples).long()
    runs = samples // run
    start = ((torch.arange(runs, dtype=torch.float64) + 0.5) * n / runs).long().clamp(max=n - run)
    in_runs = (start.unsqueeze(1) + torch.arange(run)).reshape(-1)
    return torch.unique(torch.cat([even, in_runs]))


# ---- checkpoints ----

def load_weights(directory) -> Dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in a model directory."""
    from pathlib import Path

    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for name in h.keys():
                out[name] = h.get_tensor(name)
    return out


def spy_on_ops(monkeypatch, names: Sequence[str]) -> list:
    """Replaces these fastmerge.ops functions with wrappers that record their names as they are
    called, so a test can tell the kernels from a patched library's own code."""
    calls = []
    for name in names:
        real = getattr(F, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(F, name, spy)
    return calls


def run_in_step(calls: Sequence[Callable[[], object]], module: torch.nn.Module) -> List[object]:
    """Runs each call on a thread of its own, all held at `module`'s forward until every one
    has reached it (so their forwards are in flight at once); returns the calls' results in
    order, raising the first error any of them raised."""
    barrier = threading.Barrier(len(calls), timeout=60)

    def hold(*_):
        barrier.wait()  # returns None: the module's output stays as it is

    results: List[object] = [None] * len(calls)
    errors: List[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)
            barrier.abort()  # the other threads stop waiting for this one

    hook = module.register_forward_hook(hold)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        hook.remove()
    if errors:
        raise errors[0]
    return results
