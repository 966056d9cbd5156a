"""Tokenizer vocabularies read from tokenizer.json without transformers, against what
transformers' fast tokenizers report (get_vocab) for the same file."""
import json

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from fastmerge.errors import CorruptCheckpointError  # noqa: E402
from fastmerge.io.vocabulary import tokenizer_vocabulary, vocab_size_of  # noqa: E402


def _save(tokenizer, directory):
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    return fast.get_vocab()


def test_bpe_with_added_tokens(tmp_path):
    vocab = {"<unk>": 0, "a": 1, "b": 2, "ab": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("a", "b")], unk_token="<unk>"))
    tok.add_special_tokens(["<extra_0>", "<extra_1>"])
    expected = _save(tok, tmp_path / "bpe")
    assert tokenizer_vocabulary(tmp_path / "bpe") == expected
    assert expected["<extra_1>"] == 5


def test_unigram_ids_are_positions(tmp_path):
    pieces = [("<unk>", 0.0), ("▁a", -1.0), ("b", -2.0), ("▁ab", -1.5)]
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram(pieces, unk_id=0))
    tok.add_tokens(["<tool>"])
    expected = _save(tok, tmp_path / "unigram")
    assert tokenizer_vocabulary(tmp_path / "unigram") == expected


def test_missing_and_unreadable_tokenizers(tmp_path):
    assert tokenizer_vocabulary(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(CorruptCheckpointError, match="tokenizer.json"):
        tokenizer_vocabulary(tmp_path)


def test_vocab_size_of_reads_text_config_too():
    assert vocab_size_of({"vocab_size": 32000}) == 32000
    assert vocab_size_of({"text_config": {"vocab_size": 262208}}) == 262208
    assert vocab_size_of({"vocab_size": True}) is None and vocab_size_of(None) is None
