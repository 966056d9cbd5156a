// CUDA passes of the sphere family: per-vector Gram matrices of the (delta) inputs as per-block
// (contiguous vectors) or per-thread (strided vectors) double partials, reduced on the host in a
// fixed order (no float atomics), the host coefficients shared with the CPU
// (sphere_scalars.cpp), then one output pass with the CPU's fp32 operations in the CPU's order.
#include <algorithm>
#include <vector>

#include "fastmerge/cuda_utils.cuh"
#include "sphere.h"

namespace fastmerge {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGramInputs = 8;      // per Gram launch; more inputs are tiled four by four
constexpr int kMaxCombineInputs = 64;  // inputs of one output pass
constexpr int64_t kColumnThreads = 1 << 16;  // threads (vector x row segment) of strided Grams

struct GramInputs {
  const void* base;
  int base_dtype;
  const void* x[kMaxGramInputs];
  int dtype[kMaxGramInputs];
};

struct CombineInputs {
  const void* base;
  int base_dtype;
  int count;
  const void* x[kMaxCombineInputs];
  int dtype[kMaxCombineInputs];
};


// The fp32 deltas x_e - base of element i, as doubles.
template <int T>
__device__ __forceinline__ void load_deltas(const GramInputs& in, int64_t i, double (&d)[T]) {
  const float b = in.base ? load_element(in.base, in.base_dtype, i) : 0.0f;
  for (int e = 0; e < T; ++e) {
    float x = load_element(in.x[e], in.dtype[e], i);
    if (in.base) x = x - b;
    d[e] = double(x);
  }
}

// Contiguous vectors: block (o, part) sums the upper-triangle products over its stride of
// vector o.
template <int T>
__global__ void row_gram_kernel(GramInputs in, int64_t len, int64_t parts, double* partial) {
  constexpr int kPairs = T * (T + 1) / 2;
  const int64_t o = blockIdx.x / parts, part = blockIdx.x % parts;
  double g[kPairs];
  for (int c = 0; c < kPairs; ++c) g[c] = 0.0;
  for (int64_t j = part * blockDim.x + threadIdx.x; j < len; j += parts * blockDim.x) {
    double d[T];
    load_deltas<T>(in, o * len + j, d);
    int c = 0;
    for (int x = 0; x < T; ++x)
      for (int y = x; y < T; ++y) g[c++] += d[x] * d[y];
  }
  block_reduce<kThreads>(g);
  if (threadIdx.x == 0)
    for (int c = 0; c < kPairs; ++c) partial[size_t(blockIdx.x) * kPairs + c] = g[c];
}

// Strided vectors: thread (segment, vector) sums its rows in order; neighbouring threads read
// neighbouring columns.
template <int T>
__global__ void column_gram_kernel(GramInputs in, VectorLayout L, int64_t rows_per,
                                   int64_t segments, double* partial) {
  constexpr int kPairs = T * (T + 1) / 2;
  const int64_t count = L.count();
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= count * segments) return;
  const int64_t v = tid % count, sgm = tid / count;
  const int64_t o = v / L.inner, i = v % L.inner;
  double g[kPairs];
  for (int c = 0; c < kPairs; ++c) g[c] = 0.0;
  const int64_t end = min(L.len, (sgm + 1) * rows_per);
  for (int64_t l = sgm * rows_per; l < end; ++l) {
    double d[T];
    load_deltas<T>(in, (o * L.len + l) * L.inner + i, d);
    int c = 0;
    for (int x = 0; x < T; ++x)
      for (int y = x; y < T; ++y) g[c++] += d[x] * d[y];
  }
  for (int c = 0; c < kPairs; ++c) partial[size_t(tid) * kPairs + c] = g[c];
}

__global__ void combine_kernel(CombineInputs in, VectorLayout L, int64_t total, bool per_vector,
                               const float* coef, void* out, int out_dtype) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float* c = coef + (per_vector ? L.vector_of(i) * in.count : 0);
    const float b = in.base ? load_element(in.base, in.base_dtype, i) : 0.0f;
    float acc = 0.0f;
    for (int e = 0; e < in.count; ++e) {
      float d = load_element(in.x[e], in.dtype[e], i);
      if (in.base) d = d - b;
      acc = e == 0 ? c[0] * d : acc + c[e] * d;
    }
    if (in.base) acc = b + acc;
    store_element(out, out_dtype, i, acc);
  }
}

