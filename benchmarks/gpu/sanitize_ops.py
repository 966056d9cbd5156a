"""Exercises every CUDA launcher on small inputs, for compute-sanitizer (memcheck, racecheck)."""
import torch

from fastmerge import ops


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
    torch.cuda.synchronize()
    print("sanitize_ops: all launchers ran")


if __name__ == "__main__":
    main()
