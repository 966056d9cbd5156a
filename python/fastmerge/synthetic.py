"""Offline families of Llama-shaped checkpoints: one random base and experts fine-tuned from it.

`fastmerge demo`, the end-to-end tests and benchmarks/e2e_vs_mergekit.py need real Hugging Face
checkpoints (config.json, sharded safetensors with an index, a tokenizer) without network access.
build_family() makes them: the base is a seeded random-init `LlamaForCausalLM` saved with
`save_pretrained`; expert i is the base plus Gaussian noise scaled per parameter,
delta_i = delta_scale * std * (0.5 * shared + 0.866 * own_i), so the experts partly agree in
sign as fine-tunes of one base do, and ||delta_i|| / ||base|| is about delta_scale.

Noise is drawn per (parameter, chunk) from generators keyed by the seed and the parameter's name,
so a family is reproducible from its seed whatever the thread count, and chunks can be drawn by
several threads at once (torch's CPU normal_ is single-threaded).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Union

import torch

from .errors import InvalidArgumentError

# Llama's special tokens, in its order (unk 0, bos 1, eos 2) plus a pad token.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
# Weights of the shared and the expert-specific noise: 0.5**2 + 0.866**2 ~= 1 keeps the delta's
# std at delta_scale * std, and the experts' deltas correlate with cosine ~0.25.
SHARED_WEIGHT, OWN_WEIGHT = 0.5, math.sqrt(0.75)
# Elements drawn per work item: bounds the transient fp32 memory per thread (3 buffers).
CHUNK_ELEMENTS = 1 << 23
METADATA_FILE = "family.json"
FAMILY_FORMAT = 1  # bump when the same arguments would build different weights

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class LlamaPreset:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def parameter_count(self, tie_word_embeddings: bool = False) -> int:
        """Parameters of LlamaForCausalLM with these shapes (no biases, as Llama has none)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv  # q, o and k, v
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        layer = attention + mlp + 2 * h  # two RMSNorms
        embeddings = self.vocab_size * h * (1 if tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * layer + h  # final norm

    def config(self, dtype: torch.dtype, tie_word_embeddings: bool):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings, dtype=dtype,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


PRESETS: Dict[str, LlamaPreset] = {p.name: p for p in (
    # tests: builds in well under a second; GQA (4 heads, 2 kv heads) and an intermediate size
    # that is not a power of two, so shape bugs show
    LlamaPreset("tiny", 64, 176, 4, 4, 2, 256),
    # the README demo: ~32M parameters, a few seconds to build
    LlamaPreset("demo", 512, 1408, 8, 8, 4, 8192),
    # the CPU benchmark: ~0.50B parameters
    LlamaPreset("0.5b", 1536, 4096, 16, 12, 4, 32000),
    # Llama-3-8B shapes, for GPU benchmark configs only (16 GB per model in bf16)
    LlamaPreset("8b", 4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0,
                max_position_embeddings=8192),
)}


@dataclass(frozen=True)
class CheckpointFamily:
    root: Path
    base: Path
    experts: List[Path]
    preset: LlamaPreset
    dtype: torch.dtype
    tie_word_embeddings: bool = False

    def nbytes(self) -> int:
        """Bytes of weights of one model (the base or any expert)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.preset.parameter_count(self.tie_word_embeddings) * itemsize


def build_family(root: Union[str, Path], *, preset: Union[str, LlamaPreset] = "tiny",
                 experts: int = 3, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 delta_scale: float = 0.1, max_shard_size: Union[int, str] = "2GB",
                 tie_word_embeddings: bool = False, with_tokenizer: bool = True,
                 progress: Optional[ProgressFn] = None, reuse: bool = False,
                 threads: Optional[int] = None) -> CheckpointFamily:
    """Build root/base and root/expert_0 .. root/expert_{experts-1} as HF checkpoints.

    reuse: return the family already under root without building when its family.json says it
    was built with the same arguments (the benchmark's builds of the 0.5b family take a while).
    progress: called with a short message after each model is saved.
    threads: workers drawing noise (default: torch's intra-op thread count).
    """
    spec = preset if isinstance(preset, LlamaPreset) else _preset(preset)
    if experts < 1:
        raise InvalidArgumentError(f"experts must be at least 1, got {experts}")
    if not delta_scale >= 0.0:
        raise InvalidArgumentError(f"delta_scale must be >= 0, got {delta_scale}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidArgumentError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    root = Path(root)
    family = CheckpointFamily(root, root / "base", [root / f"expert_{i}" for i in range(experts)],
                              spec, dtype, tie_word_embeddings)
    metadata = {"format": FAMILY_FORMAT, "preset": asdict(spec), "experts": experts,
                "dtype": str(dtype).replace("torch.", ""), "seed": seed,
                "delta_scale": delta_scale, "max_shard_size": max_shard_size,
                "tie_word_embeddings": tie_word_embeddings, "with_tokenizer": with_tokenizer}
    if reuse and _built_with(root, metadata, family):
        if progress:
            progress(f"reusing the family under {root}")
        return family

    say = progress or (lambda message: None)
    marker = root / METADATA_FILE
    marker.unlink(missing_ok=True)  # a half-rebuilt family must not look reusable
    for path in [family.base, *family.experts]:
        shutil.rmtree(path, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)

    from transformers import LlamaForCausalLM

    # fork_rng: seeding the init must not reset the caller's global RNG
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype), torch.no_grad():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(spec.config(dtype, tie_word_embeddings))
    tokenizer = _build_tokenizer(spec.vocab_size) if with_tokenizer else None
    _save(model, tokenizer, family.base, max_shard_size)
    say(f"saved the base ({spec.name}) to {family.base}")

    # Perturb the model in place from one copy of the base: two copies of the weights at most.
    params = dict(model.named_parameters())  # tied weights appear once
    base_weights = {name: p.detach().clone() for name, p in params.items()}
    stds = {name: _noise_scale(w) for name, w in base_weights.items()}
    workers = threads or max(1, torch.get_num_threads())
    chunks = [(name, start, stop) for name, p in params.items()
              for start, stop in _chunks(p.shape)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, path in enumerate(family.experts):
            def perturb(chunk, expert=index):
                name, start, stop = chunk
                _perturb_chunk(params[name], base_weights[name], name, start, stop,
                               delta_scale * stds[name], seed, expert)

            list(pool.map(perturb, chunks))  # list(): re-raises a worker's exception
            _save(model, tokenizer, path, max_shard_size)
            say(f"saved expert {index + 1}/{experts} to {path}")
    marker.write_text(json.dumps(metadata, indent=1) + "\n")
    return family


def _preset(name: str) -> LlamaPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def _built_with(root: Path, metadata: dict, family: CheckpointFamily) -> bool:
    try:
        found = json.loads((root / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return found == json.loads(json.dumps(metadata)) and all(
        (p / "config.json").exists() for p in [family.base, *family.experts])


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Initialise the model directly in the target dtype: no fp32 copy of an 8b model."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _noise_scale(weight: torch.Tensor) -> float:
    """The parameter's std; RMSNorm weights start constant (std 0), so they use their RMS and
    still move by delta_scale of their size."""
    w = weight.float()
    std = float(w.std()) if w.numel() > 1 else 0.0
    return std if std > 1e-3 * float(w.abs().max()) else float(w.pow(2).mean().sqrt())


def _chunks(shape: torch.Size) -> List[tuple]:
    """Row ranges of about CHUNK_ELEMENTS elements (1-D weights are one chunk)."""
    if len(shape) < 2:
        return [(0, shape[0] if shape else 1)]
    row = math.prod(shape[1:])
    rows = max(1, CHUNK_ELEMENTS // max(row, 1))
    return [(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]


def _generator(seed: int, *key: object) -> torch.Generator:
    digest = hashlib.blake2b(repr((seed,) + key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _perturb_chunk(param: torch.Tensor, base: torch.Tensor, name: str, start: int, stop: int,
                   scale: float, seed: int, expert: int) -> None:
    """param[start:stop] = base + scale * (SHARED_WEIGHT * shared + OWN_WEIGHT * own_expert),
    computed in fp32 and rounded once."""
    target = param.data[start:stop] if param.dim() else param.data
    source = base[start:stop] if base.dim() else base
    shared = torch.randn(source.shape, generator=_generator(seed, "shared", name, start))
    own = torch.randn(source.shape, generator=_generator(seed, "expert", expert, name, start))
    shared.mul_(SHARED_WEIGHT).add_(own, alpha=OWN_WEIGHT)
    del own
    target.copy_(source.float().add_(shared, alpha=scale))


def _save(model, tokenizer, path: Path, max_shard_size: Union[int, str]) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # library code: no "Writing model shards" bars
    try:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
        # transformers 5 no longer writes this file; older loaders and tools still look for it
        specials = path / "special_tokens_map.json"
        if not specials.exists():
            names = ("unk_token", "bos_token", "eos_token", "pad_token")
            specials.write_text(json.dumps(dict(zip(names, SPECIAL_TOKENS)), indent=2) + "\n")


# ---- tokenizer ----

# A fixed word list: the tokenizer is built from it, never trained, so it is the same every time.
_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
          "which but have an they you were her she there been one all we their has would when "
          "if more will model merge expert base weight layer token delta task vector sign mask "
          "hello world fast slow small large left right up down time data test").split()
_ALPHABET = [chr(c) for c in range(33, 127)]  # printable ASCII without the space
_SPACE = "\u2581"  # sentencepiece's word-boundary mark, as Llama tokenizers use


def _build_tokenizer(vocab_size: int):
    """A Llama-style BPE tokenizer (Metaspace, <s> prepended) over ASCII characters plus merges
    that spell a fixed list of common words, truncated to fit vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: Dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, _SPACE, *_ALPHABET]:
        vocab.setdefault(token, len(vocab))
    if len(vocab) > vocab_size:
        raise InvalidArgumentError(f"vocab_size {vocab_size} is smaller than the tokenizer's "
                                   f"base alphabet ({len(vocab)} tokens)")
    merges: List[tuple] = []
    for word in _WORDS:
        pieces = [_SPACE + word[0], *word[1:]]
        steps = [(_SPACE, word[0])] + [("".join(pieces[:i]), pieces[i])
                                       for i in range(1, len(pieces))]
        new = [s for s in steps if s[0] + s[1] not in vocab]
        if len(vocab) + len(new) > vocab_size:
            break
        for left, right in new:
            merges.append((left, right))
            vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", model_max_length=2048)
