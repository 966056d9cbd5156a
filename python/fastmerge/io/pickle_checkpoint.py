"""torch.save (.bin) checkpoints, read only when the user allows pickle: torch's weights_only
unpickler refuses code, but the format is still an attack surface safetensors does not have."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, Optional

import torch

from ..errors import CorruptCheckpointError, PickleCheckpointError


def load_state_dict(file: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a torch.save file, memory-mapped where the format allows it."""
    try:
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files from torch < 1.6 (legacy, non-zip format) cannot be memory-mapped.
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise PickleCheckpointError(
            f"{file}: torch's weights-only loader refused it ({str(exc).splitlines()[0]}); "
            f"convert it to safetensors in a trusted environment") from None
    except Exception as exc:  # zip/pickle damage surfaces as many different types
        raise CorruptCheckpointError(f"{file}: cannot load the pickle checkpoint "
                                     f"({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, dict):
        raise CorruptCheckpointError(f"{file}: holds a {type(loaded).__name__}, not a state dict "
                                     f"of tensors")
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if loaded and not tensors:
        raise CorruptCheckpointError(f"{file}: no tensors at the top level of the state dict "
                                     f"(keys: {', '.join(map(str, list(loaded)[:5]))})")
    return tensors


class OneShardCache:
    """Keeps at most one loaded shard: a model's tensors are read shard by shard, so this bounds
    memory to one shard while loading each file once."""

    def __init__(self) -> None:
        self._file: Optional[Path] = None
        self._tensors: Dict[str, torch.Tensor] = {}

    def get(self, file: Path, name: str) -> torch.Tensor:
        if file != self._file:
            self._tensors = {}  # drop the old shard before loading the next
            self._file = None
            self._tensors = load_state_dict(file)
            self._file = file
        try:
            return self._tensors[name]
        except KeyError:
            raise CorruptCheckpointError(f"{file}: tensor {name!r} is no longer in the file "
                                         f"(changed since it was opened?)") from None

    def clear(self) -> None:
        self._file, self._tensors = None, {}
