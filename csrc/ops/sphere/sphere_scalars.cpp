// Host side of the sphere family: mergekit 0.1.5's nuslerp, multislerp and karcher formulas
// evaluated on the inputs' Gram matrices (every vector they touch is a combination of the
// inputs), and the drivers that run gram -> coefficients -> combine on a backend.
#include <cmath>
#include <vector>

#include "sphere.h"

namespace fastmerge {

namespace {

// x^T G y for N x N G.
double quad(const double* g, int n, const std::vector<double>& x, const std::vector<double>& y) {
  double s = 0.0;
  for (int j = 0; j < n; ++j) {
    double row = 0.0;
    for (int k = 0; k < n; ++k) row += g[j * n + k] * y[size_t(k)];
    s += x[size_t(j)] * row;
  }
  return s;
}

// sqrt of a quadratic form that is a squared norm: rounding may leave it slightly negative.
double norm_of(const double* g, int n, const std::vector<double>& x) {
  const double s = quad(g, n, x, x);
  return s > 0.0 ? std::sqrt(s) : (s == s ? 0.0 : s);
}

double clamp_unit(double c) { return c < -1.0 ? -1.0 : (c > 1.0 ? 1.0 : c); }  // NaN stays

void check_inputs(const TensorView* base, const std::vector<TensorView>& xs, const TensorView& out) {
  const int64_t n = out.numel();
  check_flat(out, "out", n);
  if (base) check_flat(*base, "base", n);
  FM_CHECK(!xs.empty(), "no inputs");
  for (const TensorView& x : xs) check_flat(x, "input", n);
}

VectorLayout flat_layout(int64_t n) { return VectorLayout{1, n, 1}; }

}  // namespace

NuslerpCoefficients nuslerp_coefficients(double aa, double bb, double ab, double t, float eps) {
  // mergekit: v / max(|v|, 1e-7), cos = clamp(<v0_u, v1_u>, -1, 1) (NaN propagates).
  constexpr double kNormClamp = 1e-7;
  double na = std::sqrt(aa), nb = std::sqrt(bb);
  na = na < kNormClamp ? kNormClamp : na;
  nb = nb < kNormClamp ? kNormClamp : nb;
  const float c = float(clamp_unit(ab / (na * nb)));
  const float one_minus_t = float(1.0 - t), tf = float(t);
  // colinear = (1 - cos^2) <= eps^2, in fp32 like mergekit: linear interpolation.
  if (1.0f - c * c <= eps * eps) return {one_minus_t, tf};
  const float theta = std::acos(c);
  const float sin_theta = std::sin(theta);
  return {std::sin(one_minus_t * theta) / sin_theta, std::sin(tf * theta) / sin_theta};
}

bool multislerp_coefficients(const double* g, int n, const std::vector<double>& weights,
                             bool normalize, double eps, std::vector<float>& coef) {
  std::vector<double> w(weights);
  if (normalize) {
    double sum = 0.0;
    for (double x : w) sum += x;
    for (double& x : w) x /= sum;
  }
  // unit_i = x_i / (|x_i| + eps); mean = sum_i w_i unit_i = sum_i m_i x_i.
  const size_t N = static_cast<size_t>(n);
  std::vector<double> norm(N), denom(N), m(N);
  for (int i = 0; i < n; ++i) {
    norm[size_t(i)] = std::sqrt(g[i * n + i]);
    denom[size_t(i)] = norm[size_t(i)] + eps;
    m[size_t(i)] = w[size_t(i)] / denom[size_t(i)];
  }
  const double mean_norm = norm_of(g, n, m);
  coef.assign(N, 0.0f);
  if (mean_norm < eps) {
    if (n != 2) return false;
    // mergekit's fallback: linear interpolation of the two (delta) inputs.
    for (int i = 0; i < n; ++i) coef[size_t(i)] = float(w[size_t(i)]);
    return true;
  }
  // mean_hat = mean / |mean|; dots_i = <unit_i, mean_hat>; tangent = sum_i w_i (unit_i -
  // dots_i mean_hat) (zero up to rounding: sum_i w_i dots_i = |mean|, kept as mergekit has it).
  std::vector<double> mh(N), gm(N, 0.0), tangent(N);
  for (int i = 0; i < n; ++i) mh[size_t(i)] = m[size_t(i)] / mean_norm;
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < n; ++k) gm[size_t(i)] += g[i * n + k] * mh[size_t(k)];
  double along = 0.0;
  for (int i = 0; i < n; ++i) along += w[size_t(i)] * (gm[size_t(i)] / denom[size_t(i)]);
  for (int i = 0; i < n; ++i) tangent[size_t(i)] = m[size_t(i)] - along * mh[size_t(i)];
  const double tangent_norm = norm_of(g, n, tangent) + eps;
  // exp map back to the sphere, times the weighted mean norm.
  // (eps = 0 with an exactly vanishing tangent: sin(x)/x -> 1, where mergekit's 0/0 is NaN)
  const double cos_t = std::cos(tangent_norm);
  const double sinc_t = tangent_norm == 0.0 ? 1.0 : std::sin(tangent_norm) / tangent_norm;
  double avg_norm = 0.0;
  for (int i = 0; i < n; ++i) avg_norm += norm[size_t(i)] * w[size_t(i)];
  for (int i = 0; i < n; ++i)
    coef[size_t(i)] = float(avg_norm * (mh[size_t(i)] * cos_t + tangent[size_t(i)] * sinc_t));
  return true;
}

