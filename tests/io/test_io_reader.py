"""CheckpointReader: the layouts it accepts (read back against tensors saved by the safetensors
library itself) and the bad checkpoints it refuses at open time, with the file named."""
from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastmerge.errors import (
    CheckpointError,
    CorruptCheckpointError,
    FastmergeError,
    ModelNotFoundError,
    PickleCheckpointError,
    TensorNotFoundError,
)
from fastmerge.io import CheckpointReader


def sample_tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "layers.0.bias": torch.randn(8, generator=g).to(torch.float16),
        "layers.0.weight": torch.randn(8, 8, generator=g),
        "scale": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "positions": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


def write_index(directory: Path, weight_map: dict, name="model.safetensors.index.json"):
    (directory / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save_sharded(directory: Path, tensors: dict, shards: int = 3) -> dict:
    """HF-style shards plus index, written with safetensors' own save_file."""
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(directory / file))
        weight_map.update({n: file for n in part})
    write_index(directory, weight_map)
    return weight_map


def raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file from a hand-written header (to make files the library would refuse)."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def assert_reads_back(reader: CheckpointReader, tensors: dict):
    assert sorted(reader.names()) == sorted(tensors)
    for name, expected in tensors.items():
        got = reader.get(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(got, expected), name
        info = reader.info(name)
        assert info.shape == tuple(expected.shape) and info.dtype.torch == expected.dtype
        assert info.nbytes == expected.numel() * expected.element_size()


# ---- layouts ----

def test_single_file_path(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "weights.safetensors"))
    with CheckpointReader(tmp_path / "weights.safetensors") as reader:
        assert reader.path == tmp_path
        assert reader.config is None
        assert_reads_back(reader, tensors)
        assert reader.info("scale").file == tmp_path / "weights.safetensors"


def test_directory_with_model_safetensors_and_config(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    save_file({"other": torch.ones(2)}, str(tmp_path / "adapter.safetensors"))  # ignored
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    with CheckpointReader(str(tmp_path)) as reader:
        assert reader.config == {"model_type": "llama", "num_hidden_layers": 2}
        assert_reads_back(reader, tensors)
        assert "other" not in reader


def test_sharded_directory_follows_index_order(tmp_path):
    tensors = sample_tensors()
    weight_map = save_sharded(tmp_path, tensors)
    with CheckpointReader(tmp_path) as reader:
        assert reader.names() == list(weight_map)
        assert_reads_back(reader, tensors)
        for name, file in weight_map.items():
            assert reader.info(name).file.name == file


def test_loose_files_are_read_in_sorted_order(tmp_path):
    save_file({"b": torch.ones(2), "a": torch.zeros(3)}, str(tmp_path / "part2.safetensors"))
    save_file({"c": torch.full((4,), 7.0)}, str(tmp_path / "part1.safetensors"))
    with CheckpointReader(tmp_path) as reader:
        # part1 first; within part2 in the order of the bytes (save_file puts "a" before "b")
        assert reader.names() == ["c", "a", "b"]
        assert torch.equal(reader.get("c"), torch.full((4,), 7.0))


def test_duplicate_tensor_across_loose_files_is_refused(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="'w'.*a.safetensors.*b.safetensors"):
        CheckpointReader(tmp_path)


def test_missing_tensor_names_model_and_tensor(tmp_path):
    save_file({"layers.0.weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    with pytest.raises(TensorNotFoundError) as info:
        reader.get("layers.0.weigth")
    assert isinstance(info.value, KeyError) and isinstance(info.value, FastmergeError)
    message = str(info.value)
    assert "'layers.0.weigth'" in message and str(tmp_path) in message
    assert "layers.0.weight" in message.split("similar names:")[1]
    assert "nope" not in reader


def test_get_from_a_background_thread_while_querying(tmp_path):
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(40)}
    save_sharded(tmp_path, tensors, shards=4)
    reader = CheckpointReader(tmp_path)
    got, errors = {}, []

    def load():
        try:
            for name in tensors:
                got[name] = reader.get(name)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    while thread.is_alive():
        for name in reader.names():
            assert reader.info(name).shape == (64,)
    thread.join()
    assert not errors
    assert all(torch.equal(got[n], tensors[n]) for n in tensors)
    reader.close()


# ---- refused inputs ----

def test_pinned_reads_need_an_own_copy(tmp_path):
    save_file(sample_tensors(), str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as reader:
        with pytest.raises(ValueError, match="mapped tensor cannot be pinned"):
            reader.get(reader.names()[0], mapped=True, pinned=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_reads_equal_plain_reads(tmp_path):
    tensors = sample_tensors()
    tensors["empty"] = torch.zeros(0, 3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as reader:
        for name in reader.names():
            pinned = reader.get(name, pinned=True)
            assert pinned.is_pinned() or pinned.numel() == 0  # no storage to pin
            assert torch.equal(pinned, reader.get(name))


def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match=str(missing)) as info:
        CheckpointReader(missing)
    assert isinstance(info.value, FileNotFoundError)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=f"no model weights in {tmp_path}"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 8, 30, "header", "data-1", "data-half"])
def test_truncated_file_fails_at_open(tmp_path, keep):
    file = tmp_path / "model.safetensors"
    save_file({"first": torch.ones(64), "second": torch.arange(32.0)}, str(file))
    raw = file.read_bytes()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    cut = {"header": header_end, "data-1": len(raw) - 1,
           "data-half": header_end + (len(raw) - header_end) // 2}.get(keep, keep)
    file.write_bytes(raw[:cut])
    with pytest.raises(CorruptCheckpointError) as info:
        CheckpointReader(tmp_path)
    message = str(info.value)
    assert str(file) in message
    if keep == "data-1":  # the tensor stored last is the one cut short
        assert "'second'" in message and "truncated" in message


def test_truncated_after_open_fails_on_get(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(64)}, str(file))
    reader = CheckpointReader(tmp_path)
    os.truncate(file, file.stat().st_size - 16)
    with pytest.raises(CorruptCheckpointError, match=f"{file}.*'w'"):
        reader.get("w")


def test_corrupt_header_json(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4)}, str(file))
    raw = bytearray(file.read_bytes())
    raw[8:12] = b"{{]x"
    file.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=f"{file}: header is not valid JSON"):
        CheckpointReader(file)


