// CUDA consensus merges: the CPU passes (consensus_cpu.cpp) with the same per-element formulas
// (consensus.h), integer atomics for counts, per-block double partials reduced by a fixed tree
// and summed on the host in block order (no float atomics), and the sample-window selection of
// select.h run with a device scan.
#include <algorithm>
#include <vector>

#include "consensus.h"
#include "fastmerge/cuda_utils.cuh"
#include "../select/select.h"

namespace fastmerge {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxExperts = 32;

struct ExpertSet {
  const void* data[kMaxExperts];
  int dtype[kMaxExperts];
  float factor[kMaxExperts];  // ramplus_tl: lambda (1 for ram); sce: weight
  int count;
};

ExpertSet expert_set(const std::vector<TensorView>& experts) {
  FM_CHECK(experts.size() <= size_t(kMaxExperts), "the CUDA consensus merges take at most ",
           kMaxExperts, " experts, got ", experts.size());
  ExpertSet s{};
  s.count = int(experts.size());
  for (int e = 0; e < s.count; ++e) {
    s.data[e] = experts[size_t(e)].data;
    s.dtype[e] = int(experts[size_t(e)].dtype);
    s.factor[e] = 1.0f;
  }
  return s;
}

cudaStream_t as_stream(StreamHandle h) { return reinterpret_cast<cudaStream_t>(h); }

__device__ __forceinline__ float delta_at(const ExpertSet& ex, int e, int64_t i, float b) {
  return load_element(ex.data[e], ex.dtype[e], i) - b;
}

// Fixed-shape tree sum of one double over the block; every thread gets the total.
__device__ double block_sum(double v) {
  __shared__ double shared[kThreads];
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

__device__ float block_max(float v) {
  __shared__ float shared[kThreads];
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) shared[threadIdx.x] = row_max(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  const float m = shared[0];
  __syncthreads();
  return m;
}

// ---- ram / ramplus_tl ----

__device__ __forceinline__ int contributors(const ExpertSet& ex, int64_t i, float b, float eps) {
  int c = 0;
  for (int e = 0; e < ex.count; ++e) c += ram_nonzero(delta_at(ex, e, i, b), eps) ? 1 : 0;
  return c;
}

__global__ void ram_output_kernel(const void* base, int base_dtype, ExpertSet ex, int64_t n, float eps,
                                  void* out, int out_dtype) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float b = load_element(base, base_dtype, i);
    const int c = contributors(ex, i, b, eps);
    float sum = 0.0f;
    for (int e = 0; e < ex.count; ++e) {
      const float d = delta_at(ex, e, i, b);
      sum += ram_term(d, ram_nonzero(d, eps), c, ex.factor[e]);
    }
    store_element(out, out_dtype, i, b + sum);
  }
}

// counts[2e] += elements expert e shares with another, counts[2e + 1] += elements only it changes.
__global__ void ram_count_kernel(const void* base, int base_dtype, ExpertSet ex, int64_t n, float eps,
                                 unsigned long long* counts) {
  __shared__ unsigned long long local[2 * kMaxExperts];
  for (int k = threadIdx.x; k < 2 * ex.count; k += blockDim.x) local[k] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  for (int64_t start = int64_t(blockIdx.x) * blockDim.x; start < n; start += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = start + threadIdx.x;
    const bool valid = i < n;
    const float b = valid ? load_element(base, base_dtype, i) : 0.0f;
    const int c = valid ? contributors(ex, i, b, eps) : 0;
    for (int e = 0; e < ex.count; ++e) {
      const bool nz = valid && ram_nonzero(delta_at(ex, e, valid ? i : 0, b), eps);
      const unsigned shared = __ballot_sync(0xffffffffu, nz && c > 1);
      const unsigned unique = __ballot_sync(0xffffffffu, nz && c == 1);
      if (lane == 0) {
        if (shared) atomicAdd(&local[2 * e], (unsigned long long)__popc(shared));
        if (unique) atomicAdd(&local[2 * e + 1], (unsigned long long)__popc(unique));
      }
    }
  }
  __syncthreads();
  for (int k = threadIdx.x; k < 2 * ex.count; k += blockDim.x)
    if (local[k]) atomicAdd(&counts[k], local[k]);
}

