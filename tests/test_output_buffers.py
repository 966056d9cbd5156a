"""Recycled output buffers for large CPU results (csrc/bindings/bind_memory.cpp): a freed
result's memory serves the next result of the same size, results stay correct and ordinary
tensors, and idle memory stays within the limit."""
from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

import fastmerge.ops as F
from fastmerge import _native
from fastmerge.dtypes import as_dtype
from fastmerge.host_kernels import RECYCLED_OUTPUT_BYTES, HostArray
from fastmerge.ops._validate import kernel_output

pytestmark = pytest.mark.skipif(not _native.available(), reason="needs fastmerge._C")

MiB = 1 << 20


@pytest.fixture
def cache():
    """The _C module with an empty cache of the default limit, restored afterwards."""
    C = _native.native()
    limit = C.output_cache_info()["limit_bytes"]
    gc.collect()
    C.set_output_cache_limit(0)  # start empty
    C.set_output_cache_limit(256 * MiB)
    yield C
    gc.collect()
    C.set_output_cache_limit(limit)


def stats(C):
    return C.output_cache_info()


def test_a_freed_result_serves_the_next_one_and_results_stay_correct(cache):
    g = torch.Generator().manual_seed(0)
    shape = (1024, 2048)  # 8 MiB of fp32
    base = torch.randn(shape, generator=g)
    first = [torch.randn(shape, generator=g) for _ in range(2)]
    second = [torch.randn(shape, generator=g) for _ in range(2)]
    out = F.task_arithmetic(base, first, [0.5, 0.25])
    torch.testing.assert_close(out, base + 0.5 * (first[0] - base) + 0.25 * (first[1] - base))
    address = out.data_ptr()
    hits = stats(cache)["hits"]
    del out
    assert stats(cache)["idle_buffers"] == 1
    again = F.task_arithmetic(base, second, [1.0, -0.5])
    assert again.data_ptr() == address, "the freed buffer was not reused"
    assert stats(cache)["hits"] == hits + 1
    # Nothing of the previous result leaks through: every element is written.
    torch.testing.assert_close(again, base + (second[0] - base) - 0.5 * (second[1] - base))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_outputs_are_ordinary_tensors(cache, dtype, tmp_path):
    from safetensors.torch import load_file, save_file

    shape = (2048, 3, 700)
    out = kernel_output(shape, dtype, torch.device("cpu"))
    assert out.shape == shape and out.dtype == dtype and out.device.type == "cpu"
    assert out.is_contiguous() and out._base is None
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()
    assert out.data_ptr() % (2 * MiB) == 0  # whole huge pages
    out.copy_(torch.arange(out.numel(), dtype=torch.float32).reshape(shape).to(dtype))
    save_file({"w": out}, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], out)
    assert torch.equal(out.clone() * 1, out)


def test_small_outputs_do_not_use_the_cache(cache):
    before = stats(cache)
    out = kernel_output((RECYCLED_OUTPUT_BYTES // 4 - 1,), torch.float32, torch.device("cpu"))
    del out
    after = stats(cache)
    assert (after["hits"], after["misses"], after["idle_buffers"]) == (
        before["hits"], before["misses"], before["idle_buffers"])


def test_limit_zero_keeps_nothing_and_larger_buffers_are_never_kept(cache):
    cache.set_output_cache_limit(0)
    out = F.task_arithmetic(torch.zeros(2 * MiB), [torch.ones(2 * MiB)], 1.0)
    assert bool((out == 1).all())
    del out
    assert stats(cache)["idle_bytes"] == 0 and stats(cache)["misses"] >= 1
    cache.set_output_cache_limit(8 * MiB)
    out = kernel_output((4 * MiB,), torch.float32, torch.device("cpu"))  # 16 MiB
    del out
    assert stats(cache)["idle_bytes"] == 0


def test_idle_memory_stays_within_the_limit_oldest_freed_first(cache):
    cache.set_output_cache_limit(16 * MiB)
    outs = [kernel_output((2 * MiB,), torch.float32, torch.device("cpu")) for _ in range(3)]  # 8 MiB each
    newest = outs[-1].data_ptr()
    for i in range(3):  # freed in order: the first is trimmed when the third comes back
        outs[i] = None
    s = stats(cache)
    assert s["idle_bytes"] == 16 * MiB and s["idle_buffers"] == 2
    assert kernel_output((2 * MiB,), torch.float32, torch.device("cpu")).data_ptr() == newest
    cache.set_output_cache_limit(4 * MiB)  # lowering the limit frees what is over it
    assert stats(cache)["idle_bytes"] == 0


def test_an_unconsumed_capsule_returns_its_buffer(cache):
    capsule = cache.output_buffer([4 * MiB], "uint16")
    assert stats(cache)["idle_buffers"] == 0
    del capsule
    assert stats(cache)["idle_buffers"] == 1


def test_outputs_freed_on_other_threads(cache):
    outs = [kernel_output((MiB + 17 * i,), torch.float32, torch.device("cpu")) for i in range(8)]

    def drop(i):
        outs[i] = None

    threads = [threading.Thread(target=drop, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats(cache)["idle_bytes"] <= 256 * MiB
    assert stats(cache)["idle_buffers"] >= 1


def test_host_arrays_are_recycled_and_writable(cache):
    bf16 = as_dtype("bfloat16")
    a = HostArray.empty((2048, 1024), bf16)
    assert a.data.dtype == np.uint16 and a.data.shape == (2048, 1024)
    assert a.data.flags["C_CONTIGUOUS"] and a.data.flags["WRITEABLE"]
    a.data[:] = 7
    address = a.data.ctypes.data
    del a
    b = HostArray.empty((2048, 1024), bf16)
    assert b.data.ctypes.data == address
    small = HostArray.empty((16, 16), bf16)
    assert small.data.flags["WRITEABLE"] and small.data.dtype == np.uint16
