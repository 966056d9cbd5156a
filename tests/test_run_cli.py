"""`fastmerge run` on the command line: the output directory, bad inputs (each a FastmergeError
naming the file and tensor, exit code 2, no traceback, no finished-looking output), and
interrupted runs that leave nothing behind that looks finished and resume when run again."""
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmerge import cli, synthetic
from fastmerge.executor import MergeOptions, run_merge
from helpers import load_weights


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return synthetic.build_family(tmp_path_factory.mktemp("family"), preset="tiny", experts=2,
                                  dtype=torch.bfloat16, seed=1)


@pytest.fixture
def family(pristine, tmp_path):
    """A private copy that a test may break."""
    root = tmp_path / "models"
    shutil.copytree(pristine.root, root)
    base = root / pristine.base.name
    experts = [root / p.name for p in pristine.experts]
    return base, experts


def write_config(tmp_path: Path, base: Path, experts, method="ties") -> Path:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for e in experts:
        lines += [f"  - model: {e}", "    parameters: {weight: 0.5, density: 0.5}"]
    path = tmp_path / "config.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args, capsys):
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def safetensors_files(model: Path):
    return sorted(model.glob("*.safetensors"))


def assert_no_finished_output(out: Path):
    assert not out.exists(), f"{out} exists after a failed run"
    for sibling in out.parent.iterdir():
        if sibling.name.startswith(f".{out.name}"):
            assert not (sibling / "config.json").exists() or not any(sibling.glob("*.index.json"))


# ---- the output ----

def test_run_writes_a_complete_model_directory(family, tmp_path, capsys):
    base, experts = family
    out = tmp_path / "merged"
    code, stdout, err = run("run", write_config(tmp_path, base, experts), out, "--quiet",
                            capsys=capsys)
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "README.md", "mergekit_config.yml", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json"} <= names
    assert "ties" in (out / "README.md").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    assert sorted(load_weights(out)) == sorted(load_weights(base))
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


@pytest.mark.parametrize("edits", [{"model_type": ["llama"]}, {"model_type": 7},
                                   {"num_hidden_layers": True}, {"num_hidden_layers": -3},
                                   {"text_config": "none"}], ids=str)
def test_odd_config_json_values_fall_back_to_the_checkpoint(edits, family, tmp_path, capsys):
    # config.json is only advisory for planning (tied heads, layer count): values of the wrong
    # type fall back to what the tensor names say instead of crashing the planner.
    base, experts = family
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, **edits}))
    out = tmp_path / "merged"
    code, _, err = run("run", write_config(tmp_path, base, experts), out, "--quiet",
                       capsys=capsys)
    assert code == 0, err
    assert sorted(load_weights(out)) == sorted(load_weights(base))


def test_small_shards_get_an_index(family, tmp_path, capsys):
    base, experts = family
    out = tmp_path / "merged"
    code, _, err = run("run", write_config(tmp_path, base, experts), out, "--quiet",
                       "--out-shard-size", "20K", capsys=capsys)
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    total = sum(t.numel() * t.element_size() for f in shards for t in load_file(out / f).values())
    assert index["metadata"]["total_size"] == total


