// CUDA launcher of the fused GTA merge, with the semantics of gta_cpu.cpp (shared plan in
// gta_plan.cpp). Exact top-k on the device: a 15-bit histogram of magnitude keys finds the bin
// holding the k-th largest, a histogram of that bin's low 16 key bits gives its exact key, and
// the ties at that key are ranked by index. DELLA's per-row ranks come from a segmented radix
// sort (CUB). L1 norms are exact integer sums per exponent, so no result depends on thread
// order.
#include <cub/cub.cuh>  // segmented sort for DELLA's ranks

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "fastmerge/cuda_utils.cuh"
#include "fastmerge/philox.h"
#include "gta.h"
#include "gta_cuda.cuh"
#include "gta_plan.h"

namespace fastmerge {

double exact_bins_to_double(const unsigned long long* bins) {
  if (bins[256]) return std::nan("");
  if (bins[255]) return INFINITY;
  double sum = 0.0;
  for (int e = 254; e >= 0; --e)
    if (bins[e]) sum += std::ldexp(double(bins[e]), std::max(e, 1) - 150);
  return sum;
}

namespace {

constexpr int kThreads = 256;
constexpr int kHistShift = 16;                   // bin = key >> 16 (sign bit is always 0)
constexpr int kHistBins = 1 << (31 - kHistShift);  // 32768
// DELLA's rank groups are sorted at most this many elements at a time (24 bytes of scratch
// each: 3 GiB), which keeps CUB's int item count and the scratch in bounds on any tensor.
// FASTMERGE_DELLA_CHUNK_ITEMS sets a smaller chunk (for the tests of the chunking).
int64_t della_chunk_items() {
  constexpr int64_t kDefault = int64_t(1) << 27;
  const char* text = std::getenv("FASTMERGE_DELLA_CHUNK_ITEMS");
  const long long value = text ? std::atoll(text) : 0;
  return value > 0 && value < kDefault ? int64_t(value) : kDefault;
}

struct Pair {
  const void* base;
  int base_dtype;  // -1: no base
  const void* expert;
  int expert_dtype;
};

__device__ __forceinline__ float delta_at(const Pair& p, int64_t i) {
  const float e = load_element(p.expert, p.expert_dtype, i);
  return p.base_dtype < 0 ? e : e - load_element(p.base, p.base_dtype, i);
}

// ---- pass A: histogram of key bins ----

// kSharedBins: counted per block in 128 KiB of shared memory, then added to hist (GPUs that
// grant a block that much: sm_80, sm_90, sm_100); otherwise straight into hist. The counts are
// integers, so both give the same histogram.
template <bool kSharedBins>
__global__ void histogram_kernel(Pair p, int64_t n, unsigned int* hist) {
  extern __shared__ unsigned int shared_hist[];
  unsigned int* bins = kSharedBins ? shared_hist : hist;
  if (kSharedBins) {
    for (int b = threadIdx.x; b < kHistBins; b += blockDim.x) shared_hist[b] = 0;
    __syncthreads();
  }
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t bin = magnitude_key(delta_at(p, i)) >> kHistShift;
    // Magnitudes cluster in few bins: one atomic per distinct bin in the warp, not per lane.
    const unsigned same = __match_any_sync(__activemask(), bin);
    if ((threadIdx.x & 31) == unsigned(__ffs(same) - 1)) atomicAdd(&bins[bin], unsigned(__popc(same)));
  }
  if (kSharedBins) {
    __syncthreads();
    for (int b = threadIdx.x; b < kHistBins; b += blockDim.x)
      if (shared_hist[b]) atomicAdd(&hist[b], shared_hist[b]);
  }
}

constexpr size_t kHistSharedBytes = size_t(kHistBins) * sizeof(unsigned int);  // 128 KiB

// Whether the current device grants a block the shared histogram (sm_86, sm_89 and sm_120
// stop at 99 KiB). FASTMERGE_GTA_GLOBAL_HISTOGRAM=1 forces the global one (for its tests).
bool shared_histogram_fits() {
  const char* force_global = std::getenv("FASTMERGE_GTA_GLOBAL_HISTOGRAM");
  if (force_global && force_global[0] == '1') return false;
  int device = 0, optin = 0;
  FM_CUDA_CHECK(cudaGetDevice(&device));
  FM_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return size_t(optin) >= kHistSharedBytes;
}

// ---- pass B: the low 16 key bits inside the boundary bin (exact key of the k-th) ----

struct Refine {
  uint32_t bin;      // key >> kHistShift of the boundary bin
  unsigned* hist;    // kHistBins2 counts of key & 0xffff
};
constexpr int kHistBins2 = 1 << kHistShift;

__device__ __forceinline__ void count_low_bits(uint32_t key, const Refine& r) {
  const bool mine = (key >> kHistShift) == r.bin;
  const unsigned active = __activemask();
  if (!__any_sync(active, mine)) return;  // most warps hold no element of the bin
  const uint32_t tag = mine ? (key & 0xffffu) : 0xffffffffu;
  const unsigned same = __match_any_sync(active, tag);
  if (mine && int(threadIdx.x & 31) == __ffs(same) - 1) atomicAdd(&r.hist[tag], unsigned(__popc(same)));
}

__global__ void refine_kernel(Pair p, int64_t n, Refine a, Refine b, int targets) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t key = magnitude_key(delta_at(p, i));
    count_low_bits(key, a);
    if (targets > 1) count_low_bits(key, b);
  }
}

