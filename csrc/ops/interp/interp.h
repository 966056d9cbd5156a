// Interpolation merges ("interp" family): slerp and model_stock, each a statistics pass
// (norms, dots) and an output pass, with mergekit 0.1.5's formulas in fp32.
#pragma once
#include <vector>

#include "fastmerge/tensor.h"

namespace fastmerge {

// Coefficients of mergekit's slerp from the flattened tensors' statistics:
// out = coef_a * a + coef_b * b.
struct SlerpCoefficients { float a, b; };
SlerpCoefficients slerp_coefficients(double aa, double bb, double ab, float t);

// Model Stock interpolation ratio t for one row from the offsets' Gram matrix
// (gram[i * T + j] = <w_i - w_0, w_j - w_0>).
float model_stock_ratio(const double* gram, int experts);

// Launcher-side checks of model_stock (CPU and CUDA); returns numel.
int64_t check_model_stock_inputs(const TensorView& base, const std::vector<TensorView>& experts,
                                 const TensorView& out, int64_t rows);

void slerp_cpu(const TensorView& a, const TensorView& b, const TensorView& out, double t);
void slerp_cuda(const TensorView& a, const TensorView& b, const TensorView& out, double t,
                StreamHandle stream);

// rows == 1 flattens the tensors (mergekit's default); rows > 1 treats them as rows of
// numel / rows elements (filter_wise).
void model_stock_cpu(const TensorView& base, const std::vector<TensorView>& experts,
                     const TensorView& out, int64_t rows);
void model_stock_cuda(const TensorView& base, const std::vector<TensorView>& experts,
                      const TensorView& out, int64_t rows, StreamHandle stream);

}  // namespace fastmerge
