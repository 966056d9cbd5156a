"""End to end: `fastmerge run` against `mergekit-yaml` (0.1.5) on the same YAML configs.

Builds (or reuses) a synthetic Llama family (fastmerge.synthetic: a bf16 base and N experts,
sharded like real checkpoints), writes one mergekit config per method, and runs each tool as a
fresh process into a fresh output directory. For each run it reports wall time and the child's
peak RSS (os.wait4), and GB/s as the checkpoint bytes read (base + experts, once) plus the bytes
written, per wall second, also as a percentage of the copy bandwidth measured in the same run.
Every model file is read once before the timed runs, so both tools start with a warm page
cache, and dirty pages are synced between runs. It then checks the two outputs against each
other: the same tensor names, and for a few tensors the cosine of the merged deltas.

Usage: python benchmarks/e2e_vs_mergekit.py [--preset 0.5b] [--experts 3]
           [--methods ties,dare_ties,task_arithmetic] [--device cpu|cuda] [--workdir DIR]
           [--threads N] [--skip-mergekit] [--reps 1] [--json PATH] [--txt PATH]
A `--preset tiny` run is the harness's smoke test (a few seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import safe_open

from fastmerge import bench, synthetic
from fastmerge.measure import run_measured

DEFAULT_METHODS = "ties,dare_ties,task_arithmetic"
DETERMINISTIC = {"ties", "task_arithmetic", "breadcrumbs_ties", "linear"}
WEIGHTS = (0.5, 0.3, 0.2)  # further experts get 0.1 each
DENSITY = 0.5
# The targets on the CPU: speed-up over mergekit per method, and our peak RSS as a
# fraction of mergekit's for every method.
SPEEDUP_TARGETS = {"ties": 20.0, "task_arithmetic": 5.0}
RSS_TARGET = 0.5
MIN_COSINE = 0.99


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="0.5b", choices=sorted(synthetic.PRESETS))
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated merge methods")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the family and outputs live (kept; a family built there with "
                        "the same settings is reused). Default: a temporary directory")
    p.add_argument("--threads", type=int, default=None, help="threads for both tools")
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--reps", type=int, default=1, help="timed runs per tool and method")
    p.add_argument("--shard-size", default="500MB", help="input and output shard size")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--txt", type=Path, default=None)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.experts < 1 or args.reps < 1:
        p.error("--experts and --reps must be at least 1")
    return args


# ---- inputs ----

def merge_config(method: str, family: synthetic.CheckpointFamily) -> str:
    weights = [WEIGHTS[i] if i < len(WEIGHTS) else 0.1 for i in range(len(family.experts))]
    lines = [f"merge_method: {method}", f"base_model: {family.base}", "models:"]
    for path, weight in zip(family.experts, weights):
        params = f"weight: {weight}" if method == "task_arithmetic" else \
            f"weight: {weight}, density: {DENSITY}"
        lines += [f"  - model: {path}", f"    parameters: {{{params}}}"]
    if method != "task_arithmetic":
        lines += ["parameters:", "  normalize: true"]
    lines += ["dtype: bfloat16", ""]
    return "\n".join(lines)


def _listing(method: str, base, models, parameters=(), per_model=None) -> str:
    lines = [f"merge_method: {method}"] + ([f"base_model: {base}"] if base else []) + ["models:"]
    for i, path in enumerate(models):
        lines.append(f"  - model: {path}")
        if per_model:
            lines.append(f"    parameters: {{{per_model[i]}}}")
    if parameters:
        lines += ["parameters:"] + [f"  {p}" for p in parameters]
    return "\n".join(lines + ["dtype: bfloat16", ""])


def method_config(method: str, family) -> str:
    """A config of any method for the family (the base and three experts)."""
    if method == "model_stock":
        return _listing(method, family.base, family.experts)
    if method == "sce":
        return _listing(method, family.base, family.experts, ["select_topk: 0.5"])
    if method == "nuslerp":  # two models besides the base, rows interpolated one by one
        return _listing(method, family.base, family.experts[:2], ["nuslerp_flatten: false"],
                        ["weight: 0.6", "weight: 0.4"])
    if method == "karcher":  # the base is an ordinary input here
        return _listing(method, None, [family.base, *family.experts])
    if method in ("ram", "ramplus_tl"):
        return _listing(method, family.base, family.experts)
    if method == "multislerp":
        return _listing(method, family.base, family.experts, (),
                        [f"weight: {w}" for w in (0.5, 0.3, 0.2)])
    text = merge_config(method, family)
    extra = {"della": "  epsilon: 0.1\n", "breadcrumbs_ties": "  gamma: 0.01\n"}.get(method, "")
    if extra:
        text = text.replace("parameters:\n", "parameters:\n" + extra, 1)
    return text


def weight_files(model_dir: Path) -> List[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(model_dir))


def warm_page_cache(dirs: List[Path]) -> None:
    """Read every file once so neither tool pays for the disk (no root: cannot drop caches)."""
    for d in dirs:
        for f in sorted(d.iterdir()):
            with open(f, "rb") as h:
                while h.read(1 << 24):
                    pass


# ---- runs ----

def tool_argv(tool: str, config: Path, out: Path, args: argparse.Namespace) -> List[str]:
    if tool == "fastmerge":
        argv = [sys.executable, "-m", "fastmerge", "run", str(config), str(out), "--quiet",
                "--device", args.device, "--out-shard-size", str(shard_bytes(args.shard_size))]
        return argv + (["--threads", str(args.threads)] if args.threads else [])
    argv = [str(mergekit_exe()), str(config), str(out), "--quiet", "--random-seed", "0",
            "--out-shard-size", str(shard_bytes(args.shard_size))]
    if args.device == "cuda":
        argv.append("--cuda")
    return argv + (["--num-threads", str(args.threads)] if args.threads else [])


def shard_bytes(size: str) -> int:
    """"500MB" -> 500000000 (decimal units, as transformers counts): one number both tools read
    the same way (mergekit's "5B" means five billion, not bytes)."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    text = size.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def mergekit_exe() -> Optional[Path]:
    sibling = Path(sys.executable).with_name("mergekit-yaml")
    found = sibling if sibling.exists() else shutil.which("mergekit-yaml")
    return Path(found) if found else None


def time_tool(tool: str, method: str, config: Path, work: Path, args, read_bytes: int) -> dict:
    out = work / "out" / f"{method}-{tool}"
    runs = []
    for rep in range(args.reps):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # the previous run's dirty pages are not written back during this one
        log = work / "logs" / f"{method}-{tool}-{rep}.log"
        run = run_measured(tool_argv(tool, config, out, args), log)
        if run["returncode"] != 0:
            tail = log.read_text(errors="replace")[-2000:]
            return {"method": method, "tool": tool, "ok": False, "error": tail, "log": str(log)}
        runs.append(run)
    seconds = statistics.median(r["seconds"] for r in runs)
    written = weight_bytes(out)
    return {"method": method, "tool": tool, "ok": True, "out": str(out),
            "seconds": seconds, "all_seconds": [r["seconds"] for r in runs],
            **{key: max(r[key] for r in runs) for key in (
                "peak_rss_bytes", "sampled_peak_anon_bytes", "sampled_peak_file_bytes")},
            "read_bytes": read_bytes, "written_bytes": written,
            "gbs": (read_bytes + written) / seconds / 1e9}


# ---- correctness ----

def tensor_index(model_dir: Path) -> Dict[str, Path]:
    index = {}
    for f in weight_files(model_dir):
        with safe_open(f, framework="pt") as h:
            index.update({name: f for name in h.keys()})
    return index


def load(index: Dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(index[name], framework="pt") as h:
        return h.get_tensor(name)


def compare_outputs(ours: Path, theirs: Path, base: Path, family) -> dict:
    """Same tensor names; cosine of (ours - base) and (theirs - base) on a few tensors."""
    a, b, ref = tensor_index(ours), tensor_index(theirs), tensor_index(base)
    middle = family.preset.num_hidden_layers // 2
    wanted = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              f"model.layers.{middle}.mlp.down_proj.weight",
              f"model.layers.{middle}.input_layernorm.weight", "lm_head.weight"]
    cosines, dtypes_match = {}, True
    for name in (n for n in wanted if n in a and n in b and n in ref):
        base_t = load(ref, name).float()
        x, y = load(a, name), load(b, name)
        dtypes_match &= x.dtype == y.dtype
        dx, dy = (x.float() - base_t).reshape(-1), (y.float() - base_t).reshape(-1)
        cosines[name] = float(torch.nn.functional.cosine_similarity(
            dx.double(), dy.double(), dim=0))
    return {"same_names": sorted(a) == sorted(b), "tensors": len(a),
            "only_ours": sorted(set(a) - set(b))[:5], "only_theirs": sorted(set(b) - set(a))[:5],
            "dtypes_match": bool(dtypes_match), "cosines": cosines,
            "min_cosine": min(cosines.values()) if cosines else None}


# ---- report ----

def summarize(method: str, rows: Dict[str, dict], copy_gbs: float, check: Optional[dict]):
    ours, theirs = rows.get("fastmerge"), rows.get("mergekit")
    s = {"method": method}
    if ours and ours["ok"]:
        s["pct_copy_bandwidth"] = 100 * ours["gbs"] / copy_gbs
    if ours and theirs and ours["ok"] and theirs["ok"]:
        s["speedup"] = theirs["seconds"] / ours["seconds"]
        s["rss_ratio"] = ours["peak_rss_bytes"] / theirs["peak_rss_bytes"]
        if theirs["sampled_peak_anon_bytes"]:
            s["anon_ratio"] = ours["sampled_peak_anon_bytes"] / theirs["sampled_peak_anon_bytes"]
        target = SPEEDUP_TARGETS.get(method)
        s["speedup_target"] = target
        s["speedup_met"] = None if target is None else s["speedup"] >= target
        s["rss_met"] = s["rss_ratio"] <= RSS_TARGET
    if check is not None:
        s["check"] = check
        if method in DETERMINISTIC and check["min_cosine"] is not None:
            s["outputs_agree"] = check["same_names"] and check["min_cosine"] > MIN_COSINE
    return s


def format_report(rows: List[dict], summaries: List[dict], copy_gbs: float) -> List[str]:
    head = (f"{'method':<16} {'tool':<10} {'wall s':>8} {'peak RSS GB':>11} {'anon GB':>8} "
            f"{'file GB':>8} {'GB/s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["ok"]:
            lines.append(f"{r['method']:<16} {r['tool']:<10} {r['seconds']:>8.2f} "
                         f"{r['peak_rss_bytes'] / 1e9:>11.2f} "
                         f"{r['sampled_peak_anon_bytes'] / 1e9:>8.2f} "
                         f"{r['sampled_peak_file_bytes'] / 1e9:>8.2f} {r['gbs']:>7.2f}")
        else:
            lines.append(f"{r['method']:<16} {r['tool']:<10} FAILED (see {r['log']})")
    lines += ["peak RSS: the child's ru_maxrss (os.wait4); anon / file: largest RssAnon / RssFile "
              "sampled every 10 ms (own memory / touched pages of mmap-ed files)",
              "GB/s: checkpoint bytes read (base + experts, once) + bytes written, per wall second",
              "", f"copy bandwidth (read + write): {copy_gbs:.1f} GB/s", ""]
    for s in summaries:
        parts = [s["method"] + ":"]
        if "speedup" in s:
            parts.append(f"mergekit/fastmerge wall {s['speedup']:.1f}x"
                         + (f" (target >= {s['speedup_target']:g}x: "
                            f"{'met' if s['speedup_met'] else 'NOT met'})"
                            if s["speedup_target"] else ""))
            parts.append(f"fastmerge/mergekit peak RSS {s['rss_ratio']:.0%} (target <= "
                         f"{RSS_TARGET:.0%}: {'met' if s['rss_met'] else 'NOT met'})"
                         + (f", anon {s['anon_ratio']:.0%}" if "anon_ratio" in s else ""))
        if "pct_copy_bandwidth" in s:
            parts.append(f"fastmerge at {s['pct_copy_bandwidth']:.1f}% of copy bandwidth")
        lines.append(" ".join(parts[:1]) + " " + "; ".join(parts[1:]))
        check = s.get("check")
        if check:
            cos = ", ".join(f"{n.replace('model.', '').replace('.weight', '')} {c:.4f}"
                            for n, c in check["cosines"].items())
            verdict = ("" if "outputs_agree" not in s else
                       f" -> {'agree' if s['outputs_agree'] else 'DISAGREE'} "
                       f"(min cosine > {MIN_COSINE})")
            lines.append(f"  outputs: {'same' if check['same_names'] else 'DIFFERENT'} "
                         f"{check['tensors']} tensor names, dtypes "
                         f"{'match' if check['dtypes_match'] else 'DIFFER'}; delta cosine "
                         f"fastmerge vs mergekit: {cos}{verdict}")
            if not check["same_names"]:
                lines.append(f"  only fastmerge: {check['only_ours']}; only mergekit: "
                             f"{check['only_theirs']}")
    return lines


def versions() -> Dict[str, str]:
    out = {"torch": torch.__version__}
    for dist in ("fastmerge", "mergekit", "transformers", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        out["git_commit"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
            capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


# ---- main ----

def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    lines: List[str] = []

    def say(text: str = "") -> None:
        lines.append(text)
        print(text, flush=True)

    temporary = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="fastmerge-e2e-")) if temporary else args.workdir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    try:
        machine = bench.machine_description()
        say(f"fastmerge end-to-end vs mergekit-yaml, {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
        say(bench.describe(machine))
        say("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
        started = time.perf_counter()
        family = synthetic.build_family(
            work / "family", preset=args.preset, experts=args.experts, dtype=torch.bfloat16,
            seed=0, max_shard_size=args.shard_size, reuse=True)
        build_seconds = time.perf_counter() - started
        models = [family.base, *family.experts]
        read_bytes = sum(weight_bytes(m) for m in models)
        say(f"family: preset {args.preset} ({family.preset.parameter_count() / 1e6:.1f}M "
            f"parameters), base + {args.experts} experts, bf16, {args.shard_size} shards, "
            f"{read_bytes / 1e9:.2f} GB of weights in all; ready in {build_seconds:.1f} s "
            f"under {family.root}")

        use_mergekit = not args.skip_mergekit and mergekit_exe() is not None
        if not args.skip_mergekit and not use_mergekit:
            say("mergekit-yaml not found: timing fastmerge alone")
        tools = ["fastmerge"] + (["mergekit"] if use_mergekit else [])
        copy_bytes = 1 << 30 if args.preset not in ("tiny", "demo") else 1 << 28
        copy_runs = [bench.copy_bandwidth(copy_bytes)]
        warm_page_cache(models)
        say(f"page cache: every input file was read once before the timed runs (warm for both "
            f"tools); os.sync() before each run; {args.reps} timed run(s) per tool, median "
            f"wall time (process start-up included for both), max peak RSS; device {args.device}, threads {args.threads or 'default'}")
        say("")

        rows, summaries = [], []
        for method in args.methods:
            config = work / f"{method}.yml"
            config.write_text(method_config(method, family))
            by_tool = {}
            for tool in tools:
                print(f"  running {tool} {method} ...", flush=True)
                by_tool[tool] = time_tool(tool, method, config, work, args, read_bytes)
                rows.append(by_tool[tool])
            check = None
            if len(by_tool) == 2 and all(r["ok"] for r in by_tool.values()):
                check = compare_outputs(Path(by_tool["fastmerge"]["out"]),
                                        Path(by_tool["mergekit"]["out"]), family.base, family)
            summaries.append((method, by_tool, check))
        copy_runs.append(bench.copy_bandwidth(copy_bytes))
        copy_gbs = max(copy_runs)  # a busy core during one measurement halves it on 2 cores
        summaries = [summarize(m, t, copy_gbs, c) for m, t, c in summaries]
        for line in format_report(rows, summaries, copy_gbs):
            say(line)

        failed = [r for r in rows if not r["ok"]]
        for r in failed:
            say(f"\n{r['tool']} {r['method']} failed; end of its log:\n{r['error']}")
        payload = {"benchmark": "e2e_vs_mergekit", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "command": " ".join(sys.argv), "machine": machine, "versions": versions(),
                   "settings": {k: (str(v) if isinstance(v, Path) else v)
                                for k, v in vars(args).items()},
                   "family": {"preset": args.preset, "experts": args.experts,
                              "parameters": family.preset.parameter_count(),
                              "bytes_read": read_bytes, "ready_seconds": build_seconds},
                   "copy_gbs_runs": copy_runs, "copy_gbs": copy_gbs,
                   "page_cache": "warm (inputs read once before the timed runs)",
                   "runs": rows, "summary": summaries}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(payload, indent=1) + "\n")
        if args.txt:
            args.txt.parent.mkdir(parents=True, exist_ok=True)
            args.txt.write_text("\n".join(lines) + "\n")
        disagree = [s for s in summaries if s.get("outputs_agree") is False]
        return 1 if failed or disagree else 0
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
