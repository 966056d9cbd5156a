"""The files of a merged model besides its weights: config.json (dtype and layer count updated),
tokenizer and generation config copied from the base model, the merge config, a model card."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

from . import __version__
from .config import MergeConfig
from .errors import ConfigError
from .plan import LAYER_COUNT_KEYS, MergePlan

# Copied verbatim from the donor model when present (what HF tokenizers save).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer.model", "added_tokens.json", "merges.txt", "vocab.json",
                   "vocab.txt", "chat_template.jinja", "chat_template.json")
TAGALONG_FILES = ("generation_config.json",)

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")  # what config.json may say
# config.json lists with one entry per decoder layer (transformers checks their length against
# num_hidden_layers): layer stacking takes each output layer's entry from the layer it copies.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "layers_block_type")


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _layer_holders(cfg: dict) -> list:
    """The dicts of a config that may describe the decoder layers: itself and its text_config
    (multimodal models keep the language model's settings there)."""
    text = cfg.get("text_config")
    return [cfg] + ([text] if isinstance(text, dict) else [])


def _stacked_layer_settings(out: dict, plan: MergePlan, configs: Dict[str, dict]) -> None:
    """Layer count and per-layer lists of a layer-stacking merge's config."""
    reference_holders = _layer_holders(configs.get(plan.reference_model) or {})
    for depth, holder in enumerate(_layer_holders(out)):
        for key in LAYER_COUNT_KEYS:
            if key in holder:
                holder[key] = plan.num_layers
                break
        for key in PER_LAYER_KEYS:
            if not isinstance(holder.get(key), list):
                continue
            entries = []
            for model, index in plan.layer_sources:
                holders = _layer_holders(configs.get(model) or {})
                values = holders[depth].get(key) if depth < len(holders) else None
                if not isinstance(values, list) or index >= len(values):
                    values = reference_holders[depth].get(key) if depth < len(reference_holders) \
                        else None
                if not isinstance(values, list) or index >= len(values):
                    raise ConfigError(f"config.json of {model} has no {key} entry for its layer "
                                      f"{index}, which the merge stacks")
                entries.append(values[index])
            holder[key] = entries


def output_config(config: MergeConfig, reference_config: dict, plan: MergePlan,
                  configs: Optional[Dict[str, dict]] = None) -> dict:
    """The reference model's config.json with the output's dtype, number of layers (and, when
    stacking layers, per-layer lists such as layer_types from the layers stacked; configs: the
    models' config.json by name) and (with tokenizer_source: base) vocabulary size."""
    out = json.loads(json.dumps(reference_config))  # deep copy
    dtype = config.out_dtype or config.dtype
    if dtype is None:
        dtypes = {j.out_dtype for j in plan.jobs if j.out_dtype.is_floating_point}
        dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype is not None and dtype.name in DTYPE_NAMES:
        keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]
        for key in keys:
            out[key] = dtype.name
    if config.uses_slices:
        _stacked_layer_settings(out, plan, {plan.reference_model: reference_config,
                                            **(configs or {})})
    if plan.vocab_size is not None:  # mergekit sets it from the written tokenizer
        holder = out if "vocab_size" in out or not isinstance(out.get("text_config"), dict) \
            else out["text_config"]
        holder["vocab_size"] = plan.vocab_size
    return out


def model_card(config: MergeConfig, plan: MergePlan) -> str:
    base = config.base_model
    models = [m for m in config.referenced_models() if m != base]
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- fastmerge", "---", "",
             "# Merged model", "",
             f"Merged with [fastmerge](https://pypi.org/project/fastmerge/) {__version__} using "
             f"the `{config.merge_method}` method ({len(plan.jobs)} tensors).", ""]
    if base:
        lines += [f"Base model: `{base}`", ""]
    lines += ["Models merged:", ""] + [f"- `{m}`" for m in models] + [""]
    lines += ["## Configuration", "", "The mergekit-format config this model was produced from:",
              "", "```yaml", config.text.strip(), "```", ""]
    return "\n".join(lines)


def merged_model_config(config: MergeConfig, readers: Dict[str, object],
                        plan: MergePlan) -> Optional[dict]:
    """The output's config.json (None when the reference model has none). The executor builds
    it once before merging too, so a config it cannot write fails before any work."""
    reference = readers[plan.reference_model]
    if reference.config is None:
        return None
    return output_config(config, reference.config, plan,
                         {m: r.config for m, r in readers.items() if r.config is not None})


def write_model_files(directory: Path, config: MergeConfig, readers: Dict[str, object],
                      plan: MergePlan) -> None:
    model_config = merged_model_config(config, readers, plan)
    if model_config is not None:
        _write_text(directory / "config.json", json.dumps(model_config, indent=2) + "\n")
    # tokenizer_source: base (or none given): the base model's tokenizer, as mergekit copies it
    donor = readers[config.base_model or config.referenced_models()[0]]
    for name in TOKENIZER_FILES + TAGALONG_FILES:
        source = Path(donor.path) / name
        if source.is_file():
            shutil.copyfile(source, directory / name)
    _write_text(directory / "mergekit_config.yml", config.text)
    _write_text(directory / "README.md", model_card(config, plan))
