"""The compiled extension: build description, thread control, and results that do not depend
on the CPU instruction set the kernels were dispatched to."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastmerge

from helpers import assert_close

_SCRIPT = textwrap.dedent("""
    import sys, torch, fastmerge, fastmerge.ops as F
    g = torch.Generator().manual_seed(0)
    def r(*s):
        return torch.randn(*s, generator=g)
    base = r(300, 1001)
    ex = [base + r(300, 1001) for _ in range(3)]
    b16, e16 = base.bfloat16(), [e.bfloat16() for e in ex]
    w = [0.5, 1.0, 0.7]
    out = {
        "isa": fastmerge.build_info()["cpu_simd"],
        "ties": F.ties(b16, e16, w, 0.3),
        "ties_count": F.ties(base, ex, w, [0.2, 0.5, 0.7], consensus="count", lambda_=0.8),
        "task_arithmetic": F.task_arithmetic(b16, e16, w, normalize=True),
        "breadcrumbs_ties": F.breadcrumbs_ties(base, ex, w, 0.4, gamma=0.05),
        "dare_ties_norescale": F.dare_ties(b16, e16, w, 0.4, seed=3, name="a", rescale=False),
        "della_norescale": F.della(base, ex, w, 0.4, epsilon=0.1, seed=3, rescale=False),
        "linear": F.linear(e16, w),
        "mask": F.magnitude_mask(e16[0], 0.3),
        "ties_rescale": F.ties(b16, e16, w, 0.3, rescale=True),
        "dare_ties": F.dare_ties(b16, e16, w, 0.4, seed=3, name="a"),
        "della": F.della(base, ex, w, 0.4, epsilon=0.1, seed=3),
        "slerp": F.slerp(b16, e16[0], 0.3),
        "model_stock": F.model_stock(b16, e16, filter_wise=True),
    }
    torch.save(out, sys.argv[1])
""")
_REDUCTION = {"ties_rescale": "l1_rescale", "dare_ties": "l1_rescale", "della": "l1_rescale",
              "slerp": "interp", "model_stock": "interp"}


def test_build_info():
    info = fastmerge.build_info()
    assert info["native"] is True
    assert info["version"] == fastmerge.__version__
    assert info["cpu_simd"] in ("generic", "avx2", "avx512")


def test_set_num_threads_round_trip(restore_threads):
    restore_threads(1)
    assert fastmerge.get_num_threads() == 1
    restore_threads(2)
    assert fastmerge.get_num_threads() == 2


def test_results_do_not_depend_on_cpu_isa(tmp_path):
    """FASTMERGE_CPU_ISA lowers the dispatched kernels. Masks and elementwise results must be
    bit-identical across instruction sets (no FMA contraction); L1 sums and interpolation
    statistics may differ in reduction order only."""
    runs = {}
    for isa in ("generic", "avx2", "avx512"):
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, FASTMERGE_CPU_ISA=isa, OMP_NUM_THREADS="2")
        subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], check=True, env=env,
                       timeout=300)
        runs[isa] = torch.load(path)
    seen = {r["isa"] for r in runs.values()}
    if len(seen) == 1:
        pytest.skip(f"only one instruction set available here ({seen.pop()})")
    reference = runs["generic"]
    for isa, result in runs.items():
        for key, value in result.items():
            if key == "isa":
                continue
            tol = _REDUCTION.get(key, "exact")
            assert_close(value, reference[key], tol, msg=f"{isa} vs generic: {key}")
