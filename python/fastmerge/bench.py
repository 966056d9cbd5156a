"""CPU benchmark of the fused task-vector merges against mergekit 0.1.5 and a copy.

For ties / dare_ties / task_arithmetic on Llama-shaped bf16 tensors (4096x4096 with 3 experts,
14336x4096 with 4 experts) it measures:

- our time: median of ``reps`` runs after warm-up (wall clock; the CPU kernels are synchronous);
- mergekit's time through ``mergekit.merge_methods.api.merge_tensors`` (median of fewer runs:
  it is slow) and the ratio mergekit / ours;
- our GB/s counted as the minimum traffic (each input read once, the output written once) and
  as the traffic of the passes we make (a top-k selection or an L1 rescale needs a statistics
  pass over base + experts before the merge pass, so ties and dare_ties read the inputs twice;
  task_arithmetic reads them once);
- both as a percentage of the copy bandwidth measured in the same run (``dst.copy_(src)`` of
  large fp32 tensors with all threads, bytes read + bytes written, best of several
  runs before and after the cases).

Lives in the package so that ``fastmerge bench`` works from an installed wheel;
benchmarks/gta_vs_mergekit.py is a thin wrapper around :func:`main`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from . import ops
from ._native import available, build_info, set_num_threads
from .cli import add_bench_arguments as add_arguments  # noqa: F401
from .errors import InvalidArgumentError

METHODS = ("ties", "dare_ties", "task_arithmetic")
# (label, shape, experts): a Llama-3-8B attention projection and MLP projection.
CASES = (("4096x4096", (4096, 4096), 3), ("14336x4096", (14336, 4096), 4))
DENSITY = 0.5
# Passes over the inputs (base + experts) that our kernels make per method.
PASSES = {"ties": 2, "dare_ties": 2, "task_arithmetic": 1}


# ---- machine ----

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_flags() -> List[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def machine_description() -> Dict[str, Any]:
    """CPU model, cores, RAM, Python/torch/fastmerge versions: what a result came from."""
    ram = _ram_bytes()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": _load_average(),
        "fastmerge": build_info(),
    }


def _load_average() -> Optional[List[float]]:
    """1/5/15-minute load average: other work on the machine skews the timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


# ---- measurement ----

