"""Lazy reader of a model checkpoint: every header is checked when the model is opened, tensors
are read one at a time when asked for."""
from __future__ import annotations

import difflib
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..errors import CorruptCheckpointError, PickleCheckpointError, TensorNotFoundError
from .layout import Layout, find_layout
from .pickle_checkpoint import OneShardCache, load_state_dict
from .safetensors_format import read_header, tensor_nbytes


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    file: Path
    nbytes: int


class CheckpointReader:
    """A model directory (HF layout: index + shards, one model.safetensors, or loose
    *.safetensors files) or a single .safetensors file; pickle (.bin) checkpoints only with
    allow_pickle=True.

    get() may be called from one background thread while other threads call info()/names():
    the tables are built in __init__ and never change; opening file handles is locked."""

    def __init__(self, path: Union[str, os.PathLike], *, allow_pickle: bool = False):
        layout = find_layout(Path(path).expanduser())
        self.path: Path = layout.directory
        self._lock = threading.Lock()
        self._handles: Dict[Path, object] = {}  # safetensors file -> open safe_open handle
        self._pickle_cache: Optional[OneShardCache] = None
        if layout.pickle:
            self._infos = self._open_pickle(layout, allow_pickle)
            self._pickle_cache = OneShardCache()
        else:
            self._infos = self._open_safetensors(layout)
        self.config: Optional[dict] = self._read_config()

    # ---- opening ----

    def _open_safetensors(self, layout: Layout) -> Dict[str, TensorInfo]:
        found: Dict[Path, Dict[str, TensorInfo]] = {}
        for file in layout.files:
            entries = read_header(file).entries
            found[file] = {e.name: TensorInfo(e.name, e.shape, e.dtype, file, e.nbytes)
                           for e in entries}
        if layout.weight_map is not None:
            return self._from_index(layout, found)
        return self._from_files(found)

    def _open_pickle(self, layout: Layout, allow_pickle: bool) -> Dict[str, TensorInfo]:
        where = layout.index or layout.files[0]
        if not allow_pickle:
            raise PickleCheckpointError(
                f"{where} is a pickle checkpoint: loading pickle can run arbitrary code. "
                f"Pass allow_pickle=True (CLI: --allow-pickle) if you trust it, or convert it "
                f"to safetensors")
        warnings.warn(f"{where}: loading a pickle checkpoint (allowed by allow_pickle); "
                      f"safetensors is safer and faster", UserWarning, stacklevel=3)
        found: Dict[Path, Dict[str, TensorInfo]] = {}
        for file in layout.files:
            # Memory-mapped, so listing shapes does not read the data; dropped right after.
            tensors = load_state_dict(file)
            found[file] = {name: TensorInfo(name, tuple(t.shape), t.dtype, file,
                                            tensor_nbytes(t.shape, t.dtype))
                           for name, t in tensors.items()}
            del tensors
        if layout.weight_map is not None:
            return self._from_index(layout, found)
        return self._from_files(found)

    @staticmethod
    def _from_index(layout: Layout, found: Dict[Path, Dict[str, TensorInfo]]) -> Dict[str, TensorInfo]:
        infos = {}
        for name, file in layout.weight_map.items():
            info = found[file].get(name)
            if info is None:
                raise CorruptCheckpointError(
                    f"{layout.index} puts tensor {name!r} in {file}, which does not contain it")
            infos[name] = info
        return infos

    @staticmethod
    def _from_files(found: Dict[Path, Dict[str, TensorInfo]]) -> Dict[str, TensorInfo]:
        infos: Dict[str, TensorInfo] = {}
        for file, tensors in found.items():
            for name, info in tensors.items():
                if name in infos:
                    raise CorruptCheckpointError(
                        f"tensor {name!r} is in both {infos[name].file} and {file}; without an "
                        f"index it is ambiguous which one the model uses")
                infos[name] = info
        return infos

    def _read_config(self) -> Optional[dict]:
        file = self.path / "config.json"
        if not file.is_file():
            return None
        try:
            with open(file, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"{file}: cannot parse ({exc})") from None
        if not isinstance(config, dict):
            raise CorruptCheckpointError(f"{file}: is a JSON {type(config).__name__}, not an "
                                         f"object")
        return config

    # ---- queries ----

    def names(self) -> List[str]:
        """Tensor names in index order, else file by file in the order of their bytes."""
        return list(self._infos)

    def __contains__(self, name) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            pass
        near = difflib.get_close_matches(str(name), self._infos, n=3)
        hint = f"; similar names: {', '.join(near)}" if near else ""
        raise TensorNotFoundError(f"tensor {name!r} is not in model {self.path} "
                                  f"({len(self._infos)} tensors){hint}")

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a CPU tensor, reading only its bytes."""
        info = self.info(name)
        if self._pickle_cache is not None:
            with self._lock:
                return self._pickle_cache.get(info.file, name)
        try:
            tensor = self._handle(info.file).get_tensor(name)
        except Exception as exc:  # safetensors raises its own types; the file changed or broke
            raise CorruptCheckpointError(f"{info.file}: cannot read tensor {name!r} "
                                         f"({type(exc).__name__}: {exc})") from None
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise CorruptCheckpointError(
                f"{info.file}: tensor {name!r} read as {tuple(tensor.shape)} {tensor.dtype}, "
                f"but its header said {info.shape} {info.dtype} (file changed since opened?)")
        return tensor

    def _handle(self, file: Path):
        with self._lock:
            handle = self._handles.get(file)
            if handle is None:
                from safetensors import safe_open

                handle = safe_open(str(file), framework="pt", device="cpu")
                self._handles[file] = handle
            return handle

    # ---- lifetime ----

    def close(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, {}
            if self._pickle_cache is not None:
                self._pickle_cache.clear()
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._infos)} tensors)"

