// One-sided Jacobi sweeps (see svd_cpu_kernels.h), compiled once per instruction set.
//
// Dot products and norms accumulate in double: the orthogonality test compares a dot product
// with eps32 * sqrt(len) * |p| |q|, which fp32 accumulation would not resolve. Columns feed
// 8-lane double accumulators in a fixed blocking, so the generic, AVX2 and AVX-512 builds
// round identically (no FMA contraction, see CMakeLists.txt).
#include <cstdint>

#include "fastmerge/cpu_isa.h"
#include "svd.h"
#include "svd_cpu_kernels.h"

#include "fastmerge/isa_begin.h"

// The vector helpers below are internal (inlined, never exported), so the generic build's note
// that passing 32/64-byte vectors by value changes the ABI does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

typedef float f8 __attribute__((vector_size(32)));
typedef double d8 __attribute__((vector_size(64)));

inline f8 load8(const float* p) {
  f8 x;
  __builtin_memcpy(&x, p, sizeof(x));
  return x;
}
inline void store8(float* p, f8 x) { __builtin_memcpy(p, &x, sizeof(x)); }
inline d8 widen(f8 x) { return __builtin_convertvector(x, d8); }

inline double lane_sum(d8 x) {
  return ((x[0] + x[4]) + (x[2] + x[6])) + ((x[1] + x[5]) + (x[3] + x[7]));
}

double column_dot(const float* x, const float* y, int64_t stride) {
  d8 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};  // four chains: the adds are latency-bound
  int64_t i = 0;
  for (; i + 32 <= stride; i += 32) {
    acc0 += widen(load8(x + i)) * widen(load8(y + i));
    acc1 += widen(load8(x + i + 8)) * widen(load8(y + i + 8));
    acc2 += widen(load8(x + i + 16)) * widen(load8(y + i + 16));
    acc3 += widen(load8(x + i + 24)) * widen(load8(y + i + 24));
  }
  if (i < stride) {  // stride is a multiple of 16
    acc0 += widen(load8(x + i)) * widen(load8(y + i));
    acc1 += widen(load8(x + i + 8)) * widen(load8(y + i + 8));
  }
  return lane_sum((acc0 + acc2) + (acc1 + acc3));
}

// x' = cs x - sn y, y' = sn x + cs y.
void rotate_columns(float* x, float* y, int64_t stride, float cs, float sn) {
  for (int64_t i = 0; i < stride; i += 8) {
    const f8 a = load8(x + i), b = load8(y + i);
    store8(x + i, cs * a - sn * b);
    store8(y + i, sn * a + cs * b);
  }
}

// rotate_columns(x, y) and then <x', z>, in one pass: the dot product of the next pair of the
// row reads x' from registers. Same blocking (and so the same rounding) as column_dot.
double rotate_columns_then_dot(float* x, float* y, const float* z, int64_t stride, float cs,
                               float sn) {
  d8 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  int64_t i = 0;
  auto block = [&](int64_t at, d8& acc) {
    const f8 a = load8(x + at), b = load8(y + at);
    const f8 na = cs * a - sn * b;
    store8(x + at, na);
    store8(y + at, sn * a + cs * b);
    acc += widen(na) * widen(load8(z + at));
  };
  for (; i + 32 <= stride; i += 32) {
    block(i, acc0);
    block(i + 8, acc1);
    block(i + 16, acc2);
    block(i + 24, acc3);
  }
  if (i < stride) {
    block(i, acc0);
    block(i + 8, acc1);
  }
  return lane_sum((acc0 + acc2) + (acc1 + acc3));
}

}  // namespace

// Below this fraction of its previous value, a column norm updated from the rotation has lost
// too many digits to cancellation and is recomputed from the column.
constexpr double kNormRecompute = 1.0 / 64.0;

// order[0..k) by descending norm2, ties by position in the previous order (insertion sort:
// after the first sweeps the columns are nearly sorted already).
void sort_by_norm(int64_t* order, const double* norm2, int64_t k) {
  for (int64_t i = 1; i < k; ++i) {
    const int64_t j = order[i];
    int64_t at = i;
    while (at > 0 && norm2[order[at - 1]] < norm2[j]) {
      order[at] = order[at - 1];
      --at;
    }
    order[at] = j;
  }
}

