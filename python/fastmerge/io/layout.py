"""Which files of a model directory hold its weights, and which tensor lives in which file.

The index JSON is data from wherever the model came from, so the shard names it lists are
checked to stay inside the model directory before anything is opened.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Dict, List, Optional

from ..errors import CheckpointError, CorruptCheckpointError, ModelNotFoundError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass
class Layout:
    directory: Path            # the model directory (a single file's parent)
    pickle: bool               # torch.save (.bin) files rather than safetensors
    files: List[Path]          # weight files, in reading order, without duplicates
    # tensor name -> file, from an index; None when the files' own contents say what they hold
    weight_map: Optional[Dict[str, Path]]
    index: Optional[Path]      # the index file the weight_map came from


def find_layout(path: Path) -> Layout:
    """The weight files of a model directory (or of a single weight file)."""
    if not path.exists():
        raise ModelNotFoundError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            return Layout(path.parent, False, [path], None, None)
        if path.suffix in PICKLE_SUFFIXES:
            return Layout(path.parent, True, [path], None, None)
        raise CheckpointError(f"{path} is neither a .safetensors file nor a model directory")
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {path} is not a file or directory")

    index = path / SAFETENSORS_INDEX
    if index.is_file():
        return _indexed(path, index, pickle=False)
    single = path / SAFETENSORS_SINGLE
    if single.is_file():
        return Layout(path, False, [_inside(path, single.name, single)], None, None)
    loose = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if loose:
        return Layout(path, False, [_inside(path, p.name, p) for p in loose], None, None)
    index = path / PICKLE_INDEX
    if index.is_file():
        return _indexed(path, index, pickle=True)
    single = path / PICKLE_SINGLE
    if single.is_file():
        return Layout(path, True, [_inside(path, single.name, single)], None, None)
    raise ModelNotFoundError(
        f"no model weights in {path} (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
        f"*.safetensors, {PICKLE_INDEX}, {PICKLE_SINGLE})")


def _indexed(directory: Path, index: Path, *, pickle: bool) -> Layout:
    try:
        with open(index, encoding="utf-8") as f:
            parsed = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{index}: cannot parse the index ({exc})") from None
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{index}: no \"weight_map\" object mapping tensor names "
                                     f"to shard files")
    resolved: Dict[str, Path] = {}
    shards: Dict[str, Path] = {}  # shard name as written -> checked path
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CorruptCheckpointError(f"{index}: tensor {tensor!r} maps to {shard!r}, not a "
                                         f"shard file name")
        if shard not in shards:
            shards[shard] = _checked_shard(directory, index, shard)
        resolved[tensor] = shards[shard]
    return Layout(directory, pickle, list(dict.fromkeys(shards.values())), resolved, index)


def _checked_shard(directory: Path, index: Path, shard: str) -> Path:
    if (PurePosixPath(shard).is_absolute() or PureWindowsPath(shard).is_absolute()
            or PureWindowsPath(shard).drive):
        raise CorruptCheckpointError(f"{index}: shard path {shard!r} is absolute; shards must be "
                                     f"files inside {directory}")
    candidate = directory / shard
    checked = _inside(directory, shard, candidate, index=index)
    if not checked.is_file():
        raise CorruptCheckpointError(f"{index} names shard {shard!r} but {candidate} does not "
                                     f"exist")
    return checked


def _inside(directory: Path, name: str, candidate: Path, index: Optional[Path] = None) -> Path:
    """candidate, if it (after following symlinks) is inside directory, or is a blob of the
    Hugging Face cache that directory is a snapshot of (snapshots/<rev>/* are symlinks to
    ../../blobs/<hash>, so refusing those would refuse every cached hub model)."""
    root = directory.resolve()
    target = candidate.resolve()
    if target.is_relative_to(root):
        return candidate
    if root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs":
        return candidate
    source = f"{index}: shard path {name!r}" if index else f"{candidate}"
    raise CorruptCheckpointError(f"{source} resolves to {target}, outside the model directory "
                                 f"{directory}")