// ---- exact selection: k-th largest of n 64-bit values on the device ----

struct VarComposite {  // sce: composite of the variance's magnitude key and the index
  const float* v;
  __device__ uint64_t operator()(int64_t i) const { return composite_key(magnitude_key(v[i]), i); }
};

struct OrderValue {  // arcee_fusion: the value's order key alone
  const float* v;
  __device__ uint64_t operator()(int64_t i) const { return uint64_t(order_key(v[i])); }
};

template <typename Fn>
__global__ void sample_kernel(Fn fn, const int64_t* positions, int64_t count, unsigned long long* out) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < count;
       j += int64_t(gridDim.x) * blockDim.x)
    out[j] = fn(positions[j]);
}

// counters[0]: values above hi; counters[1]: values in [lo, hi] (written while below cap).
template <typename Fn>
__global__ void window_scan_kernel(Fn fn, int64_t n, unsigned long long lo, unsigned long long hi,
                                   unsigned long long* counters, unsigned long long* candidates,
                                   unsigned long long cap) {
  unsigned long long above = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const unsigned long long v = fn(i);
    if (v > hi) {
      ++above;
    } else if (v >= lo) {
      const unsigned long long slot = atomicAdd(&counters[1], 1ull);
      if (slot < cap) candidates[slot] = v;
    }
  }
  if (above) atomicAdd(&counters[0], above);
}

template <typename Fn>
uint64_t kth_largest_cuda(int64_t n, int64_t k, Fn fn, cudaStream_t stream) {
  std::vector<uint64_t> sample;
  if (n > 4 * kSampleSize) {
    const int64_t s = sample_count(n);
    std::vector<int64_t> positions(size_t(s), 0);
    for (int64_t j = 0; j < s; ++j) positions[size_t(j)] = sample_position(j, n, s);
    DeviceBuffer pos(size_t(s) * 8, stream), values(size_t(s) * 8, stream);
    FM_CUDA_CHECK(cudaMemcpyAsync(pos.as<void>(), positions.data(), pos.bytes(), cudaMemcpyHostToDevice, stream));
    sample_kernel<<<grid_for(s, kThreads), kThreads, 0, stream>>>(fn, pos.as<int64_t>(), s,
                                                                 values.as<unsigned long long>());
    FM_CUDA_LAUNCHED();
    sample.resize(size_t(s));
    FM_CUDA_CHECK(cudaMemcpyAsync(sample.data(), values.as<void>(), values.bytes(), cudaMemcpyDeviceToHost, stream));
    FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  TopkWindow w = plan_topk_window(sample, n, k);
  if (w.trivial) return w.boundary;
  DeviceBuffer counters(16, stream);
  int64_t cap = (w.lo == 0 && w.hi == ~uint64_t(0)) ? n : std::min<int64_t>(n, n / 16 + 4096);
  for (;;) {
    DeviceBuffer candidates(size_t(cap) * 8, stream);
    counters.zero();
    window_scan_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(
        fn, n, w.lo, w.hi, counters.as<unsigned long long>(), candidates.as<unsigned long long>(),
        (unsigned long long)cap);
    FM_CUDA_LAUNCHED();
    unsigned long long host_counters[2];
    FM_CUDA_CHECK(cudaMemcpyAsync(host_counters, counters.as<void>(), 16, cudaMemcpyDeviceToHost, stream));
    FM_CUDA_CHECK(cudaStreamSynchronize(stream));
    const int64_t found = int64_t(host_counters[1]);
    if (found > cap) {  // more candidates than room: rescan with room for all of them
      cap = found;
      continue;
    }
    std::vector<uint64_t> host(static_cast<size_t>(found));
    if (found)
      FM_CUDA_CHECK(cudaMemcpyAsync(host.data(), candidates.as<void>(), size_t(found) * 8,
                                    cudaMemcpyDeviceToHost, stream));
    FM_CUDA_CHECK(cudaStreamSynchronize(stream));
    uint64_t boundary = 0;
    std::vector<uint64_t> scratch;
    if (resolve_topk({{host.data(), found}}, int64_t(host_counters[0]), w, nullptr, scratch, &boundary)) return boundary;
    w = next_topk_window(sample, n, w, int64_t(host_counters[0]), found);  // the sample missed the k-th
    if (w.lo == 0 && w.hi == ~uint64_t(0)) cap = n;  // the last resort: every element a candidate
  }
}

// ---- sce ----

__global__ void sce_variance_kernel(const void* base, int base_dtype, ExpertSet ex, int64_t n,
                                    float* var, unsigned long long* nonzero) {
  unsigned long long nz = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float b = load_element(base, base_dtype, i);
    double mean = 0.0;
    for (int e = 0; e < ex.count; ++e) mean += double(delta_at(ex, e, i, b));
    mean /= double(ex.count);
    double ss = 0.0;
    for (int e = 0; e < ex.count; ++e) {
      const double x = double(delta_at(ex, e, i, b)) - mean;
      ss += x * x;
    }
    const float v = float(ss / double(ex.count));
    var[i] = v;
    nz += v != 0.0f;
  }
  if (nz) atomicAdd(nonzero, nz);
}

