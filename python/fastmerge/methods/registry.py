"""What a merge method declares, and the table of methods by name."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..config import coerce_bool, coerce_float
from ..dtypes import DType
from ..errors import ConfigError

MISSING = object()

# Where a parameter is bound (mergekit's ParameterScope):
SHARED = "shared"      # one value per tensor, from slice and global parameters
INPUT = "input"        # one value per input model, the base included
NON_BASE = "non_base"  # one value per input model other than the base
INPUT_SCOPES = (INPUT, NON_BASE)


def _coerce_optional_float(value: Any) -> Optional[float]:
    return None if value is None else coerce_float(value)


_INT_TEXT = re.compile(r"^[+-]?[0-9]+(\.0*)?$")


def _coerce_int(value: Any) -> int:
    """An int as mergekit's pydantic validation takes one: ints, bools, integral floats and
    strings of an integer (e.g. "3" or "3.0")."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.match(value.strip()):
        return int(value.strip().split(".")[0])
    raise ValueError(f"expected an integer, got {value!r}")


COERCE = {"float": coerce_float, "bool": coerce_bool, "optional_float": _coerce_optional_float,
          "int": _coerce_int}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: str            # float | bool | optional_float | int
    scope: str           # SHARED | INPUT | NON_BASE
    default: Any = MISSING

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def coerce(self, value: Any) -> Any:
        return COERCE[self.kind](value)


@dataclass
class MergeCall:
    """One tensor's merge: the inputs in config order (base separate when the method uses one)
    with their resolved parameters. The tensors are all HostArrays (host memory, no torch) or
    all torch tensors (CUDA, or dtypes the kernels do not read)."""
    name: str                        # output tensor name (keys the Philox stream)
    base: Any
    inputs: List[Any]                # non-base inputs, or all inputs when the base is ignored
    shared: Dict[str, Any]
    per_input: List[Dict[str, Any]]  # aligned with inputs
    seed: int
    out_dtype: DType

    def values(self, key: str) -> List[Any]:
        return [p[key] for p in self.per_input]

    @property
    def host(self) -> bool:
        from ..host_kernels import HostArray

        first = self.base if self.base is not None else self.inputs[0]
        return isinstance(first, HostArray)


@dataclass
class LoraMergeCall:
    """One adapted module's merge: each adapter's factors (scaling folded into B, fp32), their
    parameters, and the output dtype; merge() returns the merged (B, A)."""
    name: str                        # the module's weight name (keys Philox streams, filters)
    lora_b: List[Any]
    lora_a: List[Any]
    shared: Dict[str, Any]
    per_input: List[Dict[str, Any]]
    seed: int
    out_dtype: Any                   # torch dtype

    def values(self, key: str) -> List[Any]:
        return [p[key] for p in self.per_input]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    parameters: Tuple[ParamSpec, ...]
    merge: Callable[[MergeCall], Any]
    uses_base: bool                  # True: a base model is required and merged against
    min_inputs: int = 1              # counting the base
    max_inputs: Optional[int] = None
    description: str = ""
    # mergekit's BasePolicy.OPTIONAL: merged against the base when the config names one, as
    # plain inputs otherwise (uses_base must then be False).
    optional_base: bool = False
    # False: the method merges torch tensors only (LAPACK/cuBLAS decompositions), so the CPU
    # streaming path hands it torch tensors instead of HostArrays.
    host_kernels: bool = True
    min_non_base: Optional[int] = None
    max_non_base: Optional[int] = None
    # "checkpoints": merge() takes a MergeCall per tensor; "lora": the models are PEFT LoRA
    # adapters and merge() takes a LoraMergeCall per adapted module (fastmerge.lora_merge).
    inputs: str = "checkpoints"

    def splits_base(self, has_base: bool) -> bool:
        """Whether the base is passed apart from the other inputs (MergeCall.base)."""
        return self.uses_base or (self.optional_base and has_base)

    def parameter(self, name: str) -> ParamSpec:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)

    def check_inputs(self, count: int, has_base: bool, where: str) -> None:
        if self.uses_base and not has_base:
            raise ConfigError(f"{where}: {self.name} needs a base_model")
        if count < self.min_inputs:
            raise ConfigError(f"{where}: {self.name} needs at least {self.min_inputs} models "
                              f"(the base included), got {count}")
        if self.max_inputs is not None and count > self.max_inputs:
            raise ConfigError(f"{where}: {self.name} takes at most {self.max_inputs} model(s), "
                              f"got {count}")
        others = count - 1 if self.splits_base(has_base) else count
        if self.min_non_base is not None and others < self.min_non_base:
            raise ConfigError(f"{where}: {self.name} needs at least {self.min_non_base} models "
                              f"besides the base, got {others}")
        if self.max_non_base is not None and others > self.max_non_base:
            raise ConfigError(f"{where}: {self.name} takes at most {self.max_non_base} models "
                              f"besides the base, got {others}")


_METHODS: Dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS:
        raise ValueError(f"merge method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


def method_names() -> List[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"merge_method {name!r} is not supported; supported: "
                          f"{', '.join(method_names())}") from None