def time_ms(fn: Callable[[], Any], reps: int, warmup: int) -> List[float]:
    """Wall-clock times in ms of reps calls after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def copy_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Best GB/s (bytes read + bytes written) of torch's copy_ of nbytes of fp32."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.zeros_like(src)  # touch the pages before timing
    best = min(time_ms(lambda: dst.copy_(src), reps=reps, warmup=1))
    return 2 * src.numel() * 4 / (best * 1e-3) / 1e9


def make_inputs(shape: Sequence[int], experts: int, seed: int = 0,
                dtype: torch.dtype = torch.bfloat16):
    """A base tensor ~N(0, 0.02) (a typical init scale) and experts = base + N(0, 0.002)."""
    g = torch.Generator().manual_seed(seed)
    base32 = torch.randn(tuple(shape), generator=g).mul_(0.02)
    out = []
    for _ in range(experts):
        out.append(torch.randn(tuple(shape), generator=g).mul_(0.002).add_(base32).to(dtype))
    return base32.to(dtype), out


def weights_for(count: int) -> List[float]:
    """Distinct, positive per-expert weights (distinct so that a mix-up would show)."""
    raw = [1.0 + 0.25 * i for i in range(count)]
    total = sum(raw)
    return [round(r / total, 4) for r in raw]


def run_ours(method: str, base, experts, weight, density: float = DENSITY, out=None):
    if method == "ties":
        return ops.ties(base, experts, weight, density, out=out)
    if method == "dare_ties":
        return ops.dare_ties(base, experts, weight, density, seed=0, name="bench", out=out)
    if method == "task_arithmetic":
        return ops.task_arithmetic(base, experts, weight, out=out)
    raise InvalidArgumentError(f"unknown benchmark method {method!r}")


def mergekit_available() -> bool:
    try:
        from mergekit.merge_methods.api import merge_tensors  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def run_mergekit(method: str, base, experts, weight, density: float = DENSITY):
    from mergekit.merge_methods.api import merge_tensors

    params: Dict[str, Any] = {"weight": list(weight)}
    if method != "task_arithmetic":
        params["density"] = density
    return merge_tensors([base] + list(experts), method, parameters=params, base_index=0)


def traffic_bytes(numel: int, experts: int, itemsize: int, passes: int) -> Dict[str, int]:
    inputs = (1 + experts) * numel * itemsize
    output = numel * itemsize
    return {"min": inputs + output, "passes": passes * inputs + output}


def bench_case(method: str, label: str, base, experts, *, reps: int, warmup: int,
               mk_reps: int, copy_gbs: float) -> Dict[str, Any]:
    weight = weights_for(len(experts))
    out = run_ours(method, base, experts, weight)
    if not bool(torch.isfinite(out).all()):
        raise InvalidArgumentError(f"{method} on {label} produced non-finite values")
    times = time_ms(lambda: run_ours(method, base, experts, weight), reps=reps, warmup=warmup)
    ours = statistics.median(times)
    # The same merge into a reused output tensor (out=): no fresh pages to fault in, as in the
    # copy it is compared with.
    reused = torch.zeros_like(out)
    times_out = time_ms(lambda: run_ours(method, base, experts, weight, out=reused), reps=reps,
                        warmup=warmup)
    ours_out = statistics.median(times_out)
    traffic = traffic_bytes(base.numel(), len(experts), base.element_size(), PASSES[method])
    gbs_min = traffic["min"] / (ours * 1e-3) / 1e9
    gbs_passes = traffic["passes"] / (ours * 1e-3) / 1e9
    gbs_passes_out = traffic["passes"] / (ours_out * 1e-3) / 1e9
    row: Dict[str, Any] = {
        "method": method, "shape": label, "dtype": str(base.dtype).replace("torch.", ""),
        "experts": len(experts), "density": None if method == "task_arithmetic" else DENSITY,
        "weights": weight, "reps": reps, "ours_ms": ours, "ours_ms_all": times,
        "ours_out_ms": ours_out, "ours_out_ms_all": times_out,
        "passes": PASSES[method], "bytes_min": traffic["min"], "bytes_passes": traffic["passes"],
        "gbs_min": gbs_min, "gbs_passes": gbs_passes, "gbs_passes_out": gbs_passes_out,
        "pct_copy_min": 100 * gbs_min / copy_gbs, "pct_copy_passes": 100 * gbs_passes / copy_gbs,
        "pct_copy_passes_out": 100 * gbs_passes_out / copy_gbs,
        "mergekit_ms": None, "mergekit_ms_all": None, "ratio": None,
    }
    if mk_reps > 0:
        mk_times = time_ms(lambda: run_mergekit(method, base, experts, weight), reps=mk_reps,
                           warmup=0)
        row["mergekit_ms"] = statistics.median(mk_times)
        row["mergekit_ms_all"] = mk_times
        row["mergekit_reps"] = mk_reps
        row["ratio"] = row["mergekit_ms"] / ours
    return row


def _mergekit_warmup() -> None:
    """mergekit's first call pays for imports and registry setup: pay it on a tiny tensor."""
    b, e = make_inputs((8, 8), 2)
    run_mergekit("ties", b, e, [0.5, 0.5])


# ---- report ----