template <int T>
void launch_gram(const GramInputs& in, const VectorLayout& L, bool rows, int64_t blocks,
                 int64_t parts_or_rows_per, int64_t segments, double* partial,
                 cudaStream_t stream) {
  FM_CHECK(blocks <= INT32_MAX, "sphere merge: ", blocks, " blocks exceed one launch");
  if (rows) {
    row_gram_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(in, L.len, parts_or_rows_per, partial);
  } else {
    column_gram_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(in, L, parts_or_rows_per, segments,
                                                                     partial);
  }
}

// Gram matrices (count x m x m, upper triangle filled) of the inputs xs[idx[0..m)].
std::vector<double> gram_subset(const TensorView* base, const std::vector<TensorView>& xs,
                                const std::vector<int>& idx, const VectorLayout& L,
                                cudaStream_t stream) {
  const int m = int(idx.size()), pairs = m * (m + 1) / 2;
  GramInputs in{};
  in.base = base ? base->data : nullptr;
  in.base_dtype = base ? int(base->dtype) : 0;
  for (int e = 0; e < m; ++e) {
    in.x[e] = xs[size_t(idx[size_t(e)])].data;
    in.dtype[e] = int(xs[size_t(idx[size_t(e)])].dtype);
  }
  const int64_t count = L.count();
  const bool rows = L.inner == 1;
  int64_t blocks, a, segments = 1, parts_total;
  if (rows) {
    const int64_t target = grid_for(L.numel(), kThreads);
    const int64_t parts = std::max<int64_t>(
        1, std::min<int64_t>((L.len + kThreads - 1) / kThreads, target / std::max<int64_t>(L.outer, 1)));
    blocks = L.outer * parts;
    a = parts;
    parts_total = parts;
  } else {
    const int64_t want = std::max<int64_t>(1, std::min<int64_t>(L.len, kColumnThreads / count));
    const int64_t rows_per = (L.len + want - 1) / want;
    segments = (L.len + rows_per - 1) / rows_per;
    blocks = (count * segments + kThreads - 1) / kThreads;
    a = rows_per;
    parts_total = segments;
  }
  const size_t partial_len = size_t(count * parts_total) * pairs;
  DeviceBuffer partial(partial_len * sizeof(double), stream);
  switch (m) {
    case 1: launch_gram<1>(in, L, rows, blocks, a, segments, partial.as<double>(), stream); break;
    case 2: launch_gram<2>(in, L, rows, blocks, a, segments, partial.as<double>(), stream); break;
    case 3: launch_gram<3>(in, L, rows, blocks, a, segments, partial.as<double>(), stream); break;
    case 4: launch_gram<4>(in, L, rows, blocks, a, segments, partial.as<double>(), stream); break;
    case 5: launch_gram<5>(in, L, rows, blocks, a, segments, partial.as<double>(), stream); break;
    case 6: launch_gram<6>(in, L, rows, blocks, a, segments, partial.as<double>(), stream); break;
    case 7: launch_gram<7>(in, L, rows, blocks, a, segments, partial.as<double>(), stream); break;
    default: launch_gram<8>(in, L, rows, blocks, a, segments, partial.as<double>(), stream); break;
  }
  FM_CUDA_LAUNCHED();
  std::vector<double> host(partial_len);
  FM_CUDA_CHECK(cudaMemcpyAsync(host.data(), partial.as<void>(), partial.bytes(),
                                cudaMemcpyDeviceToHost, stream));
  FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  // Reduce the parts of every vector in part order.
  std::vector<double> gram(size_t(count) * m * m, 0.0);
  for (int64_t v = 0; v < count; ++v) {
    double* g = gram.data() + size_t(v) * m * m;
    for (int64_t p = 0; p < parts_total; ++p) {
      // rows: block (o, part) = v * parts + p; columns: thread (segment p, vector v).
      const int64_t slot = rows ? v * parts_total + p : p * count + v;
      const double* s = host.data() + size_t(slot) * pairs;
      int c = 0;
      for (int x = 0; x < m; ++x)
        for (int y = x; y < m; ++y) g[x * m + y] += s[c++];
    }
  }
  return gram;
}

