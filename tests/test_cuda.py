"""CUDA kernels against the CPU kernels: the same masks (exact top-k, Philox) and the same fp32
operations, so results agree bit for bit except where a reduction (L1 rescale, slerp and
model_stock statistics) runs in another order."""
import pytest
import torch

import fastmerge
from fastmerge import ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not fastmerge.build_info().get("cuda"),
    reason="needs a CUDA device and a CUDA build")

SHAPES = [(), (1,), (4097,), (64, 300), (3, 5, 7), (1024, 1100)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def group(shape, count, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [(base + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(count)]
    return base.to(dtype), experts


def on_cuda(tensors):
    return [t.cuda() for t in tensors]


def assert_same(gpu, cpu, exact):
    gpu = gpu.cpu()
    assert gpu.dtype == cpu.dtype and gpu.shape == cpu.shape
    if exact:
        assert torch.equal(gpu.float().nan_to_num(7.0), cpu.float().nan_to_num(7.0))
    else:
        scale = max(float(cpu.float().abs().max()), 1e-30) if cpu.numel() else 1.0
        err = float((gpu.float() - cpu.float()).abs().max()) if cpu.numel() else 0.0
        ulp = float(torch.finfo(cpu.dtype).eps)
        assert err <= 4 * ulp * scale, f"max error {err} vs scale {scale}"


METHODS = {
    "ties": lambda b, e, w: ops.ties(b, e, w, 0.3),
    "ties_count": lambda b, e, w: ops.ties(b, e, w, 0.3, consensus="count"),
    "task_arithmetic": lambda b, e, w: ops.task_arithmetic(b, e, w, lambda_=0.7),
    "breadcrumbs": lambda b, e, w: ops.breadcrumbs(b, e, w, 0.4, gamma=0.05),
    "breadcrumbs_ties": lambda b, e, w: ops.breadcrumbs_ties(b, e, w, 0.4, gamma=0.05),
    "dare_ties_norescale": lambda b, e, w: ops.dare_ties(b, e, w, 0.5, seed=3, name="w", rescale=False),
    "dare_linear_norescale": lambda b, e, w: ops.dare_linear(b, e, w, 0.5, seed=4, rescale=False),
    "della_norescale": lambda b, e, w: ops.della(b, e, w, 0.5, seed=5, rescale=False),
}
RESCALED = {
    "ties_rescale": lambda b, e, w: ops.ties(b, e, w, 0.3, rescale=True),
    "dare_ties": lambda b, e, w: ops.dare_ties(b, e, w, 0.5, seed=3, name="w"),
    "dare_linear": lambda b, e, w: ops.dare_linear(b, e, w, 0.5, seed=4),
    "della": lambda b, e, w: ops.della(b, e, w, 0.5, seed=5),
    "della_linear": lambda b, e, w: ops.della_linear(b, e, w, 0.4, epsilon=0.1, seed=6),
    "breadcrumbs_rescale": lambda b, e, w: ops.breadcrumbs(b, e, w, 0.4, gamma=0.05, rescale=True),
}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_matches_cpu_exactly(method, dtype, shape):
    base, experts = group(shape, 3, dtype, seed=hash((method, str(dtype), shape)) % 1000)
    weights = [1.0, 0.5, -0.3]
    cpu = METHODS[method](base, experts, weights)
    gpu = METHODS[method](base.cuda(), on_cuda(experts), weights)
    assert_same(gpu, cpu, exact=True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method", sorted(RESCALED))
def test_cuda_matches_cpu_rescaled(method, shape):
    base, experts = group(shape, 3, torch.float32, seed=11)
    weights = [1.0, 0.5, 0.3]
    cpu = RESCALED[method](base, experts, weights)
    gpu = RESCALED[method](base.cuda(), on_cuda(experts), weights)
    assert_same(gpu, cpu, exact=False)


@pytest.mark.parametrize("count", [1, 2, 5, 9, 17])
def test_cuda_expert_counts(count):
    base, experts = group((300, 70), count, torch.bfloat16, seed=count)
    weights = [0.1 * (i + 1) for i in range(count)]
    assert_same(ops.ties(base.cuda(), on_cuda(experts), weights, 0.4),
                ops.ties(base, experts, weights, 0.4), exact=True)


def test_cuda_mixed_dtypes_and_no_base():
    base, experts = group((257, 33), 3, torch.float32, seed=2)
    experts = [experts[0].half(), experts[1].bfloat16(), experts[2]]
    assert_same(ops.ties(base.cuda(), on_cuda(experts), 1.0, 0.5, out_dtype=torch.bfloat16),
                ops.ties(base, experts, 1.0, 0.5, out_dtype=torch.bfloat16), exact=True)
    assert_same(ops.linear(on_cuda(experts), [0.2, 0.3, 0.5]), ops.linear(experts, [0.2, 0.3, 0.5]),
                exact=True)


@pytest.mark.parametrize("shape", [(4097,), (2048, 4096), (7,)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_magnitude_mask(shape, dtype):
    x = torch.randn(shape).to(dtype)
    if dtype == torch.bfloat16:
        x = torch.round(x * 8) / 8  # heavy ties: index tie-break decides
    for density in (0.0, 1e-4, 0.3, 0.999, 1.0):
        assert torch.equal(ops.magnitude_mask(x.cuda(), density).cpu(), ops.magnitude_mask(x, density))


@pytest.mark.parametrize("shape", [(5,), (64, 300), (1000, 1000)], ids=str)
def test_cuda_interp(shape):
    base, experts = group(shape, 3, torch.float32, seed=9)
    assert_same(ops.slerp(base.cuda(), experts[0].cuda(), 0.3), ops.slerp(base, experts[0], 0.3), exact=False)
    # elementwise, no reduction: bit for bit (bf16 output too)
    assert_same(ops.nearswap(base.cuda(), experts[0].cuda(), 0.05),
                ops.nearswap(base, experts[0], 0.05), exact=True)
    assert_same(ops.nearswap(base.cuda(), experts[1].cuda(), 0.2, out_dtype=torch.bfloat16),
                ops.nearswap(base, experts[1], 0.2, out_dtype=torch.bfloat16), exact=True)
    assert_same(ops.model_stock(base.cuda(), on_cuda(experts)), ops.model_stock(base, experts), exact=False)
    assert_same(ops.model_stock(base.cuda(), on_cuda(experts), filter_wise=True),
                ops.model_stock(base, experts, filter_wise=True), exact=False)


def test_cuda_large_ties_bf16():
    base, experts = group((4096, 4096), 3, torch.bfloat16, seed=1)
    assert_same(ops.ties(base.cuda(), on_cuda(experts), 1.0, 0.5), ops.ties(base, experts, 1.0, 0.5), exact=True)


def test_cuda_runs_on_current_stream():
    base, experts = group((512, 512), 2, torch.float32, seed=4)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gpu = ops.ties(base.cuda(), on_cuda(experts), 1.0, 0.5)
    stream.synchronize()
    assert_same(gpu, ops.ties(base, experts, 1.0, 0.5), exact=True)


# ---- coverage of the brief beyond the grid above: every expert count 1-8 for every method,
# the sample/candidate path on a large tensor, non-contiguous inputs, heavy magnitude ties
# (all-equal deltas: the index tie-break decides every kept element) and exact keep counts.


@pytest.mark.parametrize("count", range(1, 9))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_every_method_every_count(method, count):
    base, experts = group((64, 300), count, torch.bfloat16, seed=100 + count)
    weights = [0.9 - 0.2 * i for i in range(count)]  # mixed signs from the 6th expert on
    assert_same(METHODS[method](base.cuda(), on_cuda(experts), weights),
                METHODS[method](base, experts, weights), exact=True)


@pytest.mark.parametrize("count", [1, 4, 8])
@pytest.mark.parametrize("method", sorted(RESCALED))
def test_cuda_rescaled_counts(method, count):
    base, experts = group((33, 129), count, torch.float32, seed=200 + count)
    weights = [0.3 + 0.1 * i for i in range(count)]
    assert_same(RESCALED[method](base.cuda(), on_cuda(experts), weights),
                RESCALED[method](base, experts, weights), exact=False)


LARGE = {
    "ties": (torch.bfloat16, METHODS["ties"], True),
    "breadcrumbs_ties": (torch.float16, METHODS["breadcrumbs_ties"], True),
    "dare_linear_norescale": (torch.float32, METHODS["dare_linear_norescale"], True),
    "ties_rescale": (torch.float32, RESCALED["ties_rescale"], False),
    "dare_ties": (torch.bfloat16, RESCALED["dare_ties"], False),
}


@pytest.mark.parametrize("method", sorted(LARGE))
def test_cuda_large_sample_path(method):
    """2048 x 4096 elements: far above the size where top-k plans from a sample."""
    dtype, fn, exact = LARGE[method]
    base, experts = group((2048, 4096), 3, dtype, seed=7)
    weights = [1.0, 0.6, -0.4]
    assert_same(fn(base.cuda(), on_cuda(experts), weights), fn(base, experts, weights), exact=exact)


def test_cuda_large_della_ranks():
    base, experts = group((512, 4096), 2, torch.bfloat16, seed=8)
    fn = METHODS["della_norescale"]
    assert_same(fn(base.cuda(), on_cuda(experts), [1.0, 0.5]), fn(base, experts, [1.0, 0.5]), exact=True)


@pytest.mark.parametrize("shape", [(300, 130), (64, 4096), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("method", ["della_norescale", "della"])
def test_cuda_della_ranks_sorted_in_chunks(method, shape, monkeypatch):
    """Rank groups sorted a few at a time (as tensors above 2^27 elements are): the same ranks,
    whatever the chunk and however it divides the groups."""
    base, experts = group(shape, 2, torch.bfloat16, seed=9)
    fn = {**METHODS, **RESCALED}[method]
    cpu = fn(base, experts, [1.0, 0.5])
    for chunk in ("1000", "1"):
        monkeypatch.setenv("FASTMERGE_DELLA_CHUNK_ITEMS", chunk)
        assert_same(fn(base.cuda(), on_cuda(experts), [1.0, 0.5]), cpu,
                    exact=method == "della_norescale")


@pytest.mark.parametrize("shape", [(4097,), (2048, 4096)], ids=str)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "ties_count"])
def test_cuda_top_k_with_the_global_histogram(method, shape, monkeypatch):
    """GPUs that cannot give a block 128 KiB of shared memory (sm_86, sm_89, sm_120) count the
    top-k histogram in global memory: the same counts, so the same result."""
    monkeypatch.setenv("FASTMERGE_GTA_GLOBAL_HISTOGRAM", "1")
    base, experts = group(shape, 3, torch.bfloat16, seed=10)
    weights = [1.0, 0.6, -0.4]
    assert_same(METHODS[method](base.cuda(), on_cuda(experts), weights),
                METHODS[method](base, experts, weights), exact=True)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_ties_norescale", "della_norescale",
                                    "task_arithmetic"])
def test_cuda_non_contiguous(method):
    base, experts = group((300, 130), 3, torch.float16, seed=12)
    views = [t.t()[::2] for t in [base] + experts]  # transposed, then every other row
    assert not views[0].is_contiguous()
    weights = [1.0, 0.5, -0.3]
    cpu = METHODS[method](views[0], views[1:], weights)
    gpu_views = [t.cuda().t()[::2] for t in [base] + experts]
    assert not gpu_views[0].is_contiguous()
    assert_same(METHODS[method](gpu_views[0], gpu_views[1:], weights), cpu, exact=True)


@pytest.mark.parametrize("shape", [(4097,), (700, 800)], ids=str)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "ties_count"])
def test_cuda_all_equal_magnitudes(method, shape):
    """Every delta has the same magnitude: which elements survive is the index tie-break alone."""
    base = torch.zeros(shape)
    experts = [torch.full(shape, 0.25), torch.full(shape, -0.25), torch.full(shape, 0.5)]
    experts[1].view(-1)[::3] = 0.25  # some sign disagreement
    weights = [1.0, 0.7, 0.2]
    assert_same(METHODS[method](base.cuda(), on_cuda(experts), weights),
                METHODS[method](base, experts, weights), exact=True)


def test_cuda_many_mixed_dtypes_no_base():
    g = torch.Generator().manual_seed(13)
    dtypes = [torch.float32, torch.float16, torch.bfloat16] * 3
    experts = [torch.randn(37, 41, generator=g).to(d) for d in dtypes[:8]]
    weights = [0.1 * (i + 1) for i in range(8)]
    for out_dtype in DTYPES:
        assert_same(ops.ties(None, on_cuda(experts), weights, 0.3, out_dtype=out_dtype),
                    ops.ties(None, experts, weights, 0.3, out_dtype=out_dtype), exact=True)


def keep_count(density, n):
    if n == 0 or density <= 0.0:
        return 0
    if density >= 1.0:
        return n
    return max(1, int(density * n))


@pytest.mark.parametrize("shape", [(), (1,), (4097,), (64, 300), (2048, 4096)], ids=str)
@pytest.mark.parametrize("kind", ["randn", "few_values", "constant"])
def test_cuda_magnitude_mask_exact_counts(shape, kind):
    g = torch.Generator().manual_seed(14)
    x = torch.randn(shape, generator=g)
    if kind == "few_values":
        x = torch.round(x * 2) / 2
    elif kind == "constant":
        x = torch.full(shape, -1.5)
    n = x.numel()
    for dtype in DTYPES:
        xd = x.to(dtype)
        for density in (0.0, 1e-6, 0.01, 0.5, 0.9999, 1.0):
            gpu = ops.magnitude_mask(xd.cuda(), density).cpu()
            assert int(gpu.sum()) == keep_count(density, n)
            assert torch.equal(gpu, ops.magnitude_mask(xd, density))


# ---- batched SVD: Jacobi on the GPU (parallel rotation order) vs the CPU (cyclic order) ----

def svd_properties(x, u, s, vh, tol=3e-5):
    x64 = x.double().cpu()
    u, s, vh = u.double().cpu(), s.double().cpu(), vh.double().cpu()
    k = s.shape[-1]
    scale = max(float(torch.linalg.matrix_norm(x64, ord=2).max()) if x.numel() else 0.0, 1e-30)
    assert float(((u * s.unsqueeze(-2)) @ vh - x64).abs().max()) <= tol * scale
    eye = torch.eye(k, dtype=torch.float64)
    assert float((u.mT @ u - eye).abs().max()) <= tol
    assert float((vh @ vh.mT - eye).abs().max()) <= tol
    assert float((s - torch.linalg.svdvals(x64)).abs().max()) <= tol * scale


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (3, 5), (64, 64, 64), (8, 33, 17),
                                   (4, 17, 33), (256, 256), (2, 300, 200)], ids=str)
