"""Sharded safetensors writer whose memory does not grow with the shard size.

Every output tensor's name, shape and dtype is known before the merge starts, so each shard's
header (and hence every tensor's byte offset) is fixed up front: a shard is created at its final
size and each tensor is written in place with pwrite as soon as it is merged, in any order.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ..dtypes import DType, as_dtype
from ..errors import InvalidArgumentError, OutputError
from .layout import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from .safetensors_format import encode_header, tensor_nbytes

DEFAULT_METADATA = {"format": "pt"}
MAX_LISTED = 10  # names listed in an error before "... and N more"


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: Tuple[int, ...]
    dtype: DType  # a torch dtype or a dtype name is accepted and converted

    def __post_init__(self):
        try:
            object.__setattr__(self, "dtype", as_dtype(self.dtype))
        except ValueError:
            raise OutputError(f"output tensor {self.name!r} has dtype {self.dtype}, which "
                              f"safetensors cannot store") from None


@dataclass(frozen=True)
class _Slot:
    """Where a planned tensor's bytes go."""
    tensor: OutputTensor
    shard: int
    offset: int  # file offset
    nbytes: int


class _Shard:
    def __init__(self, path: Path, header: bytes, size: int):
        self.path, self.header, self.size = path, header, size
        self.fd: Optional[int] = None
        self.dirty = False  # written since the last fsync


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def plan_shards(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> List[List[OutputTensor]]:
    """Consecutive groups of tensors, each at most max_shard_bytes of data unless a single tensor
    alone is larger (then it gets a shard of its own)."""
    shards: List[List[OutputTensor]] = []
    size = 0
    for t in tensors:
        nbytes = tensor_nbytes(t.shape, t.dtype)
        if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def shard_file_names(count: int) -> List[str]:
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Writes the planned tensors into shards under directory.

    resume=True reuses shard files whose header is exactly the planned one (their bytes written
    by an earlier run are kept); already_written names the tensors the caller knows are durable
    from that run. Tensors of a shard that had to be recreated are not counted as written, so the
    caller must write every planned name not in written()."""

    def __init__(self, directory: Path, tensors: Sequence[OutputTensor], *, max_shard_bytes: int,
                 metadata: Optional[Dict[str, str]] = None, resume: bool = False,
                 already_written: Iterable[str] = ()):
        self.directory = Path(directory)
        if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise InvalidArgumentError(f"max_shard_bytes must be a positive integer, got "
                                       f"{max_shard_bytes!r}")
        metadata = dict(DEFAULT_METADATA if metadata is None else metadata)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InvalidArgumentError(f"safetensors metadata must map strings to strings, got "
                                       f"{metadata!r}")
        self._check_plan(tensors)
        groups = plan_shards(tensors, max_shard_bytes)
        self.shard_files: List[str] = shard_file_names(len(groups))
        self._slots: Dict[str, _Slot] = {}
        self._shards: List[_Shard] = []
        for index, (group, file_name) in enumerate(zip(groups, self.shard_files)):
            self._shards.append(self._lay_out(index, group, file_name, metadata))
        self._written: Set[str] = set()
        self._finished = False
        reused = set()
        try:
            for index, shard in enumerate(self._shards):
                if self._open(shard, resume):
                    reused.add(index)
        except BaseException:
            self._close()
            raise
        self._written = {n for n in already_written
                         if n in self._slots and self._slots[n].shard in reused}

    @staticmethod
    def _check_plan(tensors: Sequence[OutputTensor]) -> None:
        seen: Set[str] = set()
        for t in tensors:
            if t.name in seen:
                raise OutputError(f"output tensor {t.name!r} is planned twice")
            seen.add(t.name)
            if not all(isinstance(d, int) and d >= 0 for d in t.shape):
                raise OutputError(f"output tensor {t.name!r} has invalid shape {t.shape!r}")

    def _lay_out(self, index: int, group: List[OutputTensor], file_name: str,
                 metadata: Dict[str, str]) -> _Shard:
        # Widest dtypes first (stable otherwise): every tensor then starts at a multiple of its
        # element size, as the safetensors library lays files out, so readers never see
        # misaligned data. Within one dtype this is the planned order.
        ordered = sorted(group, key=lambda t: -t.dtype.itemsize)
        entries, position = [], 0
        for t in ordered:
            nbytes = tensor_nbytes(t.shape, t.dtype)
            entries.append((t.name, t.dtype, tuple(t.shape), position, position + nbytes))
            position += nbytes
        header = encode_header(entries, metadata)
        for t, (_, _, _, begin, end) in zip(ordered, entries):
            self._slots[t.name] = _Slot(t, index, len(header) + begin, end - begin)
        return _Shard(self.directory / file_name, header, len(header) + position)

    def _open(self, shard: _Shard, resume: bool) -> bool:
        """Opens (resume, matching header) or creates the shard file. True if reused."""
        try:
            if resume and shard.path.is_file() and shard.path.stat().st_size == shard.size:
                fd = os.open(shard.path, os.O_RDWR)
                if os.pread(fd, len(shard.header), 0) == shard.header:
                    shard.fd = fd
                    return True
                os.close(fd)
            fd = os.open(shard.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            shard.fd = fd
            self._pwrite_all(shard, shard.header, 0)
            os.ftruncate(fd, shard.size)  # the data area, sparse until written
            shard.dirty = True
            return False
        except OSError as exc:
            raise OutputError(f"{shard.path}: cannot create the shard ({exc.strerror or exc})") from exc

    @staticmethod
    def _pwrite_all(shard: _Shard, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:  # one pwrite moves at most ~2 GiB on Linux
            count = os.pwrite(shard.fd, view, offset)
            view, offset = view[count:], offset + count

    def write(self, name: str, tensor) -> None:
        """Writes a torch tensor or a HostArray (numpy bytes + DType) into its planned place."""
        if self._finished:
            raise OutputError(f"{self.directory}: write({name!r}) after finish()")
        slot = self._slots.get(name)
        if slot is None:
            raise OutputError(f"{self.directory}: tensor {name!r} is not in the output plan")
        planned = slot.tensor
        try:
            dtype = as_dtype(tensor.dtype)
        except ValueError:
            dtype = None
        if tuple(tensor.shape) != tuple(planned.shape) or dtype != planned.dtype:
            raise OutputError(
                f"{self.directory}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"but the plan has {tuple(planned.shape)} {planned.dtype}")
        shard = self._shards[slot.shard]
        if slot.nbytes:
            try:
                self._pwrite_all(shard, _raw_bytes(tensor), slot.offset)
            except OSError as exc:
                raise OutputError(f"{shard.path}: writing tensor {name!r} failed "
                                  f"({exc.strerror or exc})") from exc
            shard.dirty = True
        self._written.add(name)

    def flush(self) -> None:
        """Makes every tensor written so far durable (fsync of the shards written to)."""
        for shard in self._shards:
            if shard.dirty and shard.fd is not None:
                try:
                    os.fsync(shard.fd)
                except OSError as exc:
                    raise OutputError(f"{shard.path}: fsync failed ({exc.strerror or exc})") from exc
                shard.dirty = False

    def written(self) -> Set[str]:
        return set(self._written)

    def finish(self) -> None:
        """Checks that every planned tensor was written, makes the shards durable and writes the
        index (none for a single shard, as Hugging Face does)."""
        missing = [name for name in self._slots if name not in self._written]
        if missing:
            raise OutputError(f"{self.directory}: {len(missing)} planned tensor(s) were never "
                              f"written: {_listed(missing)}")
        self.flush()
        self._close()
        self._finished = True
        if len(self._shards) > 1:
            self._write_index()

    def _write_index(self) -> None:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in self._slots.values())},
            "weight_map": {name: self.shard_files[slot.shard]
                           for name, slot in sorted(self._slots.items())},
        }
        path = self.directory / SAFETENSORS_INDEX
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the index ({exc.strerror or exc})") from exc

    def _close(self) -> None:
        for shard in getattr(self, "_shards", ()):
            if shard.fd is not None:
                os.close(shard.fd)
                shard.fd = None

    def close(self) -> None:
        """Releases the files without finishing (an interrupted run); finish() also closes."""
        self._close()

    def __del__(self):
        self._close()


def _raw_bytes(tensor):
    """The bytes of a HostArray or a torch tensor, as a flat uint8 numpy array."""
    data = getattr(tensor, "data", None)
    if data is not None and hasattr(data, "ctypes"):  # HostArray: numpy storage
        import numpy as np

        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    import torch  # reinterpret as bytes: numpy has no bfloat16/float8, every dtype has uint8

    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
