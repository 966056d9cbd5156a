"""kv_merge against pure-torch implementations of the same algorithm, in one run.

One KV cache of B=1, 8 kv heads, S=32768 tokens, head_dim 128 (keys with realistic adjacent
similarity: an AR(1) walk along the sequence), merged with ratio 0.5, eps -1, sigma 5, window 64,
sinks 4. Three implementations, each in a fresh subprocess (so peak memory is its own):

* fastmerge: fastmerge.ops.kv_merge (native kernels);
* reference: the test oracle, python/fastmerge/ops/_reference/kvmerge.py: vectorised fp64
  torch, O(S) memory (sort, scatter_reduce and index_add_ over all tokens at once);
* kvmerger-style: the way published KV-merging code is written: per head, the full S x S cosine
  similarity matrix is materialised (fp32) and the merging sets are built and merged in a Python
  loop of small torch ops (argmax, exp, weighted sum per set).

Time: the first call and the median of --reps calls (the kvmerger-style run once: it takes
seconds). Peak memory of the first call: on CPU the highest resident size sampled every 0.2 ms
(/proc/self/statm) minus the resident size just before the call (the inputs exist, freed
memory was handed back with malloc_trim); on CUDA torch.cuda.max_memory_allocated over the
memory allocated before the call. Results are compared with fastmerge's (pivot positions and max
|difference| of the merged keys/values).

Usage: python benchmarks/bench_kvmerge.py [--device cpu|cuda] [--seq 32768] [--heads 8]
           [--dim 128] [--reps 3] [--skip-loop] [--txt PATH] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import ctypes
import threading
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch

IMPLS = ("fastmerge", "reference", "kvmerger-style")
PARAMS = dict(ratio=0.5, eps=-1.0, sigma=5.0, window=64, sinks=4)


def make_inputs(batch: int, heads: int, seq: int, dim: int, device: str):
    """AR(1) keys along the sequence (adjacent cosine ~0.8, some runs much higher), Gaussian
    values, positive scores."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, heads, seq, dim, generator=g)
    keys = torch.empty_like(noise)
    keys[:, :, 0] = noise[:, :, 0]
    a = 0.8
    rho = torch.rand(batch, heads, seq, 1, generator=g) * 0.2 + a  # varying smoothness
    for i in range(1, seq):
        r = rho[:, :, i]
        keys[:, :, i] = r * keys[:, :, i - 1] + (1 - r * r).sqrt() * noise[:, :, i]
    values = torch.randn(batch, heads, seq, dim, generator=g)
    scores = torch.rand(batch, heads, seq, generator=g).pow(4)
    return keys.to(device), values.to(device), scores.to(device)


def kvmerger_style(keys, values, scores, *, ratio, eps, sigma, window, sinks):
    """The algorithm as reference code writes it: materialised similarity, Python loops."""
    B, H, S, D = keys.shape
    lo, hi = min(sinks, S), max(min(sinks, S), S - window)
    target = int(ratio * (hi - lo))
    adjacent = []
    for b in range(B):
        for h in range(H):
            k = keys[b, h].float()
            unit = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            similarity = unit @ unit.T  # (S, S), as in the papers' analysis code
            adjacent.append(similarity.diagonal(1).clone())
            del similarity
    candidates = []
    for sims in adjacent:
        idx = torch.arange(S - 1, device=keys.device)
        candidates.append((idx >= lo) & (idx + 1 < hi) & (sims >= eps))
    n = min([target] + [int(c.sum()) for c in candidates])
    out_k, out_v, out_p = [], [], []
    for bh, (sims, cand) in enumerate(zip(adjacent, candidates)):
        b, h = divmod(bh, H)
        chosen = torch.zeros(S - 1, dtype=torch.bool, device=keys.device)
        if n:
            masked = torch.where(cand, sims, torch.full_like(sims, float("-inf")))
            chosen[torch.topk(masked, n).indices] = True
        chosen = chosen.tolist()
        rows_k, rows_v, pos = [], [], []
        start = 0
        for i in range(S):  # Algorithm 1: extend the set while the pair is merged
            if i < S - 1 and chosen[i]:
                continue
            k, v, s = keys[b, h, start:i + 1], values[b, h, start:i + 1], scores[b, h, start:i + 1]
            if i == start:
                rows_k.append(k[0])
                rows_v.append(v[0])
                pos.append(start)
            else:
                p = int(torch.argmax(s))
                w = torch.exp(-((k - k[p]) ** 2).sum(-1) / (2 * sigma ** 2))
                w = w / w.sum()
                rows_k.append((w[:, None] * k).sum(0))
                rows_v.append((w[:, None] * v).sum(0))
                pos.append(start + p)
            start = i + 1
        out_k.append(torch.stack(rows_k))
        out_v.append(torch.stack(rows_v))
        out_p.append(torch.tensor(pos))
    shape = (B, H, S - n)
    return (torch.stack(out_k).reshape(*shape, D), torch.stack(out_v).reshape(*shape, D),
            torch.stack(out_p).reshape(shape))


