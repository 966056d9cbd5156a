"""`fastmerge demo`: build small Llama-shaped checkpoints offline, merge them with TIES and
DARE-TIES through the same streaming path as `fastmerge run`, check the merged models and
print what it cost (and, when mergekit is installed, what mergekit-yaml takes for the same
config)."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .errors import FastmergeError

DEMO_METHODS = ("ties", "dare_ties")


class DemoCheckError(FastmergeError):
    """A merged model in the demo is outside the expected bounds."""


def demo_config(method: str, family, density: float) -> str:
    weights = [round(1.0 / (i + 1.5), 3) for i in range(len(family.experts))]
    lines = [f"merge_method: {method}", f"base_model: {family.base}", "models:"]
    for path, w in zip(family.experts, weights):
        lines += [f"  - model: {path}", f"    parameters: {{weight: {w}, density: {density}}}"]
    lines += ["parameters: {normalize: true}", "dtype: bfloat16", ""]
    return "\n".join(lines)


def check_merged_model(out_dir: Path, family, label: str) -> Dict[str, float]:
    """The merged model loads with transformers and gives finite logits; its weights moved
    from the base by a plausible amount, in the direction the experts moved on average."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.arange(1, 17).reshape(1, -1)).logits
    if not bool(torch.isfinite(logits).all()):
        raise DemoCheckError(f"{label}: the merged model gives non-finite logits")
    name = "model.layers.0.mlp.down_proj.weight"
    merged = dict(model.named_parameters())[name].detach().float()

    def load(path: Path):
        files = sorted(path.glob("*.safetensors"))
        for f in files:
            with safe_open(f, framework="pt") as h:
                if name in h.keys():
                    return h.get_tensor(name).float()
        raise DemoCheckError(f"{label}: {name} missing from {path}")

    base = load(family.base)
    mean_delta = sum(load(p) for p in family.experts) / len(family.experts) - base
    delta = merged - base
    rel = float(delta.norm() / base.norm())
    cos = float(torch.nn.functional.cosine_similarity(delta.reshape(-1), mean_delta.reshape(-1), dim=0))
    if not 0.01 < rel < 1.0 or cos < 0.3:
        raise DemoCheckError(f"{label}: {name} moved {rel:.3g} of the base's norm with cosine "
                             f"{cos:.3f} to the experts' mean delta; expected a plausible merge")
    return {"rel_delta": rel, "cos": cos}


def run_tool(argv: Sequence[str], log: Path) -> Optional[Dict[str, float]]:
    """Wall time and peak RSS of one command run to completion, or None if it failed."""
    from .measure import run_measured

    result = run_measured(argv, log)
    if result["returncode"] != 0:
        tail = Path(log).read_text(errors="replace").strip()[-500:]
        print(f"{Path(argv[0]).name} failed ({result['returncode']}): {tail}", file=sys.stderr)
        return None
    return result


def _compare_with_mergekit(config_path: Path, root: Path) -> None:
    """Both tools as fresh processes on the same config: start-up included for both."""
    from .cli import _format_bytes

    exe = Path(sys.executable).with_name("mergekit-yaml")
    if not exe.exists():
        print("mergekit-yaml is not installed: no comparison (pip install mergekit==0.1.5)")
        return
    ours = run_tool([sys.executable, "-m", "fastmerge", "run", str(config_path),
                     str(root / "cmp-fastmerge"), "--quiet"], root / "fastmerge.log")
    theirs = run_tool([str(exe), str(config_path), str(root / "cmp-mergekit")],
                      root / "mergekit.log")
    if ours is None or theirs is None:
        return
    print(f"{config_path.stem} as fresh processes (start-up included): fastmerge run "
          f"{ours['seconds']:.1f} s / {_format_bytes(ours['peak_rss_bytes'])} peak, mergekit-yaml "
          f"{theirs['seconds']:.1f} s / {_format_bytes(theirs['peak_rss_bytes'])} peak -> "
          f"{theirs['seconds'] / ours['seconds']:.1f}x faster, "
          f"{ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.0%} of mergekit's memory")


def run_demo(*, preset: str = "demo", experts: int = 3, density: float = 0.5, seed: int = 0,
             threads: Optional[int] = None, compare_mergekit: bool = True,
             methods: Sequence[str] = DEMO_METHODS) -> List[Dict[str, object]]:
    from . import __version__, synthetic
    from .cli import _format_bytes
    from .executor import MergeOptions, run_merge

    if not 0.0 < density <= 1.0:
        raise FastmergeError(f"--density must lie in (0, 1], got {density}")
    started = time.perf_counter()
    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="fastmerge-demo-") as tmp:
        root = Path(tmp)
        family = synthetic.build_family(root / "models", preset=preset, experts=experts, seed=seed)
        model_bytes = family.nbytes()
        print(f"fastmerge {__version__} demo: built a base and {experts} experts "
              f"({family.preset.name} preset, {family.preset.parameter_count() / 1e6:.3g}M "
              f"parameters, {_format_bytes(model_bytes)} each in bf16) in "
              f"{time.perf_counter() - started:.1f} s under {root}")
        print()
        head = (f"{'method':<10} {'tensors':>7} {'time s':>7} {'GB/s':>6} {'peak mem':>9}  "
                f"{'|delta|/|base|':>14} {'cos':>5}")
        print(head)
        print("-" * len(head))
        for method in methods:
            config_path = root / f"{method}.yml"
            config_path.write_text(demo_config(method, family, density))
            out = root / f"merged-{method}"
            summary = run_merge(config_path, out, MergeOptions(threads=threads, seed=seed, quiet=True))
            check = check_merged_model(out, family, method)
            print(f"{method:<10} {summary.tensors:>7} {summary.seconds:>7.2f} {summary.gbs:>6.2f} "
                  f"{_format_bytes(summary.peak_rss_bytes):>9}  {check['rel_delta']:>14.4f} "
                  f"{check['cos']:>5.3f}", flush=True)
            rows.append({"method": method, "seconds": summary.seconds, "gbs": summary.gbs,
                         "peak_rss": summary.peak_rss_bytes, **check})
        print()
        print("Each merge streamed the checkpoints tensor by tensor into an atomically written "
              "output;\nevery merged model loaded with transformers and gave finite logits. "
              "GB/s counts the\ncheckpoints read and the output written; peak mem is this "
              "process's resident memory.")
        if compare_mergekit:
            _compare_with_mergekit(root / f"{methods[0]}.yml", root)
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    return rows
