#include "gta_plan.h"

#include <algorithm>
#include <cmath>

namespace fastmerge {

int64_t check_gta_inputs(const TensorView* base, const std::vector<TensorView>& experts,
                         const TensorView& out, const GtaParams& params) {
  const int64_t n = out.numel();
  check_flat(out, "out", n);
  if (base) check_flat(*base, "base", n);
  for (const TensorView& e : experts) check_flat(e, "expert", n);
  FM_CHECK(experts.size() == params.experts.size(), "got ", experts.size(), " experts but ",
           params.experts.size(), " parameter sets");
  if (params.sparsify == Sparsify::della_magprune) {
    FM_CHECK(params.rank_outer * params.rank_len * params.rank_inner == n,
             "della rank axis does not cover the tensor");
    FM_CHECK(params.rank_len < (int64_t(1) << 32), "della: rank groups longer than 2^32");
  }
  return n;
}

namespace {

// Elements a magnitude top-k keeps: all for density >= 1, none for density <= 0, else
// max(min_keep, int(density * n)) (mergekit: min_keep 1; PEFT: 0), at most n.
int64_t keep_count(double density, int64_t n, int64_t min_keep) {
  if (n <= 0 || density <= 0.0) return 0;
  if (density >= 1.0) return n;
  return std::min(n, std::max(min_keep, int64_t(density * double(n))));
}

}  // namespace

GtaPlan make_gta_plan(const GtaParams& params, int64_t n) {
  FM_CHECK(!params.experts.empty(), "at least one expert is required");
  FM_CHECK(params.min_keep >= 0, "min_keep must be >= 0, got ", params.min_keep);
  GtaPlan plan;
  const bool l1 = params.rescale == Rescale::l1;
  // Unweighted election: contributions stay s_t and the weight joins in the disjoint sum.
  const bool unweighted = params.elect_unweighted && params.consensus != Consensus::none;
  float weight_sum = 0.0f;  // mergekit sums the weights in the tensors' float type
  for (const GtaExpertParams& e : params.experts) {
    ExpertPlan x;
    const float w = float(e.weight);
    x.weight = unweighted ? 1.0f : w;
    x.mix_weight = unweighted ? w : 1.0f;
    x.divisor_weight = params.count_divisor ? 1.0f : w;
    weight_sum += w;
    const double d = e.density;
    switch (params.sparsify) {
      case Sparsify::none:
        x.kind = MaskKind::keep_all;
        break;
      case Sparsify::magnitude: {
        if (d >= 1.0) break;
        const int64_t k = keep_count(d, n, params.min_keep);
        if (k == 0) { x.kind = MaskKind::drop_all; break; }
        x.kind = MaskKind::topk_range;
        x.k_keep = k;
        x.k_drop = 0;
        x.rescale = l1;
        break;
      }
      case Sparsify::magnitude_outliers: {
        if (d >= 1.0) break;
        // mergekit: keep ascending-magnitude ranks [n_bot, n_bot + target_n).
        const int64_t target_n = d > 0.0 ? int64_t(d * double(n)) : 0;
        const int64_t n_top = int64_t(e.gamma * double(n));
        const int64_t n_bot = std::max<int64_t>(0, n - target_n - n_top);
        x.kind = MaskKind::topk_range;
        x.k_keep = n - n_bot;
        x.k_drop = n - n_bot - target_n;
        x.rescale = l1;
        break;
      }
      case Sparsify::random:
        if (d >= 1.0) break;
        if (d <= 0.0) { x.kind = MaskKind::drop_all; break; }
        x.kind = MaskKind::bernoulli;
        x.keep_prob = float(d);
        x.rescale = l1;
        break;
      case Sparsify::della_magprune:
        if (d >= 1.0) break;
        if (d <= 0.0) { x.kind = MaskKind::drop_all; break; }
        FM_CHECK(d + e.epsilon < 1.0 && d - e.epsilon > 0.0,
                 "della: density +/- epsilon must lie in (0, 1), got density=", d,
                 " epsilon=", e.epsilon);
        x.kind = MaskKind::della;
        x.prob_base = float(d - e.epsilon);
        x.prob_span = float(e.epsilon);
        x.rescale = l1;
        plan.has_della = true;
        break;
    }
    // Density rescale: every masked expert's kept values are divided by its density.
    if (params.rescale == Rescale::density && x.kind != MaskKind::keep_all && d > 0.0)
      x.fixed_scale = float(1.0 / d);
    plan.needs_stats_pass |= x.kind == MaskKind::topk_range || x.rescale;
    plan.experts.push_back(x);
  }
  if (params.count_divisor)
    plan.divisor = float(params.experts.size());
  else
    plan.divisor = std::fabs(weight_sum) < 1e-8f ? 1.0f : weight_sum;
  return plan;
}

void finish_gta_plan(GtaPlan& plan) {
  for (ExpertPlan& x : plan.experts) {
    x.scale = x.fixed_scale;
    if (!x.rescale) continue;
    const float before = float(x.l1_before), after = float(x.l1_after);
    if (before < 1e-7f || after < 1e-7f) continue;
    x.scale = before / after;
  }
}

}  // namespace fastmerge