std::vector<double> gram_cuda(const TensorView* base, const std::vector<TensorView>& xs,
                              const VectorLayout& L, cudaStream_t stream) {
  const int n = int(xs.size());
  const int64_t count = L.count();
  std::vector<double> gram(size_t(count) * n * n, 0.0);
  // Groups of inputs whose Gram blocks one launch computes: all of them, or pairs of groups of
  // four (their union's Gram holds the cross block).
  const int group = n <= kMaxGramInputs ? n : kMaxGramInputs / 2;
  const int groups = (n + group - 1) / group;
  for (int ga = 0; ga < groups; ++ga)
    for (int gb = ga; gb < groups; ++gb) {
      std::vector<int> idx;
      for (int e = ga * group; e < std::min(n, (ga + 1) * group); ++e) idx.push_back(e);
      if (gb != ga)
        for (int e = gb * group; e < std::min(n, (gb + 1) * group); ++e) idx.push_back(e);
      const int m = int(idx.size());
      const std::vector<double> sub = gram_subset(base, xs, idx, L, stream);
      for (int64_t v = 0; v < count; ++v)
        for (int x = 0; x < m; ++x)
          for (int y = x; y < m; ++y) {
            const int gx = idx[size_t(x)], gy = idx[size_t(y)];
            const double value = sub[size_t(v) * m * m + x * m + y];
            gram[size_t(v) * n * n + gx * n + gy] = value;
            gram[size_t(v) * n * n + gy * n + gx] = value;
          }
    }
  return gram;
}

void combine_cuda(const TensorView* base, const std::vector<TensorView>& xs, const VectorLayout& L,
                  const std::vector<float>& coef, const TensorView& out, cudaStream_t stream) {
  const int n = int(xs.size());
  FM_CHECK(n <= kMaxCombineInputs, "the CUDA sphere merges take at most ", kMaxCombineInputs,
           " inputs, got ", n);
  FM_CHECK(int64_t(coef.size()) == L.count() * n, "one coefficient per vector and input");
  const int64_t total = out.numel();
  CombineInputs in{};
  in.base = base ? base->data : nullptr;
  in.base_dtype = base ? int(base->dtype) : 0;
  in.count = n;
  for (int e = 0; e < n; ++e) {
    in.x[e] = xs[size_t(e)].data;
    in.dtype[e] = int(xs[size_t(e)].dtype);
  }
  DeviceBuffer coef_dev(coef.size() * sizeof(float), stream);
  // Pageable source: the copy has left `coef` when cudaMemcpyAsync returns.
  FM_CUDA_CHECK(cudaMemcpyAsync(coef_dev.as<void>(), coef.data(), coef_dev.bytes(),
                                cudaMemcpyHostToDevice, stream));
  combine_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(
      in, L, total, L.count() > 1, coef_dev.as<float>(), out.data, int(out.dtype));
  FM_CUDA_LAUNCHED();
}

SphereBackend cuda_backend(StreamHandle handle) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(handle);
  SphereBackend be;
  be.gram = [stream](const TensorView* base, const std::vector<TensorView>& xs, const VectorLayout& L) {
    return gram_cuda(base, xs, L, stream);
  };
  be.combine = [stream](const TensorView* base, const std::vector<TensorView>& xs,
                        const VectorLayout& L, const std::vector<float>& coef, const TensorView& out) {
    combine_cuda(base, xs, L, coef, out, stream);
  };
  return be;
}

}  // namespace

void nuslerp_cuda(const TensorView* base, const TensorView& v0, const TensorView& v1,
                  const TensorView& out, const VectorLayout& layout, double t, double eps,
                  StreamHandle stream) {
  nuslerp_run(cuda_backend(stream), base, v0, v1, out, layout, t, eps);
}

bool multislerp_cuda(const TensorView* base, const std::vector<TensorView>& xs,
                     const TensorView& out, const std::vector<double>& weights, bool normalize,
                     double eps, StreamHandle stream) {
  return multislerp_run(cuda_backend(stream), base, xs, out, weights, normalize, eps);
}

void karcher_cuda(const std::vector<TensorView>& xs, const TensorView& out,
                  const std::vector<double>& alphas, int max_iter, double tol,
                  StreamHandle stream) {
  karcher_run(cuda_backend(stream), xs, out, alphas, max_iter, tol);
}

}  // namespace fastmerge