def test_cuda_batched_svd_matches_cpu(shape):
    g = torch.Generator().manual_seed(15)
    x = torch.randn(shape, generator=g)
    gpu = ops.batched_svd(x.cuda())
    cpu = ops.batched_svd(x)
    svd_properties(x, *gpu)
    assert torch.allclose(gpu[1].cpu(), cpu[1], rtol=0, atol=3e-5 * float(cpu[1].max()))


def test_cuda_batched_svd_rank_deficient_and_zero():
    g = torch.Generator().manual_seed(16)
    low = torch.randn(6, 50, 4, generator=g) @ torch.randn(6, 4, 30, generator=g)
    svd_properties(low, *ops.batched_svd(low.cuda()))
    zero = torch.zeros(3, 7, 5)
    u, s, vh = ops.batched_svd(zero.cuda())
    assert bool((s == 0).all())
    svd_properties(zero, u, s, vh)


def test_cuda_batched_svd_rank_deficient_above_64_columns():
    # More than 64 columns: the 1024-thread kernel, including its completion of the null space.
    g = torch.Generator().manual_seed(17)
    low = torch.randn(2, 120, 6, generator=g) @ torch.randn(2, 6, 90, generator=g)
    gpu = ops.batched_svd(low.cuda())
    svd_properties(low, *gpu)
    assert torch.allclose(gpu[1].cpu(), ops.batched_svd(low)[1], rtol=0,
                          atol=3e-5 * float(gpu[1].max()))


