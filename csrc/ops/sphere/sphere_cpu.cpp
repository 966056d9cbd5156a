// CPU passes of the sphere family: per-vector Gram matrices of the (delta) inputs, accumulated
// in double per fixed part (chunks of a vector, or row segments x column blocks when vectors
// are strided) and reduced in part order, and the fp32 output pass out = base + sum_j c_j d_j.
#include <algorithm>
#include <vector>

#include "fastmerge/memory.h"
#include "fastmerge/parallel.h"
#include "sphere.h"
#include "../gta/gta_cpu_kernels.h"  // block loads and stores of any dtype

namespace fastmerge {

namespace {

constexpr int64_t kMaxRowSegments = 16;  // row segments of strided (column) vectors

struct Scratch {
  std::vector<float> base, x, acc;
  std::vector<double> sums;
  std::vector<int64_t> vid;
  float* input(int e) { return x.data() + size_t(e) * kBlock; }
};

Scratch& scratch(int inputs) {
  thread_local Scratch s;
  s.base.resize(kBlock);
  s.acc.resize(kBlock);
  s.vid.resize(kBlock);
  s.x.resize(size_t(inputs) * kBlock);
  return s;
}

// Elements [off, off + len) of every input as fp32 deltas (x_e - base) in s.input(e).
void load_deltas(const TensorView* base, const std::vector<TensorView>& xs, int64_t off, int64_t len,
                 Scratch& s) {
  const GtaBlockKernels& K = gta_block_kernels();
  const float* b = nullptr;
  if (base) {
    K.load(base->data, base->dtype, off, len, s.base.data());
    b = s.base.data();
  }
  for (size_t e = 0; e < xs.size(); ++e) {
    float* x = s.input(int(e));
    K.load(xs[e].data, xs[e].dtype, off, len, x);
    if (b) K.subtract(x, b, len, x);
  }
}

// g[x * n + y] += <d_x, d_y> over one loaded block, for y >= x.
void add_block_gram(Scratch& s, int n, int64_t len, double* g) {
  for (int x = 0; x < n; ++x)
    for (int y = x; y < n; ++y) {
      const float* a = s.input(x);
      const float* b = s.input(y);
      double dot = 0.0;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < len; ++j) dot += double(a[j]) * double(b[j]);
      g[x * n + y] += dot;
    }
}

// Contiguous vectors (inner == 1): parts are kChunk-element segments of each vector.
std::vector<double> row_gram(const TensorView* base, const std::vector<TensorView>& xs,
                             const VectorLayout& L) {
  const int n = int(xs.size()), nn = n * n;
  const int64_t segments = num_chunks(L.len);
  std::vector<double> part(size_t(L.outer * segments) * nn, 0.0);
  auto segment = [&](int64_t o, int64_t sgm) {
    double* g = part.data() + size_t(o * segments + sgm) * nn;
    Scratch& s = scratch(n);
    const int64_t begin = o * L.len + sgm * kChunk;
    const int64_t end = std::min(begin + kChunk, (o + 1) * L.len);
    for (int64_t blk = begin; blk < end; blk += kBlock) {
      const int64_t len = std::min(kBlock, end - blk);
      load_deltas(base, xs, blk, len, s);
      add_block_gram(s, n, len, g);
    }
  };
  if (segments > 1 || L.outer == 1) {
    parallel_for(L.outer * segments, [&](int64_t item) { segment(item / segments, item % segments); });
  } else {  // many short vectors: several per work item
    const int64_t per_item = std::max<int64_t>(1, kChunk / std::max<int64_t>(L.len, 1));
    parallel_for((L.outer + per_item - 1) / per_item, [&](int64_t item) {
      for (int64_t o = item * per_item; o < std::min(L.outer, (item + 1) * per_item); ++o) segment(o, 0);
    });
  }
  std::vector<double> gram(size_t(L.outer) * nn, 0.0);
  for (int64_t o = 0; o < L.outer; ++o) {
    double* g = gram.data() + size_t(o) * nn;
    for (int64_t sgm = 0; sgm < segments; ++sgm)
      for (int k = 0; k < nn; ++k) g[k] += part[size_t(o * segments + sgm) * nn + k];
  }
  return gram;
}

// Strided vectors (inner > 1): parts are (row segment, block of kBlock columns); each column's
// statistics are accumulated over the segment's rows in order.
std::vector<double> column_gram(const TensorView* base, const std::vector<TensorView>& xs,
                                const VectorLayout& L) {
  const int n = int(xs.size()), nn = n * n, pairs = n * (n + 1) / 2;
  const int64_t rows_per = (L.len + kMaxRowSegments - 1) / kMaxRowSegments;
  const int64_t segments = (L.len + rows_per - 1) / rows_per;
  const int64_t col_blocks = (L.inner + kBlock - 1) / kBlock;
  std::vector<double> part(size_t(L.outer * segments * L.inner) * pairs, 0.0);
  parallel_for(L.outer * segments * col_blocks, [&](int64_t item) {
    const int64_t cb = item % col_blocks, sgm = (item / col_blocks) % segments;
    const int64_t o = item / (col_blocks * segments);
    const int64_t c0 = cb * kBlock, w = std::min(kBlock, L.inner - c0);
    Scratch& s = scratch(n);
    s.sums.assign(size_t(pairs) * kBlock, 0.0);
    for (int64_t l = sgm * rows_per; l < std::min(L.len, (sgm + 1) * rows_per); ++l) {
      load_deltas(base, xs, (o * L.len + l) * L.inner + c0, w, s);
      int c = 0;
      for (int x = 0; x < n; ++x)
        for (int y = x; y < n; ++y, ++c) {
          const float* a = s.input(x);
          const float* b = s.input(y);
          double* acc = s.sums.data() + size_t(c) * kBlock;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) acc[j] += double(a[j]) * double(b[j]);
        }
    }
    for (int64_t j = 0; j < w; ++j)
      for (int c = 0; c < pairs; ++c)
        part[(size_t((o * segments + sgm) * L.inner + c0 + j)) * pairs + c] = s.sums[size_t(c) * kBlock + j];
  });
  std::vector<double> gram(size_t(L.count()) * nn, 0.0);
  for (int64_t o = 0; o < L.outer; ++o)
    for (int64_t i = 0; i < L.inner; ++i) {
      double* g = gram.data() + size_t(o * L.inner + i) * nn;
      for (int64_t sgm = 0; sgm < segments; ++sgm) {
        const double* p = part.data() + size_t((o * segments + sgm) * L.inner + i) * pairs;
        int c = 0;
        for (int x = 0; x < n; ++x)
          for (int y = x; y < n; ++y) g[x * n + y] += p[c++];
      }
    }
  return gram;
}

