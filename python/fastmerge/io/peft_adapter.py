"""PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors): reading the
factors of every adapted module with its scaling, and writing a merged adapter PEFT loads.

PEFT saves a module's factors as `base_model.model.<module>.lora_A.weight` (r x in) and
`.lora_B.weight` (out x r), or for embeddings `.lora_embedding_A` (r x num_embeddings) and
`.lora_embedding_B` (embedding_dim x r); the update is scaling * B @ A (transposed into the
embedding's layout), scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, with
rank_pattern / alpha_pattern overriding r and lora_alpha per module as PEFT matches them.
PEFT also saves the base weights of adapted embeddings (`<module>.base_layer.weight`, since the
vocabulary may have been resized): those are kept apart (LoraAdapter.base_layers). Adapters
with parts that are not such factor pairs (DoRA magnitudes, LoRA biases, modules to save,
trainable tokens, convolutions) are refused with the name of the first such tensor.
"""
from __future__ import annotations

import json
from collections import Counter
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import CorruptCheckpointError, MergeInputError, ModelNotFoundError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Initialisations after which PEFT subtracts the initial factors from the base weights.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
PREFIX = "base_model.model."
_PAIR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
                   r"lora_embedding_A|lora_embedding_B)$")
_PARTS = {"lora_A.weight": ("linear", "A"), "lora_B.weight": ("linear", "B"),
          "lora_embedding_A": ("embedding", "A"), "lora_embedding_B": ("embedding", "B")}
KEYS = {"linear": ("lora_A.weight", "lora_B.weight"),
        "embedding": ("lora_embedding_A", "lora_embedding_B")}


@dataclass(frozen=True)
class LoraModule:
    name: str        # the adapted module's path in the base model
    kind: str        # "linear" or "embedding"
    rank: int
    scaling: float
    a_key: str       # tensor names in the adapter file
    b_key: str


