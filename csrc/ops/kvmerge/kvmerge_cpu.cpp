// CPU passes of kv_merge (see kvmerge.h). Work items are fixed ranges of one head (pairs for the
// similarities, output sets for the merge), so results never depend on the thread count; every
// sum runs in token order inside one item.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "fastmerge/memory.h"
#include "fastmerge/parallel.h"
#include "kvmerge.h"

namespace fastmerge {

namespace {

constexpr int64_t kPairsPerItem = 2048;  // similarity work item
constexpr int64_t kSetsPerItem = 256;    // merge work item (output tokens)

// Row `row` (dim elements) of a contiguous tensor as fp32.
void load_row(const TensorView& t, int64_t row, int64_t dim, float* dst) {
  const int64_t off = row * dim;
  switch (t.dtype) {
    case DType::f32: {
      const float* s = t.ptr<const float>() + off;
      for (int64_t j = 0; j < dim; ++j) dst[j] = s[j];
      break;
    }
    case DType::bf16: {
      const bf16_t* s = t.ptr<const bf16_t>() + off;
      for (int64_t j = 0; j < dim; ++j) dst[j] = to_float(s[j]);
      break;
    }
    case DType::f16: {
      const f16_t* s = t.ptr<const f16_t>() + off;
      for (int64_t j = 0; j < dim; ++j) dst[j] = to_float(s[j]);
      break;
    }
    default: break;
  }
}

template <typename T>
void store_typed(const TensorView& t, int64_t off, int64_t dim, const float* src) {
  T* d = t.ptr<T>() + off;
  for (int64_t j = 0; j < dim; ++j) d[j] = from_float<T>(src[j]);
}

void store_row(const TensorView& t, int64_t row, int64_t dim, const float* src) {
  switch (t.dtype) {
    case DType::f32: store_typed<float>(t, row * dim, dim, src); break;
    case DType::bf16: store_typed<bf16_t>(t, row * dim, dim, src); break;
    case DType::f16: store_typed<f16_t>(t, row * dim, dim, src); break;
    default: break;
  }
}

// sum_j term(j) over j < n in fp64 with 8 interleaved partial sums added in a fixed tree:
// independent chains the compiler can vectorise, the same order for any thread count.
template <typename Term>
double lane_sum(int64_t n, Term term) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += term(j + l);
  for (int l = 0; j < n; ++j, ++l) acc[l] += term(j);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

double squared_norm(const float* a, int64_t dim) {
  return lane_sum(dim, [&](int64_t j) { return double(a[j]) * double(a[j]); });
}

double dot(const float* a, const float* b, int64_t dim) {
  return lane_sum(dim, [&](int64_t j) { return double(a[j]) * double(b[j]); });
}

double squared_distance(const float* a, const float* b, int64_t dim) {
  return lane_sum(dim, [&](int64_t j) {
    const double d = double(a[j]) - double(b[j]);
    return d * d;
  });
}

float cosine(double ab, double aa, double bb) {
  return float(ab / std::max(std::sqrt(aa) * std::sqrt(bb), kSimFloor));
}

struct RowScratch {
  std::vector<float> a, b, pivot;
  std::vector<double> acc_k, acc_v;
  std::vector<uint64_t> ranks;
};

RowScratch& thread_scratch() {
  thread_local RowScratch s;
  return s;
}

// The calling thread's buffers, sized for rows of key_dim and value_dim elements.
RowScratch& scratch(int64_t key_dim, int64_t value_dim) {
  RowScratch& s = thread_scratch();
  const size_t width = size_t(std::max(key_dim, value_dim));
  s.a.resize(width);
  s.b.resize(width);
  s.pivot.resize(size_t(key_dim));
  s.acc_k.resize(size_t(key_dim));
  s.acc_v.resize(size_t(value_dim));
  return s;
}

float score_of(const TensorView& scores, int64_t i) {
  const float v = load_host(scores, i);
  return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
}

// One merging set [a, e) of head bh into output row `row`; returns the pivot index.
int64_t merge_set(const TensorView& keys, const TensorView& values, const TensorView& scores,
                  const KvMergeParams& p, int64_t bh, int64_t a, int64_t e,
                  const TensorView& keys_out, const TensorView& values_out, int64_t row) {
  const int64_t D = p.key_dim, Dv = p.value_dim, base = bh * p.seq;
  RowScratch& s = thread_scratch();
  if (e - a == 1) {  // not merged: an exact copy
    load_row(keys, base + a, D, s.a.data());
    store_row(keys_out, row, D, s.a.data());
    load_row(values, base + a, Dv, s.a.data());
    store_row(values_out, row, Dv, s.a.data());
    return a;
  }
  int64_t pivot = a;
  float best = score_of(scores, base + a);
  for (int64_t i = a + 1; i < e; ++i) {
    const float sc = score_of(scores, base + i);
    if (sc > best) best = sc, pivot = i;
  }
  load_row(keys, base + pivot, D, s.pivot.data());
  std::fill(s.acc_k.begin(), s.acc_k.end(), 0.0);
  std::fill(s.acc_v.begin(), s.acc_v.end(), 0.0);
  const double two_sigma2 = 2.0 * p.sigma * p.sigma;
  double den = 0.0;
  for (int64_t i = a; i < e; ++i) {
    float* k = s.a.data();
    load_row(keys, base + i, D, k);
    const double d2 = squared_distance(k, s.pivot.data(), D);
    const double w = gaussian_weight(i == pivot, d2, two_sigma2);
    den += w;
    for (int64_t j = 0; j < D; ++j) s.acc_k[size_t(j)] += w * double(k[j]);
    float* v = s.b.data();
    load_row(values, base + i, Dv, v);
    for (int64_t j = 0; j < Dv; ++j) s.acc_v[size_t(j)] += w * double(v[j]);
  }
  for (int64_t j = 0; j < D; ++j) s.a[size_t(j)] = float(s.acc_k[size_t(j)] / den);
  store_row(keys_out, row, D, s.a.data());
  for (int64_t j = 0; j < Dv; ++j) s.a[size_t(j)] = float(s.acc_v[size_t(j)] / den);
  store_row(values_out, row, Dv, s.a.data());
  return pivot;
}

}  // namespace

int64_t kv_merge_plan_cpu(const TensorView& keys, const TensorView& sims, const KvMergeParams& p) {
  const int64_t S = p.seq, pairs = S - 1, D = p.key_dim;
  check_plan_views(keys, sims, p);
  float* sim = sims.ptr<float>();
  const int64_t items_per_head = (pairs + kPairsPerItem - 1) / kPairsPerItem;
  parallel_for(p.batch_heads * items_per_head, [&](int64_t item) {
    const int64_t bh = item / items_per_head;
    const int64_t i0 = (item % items_per_head) * kPairsPerItem;
    const int64_t i1 = std::min(pairs, i0 + kPairsPerItem);
    RowScratch& s = scratch(D, D);
    float* a = s.a.data();
    float* b = s.b.data();
    load_row(keys, bh * S + i0, D, a);
    double aa = squared_norm(a, D);
    for (int64_t i = i0; i < i1; ++i) {
      load_row(keys, bh * S + i + 1, D, b);
      const double bb = squared_norm(b, D);
      sim[bh * pairs + i] = cosine(dot(a, b, D), aa, bb);
      std::swap(a, b);
      aa = bb;
    }
  });
  std::vector<int64_t> candidates(size_t(p.batch_heads), 0);
  parallel_for(p.batch_heads, [&](int64_t bh) {
    int64_t c = 0;
    for (int64_t i = std::max<int64_t>(p.lo, 0); i + 1 < p.hi; ++i)
      c += is_candidate(sim[bh * pairs + i], i, p) ? 1 : 0;
    candidates[size_t(bh)] = c;
  });
  int64_t removed = p.target;
  for (int64_t c : candidates) removed = std::min(removed, c);
  return std::max<int64_t>(removed, 0);
}

void kv_merge_apply_cpu(const TensorView& keys, const TensorView& values, const TensorView& scores,
                        const TensorView& sims, const KvMergeParams& p, int64_t removed,
                        const TensorView& keys_out, const TensorView& values_out,
                        int64_t* positions) {
  const int64_t S = p.seq, pairs = S - 1, BH = p.batch_heads, out_len = S - removed;
  check_apply_views(keys, values, scores, sims, p, removed, keys_out, values_out);
  advise_huge_pages(keys_out.data, size_t(keys_out.numel()) * size_t(dtype_size(keys_out.dtype)));
  advise_huge_pages(values_out.data,
                    size_t(values_out.numel()) * size_t(dtype_size(values_out.dtype)));
  const float* sim = sims.ptr<const float>();
  // Per head: the exact top-`removed` candidate pairs, then the first token of every set.
  std::vector<int64_t> set_begin(size_t(BH * (out_len + 1)));
  std::vector<int64_t> set_count(size_t(BH), 0);
  parallel_for(BH, [&](int64_t bh) {
    const float* s = sim + bh * pairs;
    uint64_t threshold = std::numeric_limits<uint64_t>::max();
    bool select_any = false;
    if (removed > 0) {
      std::vector<uint64_t>& ranks = scratch(p.key_dim, p.value_dim).ranks;
      ranks.clear();
      for (int64_t i = std::max<int64_t>(p.lo, 0); i + 1 < p.hi; ++i)
        if (is_candidate(s[i], i, p)) ranks.push_back(pair_rank_key(s[i], i));
      if (int64_t(ranks.size()) >= removed) {  // always, by the plan; guarded against faults
        std::nth_element(ranks.begin(), ranks.begin() + (removed - 1), ranks.end(),
                         std::greater<uint64_t>());
        threshold = ranks[size_t(removed - 1)];
        select_any = true;
      }
    }
    int64_t* b = set_begin.data() + bh * (out_len + 1);
    int64_t g = 0;
    b[g++] = 0;
    for (int64_t i = 0; i < pairs; ++i) {
      const bool selected = select_any && is_candidate(s[i], i, p) && pair_rank_key(s[i], i) >= threshold;
      if (!selected) {
        if (g < out_len) b[g] = i + 1;
        ++g;
      }
    }
    set_count[size_t(bh)] = g;
    b[out_len] = S;
  });
  for (int64_t bh = 0; bh < BH; ++bh)
    FM_CHECK(set_count[size_t(bh)] == out_len, "kv_merge: head ", bh, " has ",
             set_count[size_t(bh)], " sets, expected ", out_len);
  const int64_t items_per_head = (out_len + kSetsPerItem - 1) / kSetsPerItem;
  parallel_for(BH * items_per_head, [&](int64_t item) {
    const int64_t bh = item / items_per_head;
    const int64_t g0 = (item % items_per_head) * kSetsPerItem;
    const int64_t g1 = std::min(out_len, g0 + kSetsPerItem);
    const int64_t* b = set_begin.data() + bh * (out_len + 1);
    scratch(p.key_dim, p.value_dim);  // sized once per item; merge_set reuses the buffers
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t pivot = merge_set(keys, values, scores, p, bh, b[g], b[g + 1], keys_out,
                                      values_out, bh * out_len + g);
      if (positions) positions[bh * out_len + g] = pivot;
    }
  });
}

}  // namespace fastmerge
