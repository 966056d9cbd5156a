// Spherical merges ("sphere" family): mergekit 0.1.5's nuslerp, multislerp and karcher.
//
// All three live in the span of their (delta) inputs x_j (= model_j - base when a base is
// given), so each is one statistics pass and one output pass:
//   1. gram: per "vector" v, the Gram matrix G_v[j][k] = <x_j, x_k> of the inputs' fp32 values,
//      accumulated in double per fixed-size part and reduced in a fixed order (results do not
//      depend on the thread count or the schedule);
//   2. host: mergekit's formulas evaluated on those N x N numbers give per-vector coefficients
//      c_v[j] (nuslerp's slerp weights, multislerp's barycentre, the whole Karcher iteration);
//   3. combine: out = base + sum_j c_v[j] * (x_j - base) in fp32 (no base: sum_j c_v[j] * x_j),
//      rounded once to the output dtype.
// CPU (sphere_cpu.cpp) and CUDA (sphere_cuda.cu) implement gram and combine; the host steps
// (sphere_scalars.cpp) are shared, so both devices compute the same coefficients from the
// same statistics.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/tensor.h"

namespace fastmerge {

// Vectors of a tensor of outer * len * inner elements: vector (o, i) holds the elements
// o * len * inner + l * inner + i for l in [0, len). Flattened: [1, numel, 1]; reduced over
// dim d of a shape: [prod(shape[:d]), shape[d], prod(shape[d+1:])].
struct VectorLayout {
  int64_t outer = 1, len = 0, inner = 1;
  FM_HD int64_t count() const { return outer * inner; }
  FM_HD int64_t numel() const { return outer * len * inner; }
  // Index of the vector that holds flat element q.
  FM_HD int64_t vector_of(int64_t q) const {
    return inner == 1 ? q / len : (q / (len * inner)) * inner + q % inner;
  }
};

// A device's two passes. gram returns count() * N * N doubles (full symmetric matrices, one
// per vector, of the fp32 values x_j - base); combine takes count() * N coefficients.
struct SphereBackend {
  std::function<std::vector<double>(const TensorView* base, const std::vector<TensorView>& xs,
                                    const VectorLayout& layout)>
      gram;
  std::function<void(const TensorView* base, const std::vector<TensorView>& xs,
                     const VectorLayout& layout, const std::vector<float>& coef,
                     const TensorView& out)>
      combine;
};

// ---- host math (sphere_scalars.cpp) ----

// mergekit's nuslerp coefficients of (v0, v1) from |v0|^2, |v1|^2 and <v0, v1>.
struct NuslerpCoefficients { float a, b; };
NuslerpCoefficients nuslerp_coefficients(double aa, double bb, double ab, double t, float eps);

// multislerp's coefficients over its N inputs from their Gram matrix; false when mergekit
// raises (the weighted mean of the unit vectors vanishes and N != 2).
bool multislerp_coefficients(const double* gram, int n, const std::vector<double>& weights,
                             bool normalize, double eps, std::vector<float>& coef);

// karcher's coefficients over its N inputs from their Gram matrix (alphas per input).
std::vector<float> karcher_coefficients(const double* gram, int n,
                                        const std::vector<double>& alphas, int max_iter,
                                        double tol);

// ---- the ops on any backend (sphere_scalars.cpp) ----

void nuslerp_run(const SphereBackend& be, const TensorView* base, const TensorView& v0,
                 const TensorView& v1, const TensorView& out, const VectorLayout& layout,
                 double t, double eps);
// Returns false (out untouched) where mergekit raises ValueError.
bool multislerp_run(const SphereBackend& be, const TensorView* base,
                    const std::vector<TensorView>& xs, const TensorView& out,
                    const std::vector<double>& weights, bool normalize, double eps);
void karcher_run(const SphereBackend& be, const std::vector<TensorView>& xs,
                 const TensorView& out, const std::vector<double>& alphas, int max_iter,
                 double tol);

// ---- launchers ----

const SphereBackend& sphere_cpu_backend();

void nuslerp_cpu(const TensorView* base, const TensorView& v0, const TensorView& v1,
                 const TensorView& out, const VectorLayout& layout, double t, double eps);
bool multislerp_cpu(const TensorView* base, const std::vector<TensorView>& xs,
                    const TensorView& out, const std::vector<double>& weights, bool normalize,
                    double eps);
void karcher_cpu(const std::vector<TensorView>& xs, const TensorView& out,
                 const std::vector<double>& alphas, int max_iter, double tol);

void nuslerp_cuda(const TensorView* base, const TensorView& v0, const TensorView& v1,
                  const TensorView& out, const VectorLayout& layout, double t, double eps,
                  StreamHandle stream);
bool multislerp_cuda(const TensorView* base, const std::vector<TensorView>& xs,
                     const TensorView& out, const std::vector<double>& weights, bool normalize,
                     double eps, StreamHandle stream);
void karcher_cuda(const std::vector<TensorView>& xs, const TensorView& out,
                  const std::vector<double>& alphas, int max_iter, double tol,
                  StreamHandle stream);

}  // namespace fastmerge