def test_cuda_batched_svd_completes_one_missing_direction():
    g = torch.Generator().manual_seed(5)
    q1, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    values = torch.linspace(2.0, 1.0, 64, dtype=torch.float64)
    values[-1] = 1e-9
    x = (q1 @ torch.diag(values) @ q2.T).float()
    svd_properties(x, *ops.batched_svd(x.cuda()))


def test_cuda_batched_svd_non_finite_input_matches_cpu():
    g = torch.Generator().manual_seed(16)
    x = torch.randn(3, 5, 3, generator=g)
    x[0, 1, 1] = float("nan")
    x[2, 0, 2] = float("inf")
    for gpu, cpu in zip(ops.batched_svd(x.cuda()), ops.batched_svd(x)):
        gpu = gpu.cpu()
        assert torch.equal(gpu.isnan(), cpu.isnan())
    assert torch.equal(ops.batched_svd(x.cuda())[0][0].cpu(), ops.batched_svd(x)[0][0])
    svd_properties(x[1], *[t[1] for t in ops.batched_svd(x.cuda())])


def test_cuda_wide_inputs_fall_back_beyond_the_kernels():
    base, experts = group((64, 300), 10, torch.float32, seed=33)
    for filter_wise in (False, True):
        assert_same(ops.model_stock(base.cuda(), on_cuda(experts), filter_wise=filter_wise),
                    ops.model_stock(base, experts, filter_wise=filter_wise), exact=False)
    _, many = group((64, 30), 70, torch.float32, seed=34)
    weights = [1.0 + 0.01 * i for i in range(70)]
    assert_same(ops.multislerp(on_cuda(many), weights), ops.multislerp(many, weights), exact=False)
    assert_same(ops.karcher(on_cuda(many), max_iter=4), ops.karcher(many, max_iter=4), exact=False)


