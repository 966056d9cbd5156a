// CUDA batched SVD: one thread block per matrix (blocks loop over the batch), one-sided Jacobi
// with the round-robin ("circle") ordering so that a round's k/2 disjoint column pairs are
// rotated concurrently, one warp per pair. Dot products accumulate in double as on the CPU;
// every lane takes the warp's sums from lane 0, so the lanes agree on each rotation. Matrices
// with more than 64 columns get 32 warps per block instead of 8: a round's pairs are
// independent, so which warp rotates a pair does not change any result bit.
#include <algorithm>

#include "fastmerge/cuda_utils.cuh"
#include "svd.h"

namespace fastmerge {
namespace {

constexpr int kSmallThreads = 256;   // blocks for matrices of up to kSmallColumns columns
constexpr int kLargeThreads = 1024;  // and for wider ones
constexpr int64_t kSmallColumns = 64;
// Column count limit of the CUDA path: the per-column statistics live in shared memory.
constexpr int64_t kMaxCudaColumns = 2048;

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return __shfl_sync(0xffffffffu, v, 0);  // lane 0's sum, the same bits in every lane
}

// Pair `i` of round `round` in the circle ordering of `players` (even) columns; the last
// player stays fixed while the others rotate. Every pair meets once in players - 1 rounds.
__device__ __forceinline__ void circle_pair(int64_t round, int64_t i, int64_t players,
                                            int64_t* p, int64_t* q) {
  const int64_t ring = players - 1;
  int64_t a, b;
  if (i == 0) {
    a = round;
    b = ring;
  } else {
    a = (round + i) % ring;
    b = (round - i + ring) % ring;
  }
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// y = e_e - B B^T e_e for the first `count` columns of `basis` (each of length len),
// Gram-Schmidt twice. Called by the whole block; returns |y|^2 to every thread.
__device__ double canonical_residual(float* y, const float* basis, int64_t count, int64_t len,
                                     int64_t e, double* proj, double* norm2_slot) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = int(blockDim.x) >> 5;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) y[i] = i == e ? 1.0f : 0.0f;
  __syncthreads();
  for (int round = 0; round < 2; ++round) {
    for (int64_t j = warp; j < count; j += warps) {
      const float* bj = basis + j * len;
      double acc = 0.0;
      for (int64_t i = lane; i < len; i += 32) acc += double(bj[i]) * double(y[i]);
      acc = warp_sum(acc);
      if (lane == 0) proj[j] = acc;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      double value = y[i];
      for (int64_t j = 0; j < count; ++j) value -= proj[j] * double(basis[j * len + i]);
      y[i] = float(value);
    }
    __syncthreads();
  }
  if (warp == 0) {
    double acc = 0.0;
    for (int64_t i = lane; i < len; i += 32) acc += double(y[i]) * double(y[i]);
    acc = warp_sum(acc);
    if (lane == 0) *norm2_slot = acc;
  }
  __syncthreads();
  const double norm2 = *norm2_slot;
  __syncthreads();  // every thread has read the slot before the next call overwrites it
  return norm2;
}

struct Workspace {
  float* w;      // k columns of length len
  float* v;      // k columns of length k
  float* y;      // k sorted left singular vectors of length len
};

