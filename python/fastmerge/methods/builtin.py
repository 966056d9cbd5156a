"""mergekit 0.1.5's methods, with its names, parameters, defaults and input rules, each
running one fused fastmerge kernel per tensor: on HostArrays (numpy, the CPU streaming path,
no torch) through fastmerge.host_kernels, on torch tensors through fastmerge.ops."""
from __future__ import annotations

from typing import Optional

from .. import host_kernels
from .registry import INPUT, NON_BASE, SHARED, MergeCall, MethodSpec, ParamSpec, register


def _ops():
    from .. import ops  # imports torch: only for merges of torch tensors

    return ops


def _cast(call: MergeCall, x, scale: Optional[float] = None):
    """x (times scale) in the output dtype, computed in fp32 and rounded once."""
    if call.host:
        if scale is None and x.dtype == call.out_dtype:
            return x
        return host_kernels.gta(None, [x], call.out_dtype, weight=1.0 if scale is None else scale)
    if scale is None:
        return x.to(call.out_dtype.torch)
    return (x.float() * scale).to(call.out_dtype.torch)


def _gta(name: str, sparsification: Optional[str], consensus: Optional[str], normalize: bool,
         rescale: bool, description: str) -> MethodSpec:
    params = [
        ParamSpec("int8_mask", "bool", SHARED, False),  # mergekit's mask dtype; fp32 here anyway
        ParamSpec("normalize", "bool", SHARED, normalize),
        ParamSpec("rescale", "bool", SHARED, rescale),
        ParamSpec("lambda", "float", SHARED, 1.0),
        ParamSpec("weight", "float", NON_BASE),
        ParamSpec("density", "float", NON_BASE, 1.0),
    ]
    if sparsification == "magnitude_outliers":
        params.append(ParamSpec("gamma", "float", NON_BASE, 0.01))
    if sparsification == "della_magprune":
        params.append(ParamSpec("epsilon", "float", NON_BASE, 0.15))

    def merge(call: MergeCall):
        if not call.inputs:
            return _cast(call, call.base)
        params = dict(density=call.values("density"), sparsification=sparsification,
                      consensus=consensus, rescale=call.shared["rescale"],
                      normalize=call.shared["normalize"], lambda_=call.shared["lambda"],
                      seed=call.seed, name=call.name)
        if sparsification == "magnitude_outliers":
            params["gamma"] = call.values("gamma")
        if sparsification == "della_magprune":
            params["epsilon"] = call.values("epsilon")
        if call.host:
            return host_kernels.gta(call.base, call.inputs, call.out_dtype,
                                    weight=call.values("weight"), **params)
        return _ops().generalized_task_arithmetic(
            call.base, call.inputs, call.values("weight"), out_dtype=call.out_dtype.torch,
            **params)

    return register(MethodSpec(name, tuple(params), merge, uses_base=True,
                               description=description))


_gta("task_arithmetic", None, None, False, False, "base + sum of weighted task vectors")
_gta("ties", "magnitude", "sum", True, False, "magnitude top-k, sign election, disjoint mean")
_gta("dare_ties", "random", "sum", False, True, "random drop with rescale, sign election")
_gta("dare_linear", "random", None, False, True, "random drop with rescale, weighted sum")
_gta("breadcrumbs", "magnitude_outliers", None, False, False,
     "drop the largest and smallest magnitudes, weighted sum")
_gta("breadcrumbs_ties", "magnitude_outliers", "sum", False, False,
     "breadcrumbs sparsification with sign election")
_gta("della", "della_magprune", "sum", True, True,
     "magnitude-ranked drop probabilities, rescale, sign election")
_gta("della_linear", "della_magprune", None, False, True,
     "magnitude-ranked drop probabilities, rescale, weighted sum")


def _linear(call: MergeCall):
    if call.host:
        return host_kernels.gta(None, call.inputs, call.out_dtype, weight=call.values("weight"),
                                normalize=call.shared["normalize"])
    return _ops().linear(call.inputs, call.values("weight"), normalize=call.shared["normalize"],
                         out_dtype=call.out_dtype.torch)


register(MethodSpec("linear", (ParamSpec("weight", "float", INPUT),
                               ParamSpec("normalize", "bool", SHARED, True)),
                    _linear, uses_base=False, description="weighted average of the models"))


