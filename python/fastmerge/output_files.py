"""The files of a merged model besides its weights: config.json (dtype and layer count updated),
tokenizer and generation config copied from the base model, the merge config, a model card."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict

from . import __version__
from .config import MergeConfig
from .plan import LAYER_COUNT_KEYS, MergePlan

# Copied verbatim from the donor model when present (what HF tokenizers save).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer.model", "added_tokens.json", "merges.txt", "vocab.json",
                   "vocab.txt", "chat_template.jinja", "chat_template.json")
TAGALONG_FILES = ("generation_config.json",)

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")  # what config.json may say


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def output_config(config: MergeConfig, reference_config: dict, plan: MergePlan) -> dict:
    """The reference model's config.json with the output's dtype, number of layers and (with
    tokenizer_source: base) vocabulary size."""
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
        for key in LAYER_COUNT_KEYS:
            if key in out:
                out[key] = plan.num_layers
                break
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


def write_model_files(directory: Path, config: MergeConfig, readers: Dict[str, object],
                      plan: MergePlan) -> None:
    reference = readers[plan.reference_model]
    if reference.config is not None:
        _write_text(directory / "config.json",
                    json.dumps(output_config(config, reference.config, plan), indent=2) + "\n")
    # tokenizer_source: base (or none given): the base model's tokenizer, as mergekit copies it
    donor = readers[config.base_model or config.referenced_models()[0]]
    for name in TOKENIZER_FILES + TAGALONG_FILES:
        source = Path(donor.path) / name
        if source.is_file():
            shutil.copyfile(source, directory / name)
    _write_text(directory / "mergekit_config.yml", config.text)
    _write_text(directory / "README.md", model_card(config, plan))
