// Host-side scalar parts of the consensus merges, shared by the CPU and CUDA launchers.
#include <algorithm>
#include <cmath>

#include "consensus.h"

namespace fastmerge {

int64_t check_consensus_inputs(const TensorView& base, const std::vector<TensorView>& experts,
                               const TensorView& out) {
  const int64_t n = out.numel();
  check_flat(base, "base", n);
  check_flat(out, "out", n);
  FM_CHECK(!experts.empty(), "at least one expert is required");
  for (const TensorView& e : experts) check_flat(e, "expert", n);
  return n;
}

float ramplus_lambda(int64_t shared, int64_t unique, double r, double alpha, double eps) {
  const float denom = std::max(float(unique), float(eps));
  float rho = float(shared) / denom;
  rho = std::max(rho, 0.0f);
  rho = std::min(rho, float(alpha));  // NaN cannot occur: counts are finite, denom > 0
  return 1.0f + float(r) * rho;
}

int64_t sce_keep_count(int64_t nonzero, double select_topk) {
  const float k = float(nonzero) * float(select_topk);
  return k > 0.0f ? int64_t(k) : 0;
}

std::vector<float> sce_weights(const std::vector<double>& sum_squares, int64_t n) {
  const size_t T = sum_squares.size();
  std::vector<float> w(T);
  float total = 0.0f;
  for (size_t i = 0; i < T; ++i) {
    w[i] = n > 0 ? float(sum_squares[i] / double(n)) : 0.0f;
    total += w[i];
  }
  if (std::fabs(double(total)) < 1e-6) {
    std::fill(w.begin(), w.end(), 1.0f / float(T));
    return w;
  }
  for (size_t i = 0; i < T; ++i) w[i] = w[i] / total;
  return w;
}

}  // namespace fastmerge
