"""ShardedWriter: output read back with the safetensors library (and CheckpointReader) equals the
tensors written; shard splitting and the index follow the plan; misuse is refused."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastmerge.errors import OutputError
from fastmerge.io import CheckpointReader, OutputTensor, ShardedWriter

INDEX = "model.safetensors.index.json"


def planned(tensors: dict):
    return [OutputTensor(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def write_all(directory: Path, tensors: dict, *, order=None, **kw) -> ShardedWriter:
    writer = ShardedWriter(directory, planned(tensors), **kw)
    for name in order or tensors:
        writer.write(name, tensors[name])
    writer.finish()
    return writer


def mixed_tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "scalar_f32": torch.tensor(-1.25),
        "empty_f32": torch.zeros(0, 7),
        "empty_1d_bf16": torch.zeros(0, dtype=torch.bfloat16),
        "w_bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),  # 30 bytes: odd offset after
        "w_f16": torch.randn(7, generator=g).to(torch.float16),
        "w_f32": torch.randn(4, 6, generator=g),
        "ids_i64": torch.randint(-10**12, 10**12, (9,), generator=g),
        "scalar_bf16": torch.tensor(3.0, dtype=torch.bfloat16),
        "flags": torch.tensor([True, False, False]),
        "w_f64": torch.randn(3, generator=g, dtype=torch.float64),
        "big_i8": torch.randint(-128, 127, (2, 3, 4), generator=g, dtype=torch.int8),
    }


def data_offsets(file: Path) -> dict:
    """name -> (dtype, [begin, end]) parsed straight from the file's bytes."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["data_offsets"]) for k, v in header.items()}


@pytest.mark.parametrize("max_shard_bytes", [1 << 20, 64], ids=["one-shard", "sharded"])
def test_roundtrip_every_dtype_and_shape(tmp_path, max_shard_bytes):
    tensors = mixed_tensors()
    writer = write_all(tmp_path, tensors, max_shard_bytes=max_shard_bytes)
    loaded = {}
    for file in writer.shard_files:
        part = load_file(str(tmp_path / file))
        assert not set(part) & set(loaded), "a tensor is in two shards"
        loaded.update(part)
    assert set(loaded) == set(tensors)
    with CheckpointReader(tmp_path) as reader:
        assert sorted(reader.names()) == sorted(tensors)
        for name, expected in tensors.items():
            for got in (loaded[name], reader.get(name)):
                assert got.dtype == expected.dtype and got.shape == expected.shape, name
                assert torch.equal(got, expected), name


def test_tensors_are_aligned_to_their_element_size(tmp_path):
    tensors = mixed_tensors()
    write_all(tmp_path, tensors, max_shard_bytes=1 << 20)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert (8 + header_len) % 8 == 0, "data area must start 8-aligned"
    for name, (_, (begin, _end)) in data_offsets(tmp_path / "model.safetensors").items():
        assert begin % tensors[name].element_size() == 0, name


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    writer = write_all(tmp_path, {"a": torch.ones(3), "b": torch.zeros(2)}, max_shard_bytes=1000)
    assert writer.shard_files == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_shard_split_and_index(tmp_path):
    # f32 sizes in bytes: a 40, b 40, c 24, d 100 (over the limit alone), e 4, f 60
    sizes = {"a": 10, "b": 10, "c": 6, "d": 25, "e": 1, "f": 15}
    tensors = {n: torch.arange(float(k)) + 100 * i for i, (n, k) in enumerate(sizes.items())}
    writer = write_all(tmp_path, tensors, max_shard_bytes=80)
    # limit 80: [a b] (c would make 104), [c] (d would make 124), [d] alone, [e f] = 64
    expected = [["a", "b"], ["c"], ["d"], ["e", "f"]]
    assert writer.shard_files == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == 4 * sum(sizes.values())
    assert set(index["weight_map"]) == set(tensors)
    for file, names in zip(writer.shard_files, expected):
        assert sorted(load_file(str(tmp_path / file))) == names
        assert sorted(n for n, f in index["weight_map"].items() if f == file) == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writer.shard_files + [INDEX])


def test_out_of_order_writes(tmp_path):
    tensors = {f"t{i}": torch.full((i + 1,), float(i), dtype=torch.bfloat16) for i in range(12)}
    order = [f"t{i}" for i in (7, 0, 11, 3, 9, 1, 5, 10, 2, 8, 4, 6)]
    write_all(tmp_path, tensors, order=order, max_shard_bytes=16)
    with CheckpointReader(tmp_path) as reader:
        for name, expected in tensors.items():
            assert torch.equal(reader.get(name), expected), name


def test_non_contiguous_and_expanded_inputs(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"t": base.t(), "x": torch.tensor([1.5, -2.0]).expand(3, 2)}
    plan = [OutputTensor("t", (4, 3), torch.float32), OutputTensor("x", (3, 2), torch.float32)]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=1000)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.finish()
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(loaded["t"], base.t().contiguous())
    assert torch.equal(loaded["x"], torch.tensor([[1.5, -2.0]] * 3))


