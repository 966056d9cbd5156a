// CPU slerp and model_stock: per-chunk (or per-row) partial statistics in double, reduced in a
// fixed order, then one output pass.
#include <vector>

#include "fastmerge/memory.h"
#include "fastmerge/parallel.h"
#include "interp.h"

namespace fastmerge {

void slerp_cpu(const TensorView& a, const TensorView& b, const TensorView& out, double t) {
  const int64_t n = out.numel();
  check_flat(a, "a", n);
  check_flat(b, "b", n);
  check_flat(out, "out", n);
  const int64_t chunks = num_chunks(n);
  std::vector<double> partial(size_t(chunks) * 3, 0.0);
  for_each_chunk(n, [&](int64_t c, int64_t begin, int64_t end) {
    double aa = 0, bb = 0, ab = 0;
    for (int64_t i = begin; i < end; ++i) {
      const double x = load_host(a, i), y = load_host(b, i);
      aa += x * x;
      bb += y * y;
      ab += x * y;
    }
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
  advise_huge_pages(out.data, size_t(n) * size_t(dtype_size(out.dtype)));
  for_each_chunk(n, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) store_host(out, i, k.a * load_host(a, i) + k.b * load_host(b, i));
  });
}

void model_stock_cpu(const TensorView& base, const std::vector<TensorView>& experts,
                     const TensorView& out, int64_t rows) {
  const int64_t n = check_model_stock_inputs(base, experts, out, rows);
  const int T = int(experts.size());
  if (n == 0) return;
  const int64_t row_len = n / rows;
  // Gram matrices of the offsets: per row, or per chunk of the single flattened row.
  const bool split_row = rows == 1;
  const int64_t parts = split_row ? num_chunks(n) : rows;
  std::vector<double> gram(size_t(parts) * T * T, 0.0);
  auto accumulate = [&](int64_t part, int64_t begin, int64_t end) {
    double* g = gram.data() + size_t(part) * T * T;
    std::vector<double> o(static_cast<size_t>(T));
    for (int64_t i = begin; i < end; ++i) {
      const float w0 = load_host(base, i);
      for (int e = 0; e < T; ++e) o[size_t(e)] = double(load_host(experts[size_t(e)], i) - w0);
      for (int x = 0; x < T; ++x)
        for (int y = x; y < T; ++y) g[x * T + y] += o[size_t(x)] * o[size_t(y)];
    }
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
  advise_huge_pages(out.data, size_t(n) * size_t(dtype_size(out.dtype)));
  for_each_chunk(n, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float t = ratio[size_t(i / row_len)];
      float sum = 0.0f;
      for (int e = 0; e < T; ++e) sum += load_host(experts[size_t(e)], i);
      const float average = sum / float(T);
      store_host(out, i, t * average + (1.0f - t) * load_host(base, i));
    }
  });
}

}  // namespace fastmerge
