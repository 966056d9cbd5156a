// CPU consensus merges: fixed-size chunks (parallel.h), per-chunk partial statistics reduced in
// chunk order (results do not depend on the thread count), fp32 blocks for any input dtype.
#include <algorithm>
#include <cmath>
#include <vector>

#include "consensus.h"
#include "fastmerge/memory.h"
#include "fastmerge/parallel.h"
#include "../gta/gta_cpu_kernels.h"  // block loads and stores of any dtype
#include "../select/select.h"

namespace fastmerge {

namespace {

// Per-thread fp32 blocks: the base, one delta row per expert, and scratch rows.
struct Blocks {
  std::vector<float> base, deltas, a, b, c;
  std::vector<int> count;
  float* delta(int e) { return deltas.data() + size_t(e) * kBlock; }
};

Blocks& blocks_for(int experts) {
  thread_local Blocks s;
  s.base.resize(kBlock);
  s.deltas.resize(size_t(experts) * kBlock);
  s.a.resize(kBlock);
  s.b.resize(kBlock);
  s.c.resize(kBlock);
  s.count.resize(kBlock);
  return s;
}

// Loads the base block and d_e = x_e - base (fp32, as mergekit's t - base) for every expert.
void load_deltas(const TensorView& base, const std::vector<TensorView>& experts, int64_t blk,
                 int64_t len, Blocks& s) {
  const GtaBlockKernels& K = gta_block_kernels();
  K.load(base.data, base.dtype, blk, len, s.base.data());
  for (size_t e = 0; e < experts.size(); ++e) {
    float* d = s.delta(int(e));
    K.load(experts[e].data, experts[e].dtype, blk, len, d);
    K.subtract(d, s.base.data(), len, d);
  }
}

// k-th largest of the n 64-bit values value_at(i) (1 <= k; k >= n gives 0): the sample-window
// selection of select.h, exact. With value_at = composite_key(key, i) this is the top-k
// boundary of the contract (ties to the lowest index); duplicates are fine.
template <typename ValueAt>
uint64_t kth_largest(int64_t n, int64_t k, const ValueAt& value_at) {
  std::vector<uint64_t> sample;
  if (n > 4 * kSampleSize) {
    const int64_t s = sample_count(n);
    sample.resize(size_t(s));
    for (int64_t j = 0; j < s; ++j) {
      const int64_t pos = sample_position(j, n, s);
      sample[size_t(j)] = value_at(pos);
    }
  }
  TopkWindow w = plan_topk_window(sample, n, k);
  if (w.trivial) return w.boundary;
  for (;;) {
    const int64_t chunks = num_chunks(n);
    std::vector<int64_t> above(size_t(chunks), 0);
    std::vector<std::vector<uint64_t>> found(static_cast<size_t>(chunks));
    for_each_chunk(n, [&](int64_t c, int64_t begin, int64_t end) {
      int64_t up = 0;
      std::vector<uint64_t>& mine = found[size_t(c)];
      for (int64_t i = begin; i < end; ++i) {
        const uint64_t key = value_at(i);
        if (key > w.hi) ++up;
        else if (key >= w.lo) mine.push_back(key);
      }
      above[size_t(c)] = up;
    });
    int64_t total_above = 0;
    std::vector<CandidateSpan> spans;
    for (int64_t c = 0; c < chunks; ++c) {
      total_above += above[size_t(c)];
      spans.push_back({found[size_t(c)].data(), int64_t(found[size_t(c)].size())});
    }
    std::vector<uint64_t> scratch;
    uint64_t boundary = 0;
    if (resolve_topk(spans, total_above, w, nullptr, scratch, &boundary)) return boundary;
    int64_t candidates = 0;
    for (const CandidateSpan& span : spans) candidates += span.count;
    w = next_topk_window(sample, n, w, total_above, candidates);  // the sample missed the k-th
  }
}

// ---- ram / ramplus_tl ----

// Per-element contributor counts c[j] = #{e : |d_e[j]| > eps} of one loaded block.
void contributor_counts(Blocks& s, int T, int64_t len, float eps) {
  int* c = s.count.data();
  for (int64_t j = 0; j < len; ++j) c[j] = 0;
  for (int e = 0; e < T; ++e) {
    const float* d = s.delta(e);
    for (int64_t j = 0; j < len; ++j) c[j] += ram_nonzero(d[j], eps) ? 1 : 0;
  }
}

void ram_output(const TensorView& base, const std::vector<TensorView>& experts,
                const TensorView& out, float eps, const std::vector<float>& lambdas) {
  const int64_t n = out.numel();
  const int T = int(experts.size());
  const GtaBlockKernels& K = gta_block_kernels();
  advise_huge_pages(out.data, size_t(n) * size_t(dtype_size(out.dtype)));
  for_each_chunk(n, [&](int64_t, int64_t begin, int64_t end) {
    Blocks& s = blocks_for(T);
    for_each_block(begin, end, [&](int64_t blk, int64_t len) {
      load_deltas(base, experts, blk, len, s);
      contributor_counts(s, T, len, eps);
      const int* c = s.count.data();
      float* sum = s.a.data();
      for (int64_t j = 0; j < len; ++j) sum[j] = 0.0f;
      for (int e = 0; e < T; ++e) {
        const float* d = s.delta(e);
        const float lambda = lambdas[size_t(e)];
        for (int64_t j = 0; j < len; ++j) sum[j] += ram_term(d[j], ram_nonzero(d[j], eps), c[j], lambda);
      }
      const float* b = s.base.data();
      for (int64_t j = 0; j < len; ++j) sum[j] = b[j] + sum[j];
      K.store(out.data, out.dtype, blk, len, sum);
    });
  });
}

}  // namespace

void ram_cpu(const TensorView& base, const std::vector<TensorView>& experts, const TensorView& out,
             double epsilon) {
  const int64_t n = check_consensus_inputs(base, experts, out);
  if (n == 0) return;
  ram_output(base, experts, out, float(epsilon), std::vector<float>(experts.size(), 1.0f));
}

void ramplus_tl_cpu(const TensorView& base, const std::vector<TensorView>& experts,
                    const TensorView& out, double r, double alpha, double epsilon) {
  const int64_t n = check_consensus_inputs(base, experts, out);
  if (n == 0) return;
  const int T = int(experts.size());
  const float eps = float(epsilon);
  // Counting pass: per chunk and expert, elements shared with another expert / unique to it.
  const int64_t chunks = num_chunks(n);
  std::vector<int64_t> counts(size_t(chunks) * T * 2, 0);
  for_each_chunk(n, [&](int64_t chunk, int64_t begin, int64_t end) {
    Blocks& s = blocks_for(T);
    int64_t* mine = counts.data() + size_t(chunk) * T * 2;
    for_each_block(begin, end, [&](int64_t blk, int64_t len) {
      load_deltas(base, experts, blk, len, s);
      contributor_counts(s, T, len, eps);
      const int* c = s.count.data();
      for (int e = 0; e < T; ++e) {
        const float* d = s.delta(e);
        int64_t shared = 0, unique = 0;
        for (int64_t j = 0; j < len; ++j) {
          const bool nz = ram_nonzero(d[j], eps);
          shared += nz && c[j] > 1;
          unique += nz && c[j] == 1;
        }
        mine[2 * e] += shared;
        mine[2 * e + 1] += unique;
      }
    });
  });
  std::vector<float> lambdas(static_cast<size_t>(T));
  for (int e = 0; e < T; ++e) {
    int64_t shared = 0, unique = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      shared += counts[size_t(c) * T * 2 + 2 * e];
      unique += counts[size_t(c) * T * 2 + 2 * e + 1];
    }
    lambdas[size_t(e)] = ramplus_lambda(shared, unique, r, alpha, epsilon);
  }
  ram_output(base, experts, out, eps, lambdas);
}