def test_command_line_summary_and_no_traceback(family, tmp_path):
    base, experts = family
    cfg = write_config(tmp_path, base, experts)
    proc = subprocess.run([sys.executable, "-m", "fastmerge", "run", str(cfg), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "GB/s" in proc.stdout and "peak memory" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "fastmerge", "run", str(cfg), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fastmerge: error:") and "Traceback" not in proc.stderr
    assert "--overwrite" in proc.stderr


@pytest.mark.parametrize("device, code, fragment", [
    ("cuda:x", 2, "expected cpu, cuda or cuda:N"),   # argparse refuses it
    ("tpu", 2, "expected cpu, cuda or cuda:N"),
])
def test_device_argument_is_checked(family, tmp_path, capsys, device, code, fragment):
    base, experts = family
    with pytest.raises(SystemExit) as info:
        cli.main(["run", str(write_config(tmp_path, base, experts)), str(tmp_path / "o"),
                  "--device", device])
    assert info.value.code == code and fragment in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_a_gpu_is_a_clear_error(family, tmp_path, capsys, device):
    base, experts = family
    code, _, err = run("run", write_config(tmp_path, base, experts), tmp_path / "o", "--device",
                       device, capsys=capsys)
    assert code == 2 and "torch sees no CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ---- bad inputs ----

def _rewrite(model: Path, change):
    for f in safetensors_files(model):
        tensors = load_file(f)
        change(tensors)
        save_file(tensors, f, metadata={"format": "pt"})


NAME = "model.layers.1.mlp.up_proj.weight"


def _missing_tensor(base, experts, tmp_path):
    _rewrite(experts[1], lambda t: t.pop(NAME, None))
    return [NAME, str(experts[1])]


def _shape_mismatch(base, experts, tmp_path):
    def change(t):
        if NAME in t:
            t[NAME] = t[NAME][:-1].contiguous()
    _rewrite(experts[0], change)
    return [NAME, "shape"]


def _truncated(base, experts, tmp_path):
    f = safetensors_files(experts[0])[-1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return [str(f)]


def _corrupt_header(base, experts, tmp_path):
    f = safetensors_files(experts[1])[0]
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00garbage-that-is-not-json{{{{{{{{"
    f.write_bytes(bytes(data))
    return [str(f)]


def _index(model: Path, weight_map):
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def _index_missing_shard(base, experts, tmp_path):
    f = safetensors_files(experts[0])[0]
    names = list(load_file(f))
    f.rename(experts[0] / "model-00001-of-00002.safetensors")
    _index(experts[0], {n: ("model-00001-of-00002.safetensors" if i % 2 else
                            "model-00002-of-00002.safetensors") for i, n in enumerate(names)})
    return ["model-00002-of-00002.safetensors"]


def _index_escapes(base, experts, tmp_path):
    f = safetensors_files(experts[0])[0]
    names = list(load_file(f))
    shutil.copy(f, tmp_path / "evil.safetensors")
    f.unlink()
    _index(experts[0], {n: "../../evil.safetensors" for n in names})
    return ["evil.safetensors"]


def _missing_model(base, experts, tmp_path):
    shutil.rmtree(experts[1])
    return [str(experts[1])]


def _nan_input(base, experts, tmp_path):
    def change(t):
        if NAME in t:
            t[NAME][3, 4] = float("nan")
    _rewrite(experts[0], change)
    return [NAME, "NaN"]


BAD_INPUTS = {
    "missing tensor": (_missing_tensor, []),
    "shape mismatch": (_shape_mismatch, []),
    "truncated file": (_truncated, []),
    "corrupt header": (_corrupt_header, []),
    "index names a missing shard": (_index_missing_shard, []),
    "index escapes the model directory": (_index_escapes, []),
    "missing model directory": (_missing_model, []),
    "NaN with --check-finite": (_nan_input, ["--check-finite"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_leaves_no_output(case, family, tmp_path, capsys):
    base, experts = family
    breaker, flags = BAD_INPUTS[case]
    must_say = breaker(base, experts, tmp_path)
    out = tmp_path / "merged"
    code, _, err = run("run", write_config(tmp_path, base, experts), out, "--quiet", *flags,
                       capsys=capsys)
    assert code == 2, err
    assert err.startswith("fastmerge: error:") and "Traceback" not in err
    for word in must_say:
        assert word in err, (word, err)
    assert_no_finished_output(out)


def test_nan_passes_without_check_finite(family, tmp_path, capsys):
    base, experts = family
    _nan_input(base, experts, tmp_path)
    code, _, err = run("run", write_config(tmp_path, base, experts, "task_arithmetic"),
                       tmp_path / "merged", "--quiet", capsys=capsys)
    assert code == 0, err


def test_pickle_checkpoints_need_allow_pickle(family, tmp_path, capsys):
    base, experts = family
    tensors = {}
    for f in safetensors_files(experts[0]):
        tensors.update(load_file(f))
        f.unlink()
    idx = experts[0] / "model.safetensors.index.json"
    if idx.exists():
        idx.unlink()
    torch.save(tensors, experts[0] / "pytorch_model.bin")
    cfg = write_config(tmp_path, base, experts)
    code, _, err = run("run", cfg, tmp_path / "merged", "--quiet", capsys=capsys)
    assert code == 2 and "allow-pickle" in err and "pytorch_model.bin" in err
    assert_no_finished_output(tmp_path / "merged")
    with pytest.warns(UserWarning, match="pickle"):
        code, _, err = run("run", cfg, tmp_path / "merged", "--quiet", "--allow-pickle",
                           capsys=capsys)
    assert code == 0, err
    assert "arbitrary code" in err


def test_existing_output_needs_overwrite_and_survives_a_failed_overwrite(family, tmp_path, capsys):
    base, experts = family
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    cfg = write_config(tmp_path, base, experts)
    code, _, err = run("run", cfg, out, "--quiet", capsys=capsys)
    assert code == 2 and str(out) in err and "--overwrite" in err
    _missing_tensor(base, experts, tmp_path)  # the next run fails midway
    code, _, err = run("run", cfg, out, "--quiet", "--overwrite", capsys=capsys)
    assert code == 2
    assert (out / "keep.txt").read_text() == "old"


# ---- interruption and resume ----

def test_interrupted_run_leaves_nothing_finished_and_resumes(family, tmp_path, monkeypatch):
    base, experts = family
    cfg = write_config(tmp_path, base, experts, "ties")
    clean = tmp_path / "clean"
    run_merge(cfg, clean, MergeOptions(quiet=True))

    import fastmerge.executor as ex

    monkeypatch.setattr(ex, "DURABLE_EVERY_BYTES", 1)  # record progress after every tensor
    real_write = ex.ShardedWriter.write
    calls = {"n": 0}

    def dying_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C (or the machine died)
        return real_write(self, name, tensor)

    monkeypatch.setattr(ex.ShardedWriter, "write", dying_write)
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        run_merge(cfg, out, MergeOptions(quiet=True))
    assert not out.exists()
    monkeypatch.setattr(ex.ShardedWriter, "write", real_write)
    summary = run_merge(cfg, out, MergeOptions(quiet=True))
    assert summary.resumed and summary.tensors_merged == summary.tensors - 11
    for f in safetensors_files(clean):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("durable_every", [1, 1 << 62])  # after every tensor / only at the end
def test_fsync_failure_at_the_end_is_an_error_not_a_hang(family, tmp_path, monkeypatch,
                                                       durable_every):
    # The write-behind thread's last flush runs after the producer's stop signal; an error
    # there (a full disk at fsync) used to leave the thread waiting for a second signal and
    # the run hanging in join().
    import fastmerge.executor as ex
    from fastmerge.errors import OutputError
    from fastmerge.io.writer import ShardedWriter

    base, experts = family
    monkeypatch.setattr(ex, "DURABLE_EVERY_BYTES", durable_every)
    real_flush, calls = ShardedWriter.flush, {"n": 0}
    tensors = len(load_weights(base))  # one flush per tensor, then the final one
    last = tensors + 1 if durable_every == 1 else 1

    def failing_flush(self):
        calls["n"] += 1
        if calls["n"] >= last:
            raise OutputError(f"{self.directory}: fsync failed (No space left on device)")
        return real_flush(self)

    monkeypatch.setattr(ShardedWriter, "flush", failing_flush)
    out = tmp_path / "merged"
    result = {}

    def merge():
        try:
            run_merge(write_config(tmp_path, base, experts), out, MergeOptions(quiet=True))
        except OutputError as exc:
            result["error"] = exc

    worker = threading.Thread(target=merge, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "fastmerge run hung after a failed final flush"
    assert "No space left" in str(result.get("error"))
    assert not out.exists()


@pytest.mark.parametrize("target", ["base", "expert", "parent"])
def test_overwrite_never_replaces_an_input_model(family, tmp_path, capsys, target):
    base, experts = family
    out = {"base": base, "expert": experts[0], "parent": base.parent}[target]
    before = {f.name: f.read_bytes() for f in safetensors_files(base)}
    code, _, err = run("run", write_config(tmp_path, base, experts), out, "--overwrite",
                       "--quiet", capsys=capsys)
    assert code == 2 and "would replace the input model" in err and "Traceback" not in err
    assert {f.name: f.read_bytes() for f in safetensors_files(base)} == before
    assert all(any(e.glob("*.safetensors")) for e in experts)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_thread_count_changes_nothing_and_is_restored(method, family, tmp_path):
    from fastmerge import _native

    base, experts = family
    cfg = write_config(tmp_path, base, experts, method)
    torch_threads, native_threads = torch.get_num_threads(), _native.get_num_threads()
    run_merge(cfg, tmp_path / "one", MergeOptions(quiet=True, threads=1))
    assert (torch.get_num_threads(), _native.get_num_threads()) == (torch_threads, native_threads)
    run_merge(cfg, tmp_path / "default", MergeOptions(quiet=True))
    assert load_weights(tmp_path / "one").keys() == load_weights(tmp_path / "default").keys()
    for f in safetensors_files(tmp_path / "one"):
        assert f.read_bytes() == (tmp_path / "default" / f.name).read_bytes(), f.name


def test_an_error_waits_for_the_read_in_flight_before_closing_the_readers(family, tmp_path,
                                                                          monkeypatch):
    """When the merge fails, the prefetch thread may be reading the next group; the readers'
    descriptors are closed only after that read ends (a reused descriptor number would
    otherwise be read from)."""
    import threading
    import time

    from fastmerge import host_kernels
    from fastmerge.io import CheckpointReader

    base, experts = family
    cfg = write_config(tmp_path, base, experts)
    slow_read = CheckpointReader.get_array

    def get_array(self, name, **kw):
        time.sleep(0.05)
        return slow_read(self, name, **kw)

    def failing_merge(*args, **kw):
        raise RuntimeError("merge failed")

    monkeypatch.setattr(CheckpointReader, "get_array", get_array)
    monkeypatch.setattr(host_kernels, "gta", failing_merge)
    with pytest.raises(RuntimeError, match="merge failed"):
        run_merge(cfg, tmp_path / "out", MergeOptions(quiet=True))
    assert not any(t.name == "fastmerge-prefetch" and t.is_alive() for t in threading.enumerate())


def test_missing_model_message_names_each_place_once(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fastmerge.errors import ModelNotFoundError
    from fastmerge.executor import resolve_model_path

    monkeypatch.chdir(tmp_path)
    config = SimpleNamespace(directory=tmp_path)  # the config sits in the working directory
    with pytest.raises(ModelNotFoundError) as local:
        resolve_model_path("./nope", config)
    assert str(local.value).count(str(tmp_path / "nope")) == 1
    assert "huggingface-cli" not in str(local.value)  # a path, not a hub id
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download org/model"):
        resolve_model_path("org/model", config)


def test_a_run_leaves_the_kernels_following_torch_again(restore_threads):
    """Without a set_num_threads of the caller's, the kernels follow the calling thread's
    OpenMP count (torch.set_num_threads); a run with threads=N must not pin its restore."""
    from fastmerge import _native
    from fastmerge.executor import _cpu_threads

    restore_threads(0)  # nothing set
    before = torch.get_num_threads()
    with _cpu_threads(1):
        pass
    assert _native.requested_num_threads() == 0
    try:
        torch.set_num_threads(1)
        assert _native.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("count", [0, -2, 1.5, True])
def test_bad_thread_counts_are_refused_and_leave_nothing_behind(count):
    from fastmerge import _native, executor
    from fastmerge.errors import InvalidArgumentError

    before = (torch.get_num_threads(), _native.requested_num_threads())
    with pytest.raises(InvalidArgumentError, match="threads"):
        with executor._cpu_threads(count):
            pass
    assert executor._threads_users == 0
    assert (torch.get_num_threads(), _native.requested_num_threads()) == before


def test_overlapping_runs_restore_the_callers_thread_counts():
    """Thread counts are process-wide: of two overlapping runs (two threads of one process),
    the one that ends first leaves the other's count, and the last restores the caller's."""
    from fastmerge import _native
    from fastmerge.executor import _cpu_threads

    before = (torch.get_num_threads(), _native.get_num_threads())
    first, second = _cpu_threads(1), _cpu_threads(3)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert (torch.get_num_threads(), _native.get_num_threads()) == (3, 3)
    second.__exit__(None, None, None)
    assert (torch.get_num_threads(), _native.get_num_threads()) == before


# ---- the torch-free CPU path ----

def test_cpu_run_does_not_import_torch(family, tmp_path):
    base, experts = family
    cfg = write_config(tmp_path, base, experts, "dare_ties")
    code = ("import sys; from fastmerge.cli import main; "
            f"rc = main(['run', {str(cfg)!r}, {str(tmp_path / 'o')!r}, '--quiet', '--check-finite']); "
            "print('torch' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("method", ["ties", "dare_ties", "linear", "passthrough"])
def test_host_and_torch_paths_write_the_same_bytes(method, family, tmp_path, monkeypatch):
    """The numpy path (CPU runs) and the torch path (CUDA, or dtypes the kernels do not
    read) run the same kernels: the outputs are identical."""
    base, experts = family
    if method == "passthrough":
        cfg = tmp_path / "config.yml"
        cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {experts[0]}\n"
                       f"    parameters: {{scale: 0.7}}\ndtype: float16\n")
    elif method == "linear":
        cfg = tmp_path / "config.yml"
        cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {experts[0]}\n"
                       f"    parameters: {{weight: 0.7}}\n  - model: {experts[1]}\n"
                       f"    parameters: {{weight: 0.2}}\nout_dtype: float32\n")
    else:
        cfg = write_config(tmp_path, base, experts, method)
    run_merge(cfg, tmp_path / "host", MergeOptions(quiet=True))
    from fastmerge import host_kernels

    monkeypatch.setattr(host_kernels, "supports", lambda dtypes: False)
    run_merge(cfg, tmp_path / "torch", MergeOptions(quiet=True))
    files = safetensors_files(tmp_path / "host")
    assert files and [f.name for f in files] == [f.name for f in safetensors_files(tmp_path / "torch")]
    for f in files:
        assert f.read_bytes() == (tmp_path / "torch" / f.name).read_bytes(), f.name


def test_buffers_and_float64_tensors(tmp_path):
    """Integer buffers are copied from the base; float64 tensors (which the kernels do not
    read) go through the torch ops and keep their dtype; both next to bf16 ones."""
    g = torch.Generator().manual_seed(0)
    models = {}
    base = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
            "model.layers.0.mlp.weight": torch.randn(8, 8, generator=g, dtype=torch.float64),
            "model.layers.0.position_ids": torch.arange(6)}
    for name in ("base", "a", "b"):
        d = tmp_path / name
        d.mkdir()
        tensors = {k: (v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype)
                       if v.is_floating_point() and name != "base" else v.clone())
                   for k, v in base.items()}
        save_file(tensors, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
        models[name] = tensors
    cfg = write_config(tmp_path, tmp_path / "base", [tmp_path / "a", tmp_path / "b"], "ties")
    run_merge(cfg, tmp_path / "out", MergeOptions(quiet=True))
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["model.layers.0.position_ids"], base["model.layers.0.position_ids"])
    from fastmerge import ops

    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.weight"):
        want = ops.ties(models["base"][name], [models["a"][name], models["b"][name]],
                        [0.5, 0.5], 0.5)
        assert out[name].dtype == base[name].dtype and torch.equal(out[name], want), name
