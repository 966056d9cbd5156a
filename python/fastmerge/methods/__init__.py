"""Merge-method registry: mergekit method name -> parameters (with defaults and scope) -> the
per-tensor function that runs the fused kernel."""
from .registry import (
    INPUT_SCOPES,
    LoraMergeCall,
    MergeCall,
    MethodSpec,
    ParamSpec,
    get_method,
    method_names,
    register,
)
from . import builtin  # noqa: F401  (registers mergekit's methods)
from . import lora  # noqa: F401  (registers the LoRA adapter merges)

__all__ = ["INPUT_SCOPES", "LoraMergeCall", "MergeCall", "MethodSpec", "ParamSpec", "get_method", "method_names", "register"]
