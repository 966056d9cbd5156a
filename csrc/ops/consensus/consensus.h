// Consensus merges ("consensus" family): mergekit 0.1.5's ram, ramplus_tl, sce and
// arcee_fusion, each a few fused passes over the base and the experts, with mergekit's
// per-element formulas evaluated in fp32 in mergekit's order (global sums in double).
//
//   ram         nz_i = |d_i| > eps, c = sum nz_i; out = base + sum_i term_i with
//               term_i = (tvz_i * [c == 1]) * lambda_i + (tvz_i * [c > 1]) / max(c, 1),
//               tvz_i = d_i * nz_i, lambda_i = 1 (ram) or ramplus_tl's per-expert factor
//               1 + r * clamp(shared_i / max(unique_i, eps), 0, alpha) from a counting pass.
//   sce         optional top-k of the experts' per-element variance, TIES "sum" sign election,
//               per-expert weights mean(m_i^2) normalised by their sum.
//   arcee_fusion importance = |p - b| * KL(softmax(p row) || softmax(b row)); keep where
//               importance >= median + 1.5 (q3 - q1) (exact order statistics).
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/numeric.h"
#include "fastmerge/tensor.h"

namespace fastmerge {

// ---- ram / ramplus_tl ----

// One expert's contribution with mergekit's evaluation order (tvz = d * nz, the masks as
// 0/1 floats, the division a true division by the count as a float).
FM_HD float ram_term(float d, bool nz, int count, float lambda) {
  const float tvz = d * (nz ? 1.0f : 0.0f);
  const float unique = count == 1 ? 1.0f : 0.0f;
  const float overlap = count > 1 ? 1.0f : 0.0f;
  return (tvz * unique) * lambda + (tvz * overlap) / float(count > 1 ? count : 1);
}

FM_HD bool ram_nonzero(float d, float eps) { return (d < 0.0f ? -d : d) > eps; }

// ramplus_tl's per-expert factor from its shared / unique element counts (mergekit's fp32
// arithmetic: rho = shared / max(unique, eps), lambda = 1 + r * clamp(rho, 0, alpha)).
float ramplus_lambda(int64_t shared, int64_t unique, double r, double alpha, double eps);

// ---- sce ----

// The number of variance-ranked elements sce keeps: mergekit's int(count_nonzero(var) *
// select_topk), the product taken in fp32 as torch does (callers handle topk <= 0 and >= 1).
int64_t sce_keep_count(int64_t nonzero, double select_topk);

// Normalised per-expert weights from the sums of squares of the masked deltas over n elements:
// w_i = mean(m_i^2) in fp32, divided by their fp32 sum; 1/N each when |sum| < 1e-6.
std::vector<float> sce_weights(const std::vector<double>& sum_squares, int64_t n);

// Majority sign of TIES "sum" election: +1 where the sum of the deltas is >= 0.
FM_HD float sign_of(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

// ---- arcee_fusion ----

// Running maximum of a row as torch's max: NaN wins.
FM_HD float row_max(float m, float x) { return (x != x || x > m) ? x : m; }

// One element's term P log(P / Q) of the row KL, in double: P = exp(p - pmax) / psum + 1e-8
// (psum: the row's sum of exp(p - pmax)), Q likewise. mergekit evaluates this in fp32, where
// the terms (first order in p - b) cancel to a sum of second order: its fp32 KL carries
// rounding noise of ~1e-3 relative for close models, which double avoids (and CPU and CUDA
// agree). The order statistics and the kept set differ from mergekit's only for elements
// whose importance lies within that noise of the threshold.
FM_HD double arcee_kl_term_from_exp(double ep, double psum, double eq, double qsum) {
  const double pp = ep / psum + 1e-8;
  const double qq = eq / qsum + 1e-8;
  return pp * log(pp / qq);
}

FM_HD double arcee_kl_term(float p, float pmax, double psum, float q, float qmax, double qsum) {
  return arcee_kl_term_from_exp(exp(double(p) - double(pmax)), psum,
                                exp(double(q) - double(qmax)), qsum);
}

// Total-order key of a float (ascending keys = ascending values; -0 and +0 share a key, every
// NaN sorts last, as in torch.sort).
FM_HD uint32_t order_key(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) u = 0x7fc00000u;  // NaN: above +inf
  if (u == 0x80000000u) u = 0u;                           // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

FM_HD float order_value(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return bits_float(u);
}

// Ascending rank of mergekit's quantile q of n sorted values: int(q * (n - 1)).
inline int64_t quantile_rank(double q, int64_t n) { return int64_t(q * double(n - 1)); }

// threshold = median + 1.5 * (q3 - q1) in fp32.
inline float fusion_threshold(float q1, float median, float q3) {
  return median + 1.5f * (q3 - q1);
}

// ---- shared checks ----

// base, experts and out hold the same number of contiguous elements; returns it.
int64_t check_consensus_inputs(const TensorView& base, const std::vector<TensorView>& experts,
                               const TensorView& out);

// ---- launchers ----

void ram_cpu(const TensorView& base, const std::vector<TensorView>& experts, const TensorView& out,
             double epsilon);
void ram_cuda(const TensorView& base, const std::vector<TensorView>& experts, const TensorView& out,
              double epsilon, StreamHandle stream);

void ramplus_tl_cpu(const TensorView& base, const std::vector<TensorView>& experts,
                    const TensorView& out, double r, double alpha, double epsilon);
void ramplus_tl_cuda(const TensorView& base, const std::vector<TensorView>& experts,
                     const TensorView& out, double r, double alpha, double epsilon,
                     StreamHandle stream);

void sce_cpu(const TensorView& base, const std::vector<TensorView>& experts, const TensorView& out,
             double select_topk);
void sce_cuda(const TensorView& base, const std::vector<TensorView>& experts, const TensorView& out,
              double select_topk, StreamHandle stream);

// Rows of row_len elements along the last dim (a 0-d or 1-D tensor is one row).
void arcee_fusion_cpu(const TensorView& base, const TensorView& other, const TensorView& out,
                      int64_t row_len);
void arcee_fusion_cuda(const TensorView& base, const TensorView& other, const TensorView& out,
                       int64_t row_len, StreamHandle stream);

}  // namespace fastmerge
