// CUDA passes of kv_merge (see kvmerge.h). The similarities use kvmerge_cpu.cpp's arithmetic
// exactly (the same sets on both devices); a weight's squared distance is summed in another
// order (a warp butterfly), so merged values may differ from the CPU's in the last bit:
//   similarity_kernel  eight lanes per adjacent pair: fp64 dot and norms summed in the CPU's
//                      order (lane_sum in kvmerge_cpu.cpp), so both devices pick the same pairs;
//   count_kernel       one block per head: candidate count (integer block reduction);
//   select_kernel      one block per head: exact radix select of the removed-th largest pair
//                      key (shared-memory integer histograms), then the first token of every
//                      merging set by a two-level prefix sum;
//   merge_kernel       one warp per merging set: pivot = argmax score (lowest index on ties),
//                      Gaussian weights into a per-token scratch, then per-dimension fp64 sums
//                      in token order, rounded once.
// Integer atomics only (histogram counts); no float atomics, so results are deterministic.
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "fastmerge/cuda_utils.cuh"
#include "kvmerge.h"

namespace fastmerge {

namespace {

constexpr int kWarp = 32;
constexpr int kSelectThreads = 1024;
constexpr int kMergeThreads = 256;

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return __shfl_sync(0xffffffffu, v, 0);  // lane 0's value: one result for every lane
}

struct KernelParams {
  const void* keys;
  const void* values;
  const void* scores;
  float* sims;
  int keys_dtype, values_dtype, scores_dtype;
  int64_t batch_heads, seq, key_dim, value_dim, lo, hi;
  double eps, sigma;
};

__device__ __forceinline__ bool candidate(const KernelParams& p, const float* s, int64_t i) {
  return i >= p.lo && i + 1 < p.hi && double(s[i]) >= p.eps;
}

// kvmerge_cpu.cpp's lane_sum: partial sum l holds the terms j = l (mod 8) in order, and the
// eight partials are added as ((0+1)+(2+3))+((4+5)+(6+7)). Lane l of an aligned group of
// eight holds partial l; the xor butterfly reproduces that tree (addition commutes).
__device__ __forceinline__ double group8_sum(double v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  return v;
}

constexpr int kPairsPerWarp = kWarp / 8;

__global__ void similarity_kernel(KernelParams p) {
  const int64_t pairs = p.seq - 1;
  const int64_t total = p.batch_heads * pairs;
  const int lane = int(threadIdx.x) % kWarp, sub = lane % 8;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  // The loop bound is uniform across the warp, so every lane reaches the shuffles.
  for (int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
       w * kPairsPerWarp < total; w += warps) {
    const int64_t pair = w * kPairsPerWarp + lane / 8;
    const bool valid = pair < total;
    double ab = 0.0, aa = 0.0, bb = 0.0;
    if (valid) {
      const int64_t bh = pair / pairs, i = pair % pairs;
      const int64_t a = (bh * p.seq + i) * p.key_dim, b = a + p.key_dim;
      for (int64_t j = sub; j < p.key_dim; j += 8) {
        const double x = load_element(p.keys, p.keys_dtype, a + j);
        const double y = load_element(p.keys, p.keys_dtype, b + j);
        aa += x * x;
        ab += x * y;
        bb += y * y;
      }
    }
    ab = group8_sum(ab);
    aa = group8_sum(aa);
    bb = group8_sum(bb);
    if (valid && sub == 0) {
      const double norms = sqrt(aa) * sqrt(bb);
      p.sims[pair] = float(ab / (norms < kSimFloor ? kSimFloor : norms));  // std::max's NaN rule
    }
  }
}

__global__ void count_kernel(KernelParams p, int64_t* counts) {
  const int64_t bh = blockIdx.x, pairs = p.seq - 1;
  const float* s = p.sims + bh * pairs;
  double c[1] = {0.0};
  for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) c[0] += candidate(p, s, i) ? 1.0 : 0.0;
  block_reduce<256, 1>(c);  // integer-valued doubles: exact in any order
  if (threadIdx.x == 0) counts[bh] = int64_t(c[0]);
}

