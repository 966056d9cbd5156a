// One-sided Jacobi sweeps of the CPU batched SVD (svd_cpu.cpp owns loading, sorting and the
// singular vectors). Compiled once per instruction set and chosen at run time; the arithmetic
// is written lane by lane in a fixed blocking, so every build returns bit-identical results.
#pragma once
#include <cstdint>

namespace fastmerge {

// Columns are stored padded with zeros to a multiple of this many floats: rotations keep the
// padding zero, so the kernels never handle a tail.
constexpr int64_t kJacobiLanes = 16;

struct JacobiColumns {
  float* w = nullptr;     // k columns being orthogonalised, w_stride floats apart
  float* v = nullptr;     // k columns of accumulated rotations, v_stride floats apart
  double* norm2 = nullptr;  // |w_j|^2, kept current by the rotations
  int64_t* order = nullptr;  // k entries of scratch: the sweep order
  int64_t k = 0, w_stride = 0, v_stride = 0;
};

// Cyclic-by-rows sweeps over all pairs, columns taken in descending norm order (sorted at the
// start of each sweep), until one sweep rotates nothing or max_sweeps have run.
// A pair is left alone when |<w_p, w_q>| <= tol * |w_p| |w_q|. Returns the sweeps run.
int jacobi_orthogonalise(const JacobiColumns& cols, double tol, int max_sweeps);

}  // namespace fastmerge
