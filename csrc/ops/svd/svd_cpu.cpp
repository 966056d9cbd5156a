// CPU batched SVD: one matrix per task (OpenMP over the batch), cyclic-by-rows one-sided Jacobi
// on fp32 columns with dot products accumulated in double.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "fastmerge/parallel.h"
#include "svd.h"

namespace fastmerge {

namespace {

struct SvdWorkspace {
  std::vector<float> w;          // k columns of length len: the matrix being orthogonalised
  std::vector<float> v;          // k columns of length k: the accumulated rotations
  std::vector<double> norm2;     // |w_j|^2
  std::vector<int64_t> order;    // columns by descending singular value
  std::vector<double> left;      // sorted, normalised (or completed) columns of w
};

double dot(const float* x, const float* y, int64_t len) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < len; ++i) acc += double(x[i]) * double(y[i]);
  return acc;
}

// Applies the rotation to columns x and y; returns their new squared norms.
void rotate(float* x, float* y, int64_t len, float cs, float sn, double* xx, double* yy) {
  double sx = 0.0, sy = 0.0;
#pragma omp simd reduction(+ : sx, sy)
  for (int64_t i = 0; i < len; ++i) {
    const float a = x[i], b = y[i];
    const float na = cs * a - sn * b;
    const float nb = sn * a + cs * b;
    x[i] = na;
    y[i] = nb;
    sx += double(na) * double(na);
    sy += double(nb) * double(nb);
  }
  if (xx) *xx = sx;
  if (yy) *yy = sy;
}

void rotate(float* x, float* y, int64_t len, float cs, float sn) {
  rotate(x, y, len, cs, sn, nullptr, nullptr);
}

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
  ws.w.resize(size_t(k * len));
  ws.v.assign(size_t(k * k), 0.0f);
  ws.norm2.resize(size_t(k));
  for (int64_t j = 0; j < k; ++j) {
    float* col = ws.w.data() + j * len;
    for (int64_t i = 0; i < len; ++i)
      col[i] = load_host(x, base + (transposed ? j * n + i : i * n + j));
    ws.v[size_t(j * k + j)] = 1.0f;
    ws.norm2[size_t(j)] = dot(col, col, len);
  }

  const double tol = jacobi_tolerance(len);
  for (int sweep = 0; sweep < kMaxJacobiSweeps; ++sweep) {
    bool rotated = false;
    for (int64_t p = 0; p + 1 < k; ++p) {
      for (int64_t q = p + 1; q < k; ++q) {
        float* wp = ws.w.data() + p * len;
        float* wq = ws.w.data() + q * len;
        const double a = ws.norm2[size_t(p)], bq = ws.norm2[size_t(q)];
        const double c = dot(wp, wq, len);
        if (c == 0.0 || std::fabs(c) <= tol * std::sqrt(a * bq)) continue;
        const JacobiRotation r = jacobi_rotation(a, bq, c);
        rotate(wp, wq, len, float(r.cs), float(r.sn), &ws.norm2[size_t(p)], &ws.norm2[size_t(q)]);
        rotate(ws.v.data() + p * k, ws.v.data() + q * k, k, float(r.cs), float(r.sn));
        rotated = true;
      }
    }
    if (!rotated) break;
  }

  // Sort by descending singular value; ties keep column order.
  ws.order.resize(size_t(k));
  std::iota(ws.order.begin(), ws.order.end(), int64_t(0));
  std::stable_sort(ws.order.begin(), ws.order.end(), [&](int64_t i, int64_t j) {
    return ws.norm2[size_t(i)] > ws.norm2[size_t(j)];
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
      const float* col = ws.w.data() + j * len;
      for (int64_t i = 0; i < len; ++i) y[i] = double(col[i]) / sigma;
    } else {
      complete_column(ws.left.data(), r, len, &cursor, y);
    }
    S[r] = float(sigma);
    const float* vj = ws.v.data() + j * k;
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
