"""GPU benchmark of the fused merges against a device copy measured in the same run.

Times ties / dare_ties / task_arithmetic on 4096x4096 bf16 x 3 experts and 14336x4096 bf16 x 4
experts with CUDA events (median after warm-up), and reports GB/s for the minimum traffic
(each input read once, the output written once) and for the passes the kernels make, with the
copy bandwidth (bytes read + written) of a large device-to-device copy as the reference.
Usage: python benchmarks/gpu/bench_gpu.py [--json PATH]
"""
import argparse
import json
import platform
import statistics

import torch

import fastmerge
from fastmerge import ops


def time_ms(fn, reps=30, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth():
    src = torch.randn(512 * 1024 * 1024 // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() * 4 / ms / 1e6  # GB/s


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    copy_gbs = copy_bandwidth()
    rows = []
    for shape, count in [((4096, 4096), 3), ((14336, 4096), 4)]:
        g = torch.Generator(device="cuda").manual_seed(0)
        base = torch.randn(shape, device="cuda", generator=g).bfloat16()
        experts = [(base.float() + 0.01 * torch.randn(shape, device="cuda", generator=g)).bfloat16()
                   for _ in range(count)]
        tensor_bytes = base.numel() * 2
        minimum = (count + 1) * tensor_bytes + tensor_bytes
        cases = {
            # stats passes read base + expert per expert (histogram, compaction), merge reads all
            "ties": (lambda: ops.ties(base, experts, 1.0, 0.5), 2 * 2 * count * tensor_bytes + minimum),
            "dare_ties": (lambda: ops.dare_ties(base, experts, 1.0, 0.5), 2 * count * tensor_bytes + minimum),
            "task_arithmetic": (lambda: ops.task_arithmetic(base, experts, 1.0), minimum),
        }
        for name, (fn, pass_bytes) in cases.items():
            ms = time_ms(fn)
            rows.append(dict(method=name, shape=list(shape), experts=count, ms=ms,
                             gbs_min=minimum / ms / 1e6, gbs_passes=pass_bytes / ms / 1e6,
                             pct_copy_min=100 * minimum / ms / 1e6 / copy_gbs,
                             pct_copy_passes=100 * pass_bytes / ms / 1e6 / copy_gbs))
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                fastmerge=fastmerge.build_info(), host=platform.node(), copy_gbs=copy_gbs, rows=rows)
    print(f"device: {info['device']}  copy bandwidth (read+write): {copy_gbs:.0f} GB/s")
    print(f"{'method':16s} {'shape':>12s} {'T':>2s} {'ms':>8s} {'GB/s min':>9s} {'%copy':>6s} "
          f"{'GB/s passes':>11s} {'%copy':>6s}")
    for r in rows:
        print(f"{r['method']:16s} {'x'.join(map(str, r['shape'])):>12s} {r['experts']:2d} {r['ms']:8.3f} "
              f"{r['gbs_min']:9.0f} {r['pct_copy_min']:5.0f}% {r['gbs_passes']:11.0f} {r['pct_copy_passes']:5.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2, default=str)


if __name__ == "__main__":
    main()
