"""StagedOutput: the target appears only at commit, an existing target is kept unless overwrite is
asked for (and then until commit), and an interrupted run resumes from its journal."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fastmerge.errors import FastmergeError, OutputExistsError
from fastmerge.io import OutputTensor, ShardedWriter, StagedOutput

JOURNAL = ".fastmerge-journal"


def listing(path):
    return sorted(p.name for p in path.iterdir())


def test_commit_makes_the_target_appear(tmp_path):
    target = tmp_path / "merged"
    staged = StagedOutput(target, fingerprint="f1")
    assert staged.target == target
    assert staged.directory.parent == tmp_path and staged.directory.name.startswith(".")
    assert staged.directory.name.endswith(".fastmerge-partial")
    (staged.directory / "model.safetensors").write_bytes(b"weights")
    staged.record_done(["a"])
    assert not target.exists()
    staged.commit()
    assert listing(target) == ["model.safetensors"]  # no journal or state file left behind
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert listing(tmp_path) == ["merged"]


def test_parent_directories_are_created(tmp_path):
    staged = StagedOutput(tmp_path / "a" / "b" / "out", fingerprint="f")
    (staged.directory / "x").write_text("1")
    staged.commit()
    assert (tmp_path / "a" / "b" / "out" / "x").read_text() == "1"


def test_existing_target_is_refused(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(OutputExistsError) as info:
        StagedOutput(target, fingerprint="f")
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, FastmergeError)
    assert str(target) in str(info.value) and "--overwrite" in str(info.value)
    assert listing(tmp_path) == ["merged"]  # nothing staged


def test_existing_file_target_is_refused(tmp_path):
    (tmp_path / "merged").write_text("not a model")
    with pytest.raises(OutputExistsError):
        StagedOutput(tmp_path / "merged", fingerprint="f")


def test_empty_target_directory_is_used(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    staged = StagedOutput(target, fingerprint="f")
    (staged.directory / "model.safetensors").write_bytes(b"w")
    staged.commit()
    assert listing(target) == ["model.safetensors"]


def test_overwrite_replaces_only_at_commit(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.safetensors").write_bytes(b"old")
    staged = StagedOutput(target, fingerprint="f", overwrite=True)
    (staged.directory / "new.safetensors").write_bytes(b"new")
    assert listing(target) == ["old.safetensors"]
    staged.commit()
    assert listing(target) == ["new.safetensors"]
    assert listing(tmp_path) == ["merged"]  # the old output was deleted, not left aside


def test_failed_run_with_overwrite_keeps_the_old_target(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.safetensors").write_bytes(b"old")
    staged = StagedOutput(target, fingerprint="f", overwrite=True)
    (staged.directory / "new.safetensors").write_bytes(b"half")
    staged.close()  # the merge failed: commit never happens
    assert listing(target) == ["old.safetensors"]
    assert (target / "old.safetensors").read_bytes() == b"old"


def test_interrupted_run_resumes_with_the_same_fingerprint(tmp_path):
    target = tmp_path / "merged"
    first = StagedOutput(target, fingerprint="abc")
    assert not first.resumed and first.done() == set()
    (first.directory / "model.safetensors").write_bytes(b"partial")
    first.record_done(["a", "b"])
    first.record_done(["c"])
    assert first.done() == {"a", "b", "c"}
    first.close()
    assert not target.exists()

    second = StagedOutput(target, fingerprint="abc")
    assert second.resumed
    assert second.done() == {"a", "b", "c"}
    assert (second.directory / "model.safetensors").read_bytes() == b"partial"
    second.record_done(["d"])
    second.close()
    assert StagedOutput(target, fingerprint="abc").done() == {"a", "b", "c", "d"}


def test_different_fingerprint_starts_fresh(tmp_path):
    target = tmp_path / "merged"
    first = StagedOutput(target, fingerprint="old-config")
    (first.directory / "model.safetensors").write_bytes(b"stale")
    first.record_done(["a"])
    first.close()
    second = StagedOutput(target, fingerprint="new-config")
    assert not second.resumed and second.done() == set()
    assert not (second.directory / "model.safetensors").exists()


def test_torn_journal_line_is_ignored(tmp_path):
    target = tmp_path / "merged"
    first = StagedOutput(target, fingerprint="f")
    first.record_done(["layers.0.weight", "layers.1.weight"])
    first.close()
    with open(first.directory / JOURNAL, "ab") as f:
        f.write(b'"layers.2.wei')  # the crash hit mid-append
    second = StagedOutput(target, fingerprint="f")
    assert second.done() == {"layers.0.weight", "layers.1.weight"}
    second.record_done(["layers.3.weight"])  # must start on a line of its own
    second.close()
    third = StagedOutput(target, fingerprint="f")
    assert third.done() == {"layers.0.weight", "layers.1.weight", "layers.3.weight"}


def test_damaged_journal_middle_starts_fresh(tmp_path):
    target = tmp_path / "merged"
    first = StagedOutput(target, fingerprint="f")
    first.record_done(["a"])
    first.close()
    with open(first.directory / JOURNAL, "ab") as f:
        f.write(b"\x00garbage\n" + b'"b"\n')
    second = StagedOutput(target, fingerprint="f")
    assert not second.resumed and second.done() == set()


def test_writer_and_staging_resume_end_to_end(tmp_path):
    target = tmp_path / "merged"
    tensors = {f"layers.{i}.weight": torch.randn(8, 8).to(torch.bfloat16) for i in range(6)}
    plan = [OutputTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    names = list(tensors)

    staged = StagedOutput(target, fingerprint="run")
    writer = ShardedWriter(staged.directory, plan, max_shard_bytes=300)  # 2 tensors a shard
    for name in names[:3]:
        writer.write(name, tensors[name])
    writer.flush()
    staged.record_done(names[:3])
    writer.write(names[3], torch.zeros(8, 8, dtype=torch.bfloat16))  # written, never journaled
    writer.close()
    staged.close()  # killed here

    staged = StagedOutput(target, fingerprint="run")
    assert staged.resumed
    writer = ShardedWriter(staged.directory, plan, max_shard_bytes=300, resume=True,
                           already_written=staged.done())
    todo = [n for n in names if n not in writer.written()]
    assert todo == names[3:]
    for name in todo:
        writer.write(name, tensors[name])
    writer.flush()
    staged.record_done(todo)
    writer.finish()
    staged.commit()
    loaded = {}
    for file in writer.shard_files:
        loaded.update(load_file(str(target / file)))
    assert set(loaded) == set(tensors)
    for name, expected in tensors.items():
        assert torch.equal(loaded[name], expected), name


def test_overwrite_replaces_a_file_target(tmp_path):
    (tmp_path / "merged").write_text("old file")
    staged = StagedOutput(tmp_path / "merged", fingerprint="f", overwrite=True)
    (staged.directory / "model.safetensors").write_bytes(b"w")
    staged.commit()
    assert listing(tmp_path / "merged") == ["model.safetensors"]
    assert listing(tmp_path) == ["merged"]


def test_target_appearing_during_the_merge_is_not_clobbered(tmp_path):
    target = tmp_path / "merged"
    staged = StagedOutput(target, fingerprint="f")
    (staged.directory / "model.safetensors").write_bytes(b"ours")
    target.mkdir()
    (target / "theirs").write_text("x")
    with pytest.raises(OutputExistsError, match=str(staged.directory)):
        staged.commit()
    assert listing(target) == ["theirs"]
    assert (staged.directory / "model.safetensors").read_bytes() == b"ours"