struct SceMask {
  const float* var;  // null: no selection
  unsigned long long boundary;
  float all;         // without selection: 1 keeps everything, 0 nothing
  __device__ float operator()(int64_t i) const {
    if (!var) return all;
    return composite_key(magnitude_key(var[i]), i) >= boundary ? 1.0f : 0.0f;
  }
};

// partial[e * gridDim.x + block] = this block's sum of squares of expert e's masked deltas.
__global__ void sce_squares_kernel(const void* base, int base_dtype, ExpertSet ex, int64_t n, SceMask mask,
                                   double* partial) {
  const int e = blockIdx.y;
  double ss = 0.0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float b = load_element(base, base_dtype, i);
    const double m = double(delta_at(ex, e, i, b) * mask(i));
    ss += m * m;
  }
  ss = block_sum(ss);
  if (threadIdx.x == 0) partial[size_t(e) * gridDim.x + blockIdx.x] = ss;
}

__global__ void sce_output_kernel(const void* base, int base_dtype, ExpertSet ex, int64_t n, SceMask mask,
                                  void* out, int out_dtype) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float b = load_element(base, base_dtype, i);
    const float keep = mask(i);
    float majority = 0.0f;
    for (int e = 0; e < ex.count; ++e) majority += delta_at(ex, e, i, b) * keep;
    majority = majority >= 0.0f ? 1.0f : -1.0f;
    float num = 0.0f, den = 0.0f;
    for (int e = 0; e < ex.count; ++e) {
      const float m = delta_at(ex, e, i, b) * keep;
      const float ew = ex.factor[e] * (sign_of(m) == majority ? 1.0f : 0.0f);
      num += m * ew;
      den += ew;
    }
    store_element(out, out_dtype, i, b + num / fmaxf(den, 1e-6f));
  }
}

// ---- arcee_fusion ----

// kl[row] for rows of row_len elements, one block per row.
__global__ void arcee_kl_kernel(const void* base, int base_dtype, const void* other, int other_dtype,
                                int64_t rows, int64_t row_len, float* kl) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t begin = r * row_len;
    float pmax = -INFINITY, qmax = -INFINITY;
    for (int64_t j = threadIdx.x; j < row_len; j += blockDim.x) {
      pmax = row_max(pmax, load_element(other, other_dtype, begin + j));
      qmax = row_max(qmax, load_element(base, base_dtype, begin + j));
    }
    pmax = block_max(pmax);
    qmax = block_max(qmax);
    double psum = 0.0, qsum = 0.0;
    for (int64_t j = threadIdx.x; j < row_len; j += blockDim.x) {
      psum += exp(double(load_element(other, other_dtype, begin + j)) - double(pmax));
      qsum += exp(double(load_element(base, base_dtype, begin + j)) - double(qmax));
    }
    psum = block_sum(psum);
    qsum = block_sum(qsum);
    double total = 0.0;
    for (int64_t j = threadIdx.x; j < row_len; j += blockDim.x)
      total += arcee_kl_term(load_element(other, other_dtype, begin + j), pmax, psum,
                             load_element(base, base_dtype, begin + j), qmax, qsum);
    total = block_sum(total);
    if (threadIdx.x == 0) kl[r] = float(total);
  }
}

