// CPU slerp and model_stock: per-chunk (or per-row) partial statistics in double, reduced in a
// fixed order, then one output pass.
#include <algorithm>
#include <vector>

#include "fastmerge/memory.h"
#include "fastmerge/parallel.h"
#include "interp.h"
#include "../gta/gta_cpu_kernels.h"  // block loads and stores of any dtype

namespace fastmerge {

namespace {

// Per-thread float blocks: base, output and one per expert.
struct Blocks {
  std::vector<float> base, out, experts;
  float* expert(int e) { return experts.data() + size_t(e) * kBlock; }
};

Blocks& blocks_for(int experts) {
  thread_local Blocks blocks;
  blocks.base.resize(kBlock);
  blocks.out.resize(kBlock);
  blocks.experts.resize(size_t(experts) * kBlock);
  return blocks;
}

// out[i] = fn(a[i], b[i]) in fp32 blocks, for any input and output dtypes.
template <typename Fn>
void pairwise_output(const TensorView& a, const TensorView& b, const TensorView& out, Fn fn) {
  const int64_t n = out.numel();
  const GtaBlockKernels& K = gta_block_kernels();
  advise_huge_pages(out.data, size_t(n) * size_t(dtype_size(out.dtype)));
  for_each_chunk(n, [&](int64_t, int64_t begin, int64_t end) {
    Blocks& s = blocks_for(2);
    for_each_block(begin, end, [&](int64_t blk, int64_t len) {
      K.load(a.data, a.dtype, blk, len, s.expert(0));
      K.load(b.data, b.dtype, blk, len, s.expert(1));
      const float* x = s.expert(0);
      const float* y = s.expert(1);
      for (int64_t j = 0; j < len; ++j) s.out[size_t(j)] = fn(x[j], y[j]);
      K.store(out.data, out.dtype, blk, len, s.out.data());
    });
  });
}

}  // namespace

void slerp_cpu(const TensorView& a, const TensorView& b, const TensorView& out, double t) {
  const int64_t n = check_pair_inputs(a, b, out);
  const GtaBlockKernels& K = gta_block_kernels();
  const int64_t chunks = num_chunks(n);
  std::vector<double> partial(size_t(chunks) * 3, 0.0);
  for_each_chunk(n, [&](int64_t c, int64_t begin, int64_t end) {
    Blocks& s = blocks_for(2);
    double aa = 0, bb = 0, ab = 0;
    for_each_block(begin, end, [&](int64_t blk, int64_t len) {
      const float* x = s.expert(0);
      const float* y = s.expert(1);
      K.load(a.data, a.dtype, blk, len, s.expert(0));
      K.load(b.data, b.dtype, blk, len, s.expert(1));
#pragma omp simd reduction(+ : aa, bb, ab)
      for (int64_t j = 0; j < len; ++j) {
        const double xd = x[j], yd = y[j];
        aa += xd * xd;
        bb += yd * yd;
        ab += xd * yd;
      }
    });
    partial[size_t(c) * 3 + 0] = aa;
    partial[size_t(c) * 3 + 1] = bb;
    partial[size_t(c) * 3 + 2] = ab;
  });
  double aa = 0, bb = 0, ab = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    aa += partial[size_t(c) * 3 + 0];
    bb += partial[size_t(c) * 3 + 1];
    ab += partial[size_t(c) * 3 + 2];
  }
  const SlerpCoefficients k = slerp_coefficients(aa, bb, ab, float(t));
  pairwise_output(a, b, out, [&](float x, float y) { return k.a * x + k.b * y; });
}

void nearswap_cpu(const TensorView& a, const TensorView& b, const TensorView& out, double t) {
  const int64_t n = check_pair_inputs(a, b, out);
  const float tf = float(t);
  pairwise_output(a, b, out, [&](float x, float y) { return nearswap_element(x, y, tf); });
}

void model_stock_cpu(const TensorView& base, const std::vector<TensorView>& experts,
                     const TensorView& out, int64_t rows) {
  const int64_t n = check_model_stock_inputs(base, experts, out, rows);
  const int T = int(experts.size());
  if (n == 0) return;
  const GtaBlockKernels& K = gta_block_kernels();
  const int64_t row_len = n / rows;
  // Gram matrices of the offsets w_e - w_0: per row, or per chunk of the single flattened row.
  const bool split_row = rows == 1;
  const int64_t parts = split_row ? num_chunks(n) : rows;
  std::vector<double> gram(size_t(parts) * T * T, 0.0);
  auto accumulate = [&](int64_t part, int64_t begin, int64_t end) {
    double* g = gram.data() + size_t(part) * T * T;
    Blocks& s = blocks_for(T);
    for_each_block(begin, end, [&](int64_t blk, int64_t len) {
      K.load(base.data, base.dtype, blk, len, s.base.data());
      for (int e = 0; e < T; ++e) {
        K.load(experts[size_t(e)].data, experts[size_t(e)].dtype, blk, len, s.expert(e));
        K.subtract(s.expert(e), s.base.data(), len, s.expert(e));
      }
      for (int x = 0; x < T; ++x)
        for (int y = x; y < T; ++y) {
          const float* ox = s.expert(x);
          const float* oy = s.expert(y);
          double dot = 0.0;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < len; ++j) dot += double(ox[j]) * double(oy[j]);
          g[x * T + y] += dot;
        }
    });
  };
  if (split_row) {
    for_each_chunk(n, accumulate);
  } else {
    parallel_for(rows, [&](int64_t r) { accumulate(r, r * row_len, (r + 1) * row_len); });
  }
  std::vector<float> ratio(static_cast<size_t>(rows));
  std::vector<double> total(size_t(T) * T, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    if (split_row) {
      for (int64_t p = 0; p < parts; ++p)
        for (int k = 0; k < T * T; ++k) total[size_t(k)] += gram[size_t(p) * T * T + k];
    } else {
      for (int k = 0; k < T * T; ++k) total[size_t(k)] = gram[size_t(r) * T * T + k];
    }
    for (int x = 0; x < T; ++x)
      for (int y = 0; y < x; ++y) total[size_t(x) * T + y] = total[size_t(y) * T + x];
    ratio[size_t(r)] = model_stock_ratio(total.data(), T);
  }
  // out = t * mean(experts) + (1 - t) * base, with mergekit's order: the experts summed in
  // order, then divided by their count.
  advise_huge_pages(out.data, size_t(n) * size_t(dtype_size(out.dtype)));
  auto write = [&](float t, int64_t begin, int64_t end) {
    Blocks& s = blocks_for(1);
    for_each_block(begin, end, [&](int64_t blk, int64_t len) {
      float* sum = s.out.data();
      float* e = s.expert(0);
      for (int64_t j = 0; j < len; ++j) sum[j] = 0.0f;
      for (int x = 0; x < T; ++x) {
        K.load(experts[size_t(x)].data, experts[size_t(x)].dtype, blk, len, e);
        for (int64_t j = 0; j < len; ++j) sum[j] += e[j];
      }
      K.load(base.data, base.dtype, blk, len, s.base.data());
      const float* w0 = s.base.data();
      for (int64_t j = 0; j < len; ++j) sum[j] = t * (sum[j] / float(T)) + (1.0f - t) * w0[j];
      K.store(out.data, out.dtype, blk, len, sum);
    });
  };
  if (split_row) {
    for_each_chunk(n, [&](int64_t, int64_t begin, int64_t end) { write(ratio[0], begin, end); });
  } else {
    parallel_for(rows, [&](int64_t r) { write(ratio[size_t(r)], r * row_len, (r + 1) * row_len); });
  }
}

}  // namespace fastmerge