int jacobi_orthogonalise(const JacobiColumns& c, double tol, int max_sweeps) {
  for (int64_t j = 0; j < c.k; ++j) c.order[j] = j;
  int sweep = 0;
  while (sweep < max_sweeps) {
    ++sweep;
    // Norms are exact at the start of every sweep and updated from the rotations within it
    // (a' = a - t c, b' = b + t c), so rounding drift never outlives one sweep.
    bool finite = true;
    for (int64_t j = 0; j < c.k; ++j) {
      c.norm2[j] = column_dot(c.w + j * c.w_stride, c.w + j * c.w_stride, c.w_stride);
      finite = finite && c.norm2[j] - c.norm2[j] == 0.0;
    }
    // A NaN or Inf has reached every column after one sweep (each pair meets): the result is
    // NaN whatever follows, so do not run the 40 sweeps the stop rule would allow.
    if (!finite && sweep > 1) break;
    // Sweeping the columns in descending norm order converges in fewer sweeps (de Rijk's
    // pivoting; 10 -> 7-8 sweeps on 64x64 Gaussian matrices).
    sort_by_norm(c.order, c.norm2, c.k);
    bool rotated = false;
    for (int64_t i = 0; i + 1 < c.k; ++i) {
      const int64_t p = c.order[i];
      float* wp = c.w + p * c.w_stride;
      double pq = column_dot(wp, c.w + c.order[i + 1] * c.w_stride, c.w_stride);
      for (int64_t jq = i + 1; jq < c.k; ++jq) {
        const int64_t q = c.order[jq];
        float* wq = c.w + q * c.w_stride;
        const float* next = jq + 1 < c.k ? c.w + c.order[jq + 1] * c.w_stride : nullptr;
        const double a = c.norm2[p], b = c.norm2[q];
        if (pq == 0.0 || __builtin_fabs(pq) <= tol * __builtin_sqrt(a * b)) {
          if (next) pq = column_dot(wp, next, c.w_stride);
          continue;
        }
        const JacobiRotation r = jacobi_rotation(a, b, pq);
        const float cs = float(r.cs), sn = float(r.sn);
        const double shift = (r.sn / r.cs) * pq;
        if (next) {
          pq = rotate_columns_then_dot(wp, wq, next, c.w_stride, cs, sn);
        } else {
          rotate_columns(wp, wq, c.w_stride, cs, sn);
        }
        rotate_columns(c.v + p * c.v_stride, c.v + q * c.v_stride, c.v_stride, cs, sn);
        c.norm2[p] = a - shift;
        c.norm2[q] = b + shift;
        if (!(c.norm2[p] > kNormRecompute * a)) c.norm2[p] = column_dot(wp, wp, c.w_stride);
        if (!(c.norm2[q] > kNormRecompute * b)) c.norm2[q] = column_dot(wq, wq, c.w_stride);
        rotated = true;
      }
    }
    if (!rotated) break;
  }
  // Exact norms for the singular values.
  for (int64_t j = 0; j < c.k; ++j)
    c.norm2[j] = column_dot(c.w + j * c.w_stride, c.w + j * c.w_stride, c.w_stride);
  return sweep;
}

#include "fastmerge/isa_end.h"

#if !defined(FM_ISA) || FM_ISA == 0
namespace fastmerge {
#define FM_DECLARE_JACOBI(ns) \
  namespace ns {              \
  int jacobi_orthogonalise(const JacobiColumns& c, double tol, int max_sweeps); \
  }
FM_FOR_EACH_ISA(FM_DECLARE_JACOBI)
#undef FM_DECLARE_JACOBI
int jacobi_orthogonalise(const JacobiColumns& c, double tol, int max_sweeps) {
  FM_CPU_DISPATCH(jacobi_orthogonalise, c, tol, max_sweeps)
}
}  // namespace fastmerge
#endif
