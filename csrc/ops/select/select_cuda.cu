// CUDA magnitude_mask: the GTA planner's device selection (one expert, no base), then one
// pass writing mask[i] = composite(i) >= boundary.
#include "fastmerge/cuda_utils.cuh"
#include "../gta/gta_cuda.cuh"
#include "select.h"

namespace fastmerge {
namespace {

__global__ void write_mask_kernel(const void* x, int dtype, int64_t n, unsigned long long boundary,
                                  uint8_t* mask) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    mask[i] = composite_key(magnitude_key(load_element(x, dtype, i)), i) >= boundary;
}

}  // namespace

void magnitude_mask_cuda(const TensorView& x, double density, const TensorView& mask,
                         StreamHandle stream_handle) {
  const int64_t n = x.numel();
  check_flat(x, "x", n);
  FM_CHECK(mask.is_contiguous() && mask.numel() == n, "mask must be contiguous with x's numel");
  if (n == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  GtaParams params;
  params.sparsify = Sparsify::magnitude;
  params.experts.resize(1);
  params.experts[0].density = density;
  const GtaDevicePlan prepared = gta_prepare_cuda(nullptr, {x}, params, n, stream);
  const ExpertPlan& e = prepared.plan.experts[0];
  if (e.kind != MaskKind::topk_range) {
    FM_CUDA_CHECK(cudaMemsetAsync(mask.data, e.kind == MaskKind::drop_all ? 0 : 1, size_t(n), stream));
    return;
  }
  write_mask_kernel<<<grid_for(n, 256), 256, 0, stream>>>(x.data, int(x.dtype), n, e.keep_from,
                                                          mask.ptr<uint8_t>());
  FM_CUDA_LAUNCHED();
}

}  // namespace fastmerge