// ---- pass C: ties on the exact key, counted per index chunk (lowest indices are kept) ----

// Sum over the block (every thread gets it); blockDim.x a multiple of 32, at most 1024.
__device__ unsigned block_sum(unsigned value) {
  __shared__ unsigned warp_sums[32];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  __syncthreads();  // warp_sums may still be read from a previous call
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = value;
  __syncthreads();
  unsigned total = 0;
  for (int w = 0; w < int(blockDim.x >> 5); ++w) total += warp_sums[w];
  return total;
}

constexpr int kTieChunkShift = 16;

// One block per chunk of 2^16 indices: counts[chunk] = elements of the chunk with the key
// (a fixed block reduction, no atomics).
__global__ void tie_count_kernel(Pair p, int64_t n, uint32_t key_a, unsigned* counts_a,
                                 uint32_t key_b, unsigned* counts_b, int targets) {
  const int64_t begin = int64_t(blockIdx.x) << kTieChunkShift;
  const int64_t end = begin + (int64_t(1) << kTieChunkShift) < n ? begin + (int64_t(1) << kTieChunkShift) : n;
  unsigned mine_a = 0, mine_b = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const uint32_t key = magnitude_key(delta_at(p, i));
    mine_a += key == key_a;
    mine_b += key == key_b;
  }
  const unsigned total_a = block_sum(mine_a);
  const unsigned total_b = targets > 1 ? block_sum(mine_b) : 0u;
  if (threadIdx.x == 0) {
    counts_a[blockIdx.x] = total_a;
    if (targets > 1) counts_b[blockIdx.x] = total_b;
  }
}

// One block walks one chunk in index order and writes the index of its rank-th tie (0-based).
__global__ void tie_index_kernel(Pair p, int64_t n, uint32_t key, int64_t chunk, int64_t rank,
                                 unsigned long long* index_out) {
  __shared__ unsigned warp_counts[32];
  __shared__ long long remaining;
  if (threadIdx.x == 0) remaining = rank;
  const int64_t begin = chunk << kTieChunkShift;
  const int64_t end = begin + (int64_t(1) << kTieChunkShift) < n ? begin + (int64_t(1) << kTieChunkShift) : n;
  const int lane = int(threadIdx.x & 31), warp = int(threadIdx.x >> 5), warps = int(blockDim.x >> 5);
  for (int64_t tile = begin; tile < end; tile += blockDim.x) {
    const int64_t i = tile + threadIdx.x;
    const bool tie = i < end && magnitude_key(delta_at(p, i)) == key;
    const unsigned ballot = __ballot_sync(0xffffffffu, tie);
    if (lane == 0) warp_counts[warp] = unsigned(__popc(ballot));
    __syncthreads();
    const long long left = remaining;
    if (left < 0) return;  // found in an earlier tile (uniform across the block)
    long long before = 0;
    for (int w = 0; w < warp; ++w) before += warp_counts[w];
    long long total = before;
    for (int w = warp; w < warps; ++w) total += warp_counts[w];
    if (tie) {
      const long long mine = before + __popc(ballot & ((1u << lane) - 1));
      if (mine == left) *index_out = (unsigned long long)i;
    }
    __syncthreads();
    if (threadIdx.x == 0) remaining = left < total ? -1 : left - total;
    __syncthreads();
  }
}

// ---- exact L1 of |delta| over a top-k range and over everything (rescaled top-k experts) ----

__global__ void topk_l1_kernel(Pair p, int64_t n, unsigned long long keep_from,
                               unsigned long long drop_from, unsigned long long* all,
                               unsigned long long* kept) {
  __shared__ unsigned long long s_all[kExactBins], s_kept[kExactBins];
  for (int k = threadIdx.x; k < kExactBins; k += blockDim.x) s_all[k] = s_kept[k] = 0;
  __syncthreads();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float d = delta_at(p, i);
    const unsigned long long c = composite_key(magnitude_key(d), i);
    int e;
    unsigned long long significand;
    exact_bin(d, &e, &significand);
    add_exact(s_all, e, unsigned(significand));
    add_exact(s_kept, e, (c >= keep_from && c < drop_from) ? unsigned(significand) : 0u);
  }
  __syncthreads();
  for (int k = threadIdx.x; k < kExactBins; k += blockDim.x) {
    if (s_all[k]) atomicAdd(&all[k], s_all[k]);
    if (s_kept[k]) atomicAdd(&kept[k], s_kept[k]);
  }
}