template <int kThreads>
__global__ void __launch_bounds__(kThreads)
jacobi_svd_kernel(const void* x, int x_dtype, int64_t batch, int64_t m, int64_t n, float* work,
                  float* u, float* s, float* vh) {
  extern __shared__ double shared[];
  const int64_t k = m < n ? m : n;
  const bool transposed = m < n;
  const int64_t len = transposed ? n : m;
  double* norm2 = shared;                                    // k
  double* proj = shared + k;                                 // k
  int* order = reinterpret_cast<int*>(shared + 2 * k);       // k
  __shared__ int rotated;
  __shared__ double residual_norm2;
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const double tol = jacobi_tolerance(len);
  const int64_t players = k + (k & 1);

  Workspace ws;
  ws.w = work + int64_t(blockIdx.x) * (2 * k * len + k * k);
  ws.y = ws.w + k * len;
  ws.v = ws.y + k * len;

  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const int64_t base = b * m * n;
    for (int64_t e = threadIdx.x; e < k * len; e += blockDim.x) {
      const int64_t j = e / len, i = e % len;
      ws.w[e] = load_element(x, x_dtype, base + (transposed ? j * n + i : i * n + j));
    }
    for (int64_t e = threadIdx.x; e < k * k; e += blockDim.x) ws.v[e] = e / k == e % k ? 1.0f : 0.0f;
    __syncthreads();
    for (int64_t j = warp; j < k; j += kWarps) {
      const float* col = ws.w + j * len;
      double acc = 0.0;
      for (int64_t i = lane; i < len; i += 32) acc += double(col[i]) * double(col[i]);
      acc = warp_sum(acc);
      if (lane == 0) norm2[j] = acc;
    }
    __syncthreads();

    for (int sweep = 0; sweep < kMaxJacobiSweeps; ++sweep) {
      if (threadIdx.x == 0) rotated = 0;
      __syncthreads();
      for (int64_t round = 0; round + 1 < players; ++round) {
        for (int64_t pair = warp; pair < players / 2; pair += kWarps) {
          int64_t p, q;
          circle_pair(round, pair, players, &p, &q);
          if (q >= k) continue;  // the idle slot of an odd column count
          float* wp = ws.w + p * len;
          float* wq = ws.w + q * len;
          double c = 0.0;
          for (int64_t i = lane; i < len; i += 32) c += double(wp[i]) * double(wq[i]);
          c = warp_sum(c);
          const double a = norm2[p], bq = norm2[q];
          if (c == 0.0 || fabs(c) <= tol * sqrt(a * bq)) continue;
          const JacobiRotation r = jacobi_rotation(a, bq, c);
          const float cs = float(r.cs), sn = float(r.sn);
          double sp = 0.0, sq = 0.0;
          for (int64_t i = lane; i < len; i += 32) {
            const float xa = wp[i], xb = wq[i];
            const float na = cs * xa - sn * xb, nb = sn * xa + cs * xb;
            wp[i] = na;
            wq[i] = nb;
            sp += double(na) * double(na);
            sq += double(nb) * double(nb);
          }
          sp = warp_sum(sp);
          sq = warp_sum(sq);
          float* vp = ws.v + p * k;
          float* vq = ws.v + q * k;
          for (int64_t i = lane; i < k; i += 32) {
            const float xa = vp[i], xb = vq[i];
            vp[i] = cs * xa - sn * xb;
            vq[i] = sn * xa + cs * xb;
          }
          if (lane == 0) {
            norm2[p] = sp;
            norm2[q] = sq;
            rotated = 1;
          }
        }
        __syncthreads();
      }
      const bool again = rotated != 0;
      __syncthreads();
      if (!again) break;
    }

    // Descending order, NaN last; ties keep column order (every rank distinct, so order[] is a
    // permutation even for NaN input).
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const double key = singular_sort_key(norm2[j]);
      int64_t rank = 0;
      for (int64_t i = 0; i < k; ++i) {
        const double other = singular_sort_key(norm2[i]);
        rank += other > key || (other == key && i < j);
      }
      order[rank] = int(j);
    }
    __syncthreads();
    const double sigma_max = sqrt(norm2[order[0]]);
    const double zero_below = double(zero_singular_threshold(len)) * sigma_max;
    for (int64_t e = threadIdx.x; e < k * len; e += blockDim.x) {
      const int64_t r = e / len, i = e % len;
      const double sigma = sqrt(norm2[order[r]]);
      if (sigma > zero_below && sigma > 0.0) ws.y[e] = float(double(ws.w[order[r] * len + i]) / sigma);
    }
    __syncthreads();
    // Completion of the (trailing) numerically zero columns, one at a time.
    int64_t cursor = 0;
    for (int64_t r = 0; r < k; ++r) {
      const double sigma = sqrt(norm2[order[r]]);
      if (sigma > zero_below && sigma > 0.0) continue;
      float* y = ws.y + r * len;
      const double accept = completion_acceptance(len, r);
      int64_t best = -1, held = -1;  // held: the canonical vector whose residual is in y
      double best_norm2 = -1.0;
      for (int64_t tries = 0; tries < len; ++tries) {
        const int64_t e = (cursor + tries) % len;
        const double norm2_y = canonical_residual(y, ws.y, r, len, e, proj, &residual_norm2);
        held = e;
        if (norm2_y > best_norm2) {
          best = e;
          best_norm2 = norm2_y;
        }
        if (norm2_y >= accept) break;
      }
      if (held != best) canonical_residual(y, ws.y, r, len, best, proj, &residual_norm2);
      const float inv = float(1.0 / sqrt(best_norm2));
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x) y[i] *= inv;
      cursor = best + 1;
      __syncthreads();
    }

    float* U = u + b * m * k;
    float* S = s + b * k;
    float* Vh = vh + b * k * n;
    for (int64_t r = threadIdx.x; r < k; r += blockDim.x) S[r] = float(sqrt(norm2[order[r]]));
    for (int64_t e = threadIdx.x; e < k * len; e += blockDim.x) {
      const int64_t r = e / len, i = e % len;
      if (!transposed) U[i * k + r] = ws.y[e];
      else Vh[r * n + i] = ws.y[e];
    }
    for (int64_t e = threadIdx.x; e < k * k; e += blockDim.x) {
      const int64_t r = e / k, i = e % k;
      const float value = ws.v[int64_t(order[r]) * k + i];
      if (!transposed) Vh[r * n + i] = value;
      else U[i * k + r] = value;
    }
    __syncthreads();
  }
}

}  // namespace

void batched_svd_cuda(const TensorView& x, const TensorView& u, const TensorView& s,
                      const TensorView& vh, StreamHandle stream_handle) {
  const int64_t k = check_svd_inputs(x, u, s, vh);
  const int64_t batch = x.shape[0], m = x.shape[1], n = x.shape[2];
  if (k == 0 || batch == 0) return;
  FM_CHECK(k <= kMaxCudaColumns, "batched_svd on CUDA handles min(m, n) <= ", kMaxCudaColumns,
           ", got ", k);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t len = std::max(m, n);
  // Enough blocks to fill the device, with their workspaces capped at 256 MB in all.
  const int64_t per_block = (2 * k * len + k * k) * int64_t(sizeof(float));
  const int64_t fit = std::max<int64_t>(1, (int64_t(256) << 20) / per_block);
  const int blocks = int(std::min({batch, int64_t(sm_count()) * 4, fit}));
  DeviceBuffer work(size_t(blocks) * size_t(per_block), stream);
  const size_t shared_bytes = size_t(k) * (2 * sizeof(double) + sizeof(int));
  const bool small = k <= kSmallColumns;
  const auto kernel = small ? jacobi_svd_kernel<kSmallThreads> : jacobi_svd_kernel<kLargeThreads>;
  if (shared_bytes > 48 * 1024)
    FM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(shared_bytes)));
  kernel<<<blocks, small ? kSmallThreads : kLargeThreads, shared_bytes, stream>>>(
      x.data, int(x.dtype), batch, m, n, work.as<float>(), u.ptr<float>(), s.ptr<float>(),
      vh.ptr<float>());
  FM_CUDA_LAUNCHED();
}

}  // namespace fastmerge
