"""LoRA merges in factored form against the dense routes, in one run.

* KnOTS per layer: fastmerge's factored decomposition (QR of the stacked factors, SVD of the
  R x R core) vs the dense reference (torch.linalg.svd of the concatenated updates in float64,
  what the KnOTS code runs), TIES at density 0.2, on ViT-B shapes (768x768, 8 adapters) and a
  Llama shape (4096x4096, 4 adapters), rank 16. Prints time, speed-up, the relative error of the
  merged update, and the memory the dense route needs for the concatenation alone.
* PEFT's add_weighted_adapter "svd" (and "ties_svd") on a model of --layers Linear layers of
  --width, three rank-16 adapters, with and without fastmerge's patch.

Usage: python benchmarks/bench_lowrank.py [--reps 3] [--width 2048] [--layers 2] [--txt PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from typing import List, Optional

import torch

from fastmerge import bench, ops
from fastmerge.ops._reference import lowrank as reference

from bench_subspace import rel_err, seconds  # benchmarks/ is the script's directory


def lora_factors(m: int, n: int, count: int, rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(m, rank, generator=g) * 0.02 for _ in range(count)]
    as_ = [torch.randn(rank, n, generator=g) / n ** 0.5 for _ in range(count)]
    return bs, as_


def knots_rows(say, reps: int) -> None:
    say("KnOTS-TIES (density 0.2) per layer: dense float64 SVD of [dW_1 ... dW_T] (the KnOTS "
        "code) vs fastmerge factored")
    say(f"{'shape':>10} {'T':>2} {'r':>3} | {'dense ref':>10} {'fastmerge':>10} {'speed-up':>8} "
        f"| {'rel. error':>10} | dense concat")
    for (m, n), count in (((768, 768), 8), ((768, 3072), 8), ((4096, 4096), 4)):
        bs, as_ = lora_factors(m, n, count, 16)
        started = time.perf_counter()
        expected = reference.knots([b.double() @ a.double() for b, a in zip(bs, as_)],
                                   weights=[1.0] * count, density=0.2,
                                   sparsification="magnitude", lambda_=1.0)
        dense_s = time.perf_counter() - started
        fast_s = seconds(lambda: ops.knots(bs, as_, density=0.2), reps)
        b, a = ops.knots(bs, as_, density=0.2)
        concat_gb = m * n * count * 8 / 1e9
        say(f"{m:>4}x{n:<5} {count:>2} {16:>3} | {dense_s:>9.2f}s {fast_s * 1e3:>8.1f}ms "
            f"{dense_s / fast_s:>7.0f}x | {rel_err(b @ a, expected):>10.1e} | {concat_gb:.2f} GB")


class Stack(torch.nn.Module):
    def __init__(self, width: int, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def peft_rows(say, width: int, layers: int) -> None:
    from peft import LoraConfig, get_peft_model

    from fastmerge.integrations import peft as fm_peft

    say()
    say(f"PEFT add_weighted_adapter, {layers} Linear {width}x{width}, 3 adapters r=16 "
        f"(svd_rank 16), PEFT 0.21.2: unpatched vs fastmerge.integrations.peft.patch()")
    say(f"{'combination':>12} | {'PEFT':>9} {'patched':>9} {'speed-up':>8} | merged-update "
        f"rel. difference")
    for combination, kw in (("svd", {}), ("ties_svd", dict(density=0.5))):
        results, times = [], []
        for patched in (False, True):
            torch.manual_seed(0)
            targets = [f"layers.{i}" for i in range(layers)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = get_peft_model(Stack(width, layers), LoraConfig(
                    r=16, lora_alpha=16, target_modules=targets, init_lora_weights=False),
                    adapter_name="a0")
                for i in (1, 2):
                    model.add_adapter(f"a{i}", LoraConfig(r=16, lora_alpha=16,
                                                          target_modules=targets,
                                                          init_lora_weights=False))
            started = time.perf_counter()
            with (fm_peft.patch() if patched else contextlib.nullcontext()), torch.no_grad(), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.add_weighted_adapter(["a0", "a1", "a2"], [0.7, 0.4, 1.1], "m",
                                           combination_type=combination, **kw)
            times.append(time.perf_counter() - started)
            layer = model.base_model.model.layers[0]
            results.append(layer.lora_B["m"].weight @ layer.lora_A["m"].weight)
        say(f"{combination:>12} | {times[0]:>8.2f}s {times[1]:>8.2f}s {times[0] / times[1]:>7.1f}x "
            f"| {rel_err(results[1], results[0]):.1e}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--txt", default=None)
    args = p.parse_args(argv)
    lines: List[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"LoRA merges in factored form vs dense routes, {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
    say(bench.describe(bench.machine_description()))
    say(f"fastmerge: median of {args.reps} run(s); references once (they take seconds)")
    knots_rows(say, args.reps)
    peft_rows(say, args.width, args.layers)
    if args.txt:
        with open(args.txt, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