// ---- random masks: exact L1 before and after the mask ----

__global__ void random_l1_kernel(Pair p, int64_t n, RandomStream stream, float keep_prob,
                                 const float* della_prob, unsigned long long* all,
                                 unsigned long long* kept) {
  __shared__ unsigned long long s_all[kExactBins], s_kept[kExactBins];
  for (int b = threadIdx.x; b < kExactBins; b += blockDim.x) s_all[b] = s_kept[b] = 0;
  __syncthreads();
  const int64_t quads = (n + 3) / 4;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < quads;
       q += int64_t(gridDim.x) * blockDim.x) {
    const Philox4 r = philox_block(stream, q);
    for (int w = 0; w < 4; ++w) {
      const int64_t i = 4 * q + w;
      if (i >= n) break;
      const float d = delta_at(p, i);
      int bin;
      unsigned long long significand;
      exact_bin(d, &bin, &significand);
      const float prob = della_prob ? della_prob[i] : keep_prob;
      add_exact(s_all, bin, unsigned(significand));
      add_exact(s_kept, bin, word_to_uniform(r.v[w]) < prob ? unsigned(significand) : 0u);
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kExactBins; b += blockDim.x) {
    if (s_all[b]) atomicAdd(&all[b], s_all[b]);
    if (s_kept[b]) atomicAdd(&kept[b], s_kept[b]);
  }
}

// ---- DELLA: keep probabilities from ranks within each rank group ----

// Rank groups [group0, group0 + groups) of L elements each; keys and positions are indexed
// within the chunk.
__global__ void della_keys_kernel(Pair p, int64_t L, int64_t I, int64_t group0, int64_t groups,
                                  unsigned long long* keys, uint32_t* positions) {
  const int64_t total = groups * L;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < total;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t group = group0 + g / L, j = g % L;
    const int64_t o = group / I, c = group % I;
    const int64_t i = o * L * I + j * I + c;
    keys[g] = composite_key(magnitude_key(delta_at(p, i)), j);
    positions[g] = uint32_t(j);
  }
}

__global__ void della_probs_kernel(const uint32_t* sorted_positions, int64_t L, int64_t I,
                                   int64_t group0, int64_t groups, float prob_base,
                                   float prob_span, float* prob) {
  const int64_t total = groups * L;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < total;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t group = group0 + g / L, r = g % L;
    const int64_t o = group / I, c = group % I;
    const int64_t j = sorted_positions[g];
    const float rank_norm = L > 1 ? float(r) / float(L - 1) : 0.5f;
    prob[o * L * I + j * I + c] = prob_base + (rank_norm * 2.0f) * prob_span;
  }
}

// ---- the merge pass ----

__device__ __forceinline__ bool in_range(uint64_t c, uint64_t from, uint64_t to) {
  return c >= from && c < to;
}

// Whether element i (delta d, uniform u) survives expert x's mask.
__device__ __forceinline__ bool kept_at(const GtaExpertDev& x, float d, int64_t i, float u) {
  switch (x.kind) {
    case int(MaskKind::keep_all): return true;
    case int(MaskKind::drop_all): return false;
    case int(MaskKind::topk_range): return in_range(composite_key(magnitude_key(d), i), x.keep_from, x.drop_from);
    case int(MaskKind::bernoulli): return u < x.keep_prob;
    default: return u < x.prob[i];
  }
}

// The merged value of element w from the contributions v[t][w]: sign election (or the plain
// sum), normalisation, lambda, plus base, in the CPU's operation order (combine_element).
template <int kMaxExperts, int W>
__device__ __forceinline__ float combine_at(const float (&v)[kMaxExperts][W], int w,
                                            const GtaMergeArgs& m, const GtaExpertDev* experts,
                                            float base) {
  float mixed, divisor;
  if (m.consensus == int(Consensus::none)) {
    mixed = v[0][w];
#pragma unroll
    for (int t = 1; t < kMaxExperts; ++t)
      if (t < m.experts) mixed += v[t][w];
    divisor = m.normalize ? m.divisor : 1.0f;
  } else {
    float vote = 0.0f;
#pragma unroll
    for (int t = 0; t < kMaxExperts; ++t)
      if (t < m.experts)
        vote += m.consensus == int(Consensus::sum) ? v[t][w]
                                                   : float(v[t][w] > 0.0f) - float(v[t][w] < 0.0f);
    const float majority = vote >= 0.0f ? 1.0f : -1.0f;
    mixed = 0.0f;
    float agreeing = 0.0f;
#pragma unroll
    for (int t = 0; t < kMaxExperts; ++t) {
      if (t >= m.experts) break;
      const bool agree = v[t][w] * majority > 0.0f;
      mixed += agree ? v[t][w] * experts[t].mix_weight : 0.0f;
      agreeing += agree ? experts[t].divisor_weight : 0.0f;
    }
    divisor = m.normalize && agreeing != 0.0f ? agreeing : 1.0f;
  }
  return base + (mixed / divisor) * m.lambda;
}

