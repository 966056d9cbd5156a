"""fastmerge vs mergekit 0.1.5 on ties / dare_ties / task_arithmetic (CPU, bf16).

A thin wrapper: the logic lives in fastmerge.bench so that `fastmerge bench` works from a wheel.
Usage: python benchmarks/gta_vs_mergekit.py [--quick] [--no-mergekit] [--threads N] [--json PATH]
"""
import sys

from fastmerge.bench import main

if __name__ == "__main__":
    sys.exit(main())
