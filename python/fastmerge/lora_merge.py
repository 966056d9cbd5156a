"""`fastmerge run` for methods whose models are PEFT LoRA adapters (knots, knots_dare_ties):
every module any adapter adapts is merged from the factors of the adapters that have it, and
the result is written as one PEFT adapter (adapter_model.safetensors + adapter_config.json)
whose factors carry the whole update (lora_alpha = r, scaling 1) at rank r_1 + ... + r_T, the
rank the merged update can have. Nothing of the base model is read; `base_model`, when the
config names one, is recorded as the adapter's base_model_name_or_path.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Dict, List

import torch

from . import __version__
from .config import MergeConfig
from .errors import ConfigError, FastmergeError, MergeInputError
from .io.peft_adapter import KEYS, PREFIX, LoraAdapter, merged_adapter_config, write_adapter
from .io.staging import StagedOutput
from .methods import LoraMergeCall, get_method
from .methods.registry import INPUT_SCOPES, SHARED
from .plan import parameter_value

_LAYER = re.compile(r"\.(\d+)\.")


def _fingerprint(config: MergeConfig, adapters: Dict[str, LoraAdapter], options) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": __version__, "config": config.text,
                         "seed": options.seed}).encode())
    for name in sorted(adapters):
        for file in sorted(adapters[name].path.iterdir()):
            st = os.stat(file)
            h.update(f"{name}|{file}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _positions(modules: List[str]) -> Dict[str, float]:
    """Each module's t in [0, 1] for gradient parameters: its layer index over the largest."""
    index = {m: int(found.group(1)) for m in modules if (found := _LAYER.search(m))}
    last = max(index.values(), default=0)
    return {m: (index.get(m, 0) / last if last else 0.0) for m in modules}


def run_lora_merge(config: MergeConfig, out_dir, options):
    from .executor import MergeSummary, peak_rss_bytes, reset_peak_rss, resolve_model_path

    started = time.perf_counter()
    reset_peak_rss()
    method = get_method(config.merge_method)
    if config.uses_slices:
        raise ConfigError(f"{method.name} merges whole LoRA adapters: list them under `models:`, "
                          f"not `slices:`")
    sources = config.slices[0].sources
    adapters = {s.model: LoraAdapter(resolve_model_path(s.model, config), label=s.model)
                for s in sources}
    modules: List[str] = []
    for s in sources:
        modules += [m for m in adapters[s.model].modules if m not in modules]
    out_dtype = (config.out_dtype or config.dtype)
    dtype: torch.dtype = out_dtype.torch if out_dtype else adapters[sources[0].model].dtype
    device = torch.device(options.device)
    positions = _positions(modules)
    shared_levels = [config.slices[0].parameters, config.parameters]

    tensors: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    bytes_read = 0
    for module in modules:
        used = [s for s in sources if module in adapters[s.model].modules]
        kinds = {adapters[s.model].modules[module].kind for s in used}
        if len(kinds) != 1:
            raise FastmergeError(f"module {module} is an embedding in some adapters and a "
                                 f"linear layer in others")
        tensor_name, t = f"{module}.weight", positions[module]
        shared = {p.name: parameter_value(p, shared_levels, tensor_name, t, f"module {module}")
                  for p in method.parameters if p.scope == SHARED}
        per_input, lora_b, lora_a = [], [], []
        for s in used:
            levels = [s.parameters] + shared_levels
            per_input.append({p.name: parameter_value(p, levels, tensor_name, t,
                                             f"adapter {s.model}, module {module}")
                              for p in method.parameters if p.scope in INPUT_SCOPES})
            b, a = adapters[s.model].factors(module)
            bytes_read += (b.numel() + a.numel()) * adapters[s.model].dtype.itemsize
            lora_b.append(b.to(device))
            lora_a.append(a.to(device))
        shapes = {(b.shape[0], a.shape[1]) for b, a in zip(lora_b, lora_a)}
        if len(shapes) != 1:
            raise FastmergeError(f"module {module} has updates of different shapes in the "
                                 f"adapters: {sorted(shapes)}")
        call = LoraMergeCall(tensor_name, lora_b, lora_a, shared, per_input, options.seed, dtype)
        try:
            merged_b, merged_a = method.merge(call)
        except FastmergeError as exc:
            raise type(exc)(f"module {module}: {exc}") from None
        rank = sum(adapters[s.model].modules[module].rank for s in used)
        kind = next(iter(kinds))
        a_key, b_key = (f"{PREFIX}{module}.{k}" for k in KEYS[kind])
        tensors[b_key] = _pad(merged_b.mT, rank).mT.to("cpu")
        tensors[a_key] = _pad(merged_a, rank).to("cpu")
        ranks[module] = rank

    for key in dict.fromkeys(k for s in sources for k in adapters[s.model].base_layers):
        tensors[key] = _common_base_layer(key, [(s.model, adapters[s.model]) for s in sources
                                                if key in adapters[s.model].base_layers])

    first = dict(adapters[sources[0].model].config)
    if config.base_model:
        first["base_model_name_or_path"] = config.base_model
    staging = StagedOutput(out_dir, fingerprint=_fingerprint(config, adapters, options),
                           overwrite=options.overwrite)
    write_adapter(staging.directory, merged_adapter_config(first, ranks), tensors)
    staging.commit()
    for a in adapters.values():
        a.close()
    written = sum(x.numel() * x.element_size() for x in tensors.values())
    return MergeSummary(output=Path(out_dir), method=config.merge_method, tensors=len(tensors),
                        tensors_merged=len(tensors), bytes_read=bytes_read,
                        bytes_written=written, seconds=time.perf_counter() - started,
                        peak_rss_bytes=peak_rss_bytes(), resumed=False)


def _common_base_layer(key: str, holders) -> torch.Tensor:
    """A base weight PEFT saved with the adapters (resizable embeddings): the adapters must agree
    on it, since the merged adapter can carry only one."""
    first_name, first = holders[0][0], holders[0][1].tensor(key)
    for name, adapter in holders[1:]:
        other = adapter.tensor(key)
        if other.shape != first.shape or not torch.equal(other, first):
            raise MergeInputError(f"adapters {first_name} and {name} save different base weights "
                                  f"{key}; their embeddings were resized or trained differently")
    return first


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x (k x n) with zero rows appended up to `rows`: the adapter's fixed rank."""
    if x.shape[0] == rows:
        return x.contiguous()
    return torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])]).contiguous()