def run_impl(name: str, keys, values, scores):
    if name == "fastmerge":
        from fastmerge.ops import kv_merge

        return kv_merge(keys, values, scores, return_positions=True, **PARAMS)
    if name == "reference":
        from fastmerge.ops._reference import kvmerge as R

        return R.kv_merge(keys, values, scores, **PARAMS)
    return kvmerger_style(keys, values, scores, **PARAMS)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakResident:
    """Highest resident size while the block runs, sampled by a thread."""

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.before = self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.before


def child(args) -> None:
    device = args.device
    keys, values, scores = make_inputs(args.batch, args.heads, args.seq, args.dim, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with PeakResident() as resident:
        started = time.perf_counter()
        out = run_impl(args.child, keys, values, scores)
        sync()
        first = time.perf_counter() - started
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resident.extra
    times = [first]
    reps = 1 if args.child == "kvmerger-style" else args.reps
    for _ in range(reps):
        started = time.perf_counter()
        run_impl(args.child, keys, values, scores)
        sync()
        times.append(time.perf_counter() - started)
    torch.save([t.cpu() for t in out], args.out)
    print(json.dumps({"first_s": first, "median_s": statistics.median(times[1:]),
                      "peak_extra_bytes": peak, "out_len": int(out[0].shape[2])}))


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def compare(ours: List[torch.Tensor], theirs: List[torch.Tensor]) -> Dict[str, float]:
    if ours[0].shape != theirs[0].shape:
        return {"same_shape": False}
    return {"same_shape": True,
            "positions_equal": float((ours[2] == theirs[2]).double().mean()),
            "max_abs_diff_keys": float((ours[0].double() - theirs[0].double()).abs().max()),
            "max_abs_diff_values": float((ours[1].double() - theirs[1].double()).abs().max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-loop", action="store_true", help="leave out the kvmerger-style run")
    p.add_argument("--txt")
    p.add_argument("--json")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from fastmerge import bench, build_info

    impls = [i for i in IMPLS if not (args.skip_loop and i == "kvmerger-style")]
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in impls:
            out_path = os.path.join(tmp, f"{impl}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--out", out_path,
                   "--device", args.device, "--batch", str(args.batch), "--heads",
                   str(args.heads), "--seq", str(args.seq), "--dim", str(args.dim), "--reps",
                   str(args.reps)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout, done.stderr, file=sys.stderr)
                return done.returncode
            results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
            outputs[impl] = torch.load(out_path)
    base = results["fastmerge"]
    machine = bench.machine_description()
    lines = [f"kv_merge vs pure-torch implementations, {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
             bench.describe(machine),
             f"lscpu model name: {lscpu_model()}",
             f"build: {json.dumps({k: build_info().get(k) for k in ('cuda', 'cpu_simd', 'threads')})}",
             f"device: {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
             f"cache: B={args.batch} kv_heads={args.heads} S={args.seq} D={args.dim} float32 "
             f"({args.batch * args.heads * args.seq * args.dim * 4 / 2**20:.0f} MiB keys, same values); "
             f"params {PARAMS}",
             f"output length {base['out_len']}; time: first call / median of {args.reps} more "
             "(kvmerger-style: 1 more); peak: extra memory over the inputs",
             f"{'implementation':<16}| {'first':>9} {'median':>9} {'speed-up':>9} | {'peak extra':>11} | agreement with fastmerge"]
    for impl in impls:
        r = results[impl]
        agree = "" if impl == "fastmerge" else json.dumps(compare(outputs["fastmerge"], outputs[impl]))
        r["agreement"] = agree
        lines.append(f"{impl:<16}| {r['first_s']:>8.3f}s {r['median_s']:>8.3f}s "
                     f"{r['median_s'] / base['median_s']:>8.1f}x | {r['peak_extra_bytes'] / 2**20:>7.0f} MiB | {agree}")
    text = "\n".join(lines)
    print(text)
    if args.txt:
        with open(args.txt, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "device": args.device, "params": PARAMS,
                       "shape": [args.batch, args.heads, args.seq, args.dim], "results": results},
                      f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
