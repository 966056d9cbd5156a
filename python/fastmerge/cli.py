"""Command line: ``fastmerge info | demo | bench``.

Every FastmergeError ends the command with its message on stderr and exit code 2, without a
traceback; other exceptions are bugs and keep theirs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from .errors import FastmergeError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_ERROR = 2


class DemoCheckError(FastmergeError):
    """A merge in the demo produced a result outside the expected bounds."""


def guarded(fn: Callable[[], int]) -> int:
    """Runs fn, turning FastmergeError into a message and exit code 2."""
    try:
        return fn()
    except FastmergeError as exc:
        print(f"fastmerge: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fastmerge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fastmerge info | head -1`
        return EXIT_OK


# ---- info ----

def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "-"
    if value is None:
        return "-"
    return str(value)


def cmd_info(args: argparse.Namespace) -> int:
    from ._native import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=False))
        return EXIT_OK
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key + ':':<{width + 1}} {_fmt(value)}")
    return EXIT_OK


# ---- demo ----

# Llama-shaped weights: a small projection, a 7B-style MLP slice, a 4096 attention projection.
DEMO_SHAPES = ((1024, 1024), (2816, 1024), (4096, 4096))
DEMO_METHODS = ("ties", "dare_ties", "task_arithmetic", "breadcrumbs_ties", "della")


def _demo_merge(method: str, base, experts, weight, density: float, seed: int):
    from . import ops

    if method == "ties":
        return ops.ties(base, experts, weight, density)
    if method == "dare_ties":
        return ops.dare_ties(base, experts, weight, density, seed=seed, name="demo")
    if method == "task_arithmetic":
        return ops.task_arithmetic(base, experts, weight)
    if method == "breadcrumbs_ties":
        return ops.breadcrumbs_ties(base, experts, weight, density, gamma=0.01)
    if method == "della":
        return ops.della(base, experts, weight, density, epsilon=0.1, seed=seed, name="demo")
    raise FastmergeError(f"unknown demo method {method!r}")


def _check_result(method: str, shape, base, experts, out) -> Dict[str, float]:
    """The merge is finite, has the base's shape and dtype, moves away from base by a plausible
    amount, and points the way the experts do on average."""
    import torch

    label = f"{method} on {'x'.join(map(str, shape))}"
    if out.shape != base.shape or out.dtype != base.dtype:
        raise DemoCheckError(f"{label}: got shape {tuple(out.shape)} {out.dtype}, "
                             f"expected {tuple(base.shape)} {base.dtype}")
    if not bool(torch.isfinite(out).all()):
        raise DemoCheckError(f"{label}: result has non-finite values")
    b = base.float()
    delta = (out.float() - b).reshape(-1)
    mean_delta = (sum(e.float() for e in experts) / len(experts) - b).reshape(-1)
    rel = float(delta.norm() / b.norm())
    expert_rel = float(mean_delta.norm() / b.norm()) * len(experts) ** 0.5
    cos = float(torch.nn.functional.cosine_similarity(delta, mean_delta, dim=0))
    # Expert deltas are ~10% of base: a merge moves between ~1% and ~50% of base's norm.
    if not 0.1 * expert_rel < rel < 5 * expert_rel:
        raise DemoCheckError(f"{label}: merged delta is {rel:.3g} of base's norm; "
                             f"expected near the experts' {expert_rel:.3g}")
    if cos < 0.3:
        raise DemoCheckError(f"{label}: merged delta has cosine {cos:.3f} with the experts' "
                             f"mean delta; expected it to point the same way (> 0.3)")
    return {"rel_delta": rel, "cos_mean_delta": cos}


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import bench
    from ._native import available, build_info

    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        if available():
            from ._native import set_num_threads

            set_num_threads(args.threads)
    info = build_info()
    if not info.get("native"):
        print("warning: fastmerge._C is not available; the ops run the pure-torch fallback",
              file=sys.stderr)
    print(f"fastmerge {info.get('version')} demo: in-memory Llama-shaped bf16 weights, base + "
          f"{args.experts} experts (base ~ N(0, 0.02), expert deltas ~ N(0, 0.002)), "
          f"density {args.density}, {torch.get_num_threads()} threads, "
          f"simd {info.get('cpu_simd')}")
    shapes = DEMO_SHAPES[:2] if args.quick else DEMO_SHAPES
    reps = 1 if args.quick else 3
    weight = bench.weights_for(args.experts)
    rows: List[Dict[str, Any]] = []
    head = f"{'method':<17} {'shape':<10} {'time ms':>9} {'GB/s':>7} {'|delta|/|base|':>15} {'cos':>6}"
    print()
    print(head)
    print("-" * len(head))
    for shape in shapes:
        base, experts = bench.make_inputs(shape, args.experts, seed=args.seed)
        nbytes = bench.traffic_bytes(base.numel(), len(experts), base.element_size(), 1)["min"]
        for method in DEMO_METHODS:
            out = _demo_merge(method, base, experts, weight, args.density, args.seed)
            check = _check_result(method, shape, base, experts, out)
            times = bench.time_ms(
                lambda: _demo_merge(method, base, experts, weight, args.density, args.seed),
                reps=reps, warmup=0)
            ms = sorted(times)[len(times) // 2]
            gbs = nbytes / (ms * 1e-3) / 1e9
            label = "x".join(map(str, shape))
            print(f"{method:<17} {label:<10} {ms:>9.1f} {gbs:>7.1f} {check['rel_delta']:>15.4f} "
                  f"{check['cos_mean_delta']:>6.3f}", flush=True)
            rows.append({"method": method, "shape": label, "ms": ms, "gbs": gbs, **check})
    print()
    print("GB/s: base + experts read once and the output written once, per merge time; "
          "every result checked finite, near the experts' delta size and aligned with it.")

    if not args.no_mergekit and bench.mergekit_available():
        shape = (4096, 4096)
        base, experts = bench.make_inputs(shape, args.experts, seed=args.seed)
        bench._mergekit_warmup()
        ours = min(bench.time_ms(lambda: bench.run_ours("ties", base, experts, weight,
                                                        args.density), reps=3, warmup=1))
        t0 = time.perf_counter()
        theirs_out = bench.run_mergekit("ties", base, experts, weight, args.density)
        theirs = (time.perf_counter() - t0) * 1e3
        ours_out = bench.run_ours("ties", base, experts, weight, args.density)
        b = base.float()
        agree = float(torch.nn.functional.cosine_similarity(
            (ours_out.float() - b).reshape(-1), (theirs_out.float() - b).reshape(-1), dim=0))
        print(f"mergekit 0.1.5 ties 4096x4096 x{args.experts}: {theirs:.0f} ms, fastmerge "
              f"{ours:.1f} ms -> {theirs / ours:.0f}x faster (merged deltas agree: cosine "
              f"{agree:.4f}; mergekit computes in bf16, fastmerge in fp32)")
    elif not args.no_mergekit:
        print("mergekit is not installed: skipping the mergekit comparison "
              "(pip install mergekit==0.1.5)")
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    return EXIT_OK


# ---- parser ----

def _positive_int(text: str) -> int:
    from .bench import _positive_int as check

    return check(text)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, bench

    parser = argparse.ArgumentParser(
        prog="fastmerge",
        description="Fused C++/CUDA kernels for model merging (TIES, DARE, DELLA, ...).")
    parser.add_argument("--version", action="version", version=f"fastmerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="show what this installation was built with")
    p.add_argument("--json", action="store_true", help="print JSON instead of key: value lines")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="merge in-memory Llama-shaped tensors with each method and "
                                    "check and time the results")
    p.add_argument("--quick", action="store_true",
                   help="two small shapes only (about 10 s with the mergekit comparison)")
    p.add_argument("--no-mergekit", action="store_true",
                   help="skip the comparison with mergekit even when it is installed")
    p.add_argument("--experts", type=_positive_int, default=3, help="experts per merge (3)")
    p.add_argument("--density", type=float, default=0.5,
                   help="fraction of each task vector kept by the sparsifying methods (0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and random masks (0)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for fastmerge and torch (default: all usable cores)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="time ties / dare_ties / task_arithmetic against mergekit "
                                     "and the copy bandwidth (benchmarks/gta_vs_mergekit.py)")
    bench.add_arguments(p)
    p.set_defaults(func=lambda a: bench.run(a))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return guarded(lambda: args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