std::vector<double> gram_cpu(const TensorView* base, const std::vector<TensorView>& xs,
                             const VectorLayout& L) {
  const int n = int(xs.size());
  std::vector<double> gram = L.inner == 1 ? row_gram(base, xs, L) : column_gram(base, xs, L);
  for (int64_t v = 0; v < L.count(); ++v) {
    double* g = gram.data() + size_t(v) * n * n;
    for (int x = 0; x < n; ++x)
      for (int y = 0; y < x; ++y) g[x * n + y] = g[y * n + x];
  }
  return gram;
}

// vid[j] = the vector of flat element q + j.
void fill_vectors(const VectorLayout& L, int64_t q, int64_t len, int64_t* vid) {
  if (L.inner == 1) {
    int64_t v = q / L.len, l = q % L.len;
    for (int64_t j = 0; j < len; ++j) {
      vid[j] = v;
      if (++l == L.len) l = 0, ++v;
    }
    return;
  }
  const int64_t plane = L.len * L.inner;
  int64_t o = q / plane, l = (q % plane) / L.inner, i = q % L.inner;
  for (int64_t j = 0; j < len; ++j) {
    vid[j] = o * L.inner + i;
    if (++i == L.inner) {
      i = 0;
      if (++l == L.len) l = 0, ++o;
    }
  }
}

void combine_cpu(const TensorView* base, const std::vector<TensorView>& xs, const VectorLayout& L,
                 const std::vector<float>& coef, const TensorView& out) {
  const int n = int(xs.size());
  const int64_t total = out.numel();
  FM_CHECK(int64_t(coef.size()) == L.count() * n, "one coefficient per vector and input");
  const GtaBlockKernels& K = gta_block_kernels();
  const bool per_vector = L.count() > 1;
  advise_huge_pages(out.data, size_t(total) * size_t(dtype_size(out.dtype)));
  for_each_chunk(total, [&](int64_t, int64_t begin, int64_t end) {
    Scratch& s = scratch(1);
    float* acc = s.acc.data();
    float* d = s.input(0);
    for (int64_t blk = begin; blk < end; blk += kBlock) {
      const int64_t len = std::min(kBlock, end - blk);
      if (per_vector) fill_vectors(L, blk, len, s.vid.data());
      if (base) K.load(base->data, base->dtype, blk, len, s.base.data());
      for (int e = 0; e < n; ++e) {
        K.load(xs[size_t(e)].data, xs[size_t(e)].dtype, blk, len, d);
        if (base) K.subtract(d, s.base.data(), len, d);
        if (per_vector) {
          const int64_t* vid = s.vid.data();
          if (e == 0) {
            for (int64_t j = 0; j < len; ++j) acc[j] = coef[size_t(vid[j] * n)] * d[j];
          } else {
            for (int64_t j = 0; j < len; ++j) acc[j] = acc[j] + coef[size_t(vid[j] * n + e)] * d[j];
          }
        } else {
          const float c = coef[size_t(e)];
          if (e == 0) {
            for (int64_t j = 0; j < len; ++j) acc[j] = c * d[j];
          } else {
            for (int64_t j = 0; j < len; ++j) acc[j] = acc[j] + c * d[j];
          }
        }
      }
      if (base) {
        const float* b = s.base.data();
        for (int64_t j = 0; j < len; ++j) acc[j] = b[j] + acc[j];
      }
      K.store(out.data, out.dtype, blk, len, acc);
    }
  });
}

}  // namespace

const SphereBackend& sphere_cpu_backend() {
  static const SphereBackend backend{gram_cpu, combine_cpu};
  return backend;
}

void nuslerp_cpu(const TensorView* base, const TensorView& v0, const TensorView& v1,
                 const TensorView& out, const VectorLayout& layout, double t, double eps) {
  nuslerp_run(sphere_cpu_backend(), base, v0, v1, out, layout, t, eps);
}

bool multislerp_cpu(const TensorView* base, const std::vector<TensorView>& xs,
                    const TensorView& out, const std::vector<double>& weights, bool normalize,
                    double eps) {
  return multislerp_run(sphere_cpu_backend(), base, xs, out, weights, normalize, eps);
}

void karcher_cpu(const std::vector<TensorView>& xs, const TensorView& out,
                 const std::vector<double>& alphas, int max_iter, double tol) {
  karcher_run(sphere_cpu_backend(), xs, out, alphas, max_iter, tol);
}

}  // namespace fastmerge