// Per head: threshold key of the removed-th best candidate, then set_begin[0..out_len].
__global__ void select_kernel(KernelParams p, int64_t removed, int64_t* set_begin,
                              int64_t* set_count) {
  __shared__ unsigned int hist[256];
  __shared__ unsigned long long prefix_s;
  __shared__ long long rank_s;
  __shared__ long long offsets[kSelectThreads + 1];
  const int64_t bh = blockIdx.x, pairs = p.seq - 1, out_len = p.seq - removed;
  const float* s = p.sims + bh * pairs;
  const int tid = int(threadIdx.x);
  unsigned long long mask = 0;
  if (tid == 0) {
    prefix_s = 0;
    rank_s = removed;
  }
  __syncthreads();
  if (removed > 0) {
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int d = tid; d < 256; d += blockDim.x) hist[d] = 0;
      __syncthreads();
      const unsigned long long prefix = prefix_s;
      // Similar keys share their leading bytes, so most lanes of a warp hit one bin: one
      // atomic per distinct bin and warp (the loop bound is warp-uniform for the match).
      const int lane = tid % kWarp;
      for (int64_t i0 = tid - lane; i0 < pairs; i0 += blockDim.x) {
        const int64_t i = i0 + lane;
        int bin = -1;
        if (i < pairs && candidate(p, s, i)) {
          const unsigned long long key = pair_rank_key(s[i], i);
          if ((key & mask) == prefix) bin = int((key >> shift) & 255u);
        }
        const unsigned peers = __match_any_sync(0xffffffffu, bin);
        if (bin >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], unsigned(__popc(peers)));
      }
      __syncthreads();
      if (tid == 0) {
        long long k = rank_s;
        for (int d = 255; d >= 0; --d) {
          if (static_cast<long long>(hist[d]) >= k) {
            prefix_s = prefix | (static_cast<unsigned long long>(d) << shift);
            break;
          }
          k -= hist[d];
        }
        rank_s = k;
      }
      mask |= 0xffull << shift;
      __syncthreads();
    }
  }
  const unsigned long long threshold = prefix_s;
  // A set starts at token 0 and after every pair that is not selected.
  const int64_t per_thread = (pairs + blockDim.x - 1) / blockDim.x;
  const int64_t i0 = min(pairs, int64_t(tid) * per_thread), i1 = min(pairs, i0 + per_thread);
  auto starts_after = [&](int64_t i) {
    return !(removed > 0 && candidate(p, s, i) && pair_rank_key(s[i], i) >= threshold);
  };
  long long mine = 0;
  for (int64_t i = i0; i < i1; ++i) mine += starts_after(i) ? 1 : 0;
  offsets[tid + 1] = mine;
  __syncthreads();
  if (tid == 0) {
    offsets[0] = 1;  // set 0 begins at token 0
    for (int t = 1; t <= int(blockDim.x); ++t) offsets[t] += offsets[t - 1];
  }
  __syncthreads();
  int64_t* begin = set_begin + bh * (out_len + 1);
  int64_t g = offsets[tid];
  for (int64_t i = i0; i < i1; ++i)
    if (starts_after(i) && g < out_len) begin[g++] = i + 1;
  if (tid == 0) {
    begin[0] = 0;
    begin[out_len] = p.seq;
    set_count[bh] = offsets[blockDim.x];
  }
}

__global__ void merge_kernel(KernelParams p, int64_t out_len, const int64_t* set_begin,
                             double* weights, void* keys_out, int keys_out_dtype, void* values_out,
                             int values_out_dtype, int64_t* positions) {
  const int lane = int(threadIdx.x) % kWarp;
  const int64_t total = p.batch_heads * out_len;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  const double two_sigma2 = 2.0 * p.sigma * p.sigma;
  for (int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; w < total; w += warps) {
    const int64_t bh = w / out_len, g = w % out_len;
    const int64_t a = set_begin[bh * (out_len + 1) + g], e = set_begin[bh * (out_len + 1) + g + 1];
    const int64_t base = bh * p.seq;
    if (e - a == 1) {  // not merged: an exact copy
      for (int64_t j = lane; j < p.key_dim; j += kWarp)
        store_element(keys_out, keys_out_dtype, w * p.key_dim + j,
                      load_element(p.keys, p.keys_dtype, (base + a) * p.key_dim + j));
      for (int64_t j = lane; j < p.value_dim; j += kWarp)
        store_element(values_out, values_out_dtype, w * p.value_dim + j,
                      load_element(p.values, p.values_dtype, (base + a) * p.value_dim + j));
      if (positions && lane == 0) positions[w] = a;
      continue;
    }
    // pivot: highest score, NaN as -inf, lowest index on ties
    float best = -INFINITY;
    int64_t pivot = -1;
    for (int64_t i = a + lane; i < e; i += kWarp) {
      float sc = load_element(p.scores, p.scores_dtype, base + i);
      if (isnan(sc)) sc = -INFINITY;
      if (pivot < 0 || sc > best) best = sc, pivot = i;
    }
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, offset);
      const long long op = __shfl_xor_sync(0xffffffffu, (long long)pivot, offset);
      const bool take = op >= 0 && (pivot < 0 || ob > best || (ob == best && op < pivot));
      if (take) best = ob, pivot = op;
    }
    // Gaussian weights, one per token, and their sum in token order
    double den = 0.0;
    for (int64_t i = a; i < e; ++i) {
      double d2 = 0.0;
      for (int64_t j = lane; j < p.key_dim; j += kWarp) {
        const double d = double(load_element(p.keys, p.keys_dtype, (base + i) * p.key_dim + j)) -
                         double(load_element(p.keys, p.keys_dtype, (base + pivot) * p.key_dim + j));
        d2 += d * d;
      }
      d2 = warp_sum(d2);
      const double wi = gaussian_weight(i == pivot, d2, two_sigma2);
      den += wi;
      if (lane == 0) weights[base + i] = wi;
    }
    __syncwarp();
    for (int64_t j = lane; j < p.key_dim; j += kWarp) {
      double acc = 0.0;
      for (int64_t i = a; i < e; ++i)
        acc += weights[base + i] * double(load_element(p.keys, p.keys_dtype, (base + i) * p.key_dim + j));
      store_element(keys_out, keys_out_dtype, w * p.key_dim + j, float(acc / den));
    }
    for (int64_t j = lane; j < p.value_dim; j += kWarp) {
      double acc = 0.0;
      for (int64_t i = a; i < e; ++i)
        acc += weights[base + i] *
               double(load_element(p.values, p.values_dtype, (base + i) * p.value_dim + j));
      store_element(values_out, values_out_dtype, w * p.value_dim + j, float(acc / den));
    }
    if (positions && lane == 0) positions[w] = pivot;
  }
}