def test_metadata(tmp_path):
    write_all(tmp_path, {"a": torch.ones(1)}, max_shard_bytes=100,
              metadata={"format": "pt", "merged_with": "fastmerge"})
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "merged_with": "fastmerge"}
    (tmp_path / "default").mkdir()
    write_all(tmp_path / "default", {"a": torch.ones(1)}, max_shard_bytes=100)
    with safe_open(str(tmp_path / "default" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_shards_are_created_at_their_final_size(tmp_path):
    tensors = {"a": torch.ones(1000), "b": torch.ones(10)}
    writer = ShardedWriter(tmp_path, planned(tensors), max_shard_bytes=1 << 20)
    raw_len = (tmp_path / "model.safetensors").stat().st_size
    (n,) = struct.unpack("<Q", (tmp_path / "model.safetensors").read_bytes()[:8])
    assert raw_len == 8 + n + 4 * 1010
    writer.close()


@pytest.mark.parametrize("name, tensor, fragment", [
    ("c", torch.ones(2), "'c' is not in the output plan"),
    ("a", torch.ones(3), "(3,) torch.float32, but the plan has (2,) float32"),
    ("a", torch.ones(2, dtype=torch.float16), "torch.float16, but the plan has (2,) float32"),
    ("b", torch.ones(1, 1), "(1, 1)"),
])
def test_write_refuses_what_is_not_planned(tmp_path, name, tensor, fragment):
    writer = ShardedWriter(tmp_path, [OutputTensor("a", (2,), torch.float32),
                                      OutputTensor("b", (), torch.float32)], max_shard_bytes=100)
    with pytest.raises(OutputError) as info:
        writer.write(name, tensor)
    assert fragment in str(info.value) and str(tmp_path) in str(info.value)
    writer.close()


def test_finish_with_missing_tensors(tmp_path):
    tensors = {f"t{i}": torch.ones(4) for i in range(15)}
    writer = ShardedWriter(tmp_path, planned(tensors), max_shard_bytes=32)
    writer.write("t3", tensors["t3"])
    with pytest.raises(OutputError) as info:
        writer.finish()
    message = str(info.value)
    assert "14 planned tensor(s)" in message and "t0" in message and "and 4 more" in message
    assert "t3," not in message
    assert not (tmp_path / INDEX).exists()
    writer.close()


def test_plan_errors(tmp_path):
    with pytest.raises(OutputError, match="'a' is planned twice"):
        ShardedWriter(tmp_path, [OutputTensor("a", (1,), torch.float32)] * 2, max_shard_bytes=8)
    with pytest.raises(OutputError, match="'z'.*complex64"):
        ShardedWriter(tmp_path, [OutputTensor("z", (1,), torch.complex64)], max_shard_bytes=8)


def test_resume_keeps_bytes_of_matching_shards(tmp_path):
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(6)}
    first = ShardedWriter(tmp_path, planned(tensors), max_shard_bytes=32)  # 3 shards of 2
    for name in ("t0", "t1", "t2"):
        first.write(name, tensors[name])
    first.flush()
    first.close()  # interrupted

    second = ShardedWriter(tmp_path, planned(tensors), max_shard_bytes=32, resume=True,
                           already_written={"t0", "t1", "t2", "not-planned"})
    assert second.written() == {"t0", "t1", "t2"}
    for name in ("t3", "t4", "t5"):
        second.write(name, tensors[name])
    second.finish()
    with CheckpointReader(tmp_path) as reader:
        for name, expected in tensors.items():
            assert torch.equal(reader.get(name), expected), name


def test_resume_recreates_a_shard_whose_header_differs(tmp_path):
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(4)}
    first = ShardedWriter(tmp_path, planned(tensors), max_shard_bytes=32)  # 2 shards
    for name in tensors:
        first.write(name, tensors[name])
    first.flush()
    first.close()
    damaged = tmp_path / "model-00002-of-00002.safetensors"
    raw = bytearray(damaged.read_bytes())
    raw[10] ^= 0xFF
    damaged.write_bytes(bytes(raw))

    second = ShardedWriter(tmp_path, planned(tensors), max_shard_bytes=32, resume=True,
                           already_written=set(tensors))
    assert second.written() == {"t0", "t1"}  # t2, t3 lived in the recreated shard
    with pytest.raises(OutputError, match="t2, t3"):
        second.finish()
    second.close()


def test_resume_false_recreates_files(tmp_path):
    tensors = {"a": torch.ones(2)}
    write_all(tmp_path, tensors, max_shard_bytes=100)
    writer = ShardedWriter(tmp_path, planned(tensors), max_shard_bytes=100,
                           already_written={"a"})
    assert writer.written() == set()
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["a"], torch.zeros(2))
    writer.close()