def _two_models(kernel: str, description: str) -> MethodSpec:
    """A method of the base and one other model with a shared t (slerp, nearswap)."""

    def merge(call: MergeCall):
        other, t = call.inputs[0], call.shared["t"]
        if call.host:
            return getattr(host_kernels, kernel)(call.base, other, t, call.out_dtype)
        return getattr(_ops(), kernel)(call.base, other, t, out_dtype=call.out_dtype.torch)

    return register(MethodSpec(kernel, (ParamSpec("t", "float", SHARED),), merge,
                               uses_base=True, min_inputs=2, max_inputs=2,
                               description=description))


_two_models("slerp", "spherical interpolation from the base (t=0) to the other model")
_two_models("nearswap", "take the other model's values where they are close to the base's")


def _model_stock(call: MergeCall):
    if call.host:
        return host_kernels.model_stock(call.base, call.inputs, call.shared["filter_wise"],
                                        call.out_dtype)
    return _ops().model_stock(call.base, call.inputs, filter_wise=call.shared["filter_wise"],
                              out_dtype=call.out_dtype.torch)


register(MethodSpec("model_stock", (ParamSpec("filter_wise", "bool", SHARED, False),),
                    _model_stock, uses_base=True, min_inputs=3,
                    description="interpolate the models' average toward the base by their geometry"))


def _passthrough(call: MergeCall):
    return _cast(call, call.inputs[0], call.per_input[0]["scale"])


register(MethodSpec("passthrough", (ParamSpec("scale", "optional_float", INPUT, None),),
                    _passthrough, uses_base=False, max_inputs=1,
                    description="copy one model's tensors (layer stacking with slices)"))


def _with_experts(kernel: str, params, description: str, **spec) -> MethodSpec:
    """A method of the base and any number of experts with shared scalar parameters (the
    consensus family: ram, ramplus_tl, sce); mergekit returns the base when no expert has the
    tensor."""
    names = [p.name for p in params if p.name != "int8_mask"]

    def merge(call: MergeCall):
        if not call.inputs:
            return _cast(call, call.base)
        values = [call.shared[n] for n in names]
        if call.host:
            return getattr(host_kernels, kernel)(call.base, call.inputs, *values, call.out_dtype)
        return getattr(_ops(), kernel)(call.base, call.inputs, out_dtype=call.out_dtype.torch,
                                       **dict(zip(names, values)))

    return register(MethodSpec(kernel, tuple(params), merge, uses_base=True,
                               description=description, **spec))


_with_experts("ram", (ParamSpec("epsilon", "float", SHARED, 1e-5),),
              "Reinforced Agent Merging: unique deltas kept, shared deltas averaged")
_with_experts("ramplus_tl", (ParamSpec("r", "float", SHARED, 0.1),
                             ParamSpec("alpha", "float", SHARED, 0.2),
                             ParamSpec("epsilon", "float", SHARED, 1e-5)),
              "RAM+ (tensor-local): ram with unique deltas rescaled by the overlap ratio")
_with_experts("sce", (ParamSpec("int8_mask", "bool", SHARED, False),  # mask dtype; no effect here
                      ParamSpec("select_topk", "float", SHARED, 1.0)),
              "select by variance, sign election, weights by mean squared delta")


def _arcee_fusion(call: MergeCall):
    other = call.inputs[0]
    if call.host:
        return host_kernels.arcee_fusion(call.base, other, call.out_dtype)
    return _ops().arcee_fusion(call.base, other, out_dtype=call.out_dtype.torch)


register(MethodSpec("arcee_fusion", (), _arcee_fusion, uses_base=True, min_inputs=2, max_inputs=2,
                    description="take the other model's values where their KL-weighted change "
                                "is an outlier"))


# ---- sphere family: nuslerp, multislerp, karcher ----

def _nuslerp(call: MergeCall):
    from .._params import nuslerp_t

    t = nuslerp_t(call.values("weight"))
    dim = 0 if call.shared["nuslerp_row_wise"] else -1
    flatten = call.shared["nuslerp_flatten"]
    v0, v1 = call.inputs
    if call.host:
        return host_kernels.nuslerp(call.base, v0, v1, t, call.out_dtype, dim=dim, flatten=flatten)
    return _ops().nuslerp(t, v0, v1, base=call.base, dim=dim, flatten=flatten,
                          out_dtype=call.out_dtype.torch)