def _pattern_value(patterns: Mapping[str, object], module: str, default):
    """PEFT's lookup (peft.utils.other.get_pattern_key): the first pattern p with
    re.match(rf"(.*\\.)?({p})$", module)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraAdapter:
    """One PEFT LoRA adapter directory, its tensors read lazily."""

    def __init__(self, path: Path, label: Optional[str] = None):
        self.path = Path(path)
        self.label = label or str(path)
        config_file, weights_file = self.path / CONFIG_FILE, self.path / WEIGHTS_FILE
        if not config_file.is_file() or not weights_file.is_file():
            raise ModelNotFoundError(f"{self.label}: not a PEFT LoRA adapter directory (needs "
                                     f"{CONFIG_FILE} and {WEIGHTS_FILE} in {self.path})")
        try:
            self.config: dict = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MergeInputError(f"{config_file}: cannot read the adapter config "
                                  f"({exc})") from None
        if not isinstance(self.config, dict):
            raise MergeInputError(f"{config_file}: is a JSON {type(self.config).__name__}, not "
                                  f"an object")
        self._check_config()
        from safetensors import safe_open

        try:
            self._file = safe_open(str(weights_file), framework="pt")
        except Exception as exc:  # safetensors' own error type differs between releases
            raise CorruptCheckpointError(f"{weights_file}: not a readable safetensors file "
                                         f"({exc})") from None
        self.modules: Dict[str, LoraModule] = self._find_modules()

    def _check_config(self) -> None:
        c = self.config
        if c.get("peft_type", "LORA") != "LORA":
            raise MergeInputError(f"{self.label}: peft_type {c.get('peft_type')!r} is not LORA")
        for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
            if c.get(flag):
                raise MergeInputError(f"{self.label}: {what} adapters ({flag}: true) cannot be "
                                      f"merged as factor pairs")
        init = c.get("init_lora_weights")
        if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
            raise MergeInputError(
                f"{self.label}: init_lora_weights {init!r} changes the base weights when PEFT "
                f"loads the adapter, so its factors are not an update of the base model; save "
                f"it converted to plain LoRA (path_initial_model_for_weight_conversion) first")
        if c.get("modules_to_save"):
            raise MergeInputError(f"{self.label}: modules_to_save {c['modules_to_save']} are "
                                  f"full weights, not LoRA factors; merge them separately")

    def _find_modules(self) -> Dict[str, LoraModule]:
        parts: Dict[str, Dict[str, str]] = {}
        kinds: Dict[str, str] = {}
        self.base_layers: List[str] = []
        for key in self._file.keys():
            if key.startswith(PREFIX) and key.endswith(".base_layer.weight"):
                self.base_layers.append(key)
                continue
            match = _PAIR.match(key[len(PREFIX):]) if key.startswith(PREFIX) else None
            if match is None:
                raise MergeInputError(f"{self.label}: tensor {key} is not a LoRA factor "
                                      f"(lora_A/lora_B or lora_embedding_A/B)")
            module = match["module"]
            kind, side = _PARTS[match["part"]]
            if kinds.setdefault(module, kind) != kind:
                raise MergeInputError(f"{self.label}: module {module} mixes linear and "
                                      f"embedding factors")
            parts.setdefault(module, {})[side] = key
        modules = {}
        for module, sides in parts.items():
            if set(sides) != {"A", "B"}:
                missing = ({"A", "B"} - set(sides)).pop()
                raise MergeInputError(f"{self.label}: module {module} has no lora_{missing}")
            a_shape = self._file.get_slice(sides["A"]).get_shape()
            b_shape = self._file.get_slice(sides["B"]).get_shape()
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise MergeInputError(f"{self.label}: module {module} has factors of shapes "
                                      f"{list(b_shape)} and {list(a_shape)}; only 2-D LoRA "
                                      f"pairs (Linear, Embedding) can be merged")
            if a_shape[0] == 0:
                raise MergeInputError(f"{self.label}: module {module} has rank 0 (PEFT needs "
                                      f"r > 0)")
            modules[module] = LoraModule(module, kinds[module], a_shape[0],
                                         self._scaling(module, a_shape[0]), sides["A"],
                                         sides["B"])
        if not modules:
            raise MergeInputError(f"{self.label}: {WEIGHTS_FILE} holds no LoRA factor pairs")
        return modules

    def _scaling(self, module: str, rank: int) -> float:
        c = self.config
        patterns = c.get("alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise MergeInputError(f"{self.label}: alpha_pattern {patterns!r:.100} is not an "
                                  f"object of module patterns")
        try:
            alpha = _pattern_value(patterns, module, c.get("lora_alpha", 8))
        except re.error as exc:
            raise MergeInputError(f"{self.label}: alpha_pattern has an invalid regular "
                                  f"expression ({exc})") from None
        if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                or not math.isfinite(alpha)):
            raise MergeInputError(f"{self.label}: lora_alpha for module {module} is "
                                  f"{alpha!r:.100}, not a finite number")
        if c.get("use_rslora"):
            return float(alpha) / math.sqrt(rank)
        return float(alpha) / rank

    @property
    def dtype(self) -> torch.dtype:
        first = next(iter(self.modules.values()))
        return self._file.get_tensor(first.a_key).dtype

    def factors(self, module: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scaling * B, A) in fp32: their product is the module's update (out x in for
        Linear, embedding_dim x num_embeddings for Embedding, as PEFT stores B and A)."""
        m = self.modules[module]
        b = self._file.get_tensor(m.b_key).float() * m.scaling
        return b, self._file.get_tensor(m.a_key).float()

    def tensor(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def close(self) -> None:
        self._file = None


def write_adapter(directory: Path, config: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """Writes a PEFT LoRA adapter: the tensors (full PEFT names) and its config."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")


def merged_adapter_config(first: dict, ranks: Mapping[str, int]) -> dict:
    """The config of a merged adapter whose factors carry the whole update (scaling 1): r and
    lora_alpha equal, per module through rank_pattern/alpha_pattern when the ranks differ.
    PEFT adapts exactly the merged modules: target_modules lists their full names, and the
    first adapter's layer selection (layers_to_transform, exclude_modules) and initialisation
    would drop merged updates or add random ones, so they are reset."""
    config = dict(first)
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    patterns = {re.escape(m): r for m, r in ranks.items() if r != common}
    config.update(r=common, lora_alpha=common, use_rslora=False, rank_pattern=patterns,
                  alpha_pattern=dict(patterns), target_modules=list(ranks),
                  layers_to_transform=None, layers_pattern=None, exclude_modules=None,
                  init_lora_weights=True, use_dora=False, modules_to_save=None,
                  inference_mode=True)
    return config
