// CPU batched SVD: one matrix per task (OpenMP over the batch). The Jacobi sweeps themselves are
// in svd_cpu_kernels.cpp (one build per instruction set); this file loads the columns, sorts
// the singular values and forms the singular vectors.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "fastmerge/parallel.h"
#include "svd.h"
#include "svd_cpu_kernels.h"

namespace fastmerge {

namespace {

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

struct SvdWorkspace {
  std::vector<float> w;          // k columns of length len (padded): the matrix being orthogonalised
  std::vector<float> v;          // k columns of length k (padded): the accumulated rotations
  std::vector<double> norm2;     // |w_j|^2
  std::vector<int64_t> order;    // columns by descending singular value
  std::vector<int64_t> sweep_order;  // the Jacobi kernel's scratch
  std::vector<double> left;      // sorted, normalised (or completed) columns of w
};

// out = e - B B^T e for the canonical vector e and the first `count` columns of `basis` (each of
// length len), Gram-Schmidt twice so it is orthogonal to roundoff. Returns |out|^2.
double canonical_residual(const double* basis, int64_t count, int64_t len, int64_t e,
                          double* out) {
  std::fill(out, out + len, 0.0);
  out[e] = 1.0;
  for (int round = 0; round < 2; ++round) {
    for (int64_t j = 0; j < count; ++j) {
      const double* b = basis + j * len;
      double proj = 0.0;
      for (int64_t i = 0; i < len; ++i) proj += b[i] * out[i];
      for (int64_t i = 0; i < len; ++i) out[i] -= proj * b[i];
    }
  }
  double norm2 = 0.0;
  for (int64_t i = 0; i < len; ++i) norm2 += out[i] * out[i];
  return norm2;
}

// Orthonormal completion: a unit vector orthogonal to the first `count` (< len) columns of
// `basis`, from the canonical vectors starting at *cursor (see completion_acceptance); the
// largest residual if rounding leaves none above the bar.
void complete_column(const double* basis, int64_t count, int64_t len, int64_t* cursor,
                     double* out) {
  const double accept = completion_acceptance(len, count);
  int64_t best = -1, held = -1;  // held: the canonical vector whose residual is in out
  double best_norm2 = -1.0;
  for (int64_t tries = 0; tries < len; ++tries) {
    const int64_t e = (*cursor + tries) % len;
    const double norm2 = canonical_residual(basis, count, len, e, out);
    held = e;
    if (norm2 > best_norm2) {
      best = e;
      best_norm2 = norm2;
    }
    if (norm2 >= accept) break;
  }
  if (held != best) canonical_residual(basis, count, len, best, out);
  const double inv = 1.0 / std::sqrt(best_norm2);
  for (int64_t i = 0; i < len; ++i) out[i] *= inv;
  *cursor = best + 1;
}

void svd_one(const TensorView& x, int64_t b, int64_t m, int64_t n, const TensorView& u,
             const TensorView& s, const TensorView& vh, SvdWorkspace& ws) {
  const int64_t k = std::min(m, n);
  const bool transposed = m < n;  // orthogonalise the rows of A (the columns of A^T)
  const int64_t len = transposed ? n : m;
  const int64_t base = b * m * n;
  const int64_t w_stride = round_up(len, kJacobiLanes), v_stride = round_up(k, kJacobiLanes);
  ws.w.assign(size_t(k * w_stride), 0.0f);
  ws.v.assign(size_t(k * v_stride), 0.0f);
  ws.norm2.resize(size_t(k));
  for (int64_t j = 0; j < k; ++j) {
    float* col = ws.w.data() + j * w_stride;
    double norm2 = 0.0;
    for (int64_t i = 0; i < len; ++i) {
      col[i] = load_host(x, base + (transposed ? j * n + i : i * n + j));
      norm2 += double(col[i]) * double(col[i]);
    }
    ws.v[size_t(j * v_stride + j)] = 1.0f;
    ws.norm2[size_t(j)] = norm2;
  }
  JacobiColumns cols;
  cols.w = ws.w.data();
  cols.v = ws.v.data();
  cols.norm2 = ws.norm2.data();
  ws.sweep_order.resize(size_t(k));
  cols.order = ws.sweep_order.data();
  cols.k = k;
  cols.w_stride = w_stride;
  cols.v_stride = v_stride;
  jacobi_orthogonalise(cols, jacobi_tolerance(len), kMaxJacobiSweeps);

  // Sort by descending singular value; ties keep column order.
  ws.order.resize(size_t(k));
  std::iota(ws.order.begin(), ws.order.end(), int64_t(0));
  std::stable_sort(ws.order.begin(), ws.order.end(), [&](int64_t i, int64_t j) {
    return singular_sort_key(ws.norm2[size_t(i)]) > singular_sort_key(ws.norm2[size_t(j)]);
  });
  const double sigma_max = k ? std::sqrt(ws.norm2[size_t(ws.order[0])]) : 0.0;
  const double zero_below = double(zero_singular_threshold(len)) * sigma_max;

  ws.left.resize(size_t(k * len));
  int64_t cursor = 0;
  float* U = u.ptr<float>() + b * m * k;
  float* S = s.ptr<float>() + b * k;
  float* Vh = vh.ptr<float>() + b * k * n;
  for (int64_t r = 0; r < k; ++r) {
    const int64_t j = ws.order[size_t(r)];
    const double sigma = std::sqrt(ws.norm2[size_t(j)]);
    double* y = ws.left.data() + r * len;
    if (sigma > zero_below && sigma > 0.0) {
      const float* col = ws.w.data() + j * w_stride;
      for (int64_t i = 0; i < len; ++i) y[i] = double(col[i]) / sigma;
    } else {
      complete_column(ws.left.data(), r, len, &cursor, y);
    }
    S[r] = float(sigma);
    const float* vj = ws.v.data() + j * v_stride;
    if (!transposed) {  // A = Y S V^T: U = Y (m x k), Vh = V^T (k x n, n == k)
      for (int64_t i = 0; i < len; ++i) U[i * k + r] = float(y[i]);
      for (int64_t i = 0; i < k; ++i) Vh[r * n + i] = vj[i];
    } else {            // A^T = Y S V^T: U = V (m x k, m == k), Vh = Y^T (k x n)
      for (int64_t i = 0; i < k; ++i) U[i * k + r] = vj[i];
      for (int64_t i = 0; i < len; ++i) Vh[r * n + i] = float(y[i]);
    }
  }
}

}  // namespace

void batched_svd_cpu(const TensorView& x, const TensorView& u, const TensorView& s,
                     const TensorView& vh) {
  const int64_t k = check_svd_inputs(x, u, s, vh);
  const int64_t batch = x.shape[0], m = x.shape[1], n = x.shape[2];
  if (k == 0 || batch == 0) return;
  parallel_for(batch, [&](int64_t b) {
    thread_local SvdWorkspace ws;
    svd_one(x, b, m, n, u, s, vh, ws);
  });
}

}  // namespace fastmerge
