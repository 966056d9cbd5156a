"""Subspace merges and the batched SVD against their full-SVD references, in one run.

* Per layer: TSV-M and Iso-CTS (and Iso-C) in fastmerge's fast mode vs the step-by-step
  full-SVD reference (ops/_reference/subspace.py, what the papers' code runs) on ViT-B shapes
  (768x768 and 768x3072, 8 tasks) and, with --llama, a Llama shape (4096x4096, 4 tasks).
  Task vectors have a realistic spectrum: fast decay, directions shared across tasks, a noise
  floor; 768x3072 also with a slower power-law decay (1/i), which sends the fast mode to its
  float64 Gram route. Prints time, speed-up and the relative error of the merged task vector.
* batched_svd vs torch.linalg.svd on batches of 64x64 and 256x256 matrices (CPU here; on a GPU
  with --device cuda, where the references run there too, on cuSOLVER).

Usage: python benchmarks/bench_subspace.py [--llama | --only-llama | --only-svd] [--reps 3]
           [--ref-reps 3] [--device cpu] [--json PATH] [--txt PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from fastmerge import bench, ops
from fastmerge.ops._reference import subspace as reference


def task_vectors(shape, tasks: int, seed: int = 0) -> List[torch.Tensor]:
    """Deltas with singular values decaying over ~5% of the rank, a shared direction family
    (30% of each task's scale) and a 1% noise floor."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    k = min(m, n)
    values = torch.exp(-torch.arange(k, dtype=torch.float32) / (0.05 * k))

    def low_rank():
        q1, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
        q2, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
        return (q1 * values) @ q2.T

    common = low_rank()
    return [0.01 * (0.3 * common + low_rank()
                    + 0.01 * torch.randn(m, n, generator=g) / (m * n) ** 0.25)
            for _ in range(tasks)]


def power_law_task_vectors(shape, tasks: int, seed: int = 0) -> List[torch.Tensor]:
    """Deltas with singular values i^-1 over a 1% noise floor: the kept triplets reach down to
    ~1e-4 of the top Gram eigenvalue, where the fast mode needs its float64 route."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    k = min(m, n)
    values = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    out = []
    for _ in range(tasks):
        q1, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
        q2, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
        floor = 0.01 * torch.randn(m, n, generator=g) / (m * n) ** 0.25
        out.append(0.01 * ((q1 * values) @ q2.T + floor))
    return out


SPECTRA = {"decay": task_vectors, "power": power_law_task_vectors}


def seconds(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama", action="store_true", help="also 4096x4096 x 4 tasks (minutes)")
    p.add_argument("--only-llama", action="store_true",
                   help="only the 4096x4096 x 4 cases (fastmerge timed once: minutes each)")
    p.add_argument("--only-svd", action="store_true",
                   help="only batched_svd against torch.linalg.svd (a short GPU lease)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ref-reps", type=int, default=3,
                   help="runs of each reference (median; a single run swings by 1.5x on a noisy "
                        "VM)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--txt", default=None)
    args = p.parse_args(argv)
    lines: List[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"subspace merges and batched SVD vs full-SVD references, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}")
    say(bench.describe(bench.machine_description()))
    say(f"median of {args.reps} run(s), references of {args.ref_reps}, interleaved "
        f"(4096x4096: one run each)")
    rows: List[Dict[str, object]] = []
    cases = [] if args.only_llama or args.only_svd else [((768, 768), 8, "decay"), ((768, 3072), 8, "decay"),
                                        ((768, 3072), 8, "power")]
    if (args.llama or args.only_llama) and not args.only_svd:
        cases.append(((4096, 4096), 4, "decay"))
    methods = {"tsv": (ops.tsv, reference.tsv), "iso_cts": (ops.iso_cts, reference.iso_cts),
               "iso_c": (ops.iso_c, reference.iso_c),
               "dc_merge": (ops.dc_merge, reference.dc_merge),
               "cart": (ops.cart, reference.cart)}
    say("spectra: decay = exp(-i / 0.05k), shared directions, 1% noise floor; "
        "power = 1/i, 1% noise floor")
    say(f"{'method':<8} {'shape':>10} {'tasks':>5} {'spectrum':>8} | {'reference':>10} "
        f"{'fastmerge':>10} {'speed-up':>8} | rel. error")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for shape, tasks, spectrum in cases:
        deltas = [d.to(args.device) for d in SPECTRA[spectrum](shape, tasks)]
        zero = torch.zeros(shape, device=args.device)
        for name, (op, ref) in methods.items():
            llama = shape[0] >= 4096  # a Llama-shape merge takes a minute
            ref_reps, reps = (1, 1) if llama else (max(1, args.ref_reps), max(1, args.reps))
            ours = op(zero, deltas)  # warm-up
            ref_times, our_times = [], []
            for r in range(max(ref_reps, reps)):  # interleaved: a slow phase hits both
                if r < ref_reps:
                    started = time.perf_counter()
                    expected = ref(deltas)
                    sync()
                    ref_times.append(time.perf_counter() - started)
                if r < reps:
                    started = time.perf_counter()
                    op(zero, deltas)
                    sync()
                    our_times.append(time.perf_counter() - started)
            ref_s, ours_s = statistics.median(ref_times), statistics.median(our_times)
            err = rel_err(ours.cpu(), expected.cpu())
            rows.append({"kind": "merge", "method": name, "shape": list(shape), "tasks": tasks,
                         "spectrum": spectrum, "reference_s": ref_s, "fastmerge_s": ours_s,
                         "speedup": ref_s / ours_s, "rel_error": err})
            say(f"{name:<8} {shape[0]:>4}x{shape[1]:<5} {tasks:>5} {spectrum:>8} | {ref_s:9.2f}s "
                f"{ours_s:9.3f}s "
                f"{ref_s / ours_s:7.1f}x | {err:.1e}")

    if args.only_llama:
        return _write(args, rows, lines)
    say()
    say(f"{'batched_svd':<14} {'batch':>7} | {'torch.linalg.svd':>16} {'fastmerge':>10} "
        f"{'speed-up':>8} | max reconstruction error")
    for batch, size in ((512, 16), (256, 64), (16, 256)):
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, size, size, generator=g).to(args.device)

        def run_torch():
            torch.linalg.svd(x, full_matrices=False)
            sync()

        def run_ours():
            ops.batched_svd(x)
            sync()

        run_torch(), run_ours()  # warm-up
        torch_s, ours_s = seconds(run_torch, args.reps), seconds(run_ours, args.reps)
        u, s, vh = ops.batched_svd(x)
        err = float(((u * s.unsqueeze(-2)) @ vh - x).abs().max())
        rows.append({"kind": "batched_svd", "batch": batch, "size": size, "torch_s": torch_s,
                     "fastmerge_s": ours_s, "speedup": torch_s / ours_s, "max_error": err})
        say(f"{size:>4}x{size:<9} {batch:>7} | {torch_s * 1e3:14.1f}ms {ours_s * 1e3:8.1f}ms "
            f"{torch_s / ours_s:7.2f}x | {err:.1e}")
    return _write(args, rows, lines)


def _write(args, rows, lines) -> int:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": bench.machine_description(), "device": args.device,
                       "reps": args.reps, "rows": rows}, f, indent=2)
            f.write("\n")
    if args.txt:
        with open(args.txt, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