std::vector<float> karcher_coefficients(const double* g, int n, const std::vector<double>& alphas,
                                        int max_iter, double tol) {
  const size_t N = static_cast<size_t>(n);
  std::vector<float> coef(N, 0.0f);
  std::vector<double> norm(N);
  for (int i = 0; i < n; ++i) norm[size_t(i)] = std::sqrt(g[i * n + i]);
  std::vector<int> valid;  // mergekit's valid_indices: norm > tol
  for (int i = 0; i < n; ++i)
    if (norm[size_t(i)] > tol) valid.push_back(i);
  if (valid.empty()) return coef;  // mergekit: the zero tensor
  const int k = int(valid.size());
  const size_t K = valid.size();
  // Gram matrix of the valid unit vectors u_j = x_j / |x_j|; the mean is sum_j c_j u_j.
  std::vector<double> gu(K * K);
  for (int a = 0; a < k; ++a)
    for (int b = 0; b < k; ++b)
      gu[size_t(a) * k + b] =
          g[valid[size_t(a)] * n + valid[size_t(b)]] / (norm[size_t(valid[size_t(a)])] * norm[size_t(valid[size_t(b)])]);
  double alpha_sum = 0.0;
  for (int j : valid) alpha_sum += alphas[size_t(j)];
  // The mean weights are alphas / alpha_sum; mergekit would divide by zero here.
  FM_CHECK(alpha_sum != 0.0, "karcher: the alphas of the inputs with norm above tol sum to zero");
  std::vector<double> alpha(K);
  for (int a = 0; a < k; ++a) alpha[size_t(a)] = alphas[size_t(valid[size_t(a)])] / alpha_sum;

  std::vector<double> c(alpha);
  const double mean_norm = norm_of(gu.data(), k, c);
  if (mean_norm < tol) {
    std::fill(c.begin(), c.end(), 0.0);
    c[0] = 1.0;  // the first valid unit
  } else {
    for (double& x : c) x /= mean_norm;
  }
  std::vector<double> dots(K), tangent(K);
  for (int it = 0; it < max_iter; ++it) {
    for (int a = 0; a < k; ++a) {
      double d = 0.0;
      for (int b = 0; b < k; ++b) d += gu[size_t(a) * k + b] * c[size_t(b)];
      dots[size_t(a)] = clamp_unit(d);
    }
    // tangent = sum_a alpha_a theta_a / sin(theta_a) (u_a - dot_a mean), theta_a < tol skipped
    std::fill(tangent.begin(), tangent.end(), 0.0);
    for (int a = 0; a < k; ++a) {
      const double theta = std::acos(dots[size_t(a)]);
      if (theta < tol) continue;
      const double f = alpha[size_t(a)] * (theta / std::sin(theta));
      tangent[size_t(a)] += f;
      for (int b = 0; b < k; ++b) tangent[size_t(b)] -= f * dots[size_t(a)] * c[size_t(b)];
    }
    const double tangent_norm = norm_of(gu.data(), k, tangent);
    if (tangent_norm < tol || tangent_norm == 0.0) break;  // tol = 0: no 0/0 step (NaN)
    const double cs = std::cos(tangent_norm), sn = std::sin(tangent_norm) / tangent_norm;
    for (int b = 0; b < k; ++b) c[size_t(b)] = cs * c[size_t(b)] + sn * tangent[size_t(b)];
    const double unit_norm = norm_of(gu.data(), k, c);
    if (unit_norm > tol)
      for (double& x : c) x /= unit_norm;
  }
  // scale = sum_i alpha_i |x_i| over every input (the invalid ones included).
  double scale = 0.0;
  for (int i = 0; i < n; ++i) scale += alphas[size_t(i)] * norm[size_t(i)];
  for (int a = 0; a < k; ++a) {
    const int i = valid[size_t(a)];
    coef[size_t(i)] = float(scale * c[size_t(a)] / norm[size_t(i)]);
  }
  return coef;
}