// ---- sce ----

void sce_cpu(const TensorView& base, const std::vector<TensorView>& experts, const TensorView& out,
             double select_topk) {
  const int64_t n = check_consensus_inputs(base, experts, out);
  if (n == 0) return;
  const int T = int(experts.size());
  const int64_t chunks = num_chunks(n);
  const GtaBlockKernels& K = gta_block_kernels();

  // Pass 1 (0 < select_topk < 1): population variance of the deltas per element (double, so
  // identical deltas give exactly 0), then the top-k of the variance.
  const bool select = select_topk > 0.0 && select_topk < 1.0;
  std::vector<float> var;
  uint64_t boundary = select_topk <= 0.0 ? kKeepNone : 0;
  if (select) {
    var.resize(size_t(n));
    std::vector<int64_t> nonzero(size_t(chunks), 0);
    for_each_chunk(n, [&](int64_t chunk, int64_t begin, int64_t end) {
      Blocks& s = blocks_for(T);
      int64_t nz = 0;
      for_each_block(begin, end, [&](int64_t blk, int64_t len) {
        load_deltas(base, experts, blk, len, s);
        for (int64_t j = 0; j < len; ++j) {
          double mean = 0.0;
          for (int e = 0; e < T; ++e) mean += double(s.delta(e)[j]);
          mean /= double(T);
          double ss = 0.0;
          for (int e = 0; e < T; ++e) {
            const double x = double(s.delta(e)[j]) - mean;
            ss += x * x;
          }
          const float v = float(ss / double(T));
          var[size_t(blk + j)] = v;
          nz += v != 0.0f;
        }
      });
      nonzero[size_t(chunk)] = nz;
    });
    int64_t nnz = 0;
    for (int64_t v : nonzero) nnz += v;
    const int64_t k = sce_keep_count(nnz, select_topk);
    const float* vp = var.data();
    boundary = k == 0 ? kKeepNone
                      : kth_largest(n, k, [vp](int64_t i) { return composite_key(magnitude_key(vp[i]), i); });
  }
  // keep[j] (as 0/1 floats) for one block.
  auto keep_mask = [&](int64_t blk, int64_t len, float* keep) {
    if (select) {
      for (int64_t j = 0; j < len; ++j)
        keep[j] = composite_key(magnitude_key(var[size_t(blk + j)]), blk + j) >= boundary ? 1.0f : 0.0f;
    } else {
      const float v = boundary == kKeepNone ? 0.0f : 1.0f;
      for (int64_t j = 0; j < len; ++j) keep[j] = v;
    }
  };

  // Pass 2: sum of squares of every masked delta (double per chunk, chunk order).
  std::vector<double> partial(size_t(chunks) * T, 0.0);
  for_each_chunk(n, [&](int64_t chunk, int64_t begin, int64_t end) {
    Blocks& s = blocks_for(T);
    double* mine = partial.data() + size_t(chunk) * T;
    for_each_block(begin, end, [&](int64_t blk, int64_t len) {
      load_deltas(base, experts, blk, len, s);
      float* keep = s.c.data();
      keep_mask(blk, len, keep);
      for (int e = 0; e < T; ++e) {
        const float* d = s.delta(e);
        double ss = 0.0;
        for (int64_t j = 0; j < len; ++j) {
          const double m = double(d[j] * keep[j]);
          ss += m * m;
        }
        mine[e] += ss;
      }
    });
  });
  std::vector<double> sum_squares(size_t(T), 0.0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int e = 0; e < T; ++e) sum_squares[size_t(e)] += partial[size_t(c) * T + e];
  const std::vector<float> w = sce_weights(sum_squares, n);

  // Pass 3: sign election on the masked deltas, weighted disjoint mean.
  advise_huge_pages(out.data, size_t(n) * size_t(dtype_size(out.dtype)));
  for_each_chunk(n, [&](int64_t, int64_t begin, int64_t end) {
    Blocks& s = blocks_for(T);
    for_each_block(begin, end, [&](int64_t blk, int64_t len) {
      load_deltas(base, experts, blk, len, s);
      float* keep = s.c.data();
      keep_mask(blk, len, keep);
      float* majority = s.a.data();
      for (int64_t j = 0; j < len; ++j) majority[j] = 0.0f;
      for (int e = 0; e < T; ++e) {
        float* d = s.delta(e);
        for (int64_t j = 0; j < len; ++j) {
          d[j] = d[j] * keep[j];
          majority[j] += d[j];
        }
      }
      for (int64_t j = 0; j < len; ++j) majority[j] = majority[j] >= 0.0f ? 1.0f : -1.0f;
      float* num = s.b.data();
      float* den = s.c.data();
      for (int64_t j = 0; j < len; ++j) num[j] = den[j] = 0.0f;
      for (int e = 0; e < T; ++e) {
        const float* m = s.delta(e);
        const float we = w[size_t(e)];
        for (int64_t j = 0; j < len; ++j) {
          const float ew = we * (sign_of(m[j]) == majority[j] ? 1.0f : 0.0f);
          num[j] += m[j] * ew;
          den[j] += ew;
        }
      }
      const float* b = s.base.data();
      for (int64_t j = 0; j < len; ++j) num[j] = b[j] + num[j] / std::max(den[j], 1e-6f);
      K.store(out.data, out.dtype, blk, len, num);
    });
  });
}

