// KV-cache merging, KVMerger-style (Wang et al. 2024), per (batch, kv head): runs of consecutive
// keys whose adjacent cosine similarity passes eps are merged into their pivot (the token with
// the highest attention score) with Gaussian-kernel weights; sink and recent tokens stay.
// python/fastmerge/ops/_reference/kvmerge.py states the contract step by step.
//
// Two passes, both O(S * D) per (batch, head), so Python can size the output in between:
//   1. plan: sims[bh][i] = cos(k_i, k_{i+1}) (fp64, rounded to fp32) and the number of
//      candidate pairs per head; returns the tokens every head removes,
//      n = min over heads of min(target, candidates).
//   2. apply: per head, the n candidates of highest (similarity, lower index) are selected
//      (exact selection on unique 64-bit keys), runs of selected pairs become merging sets
//      (prefix sums give every set its output slot), and each set is reduced to one token:
//      pivot = argmax score (lowest index on ties), w_i = exp(-|k_i - k_p|^2 / (2 sigma^2)),
//      merged = sum w_i x_i / sum w_i for keys and values, in fp64, rounded once to the
//      output dtype. Unmerged tokens are copied exactly.
// No float atomics and no thread-count dependent reductions: results are deterministic.
#pragma once
#include <cmath>
#include <cstdint>

#include "fastmerge/common.h"
#include "fastmerge/tensor.h"

namespace fastmerge {

struct KvMergeParams {
  int64_t batch_heads = 0;  // B * H
  int64_t seq = 0;          // S (>= 2: Python handles shorter caches)
  int64_t key_dim = 0, value_dim = 0;
  int64_t lo = 0, hi = 0;   // mergeable tokens [lo, hi)
  int64_t target = 0;       // int(ratio * (hi - lo)): tokens to remove per head at most
  double eps = 0.0;         // candidate pairs have sim >= eps
  double sigma = 1.0;       // Gaussian kernel width
};

constexpr double kSimFloor = 1e-12;  // |k_i| |k_j| below this: similarity 0

// Ordering key of a pair: larger similarity first, then lower index. Unique per head.
// -0 and +0 are one similarity (+ 0.0f turns -0 into +0), so their ties go by index too.
FM_HD uint64_t pair_rank_key(float sim, int64_t index) {
  const uint32_t u = float_bits(sim + 0.0f);
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(ordered) << 32) | uint64_t(0xffffffffu - uint32_t(index));
}

// Gaussian-kernel weight of a token at squared key distance d2 from its set's pivot: exactly 1
// for the pivot and at distance 0, even where 2 sigma^2 underflows to 0 (0 / 0 would be NaN) or
// the pivot's key is not finite (inf - inf).
FM_HD double gaussian_weight(bool is_pivot, double d2, double two_sigma2) {
  return is_pivot || d2 == 0.0 ? 1.0 : exp(-d2 / two_sigma2);
}

// A pair is a candidate when both tokens are mergeable and sim >= eps (NaN never).
FM_HD bool is_candidate(float sim, int64_t i, const KvMergeParams& p) {
  return i >= p.lo && i + 1 < p.hi && double(sim) >= p.eps;
}

// Views of the plan step (both devices): keys (BH, S, D), fp32 sims (BH, S - 1), and a
// mergeable range inside the sequence (the candidate loops index sims by it).
inline void check_plan_views(const TensorView& keys, const TensorView& sims,
                             const KvMergeParams& p) {
  const int64_t S = p.seq;
  FM_CHECK(S >= 2, "kv_merge needs at least two tokens");
  FM_CHECK(0 <= p.lo && p.lo <= p.hi && p.hi <= S, "kv_merge: mergeable range [", p.lo, ", ",
           p.hi, ") is not inside the ", S, " tokens");
  check_flat(keys, "keys", p.batch_heads * S * p.key_dim);
  check_flat(sims, "sims", p.batch_heads * (S - 1));
  FM_CHECK(sims.dtype == DType::f32, "sims must be float32");
}

// Views of the apply step (both devices): flat contiguous buffers of the expected sizes.
inline void check_apply_views(const TensorView& keys, const TensorView& values,
                              const TensorView& scores, const TensorView& sims,
                              const KvMergeParams& p, int64_t removed,
                              const TensorView& keys_out, const TensorView& values_out) {
  const int64_t S = p.seq, BH = p.batch_heads, out_len = S - removed;
  check_plan_views(keys, sims, p);
  FM_CHECK(removed >= 0 && removed < S, "kv_merge: bad removal count ", removed);
  check_flat(values, "values", BH * S * p.value_dim);
  check_flat(scores, "scores", BH * S);
  check_flat(keys_out, "keys_out", BH * out_len * p.key_dim);
  check_flat(values_out, "values_out", BH * out_len * p.value_dim);
}

// ---- CPU (kvmerge_cpu.cpp) ----
// keys (BH, S, D), sims (BH, S - 1) fp32 out; returns the tokens removed per head.
int64_t kv_merge_plan_cpu(const TensorView& keys, const TensorView& sims, const KvMergeParams& p);
// positions: BH * (S - removed) int64 (pivot index of every output token), may be null.
void kv_merge_apply_cpu(const TensorView& keys, const TensorView& values, const TensorView& scores,
                        const TensorView& sims, const KvMergeParams& p, int64_t removed,
                        const TensorView& keys_out, const TensorView& values_out,
                        int64_t* positions);

// ---- CUDA (kvmerge_cuda.cu), on the caller's stream ----
int64_t kv_merge_plan_cuda(const TensorView& keys, const TensorView& sims, const KvMergeParams& p,
                           StreamHandle stream);
void kv_merge_apply_cuda(const TensorView& keys, const TensorView& values,
                         const TensorView& scores, const TensorView& sims,
                         const KvMergeParams& p, int64_t removed, const TensorView& keys_out,
                         const TensorView& values_out, int64_t* positions, StreamHandle stream);

}  // namespace fastmerge
