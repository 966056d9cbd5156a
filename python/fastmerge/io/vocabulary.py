"""Tokenizer vocabularies, for `tokenizer_source: base`: mergekit then writes the base model's
tokenizer with the tokens past its config's vocab_size stripped, and gives the embedding and
head one row per token of it (padding rows are dropped, config.json's vocab_size follows).

Read from tokenizer.json (what every fast tokenizer saves) without transformers; a model with
only a slow tokenizer is read through transformers when it is installed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional

from ..errors import ConfigError, CorruptCheckpointError


def tokenizer_vocabulary(model_dir: Path) -> Optional[Dict[str, int]]:
    """token -> id, as get_vocab() of the model's HF tokenizer (model vocabulary and added
    tokens); None when the model has no tokenizer we can read."""
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return _vocabulary_of(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"{path}: not a tokenizer.json fastmerge can read "
                                         f"({exc})") from None
    if not any((Path(model_dir) / name).is_file()
               for name in ("tokenizer.model", "vocab.json", "tokenizer_config.json")):
        return None
    try:
        import transformers
    except ImportError:
        return None
    try:
        return dict(transformers.AutoTokenizer.from_pretrained(str(model_dir)).get_vocab())
    except Exception:  # an unloadable tokenizer is treated as absent, as mergekit does
        return None


def _vocabulary_of(data: Mapping) -> Dict[str, int]:
    vocab = data["model"]["vocab"]
    if isinstance(vocab, list):  # Unigram: [token, score] pairs, the id is the position
        out = {entry[0]: i for i, entry in enumerate(vocab)}
    else:
        out = {str(token): int(i) for token, i in vocab.items()}
    for added in data.get("added_tokens") or []:
        out[str(added["content"])] = int(added["id"])
    return out


def vocab_size_of(model_config: Optional[Mapping]) -> Optional[int]:
    """config.json's vocab_size (also inside text_config), or None."""
    for cfg in (model_config or {}, (model_config or {}).get("text_config") or {}):
        value = cfg.get("vocab_size") if isinstance(cfg, Mapping) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def base_vocabulary_rows(base_dir: Path, base_config: Optional[Mapping],
                         models: Mapping[str, tuple]) -> int:
    """The embedding rows of a merge with `tokenizer_source: base`: the number of tokens of the
    base tokenizer with ids below its vocab_size. models: name -> (directory, config) of every
    input model. fastmerge takes the rows as they are, so every model must give each of these
    tokens the base's id (mergekit would permute rows between differing vocabularies)."""
    base_vocab = tokenizer_vocabulary(base_dir)
    if base_vocab is None:
        raise ConfigError(f"tokenizer_source: base needs the base model's tokenizer; none is "
                          f"readable in {base_dir} (tokenizer.json, or a slow tokenizer with "
                          f"transformers installed)")
    size = vocab_size_of(base_config) or len(base_vocab)
    kept = {token: i for token, i in base_vocab.items() if i < size}
    rows = len(kept)
    if any(i >= rows for i in kept.values()):
        raise ConfigError(f"tokenizer_source: base: the tokenizer of {base_dir} leaves ids "
                          f"below {size} unused; fastmerge needs consecutive token ids")
    for name, (directory, config) in models.items():
        vocab = tokenizer_vocabulary(directory)
        if vocab is None:
            continue  # mergekit assumes the base's tokenizer
        model_size = vocab_size_of(config) or len(vocab)
        moved = [t for t, i in kept.items() if vocab.get(t) != i or i >= model_size]
        if moved:
            raise ConfigError(
                f"tokenizer_source: base: model {name} gives {len(moved)} of the base's tokens "
                f"other ids (e.g. {moved[0]!r}); fastmerge merges embeddings row by row and "
                f"does not permute vocabularies. Leave tokenizer_source out to merge the rows "
                f"as they are.")
    return rows
