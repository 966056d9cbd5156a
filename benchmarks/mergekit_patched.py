"""mergekit-yaml unpatched vs patched (`fastmerge mergekit-yaml`, fastmerge.integrations.mergekit)
on the same configs and checkpoints, in one run.

Both are mergekit's own pipeline (its loader, planner, executor and writer); only the merge
methods differ. Each run is a fresh process started from a small launcher (fastmerge.measure),
so wall time includes start-up and peak RSS is the tool's own. The page cache is warm for both.

Usage: python benchmarks/mergekit_patched.py [--preset 0.5b] [--experts 3]
           [--methods ties,dare_ties,della,breadcrumbs_ties,model_stock] [--reps 1]
           [--workdir DIR] [--json PATH] [--txt PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from e2e_vs_mergekit import (  # same directory: the family, configs and page-cache warm-up
    method_config as config_for,
    mergekit_exe,
    shard_bytes,
    versions,
    warm_page_cache,
    weight_bytes,
)
from fastmerge import bench, synthetic
from fastmerge.measure import run_measured

DEFAULT_METHODS = "ties,dare_ties,della,breadcrumbs_ties,sce,model_stock,nuslerp,karcher"
TARGETS = {"ties": 5.0}  # patched speed-up over unpatched, on this machine


def run_tool(tool: str, config: Path, out: Path, log: Path, shard: str) -> Dict[str, float]:
    args = [str(config), str(out), "--quiet", "--random-seed", "0", "--out-shard-size", shard]
    argv = ([str(mergekit_exe())] if tool == "mergekit" else
            [sys.executable, "-m", "fastmerge", "mergekit-yaml"]) + args
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    result = run_measured(argv, log)
    if result["returncode"] != 0:
        raise SystemExit(f"{tool} failed on {config.name}: see {log}")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="0.5b", choices=sorted(synthetic.PRESETS))
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--txt", type=Path, default=None)
    args = p.parse_args(argv)
    if mergekit_exe() is None:
        raise SystemExit("mergekit-yaml is not installed (pip install mergekit==0.1.5)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fastmerge-mkpatch-"))
    lines: List[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    started = time.perf_counter()
    family = synthetic.build_family(work / "family", preset=args.preset, experts=args.experts,
                                    max_shard_size="500MB", reuse=True)
    say(f"mergekit-yaml unpatched vs patched (fastmerge mergekit-yaml), "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}")
    say(bench.describe(bench.machine_description()))
    say("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    say(f"family: preset {args.preset}, base + {args.experts} experts, bf16 "
        f"({family.nbytes() / 1e9:.2f} GB each), ready in {time.perf_counter() - started:.0f} s; "
        f"page cache warm; {args.reps} run(s) each, median; start-up included")
    warm_page_cache([family.base, *family.experts])
    shard = str(shard_bytes("500MB"))
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        config = work / f"{method}.yml"
        config.write_text(config_for(method, family))
        runs = {tool: [run_tool(tool, config, work / "out" / f"{method}-{tool}",
                                work / f"{method}-{tool}-{r}.log", shard)
                       for r in range(args.reps)] for tool in ("mergekit", "patched")}
        row = {"method": method}
        for tool, rs in runs.items():
            row[f"{tool}_s"] = statistics.median(r["seconds"] for r in rs)
            row[f"{tool}_rss"] = max(r["peak_rss_bytes"] for r in rs)
        row["speedup"] = row["mergekit_s"] / row["patched_s"]
        row["written"] = weight_bytes(work / "out" / f"{method}-patched")
        rows.append(row)
        target = TARGETS.get(method)
        verdict = "" if target is None else (
            f"  (target >= {target:g}x: {'met' if row['speedup'] >= target else 'NOT met'})")
        say(f"{method:<17} mergekit {row['mergekit_s']:7.2f} s {row['mergekit_rss'] / 1e9:5.2f} GB | "
            f"patched {row['patched_s']:7.2f} s {row['patched_rss'] / 1e9:5.2f} GB | "
            f"{row['speedup']:5.1f}x{verdict}")
    if args.json:
        args.json.write_text(json.dumps({"machine": bench.machine_description(),
                                         "versions": versions(), "preset": args.preset,
                                         "experts": args.experts, "reps": args.reps,
                                         "rows": rows}, indent=2) + "\n")
    if args.txt:
        args.txt.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
