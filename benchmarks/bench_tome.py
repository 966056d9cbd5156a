"""ToMe match + merge: fastmerge.ops.tome_match / tome_merge against ToMe's algorithm written
with torch ops (ops/_reference/tome.py: normalise, a @ b^T, max, argsort, gather,
scatter_reduce), in the same run.

Cases: ViT-B (B=64, N=197, r=16, class token; metric = keys averaged over heads, C=64, and the
C=768 variant; merged x is the 768-wide hidden state), a Stable Diffusion 64x64 latent step
(B=2, N=4096, C=320, r=N/4... N/2) and 16k tokens (B=1, N=16384, C=320).
Time: median of interleaved runs (reference, ours, ours with the exact fp32 path only).
Peak memory: extra bytes over the inputs during one match + merge, each measured in a fresh
subprocess (CPU: peak RSS after resetting it through /proc/self/clear_refs; CUDA:
torch.cuda.max_memory_allocated), outputs included.

--threads N runs both sides on N threads (torch and fastmerge); --cpu-time reports process CPU
time instead of wall-clock time (steadier on a shared machine; use with --threads 1).

Usage: python benchmarks/bench_tome.py [--device cpu|cuda] [--threads N] [--cpu-time] [--reps N]
           [--txt PATH] [--json PATH]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

import fastmerge
from fastmerge import bench, ops
from fastmerge.ops import _reference as R

# name -> (B, N, metric C, x C, r, class_token)
CASES = {
    "vit-b (C=64)": (64, 197, 64, 768, 16, True),
    "vit-b (C=768)": (64, 197, 768, 768, 16, True),
    "diffusion 4096": (2, 4096, 320, 320, 2048, False),
    "diffusion 4096 r=1024": (2, 4096, 320, 320, 1024, False),
    "16k tokens": (1, 16384, 320, 320, 4096, False),
}
IMPLS = ("reference", "fastmerge", "fastmerge-exact")


def inputs(case: str, device: str):
    B, N, C, XC, r, cls = CASES[case]
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(B, N, C, generator=g).to(device)
    x = torch.randn(B, N, XC, generator=g).to(device)
    return metric, x, r, cls


def runner(impl: str, metric, x, r, cls) -> Callable[[], object]:
    if impl == "reference":
        def fn():
            rr = R.tome_clamp_r(metric.shape[1], r, cls, False)
            unm, src, dst = R.tome_match(metric, rr, cls, False)
            return R.tome_merge_wavg(x, unm, src, dst)
        return fn

    def fn():
        os.environ["FASTMERGE_TOME_SCREEN"] = "0" if impl == "fastmerge-exact" else "1"
        maps = ops.tome_match(metric, r, class_token=cls)
        return ops.tome_merge(x, maps)
    return fn


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(case: str, impl: str, device: str) -> int:
    """In this (fresh) process: extra memory of one call over the inputs."""
    metric, x, r, cls = inputs(case, device)
    fn = runner(impl, metric, x, r, cls)
    fn()  # first call: lazy initialisation (thread pools, kernels) is not the op's memory
    sync(device)
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    base = _status_kib("VmRSS")
    out = fn()
    del out
    return (_status_kib("VmHWM") - base) * 1024


def measure_memory(case: str, impl: str, device: str) -> int:
    cmd = [sys.executable, __file__, "--child", case, impl, "--device", device,
           "--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1])


def time_case(case: str, device: str, reps: int, cpu_time: bool = False) -> Dict[str, float]:
    metric, x, r, cls = inputs(case, device)
    fns = {impl: runner(impl, metric, x, r, cls) for impl in IMPLS}
    times: Dict[str, List[float]] = {impl: [] for impl in IMPLS}
    for impl in IMPLS:  # warm-up
        fns[impl]()
    for _ in range(reps):  # interleaved: load changes hit every implementation alike
        for impl in IMPLS:
            clock = time.process_time if cpu_time else time.perf_counter
            sync(device)
            start = clock()
            fns[impl]()
            sync(device)
            times[impl].append((clock() - start) * 1e3)
    return {impl: statistics.median(t) for impl, t in times.items()}


def mib(n: int) -> str:
    return f"{n / 2**20:8.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--reps", type=int, default=0, help="runs per case (default: by size)")
    p.add_argument("--threads", type=int, default=0, help="threads for both sides (default: all)")
    p.add_argument("--cpu-time", action="store_true", help="process CPU time, not wall clock")
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--txt")
    p.add_argument("--json")
    p.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        fastmerge.set_num_threads(args.threads)
    if args.child:
        print(peak_extra_bytes(args.child[0], args.child[1], args.device))
        return 0
    machine = bench.machine_description()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else machine["cpu_model"]
    lines = [f"ToMe match + merge, fastmerge vs ToMe's algorithm in torch ops, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}",
             bench.describe(machine), f"device: {args.device} ({device_name})",
             f"threads: {torch.get_num_threads()} (torch) / {fastmerge.get_num_threads()} (fastmerge); "
             f"time: median of interleaved runs, {'process CPU time' if args.cpu_time else 'wall clock'}; "
             "memory: peak extra over the inputs (outputs included), fresh process",
             f"{'case':22s} {'B':>3s} {'N':>6s} {'C':>4s} {'r':>5s} | {'reference':>10s} "
             f"{'fastmerge':>10s} {'speed-up':>8s} {'exact-only':>10s} | {'ref MiB':>8s} "
             f"{'ours MiB':>8s} {'ratio':>6s}"]
    print("\n".join(lines), flush=True)
    rows = []
    for case in args.cases:
        B, N, C, XC, r, cls = CASES[case]
        reps = args.reps or (3 if N >= 16384 else 5 if N >= 4096 else 15)
        t = time_case(case, args.device, reps, args.cpu_time)
        mem = {impl: measure_memory(case, impl, args.device) for impl in ("reference", "fastmerge")}
        row = {"case": case, "B": B, "N": N, "C": C, "x_C": XC, "r": r, "class_token": cls,
               "reps": reps, "ms": t, "peak_extra_bytes": mem}
        rows.append(row)
        line = (f"{case:22s} {B:3d} {N:6d} {C:4d} {r:5d} | {t['reference']:8.2f}ms "
                f"{t['fastmerge']:8.2f}ms {t['reference'] / t['fastmerge']:7.2f}x "
                f"{t['fastmerge-exact']:8.2f}ms | {mib(mem['reference'])} {mib(mem['fastmerge'])} "
                f"{mem['reference'] / max(mem['fastmerge'], 1):5.1f}x")
        lines.append(line)
        print(line, flush=True)
    if args.txt:
        with open(args.txt, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine, "device": args.device, "device_name": device_name,
                       "threads": torch.get_num_threads(), "cpu_time": args.cpu_time,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