def test_cuda_batched_svd_bf16_input():
    g = torch.Generator().manual_seed(17)
    x = torch.randn(16, 48, 24, generator=g).to(torch.bfloat16)
    svd_properties(x.float(), *ops.batched_svd(x.cuda()))


# ---- consensus family: ram, ramplus_tl, sce, arcee_fusion ----

CONSENSUS = {
    "ram": lambda b, e: ops.ram(b, e, epsilon=0.05),
    "ramplus_tl": lambda b, e: ops.ramplus_tl(b, e, r=0.5, alpha=0.3, epsilon=0.05),
    "sce": lambda b, e: ops.sce(b, e),
    "sce_topk": lambda b, e: ops.sce(b, e, select_topk=0.3),
    "sce_none": lambda b, e: ops.sce(b, e, select_topk=0.0),
    "arcee_fusion": lambda b, e: ops.arcee_fusion(b, e[0]),
}


@pytest.mark.parametrize("shape", SHAPES + [(700, 1000)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", sorted(CONSENSUS))
def test_cuda_consensus_matches_cpu(method, dtype, shape):
    """Same masks (counts, exact selections) and fp32 formulas; sce's weights and arcee's KL
    are double sums in another order, which rounds to the same fp32 value or one ulp away."""
    base, experts = group(shape, 3, dtype, seed=hash((method, str(dtype), shape)) % 1000)
    cpu = CONSENSUS[method](base, experts)
    gpu = CONSENSUS[method](base.cuda(), on_cuda(experts))
    if method.startswith("sce") and method != "sce_none":
        assert_same(gpu, cpu, exact=False)
    elif method == "arcee_fusion":
        # a KL one fp32 ulp apart may move an element across the threshold: a handful at most
        assert int((gpu.cpu().float() != cpu.float()).sum()) <= max(1, cpu.numel() // 10000)
    else:
        assert_same(gpu, cpu, exact=True)


@pytest.mark.parametrize("count", [1, 2, 5, 32])
@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "sce_topk"])
def test_cuda_consensus_expert_counts(method, count):
    base, experts = group((4097,), count, torch.float32, seed=count)
    cpu = CONSENSUS[method](base, experts)
    gpu = CONSENSUS[method](base.cuda(), on_cuda(experts))
    assert_same(gpu, cpu, exact=method != "sce_topk")


# ---- PEFT's merge_utils conventions (no base, unweighted votes, count divisor, 1/density) ----

PEFT_OPTIONS = {
    "peft_ties": dict(density=0.3, sparsification="magnitude", consensus="sum",
                      sign_from="unweighted", normalize="count", min_keep=0),
    "peft_ties_frequency": dict(density=0.3, sparsification="magnitude", consensus="count",
                                sign_from="unweighted", normalize="count", min_keep=0),
    "peft_magnitude_prune": dict(density=0.01, sparsification="magnitude", min_keep=0),
    "peft_dare_ties": dict(density=0.5, sparsification="random", consensus="sum",
                           sign_from="unweighted", normalize="count", rescale="density", seed=7),
    "peft_dare_linear": dict(density=0.5, sparsification="random", rescale="density", seed=8),
    "peft_task_arithmetic": dict(),
}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(PEFT_OPTIONS))
def test_cuda_peft_options_match_cpu_exactly(case, dtype, shape):
    _, experts = group(shape, 3, dtype, seed=21)
    weight = [0.7, -0.4, 0.0]
    for count in (1, 3):  # one expert and several (vectorised and generic merge kernels)
        kw = PEFT_OPTIONS[case]
        cpu = ops.generalized_task_arithmetic(None, experts[:count], weight[:count], **kw)
        gpu = ops.generalized_task_arithmetic(None, on_cuda(experts[:count]), weight[:count], **kw)
        assert_same(gpu, cpu, exact=True)


