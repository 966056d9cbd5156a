"""Shared fixtures (dtypes, devices, thread count) and the tolerance table of the test suite.

Tolerance table
---------------
Every comparison in the suite names one entry of TOLERANCES. An entry allows

    |actual - expected| <= rel * scale + ulps * ulp_out(expected)

where scale is what the test names (the largest magnitude of the expected result unless said
otherwise) and ulp_out(x) is the spacing of the output dtype at |x| (so `ulps=1` admits one
rounding flip of the final fp32 -> out dtype rounding, nothing more).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch

try:
    from hypothesis import HealthCheck, settings

    # Bounded property tests: the whole suite stays within a few minutes on 2 cores.
    settings.register_profile(
        "fastmerge",
        max_examples=int(os.environ.get("FASTMERGE_HYPOTHESIS_EXAMPLES", "30")),
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile("fastmerge")
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass


@dataclass(frozen=True)
class Tol:
    rel: float   # times the named scale
    ulps: float  # times the output dtype's spacing at the expected value
    why: str


TOLERANCES = {
    # Native vs pure-torch reference.
    "exact": Tol(0.0, 0.0,
        "Masks are integer comparisons (composite magnitude keys, Philox words, ranks) and the "
        "merge is the same sequence of elementwise fp32 operations, rounded once: bit-exact."),
    "l1_rescale": Tol(4e-6, 1.0,
        "The L1 norms of rescale are reductions in different orders (native: 16 fp32 lanes per "
        "256-element block, fp64 across blocks; reference: torch's fp32 cascade sum). Each sum is "
        "within ~1e-6 relative for the sizes tested, before/after carries two of them; the scale "
        "is the largest |merged delta|. One output-dtype ulp for a rounding flip."),
    "interp": Tol(2e-6, 1.0,
        "slerp/model_stock statistics are fp64 sums in different orders and the coefficients go "
        "through fp32 acos/sin (std:: vs torch's vectorised versions may differ by 1 ulp): a few "
        "fp32 ulps of the largest |result|, plus one output-dtype rounding flip."),
    "kvmerge": Tol(0.0, 1.0,
        "kv_merge's Gaussian weights and weighted sums are fp64 in both the kernel (token order) "
        "and the reference (index_add_ order); the fp64 results differ by ~1e-16 relative, so "
        "the single rounding to the output dtype may flip by one ulp, nothing more."),
    "tome_merge": Tol(2e-6, 1.0,
        "ToMe merges: the same fp32 products x * size summed per merged token; torch's "
        "scatter_reduce may add the sources in another order than our fixed one (kept token, then "
        "edge order): a few fp32 ulps of the largest |merged token|, plus one output-dtype "
        "rounding flip."),
    "tome_similarity": Tol(2e-6, 0.0,
        "ToMe similarities: our sequential fp32 dot products of the normalised tokens vs torch's "
        "matmul (blocked, FMA) of tokens normalised by torch's norm: a few fp32 ulps of 1."),
    "tome_model": Tol(2e-5, 0.0,
        "A ToMe-patched timm ViT vs the step-by-step ToMe forward: the same merges (tie-free "
        "matches), but attention through SDPA vs matmul + softmax and 12 layers of fp32 "
        "rounding in other orders; relative to the largest |logit|."),
    # Native vs mergekit 0.1.5, fp32, tie-free inputs.
    "mergekit_exact": Tol(0.0, 0.0,
        "Deterministic GTA methods without rescale, slerp and flat model_stock: mergekit performs "
        "the same fp32 operations in the same order, so results are bit-identical."),
    "mergekit_reduction": Tol(2e-6, 0.0,
        "mergekit differs only in an fp32 reduction or a fused multiply-add: linear uses "
        "addcmul_ (FMA), rescale's L1 sums and filter_wise model_stock's fp32 norms are summed "
        "in other orders. <= ~16 fp32 ulps of the largest |result|."),
}

# bf16: our error vs an fp32 oracle may be at most this multiple of the bf16 rounding floor
# (the error of rounding the oracle itself to bf16), both as relative L2 of the merged delta.
BF16_FLOOR_FACTOR = 3.0

# Random methods: statistical bounds in standard deviations.
SIGMAS = 6.0

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _devices():
    devices = [pytest.param("cpu", id="cpu")]
    devices.append(pytest.param(
        "cuda", id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")))
    return devices


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


@pytest.fixture(params=_devices())
def device(request):
    dev = request.param
    if dev == "cuda":
        import fastmerge

        if not fastmerge.build_info().get("cuda"):
            pytest.skip("fastmerge was built without CUDA kernels")
    return torch.device(dev)


def _wait_for_native(seconds: float = float(os.environ.get("FASTMERGE_TEST_WAIT_NATIVE", "60"))) -> None:
    """The extension may be rebuilt concurrently; wait briefly for it to import. (Without _C
    the ops fall back to the reference; tests/test_native.py then fails on purpose.)"""
    deadline = time.monotonic() + seconds
    while True:
        try:
            import fastmerge._C  # noqa: F401

            return
        except ImportError:
            if time.monotonic() > deadline:
                return
            time.sleep(2.0)


_wait_for_native()


@pytest.fixture
def restore_threads():
    """Yields fastmerge.set_num_threads and restores the previous setting afterwards (0 when
    none was made: the kernels then follow OpenMP's count again)."""
    import fastmerge
    from fastmerge import _native

    before = _native.requested_num_threads()
    try:
        yield fastmerge.set_num_threads
    finally:
        fastmerge.set_num_threads(before)
