"""Lazy reader of a model checkpoint: every header is checked when the model is opened, tensors
are read one at a time when asked for."""
from __future__ import annotations

import difflib
import json
import mmap
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..dtypes import DType, as_dtype
from ..errors import CorruptCheckpointError, PickleCheckpointError, TensorNotFoundError
from .layout import Layout, find_layout
from .safetensors_format import read_header, tensor_nbytes

# Fault the mapped pages in at once (in the prefetch thread), not one by one in the kernels.
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: Tuple[int, ...]
    dtype: DType
    file: Path
    nbytes: int
    offset: int = -1  # file offset of the first byte (safetensors); -1 for pickle checkpoints


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
        self._handles: Dict[Path, int] = {}  # safetensors file -> open file descriptor
        self._pickle_cache = None  # OneShardCache of a pickle checkpoint
        if layout.pickle:
            from .pickle_checkpoint import OneShardCache

            self._infos = self._open_pickle(layout, allow_pickle)
            self._pickle_cache = OneShardCache()
        else:
            self._infos = self._open_safetensors(layout)
        self.config: Optional[dict] = self._read_config()

    # ---- opening ----

    def _open_safetensors(self, layout: Layout) -> Dict[str, TensorInfo]:
        found: Dict[Path, Dict[str, TensorInfo]] = {}
        for file in layout.files:
            header = read_header(file)
            found[file] = {e.name: TensorInfo(e.name, e.shape, e.dtype, file, e.nbytes,
                                              header.data_start + e.begin)
                           for e in header.entries}
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
        from .pickle_checkpoint import load_state_dict

        found: Dict[Path, Dict[str, TensorInfo]] = {}
        for file in layout.files:
            # Memory-mapped, so listing shapes does not read the data; dropped right after.
            tensors = load_state_dict(file)
            found[file] = {name: TensorInfo(name, tuple(t.shape), as_dtype(t.dtype), file,
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

    def get(self, name: str, *, mapped: bool = False, pinned: bool = False):
        """The tensor as a CPU torch tensor, reading only its bytes.

        mapped=False: a tensor of its own, read with pread (mapping the whole file, as
        safetensors does, would count every page touched as ours until the file is unmapped).
        mapped=True: a read-only view of the file's pages in the page cache, mapped for this
        tensor alone and unmapped when the tensor is freed: no copy and no fresh memory, for
        callers that only read it and drop it soon.
        pinned=True (needs CUDA; not with mapped): read straight into page-locked memory, for a
        fast copy to the GPU without a second host copy."""
        import torch

        if mapped and pinned:
            raise ValueError("get: a mapped tensor cannot be pinned")
        info = self.info(name)
        if self._pickle_cache is not None:
            with self._lock:
                t = self._pickle_cache.get(info.file, name)
            return t.pin_memory() if pinned else t
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype.torch, pin_memory=pinned)
        if mapped:
            with warnings.catch_warnings():  # read-only: callers never write their inputs
                warnings.simplefilter("ignore", UserWarning)
                data = torch.frombuffer(self._map(info), dtype=torch.uint8, count=info.nbytes,
                                        offset=info.offset % mmap.ALLOCATIONGRANULARITY)
        else:
            data = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pinned)
            self._read_into(info, data.numpy())
        return data.view(info.dtype.torch).reshape(info.shape)

    def get_array(self, name: str, *, mapped: bool = True):
        """The tensor as a HostArray (numpy storage + DType), without torch; mapped as in get().
        Pickle checkpoints need torch to load and are converted."""
        from ..host_kernels import HostArray

        info = self.info(name)
        storage = np.dtype(info.dtype.storage)
        count = info.nbytes // storage.itemsize
        if self._pickle_cache is not None:
            t = self.get(name).contiguous()
            raw = t.reshape(-1).view(__import__("torch").uint8).numpy().view(storage)
            return HostArray(raw.reshape(info.shape), info.dtype)
        if info.nbytes == 0:
            return HostArray(np.empty(info.shape, dtype=storage), info.dtype)
        if mapped:
            data = np.frombuffer(self._map(info), dtype=storage, count=count,
                                 offset=info.offset % mmap.ALLOCATIONGRANULARITY)
        else:
            data = np.empty(count, dtype=storage)
            self._read_into(info, data)
        return HostArray(data.reshape(info.shape), info.dtype)

    def _map(self, info: TensorInfo) -> mmap.mmap:
        """A read-only mapping of the tensor's pages (from the page boundary before it),
        populated now rather than faulted in page by page by the kernels."""
        fd = self._fd(info.file)
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        length = info.offset + info.nbytes - start
        try:
            if os.fstat(fd).st_size < info.offset + info.nbytes:  # a shrunk file would SIGBUS
                raise CorruptCheckpointError(
                    f"{info.file}: tensor {info.name!r} ends past the end of the file "
                    f"(file changed or truncated since it was opened?)")
            return mmap.mmap(fd, length, flags=mmap.MAP_SHARED | _MAP_POPULATE,
                             prot=mmap.PROT_READ, offset=start)
        except OSError as exc:
            raise CorruptCheckpointError(f"{info.file}: cannot map tensor {info.name!r} "
                                         f"({exc})") from None

    def _read_into(self, info: TensorInfo, buffer) -> None:
        fd = self._fd(info.file)
        view = memoryview(buffer).cast("B")
        done = 0
        try:
            while done < info.nbytes:
                n = os.preadv(fd, [view[done:]], info.offset + done)
                if n <= 0:
                    raise CorruptCheckpointError(
                        f"{info.file}: tensor {info.name!r} ends past the end of the file "
                        f"(file changed or truncated since it was opened?)")
                done += n
        except OSError as exc:
            raise CorruptCheckpointError(f"{info.file}: cannot read tensor {info.name!r} "
                                         f"({exc})") from None

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._handles.get(file)
            if fd is None:
                fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                self._handles[file] = fd
            return fd

    # ---- lifetime ----

    def close(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, {}
            if self._pickle_cache is not None:
                self._pickle_cache.clear()
        for fd in handles.values():
            os.close(fd)

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._infos)} tensors)"