__global__ void arcee_importance_kernel(const void* base, int base_dtype, const void* other, int other_dtype,
                                        int64_t n, int64_t row_len, const float* kl, float* importance,
                                        unsigned int* least) {
  unsigned int m = ~0u;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float p = load_element(other, other_dtype, i), b = load_element(base, base_dtype, i);
    const float v = fabsf(p - b) * kl[i / row_len];
    importance[i] = v;
    m = min(m, order_key(v));
  }
  atomicMin(least, m);
}

__global__ void arcee_output_kernel(const void* base, int base_dtype, const void* other, int other_dtype,
                                    int64_t n, const float* importance, float threshold, void* out,
                                    int out_dtype) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float p = load_element(other, other_dtype, i), b = load_element(base, base_dtype, i);
    store_element(out, out_dtype, i, b + (p - b) * (importance[i] >= threshold ? 1.0f : 0.0f));
  }
}

}  // namespace

void ram_cuda(const TensorView& base, const std::vector<TensorView>& experts, const TensorView& out,
              double epsilon, StreamHandle stream_handle) {
  const int64_t n = check_consensus_inputs(base, experts, out);
  const ExpertSet ex = expert_set(experts);
  if (n == 0) return;
  cudaStream_t stream = as_stream(stream_handle);
  ram_output_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(
      base.data, int(base.dtype), ex, n, float(epsilon), out.data, int(out.dtype));
  FM_CUDA_LAUNCHED();
}

void ramplus_tl_cuda(const TensorView& base, const std::vector<TensorView>& experts,
                     const TensorView& out, double r, double alpha, double epsilon,
                     StreamHandle stream_handle) {
  const int64_t n = check_consensus_inputs(base, experts, out);
  ExpertSet ex = expert_set(experts);
  if (n == 0) return;
  cudaStream_t stream = as_stream(stream_handle);
  const int T = ex.count;
  DeviceBuffer counts(size_t(2 * T) * 8, stream);
  counts.zero();
  ram_count_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(
      base.data, int(base.dtype), ex, n, float(epsilon), counts.as<unsigned long long>());
  FM_CUDA_LAUNCHED();
  std::vector<unsigned long long> host(size_t(2 * T));
  FM_CUDA_CHECK(cudaMemcpyAsync(host.data(), counts.as<void>(), counts.bytes(), cudaMemcpyDeviceToHost, stream));
  FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (int e = 0; e < T; ++e)
    ex.factor[e] = ramplus_lambda(int64_t(host[size_t(2 * e)]), int64_t(host[size_t(2 * e + 1)]), r,
                                  alpha, epsilon);
  ram_output_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(
      base.data, int(base.dtype), ex, n, float(epsilon), out.data, int(out.dtype));
  FM_CUDA_LAUNCHED();
}

