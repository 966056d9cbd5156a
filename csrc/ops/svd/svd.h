// Batched thin SVD of small matrices ("svd" family) by one-sided (Hestenes) Jacobi in fp32.
//
// For each matrix A (m x n) of the batch, with k = min(m, n): the k columns of A (or of A^T
// when m < n) are rotated pairwise until every pair is orthogonal to working precision; their
// norms are the singular values, the normalised columns one set of singular vectors and the
// accumulated rotations the other. Results are sorted by descending singular value (ties keep
// column order), and singular vectors of numerically zero singular values are completed to an
// orthonormal set, as LAPACK's thin SVD returns them.
#pragma once
#include <cmath>
#include <cstdint>

#include "fastmerge/common.h"
#include "fastmerge/tensor.h"

namespace fastmerge {

// Sweeps after which Jacobi stops even if some pair is not yet orthogonal (well-conditioned
// fp32 matrices converge in 6-10).
constexpr int kMaxJacobiSweeps = 40;

// A pair (p, q) is orthogonal enough when |<p, q>| <= tol * |p| |q|, tol = eps32 * sqrt(len).
FM_HD float jacobi_tolerance(int64_t len) {
  return 1.1920929e-7f * sqrtf(float(len < 1 ? 1 : len));
}

// Columns below this fraction of the largest singular value count as zero when the singular
// vectors are completed: their normalised columns would be noise.
FM_HD float zero_singular_threshold(int64_t len) { return 4.0f * jacobi_tolerance(len); }

// Completing `count` orthonormal columns of length len: the residuals of the len canonical
// vectors after projecting out those columns have squared norms summing to len - count, so at
// least one reaches the average (len - count) / len. The first to reach half of it is taken.
// (A fixed bar such as 1/4 fails when the complement is small: with one missing direction in
// 64 dims, the largest residual is typically ~0.1.)
FM_HD double completion_acceptance(int64_t len, int64_t count) {
  return 0.5 * double(len - count) / double(len);
}

// Singular values are sorted by descending squared column norm with NaN last (a NaN input
// turns every column NaN within one sweep); a plain > would not be a strict weak order.
FM_HD double singular_sort_key(double norm2) { return norm2 == norm2 ? norm2 : -1.0; }

// The rotation that orthogonalises columns p and q given a = |p|^2, b = |q|^2, c = <p, q> != 0:
// p' = cs * p - sn * q, q' = sn * p + cs * q, the smaller angle, computed in double.
// Rutishauser's t = sign(zeta) / (|zeta| + sqrt(1 + zeta^2)) with zeta = d / c, d = (b - a) / 2,
// rewritten with h = sqrt(d^2 + c^2) and g = |d| + h: t = sign(zeta) |c| / g, and since
// g^2 + c^2 = 2 h g, cs = g / sqrt(2 h g), sn = sign(zeta) |c| / sqrt(2 h g). Two square roots
// and one division on the critical path instead of two, three (the Jacobi SVD waits on this
// for every pair: 22% of the CPU time at 64x64). a == b takes t = +1, as zeta = +-0 does.
struct JacobiRotation { double cs, sn; };
FM_HD JacobiRotation jacobi_rotation(double a, double b, double c) {
  const double d = 0.5 * (b - a);
  const double h = sqrt(d * d + c * c);
  const double g = fabs(d) + h;
  const double inv_r = 1.0 / sqrt(2.0 * h * g);
  const bool positive = d == 0.0 || ((d > 0.0) == (c > 0.0));
  return {g * inv_r, (positive ? fabs(c) : -fabs(c)) * inv_r};
}

// Launcher-side checks: x is [batch, m, n] (any float dtype), u [batch, m, k], s [batch, k],
// vh [batch, k, n], all contiguous, u/s/vh float32. Returns k.
int64_t check_svd_inputs(const TensorView& x, const TensorView& u, const TensorView& s,
                         const TensorView& vh);

void batched_svd_cpu(const TensorView& x, const TensorView& u, const TensorView& s,
                     const TensorView& vh);
void batched_svd_cuda(const TensorView& x, const TensorView& u, const TensorView& s,
                      const TensorView& vh, StreamHandle stream);

}  // namespace fastmerge
