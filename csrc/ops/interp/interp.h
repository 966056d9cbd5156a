// Interpolation merges ("interp" family): slerp and model_stock, each a statistics pass
// (norms, dots) and an output pass, and the elementwise nearswap, with mergekit 0.1.5's
// formulas in fp32.
#pragma once
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/tensor.h"

namespace fastmerge {

// NearSwap: the other model's value where the two are within t of each other, blending
// toward the base as they drift apart: w = clamp(t / max(|a - b|, 1e-6), 0, 1),
// out = w * b + (1 - w) * a. The division is a reciprocal times t, as torch evaluates
// mergekit's `t / tensor`, so fp32 results match mergekit's bit for bit; NaN propagates.
FM_HD float nearswap_element(float a, float b, float t) {
  float d = a - b;
  d = d < 0.0f ? -d : d;
  const float denom = d < 1e-6f ? 1e-6f : d;  // NaN stays NaN
  float w = (1.0f / denom) * t;
  w = w < 0.0f ? 0.0f : w;
  w = w > 1.0f ? 1.0f : w;
  return w * b + (1.0f - w) * a;
}

// Coefficients of mergekit's slerp from the flattened tensors' statistics:
// out = coef_a * a + coef_b * b.
struct SlerpCoefficients { float a, b; };
SlerpCoefficients slerp_coefficients(double aa, double bb, double ab, float t);

// Model Stock interpolation ratio t for one row from the offsets' Gram matrix
// (gram[i * T + j] = <w_i - w_0, w_j - w_0>).
float model_stock_ratio(const double* gram, int experts);

// Launcher-side checks of the two-tensor ops (slerp, nearswap): a, b and out hold the same
// number of contiguous elements; returns it.
int64_t check_pair_inputs(const TensorView& a, const TensorView& b, const TensorView& out);

// Launcher-side checks of model_stock (CPU and CUDA); returns numel.
int64_t check_model_stock_inputs(const TensorView& base, const std::vector<TensorView>& experts,
                                 const TensorView& out, int64_t rows);

void slerp_cpu(const TensorView& a, const TensorView& b, const TensorView& out, double t);
void slerp_cuda(const TensorView& a, const TensorView& b, const TensorView& out, double t,
                StreamHandle stream);

void nearswap_cpu(const TensorView& a, const TensorView& b, const TensorView& out, double t);
void nearswap_cuda(const TensorView& a, const TensorView& b, const TensorView& out, double t,
                   StreamHandle stream);

// rows == 1 flattens the tensors (mergekit's default); rows > 1 treats them as rows of
// numel / rows elements (filter_wise).
void model_stock_cpu(const TensorView& base, const std::vector<TensorView>& experts,
                     const TensorView& out, int64_t rows);
void model_stock_cuda(const TensorView& base, const std::vector<TensorView>& experts,
                      const TensorView& out, int64_t rows, StreamHandle stream);

}  // namespace fastmerge
