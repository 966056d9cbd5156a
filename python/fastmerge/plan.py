"""From a config and the opened checkpoints to the list of output tensors and how each is made.

fastmerge works from tensor names rather than per-architecture tables: a tensor whose name has
a `.layers.N.` (or `.h.N.`, `.blocks.N.`, `.layer.N.`) component belongs to decoder layer N;
the rest are embeddings (before the layers) or norms and heads (after them). The one table kept
is of heads tied to the embeddings: a model saved with tie_word_embeddings has no lm_head
tensor; when another model of the merge has one, that model's head is merged with the tied
models' embeddings, as mergekit does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .config import MergeConfig, OutputSlice, resolve
from .dtypes import DType, promoted_float
from .errors import ConfigError, MergeInputError
from .io.vocabulary import base_vocabulary_rows, vocab_size_of
from .methods import INPUT_SCOPES, MethodSpec, get_method

LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer)\.)(?P<index>\d+)\.(?P<rest>.+)$")
EMBEDDING_HINTS = ("embed", "wte", "wpe", "tok_embeddings", "word_embeddings")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# model_type -> {head tensor: the embedding tensors it is tied to} (facts about HF checkpoints).
_LM_HEAD_TIED = {"lm_head.weight": ("model.embed_tokens.weight",)}
TIED_HEADS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    **{t: _LM_HEAD_TIED for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text",
        "granite", "granitemoehybrid", "olmo2", "starcoder2", "glm4", "glm4_moe", "apertus",
        "arcee", "phi3small")},
    "gpt2": {"lm_head.weight": ("transformer.wte.weight", "wte.weight")},
    "gpt_bigcode": {"lm_head.weight": ("transformer.wte.weight",)},
    "mamba": {"lm_head.weight": ("backbone.embeddings.weight",)},
    "internlm2": {"output.weight": ("model.tok_embeddings.weight",)},
}


def parameter_value(spec, levels, tensor_name: str, t: float, where: str):
    """A method parameter's value for one tensor: the first level (highest precedence first)
    that sets it, else its default; a required parameter nobody sets is a ConfigError."""
    value = resolve(spec.name, levels, tensor_name, t, spec.coerce)
    if value is None:
        if spec.required:
            raise ConfigError(f"missing required parameter {spec.name!r} for {where}")
        return spec.default
    return value


@dataclass(frozen=True)
class InputTensor:
    model: str               # the model as named in the config
    tensor: str              # its name inside that checkpoint
    shape: Tuple[int, ...]   # as merged: `rows` rows when set
    dtype: DType
    nbytes: int              # of what is merged
    rows: Optional[int] = None  # merge only the first rows (a vocabulary's padding dropped)


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: merge inputs (config order) with these parameter values."""
    name: str
    inputs: Tuple[InputTensor, ...]
    base_index: Optional[int]            # which input is the base, for methods that use one
    shared: Mapping[str, object]
    per_input: Tuple[Mapping[str, object], ...]
    shape: Tuple[int, ...]
    out_dtype: DType
    copy_only: bool = False              # non-float tensors (buffers) are copied from input 0

    @property
    def nbytes_in(self) -> int:
        return sum(i.nbytes for i in self.inputs)

    @property
    def nbytes_out(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.out_dtype.itemsize


@dataclass(frozen=True)
class MergePlan:
    jobs: Tuple[TensorJob, ...]
    reference_model: str                 # config.json, tokenizer and card come from it
    num_layers: int                      # decoder layers of the output
    vocab_size: Optional[int] = None     # tokenizer_source: base: the output's vocab_size
    # per output layer: the model and layer index it was made from (first source of its slice)
    layer_sources: Tuple[Tuple[str, int], ...] = ()


def layer_count(reader) -> int:
    cfg = reader.config or {}
    for key in LAYER_COUNT_KEYS:
        value = cfg.get(key)
        if value is None and isinstance(cfg.get("text_config"), dict):
            value = cfg["text_config"].get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    indices = [int(m["index"]) for m in map(LAYER_NAME.match, reader.names()) if m]
    return max(indices) + 1 if indices else 0


class _Layout:
    """A checkpoint's tensor names split into embeddings, layers and the rest."""

    def __init__(self, reader):
        self.pre: List[str] = []
        self.post: List[str] = []
        self.layers: Dict[int, List[str]] = {}
        self.prefix: Optional[str] = None
        for name in reader.names():
            m = LAYER_NAME.match(name)
            if m:
                self.prefix = self.prefix or m["prefix"]
                self.layers.setdefault(int(m["index"]), []).append(m["rest"])
            elif any(h in name for h in EMBEDDING_HINTS):
                self.pre.append(name)
            else:
                self.post.append(name)
        model_type = (reader.config or {}).get("model_type")
        self.tied = TIED_HEADS.get(model_type, {}) if isinstance(model_type, str) else {}


class Planner:
    def __init__(self, config: MergeConfig, readers: Mapping[str, object]):
        self.config = config
        self.readers = readers
        self.method: MethodSpec = get_method(config.merge_method)
        self.reference = config.base_model or config.slices[0].sources[0].model
        self.layouts = {m: _Layout(r) for m, r in readers.items()}
        self.vocabulary_rows = (self._base_vocabulary_rows()
                                if config.tokenizer_source == "base" else None)

    def _base_vocabulary_rows(self) -> int:
        donor = self.config.base_model or self.config.referenced_models()[0]
        return base_vocabulary_rows(
            self.readers[donor].path, self.readers[donor].config,
            {m: (r.path, r.config) for m, r in self.readers.items()})

    def _on_vocabulary(self, name: str) -> bool:
        """Whether a non-layer tensor has a row per token (embeddings, the output head)."""
        if "position" in name or "wpe" in name:
            return False
        return (any(h in name for h in EMBEDDING_HINTS) or name in self.layouts[self.reference].tied
                or name.endswith(("lm_head.weight", "embed_out.weight")))

    # ---- inputs of one tensor ----

    def _models_of(self, out_slice: OutputSlice, limit: Optional[int] = None
                   ) -> Tuple[List[str], Optional[str]]:
        """The slice's input models (the first `limit` sources) and its base among them."""
        models = [s.model for s in out_slice.sources][:limit]
        base = out_slice.base_model or self.config.base_model
        if not self.config.uses_slices and base is not None and base not in models:
            models.append(base)  # mergekit adds the base model as an input
        if len(set(models)) != len(models):
            raise ConfigError(f"a model is listed twice in one merge: {models}")
        if base is not None and base not in models and self.method.optional_base:
            # mergekit refuses it too ("Base input is not present in merge inputs"): merging
            # without the base the config names would silently change the method.
            raise ConfigError(f"{self.config.merge_method} merges against base_model {base}, "
                              f"which is not among the models of a slice ({models})")
        return models, base if base in models else None

    def _find(self, model: str, name: str, out_name: str, optional: bool,
              rows: Optional[int] = None) -> Optional[InputTensor]:
        reader = self.readers[model]
        candidates = [name] + list(self.layouts[model].tied.get(name, ()))
        for candidate in candidates:
            if candidate in reader:
                info = reader.info(candidate)
                shape = tuple(info.shape)
                if rows is not None and shape and shape[0] == vocab_size_of(reader.config) \
                        and shape[0] != rows:
                    kept = info.nbytes // shape[0] * rows
                    return InputTensor(model, candidate, (rows,) + shape[1:], info.dtype, kept,
                                       rows)
                return InputTensor(model, candidate, shape, info.dtype, info.nbytes)
        if optional:
            return None
        raise MergeInputError(f"tensor {name} (for output {out_name}) is missing from model "
                              f"{model} ({reader.path})")

    def _job(self, out_name: str, in_names: Mapping[str, str], out_slice: OutputSlice, t: float,
             optional_head: bool = False, limit: Optional[int] = None,
             rows: Optional[int] = None) -> Optional[TensorJob]:
        models, base = self._models_of(out_slice, limit)
        found = [(m, self._find(m, in_names[m], out_name, optional_head, rows)) for m in models]
        found = [(m, x) for m, x in found if x is not None]
        if not found:
            return None
        models = [m for m, _ in found]
        inputs = tuple(x for _, x in found)
        base = base if base in models else None
        where = f"tensor {out_name}"
        self.method.check_inputs(len(inputs), base is not None, where)

        shapes = {x.shape for x in inputs}
        if len(shapes) != 1:
            detail = ", ".join(f"{x.model}: {list(x.shape)}" for x in inputs)
            raise MergeInputError(f"{where} has different shapes in the models ({detail})")
        shape = inputs[0].shape
        base_index = models.index(base) if base is not None else None
        first = inputs[base_index if base_index is not None else 0]
        if not first.dtype.is_floating_point:
            return TensorJob(out_name, (first,), 0, {}, ({},), shape, first.dtype, copy_only=True)

        shared_levels = [out_slice.parameters, self.config.parameters]
        shared = {p.name: parameter_value(p, shared_levels, out_name, t, where)
                  for p in self.method.parameters if p.scope == "shared"}
        per_input = []
        for model, x in zip(models, inputs):
            levels = [s.parameters for s in out_slice.sources if s.model == model] + shared_levels
            scopes = INPUT_SCOPES if model != base else ("input",)
            # Filters match the name asked for (mergekit): a tied head's is lm_head, not the
            # embeddings it was read from.
            per_input.append({p.name: parameter_value(p, levels, in_names[model], t,
                                                  f"model {model}, tensor {x.tensor}")
                              for p in self.method.parameters if p.scope in scopes})
        out_dtype = (self.config.out_dtype or self.config.dtype
                     or promoted_float([x.dtype for x in inputs if x.dtype.is_floating_point]))
        return TensorJob(out_name, inputs, base_index, shared, tuple(per_input), shape, out_dtype)

    # ---- the whole output ----

    def _slice_lengths(self, out_slice: OutputSlice) -> List[Tuple[str, int, int]]:
        """(model, first layer, count) per source."""
        spans = []
        for s in out_slice.sources:
            total = layer_count(self.readers[s.model])
            start, end = s.layer_range if s.layer_range else (0, total)
            if end > total:
                raise ConfigError(f"layer_range {list(s.layer_range)} of model {s.model} goes past "
                                  f"its {total} layers")
            spans.append((s.model, start, end - start))
        if len({n for _, _, n in spans}) != 1:
            raise ConfigError("every model of a merge must have the same number of layers, got "
                              + ", ".join(f"{m}: {n}" for m, _, n in spans))
        return spans

    def plan(self) -> MergePlan:
        slices = self.config.slices
        ref_layout = self.layouts[self.reference]
        jobs: List[TensorJob] = []

        def non_layer(names: Sequence[str], out_slice: OutputSlice,
                      limit: Optional[int] = None) -> None:
            models, _ = self._models_of(out_slice, limit)
            for name in names:
                optional = name not in self.readers[self.reference]  # a tied head
                rows = self.vocabulary_rows if self._on_vocabulary(name) else None
                job = self._job(name, {m: name for m in models}, out_slice, 0.0, optional, limit,
                                rows)
                if job is not None:
                    jobs.append(job)

        non_layer(ref_layout.pre, slices[0])
        out_layer = 0
        layer_sources: List[Tuple[str, int]] = []
        for out_slice in slices:
            spans = self._slice_lengths(out_slice)
            models, base = self._models_of(out_slice)
            first_model, first_start, count = spans[0]
            start_of = {m: start for m, start, _ in spans}
            for offset in range(count):
                t = offset / (count - 1) if count > 1 else 1.0
                layout = self.layouts[first_model]
                for rest in layout.layers.get(first_start + offset, []):
                    out_name = f"{ref_layout.prefix or layout.prefix}{out_layer}.{rest}"
                    in_names = {}
                    for m in models:
                        prefix = self.layouts[m].prefix or layout.prefix
                        in_names[m] = f"{prefix}{start_of.get(m, first_start) + offset}.{rest}"
                    job = self._job(out_name, in_names, out_slice, t)
                    if job is not None:
                        jobs.append(job)
                layer_sources.append((first_model, first_start + offset))
                out_layer += 1
        # A head tied to the embeddings is an output when any model has it; the models
        # without one contribute their embeddings (mergekit: optional weight, tied_names).
        # mergekit pairs the last slice's models with as many weights as the first slice has
        # sources: only that many of the last slice's models go into the norm and the head.
        post_limit = len(slices[0].sources) if self.config.uses_slices else None
        heads = [h for h in ref_layout.tied if h not in self.readers[self.reference]
                 and any(h in self.readers[m] for m in self._models_of(slices[-1], post_limit)[0])]
        non_layer(ref_layout.post + heads, slices[-1], post_limit)

        names = [j.name for j in jobs]
        if len(set(names)) != len(names):
            raise MergeInputError("the merge would write a tensor twice; are two layer ranges "
                                  "overlapping in name?")
        return MergePlan(tuple(jobs), self.reference, out_layer, self.vocabulary_rows,
                         tuple(layer_sources))