void nuslerp_run(const SphereBackend& be, const TensorView* base, const TensorView& v0,
                 const TensorView& v1, const TensorView& out, const VectorLayout& layout,
                 double t, double eps) {
  const std::vector<TensorView> xs{v0, v1};
  check_inputs(base, xs, out);
  FM_CHECK(layout.outer >= 0 && layout.len >= 0 && layout.inner >= 0 &&
               layout.numel() == out.numel(),
           "nuslerp layout [", layout.outer, ", ", layout.len, ", ", layout.inner,
           "] does not match ", out.numel(), " elements");
  if (out.numel() == 0) return;
  const std::vector<double> g = be.gram(base, xs, layout);
  const int64_t count = layout.count();
  std::vector<float> coef(size_t(count) * 2);
  for (int64_t v = 0; v < count; ++v) {
    const double* gv = g.data() + size_t(v) * 4;
    const NuslerpCoefficients k = nuslerp_coefficients(gv[0], gv[3], gv[1], t, float(eps));
    coef[size_t(v) * 2] = k.a;
    coef[size_t(v) * 2 + 1] = k.b;
  }
  be.combine(base, xs, layout, coef, out);
}

bool multislerp_run(const SphereBackend& be, const TensorView* base,
                    const std::vector<TensorView>& xs, const TensorView& out,
                    const std::vector<double>& weights, bool normalize, double eps) {
  check_inputs(base, xs, out);
  FM_CHECK(weights.size() == xs.size(), "one weight per input");
  const int64_t n = out.numel();
  if (n == 0) return true;
  const VectorLayout flat = flat_layout(n);
  if (xs.size() == 1) {  // mergekit returns the one input unchanged, base or not
    be.combine(nullptr, xs, flat, {1.0f}, out);
    return true;
  }
  const std::vector<double> g = be.gram(base, xs, flat);
  std::vector<float> coef;
  if (!multislerp_coefficients(g.data(), int(xs.size()), weights, normalize, eps, coef))
    return false;
  be.combine(base, xs, flat, coef, out);
  return true;
}

void karcher_run(const SphereBackend& be, const std::vector<TensorView>& xs,
                 const TensorView& out, const std::vector<double>& alphas, int max_iter,
                 double tol) {
  check_inputs(nullptr, xs, out);
  FM_CHECK(alphas.size() == xs.size(), "one alpha per input");
  const int64_t n = out.numel();
  if (n == 0) return;
  const VectorLayout flat = flat_layout(n);
  if (xs.size() == 1) {
    be.combine(nullptr, xs, flat, {1.0f}, out);
    return;
  }
  const std::vector<double> g = be.gram(nullptr, xs, flat);
  be.combine(nullptr, xs, flat, karcher_coefficients(g.data(), int(xs.size()), alphas, max_iter, tol),
             out);
}

}  // namespace fastmerge
