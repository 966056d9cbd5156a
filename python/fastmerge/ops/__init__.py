"""Public functional ops on torch tensors (CPU or CUDA, fp32/fp16/bf16, any shape)."""
from .gta import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_drop,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    generalized_task_arithmetic,
    linear,
    task_arithmetic,
    ties,
)
from .interp import model_stock, nearswap, slerp
from .select import magnitude_mask

__all__ = [
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_drop",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "generalized_task_arithmetic",
    "linear",
    "magnitude_mask",
    "model_stock",
    "nearswap",
    "slerp",
    "task_arithmetic",
    "ties",
]

from .sphere import karcher, multislerp, nuslerp  # noqa: E402

__all__ += ["karcher", "multislerp", "nuslerp"]
