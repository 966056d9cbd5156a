"""Interoperability with transformers: checkpoints saved by save_pretrained read back exactly,
and ShardedWriter output loads with from_pretrained."""
from __future__ import annotations

import pytest
import torch

from fastmerge.errors import PickleCheckpointError
from fastmerge.io import CheckpointReader, OutputTensor, ShardedWriter

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama():
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.mark.parametrize("max_shard_size", ["50GB", "20KB"], ids=["single", "sharded"])
def test_save_pretrained_reads_back_exactly(tmp_path, tiny_llama, max_shard_size):
    tiny_llama.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    expected = tiny_llama.state_dict()
    with CheckpointReader(tmp_path) as reader:
        assert reader.config["model_type"] == "llama"
        assert reader.config["num_hidden_layers"] == 2
        assert sorted(reader.names()) == sorted(expected)
        for name, tensor in expected.items():
            got = reader.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def test_torch_save_state_dict(tmp_path, tiny_llama):
    expected = tiny_llama.state_dict()
    torch.save(expected, tmp_path / "pytorch_model.bin")
    tiny_llama.config.save_pretrained(tmp_path)
    with pytest.raises(PickleCheckpointError):
        CheckpointReader(tmp_path)
    with pytest.warns(UserWarning):
        reader = CheckpointReader(tmp_path, allow_pickle=True)
    for name, tensor in expected.items():
        assert torch.equal(reader.get(name), tensor), name


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 10_000], ids=["single", "sharded"])
def test_writer_output_loads_with_from_pretrained(tmp_path, tiny_llama, max_shard_bytes):
    expected = tiny_llama.state_dict()
    plan = [OutputTensor(n, tuple(t.shape), t.dtype) for n, t in expected.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=max_shard_bytes)
    for name in reversed(list(expected)):
        writer.write(name, expected[name])
    writer.finish()
    assert (len(writer.shard_files) > 1) == (max_shard_bytes == 10_000)
    tiny_llama.config.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