// ---- arcee_fusion ----

constexpr int64_t kMaxCachedRow = int64_t(1) << 20;  // rows whose exps are kept (16 MiB)

void arcee_fusion_cpu(const TensorView& base, const TensorView& other, const TensorView& out,
                      int64_t row_len) {
  const int64_t n = check_consensus_inputs(base, {other}, out);
  if (n == 0) return;
  FM_CHECK(row_len >= 1 && n % row_len == 0, "row_len must divide numel");
  const int64_t rows = n / row_len;
  const GtaBlockKernels& K = gta_block_kernels();

  // Pass 1: KL(P || Q) per row, P = softmax(other row) + 1e-8, Q = softmax(base row) + 1e-8,
  // in double (see arcee_kl_term), rounded to fp32 per row.
  std::vector<float> kl(static_cast<size_t>(rows));
  parallel_for(rows, [&](int64_t r) {
    Blocks& s = blocks_for(2);
    float* p = s.delta(0);
    float* q = s.delta(1);
    const int64_t begin = r * row_len, end = begin + row_len;
    float pmax = -INFINITY, qmax = -INFINITY;
    for_each_block(begin, end, [&](int64_t blk, int64_t len) {
      K.load(other.data, other.dtype, blk, len, p);
      K.load(base.data, base.dtype, blk, len, q);
      for (int64_t j = 0; j < len; ++j) {
        pmax = row_max(pmax, p[j]);
        qmax = row_max(qmax, q[j]);
      }
    });
    // exp(x - max) of the row, kept for the KL pass when the row is not too long.
    thread_local std::vector<double> exps;
    const bool keep = row_len <= kMaxCachedRow;
    if (keep) exps.resize(size_t(2 * row_len));
    double psum = 0.0, qsum = 0.0;
    for_each_block(begin, end, [&](int64_t blk, int64_t len) {
      K.load(other.data, other.dtype, blk, len, p);
      K.load(base.data, base.dtype, blk, len, q);
      for (int64_t j = 0; j < len; ++j) {
        const double ep = std::exp(double(p[j]) - double(pmax));
        const double eq = std::exp(double(q[j]) - double(qmax));
        psum += ep;
        qsum += eq;
        if (keep) {
          exps[size_t(2 * (blk - begin + j))] = ep;
          exps[size_t(2 * (blk - begin + j) + 1)] = eq;
        }
      }
    });
    double total = 0.0;
    if (keep) {
      for (int64_t j = 0; j < row_len; ++j)
        total += arcee_kl_term_from_exp(exps[size_t(2 * j)], psum, exps[size_t(2 * j + 1)], qsum);
    } else {
      for_each_block(begin, end, [&](int64_t blk, int64_t len) {
        K.load(other.data, other.dtype, blk, len, p);
        K.load(base.data, base.dtype, blk, len, q);
        for (int64_t j = 0; j < len; ++j) total += arcee_kl_term(p[j], pmax, psum, q[j], qmax, qsum);
      });
    }
    kl[size_t(r)] = float(total);
  });

  // Pass 2: importance = |p - b| * kl_row into an fp32 scratch, and its order statistics.
  std::vector<float> importance(static_cast<size_t>(n));
  for_each_chunk(n, [&](int64_t, int64_t begin, int64_t end) {
    Blocks& s = blocks_for(2);
    for_each_block(begin, end, [&](int64_t blk, int64_t len) {
      K.load(other.data, other.dtype, blk, len, s.delta(0));
      K.load(base.data, base.dtype, blk, len, s.delta(1));
      const float* p = s.delta(0);
      const float* q = s.delta(1);
      for (int64_t j = 0; j < len; ++j)
        importance[size_t(blk + j)] = std::fabs(p[j] - q[j]) * kl[size_t((blk + j) / row_len)];
    });
  });
  const float* ip = importance.data();
  // Order keys use all 32 bits (too many for composite_key); the values alone suffice here.
  auto key_at = [ip](int64_t i) { return order_key(ip[i]); };
  auto quantile = [&](double q) {
    const int64_t rank = quantile_rank(q, n);  // ascending: the (n - rank)-th largest
    if (rank == 0) {  // the minimum (the selection's k >= n is trivial and names no element)
      const int64_t chunks = num_chunks(n);
      std::vector<uint32_t> least(static_cast<size_t>(chunks));
      for_each_chunk(n, [&](int64_t c, int64_t begin, int64_t end) {
        uint32_t m = ~uint32_t(0);
        for (int64_t i = begin; i < end; ++i) m = std::min(m, key_at(i));
        least[size_t(c)] = m;
      });
      return order_value(*std::min_element(least.begin(), least.end()));
    }
    return order_value(uint32_t(kth_largest(n, n - rank, [&](int64_t i) { return uint64_t(key_at(i)); })));
  };
  const float q1 = quantile(0.25), median = quantile(0.5), q3 = quantile(0.75);
  const float threshold = fusion_threshold(q1, median, q3);

  // Pass 3: out = b + (p - b) * [importance >= threshold].
  advise_huge_pages(out.data, size_t(n) * size_t(dtype_size(out.dtype)));
  for_each_chunk(n, [&](int64_t, int64_t begin, int64_t end) {
    Blocks& s = blocks_for(2);
    for_each_block(begin, end, [&](int64_t blk, int64_t len) {
      K.load(other.data, other.dtype, blk, len, s.delta(0));
      K.load(base.data, base.dtype, blk, len, s.delta(1));
      const float* p = s.delta(0);
      const float* q = s.delta(1);
      float* o = s.a.data();
      for (int64_t j = 0; j < len; ++j)
        o[j] = q[j] + (p[j] - q[j]) * (importance[size_t(blk + j)] >= threshold ? 1.0f : 0.0f);
      K.store(out.data, out.dtype, blk, len, o);
    });
  });
}

}  // namespace fastmerge
