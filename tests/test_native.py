"""The compiled extension: build description, thread control, and results that do not depend
on the CPU instruction set the kernels were dispatched to."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import fastmerge

from helpers import assert_close

_INPUTS = textwrap.dedent("""
    import torch
    g = torch.Generator().manual_seed(0)
    def r(*s):
        return torch.randn(*s, generator=g)
    base = r(300, 1001)
    ex = [base + r(300, 1001) for _ in range(3)]
    b16, e16 = base.bfloat16(), [e.bfloat16() for e in ex]
    w = [0.5, 1.0, 0.7]
""")
_SCRIPT = _INPUTS + textwrap.dedent("""
    import sys, fastmerge, fastmerge.ops as F
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
        "batched_svd": torch.cat([t.flatten() for t in F.batched_svd(
            torch.randn(5, 70, 40, generator=torch.Generator().manual_seed(1)))]),
    }
    torch.save(out, sys.argv[1])
""")
_REDUCTION = {"ties_rescale": "l1_rescale", "dare_ties": "l1_rescale", "della": "l1_rescale",
              "slerp": "interp", "model_stock": "interp"}


def _ambiguous_votes():
    """Elements whose TIES vote is within the L1-rescale tolerance of 0 (either sign may win
    under another reduction order), for the rescaled sign-elected merges of _SCRIPT."""
    from helpers import ref_method

    scope = {}
    exec(_INPUTS, scope)  # the same inputs as the subprocesses
    b16, e16, base, ex, w = (scope[k] for k in ("b16", "e16", "base", "ex", "w"))
    return {
        "ties_rescale": ref_method("ties", b16, e16, w, 0.3, rescale=True).vote_ambiguous,
        "dare_ties": ref_method("dare_ties", b16, e16, w, 0.4, seed=3, name="a").vote_ambiguous,
        "della": ref_method("della", base, ex, w, 0.4, epsilon=0.1, seed=3).vote_ambiguous,
    }


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


def test_thread_count_holds_in_every_thread(restore_threads):
    """set_num_threads is for the process, as torch's is: a pool thread sees it too."""
    seen = []
    for count in (1, 2):
        restore_threads(count)
        worker = threading.Thread(target=lambda: seen.append(fastmerge.get_num_threads()))
        worker.start()
        worker.join()
    assert seen == [1, 2]


def test_results_do_not_depend_on_cpu_isa(tmp_path):
    """FASTMERGE_CPU_ISA lowers the dispatched kernels. Masks, elementwise results and the
    Jacobi SVD (fixed blocking) must be bit-identical across instruction sets (no FMA
    contraction); L1 sums and interpolation statistics may differ in reduction order only."""
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
    ambiguous = _ambiguous_votes()
    for isa, result in runs.items():
        for key, value in result.items():
            if key == "isa":
                continue
            tol = _REDUCTION.get(key, "exact")
            assert_close(value, reference[key], tol, msg=f"{isa} vs generic: {key}",
                         exclude=ambiguous.get(key))


def test_ops_called_from_several_python_threads_give_the_single_thread_results():
    # The kernels release the GIL and keep per-thread scratch: concurrent calls from a thread
    # pool (one merge per tensor, say) must neither crash nor change any bit.
    import threading

    import fastmerge.ops as F

    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 257, generator=g)
    experts = [base + torch.randn(300, 257, generator=g) for _ in range(3)]
    metric = torch.randn(4, 197, 64, generator=g)
    keys, values = torch.randn(2, 1, 4, 2000, 32, generator=g)
    scores = torch.rand(1, 4, 2000, generator=g)
    jobs = {
        "ties": lambda: F.ties(base, experts, [0.3, 0.5, 0.2], 0.4),
        "dare_ties": lambda: F.dare_ties(base, experts, 0.5, 0.5, seed=3, name="w"),
        "della": lambda: F.della(base, experts, 0.5, 0.5, epsilon=0.1, seed=3),
        "model_stock": lambda: F.model_stock(base, experts, filter_wise=True),
        "multislerp": lambda: F.multislerp(experts, [0.2, 0.3, 0.5], base=base),
        "sce": lambda: F.sce(base, experts, select_topk=0.5),
        "batched_svd": lambda: F.batched_svd(base.reshape(-1, 100, 257)[:, :, :50])[1],
        "tome": lambda: F.tome_merge(metric, F.tome_match(metric, 40))[0],
        "kv_merge": lambda: F.kv_merge(keys, values, scores, ratio=0.5, eps=0.0, sigma=3.0,
                                       window=16, sinks=2)[0],
    }
    want = {name: job() for name, job in jobs.items()}
    problems = []

    def worker(offset):
        names = sorted(jobs)
        for i in range(3 * len(names)):
            name = names[(offset + i) % len(names)]
            try:
                if not torch.equal(jobs[name](), want[name]):
                    problems.append((name, "differs"))
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                problems.append((name, repr(exc)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
