// Fused generalized task arithmetic ("gta" family): task arithmetic, TIES, DARE, breadcrumbs,
// DELLA and their linear variants in one kernel with mergekit 0.1.5's semantics and
// fastmerge's numerics (fp32 arithmetic, exact top-k with index tie-break, Philox masks).
//
// For each expert t: delta_t = expert_t - base (base absent = 0), sparsified to s_t
// (mask, optional L1 rescale), v_t = s_t * weight_t. Consensus (TIES sign election) keeps
// v_t where sign(v_t) equals the majority sign; the merged delta is sum(v_t * keep_t), divided
// by the divisor when normalizing, times lambda, added to base, rounded once to out's dtype.
//
// PEFT's merge_utils conventions are options (off by default): magnitude top-k without the
// keep-at-least-one floor (min_keep 0), rescale by 1/density, sign election and agreement on
// the unweighted s_t (elect_unweighted), and a divisor that counts the agreeing experts.
#pragma once
#include <cstdint>
#include <vector>

#include "fastmerge/tensor.h"

namespace fastmerge {

enum class Sparsify : int { none = 0, magnitude = 1, random = 2, magnitude_outliers = 3, della_magprune = 4 };
enum class Consensus : int { none = 0, sum = 1, count = 2 };
// l1: mergekit's rescaled_masked_tensor (kept * L1 before / L1 after); density: kept / density
// (PEFT's prune(rescale=True), the DARE paper's formula).
enum class Rescale : int { none = 0, l1 = 1, density = 2 };

struct GtaExpertParams {
  double weight = 1.0;
  double density = 1.0;
  double gamma = 0.01;   // magnitude_outliers: fraction of largest removed
  double epsilon = 0.15; // della_magprune: half-width of the keep-probability range
};

struct GtaParams {
  Sparsify sparsify = Sparsify::none;
  Consensus consensus = Consensus::none;
  Rescale rescale = Rescale::none;  // of each sparsified delta (mergekit's `rescale`: l1)
  bool normalize = false;  // divide by the (masked) sum of weights, or count (count_divisor)
  bool count_divisor = false;     // normalize: divide by the number of (agreeing) experts
  bool elect_unweighted = false;  // consensus: vote and agree on s_t, not s_t * weight_t
  int64_t min_keep = 1;    // magnitude: keep max(min_keep, int(density * n)) for 0 < density < 1
  double lambda = 1.0;
  uint64_t seed = 0;       // random masks: Philox key
  uint32_t stream = 0;     // random masks: hash of the tensor name
  std::vector<GtaExpertParams> experts;
  // DELLA ranks magnitudes along dim 1 (mergekit: argsort(dim=1) after unsqueezing <2-D):
  // rank_outer groups of rank_len elements spaced rank_inner apart.
  int64_t rank_outer = 1, rank_len = 1, rank_inner = 1;
};

// base may be null (deltas are the experts themselves). out has base's (or the experts') numel.
void gta_merge_cpu(const TensorView* base, const std::vector<TensorView>& experts,
                   const TensorView& out, const GtaParams& params);
void gta_merge_cuda(const TensorView* base, const std::vector<TensorView>& experts,
                    const TensorView& out, const GtaParams& params, StreamHandle stream);

// The two steps of PEFT's TIES on T stacked tensors (flat storage (T, n), T = shape[0]):
// sign mask: mask[t, j] = sign(x[t, j]) == majority_j (a bool per element), majority_j = +1
// when vote_j >= 0 else -1, vote_j = sum_t x[t, j] (Consensus::sum) or sum_t sign(x[t, j])
// (count), in fp32 in t order (NaN votes elect -1; zeros and NaNs never agree).
void gta_sign_mask_cpu(const TensorView& stacked, const TensorView& mask, Consensus method);
void gta_sign_mask_cuda(const TensorView& stacked, const TensorView& mask, Consensus method,
                        StreamHandle stream);
// disjoint merge: out[j] = (sum_t x[t, j] * mask[t, j]) / max(1, sum_t mask[t, j]), fp32 in t
// order (x * 0 as PEFT multiplies: inf or NaN under a false mask gives NaN), rounded once.
void gta_disjoint_merge_cpu(const TensorView& stacked, const TensorView& mask, const TensorView& out);
void gta_disjoint_merge_cuda(const TensorView& stacked, const TensorView& mask, const TensorView& out,
                             StreamHandle stream);

}  // namespace fastmerge