register(MethodSpec("nuslerp", (ParamSpec("weight", "float", NON_BASE),
                                ParamSpec("nuslerp_row_wise", "bool", SHARED, False),
                                ParamSpec("nuslerp_flatten", "bool", SHARED, True)),
                    _nuslerp, uses_base=False, optional_base=True, min_non_base=2,
                    max_non_base=2,
                    description="spherical interpolation of two models (or their task vectors)"))


def _multislerp(call: MergeCall):
    weights, shared = call.values("weight"), call.shared
    if call.host:
        return host_kernels.multislerp(call.base, call.inputs, weights, call.out_dtype,
                                       normalize_weights=shared["normalize_weights"],
                                       eps=shared["eps"])
    return _ops().multislerp(call.inputs, weights, base=call.base,
                             normalize_weights=shared["normalize_weights"], eps=shared["eps"],
                             out_dtype=call.out_dtype.torch)


register(MethodSpec("multislerp", (ParamSpec("weight", "float", NON_BASE),
                                   ParamSpec("normalize_weights", "bool", SHARED, True),
                                   ParamSpec("eps", "float", SHARED, 1e-8)),
                    _multislerp, uses_base=False, optional_base=True, min_non_base=1,
                    description="barycentric interpolation of models on the hypersphere"))


def _karcher(call: MergeCall):
    max_iter, tol = call.shared["max_iter"], call.shared["tol"]
    if call.host:
        return host_kernels.karcher(call.inputs, call.out_dtype, max_iter=max_iter, tol=tol)
    return _ops().karcher(call.inputs, max_iter=max_iter, tol=tol, out_dtype=call.out_dtype.torch)


register(MethodSpec("karcher", (ParamSpec("max_iter", "int", SHARED, 10),
                                ParamSpec("tol", "float", SHARED, 1e-5)),
                    _karcher, uses_base=False,
                    description="Karcher (Riemannian) mean of the models' directions"))


# ---- subspace merges (torch: LAPACK / cuBLAS decompositions) ----

def _subspace(name: str, extra, description: str) -> MethodSpec:
    """TSV-M / Iso-C / Iso-CTS over the base and the experts: 2-D tensors merged in their
    singular subspaces, every other tensor by the mean task vector; base + alpha * merged."""
    params = (ParamSpec("alpha", "float", SHARED, 1.0),
              ParamSpec("exact", "bool", SHARED, False)) + tuple(extra)

    def merge(call: MergeCall):
        if not call.inputs:
            return _cast(call, call.base)
        # YAML's `lambda` is the ops' `lambda_` (a Python keyword otherwise)
        kwargs = {("lambda_" if p.name == "lambda" else p.name): call.shared[p.name]
                  for p in params}
        op = getattr(_ops(), name)
        if name == "cart" and not _cart_low_ranks(call.name):
            # flattened, the op takes the mean task vector, as the authors do for these
            flat = op(call.base.reshape(-1), [x.reshape(-1) for x in call.inputs],
                      out_dtype=call.out_dtype.torch, **kwargs)
            return flat.reshape(call.base.shape)
        return op(call.base, call.inputs, out_dtype=call.out_dtype.torch, **kwargs)

    return register(MethodSpec(name, params, merge, uses_base=True, host_kernels=False,
                               description=description))


def _cart_low_ranks(tensor_name: str) -> bool:
    """CART's rule (the authors' merging.py): attention and MLP weights get the low-rank
    correction; embeddings, heads, norms and biases are averaged."""
    return (("attn" in tensor_name or "mlp" in tensor_name)
            and not ("ln" in tensor_name or "bias" in tensor_name))


_subspace("tsv", (), "Task Singular Vectors (TSV-M): each task's top singular vectors, "
                     "decorrelated")
_subspace("iso_c", (), "Iso-C: the summed task vectors with a flat singular spectrum")
_subspace("iso_cts", (ParamSpec("common_space_fraction", "float", SHARED, 0.8),),
          "Iso-CTS: common and task-specific singular subspaces, flat spectrum")
_subspace("cart", (ParamSpec("rank_ratio", "float", SHARED, 0.08),
                  ParamSpec("lambda", "float", SHARED, 1.0)),
          "CART: the average plus the low-rank parts of the task vectors centred at it")
_subspace("dc_merge", (ParamSpec("keep_fraction", "float", SHARED, 1e-3),),
          "DC-Merge: task vectors merged by sign election in TSV-M's decorrelated basis")
