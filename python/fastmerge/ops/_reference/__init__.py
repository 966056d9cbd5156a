"""Pure-torch reference implementations: the test oracle, the fallback when _C is missing, and a
readable statement of what every native op computes.

Semantics are mergekit 0.1.5's merge methods computed in fp32 (inputs of any float dtype are
converted to fp32 first; the caller rounds the fp32 result once to the output dtype), with the
improvements of DESIGN.md's numerics contract:

* magnitude top-k keeps exactly k = max(1, int(density * numel)) elements, ordered by (|x|
  descending, flat index ascending), so ties go to the lowest flat indices;
* random masks come from a counter-based Philox4x32-10 stream keyed by (seed, tensor name,
  expert index), one draw per element index (bit-identical to csrc/include/fastmerge/philox.h);
* DELLA ranks |delta| along dim 1 (mergekit's argsort(dim=1)) with ties ranking the lower index
  higher, and a one-element rank group gets rank_norm 0.5.

Everything is vectorised torch and runs on any device torch supports; nothing here is tuned for
speed. Functions return fp32 tensors of the input shape (magnitude_mask returns bool).

One module per op family (common, gta, interp, consensus, sphere, subspace, lowrank); the package
re-exports their public functions.
"""
from .common import (
    magnitude_keep_count,
    magnitude_keys,
    philox4x32_10,
    philox_uniforms,
    philox_words,
    priority_order,
)
from .gta import (
    combine,
    della_rank_norm,
    disjoint_merge,
    generalized_task_arithmetic,
    magnitude_mask,
    majority_sign_mask,
    sparsify,
)
from .interp import (
    model_stock,
    nearswap,
    slerp,
)
from .consensus import (
    arcee_fusion,
    arcee_importance,
    fusion_order_keys,
    ram,
    ramplus_tl,
    ramplus_tl_lambdas,
    sce,
    sce_keep_mask,
)
from .sphere import (
    karcher,
    multislerp,
    nuslerp,
)
from .tome import (
    tome_clamp_r,
    tome_match,
    tome_merge_source,
    tome_merge_sum,
    tome_merge_wavg,
    tome_scores,
    tome_unmerge,
)

__all__ = [
    "arcee_fusion",
    "arcee_importance",
    "combine",
    "della_rank_norm",
    "disjoint_merge",
    "fusion_order_keys",
    "generalized_task_arithmetic",
    "karcher",
    "magnitude_keep_count",
    "magnitude_keys",
    "magnitude_mask",
    "majority_sign_mask",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "philox4x32_10",
    "philox_uniforms",
    "philox_words",
    "priority_order",
    "ram",
    "ramplus_tl",
    "ramplus_tl_lambdas",
    "sce",
    "sce_keep_mask",
    "slerp",
    "sparsify",
    "tome_clamp_r",
    "tome_match",
    "tome_merge_source",
    "tome_merge_sum",
    "tome_merge_wavg",
    "tome_scores",
    "tome_unmerge",
]