template <int kMaxExperts>
__global__ void merge_kernel(GtaMergeArgs m, const GtaExpertDev* experts) {
  const int64_t quads = (m.n + 3) / 4;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < quads;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i0 = 4 * q;
    const int count = int(m.n - i0 < 4 ? m.n - i0 : 4);
    float b[4];
    for (int w = 0; w < 4; ++w)
      b[w] = (w < count && m.base_dtype >= 0) ? load_element(m.base, m.base_dtype, i0 + w) : 0.0f;
    float v[kMaxExperts][4];
#pragma unroll
    for (int t = 0; t < kMaxExperts; ++t) {
      if (t >= m.experts) break;
      const GtaExpertDev x = experts[t];
      float u[4] = {0.f, 0.f, 0.f, 0.f};
      if (x.kind == int(MaskKind::bernoulli) || x.kind == int(MaskKind::della)) {
        const Philox4 r = philox_block(make_stream(m.seed, m.stream, uint32_t(t)), q);
        for (int w = 0; w < 4; ++w) u[w] = word_to_uniform(r.v[w]);
      }
      for (int w = 0; w < 4; ++w) {
        if (w >= count) {
          v[t][w] = 0.0f;
          continue;
        }
        const int64_t i = i0 + w;
        const float d = load_element(x.data, x.dtype, i) - b[w];
        v[t][w] = kept_at(x, d, i, u[w]) ? (d * x.scale) * x.weight : 0.0f;
      }
    }
    for (int w = 0; w < count; ++w)
      store_element(m.out, m.out_dtype, i0 + w, combine_at(v, w, m, experts, b[w]));
  }
}

// The merge for base, experts and out of one storage type S, 16-byte aligned, with at most
// kMaxExperts experts: each thread loads 16 bytes (V elements) of every tensor at once.
// Same per-element operations as merge_kernel.
template <typename S, int kMaxExperts>
__global__ void merge_vec_kernel(GtaMergeArgs m, const GtaExpertDev* experts_global) {
  constexpr int V = 16 / int(sizeof(S));
  __shared__ GtaExpertDev experts[kMaxExperts];
  for (int t = threadIdx.x; t < m.experts; t += blockDim.x) experts[t] = experts_global[t];
  __syncthreads();
  const int64_t vectors = m.n / V;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < vectors;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i0 = q * V;
    S raw[V];
    float b[V];
    if (m.base != nullptr) {
      *reinterpret_cast<uint4*>(raw) = *reinterpret_cast<const uint4*>(static_cast<const S*>(m.base) + i0);
#pragma unroll
      for (int w = 0; w < V; ++w) b[w] = to_float(raw[w]);
    } else {
#pragma unroll
      for (int w = 0; w < V; ++w) b[w] = 0.0f;  // no base: the deltas are the experts
    }
    float v[kMaxExperts][V];
#pragma unroll
    for (int t = 0; t < kMaxExperts; ++t) {
      if (t >= m.experts) break;
      const GtaExpertDev& x = experts[t];
      *reinterpret_cast<uint4*>(raw) = *reinterpret_cast<const uint4*>(static_cast<const S*>(x.data) + i0);
      float u[V];
      if (x.kind == int(MaskKind::bernoulli) || x.kind == int(MaskKind::della)) {
        const RandomStream rs = make_stream(m.seed, m.stream, uint32_t(t));
#pragma unroll
        for (int quad = 0; quad < V / 4; ++quad) {
          const Philox4 r = philox_block(rs, i0 / 4 + quad);
#pragma unroll
          for (int w = 0; w < 4; ++w) u[4 * quad + w] = word_to_uniform(r.v[w]);
        }
      }
#pragma unroll
      for (int w = 0; w < V; ++w) {
        const int64_t i = i0 + w;
        const float d = to_float(raw[w]) - b[w];
        v[t][w] = kept_at(x, d, i, u[w]) ? (d * x.scale) * x.weight : 0.0f;
      }
    }
#pragma unroll
    for (int w = 0; w < V; ++w) raw[w] = from_float<S>(combine_at(v, w, m, experts, b[w]));
    *reinterpret_cast<uint4*>(static_cast<S*>(m.out) + i0) = *reinterpret_cast<const uint4*>(raw);
  }
}

template <typename S>
bool launch_merge_vec(const GtaMergeArgs& m, const GtaExpertDev* dev, cudaStream_t stream) {
  constexpr int V = 16 / int(sizeof(S));
  const int grid = grid_for(m.n / V, kThreads);
  if (m.experts <= 4) merge_vec_kernel<S, 4><<<grid, kThreads, 0, stream>>>(m, dev);
  else if (m.experts <= 8) merge_vec_kernel<S, 8><<<grid, kThreads, 0, stream>>>(m, dev);
  else return false;
  return true;
}

