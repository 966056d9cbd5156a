"""Command line: ``fastmerge run | demo | info | bench``.

Every FastmergeError ends the command with its message on stderr and exit code 2, without a
traceback; other exceptions are bugs and keep theirs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

from .errors import FastmergeError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_ERROR = 2


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


# ---- run ----

_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """Bytes from mergekit-style sizes: 5B (billion), 500M, 2GB, 1000000."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTB]?)B?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5B, 500M, 2GB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def print_summary(summary, stream=None) -> None:
    stream = stream or sys.stdout
    resumed = (f" (resumed: {summary.tensors_merged} of {summary.tensors} tensors merged in this run)"
               if summary.resumed else "")
    print(f"{summary.method}: {summary.tensors} tensors -> {summary.output}{resumed}", file=stream)
    print(f"  {summary.seconds:.2f} s, read {_format_bytes(summary.bytes_read)}, wrote "
          f"{_format_bytes(summary.bytes_written)}, {summary.gbs:.2f} GB/s, peak memory "
          f"{_format_bytes(summary.peak_rss_bytes)}", file=stream)


def cmd_run(args: argparse.Namespace) -> int:
    from .executor import MergeOptions, run_merge

    if args.allow_pickle:
        print("warning: --allow-pickle: .bin checkpoints are unpickled, which can run arbitrary "
              "code; only use it on files you trust", file=sys.stderr)
    options = MergeOptions(device=args.device, threads=args.threads,
                           out_shard_size=args.out_shard_size, overwrite=args.overwrite,
                           allow_pickle=args.allow_pickle, check_finite=args.check_finite,
                           seed=args.seed, quiet=args.quiet)
    summary = run_merge(args.config, args.out, options)
    if not args.quiet:
        print_summary(summary)
    return EXIT_OK


# ---- demo ----

def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(preset="tiny" if args.quick else "demo", experts=args.experts,
             density=args.density, seed=args.seed, threads=args.threads,
             compare_mergekit=not args.no_mergekit)
    return EXIT_OK


# ---- parser ----

def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `fastmerge bench` (here, so that building the parser never imports torch)."""
    parser.add_argument("--quick", action="store_true",
                        help="only the 4096x4096 case, fewer repetitions (about 20 s)")
    parser.add_argument("--no-mergekit", action="store_true",
                        help="do not time mergekit even when it is installed")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads for fastmerge and torch (default: all usable cores)")
    parser.add_argument("--reps", type=positive_int, default=None,
                        help="timed runs of our kernels per case (default 15, --quick 5)")
    parser.add_argument("--mergekit-reps", type=positive_int, default=None,
                        help="timed runs of mergekit per case (default 3, --quick 1)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the results and the machine description as JSON")


def merge_device(text: str) -> str:
    """cpu, cuda or cuda:N (the native kernels switch to the tensors' device)."""
    if text in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value



def cmd_mergekit_yaml(args: argparse.Namespace) -> int:
    from .integrations.mergekit import run_mergekit_yaml

    return run_mergekit_yaml(args.mergekit_args)


def _run_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.run(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastmerge",
        description="Fused C++/CUDA kernels for model merging (TIES, DARE, DELLA, ...).")
    parser.add_argument("--version", action="version", version=f"fastmerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="merge checkpoints as a mergekit YAML config says, streaming "
                                   "tensor by tensor into OUT")
    p.add_argument("config", help="mergekit-format YAML config")
    p.add_argument("out", help="output directory (written atomically: it appears when complete)")
    p.add_argument("--device", type=merge_device, default="cpu",
                   help="where the merge arithmetic runs: cpu (default), cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (default: all usable cores)")
    p.add_argument("--out-shard-size", type=parse_size, default=parse_size("5B"),
                   help="largest output shard in bytes: 5B (billion, the default), 500M, 2GB")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random masks of dare_*, della* and knots_dare_ties (0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (only once the new merge is complete)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read .bin (pickle) checkpoints; unpickling can run arbitrary code")
    p.add_argument("--check-finite", action="store_true",
                   help="fail on NaN/Inf in any input tensor, naming it")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("mergekit-yaml", add_help=False,
                       help="mergekit's own mergekit-yaml, with its methods running on fastmerge "
                            "kernels (fastmerge.integrations.mergekit)")
    p.add_argument("mergekit_args", nargs=argparse.REMAINDER,
                   help="mergekit-yaml's arguments: CONFIG OUT [options]")
    p.set_defaults(func=cmd_mergekit_yaml)

    p = sub.add_parser("info", help="show what this installation was built with")
    p.add_argument("--json", action="store_true", help="print JSON instead of key: value lines")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="build small Llama-shaped checkpoints, merge them with "
                                    "ties and dare_ties as `fastmerge run` does, check and time it")
    p.add_argument("--quick", action="store_true",
                   help="tiny checkpoints (a few seconds; what CI runs)")
    p.add_argument("--no-mergekit", action="store_true",
                   help="skip the comparison with mergekit-yaml even when it is installed")
    p.add_argument("--experts", type=positive_int, default=3, help="experts per merge (3)")
    p.add_argument("--density", type=float, default=0.5,
                   help="fraction of each task vector kept (0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the checkpoints and random masks (0)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="threads for fastmerge and torch (default: all usable cores)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="time ties / dare_ties / task_arithmetic against mergekit "
                                     "and the copy bandwidth (benchmarks/gta_vs_mergekit.py)")
    add_bench_arguments(p)
    p.set_defaults(func=_run_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mergekit-yaml"]:  # everything after it is mergekit's, --help included
        return guarded(lambda: cmd_mergekit_yaml(argparse.Namespace(mergekit_args=argv[1:])))
    parser = build_parser()
    args = parser.parse_args(argv)
    return guarded(lambda: args.func(args))


def entry() -> None:
    """The `fastmerge` command: main(), then exit without tearing the interpreter down.
    Every file is closed (and a merge's output committed) by the time main() returns, and
    unloading torch's modules one by one takes about half a second of every run."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, OSError):  # e.g. `fastmerge info | head -1`
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
