// CUDA ToMe: the same canonical similarities as the CPU (sequential fp32 sums over c, built
// with --fmad=false), row max / argmax with the same tie-break, and the merge as the same
// ordered per-row reduction, so CUDA and CPU agree bit for bit. The N^2/4 scores live only in
// registers: each block owns 64 a-rows and streams all b-tokens through shared memory.
#include <cuda_runtime.h>

#include "fastmerge/cuda_utils.cuh"
#include "tome.h"

namespace fastmerge {

namespace {

constexpr int kTileA = 64, kTileB = 64, kTileC = 32, kThreads = 256;

// Eight lanes per token: lane l sums the squares of elements k = l (mod 8) in order, and the
// xor butterfly adds the partials as ((0+1)+(2+3))+((4+5)+(6+7)), tome_cpu.cpp's token_norm
// order, so the norm equals the CPU's; out = x / norm in fp32.
constexpr int kLanesPerToken = 8;

__global__ void normalize_tokens(const void* metric, int dtype, int64_t tokens, int64_t c,
                                 float* out) {
  const int sub = int(threadIdx.x) % kLanesPerToken;
  const int64_t t = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kLanesPerToken;
  double part = 0.0;  // lanes past the last token still join the shuffles
  if (t < tokens)
    for (int64_t k = sub; k < c; k += kLanesPerToken) {
      const double v = load_element(metric, dtype, t * c + k);
      part = __dadd_rn(part, __dmul_rn(v, v));
    }
  for (int offset = 1; offset < kLanesPerToken; offset <<= 1)
    part = __dadd_rn(part, __shfl_xor_sync(0xffffffffu, part, offset));
  if (t >= tokens) return;
  const float norm = float(sqrt(part));
  for (int64_t k = sub; k < c; k += kLanesPerToken)
    out[t * c + k] = load_element(metric, dtype, t * c + k) / norm;
}

__device__ __forceinline__ bool beats(float v, float best) {
  return v > best || (isnan(v) && !isnan(best));
}

// (v, j) ranks before (w, k): NaN first, then larger, then lower index.
__device__ __forceinline__ bool ranks_before(float v, int64_t j, float w, int64_t k) {
  if (isnan(v) != isnan(w)) return isnan(v);
  if (!isnan(v) && v != w) return v > w;
  return j < k;
}

// Block (a-tile, batch): 16 x 16 threads, each 4 rows (ty + 16 i) x 4 columns (tx + 16 j) of
// every b tile; per-thread best over its columns in ascending order, then a half-warp
// reduction per row.
__global__ void __launch_bounds__(kThreads)
    row_max(const float* normed, int64_t tokens, int64_t c, int64_t na, int64_t nb,
            int64_t b_begin, int64_t a_first, float* node_max, int64_t* node_idx) {
  __shared__ float as[kTileA][kTileC + 1];
  __shared__ float bs[kTileB][kTileC + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t batch = blockIdx.y;
  const int64_t a0 = a_first + int64_t(blockIdx.x) * kTileA;
  const float* base = normed + batch * tokens * c;
  float best[4];
  int64_t idx[4];
  for (int i = 0; i < 4; ++i) {
    best[i] = -INFINITY;
    idx[i] = 0;
  }
  for (int64_t b0 = (b_begin / kTileB) * kTileB; b0 < nb; b0 += kTileB) {
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (int64_t c0 = 0; c0 < c; c0 += kTileC) {
      for (int e = threadIdx.x; e < kTileA * kTileC; e += kThreads) {
        const int row = e / kTileC, k = e % kTileC;
        const int64_t ai = a0 + row, bj = b0 + row, kk = c0 + k;
        as[row][k] = (ai < na && kk < c) ? base[(2 * ai) * c + kk] : 0.0f;
        bs[row][k] = (bj < nb && kk < c) ? base[(2 * bj + 1) * c + kk] : 0.0f;
      }
      __syncthreads();
      const int kmax = int(c - c0 < kTileC ? c - c0 : kTileC);
      for (int k = 0; k < kmax; ++k) {
        float av[4], bv[4];
        for (int i = 0; i < 4; ++i) av[i] = as[ty + 16 * i][k];
        for (int j = 0; j < 4; ++j) bv[j] = bs[tx + 16 * j][k];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = __fadd_rn(acc[i][j], __fmul_rn(av[i], bv[j]));
      }
      __syncthreads();
    }
    for (int j = 0; j < 4; ++j) {
      const int64_t col = b0 + tx + 16 * j;
      if (col < b_begin || col >= nb) continue;
      for (int i = 0; i < 4; ++i)
        if (beats(acc[i][j], best[i])) {
          best[i] = acc[i][j];
          idx[i] = col;
        }
    }
  }
  for (int i = 0; i < 4; ++i) {
    float v = best[i];
    int64_t j = idx[i];
    for (int off = 8; off > 0; off >>= 1) {
      const float w = __shfl_xor_sync(0xffffffffu, v, off);
      const int64_t k = __shfl_xor_sync(0xffffffffu, j, off);
      if (ranks_before(w, k, v, j)) {
        v = w;
        j = k;
      }
    }
    const int64_t row = a0 + ty + 16 * i;
    if (tx == 0 && row < na) {
      node_max[batch * na + row] = v;
      node_idx[batch * na + row] = j;
    }
  }
}

__global__ void protect_class_token(int64_t batch, int64_t na, float* node_max,
                                    int64_t* node_idx) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  node_max[b * na] = -INFINITY;
  node_idx[b * na] = 0;
}

// Block (row, batch): threads over channels, members summed in their stored order.
__global__ void merge_rows(const void* x, int x_dtype, const void* size, int size_dtype,
                           const int64_t* offsets, const int64_t* members, int64_t tokens,
                           int64_t rows, int64_t c, void* out, int out_dtype, void* size_out,
                           int size_out_dtype, bool amax) {
  const int64_t o = blockIdx.x, batch = blockIdx.y;
  const int64_t* off = offsets + batch * (rows + 1);
  const int64_t* mem = members + batch * tokens;
  const int64_t p0 = off[o], p1 = off[o + 1];
  float weight = 0.0f;
  for (int64_t p = p0; p < p1; ++p) {
    const float w = size ? load_element(size, size_dtype, batch * tokens + mem[p]) : 1.0f;
    weight = p == p0 ? w : __fadd_rn(weight, w);
  }
  for (int64_t k = threadIdx.x; k < c; k += blockDim.x) {
    float acc = 0.0f;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t t = mem[p];
      const float v = load_element(x, x_dtype, (batch * tokens + t) * c + k);
      if (amax) {
        acc = p == p0 ? v : tome_max_step(acc, v);
      } else {
        const float w = size ? load_element(size, size_dtype, batch * tokens + t) : 1.0f;
        acc = p == p0 ? __fmul_rn(v, w) : __fadd_rn(acc, __fmul_rn(v, w));
      }
    }
    if (!amax) acc = __fdiv_rn(acc, weight);
    store_element(out, out_dtype, (batch * rows + o) * c + k, acc);
  }
  if (size_out && threadIdx.x == 0) store_element(size_out, size_out_dtype, batch * rows + o, weight);
}

}  // namespace

