// CUDA launchers of PEFT's sign mask and disjoint merge (gta.h), with the CPU's per-element
// operations (gta_disjoint.h): one thread per column of the (T, n) input, rows in t order.
#include "fastmerge/cuda_utils.cuh"
#include "gta_disjoint.h"

namespace fastmerge {
namespace {

constexpr int kThreads = 256;

__global__ void sign_mask_kernel(const void* x, int dtype, int64_t tasks, int64_t n, bool count,
                                 uint8_t* mask) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * blockDim.x) {
    float vote = 0.0f;
    for (int64_t t = 0; t < tasks; ++t) vote += vote_of(load_element(x, dtype, t * n + j), count);
    for (int64_t t = 0; t < tasks; ++t)
      mask[t * n + j] = uint8_t(agrees(load_element(x, dtype, t * n + j), vote));
  }
}

__global__ void disjoint_kernel(const void* x, int dtype, const uint8_t* mask, int64_t tasks,
                                int64_t n, void* out, int out_dtype) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * blockDim.x) {
    float mixed = 0.0f, kept = 0.0f;
    for (int64_t t = 0; t < tasks; ++t) {
      const float on = float(mask[t * n + j] != 0);
      mixed += load_element(x, dtype, t * n + j) * on;
      kept += on;
    }
    store_element(out, out_dtype, j, mixed / fmaxf(kept, 1.0f));
  }
}

}  // namespace

void gta_sign_mask_cuda(const TensorView& stacked, const TensorView& mask, Consensus method,
                        StreamHandle stream_handle) {
  const StackedShape s = check_stacked(stacked, mask, nullptr);
  FM_CHECK(method == Consensus::sum || method == Consensus::count, "sign mask: unknown method");
  if (s.n == 0 || s.tasks == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  sign_mask_kernel<<<grid_for(s.n, kThreads), kThreads, 0, stream>>>(
      stacked.data, int(stacked.dtype), s.tasks, s.n, method == Consensus::count, mask.ptr<uint8_t>());
  FM_CUDA_LAUNCHED();
}

void gta_disjoint_merge_cuda(const TensorView& stacked, const TensorView& mask, const TensorView& out,
                             StreamHandle stream_handle) {
  const StackedShape s = check_stacked(stacked, mask, &out);
  if (s.n == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  disjoint_kernel<<<grid_for(s.n, kThreads), kThreads, 0, stream>>>(
      stacked.data, int(stacked.dtype), mask.ptr<const uint8_t>(), s.tasks, s.n, out.data, int(out.dtype));
  FM_CUDA_LAUNCHED();
}

}  // namespace fastmerge
