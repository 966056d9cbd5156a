// The scalar parts of slerp and model_stock, shared by the CPU and CUDA launchers.
#include <algorithm>
#include <cmath>

#include "interp.h"

namespace fastmerge {

SlerpCoefficients slerp_coefficients(double aa, double bb, double ab, float t) {
  constexpr double kEps = 1e-8;
  constexpr float kDotThreshold = 0.9995f;
  double na = std::sqrt(aa), nb = std::sqrt(bb);
  if (!(na > kEps)) na = 1.0;
  if (!(nb > kEps)) nb = 1.0;
  const float dot = std::clamp(float(ab / (na * nb)), -1.0f, 1.0f);
  if (std::fabs(dot) > kDotThreshold) return {1.0f - t, t};
  const float theta = std::acos(dot);
  const float sin_theta = std::sin(theta);
  return {std::sin((1.0f - t) * theta) / sin_theta, std::sin(t * theta) / sin_theta};
}

int64_t check_pair_inputs(const TensorView& a, const TensorView& b, const TensorView& out) {
  const int64_t n = out.numel();
  check_flat(a, "a", n);
  check_flat(b, "b", n);
  check_flat(out, "out", n);
  return n;
}

int64_t check_model_stock_inputs(const TensorView& base, const std::vector<TensorView>& experts,
                                 const TensorView& out, int64_t rows) {
  const int64_t n = out.numel();
  check_flat(base, "base", n);
  check_flat(out, "out", n);
  for (const TensorView& e : experts) check_flat(e, "expert", n);
  FM_CHECK(experts.size() >= 2, "model_stock needs at least two experts");
  FM_CHECK(rows >= 1 && n % rows == 0, "rows must divide numel");
  return n;
}

float model_stock_ratio(const double* gram, int experts) {
  const int T = experts;
  float cos_sum = 0.0f;
  int pairs = 0;
  for (int i = 0; i < T; ++i)
    for (int j = i + 1; j < T; ++j) {
      const float norm_product = float(std::sqrt(gram[i * T + i]) * std::sqrt(gram[j * T + j]));
      const float c = float(gram[i * T + j]) / std::max(norm_product, 1e-6f);
      cos_sum += std::clamp(c, -1.0f, 1.0f);
      ++pairs;
    }
  const float cos_theta = pairs ? cos_sum / float(pairs) : 0.0f;
  const float denominator = 1.0f + float(T - 1) * cos_theta;
  // At the singularity mergekit keeps the base (t = 0).
  if (std::fabs(denominator) < 1e-6f) return 0.0f;
  return (float(T) * cos_theta) / denominator;
}

}  // namespace fastmerge
