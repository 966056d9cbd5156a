"""Exercises every CUDA launcher on small inputs, for compute-sanitizer (memcheck, racecheck)."""
import contextlib
import os

import torch

from fastmerge import ops


@contextlib.contextmanager
def _env(**values):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def main():
    torch.manual_seed(0)
    for shape in [(7,), (300, 70), (600, 700)]:
        base = torch.randn(shape, device="cuda").bfloat16()
        experts = [(base.float() + 0.1 * torch.randn(shape, device="cuda")).bfloat16() for _ in range(3)]
        w = [1.0, 0.5, 0.3]
        ops.ties(base, experts, w, 0.3)
        ops.ties(base, experts, w, 0.3, rescale=True, consensus="count")
        ops.task_arithmetic(base, experts, w)
        ops.dare_ties(base, experts, w, 0.5)
        ops.dare_linear(base, experts, w, 0.5)
        ops.breadcrumbs_ties(base, experts, w, 0.4, gamma=0.05, rescale=True)
        ops.della(base, experts, w, 0.5)
        ops.della_linear(base, experts, w, 0.5)
        ops.linear(experts, w)
        ops.magnitude_mask(experts[0], 0.3)
        ops.slerp(base, experts[0], 0.4)
        ops.model_stock(base, experts)
        ops.model_stock(base, experts, filter_wise=True)
        ops.ties(base, [base.float() + 1 for _ in range(10)], 1.0, 0.5)
        # the launch variants chosen by size or device: DELLA ranks sorted in chunks, the
        # top-k histogram in global memory (GPUs without 128 KiB of shared memory per block)
        with _env(FASTMERGE_DELLA_CHUNK_ITEMS="1000", FASTMERGE_GTA_GLOBAL_HISTOGRAM="1"):
            ops.della(base, experts, w, 0.5)
            ops.ties(base, experts, w, 0.3)
        # PEFT's conventions in the GTA kernel, and the stacked-tensor PEFT kernels
        ops.generalized_task_arithmetic(None, experts, w, density=0.4, sparsification="magnitude",
                                        consensus="sum", normalize="count", rescale="density",
                                        sign_from="unweighted", min_keep=0)
        stacked = torch.stack([e.float() for e in experts])
        mask = ops.majority_sign_mask(stacked)
        ops.disjoint_merge(stacked, mask)
        # interp, consensus and sphere families
        ops.nearswap(base, experts[0], 0.01)
        ops.sce(base, experts, select_topk=0.5)
        ops.ram(base, experts)
        ops.ramplus_tl(base, experts)
        ops.arcee_fusion(base, experts[0])
        if len(shape) == 2:
            ops.nuslerp(0.3, experts[0], experts[1], base=base)
        ops.multislerp(experts, w, base=base)
        ops.karcher(experts)
    # svd family: batched Jacobi SVD, polar (Jacobi inside), randomized SVD
    for batch, size in ((33, 16), (5, 64), (2, 256)):
        x = torch.randn(batch, size, size + 3, device="cuda")
        ops.batched_svd(x)
        ops.polar(x)
    ops.randomized_svd(torch.randn(300, 200, device="cuda"), 20)
    # ToMe: match with and without protected tokens, merge, unmerge, source tracking
    for tokens, channels in ((197, 64), (1025, 320)):
        metric = torch.randn(3, tokens, channels, device="cuda")
        x = torch.randn(3, tokens, 96, device="cuda").bfloat16()
        for class_token, distill_token in ((False, False), (True, False), (True, True)):
            maps = ops.tome_match(metric, tokens // 4, class_token=class_token,
                                  distill_token=distill_token)
            merged, size = ops.tome_merge(x, maps)
            ops.tome_merge(merged, ops.tome_match(merged.float()[..., :64], 8), size)
            ops.tome_unmerge(merged, maps)
            ops.tome_merge_source(None, maps)
    # KV-cache merging: GQA-shaped cache, protected sinks and window
    keys = torch.randn(2, 4, 700, 64, device="cuda").half()
    values = torch.randn(2, 4, 700, 64, device="cuda").half()
    scores = torch.rand(2, 4, 700, device="cuda")
    ops.kv_merge(keys, values, scores, ratio=0.5, eps=-1.0, sigma=4.0, window=32, sinks=4)
    ops.kv_merge(keys, values, scores, ratio=0.3, eps=0.1, sigma=4.0, window=0, sinks=0,
                 return_positions=True)
    torch.cuda.synchronize()
    print("sanitize_ops: all launchers ran")


if __name__ == "__main__":
    main()
