// CUDA slerp and model_stock: per-block partial statistics in double reduced by a fixed tree
// (no float atomics: results do not depend on scheduling), host coefficients shared with the
// CPU path (interp_coefficients.cpp), then one output pass with the CPU's fp32 formulas.
#include <vector>

#include "fastmerge/cuda_utils.cuh"
#include "interp.h"

namespace fastmerge {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxStockExperts = 16;  // Gram statistics kept per thread


__global__ void slerp_stats_kernel(const void* a, int a_dtype, const void* b, int b_dtype, int64_t n,
                                   double* partial) {
  double v[3] = {0.0, 0.0, 0.0};
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const double x = load_element(a, a_dtype, i), y = load_element(b, b_dtype, i);
    v[0] += x * x;
    v[1] += y * y;
    v[2] += x * y;
  }
  block_reduce<kThreads>(v);
  if (threadIdx.x == 0)
    for (int c = 0; c < 3; ++c) partial[blockIdx.x * 3 + c] = v[c];
}

__global__ void slerp_output_kernel(const void* a, int a_dtype, const void* b, int b_dtype, int64_t n,
                                    float ka, float kb, void* out, int out_dtype) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store_element(out, out_dtype, i, ka * load_element(a, a_dtype, i) + kb * load_element(b, b_dtype, i));
}

__global__ void nearswap_kernel(const void* a, int a_dtype, const void* b, int b_dtype, int64_t n,
                                float t, void* out, int out_dtype) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    store_element(out, out_dtype, i,
                  nearswap_element(load_element(a, a_dtype, i), load_element(b, b_dtype, i), t));
}

struct StockInputs {
  const void* base;
  int base_dtype;
  const void* experts[kMaxStockExperts];
  int dtypes[kMaxStockExperts];
  int count;
};

// Upper triangle of the offsets' Gram matrix for one row [begin, begin + len), per block.
template <int T>
__global__ void stock_gram_kernel(StockInputs in, int64_t rows, int64_t row_len, int64_t parts,
                                  double* gram /* rows * parts * T * T */) {
  constexpr int kPairs = T * (T + 1) / 2;
  const int64_t row = blockIdx.x / parts, part = blockIdx.x % parts;
  const int64_t begin = row * row_len;
  double g[kPairs];
  for (int c = 0; c < kPairs; ++c) g[c] = 0.0;
  for (int64_t j = part * blockDim.x + threadIdx.x; j < row_len; j += parts * blockDim.x) {
    const int64_t i = begin + j;
    const float w0 = load_element(in.base, in.base_dtype, i);
    double o[T];
    for (int e = 0; e < T; ++e) o[e] = double(load_element(in.experts[e], in.dtypes[e], i) - w0);
    int c = 0;
    for (int x = 0; x < T; ++x)
      for (int y = x; y < T; ++y) g[c++] += o[x] * o[y];
  }
  block_reduce<kThreads>(g);
  if (threadIdx.x == 0) {
    double* out = gram + size_t(blockIdx.x) * T * T;
    int c = 0;
    for (int x = 0; x < T; ++x)
      for (int y = x; y < T; ++y) out[x * T + y] = out[y * T + x] = g[c++];
  }
}

__global__ void stock_output_kernel(StockInputs in, int64_t n, int64_t row_len, const float* ratio,
                                    void* out, int out_dtype) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float t = ratio[i / row_len];
    float sum = 0.0f;
    for (int e = 0; e < in.count; ++e) sum += load_element(in.experts[e], in.dtypes[e], i);
    const float average = sum / float(in.count);
    store_element(out, out_dtype, i, t * average + (1.0f - t) * load_element(in.base, in.base_dtype, i));
  }
}

template <int T>
void launch_gram(const StockInputs& in, int64_t rows, int64_t row_len, int64_t parts, double* gram,
                 cudaStream_t stream) {
  FM_CHECK(rows * parts <= INT32_MAX, "model_stock: ", rows, " rows exceed one launch");
  stock_gram_kernel<T><<<int(rows * parts), kThreads, 0, stream>>>(in, rows, row_len, parts, gram);
}

}  // namespace