void sce_cuda(const TensorView& base, const std::vector<TensorView>& experts, const TensorView& out,
              double select_topk, StreamHandle stream_handle) {
  const int64_t n = check_consensus_inputs(base, experts, out);
  ExpertSet ex = expert_set(experts);
  if (n == 0) return;
  cudaStream_t stream = as_stream(stream_handle);
  const int T = ex.count;
  const int blocks = grid_for(n, kThreads);
  SceMask mask{nullptr, 0ull, select_topk <= 0.0 ? 0.0f : 1.0f};
  DeviceBuffer var;
  if (select_topk > 0.0 && select_topk < 1.0) {
    var = DeviceBuffer(size_t(n) * 4, stream);
    DeviceBuffer nonzero(8, stream);
    nonzero.zero();
    sce_variance_kernel<<<blocks, kThreads, 0, stream>>>(base.data, int(base.dtype), ex, n,
                                                         var.as<float>(), nonzero.as<unsigned long long>());
    FM_CUDA_LAUNCHED();
    unsigned long long nnz = 0;
    FM_CUDA_CHECK(cudaMemcpyAsync(&nnz, nonzero.as<void>(), 8, cudaMemcpyDeviceToHost, stream));
    FM_CUDA_CHECK(cudaStreamSynchronize(stream));
    const int64_t k = sce_keep_count(int64_t(nnz), select_topk);
    mask.var = var.as<float>();
    mask.boundary = k == 0 ? kKeepNone : kth_largest_cuda(n, k, VarComposite{var.as<float>()}, stream);
  }
  DeviceBuffer partial(size_t(blocks) * T * 8, stream);
  sce_squares_kernel<<<dim3(unsigned(blocks), unsigned(T)), kThreads, 0, stream>>>(
      base.data, int(base.dtype), ex, n, mask, partial.as<double>());
  FM_CUDA_LAUNCHED();
  std::vector<double> host(size_t(blocks) * T);
  FM_CUDA_CHECK(cudaMemcpyAsync(host.data(), partial.as<void>(), partial.bytes(), cudaMemcpyDeviceToHost, stream));
  FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> sum_squares(size_t(T), 0.0);
  for (int e = 0; e < T; ++e)
    for (int b = 0; b < blocks; ++b) sum_squares[size_t(e)] += host[size_t(e) * blocks + b];
  const std::vector<float> w = sce_weights(sum_squares, n);
  for (int e = 0; e < T; ++e) ex.factor[e] = w[size_t(e)];
  sce_output_kernel<<<blocks, kThreads, 0, stream>>>(base.data, int(base.dtype), ex, n, mask, out.data,
                                                     int(out.dtype));
  FM_CUDA_LAUNCHED();
}

void arcee_fusion_cuda(const TensorView& base, const TensorView& other, const TensorView& out,
                       int64_t row_len, StreamHandle stream_handle) {
  const int64_t n = check_consensus_inputs(base, {other}, out);
  if (n == 0) return;
  FM_CHECK(row_len >= 1 && n % row_len == 0, "row_len must divide numel");
  cudaStream_t stream = as_stream(stream_handle);
  const int64_t rows = n / row_len;
  DeviceBuffer kl(size_t(rows) * 4, stream), importance(size_t(n) * 4, stream), least(4, stream);
  arcee_kl_kernel<<<int(std::min<int64_t>(rows, 1 << 20)), kThreads, 0, stream>>>(
      base.data, int(base.dtype), other.data, int(other.dtype), rows, row_len, kl.as<float>());
  FM_CUDA_LAUNCHED();
  FM_CUDA_CHECK(cudaMemsetAsync(least.as<void>(), 0xff, 4, stream));
  const int blocks = grid_for(n, kThreads);
  arcee_importance_kernel<<<blocks, kThreads, 0, stream>>>(base.data, int(base.dtype), other.data,
                                                           int(other.dtype), n, row_len, kl.as<float>(),
                                                           importance.as<float>(), least.as<unsigned int>());
  FM_CUDA_LAUNCHED();
  const OrderValue fn{importance.as<float>()};
  auto quantile = [&](double q) {
    const int64_t rank = quantile_rank(q, n);  // ascending: the (n - rank)-th largest
    if (rank == 0) {
      unsigned int key = 0;
      FM_CUDA_CHECK(cudaMemcpyAsync(&key, least.as<void>(), 4, cudaMemcpyDeviceToHost, stream));
      FM_CUDA_CHECK(cudaStreamSynchronize(stream));
      return order_value(key);
    }
    return order_value(uint32_t(kth_largest_cuda(n, n - rank, fn, stream)));
  };
  const float q1 = quantile(0.25), median = quantile(0.5), q3 = quantile(0.75);
  arcee_output_kernel<<<blocks, kThreads, 0, stream>>>(base.data, int(base.dtype), other.data,
                                                       int(other.dtype), n, importance.as<float>(),
                                                       fusion_threshold(q1, median, q3), out.data,
                                                       int(out.dtype));
  FM_CUDA_LAUNCHED();
}

}  // namespace fastmerge
