// CUDA helpers for the launchers: error checks that throw fastmerge::Error, a stream-ordered
// device buffer, and element loads/stores by run-time dtype.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "fastmerge/common.h"
#include "fastmerge/numeric.h"

#define FM_CUDA_CHECK(expr)                                                                \
  do {                                                                                     \
    const cudaError_t fm_err_ = (expr);                                                    \
    if (fm_err_ != cudaSuccess)                                                            \
      ::fastmerge::fail("fastmerge: CUDA error ", cudaGetErrorString(fm_err_), " at ",     \
                        __FILE__, ":", __LINE__);                                          \
  } while (0)

// After a launch: configuration errors surface here, not at the next call.
#define FM_CUDA_LAUNCHED() FM_CUDA_CHECK(cudaGetLastError())

namespace fastmerge {

// Device memory allocated and freed in stream order on the caller's stream.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t bytes, cudaStream_t stream) : stream_(stream), bytes_(bytes) {
    if (bytes) FM_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept { swap(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    swap(o);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  template <typename T> T* as() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }
  void zero() const {
    if (bytes_) FM_CUDA_CHECK(cudaMemsetAsync(ptr_, 0, bytes_, stream_));
  }

 private:
  void swap(DeviceBuffer& o) {
    std::swap(ptr_, o.ptr_);
    std::swap(stream_, o.stream_);
    std::swap(bytes_, o.bytes_);
  }
  void* ptr_ = nullptr;
  cudaStream_t stream_ = nullptr;
  size_t bytes_ = 0;
};

__device__ __forceinline__ float load_element(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case int(DType::f32): return static_cast<const float*>(p)[i];
    case int(DType::bf16): return to_float(static_cast<const bf16_t*>(p)[i]);
    default: return to_float(static_cast<const f16_t*>(p)[i]);
  }
}

__device__ __forceinline__ void store_element(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case int(DType::f32): static_cast<float*>(p)[i] = v; break;
    case int(DType::bf16): static_cast<bf16_t*>(p)[i] = from_float<bf16_t>(v); break;
    default: static_cast<f16_t*>(p)[i] = from_float<f16_t>(v); break;
  }
}

// Fixed-shape tree reduction of kCount doubles per thread over a block of kThreads threads,
// one statistic at a time through one shared buffer; every thread gets the sums. The order of
// the additions depends only on kThreads, never on scheduling. Launch with exactly kThreads.
template <int kThreads, int kCount>
__device__ void block_reduce(double (&v)[kCount]) {
  static_assert(kThreads > 0 && (kThreads & (kThreads - 1)) == 0,
                "the halving tree needs a power-of-two block");
  __shared__ double shared[kThreads];
  for (int c = 0; c < kCount; ++c) {
    shared[threadIdx.x] = v[c];
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (int(threadIdx.x) < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
      __syncthreads();
    }
    v[c] = shared[0];
    __syncthreads();
  }
}

// Multiprocessors of the current device.
inline int sm_count() {
  int device = 0, count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count > 0 ? count : 80;
}

// Most blocks of a grid-stride launch: enough to fill any current GPU (an H100's 132 SMs
// hold 8 blocks of 256 threads each: 1056), and a constant rather than a multiple of the SM
// count, so kernels that keep one partial sum per block (slerp's norms, model_stock's and the
// sphere family's Gram matrices) add them in the same tree on every device.
constexpr int64_t kMaxGridBlocks = 2048;

// Blocks for a grid-stride loop over `work` items: one per `threads` items, at most
// kMaxGridBlocks.
inline int grid_for(int64_t work, int threads) {
  const int64_t needed = (work + threads - 1) / threads;
  return int(needed < 1 ? 1 : (needed < kMaxGridBlocks ? needed : kMaxGridBlocks));
}

// Exact, order-independent sums of |x| over float values: each magnitude's 24-bit significand
// is added as an integer into the bin of its exponent (bins 0-255), NaNs are counted in bin
// 256. Integer atomics make the result independent of thread order; the host converts.
constexpr int kExactBins = 257;

__device__ __forceinline__ void exact_bin(float magnitude, int* bin, unsigned long long* value) {
  const uint32_t u = float_bits(magnitude) & 0x7fffffffu;
  const int e = int(u >> 23);
  if (u > 0x7f800000u) {
    *bin = 256;
    *value = 1ull;
    return;
  }
  *bin = e;
  *value = (u & 0x7fffffu) | (e ? 0x800000u : 0u);
}

// Adds significand to bins[bin] with one atomic per distinct bin in the warp (magnitudes cluster
// in a few exponents, so per-lane atomics would serialise). Every active lane must call it;
// lanes with nothing to add pass 0.
__device__ __forceinline__ void add_exact(unsigned long long* bins, int bin, unsigned significand) {
  const unsigned same = __match_any_sync(__activemask(), bin);
  const unsigned sum = __reduce_add_sync(same, significand);
  if (int(threadIdx.x & 31) == __ffs(same) - 1) atomicAdd(&bins[bin], (unsigned long long)sum);
}

double exact_bins_to_double(const unsigned long long* bins);

}  // namespace fastmerge