@pytest.mark.parametrize("entry, data, fragment", [
    ({"dtype": "F17", "shape": [2], "data_offsets": [0, 8]}, bytes(8), "unknown dtype 'F17'"),
    ({"dtype": [], "shape": [2], "data_offsets": [0, 8]}, bytes(8), "unknown dtype []"),
    ({"dtype": {"F32": 1}, "shape": [2], "data_offsets": [0, 8]}, bytes(8), "unknown dtype"),
    ({"shape": [2], "data_offsets": [0, 8]}, bytes(8), "unknown dtype None"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, bytes(8), "needs 12"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, bytes(8), "shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, bytes(8), "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, bytes(12), "4 bytes after"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}, bytes(12), "gap of 4 bytes"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, bytes(8), "only 8 data bytes"),
])
def test_inconsistent_header_entry(tmp_path, entry, data, fragment):
    file = tmp_path / "bad.safetensors"
    raw_safetensors(file, {"w": entry}, data)
    with pytest.raises(CorruptCheckpointError) as info:
        CheckpointReader(file)
    assert str(file) in str(info.value) and "'w'" in str(info.value)
    assert fragment in str(info.value)


def test_overlapping_tensors(tmp_path):
    file = tmp_path / "bad.safetensors"
    raw_safetensors(file, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
    with pytest.raises(CorruptCheckpointError, match="'b'.*overlaps"):
        CheckpointReader(file)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"metadata": {}}',
                                  '{"weight_map": ["a"]}'])
