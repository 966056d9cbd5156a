"""The safetensors file layout, parsed and built by hand so that a bad file is rejected before any
tensor is read, with a message naming the file and tensor at fault.

A file is: an 8-byte little-endian header length N, N bytes of JSON
(name -> {"dtype", "shape", "data_offsets": [begin, end]}, plus an optional "__metadata__" of
string -> string), then the data area. Offsets are relative to the data area; the tensors tile it
exactly, with no gaps or overlaps (the safetensors library refuses anything else).
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from ..dtypes import BY_CODE, DType, as_dtype
from ..errors import CorruptCheckpointError

# safetensors dtype code -> DType
DTYPES: Dict[str, DType] = dict(BY_CODE)

HEADER_LENGTH_BYTES = 8
# The safetensors library refuses larger headers; a corrupt length must not make us read gigabytes.
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: DType
    shape: Tuple[int, ...]
    begin: int  # byte offsets into the data area
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    entries: List[HeaderEntry]  # in data-offset order (the order of the bytes in the file)
    metadata: Optional[Dict[str, str]]
    data_start: int  # file offset of the data area


def tensor_nbytes(shape: Iterable[int], dtype) -> int:
    """Bytes of a tensor of this shape and dtype (a DType, a name or a torch dtype)."""
    return math.prod(shape) * as_dtype(dtype).itemsize


def read_header(path: Path) -> Header:
    """Parses and checks the header of the safetensors file at path against the file's size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(HEADER_LENGTH_BYTES)
            if len(prefix) < HEADER_LENGTH_BYTES:
                raise CorruptCheckpointError(
                    f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - HEADER_LENGTH_BYTES, MAX_HEADER_BYTES):
                raise CorruptCheckpointError(
                    f"{path}: header length {header_len} does not fit in the file of {size} "
                    f"bytes (truncated or not a safetensors file)")
            raw = f.read(header_len)
    except OSError as exc:
        raise CorruptCheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise CorruptCheckpointError(f"{path}: header is a JSON {type(parsed).__name__}, "
                                     f"not an object")
    data_start = HEADER_LENGTH_BYTES + header_len
    metadata = _check_metadata(path, parsed.pop(METADATA_KEY, None))
    entries = [_parse_entry(path, name, value) for name, value in parsed.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    _check_tiling(path, entries, size - data_start)
    return Header(entries, metadata, data_start)


def _check_metadata(path: Path, metadata) -> Optional[Dict[str, str]]:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CorruptCheckpointError(f"{path}: {METADATA_KEY} must map strings to strings, "
                                     f"got {metadata!r:.200}")
    return metadata


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(path: Path, name: str, value) -> HeaderEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{where}: header entry is {value!r:.200}, not an object")
    code, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPES:
        known = ", ".join(DTYPES)
        raise CorruptCheckpointError(f"{where}: unknown dtype {code!r} (known: {known})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CorruptCheckpointError(f"{where}: shape {shape!r:.200} is not a list of "
                                     f"non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
            or offsets[0] > offsets[1]):
        raise CorruptCheckpointError(f"{where}: data_offsets {offsets!r:.200} is not "
                                     f"[begin, end] with 0 <= begin <= end")
    dtype = DTYPES[code]
    expected = tensor_nbytes(shape, dtype)
    if offsets[1] - offsets[0] != expected:
        raise CorruptCheckpointError(
            f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but shape "
            f"{shape} of {code} needs {expected}")
    return HeaderEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_tiling(path: Path, entries: List[HeaderEntry], data_size: int) -> None:
    """Entries (sorted by offset) must cover [0, data_size) exactly, as safetensors requires."""
    position, last = 0, None
    for entry in entries:
        if entry.end > data_size:
            raise CorruptCheckpointError(
                f"{path}: tensor {entry.name!r} ends at data byte {entry.end} but the file has "
                f"only {data_size} data bytes (truncated file)")
        if entry.begin != position:
            problem = "overlaps the previous tensor" if entry.begin < position else (
                f"leaves a gap of {entry.begin - position} bytes before it")
            raise CorruptCheckpointError(
                f"{path}: tensor {entry.name!r} at data_offsets [{entry.begin}, {entry.end}] "
                f"{problem}")
        position, last = entry.end, entry.name
    if position != data_size:
        after = f"the last tensor {last!r}" if last is not None else "the header"
        raise CorruptCheckpointError(
            f"{path}: {data_size - position} bytes after {after} that no header entry describes")


def encode_header(entries: Iterable[Tuple[str, DType, Tuple[int, ...], int, int]],
                  metadata: Dict[str, str]) -> bytes:
    """The 8-byte length plus the JSON header, padded with spaces so that the data area starts
    at a multiple of 8 bytes. entries: (name, dtype, shape, begin, end)."""
    header = {METADATA_KEY: dict(metadata)}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": as_dtype(dtype).code, "shape": list(shape),
                        "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
