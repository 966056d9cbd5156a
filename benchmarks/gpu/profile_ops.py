"""Per-kernel device time of one merge call (torch.profiler/CUPTI), to see where time goes."""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fastmerge import ops


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (4096, 4096)
    base = torch.randn(shape, device="cuda", generator=g).bfloat16()
    experts = [(base.float() + 0.01 * torch.randn(shape, device="cuda", generator=g)).bfloat16() for _ in range(3)]
    cases = {"ties": lambda: ops.ties(base, experts, 1.0, 0.5),
             "dare_ties": lambda: ops.dare_ties(base, experts, 1.0, 0.5),
             "task_arithmetic": lambda: ops.task_arithmetic(base, experts, 1.0)}
    for name, fn in cases.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        print(f"== {name}: wall {wall:.3f} ms")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