def test_bad_index(tmp_path, text):
    save_file({"w": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(CorruptCheckpointError, match=str(index)):
        CheckpointReader(tmp_path)


def test_index_names_missing_shard(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    write_index(tmp_path, {"a": "model-00001-of-00002.safetensors",
                           "b": "model-00002-of-00002.safetensors"})
    with pytest.raises(CorruptCheckpointError) as info:
        CheckpointReader(tmp_path)
    message = str(info.value)
    assert "model-00002-of-00002.safetensors" in message
    assert str(tmp_path / "model.safetensors.index.json") in message


@pytest.mark.parametrize("shard", ["../evil.safetensors", "sub/../../evil.safetensors", "ABS"])
def test_index_path_escaping_the_directory(tmp_path, shard):
    model = tmp_path / "model"
    model.mkdir()
    evil = tmp_path / "evil.safetensors"  # exists, so only the escape is at fault
    save_file({"w": torch.ones(2)}, str(evil))
    (model / "sub").mkdir()
    shard = str(evil) if shard == "ABS" else shard
    write_index(model, {"w": shard})
    with pytest.raises(CorruptCheckpointError) as info:
        CheckpointReader(model)
    assert repr(shard) in str(info.value) and "model.safetensors.index.json" in str(info.value)


def test_index_shard_symlink_escaping_the_directory(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "elsewhere.safetensors"))
    (model / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    write_index(model, {"w": "model-00001-of-00001.safetensors"})
    with pytest.raises(CorruptCheckpointError, match="outside the model directory"):
        CheckpointReader(model)


def test_hugging_face_cache_snapshot_symlinks_are_accepted(tmp_path):
    # models--org--name/snapshots/<rev>/file -> ../../blobs/<hash>, as huggingface_hub stores them
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(tensors, str(repo / "blobs" / "0f1e2d"))
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/0f1e2d")
    write_index(snapshot, {"w": "model-00001-of-00001.safetensors"})
    with CheckpointReader(snapshot) as reader:
        assert_reads_back(reader, tensors)


def test_index_assigns_tensor_to_shard_without_it(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    write_index(tmp_path, {"a": "model-00001-of-00002.safetensors",
                           "b": "model-00001-of-00002.safetensors"})
    with pytest.raises(CorruptCheckpointError,
                       match="'b'.*model-00001-of-00002.safetensors.*does not contain it"):
        CheckpointReader(tmp_path)


def test_corrupt_config_json(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CorruptCheckpointError, match=str(tmp_path / "config.json")):
        CheckpointReader(tmp_path)


# ---- pickle checkpoints ----

def test_bin_is_refused_without_allow_pickle(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleCheckpointError) as info:
        CheckpointReader(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "pytorch_model.bin") in message
    assert "arbitrary code" in message and "allow_pickle" in message and "--allow-pickle" in message
    assert isinstance(info.value, CheckpointError)


def test_bin_loads_with_allow_pickle(tmp_path):
    tensors = sample_tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="pickle"):
        reader = CheckpointReader(tmp_path, allow_pickle=True)
    assert_reads_back(reader, tensors)
    reader.close()


def test_sharded_bin_with_index(tmp_path):
    tensors = sample_tensors()
    names = list(tensors)
    weight_map = {}
    for i, part in enumerate((names[:3], names[3:])):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: tensors[n] for n in part}, tmp_path / file)
        weight_map.update({n: file for n in part})
    write_index(tmp_path, weight_map, name="pytorch_model.bin.index.json")
    with pytest.raises(PickleCheckpointError):
        CheckpointReader(tmp_path)
    with pytest.warns(UserWarning):
        reader = CheckpointReader(tmp_path, allow_pickle=True)
    assert reader.names() == names
    # alternate between shards: the one-shard cache must reload correctly each time
    for name in [names[0], names[4], names[1], names[5]]:
        assert torch.equal(reader.get(name), tensors[name])
    assert_reads_back(reader, tensors)


def test_bin_index_escaping_the_directory_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "evil.bin")
    write_index(model, {"w": "../evil.bin"}, name="pytorch_model.bin.index.json")
    with pytest.raises(CorruptCheckpointError, match="'../evil.bin'"):
        CheckpointReader(model, allow_pickle=True)


def test_bin_with_code_is_refused_even_when_allowed(tmp_path):
    torch.save({"w": torch.ones(2), "extra": Path("x")}, tmp_path / "pytorch_model.bin")
    with pytest.warns(UserWarning), pytest.raises(PickleCheckpointError, match="weights-only"):
        CheckpointReader(tmp_path, allow_pickle=True)


def test_safetensors_win_over_bin(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    assert torch.equal(CheckpointReader(tmp_path).get("w"), torch.ones(2))


# ---- property test: mutated files open and read back, or raise CorruptCheckpointError ----

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10, 2**70), st.floats(), st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6)
_header_edit = st.tuples(st.sampled_from(["a", "b", "c", "__metadata__"]),
                         st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]), _json)
_byte_edit = st.one_of(st.tuples(st.just("byte"), st.integers(0, 10**4), st.integers(0, 255)),
                       st.tuples(st.just("truncate"), st.integers(0, 10**4), st.none()),
                       st.tuples(st.just("length"), st.integers(0, 2**64 - 1), st.none()))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header_edits=st.lists(_header_edit, max_size=3), byte_edits=st.lists(_byte_edit, max_size=2))
def test_property_mutated_files_read_back_or_raise_corrupt_checkpoint(tmp_path, header_edits,
                                                                      byte_edits):
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "b": torch.arange(5).to(torch.bfloat16), "c": torch.zeros(0, 2)}
    good = tmp_path / "good.safetensors"
    save_file(tensors, str(good))
    raw = good.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    for name, field, value in header_edits:  # a field replaced, or the whole entry
        if field is None or not isinstance(header.get(name), dict):
            header[name] = value
        else:
            header[name][field] = value
    try:
        text = json.dumps(header).encode()
    except ValueError:  # NaN-free JSON only
        return
    blob = struct.pack("<Q", len(text)) + text + data
    for kind, at, value in byte_edits:
        if kind == "byte" and at < len(blob):
            blob = blob[:at] + bytes([value]) + blob[at + 1:]
        elif kind == "truncate":
            blob = blob[:at]
        elif kind == "length" and len(blob) >= 8:
            blob = struct.pack("<Q", at) + blob[8:]
    file = tmp_path / "mutated.safetensors"
    file.write_bytes(blob)
    try:
        with CheckpointReader(file) as reader:
            for name in reader.names():
                copied, mapped = reader.get(name), reader.get(name, mapped=True)
                assert copied.dtype == mapped.dtype and copied.shape == mapped.shape
                assert torch.equal(copied.view(-1).view(torch.uint8), mapped.view(-1).view(torch.uint8))
                reader.get_array(name)
    except CorruptCheckpointError as exc:
        assert str(file) in str(exc)
