"""mergekit 0.1.5 YAML merge configurations: parsing, and parameter values per tensor.

A config names the method, the models (or layer slices of models), the base model and
parameters. A parameter value may be
  - a scalar (``weight: 0.5``),
  - a gradient: a list interpolated over the layer position t in [0, 1] (numbers linearly,
    bools and strings stepwise), e.g. ``density: [0.2, 0.8]``,
  - filtered values: ``[{filter: mlp, value: 0.3}, {value: 0.7}]``, the first entry whose
    filter is a substring of the tensor name (or absent, or ``*``) wins; its value may itself
    be a gradient.
Precedence, highest first: the model's own parameters in the slice, the slice's parameters,
the global ``parameters``; the first level that gives a value wins, then the method's
default. Tensors outside the decoder layers are evaluated at t = 0 (the first gradient
value), as mergekit does.

Unknown keys are errors (mergekit ignores them silently; a typo such as ``wieght`` would then
merge with the default).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .dtypes import DType, bfloat16, float16, float32
from .errors import ConfigError

TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype",
                  "out_dtype", "tokenizer_source")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_SOURCES = ("base",)

DTYPES = {
    "float32": float32, "fp32": float32, "float": float32,
    "float16": float16, "fp16": float16, "half": float16,
    "bfloat16": bfloat16, "bf16": bfloat16,
}

Scalar = Union[bool, int, float, str]
Setting = Any  # Scalar | list[Scalar] | list[dict(filter, value)] | dict(filter, value)


@dataclass(frozen=True)
class SliceSource:
    """Layers [start, end) of one model, with that model's parameters in this slice."""
    model: str
    layer_range: Optional[Tuple[int, int]]  # None: every layer (a `models:` entry)
    parameters: Mapping[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    sources: Tuple[SliceSource, ...]
    base_model: Optional[str] = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    merge_method: str
    base_model: Optional[str]
    slices: Tuple[OutputSlice, ...]      # a `models:` config is one slice over every layer
    uses_slices: bool                    # True when the YAML had `slices:`
    parameters: Mapping[str, Setting]
    dtype: Optional[DType]
    out_dtype: Optional[DType]
    tokenizer_source: Optional[str]
    text: str                            # the YAML as given, for the model card
    directory: Path                      # the config file's directory (relative model paths)

    def referenced_models(self) -> List[str]:
        """Every model the merge reads, base first, each once, in order of appearance."""
        seen: List[str] = []
        for name in [self.base_model] + [s.base_model for s in self.slices] + [
                src.model for s in self.slices for src in s.sources]:
            if name is not None and name not in seen:
                seen.append(name)
        return seen


def _where(path: Optional[Path]) -> str:
    return f"{path}: " if path else ""


def _check_keys(entry: Any, allowed: Sequence[str], what: str, path: Optional[Path]) -> dict:
    if not isinstance(entry, dict):
        raise ConfigError(f"{_where(path)}{what} must be a mapping, got {entry!r}")
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        raise ConfigError(f"{_where(path)}unknown key(s) {', '.join(map(repr, unknown))} in {what}; "
                          f"supported: {', '.join(allowed)}")
    return entry


def _model_name(value: Any, what: str, path: Optional[Path]) -> str:
    if isinstance(value, dict) and "model" in value:  # mergekit also accepts {model: {path: ...}}
        value = value["model"]
        if isinstance(value, dict):
            value = value.get("path")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{_where(path)}{what} must be a model path, got {value!r}")
    if "+" in value and not os.path.exists(value):
        raise ConfigError(f"{_where(path)}{what} {value!r} applies a LoRA (model+lora); fastmerge "
                          f"merges full checkpoints only: merge the adapter into its model first")
    return value


def _parameters(value: Any, what: str, path: Optional[Path]) -> Dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{_where(path)}{what} must be a mapping of parameter names, got {value!r}")
    for name, setting in value.items():
        _check_setting(setting, f"{what}.{name}", path)
    return dict(value)


def _check_setting(setting: Setting, what: str, path: Optional[Path]) -> None:
    if isinstance(setting, (bool, int, float, str)):
        return
    if isinstance(setting, dict):
        _check_keys(setting, ("filter", "value"), what, path)
        if "value" not in setting:
            raise ConfigError(f"{_where(path)}{what} has a filter without a value: {setting!r}")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise ConfigError(f"{_where(path)}{what}: filter must be a string, got {setting['filter']!r}")
        _check_setting(setting["value"], what, path)
        return
    if isinstance(setting, list):
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return
        if all(isinstance(e, dict) for e in setting):
            for e in setting:
                _check_setting(e, what, path)
            return
        raise ConfigError(f"{_where(path)}{what} mixes scalars and filters: {setting!r}")
    raise ConfigError(f"{_where(path)}{what} must be a number, bool, string, list (gradient) or "
                      f"filter list, got {setting!r}")


def _dtype(value: Any, what: str, path: Optional[Path]) -> Optional[DType]:
    if value is None:
        return None
    if value not in DTYPES:
        raise ConfigError(f"{_where(path)}{what} {value!r} is not supported; use one of "
                          f"{', '.join(sorted(DTYPES))}")
    return DTYPES[value]


def _layer_range(value: Any, what: str, path: Optional[Path]) -> Tuple[int, int]:
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    if not ok or not 0 <= value[0] < value[1]:
        raise ConfigError(f"{_where(path)}{what} must be [start, end) with 0 <= start < end, "
                          f"got {value!r}")
    return int(value[0]), int(value[1])


def parse_config(text: str, path: Optional[Path] = None) -> MergeConfig:
    """Parses a mergekit YAML config; every error names the config and the offending key."""
    from .methods import method_names

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{_where(path)}not valid YAML: {exc}") from None
    raw = _check_keys(raw, TOP_LEVEL_KEYS, "the config", path)
    method = raw.get("merge_method")
    if method not in method_names():
        raise ConfigError(f"{_where(path)}merge_method {method!r} is not supported; supported: "
                          f"{', '.join(method_names())}")
    has_models, has_slices = raw.get("models") is not None, raw.get("slices") is not None
    if has_models == has_slices:
        raise ConfigError(f"{_where(path)}give exactly one of 'models' or 'slices'")

    slices: List[OutputSlice] = []
    if has_models:
        entries = raw["models"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{_where(path)}models must be a non-empty list")
        sources = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):  # `- path` shorthand
                entry = {"model": entry}
            entry = _check_keys(entry, MODEL_KEYS, f"models[{i}]", path)
            sources.append(SliceSource(_model_name(entry.get("model"), f"models[{i}].model", path),
                                       None, _parameters(entry.get("parameters"),
                                                         f"models[{i}].parameters", path)))
        slices.append(OutputSlice(tuple(sources)))
    else:
        entries = raw["slices"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{_where(path)}slices must be a non-empty list")
        for i, entry in enumerate(entries):
            entry = _check_keys(entry, SLICE_KEYS, f"slices[{i}]", path)
            if not isinstance(entry.get("sources"), list) or not entry["sources"]:
                raise ConfigError(f"{_where(path)}slices[{i}].sources must be a non-empty list")
            sources = []
            for j, src in enumerate(entry["sources"]):
                what = f"slices[{i}].sources[{j}]"
                src = _check_keys(src, SOURCE_KEYS, what, path)
                if "layer_range" not in src:
                    raise ConfigError(f"{_where(path)}{what} needs a layer_range")
                sources.append(SliceSource(_model_name(src.get("model"), f"{what}.model", path),
                                           _layer_range(src["layer_range"], f"{what}.layer_range", path),
                                           _parameters(src.get("parameters"), f"{what}.parameters", path)))
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
            if len(lengths) != 1:
                raise ConfigError(f"{_where(path)}slices[{i}]: every source must span the same "
                                  f"number of layers, got {[s.layer_range for s in sources]}")
            base = entry.get("base_model")
            slices.append(OutputSlice(tuple(sources),
                                      _model_name(base, f"slices[{i}].base_model", path) if base else None,
                                      _parameters(entry.get("parameters"), f"slices[{i}].parameters", path)))

    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source is not None and tokenizer_source not in TOKENIZER_SOURCES:
        raise ConfigError(f"{_where(path)}tokenizer_source {tokenizer_source!r} is not supported; "
                          f"supported: {', '.join(TOKENIZER_SOURCES)} (or leave it out: the base "
                          f"model's tokenizer is copied)")
    base = raw.get("base_model")
    config = MergeConfig(
        merge_method=method,
        base_model=_model_name(base, "base_model", path) if base is not None else None,
        slices=tuple(slices),
        uses_slices=has_slices,
        parameters=_parameters(raw.get("parameters"), "parameters", path),
        dtype=_dtype(raw.get("dtype"), "dtype", path),
        out_dtype=_dtype(raw.get("out_dtype"), "out_dtype", path),
        tokenizer_source=tokenizer_source,
        text=text,
        directory=(path.parent if path else Path.cwd()),
    )
    _check_parameter_names(config, path)
    return config


def _check_parameter_names(config: MergeConfig, path: Optional[Path]) -> None:
    from .methods import get_method

    known = [p.name for p in get_method(config.merge_method).parameters]
    levels = [("parameters", config.parameters)]
    for i, s in enumerate(config.slices):
        levels.append((f"slices[{i}].parameters", s.parameters))
        for j, src in enumerate(s.sources):
            where = f"models[{j}]" if not config.uses_slices else f"slices[{i}].sources[{j}]"
            levels.append((f"{where}.parameters", src.parameters))
    for where, params in levels:
        for name in params:
            if name not in known:
                raise ConfigError(f"{_where(path)}{where}: {config.merge_method} has no parameter "
                                  f"{name!r}; its parameters: {', '.join(known) or '(none)'}")


def load_config(path: Union[str, os.PathLike]) -> MergeConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    return parse_config(text, path)


# ---- values per tensor ----

def evaluate_setting(setting: Setting, tensor_name: str, t: float, coerce) -> Any:
    """The value of one setting for a tensor at layer position t, or None when no filter
    matches. coerce converts a scalar to the parameter's type (raising ValueError)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return coerce(setting)
    if not setting:
        return None
    if isinstance(setting[0], dict):
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t, coerce)
        return None
    values = [coerce(v) for v in setting]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numeric:  # bools and strings step through the list
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return coerce((1 - frac) * values[i0] + frac * values[i1])


def coerce_float(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ValueError(f"expected a number, got {value!r}")


_TRUE = {"true", "yes", "on", "1", "t", "y"}
_FALSE = {"false", "no", "off", "0", "f", "n"}


def coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {value!r}")


def resolve(name: str, levels: Sequence[Optional[Mapping[str, Setting]]], tensor_name: str,
            t: float, coerce) -> Any:
    """First value any level gives (highest precedence first), or None."""
    for level in levels:
        if level and name in level:
            try:
                value = evaluate_setting(level[name], tensor_name, t, coerce)
            except ValueError as exc:
                raise ConfigError(f"parameter {name!r} for {tensor_name}: {exc}") from None
            if value is not None:
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"parameter {name!r} for {tensor_name} is {value}")
                return value
    return None