def format_table(rows: Sequence[Dict[str, Any]], copy_gbs: float) -> str:
    head = (f"{'method':<16} {'shape':<11} {'exp':>3} {'ours ms':>8} {'out= ms':>8} "
            f"{'mergekit ms':>12} {'x faster':>9} {'GB/s min':>9} {'GB/s pass':>10} "
            f"{'%copy min':>10} {'%copy pass':>11} {'out=':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mk = f"{r['mergekit_ms']:.0f}" if r["mergekit_ms"] is not None else "-"
        ratio = f"{r['ratio']:.0f}x" if r["ratio"] is not None else "-"
        lines.append(
            f"{r['method']:<16} {r['shape']:<11} {r['experts']:>3} {r['ours_ms']:>8.1f} "
            f"{r['ours_out_ms']:>8.1f} {mk:>12} {ratio:>9} {r['gbs_min']:>9.1f} "
            f"{r['gbs_passes']:>10.1f} {r['pct_copy_min']:>9.0f}% {r['pct_copy_passes']:>10.0f}% "
            f"{r['pct_copy_passes_out']:>4.0f}%")
    lines.append("")
    lines.append(f"copy bandwidth (torch copy_, fp32, read + write, best of runs before and after): "
                 f"{copy_gbs:.1f} GB/s")
    lines.append("GB/s min: (base + experts read once + output written once) / time; "
                 "GB/s pass: counting the inputs once per pass we make "
                 "(ties, dare_ties: statistics + merge = 2; task_arithmetic: 1).")
    lines.append("ours ms: each call returns a new output tensor (the buffer of the previous "
                 "call's result, freed, is recycled for it: FASTMERGE_OUTPUT_CACHE_MB=0 times "
                 "fresh pages instead); out= ms and the last column: the same call writing into "
                 "a reused tensor (out=), as the copy does.")
    return "\n".join(lines)


def describe(machine: Dict[str, Any]) -> str:
    fm = machine["fastmerge"]
    return (f"machine: {machine['cpu_model']} | {machine['usable_cores']} cores | "
            f"{machine['ram_gib']} GiB RAM | {machine['os']}\n"
            f"python {machine['python']} | torch {machine['torch']} | fastmerge "
            f"{fm.get('version')} (native={fm.get('native')}, simd={fm.get('cpu_simd')}, "
            f"threads={fm.get('threads')}, cuda={fm.get('cuda')}) | load average "
            f"{machine.get('load_average')}")


# ---- entry points ----

def run(args: argparse.Namespace, stream=None) -> int:
    stream = stream or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
        if available():
            set_num_threads(args.threads)
    if not available():
        say("warning: fastmerge._C is not available; timing the pure-torch fallback")
    reps = args.reps or (5 if args.quick else 15)
    mk_reps = 0
    use_mk = not args.no_mergekit and mergekit_available()
    if use_mk:
        mk_reps = args.mergekit_reps or (1 if args.quick else 3)
    elif not args.no_mergekit:
        say("note: mergekit is not importable; timing fastmerge only (pip install mergekit==0.1.5)")
    cases = CASES[:1] if args.quick else CASES

    machine = machine_description()
    say(describe(machine))
    copy_nbytes = 256 * 2**20 if args.quick else 2**30
    copy_reps = 5 if args.quick else 10
    copy_gbs = copy_bandwidth(copy_nbytes, reps=copy_reps)
    say(f"copy bandwidth: {copy_gbs:.1f} GB/s")
    if use_mk:
        _mergekit_warmup()

    rows = []
    for label, shape, count in cases:
        base, experts = make_inputs(shape, count)
        for method in METHODS:
            say(f"  {method} {label} x{count} ...")
            rows.append(bench_case(method, label, base, experts, reps=reps, warmup=2,
                                   mk_reps=mk_reps, copy_gbs=copy_gbs))
        del base, experts
    # Measured again at the end: a core busy elsewhere during the first measurement halves it
    # on a small machine. The best of both is the reference for every row.
    copy_after = copy_bandwidth(copy_nbytes, reps=copy_reps)
    say(f"copy bandwidth after the cases: {copy_after:.1f} GB/s")
    if copy_after > copy_gbs:
        for row in rows:
            for key in ("min", "passes", "passes_out"):
                row[f"pct_copy_{key}"] *= copy_gbs / copy_after
    copy_runs = [copy_gbs, copy_after]
    copy_gbs = max(copy_runs)
    say("")
    table = format_table(rows, copy_gbs)
    say(table)

    if args.json:
        payload = {
            "benchmark": "gta_vs_mergekit",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
            "settings": {"quick": bool(args.quick), "reps": reps, "warmup": 2,
                         "mergekit_reps": mk_reps, "density": DENSITY,
                         "threads": args.threads, "timer": "time.perf_counter, median"},
            "machine": machine,
            "mergekit_version": _mergekit_version() if use_mk else None,
            "copy_gbs": copy_gbs,
            "copy_gbs_runs": copy_runs,
            "copy_bytes": copy_nbytes,
            "load_average_after": _load_average(),
            "results": rows,
            "table": table,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        say(f"wrote {args.json}")
    return 0


def _mergekit_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("mergekit")
    except Exception:  # noqa: BLE001
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gta_vs_mergekit",
        description="Time fastmerge's ties / dare_ties / task_arithmetic against mergekit "
                    "0.1.5 and the copy bandwidth of this machine.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from .cli import guarded

    return guarded(lambda: run(args))
