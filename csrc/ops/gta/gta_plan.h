// Device-independent planning of a GTA merge: what each expert's mask is, which statistics the
// first pass must gather, and the per-expert coefficients the merge pass applies. Shared by the
// CPU and CUDA launchers so both follow one definition of the semantics.
#pragma once
#include <cstdint>
#include <vector>

#include "gta.h"
#include "../select/select.h"

namespace fastmerge {

enum class MaskKind : int {
  keep_all = 0,   // no sparsification, density >= 1
  drop_all = 1,   // density <= 0 (mergekit returns zeros)
  topk_range = 2, // magnitude / magnitude_outliers: keep iff keep_from <= composite < drop_from
  bernoulli = 3,  // random: keep iff uniform < keep_prob
  della = 4,      // della_magprune: keep iff uniform < prob_base + rank_norm * 2 * prob_span
};

struct ExpertPlan {
  MaskKind kind = MaskKind::keep_all;
  // topk_range: keep the top k_keep, minus the top k_drop (breadcrumbs' outliers).
  int64_t k_keep = 0, k_drop = 0;
  uint64_t keep_from = 0, drop_from = kKeepNone;  // boundaries, filled by the selection pass
  float keep_prob = 1.0f;                          // bernoulli
  float prob_base = 0.0f, prob_span = 0.0f;        // della: density - epsilon, epsilon
  bool rescale = false;                            // L1 rescale applies to this expert
  double l1_before = 0.0, l1_after = 0.0;          // filled by the stats pass when rescale
  float weight = 1.0f;                             // multiplies s_t into the contribution
  float mix_weight = 1.0f;     // consensus: multiplies an agreeing contribution into the sum
  float divisor_weight = 1.0f; // consensus + normalize: what an agreeing expert adds to the divisor
  float fixed_scale = 1.0f;    // density rescale: 1 / density
  float scale = 1.0f;          // rescale factor (L1 or fixed), from finish_plan
};

struct GtaPlan {
  std::vector<ExpertPlan> experts;
  bool needs_stats_pass = false;  // any selection or L1 statistic to gather first
  bool has_della = false;
  float divisor = 1.0f;           // no-consensus normalize divisor: sum of weights (|.|<1e-8 -> 1)
                                  // or, counting, the number of experts
};

// Launcher-side checks shared by CPU and CUDA: flat same-size tensors, one parameter set per
// expert, a DELLA rank axis that covers the tensor. Returns numel.
int64_t check_gta_inputs(const TensorView* base, const std::vector<TensorView>& experts,
                         const TensorView& out, const GtaParams& params);

// Validates params against n elements and decides every expert's mask.
GtaPlan make_gta_plan(const GtaParams& params, int64_t n);

// After the stats pass: computes each expert's L1 rescale factor (mergekit's
// rescaled_masked_tensor: before/after, unless either is below 1e-7).
void finish_gta_plan(GtaPlan& plan);

// Rank normalisation of DELLA for one rank group: 1-based rank r of len -> (r-1)/(len-1),
// and 0.5 when len == 1 (mergekit divides 0 by 0 there).
inline float della_rank_norm(int64_t rank0, int64_t len) {
  return len > 1 ? float(rank0) / float(len - 1) : 0.5f;
}

// CPU: runs the statistics pass (selections, L1 norms) and returns the finished plan.
GtaPlan gta_prepare_cpu(const TensorView* base, const std::vector<TensorView>& experts,
                        const GtaParams& params, int64_t n);

}  // namespace fastmerge