KernelParams kernel_params(const TensorView& keys, const TensorView* values,
                           const TensorView* scores, const TensorView& sims,
                           const KvMergeParams& p) {
  KernelParams k{};
  k.keys = keys.data;
  k.keys_dtype = int(keys.dtype);
  k.values = values ? values->data : nullptr;
  k.values_dtype = values ? int(values->dtype) : 0;
  k.scores = scores ? scores->data : nullptr;
  k.scores_dtype = scores ? int(scores->dtype) : 0;
  k.sims = sims.ptr<float>();
  k.batch_heads = p.batch_heads;
  k.seq = p.seq;
  k.key_dim = p.key_dim;
  k.value_dim = p.value_dim;
  k.lo = p.lo;
  k.hi = p.hi;
  k.eps = p.eps;
  k.sigma = p.sigma;
  return k;
}

}  // namespace

int64_t kv_merge_plan_cuda(const TensorView& keys, const TensorView& sims, const KvMergeParams& p,
                           StreamHandle stream_handle) {
  const int64_t S = p.seq, pairs = S - 1;
  check_plan_views(keys, sims, p);
  FM_CHECK(p.batch_heads < (int64_t(1) << 31), "kv_merge: too many (batch, head) pairs");
  if (p.batch_heads == 0) return std::max<int64_t>(p.target, 0);  // a zero-block grid fails
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const KernelParams k = kernel_params(keys, nullptr, nullptr, sims, p);
  const int threads = 256;
  similarity_kernel<<<grid_for(p.batch_heads * pairs * 8, threads), threads, 0, stream>>>(k);
  FM_CUDA_LAUNCHED();
  DeviceBuffer counts(size_t(p.batch_heads) * sizeof(int64_t), stream);
  count_kernel<<<unsigned(p.batch_heads), 256, 0, stream>>>(k, counts.as<int64_t>());
  FM_CUDA_LAUNCHED();
  std::vector<int64_t> host(size_t(p.batch_heads));
  FM_CUDA_CHECK(cudaMemcpyAsync(host.data(), counts.as<int64_t>(), counts.bytes(),
                                cudaMemcpyDeviceToHost, stream));
  FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  int64_t removed = p.target;
  for (int64_t c : host) removed = std::min(removed, c);
  return std::max<int64_t>(removed, 0);
}

void kv_merge_apply_cuda(const TensorView& keys, const TensorView& values,
                         const TensorView& scores, const TensorView& sims,
                         const KvMergeParams& p, int64_t removed, const TensorView& keys_out,
                         const TensorView& values_out, int64_t* positions,
                         StreamHandle stream_handle) {
  const int64_t S = p.seq, BH = p.batch_heads, out_len = S - removed;
  check_apply_views(keys, values, scores, sims, p, removed, keys_out, values_out);
  FM_CHECK(BH < (int64_t(1) << 31), "kv_merge: too many (batch, head) pairs");
  if (BH == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const KernelParams k = kernel_params(keys, &values, &scores, sims, p);
  DeviceBuffer set_begin(size_t(BH * (out_len + 1)) * sizeof(int64_t), stream);
  DeviceBuffer set_count(size_t(BH) * sizeof(int64_t), stream);
  select_kernel<<<unsigned(BH), kSelectThreads, 0, stream>>>(k, removed, set_begin.as<int64_t>(),
                                                             set_count.as<int64_t>());
  FM_CUDA_LAUNCHED();
  // A `removed` the plan did not give would leave set bounds unwritten and send the merge out of
  // bounds: check the set counts first, as the CPU does (one small copy and a sync).
  std::vector<int64_t> counts(static_cast<size_t>(BH));
  FM_CUDA_CHECK(cudaMemcpyAsync(counts.data(), set_count.as<int64_t>(), set_count.bytes(),
                                cudaMemcpyDeviceToHost, stream));
  FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (int64_t bh = 0; bh < BH; ++bh)
    FM_CHECK(counts[size_t(bh)] == out_len, "kv_merge: head ", bh, " has ", counts[size_t(bh)],
             " sets, expected ", out_len);
  DeviceBuffer weights(size_t(BH * S) * sizeof(double), stream);
  merge_kernel<<<grid_for(BH * out_len * kWarp, kMergeThreads), kMergeThreads, 0, stream>>>(
      k, out_len, set_begin.as<int64_t>(), weights.as<double>(), keys_out.data,
      int(keys_out.dtype), values_out.data, int(values_out.dtype), positions);
  FM_CUDA_LAUNCHED();
}

}  // namespace fastmerge