void slerp_cuda(const TensorView& a, const TensorView& b, const TensorView& out, double t,
                StreamHandle stream_handle) {
  const int64_t n = check_pair_inputs(a, b, out);
  if (n == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int blocks = grid_for(n, kThreads);
  DeviceBuffer partial(size_t(blocks) * 3 * 8, stream);
  slerp_stats_kernel<<<blocks, kThreads, 0, stream>>>(a.data, int(a.dtype), b.data, int(b.dtype), n,
                                                      partial.as<double>());
  FM_CUDA_LAUNCHED();
  std::vector<double> host(size_t(blocks) * 3);
  FM_CUDA_CHECK(cudaMemcpyAsync(host.data(), partial.as<void>(), partial.bytes(), cudaMemcpyDeviceToHost, stream));
  FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  double aa = 0, bb = 0, ab = 0;
  for (int k = 0; k < blocks; ++k) {
    aa += host[size_t(k) * 3];
    bb += host[size_t(k) * 3 + 1];
    ab += host[size_t(k) * 3 + 2];
  }
  const SlerpCoefficients c = slerp_coefficients(aa, bb, ab, float(t));
  slerp_output_kernel<<<blocks, kThreads, 0, stream>>>(a.data, int(a.dtype), b.data, int(b.dtype), n,
                                                       c.a, c.b, out.data, int(out.dtype));
  FM_CUDA_LAUNCHED();
}

void nearswap_cuda(const TensorView& a, const TensorView& b, const TensorView& out, double t,
                   StreamHandle stream_handle) {
  const int64_t n = check_pair_inputs(a, b, out);
  if (n == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int blocks = grid_for(n, kThreads);
  nearswap_kernel<<<blocks, kThreads, 0, stream>>>(a.data, int(a.dtype), b.data, int(b.dtype), n,
                                                   float(t), out.data, int(out.dtype));
  FM_CUDA_LAUNCHED();
}

void model_stock_cuda(const TensorView& base, const std::vector<TensorView>& experts,
                      const TensorView& out, int64_t rows, StreamHandle stream_handle) {
  const int64_t n = check_model_stock_inputs(base, experts, out, rows);
  const int T = int(experts.size());
  FM_CHECK(T <= 8, "the CUDA model_stock takes at most 8 experts, got ", T);
  if (n == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  StockInputs in{};
  in.base = base.data;
  in.base_dtype = int(base.dtype);
  in.count = T;
  for (int e = 0; e < T; ++e) {
    in.experts[e] = experts[size_t(e)].data;
    in.dtypes[e] = int(experts[size_t(e)].dtype);
  }
  const int64_t row_len = n / rows;
  // Blocks per row: enough to fill the device for one long row, one block for many rows.
  const int64_t parts = rows == 1 ? grid_for(row_len, kThreads) : 1;
  DeviceBuffer gram(size_t(rows * parts) * T * T * 8, stream);
  switch (T) {
    case 2: launch_gram<2>(in, rows, row_len, parts, gram.as<double>(), stream); break;
    case 3: launch_gram<3>(in, rows, row_len, parts, gram.as<double>(), stream); break;
    case 4: launch_gram<4>(in, rows, row_len, parts, gram.as<double>(), stream); break;
    case 5: launch_gram<5>(in, rows, row_len, parts, gram.as<double>(), stream); break;
    case 6: launch_gram<6>(in, rows, row_len, parts, gram.as<double>(), stream); break;
    case 7: launch_gram<7>(in, rows, row_len, parts, gram.as<double>(), stream); break;
    default: launch_gram<8>(in, rows, row_len, parts, gram.as<double>(), stream); break;
  }
  FM_CUDA_LAUNCHED();
  std::vector<double> host(size_t(rows * parts) * T * T);
  FM_CUDA_CHECK(cudaMemcpyAsync(host.data(), gram.as<void>(), gram.bytes(), cudaMemcpyDeviceToHost, stream));
  FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<float> ratio(static_cast<size_t>(rows));
  std::vector<double> total(size_t(T) * T);
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(total.begin(), total.end(), 0.0);
    for (int64_t p = 0; p < parts; ++p)
      for (int k = 0; k < T * T; ++k) total[size_t(k)] += host[size_t(r * parts + p) * T * T + k];
    ratio[size_t(r)] = model_stock_ratio(total.data(), T);
  }
  DeviceBuffer ratio_dev(ratio.size() * 4, stream);
  FM_CUDA_CHECK(cudaMemcpyAsync(ratio_dev.as<void>(), ratio.data(), ratio_dev.bytes(), cudaMemcpyHostToDevice, stream));
  stock_output_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(in, n, row_len, ratio_dev.as<float>(),
                                                                      out.data, int(out.dtype));
  FM_CUDA_LAUNCHED();
  // ratio is pageable host memory: the copy above completed before cudaMemcpyAsync returned.
}

}  // namespace fastmerge
