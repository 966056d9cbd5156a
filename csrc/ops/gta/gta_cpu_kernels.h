// Block kernels of the CPU GTA path: straight-line loops over one block of floats, compiled
// once per instruction set (gta_cpu_kernels.cpp) and chosen at run time. The orchestration in
// gta_cpu.cpp owns threads, chunking and all standard-library work.
#pragma once
#include <algorithm>
#include <cstdint>

#include "fastmerge/numeric.h"
#include "fastmerge/philox.h"
#include "gta_plan.h"

namespace fastmerge {

constexpr int64_t kBlock = 256;
constexpr int kMaxFusedExperts = 8;  // elements per block; a multiple of 4 (Philox quads)

// Calls fn(block_start, block_len) for the kBlock-sized blocks of [begin, end).
template <typename Fn>
void for_each_block(int64_t begin, int64_t end, Fn&& fn) {
  for (int64_t b = begin; b < end; b += kBlock) fn(b, std::min(kBlock, end - b));
}

struct TopkScanResult {
  int64_t above = 0;      // composites above the window
  double above_l1 = 0.0;  // sum of |delta| over them
  int64_t candidates = 0; // composites written to the candidate buffer
};

struct CombineParams {
  Consensus consensus = Consensus::none;
  bool normalize = false;
  float lambda = 1.0f;
  float divisor = 1.0f;  // used without consensus
};

// One block of an input tensor in its storage type: element offset .. offset + len.
struct BlockSource {
  const void* data;
  DType dtype;
  int64_t offset;  // also the flat index of the block's first element
};

struct GtaBlockKernels {
  // dst[j] = float(src[offset + j])
  void (*load)(const void* src, DType dtype, int64_t offset, int64_t len, float* dst);
  // dst[offset + j] = round(src[j])
  void (*store)(void* dst, DType dtype, int64_t offset, int64_t len, const float* src);
  // store, with non-temporal writes on whole aligned cache lines (stream_fence before reading)
  void (*stream_store)(void* dst, DType dtype, int64_t offset, int64_t len, const float* src);
  // d[j] = a[j] - b[j]; b may be null (then a copy)
  void (*subtract)(const float* a, const float* b, int64_t len, float* d);
  // u[j] = uniform for element first + j
  void (*uniforms)(const RandomStream& stream, int64_t first, int64_t len, float* u);
  // bits[j / 64] bit j % 64 = u[j] < (keep_prob ? keep_prob[j] : p), for the len elements of a
  // block starting on a multiple of 64 (whole words; the last word's spare bits zero)
  void (*pack_keep)(const float* u, const float* keep_prob, float p, int64_t len, uint64_t* bits);
  // u[j] = -1 where bit j is set, else 2: against any keep probability in [0, 1], "u < p"
  // then decides as the uniforms that were packed did
  void (*unpack_keep)(const uint64_t* bits, int64_t len, float* u);
  // sum |d|, and sum |d| where keep_prob[j] > u[j] (keep_prob null: the scalar p)
  void (*abs_sums)(const float* d, const float* u, const float* keep_prob, float p, int64_t len,
                   double* all, double* kept);
  // Window scan of the sample-window top-k over |expert - base| for the len elements of a
  // range starting at expert.offset (base: the same range of the base tensor, or null for no
  // base): counts composites above hi, sums their |delta| when sum_l1, and writes the
  // composites in [lo, hi] to candidates (room for len + 16).
  void (*topk_scan)(BlockSource expert, const BlockSource* base, int64_t len, uint64_t lo, uint64_t hi,
                    bool sum_l1, TopkScanResult* result, uint64_t* candidates);
  // v[j] = kept ? (delta[j] * scale) * weight : 0 for one expert, delta = expert - base
  // (u: uniforms for random masks, keep_prob: DELLA's per-element probabilities)
  void (*contribution)(BlockSource expert, const float* base, int64_t len, const ExpertPlan& plan,
                       const float* u, const float* keep_prob, float* v);
  // out[j] = base[j] + merged delta of the T contribution rows v[t * stride + j] (base is
  // zeros without a base: 0 + x is x exactly); plans give the consensus mix and divisor weights
  void (*combine)(const float* v, int64_t stride, int experts, const ExpertPlan* plans,
                  const CombineParams& params, const float* base, int64_t len, float* out);
  // contribution + combine fused, for up to kMaxFusedExperts experts sharing one dtype whose
  // masks are keep_all, drop_all or topk_range, or random masks replayed from packed keep
  // bits; returns false (nothing done) otherwise, and on the few blocks that hold a top-k
  // boundary's own index (those take contribution + combine). base_same: the base tensor when
  // it has the experts' dtype (read in place of base, the block as floats, which the caller
  // then need not fill); else null. keep_u: null, or per expert the block's stand-in uniforms
  // from unpack_keep (null for an expert without keep bits).
  bool (*merge_ranges)(const BlockSource* experts, int count, const ExpertPlan* plans,
                       const CombineParams& params, const float* base, const void* base_same,
                       const float* const* keep_u, int64_t len, float* out);
};

const GtaBlockKernels& gta_block_kernels();

}  // namespace fastmerge
