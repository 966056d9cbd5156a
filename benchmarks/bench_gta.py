"""pytest-benchmark micro-benchmarks of the CPU kernels on moderate bf16 sizes.

Not part of the test suite (CI runs `pytest tests` only). Run:
    pytest benchmarks/bench_gta.py --benchmark-columns=min,median,max,rounds
Each benchmark also reports GB/s of the minimum traffic (inputs read once, output written once)
in extra_info, so results from different machines compare against their copy bandwidth
(see benchmarks/gta_vs_mergekit.py for the measured copy bandwidth and mergekit ratios).
"""
import pytest
import torch

import fastmerge
from fastmerge import ops
from fastmerge.bench import make_inputs, weights_for

SHAPE = (2048, 2048)
EXPERTS = 3
DENSITY = 0.5


@pytest.fixture(scope="module")
def group():
    return make_inputs(SHAPE, EXPERTS, seed=0)


def _record(benchmark, nbytes):
    benchmark.extra_info["bytes_min"] = nbytes
    benchmark.extra_info["threads"] = fastmerge.build_info().get("threads")
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["gbs_min"] = nbytes / stats.stats.median / 1e9


def _gta_bytes(base):
    return (EXPERTS + 2) * base.numel() * base.element_size()


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_gta(benchmark, group, method):
    base, experts = group
    weight = weights_for(EXPERTS)
    fn = {
        "ties": lambda: ops.ties(base, experts, weight, DENSITY),
        "dare_ties": lambda: ops.dare_ties(base, experts, weight, DENSITY, name="bench"),
        "task_arithmetic": lambda: ops.task_arithmetic(base, experts, weight),
    }[method]
    benchmark.group = f"gta {SHAPE[0]}x{SHAPE[1]} bf16 x{EXPERTS}"
    out = benchmark(fn)
    assert torch.isfinite(out).all()
    _record(benchmark, _gta_bytes(base))


def test_magnitude_mask(benchmark, group):
    x = group[1][0].float() - group[0].float()
    x = x.bfloat16()
    benchmark.group = f"select {SHAPE[0]}x{SHAPE[1]} bf16"
    mask = benchmark(ops.magnitude_mask, x, DENSITY)
    assert int(mask.sum()) == max(1, int(DENSITY * x.numel()))
    _record(benchmark, x.numel() * (x.element_size() + 1))


def test_slerp(benchmark, group):
    base, experts = group
    benchmark.group = f"interp {SHAPE[0]}x{SHAPE[1]} bf16"
    out = benchmark(ops.slerp, base, experts[0], 0.3)
    assert torch.isfinite(out).all()
    _record(benchmark, 3 * base.numel() * base.element_size())