Pair pair_of(const TensorView* base, const TensorView& expert) {
  return Pair{base ? base->data : nullptr, base ? int(base->dtype) : -1, expert.data, int(expert.dtype)};
}

// One top-k selection to resolve on the device (one side of one expert).
struct DeviceSelection {
  int expert;
  bool keep_side;
  int64_t k;
  uint32_t bin = 0;       // histogram bin holding the k-th largest
  int64_t above = 0;      // elements with larger keys (higher bins, then larger low bits)
  uint32_t key = 0;       // exact key of the k-th largest
  int64_t ties = 0;       // elements with that key
  int64_t tie_rank = 0;   // the k-th is the tie_rank-th (0-based) tie in index order
};

}  // namespace

GtaDevicePlan gta_prepare_cuda(const TensorView* base, const std::vector<TensorView>& experts,
                               const GtaParams& params, int64_t n, cudaStream_t stream) {
  GtaDevicePlan out;
  out.plan = make_gta_plan(params, n);
  GtaPlan& plan = out.plan;
  if (n == 0) return out;
  const int T = int(plan.experts.size());

  // DELLA probabilities first: the L1 statistics and the merge both read them.
  out.della_probs.resize(size_t(T));
  const int64_t L = params.rank_len, I = params.rank_inner, groups = params.rank_outer * I;
  // The rank groups are sorted in chunks: CUB's segmented sort counts items in an int, and the
  // 24 bytes of scratch per element would not fit beside a large tensor. Every group holds L
  // elements, so one table of offsets serves every chunk.
  const int64_t chunk_groups =
      std::min(groups, std::max<int64_t>(1, della_chunk_items() / std::max<int64_t>(L, 1)));
  FM_CHECK(chunk_groups * L <= INT32_MAX, "della: a rank group of ", L, " elements is too long");
  for (int t = 0; t < T; ++t) {
    const ExpertPlan& x = plan.experts[size_t(t)];
    if (x.kind != MaskKind::della) continue;
    const Pair p = pair_of(base, experts[size_t(t)]);
    const int64_t items = chunk_groups * L;
    DeviceBuffer keys(size_t(items) * 8, stream), keys_sorted(size_t(items) * 8, stream);
    DeviceBuffer pos(size_t(items) * 4, stream), pos_sorted(size_t(items) * 4, stream);
    std::vector<int64_t> offsets_host(size_t(chunk_groups) + 1);
    for (int64_t g = 0; g <= chunk_groups; ++g) offsets_host[size_t(g)] = g * L;
    DeviceBuffer offsets(offsets_host.size() * 8, stream);
    FM_CUDA_CHECK(cudaMemcpyAsync(offsets.as<void>(), offsets_host.data(), offsets.bytes(),
                                  cudaMemcpyHostToDevice, stream));
    out.della_probs[size_t(t)] = DeviceBuffer(size_t(n) * 4, stream);
    DeviceBuffer temp;
    for (int64_t group0 = 0; group0 < groups; group0 += chunk_groups) {
      const int64_t count = std::min(chunk_groups, groups - group0);
      const int num_items = int(count * L), num_segments = int(count);
      della_keys_kernel<<<grid_for(count * L, kThreads), kThreads, 0, stream>>>(
          p, L, I, group0, count, keys.as<unsigned long long>(), pos.as<uint32_t>());
      FM_CUDA_LAUNCHED();
      size_t temp_bytes = 0;
      FM_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
          nullptr, temp_bytes, keys.as<unsigned long long>(),
          keys_sorted.as<unsigned long long>(), pos.as<uint32_t>(), pos_sorted.as<uint32_t>(),
          num_items, num_segments, offsets.as<int64_t>(), offsets.as<int64_t>() + 1, 0, 64,
          stream));
      if (temp.bytes() < temp_bytes) temp = DeviceBuffer(temp_bytes, stream);
      FM_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
          temp.as<void>(), temp_bytes, keys.as<unsigned long long>(),
          keys_sorted.as<unsigned long long>(), pos.as<uint32_t>(), pos_sorted.as<uint32_t>(),
          num_items, num_segments, offsets.as<int64_t>(), offsets.as<int64_t>() + 1, 0, 64,
          stream));
      della_probs_kernel<<<grid_for(count * L, kThreads), kThreads, 0, stream>>>(
          pos_sorted.as<uint32_t>(), L, I, group0, count, x.prob_base, x.prob_span,
          out.della_probs[size_t(t)].as<float>());
      FM_CUDA_LAUNCHED();
    }
    // offsets_host must outlive the copy: synchronise before it goes out of scope.
    FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  if (!plan.needs_stats_pass) {
    finish_gta_plan(plan);
    return out;
  }

  // Pass A: histograms for top-k experts, exact L1 for rescaled random experts.
  std::vector<DeviceSelection> sels;
  for (int t = 0; t < T; ++t) {
    ExpertPlan& x = plan.experts[size_t(t)];
    if (x.kind != MaskKind::topk_range) continue;
    for (int side = 0; side < 2; ++side) {
      const int64_t k = side == 0 ? x.k_keep : x.k_drop;
      uint64_t& boundary = side == 0 ? x.keep_from : x.drop_from;
      if (k <= 0) { boundary = kKeepNone; continue; }
      if (k >= n) { boundary = 0; continue; }
      DeviceSelection s;
      s.expert = t;
      s.keep_side = side == 0;
      s.k = k;
      sels.push_back(s);
    }
  }
  std::vector<int> hist_index(size_t(T), -1);
  int hist_count = 0;
  for (const DeviceSelection& s : sels)
    if (hist_index[size_t(s.expert)] < 0) hist_index[size_t(s.expert)] = hist_count++;
  // The device histograms count in 32 bits: one bin could hold every element.
  FM_CHECK(hist_count == 0 || n <= int64_t(UINT32_MAX),
           "exact top-k on CUDA takes at most 2^32 - 1 elements per tensor, got ", n,
           " (the CPU takes up to 2^33)");
  const bool shared_bins = hist_count > 0 && shared_histogram_fits();
  if (shared_bins)
    FM_CUDA_CHECK(cudaFuncSetAttribute(histogram_kernel<true>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(kHistSharedBytes)));
  DeviceBuffer hist(size_t(hist_count) * kHistBins * 4, stream);
  DeviceBuffer random_l1(size_t(T) * 2 * kExactBins * 8, stream);
  hist.zero();
  random_l1.zero();
  for (int t = 0; t < T; ++t) {
    const ExpertPlan& x = plan.experts[size_t(t)];
    const Pair p = pair_of(base, experts[size_t(t)]);
    if (hist_index[size_t(t)] >= 0) {
      const size_t h = size_t(hist_index[size_t(t)]);
      unsigned int* expert_hist = hist.as<unsigned int>() + h * kHistBins;
      if (shared_bins)  // 128 KiB of shared histogram: one block per multiprocessor
        histogram_kernel<true><<<sm_count(), 1024, kHistSharedBytes, stream>>>(p, n, expert_hist);
      else
        histogram_kernel<false><<<grid_for(n, 1024), 1024, 0, stream>>>(p, n, expert_hist);
      FM_CUDA_LAUNCHED();
    }
    if (x.rescale && (x.kind == MaskKind::bernoulli || x.kind == MaskKind::della)) {
      unsigned long long* all = random_l1.as<unsigned long long>() + size_t(t) * 2 * kExactBins;
      random_l1_kernel<<<grid_for((n + 3) / 4, kThreads), kThreads, 0, stream>>>(
          p, n, make_stream(params.seed, params.stream, uint32_t(t)), x.keep_prob,
          x.kind == MaskKind::della ? out.della_probs[size_t(t)].as<float>() : nullptr, all,
          all + kExactBins);
      FM_CUDA_LAUNCHED();
    }
  }
  std::vector<unsigned int> hist_host(size_t(hist_count) * kHistBins);
  std::vector<unsigned long long> random_l1_host(size_t(T) * 2 * kExactBins);
  if (hist_count)
    FM_CUDA_CHECK(cudaMemcpyAsync(hist_host.data(), hist.as<void>(), hist.bytes(),
                                  cudaMemcpyDeviceToHost, stream));
  FM_CUDA_CHECK(cudaMemcpyAsync(random_l1_host.data(), random_l1.as<void>(), random_l1.bytes(),
                                cudaMemcpyDeviceToHost, stream));
  FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (int t = 0; t < T; ++t) {
    ExpertPlan& x = plan.experts[size_t(t)];
    if (x.rescale && (x.kind == MaskKind::bernoulli || x.kind == MaskKind::della)) {
      x.l1_before = exact_bins_to_double(random_l1_host.data() + size_t(t) * 2 * kExactBins);
      x.l1_after = exact_bins_to_double(random_l1_host.data() + size_t(t) * 2 * kExactBins + kExactBins);
    }
  }
  // Locate each selection's bin: scan down from the top until k elements are covered.
  for (DeviceSelection& s : sels) {
    const unsigned int* hh = hist_host.data() + size_t(hist_index[size_t(s.expert)]) * kHistBins;
    int64_t above = 0;
    int b = kHistBins - 1;
    for (; b > 0 && above + int64_t(hh[b]) < s.k; --b) above += hh[b];
    s.bin = uint32_t(b);
    s.above = above;
  }

  // Pass B: low 16 key bits inside each selection's bin give the exact key of the k-th.
  const size_t S = sels.size();
  auto by_expert = [&](auto&& launch) {  // both sides of one expert share a pass
    for (size_t i = 0; i < S; ++i) {
      if (i > 0 && sels[i - 1].expert == sels[i].expert) continue;
      launch(i, i + 1 < S && sels[i + 1].expert == sels[i].expert);
    }
  };
  DeviceBuffer hist2(S * kHistBins2 * 4 + 4, stream);
  hist2.zero();
  by_expert([&](size_t i, bool pair) {
    const Refine a{sels[i].bin, hist2.as<unsigned>() + i * kHistBins2};
    const Refine b = pair ? Refine{sels[i + 1].bin, hist2.as<unsigned>() + (i + 1) * kHistBins2} : a;
    refine_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(
        pair_of(base, experts[size_t(sels[i].expert)]), n, a, b, pair ? 2 : 1);
    FM_CUDA_LAUNCHED();
  });
  std::vector<unsigned> hist2_host(S * kHistBins2);
  if (S) {
    FM_CUDA_CHECK(cudaMemcpyAsync(hist2_host.data(), hist2.as<void>(), S * kHistBins2 * 4,
                                  cudaMemcpyDeviceToHost, stream));
    FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  for (size_t i = 0; i < S; ++i) {
    DeviceSelection& s = sels[i];
    const unsigned* hh = hist2_host.data() + i * kHistBins2;
    int low = kHistBins2 - 1;
    for (; low > 0 && s.above + int64_t(hh[low]) < s.k; --low) s.above += hh[low];
    s.key = (s.bin << kHistShift) | uint32_t(low);
    s.ties = hh[low];
    s.tie_rank = s.k - s.above - 1;
  }

  // Pass C (only where the k-th splits a run of equal keys): count ties per index chunk,
  // then one block finds the tie_rank-th tie inside its chunk.
  const int64_t chunks = ((n - 1) >> kTieChunkShift) + 1;
  DeviceBuffer tie_counts(S * size_t(chunks) * 4 + 4, stream);
  DeviceBuffer tie_index(S * 8 + 8, stream);
  tie_counts.zero();
  bool split = false;
  by_expert([&](size_t i, bool pair) {
    const bool split_a = sels[i].tie_rank + 1 < sels[i].ties;
    const bool split_b = pair && sels[i + 1].tie_rank + 1 < sels[i + 1].ties;
    if (!split_a && !split_b) return;
    split = true;
    unsigned* counts_a = tie_counts.as<unsigned>() + i * size_t(chunks);
    unsigned* counts_b = pair ? counts_a + chunks : counts_a;
    tie_count_kernel<<<int(chunks), 1024, 0, stream>>>(
        pair_of(base, experts[size_t(sels[i].expert)]), n, split_a ? sels[i].key : ~0u, counts_a,
        split_b ? sels[i + 1].key : ~0u, counts_b, pair ? 2 : 1);
    FM_CUDA_LAUNCHED();
  });
  std::vector<unsigned long long> tie_index_host(S + 1, 0);
  if (split) {
    std::vector<unsigned> counts_host(S * size_t(chunks));
    FM_CUDA_CHECK(cudaMemcpyAsync(counts_host.data(), tie_counts.as<void>(), counts_host.size() * 4,
                                  cudaMemcpyDeviceToHost, stream));
    FM_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (size_t i = 0; i < S; ++i) {
      if (sels[i].tie_rank + 1 >= sels[i].ties) continue;
      int64_t rank = sels[i].tie_rank, chunk = 0;
      for (; chunk < chunks && rank >= int64_t(counts_host[i * size_t(chunks) + size_t(chunk)]); ++chunk)
        rank -= counts_host[i * size_t(chunks) + size_t(chunk)];
      tie_index_kernel<<<1, 1024, 0, stream>>>(pair_of(base, experts[size_t(sels[i].expert)]), n,
                                               sels[i].key, chunk, rank,
                                               tie_index.as<unsigned long long>() + i);
      FM_CUDA_LAUNCHED();
    }
    FM_CUDA_CHECK(cudaMemcpyAsync(tie_index_host.data(), tie_index.as<void>(), S * 8,
                                  cudaMemcpyDeviceToHost, stream));
    FM_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  for (size_t i = 0; i < S; ++i) {
    ExpertPlan& x = plan.experts[size_t(sels[i].expert)];
    // Every tie kept: the boundary is the key's smallest composite (index n - 1).
    const int64_t last = sels[i].tie_rank + 1 >= sels[i].ties ? n - 1 : int64_t(tie_index_host[i]);
    (sels[i].keep_side ? x.keep_from : x.drop_from) = composite_key(sels[i].key, last);
  }

  // Rescaled top-k experts: one more pass for the exact L1 of the range and of everything.
  std::vector<int> rescaled;
  for (int t = 0; t < T; ++t)
    if (plan.experts[size_t(t)].kind == MaskKind::topk_range && plan.experts[size_t(t)].rescale)
      rescaled.push_back(t);
  if (!rescaled.empty()) {
    DeviceBuffer l1(rescaled.size() * 2 * kExactBins * 8, stream);
    l1.zero();
    for (size_t r = 0; r < rescaled.size(); ++r) {
      const ExpertPlan& x = plan.experts[size_t(rescaled[r])];
      unsigned long long* all = l1.as<unsigned long long>() + r * 2 * kExactBins;
      topk_l1_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(
          pair_of(base, experts[size_t(rescaled[r])]), n, x.keep_from, x.drop_from, all, all + kExactBins);
      FM_CUDA_LAUNCHED();
    }
    std::vector<unsigned long long> l1_host(rescaled.size() * 2 * kExactBins);
    FM_CUDA_CHECK(cudaMemcpyAsync(l1_host.data(), l1.as<void>(), l1.bytes(), cudaMemcpyDeviceToHost, stream));
    FM_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (size_t r = 0; r < rescaled.size(); ++r) {
      ExpertPlan& x = plan.experts[size_t(rescaled[r])];
      x.l1_before = exact_bins_to_double(l1_host.data() + r * 2 * kExactBins);
      x.l1_after = exact_bins_to_double(l1_host.data() + r * 2 * kExactBins + kExactBins);
    }
  }
  finish_gta_plan(plan);
  return out;
}

void gta_merge_cuda(const TensorView* base, const std::vector<TensorView>& experts,
                    const TensorView& out, const GtaParams& params, StreamHandle stream_handle) {
  const int64_t n = check_gta_inputs(base, experts, out, params);
  FM_CHECK(experts.size() <= 64, "the CUDA merge takes at most 64 experts, got ", experts.size());
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  GtaDevicePlan prepared = gta_prepare_cuda(base, experts, params, n, stream);
  if (n == 0) return;
  const GtaPlan& plan = prepared.plan;
  const int T = int(plan.experts.size());
  std::vector<GtaExpertDev> host(static_cast<size_t>(T));
  for (int t = 0; t < T; ++t) {
    const ExpertPlan& x = plan.experts[size_t(t)];
    GtaExpertDev& d = host[size_t(t)];
    d.data = experts[size_t(t)].data;
    d.dtype = int(experts[size_t(t)].dtype);
    d.kind = int(x.kind);
    d.keep_from = x.keep_from;
    d.drop_from = x.drop_from;
    d.keep_prob = x.keep_prob;
    d.weight = x.weight;
    d.mix_weight = x.mix_weight;
    d.divisor_weight = x.divisor_weight;
    d.scale = x.scale;
    d.prob = x.kind == MaskKind::della ? prepared.della_probs[size_t(t)].as<float>() : nullptr;
  }
  DeviceBuffer dev(host.size() * sizeof(GtaExpertDev), stream);
  FM_CUDA_CHECK(cudaMemcpyAsync(dev.as<void>(), host.data(), dev.bytes(), cudaMemcpyHostToDevice, stream));
  GtaMergeArgs m;
  m.base = base ? base->data : nullptr;
  m.base_dtype = base ? int(base->dtype) : -1;
  m.out = out.data;
  m.out_dtype = int(out.dtype);
  m.n = n;
  m.experts = T;
  m.consensus = int(params.consensus);
  m.normalize = params.normalize;
  m.lambda = float(params.lambda);
  m.divisor = plan.divisor;
  m.seed = params.seed;
  m.stream = params.stream;
  // Fast path: one storage type throughout, 16-byte aligned, whole vectors, <= 8 experts
  // (with or without a base).
  bool uniform = (base == nullptr || (base->dtype == out.dtype &&
                                      reinterpret_cast<uintptr_t>(base->data) % 16 == 0)) &&
                 n % 8 == 0 && reinterpret_cast<uintptr_t>(out.data) % 16 == 0;
  for (const TensorView& e : experts)
    uniform = uniform && e.dtype == out.dtype && reinterpret_cast<uintptr_t>(e.data) % 16 == 0;
  bool launched = false;
  if (uniform) {
    switch (out.dtype) {
      case DType::f32: launched = launch_merge_vec<float>(m, dev.as<GtaExpertDev>(), stream); break;
      case DType::bf16: launched = launch_merge_vec<bf16_t>(m, dev.as<GtaExpertDev>(), stream); break;
      case DType::f16: launched = launch_merge_vec<f16_t>(m, dev.as<GtaExpertDev>(), stream); break;
      default: break;
    }
  }
  if (!launched) {
    const int grid = grid_for((n + 3) / 4, kThreads);
    if (T <= 4) {
      merge_kernel<4><<<grid, kThreads, 0, stream>>>(m, dev.as<GtaExpertDev>());
    } else if (T <= 8) {
      merge_kernel<8><<<grid, kThreads, 0, stream>>>(m, dev.as<GtaExpertDev>());
    } else {
      merge_kernel<64><<<grid, kThreads, 0, stream>>>(m, dev.as<GtaExpertDev>());
    }
  }
  FM_CUDA_LAUNCHED();
  // host[] is pageable: cudaMemcpyAsync from it has completed by the time the call returned.
}

}  // namespace fastmerge
