#include "gta_plan.h"

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

GtaPlan make_gta_plan(const GtaParams& params, int64_t n) {
  FM_CHECK(!params.experts.empty(), "at least one expert is required");
  GtaPlan plan;
  float weight_sum = 0.0f;  // mergekit sums the weights in the tensors' float type
  for (const GtaExpertParams& e : params.experts) {
    ExpertPlan x;
    x.weight = float(e.weight);
    weight_sum += x.weight;
    const double d = e.density;
    switch (params.sparsify) {
      case Sparsify::none:
        x.kind = MaskKind::keep_all;
        break;
      case Sparsify::magnitude: {
        if (d >= 1.0) break;
        const int64_t k = magnitude_keep_count(d, n);
        if (k == 0) { x.kind = MaskKind::drop_all; break; }
        x.kind = MaskKind::topk_range;
        x.k_keep = k;
        x.k_drop = 0;
        x.rescale = params.rescale;
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
        x.rescale = params.rescale;
        break;
      }
      case Sparsify::random:
        if (d >= 1.0) break;
        if (d <= 0.0) { x.kind = MaskKind::drop_all; break; }
        x.kind = MaskKind::bernoulli;
        x.keep_prob = float(d);
        x.rescale = params.rescale;
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
        x.rescale = params.rescale;
        plan.has_della = true;
        break;
    }
    plan.needs_stats_pass |= x.kind == MaskKind::topk_range || x.rescale;
    plan.experts.push_back(x);
  }
  plan.divisor = std::fabs(weight_sum) < 1e-8f ? 1.0f : weight_sum;
  return plan;
}

void finish_gta_plan(GtaPlan& plan) {
  for (ExpertPlan& x : plan.experts) {
    x.scale = 1.0f;
    if (!x.rescale) continue;
    const float before = float(x.l1_before), after = float(x.l1_after);
    if (before < 1e-7f || after < 1e-7f) continue;
    x.scale = before / after;
  }
}

}  // namespace fastmerge