@pytest.mark.parametrize("shape", [(1,), (3, 4097), (4, 64, 300), (0, 5), (2, 0)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_sign_mask_and_disjoint_merge_match_cpu(shape, dtype):
    g = torch.Generator().manual_seed(22)
    x = torch.randn(shape, generator=g).to(dtype)
    mask = torch.randn(shape, generator=g) > 0.2
    for method in ("sum", "count"):
        assert torch.equal(ops.majority_sign_mask(x.cuda(), method).cpu(),
                           ops.majority_sign_mask(x, method))
    assert_same(ops.disjoint_merge(x.cuda(), mask.cuda()), ops.disjoint_merge(x, mask), exact=True)


# ---- sphere family: the same host coefficients from fp64 Gram statistics summed in another
# order, then the CPU's fp32 output operations ----

@pytest.mark.parametrize("shape", [(), (5,), (64, 300), (3, 5, 7), (1024, 1100), (70000, 3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_nuslerp(shape, dtype):
    base, (a, b) = group(shape, 2, dtype, seed=30)
    dims = [(-1, True), (-1, False), (0, False)] + ([(1, False)] if len(shape) == 3 else [])
    for dim, flatten in dims:
        for w0 in (None, base):
            cpu = ops.nuslerp(0.3, a, b, base=w0, dim=dim, flatten=flatten)
            gpu = ops.nuslerp(0.3, a.cuda(), b.cuda(), base=None if w0 is None else w0.cuda(),
                              dim=dim, flatten=flatten)
            assert_same(gpu, cpu, exact=False)


@pytest.mark.parametrize("shape", [(), (5,), (64, 300), (1024, 1100)], ids=str)
@pytest.mark.parametrize("count", [1, 2, 3, 5, 9])
def test_cuda_multislerp_and_karcher(shape, count):
    base, experts = group(shape, count, torch.float32, seed=31)
    weights = [0.1 * (i + 1) for i in range(count)]
    for w0 in (None, base):
        cpu = ops.multislerp(experts, weights, base=w0)
        gpu = ops.multislerp(on_cuda(experts), weights, base=None if w0 is None else w0.cuda())
        assert_same(gpu, cpu, exact=False)
    assert_same(ops.karcher(on_cuda(experts), max_iter=6), ops.karcher(experts, max_iter=6), exact=False)


def test_cuda_sphere_bf16_and_edge_cases():
    base, experts = group((300, 500), 3, torch.bfloat16, seed=32)
    assert_same(ops.multislerp(on_cuda(experts), [0.2, 0.3, 0.5], base=base.cuda()),
                ops.multislerp(experts, [0.2, 0.3, 0.5], base=base), exact=False)
    assert_same(ops.karcher(on_cuda(experts)), ops.karcher(experts), exact=False)
    x = experts[0].float()
    z = torch.zeros_like(x)
    assert torch.equal(ops.karcher([z.cuda(), z.cuda()]).cpu(), z)
    assert_same(ops.karcher([x.cuda(), z.cuda()]), ops.karcher([x, z]), exact=False)
    with pytest.raises(fastmerge.InvalidArgumentError, match="antipodal"):
        ops.multislerp([x.cuda(), -x.cuda(), z.cuda() + 1], [1.0, 1.0, 0.0])
    assert_same(ops.nuslerp(0.3, x.cuda(), -x.cuda(), dim=0), ops.nuslerp(0.3, x, -x, dim=0), exact=False)
