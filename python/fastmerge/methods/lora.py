"""Merges of PEFT LoRA adapters, module by module, in factored form (fastmerge.lora_merge runs
them): the models of the config are adapter directories and the output is an adapter."""
from __future__ import annotations

from .registry import NON_BASE, SHARED, LoraMergeCall, MethodSpec, ParamSpec, register


def _knots(sparsification: str):
    def merge(call: LoraMergeCall):
        from .. import ops

        return ops.knots(call.lora_b, call.lora_a, weights=call.values("weight"),
                         density=call.shared["density"], sparsification=sparsification,
                         lambda_=call.shared["lambda"], seed=call.seed, name=call.name,
                         exact=call.shared["exact"], out_dtype=call.out_dtype)

    return merge


_KNOTS_PARAMS = (ParamSpec("weight", "float", NON_BASE, 1.0),
                 ParamSpec("density", "float", SHARED, 1.0),
                 ParamSpec("lambda", "float", SHARED, 1.0),
                 ParamSpec("exact", "bool", SHARED, False))

register(MethodSpec("knots", _KNOTS_PARAMS, _knots("magnitude"), uses_base=False, min_inputs=1,
                    host_kernels=False, inputs="lora",
                    description="KnOTS-TIES: LoRA adapters aligned by the SVD of their "
                                "concatenated updates, merged there by TIES (factored)"))
register(MethodSpec("knots_dare_ties", _KNOTS_PARAMS, _knots("random"), uses_base=False,
                    min_inputs=1, host_kernels=False, inputs="lora",
                    description="KnOTS-DARE-TIES: as knots, with DARE's random drop instead "
                                "of the magnitude trim"))