void tome_scores_cuda(const TensorView& metric, const TomeShape& s, const TensorView& normed,
                      const TensorView& node_max, const TensorView& node_idx,
                      StreamHandle stream) {
  const int64_t total = s.batch * s.tokens * s.channels;
  check_flat(metric, "metric", total);
  check_flat(normed, "normed", total);
  check_flat(node_max, "node_max", s.batch * s.na());
  check_flat(node_idx, "node_idx", s.batch * s.na());
  FM_CHECK(normed.dtype == DType::f32 && node_max.dtype == DType::f32 &&
               node_idx.dtype == DType::i64, "tome_scores buffer dtypes");
  FM_CHECK(metric.dtype != DType::u8 && metric.dtype != DType::i64,
           "metric must be float32, float16 or bfloat16");
  FM_CHECK(s.batch <= 65535, "at most 65535 batches on CUDA");
  // Zero channels still match (every score 0, as on the CPU): only no tokens means no work.
  if (s.batch == 0 || s.tokens == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t tokens = s.batch * s.tokens;
  normalize_tokens<<<unsigned((tokens * kLanesPerToken + 127) / 128), 128, 0, st>>>(
      metric.data, int(metric.dtype), tokens, s.channels, normed.ptr<float>());
  FM_CUDA_LAUNCHED();
  const int64_t first = s.class_token ? 1 : 0, rows = s.na() - first;
  if (rows > 0) {
    dim3 grid(unsigned((rows + kTileA - 1) / kTileA), unsigned(s.batch));
    row_max<<<grid, kThreads, 0, st>>>(normed.ptr<const float>(), s.tokens, s.channels, s.na(),
                                       s.nb(), s.distill_token ? 1 : 0, first,
                                       node_max.ptr<float>(), node_idx.ptr<int64_t>());
    FM_CUDA_LAUNCHED();
  }
  if (first && s.na() > 0) {
    protect_class_token<<<unsigned((s.batch + 127) / 128), 128, 0, st>>>(
        s.batch, s.na(), node_max.ptr<float>(), node_idx.ptr<int64_t>());
    FM_CUDA_LAUNCHED();
  }
}

void tome_merge_cuda(const TensorView& x, const TensorView* size, const TensorView& offsets,
                     const TensorView& members, const TensorView& out,
                     const TensorView* size_out, TomeReduce mode, StreamHandle stream) {
  check_merge_views(x, size, offsets, members, out, size_out);
  const int64_t B = x.shape[0], n = x.shape[1], c = x.shape[2], rows = out.shape[1];
  FM_CHECK(B <= 65535, "at most 65535 batches on CUDA");
  if (B == 0 || rows == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int threads = c >= 256 ? 256 : (c >= 64 ? 128 : 32);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(B));
  merge_rows<<<grid, threads, 0, st>>>(
      x.data, int(x.dtype), size ? size->data : nullptr, size ? int(size->dtype) : 0,
      offsets.ptr<const int64_t>(), members.ptr<const int64_t>(), n, rows, c, out.data,
      int(out.dtype), size_out ? size_out->data : nullptr,
      size_out ? int(size_out->dtype) : 0, mode == TomeReduce::max);
  FM_CUDA_LAUNCHED();
}

}  // namespace fastmerge
