"""Public functional ops on torch tensors (CPU or CUDA, fp32/fp16/bf16, any shape)."""
from .consensus import arcee_fusion, ram, ramplus_tl, sce
from .gta import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_drop,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    disjoint_merge,
    generalized_task_arithmetic,
    linear,
    majority_sign_mask,
    task_arithmetic,
    ties,
)
from .kvmerge import kv_merge, kv_merge_budget
from .interp import model_stock, nearswap, slerp
from .lowrank import concatenated_svd, knots, lowrank_svd
from .select import magnitude_mask
from .sphere import karcher, multislerp, nuslerp
from .subspace import cart, dc_merge, iso_c, iso_cts, tsv
from .svd import batched_svd, polar, randomized_svd
from .tome import TomeMaps, tome_match, tome_merge, tome_merge_source, tome_unmerge

__all__ = [
    "arcee_fusion",
    "batched_svd",
    "breadcrumbs",
    "breadcrumbs_ties",
    "cart",
    "concatenated_svd",
    "dare_drop",
    "dare_linear",
    "dare_ties",
    "dc_merge",
    "della",
    "della_linear",
    "disjoint_merge",
    "generalized_task_arithmetic",
    "iso_c",
    "iso_cts",
    "karcher",
    "knots",
    "kv_merge",
    "kv_merge_budget",
    "linear",
    "lowrank_svd",
    "magnitude_mask",
    "majority_sign_mask",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "polar",
    "randomized_svd",
    "ram",
    "ramplus_tl",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
    "tsv",
    "TomeMaps",
    "tome_match",
    "tome_merge",
    "tome_merge_source",
    "tome_unmerge",
]
