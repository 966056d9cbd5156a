// CPU ToMe: normalise and pack one batch at a time, row max / argmax of every a-token in
// parallel blocks of a-rows (tome_cpu_kernels.cpp), then the top-r edges and the merge maps
// per batch, and the merges as ordered per-row reductions (no atomics, any thread count).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "fastmerge/memory.h"
#include "fastmerge/parallel.h"
#include "tome.h"
#include "tome_cpu_kernels.h"

namespace fastmerge {

namespace {

// The bf16 screening can be switched off (tests compare both paths; results are identical).
bool screening_enabled() {
  const char* v = std::getenv("FASTMERGE_TOME_SCREEN");
  return !(v && v[0] == '0');
}

float load_one(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(data)[i];
    case DType::bf16: return to_float(static_cast<const bf16_t*>(data)[i]);
    case DType::f16: return to_float(static_cast<const f16_t*>(data)[i]);
    default: return 0.0f;
  }
}

void load_row(const TensorView& t, int64_t offset, int64_t len, float* dst) {
  switch (t.dtype) {
    case DType::f32:  // std::copy_n, not memcpy: an empty row may have null pointers
      std::copy_n(t.ptr<const float>() + offset, len, dst);
      break;
    case DType::bf16: {
      const bf16_t* s = t.ptr<const bf16_t>() + offset;
      for (int64_t k = 0; k < len; ++k) dst[k] = to_float(s[k]);
      break;
    }
    case DType::f16: {
      const f16_t* s = t.ptr<const f16_t>() + offset;
      for (int64_t k = 0; k < len; ++k) dst[k] = to_float(s[k]);
      break;
    }
    default: break;
  }
}

void store_row(const TensorView& t, int64_t offset, int64_t len, const float* src) {
  switch (t.dtype) {
    case DType::f32: std::copy_n(src, len, t.ptr<float>() + offset); break;
    case DType::bf16: {
      bf16_t* d = t.ptr<bf16_t>() + offset;
      for (int64_t k = 0; k < len; ++k) d[k] = from_float<bf16_t>(src[k]);
      break;
    }
    case DType::f16: {
      f16_t* d = t.ptr<f16_t>() + offset;
      for (int64_t k = 0; k < len; ++k) d[k] = from_float<f16_t>(src[k]);
      break;
    }
    default: break;
  }
}

constexpr int64_t kScreenMinColumns = 512;
constexpr int64_t kMaxScreenChannels = 8192;  // bf16 row buffer on the stack

// Uninitialised host buffer; large ones 2 MiB aligned with a huge-page hint, so the first
// touch (in the parallel normalisation) does not fault 4 KiB pages one at a time.
template <typename T>
class PackBuffer {
 public:
  void resize(int64_t n) {
    if (n <= capacity_) return;
    const size_t bytes = size_t(std::max<int64_t>(n, 1)) * sizeof(T);
    constexpr size_t kHuge = size_t(1) << 21;
    if (bytes >= 4 * kHuge) {
      const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
      data_.reset(static_cast<T*>(std::aligned_alloc(kHuge, rounded)));
      if (data_) advise_huge_pages(data_.get(), rounded);
    } else {
      data_.reset(static_cast<T*>(std::malloc(bytes)));
    }
    if (!data_) throw std::bad_alloc();
    capacity_ = n;
  }
  T* data() const { return data_.get(); }
  T& operator[](size_t i) const { return data_.get()[i]; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  int64_t capacity_ = 0;
};

// One batch's normalised tokens and the packed copies the kernels read.
struct BatchPack {
  PackBuffer<float> a, b, b_panels;
  PackBuffer<uint32_t> a_pairs, b_pairs;
  std::vector<float> zero_row;
  std::vector<uint32_t> zero_pairs;
  std::vector<char> finite;  // per token
  TomeOperands op;
  bool screen = false;       // bf16 pairs packed, screening kernel used
};

constexpr int64_t kTokenBlock = 64;  // tokens per packing work item

// Buffers and operand shape of one batch (serial; zero padding included). The bf16 pairs
// are allocated when the batch may be screened (want, enough columns).
void prepare_pack(const TomeShape& s, bool want, BatchPack& pk) {
  const int64_t c = s.channels, na = s.na(), nb = s.nb();
  const int64_t panels = (nb + kTomePanel - 1) / kTomePanel, cp = (c + 1) / 2;
  pk.a.resize(na * c);
  pk.b.resize(nb * c);
  pk.b_panels.resize(panels * c * kTomePanel);
  // Only the last panel has lanes past nb: zero them (the rest is written by normalisation).
  const int64_t used = nb - (panels - 1) * kTomePanel;
  for (int64_t k = 0; panels > 0 && k < c; ++k)
    for (int64_t l = used; l < kTomePanel; ++l)
      pk.b_panels[size_t(((panels - 1) * c + k) * kTomePanel + l)] = 0.0f;
  pk.zero_row.assign(size_t(c), 0.0f);
  pk.finite.assign(size_t(s.tokens), 1);
  pk.screen = false;
  TomeOperands& op = pk.op;
  op = TomeOperands{};
  op.a = pk.a.data();
  op.b = pk.b.data();
  op.b_panels = pk.b_panels.data();
  op.zero_row = pk.zero_row.data();
  op.na = na;
  op.nb = nb;
  op.c = c;
  op.cp = cp;
  op.panels = panels;
  op.b_begin = s.distill_token ? 1 : 0;
  if (!(want && nb >= kScreenMinColumns && c <= kMaxScreenChannels)) return;
  pk.a_pairs.resize(na * cp);
  pk.b_pairs.resize(panels * cp * kTomePanel);
  for (int64_t k = 0; panels > 0 && k < cp; ++k)
    for (int64_t l = used; l < kTomePanel; ++l)
      pk.b_pairs[size_t(((panels - 1) * cp + k) * kTomePanel + l)] = 0u;
  pk.zero_pairs.assign(size_t(cp), 0u);
  op.a_pairs = pk.a_pairs.data();
  op.b_pairs = pk.b_pairs.data();
  op.zero_pairs = pk.zero_pairs.data();
}

// bf16 bits of a finite float, round to nearest even (from_float<bf16_t> without the NaN
// branch, so the loop vectorises; non-finite batches are never screened).
inline uint32_t round_bf16(float v) {
  const uint32_t u = float_bits(v);
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Token norm: 8 interleaved double partial sums combined pairwise (the CUDA kernel sums in
// the same order, so both devices normalise identically).
float token_norm(const float* row, int64_t c) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= c; k += 8)
    for (int l = 0; l < 8; ++l) part[l] += double(row[k + l]) * double(row[k + l]);
  for (int l = 0; k + l < c; ++l) part[l] += double(row[k + l]) * double(row[k + l]);
  const double ss = ((part[0] + part[1]) + (part[2] + part[3])) +
                    ((part[4] + part[5]) + (part[6] + part[7]));
  return float(std::sqrt(ss));
}

// Tokens of block `blk` of batch `batch`: metric / ||metric||_2 into a or b (b also into its
// panel column, and both into bf16 pairs when allocated), with a finiteness flag per token
// (all inputs finite and a positive norm <=> every normalised value finite).
void normalise_tokens(const TensorView& metric, const TomeShape& s, int64_t batch, int64_t blk,
                      BatchPack& pk) {
  const int64_t n = s.tokens, c = s.channels, cp = pk.op.cp;
  uint16_t row16[kMaxScreenChannels + 2];
  for (int64_t t = blk * kTokenBlock; t < std::min(n, (blk + 1) * kTokenBlock); ++t) {
    float* row = (t % 2 == 0 ? pk.a.data() + (t / 2) * c : pk.b.data() + (t / 2) * c);
    load_row(metric, (batch * n + t) * c, c, row);
    const float norm = token_norm(row, c);
    for (int64_t k = 0; k < c; ++k) row[k] = row[k] / norm;
    pk.finite[size_t(t)] = std::isfinite(norm) && norm > 0.0f;
    const int64_t j = t / 2;
    if (t % 2 == 1) {
      float* panel = pk.b_panels.data() + (j / kTomePanel) * c * kTomePanel + j % kTomePanel;
      for (int64_t k = 0; k < c; ++k) panel[k * kTomePanel] = row[k];
    }
    if (!pk.op.a_pairs) continue;
    for (int64_t k = 0; k < c; ++k) row16[k] = uint16_t(round_bf16(row[k]));
    row16[c] = 0;  // odd c: the last pair's high half
    if (t % 2 == 0) {
      if (cp > 0) std::memcpy(pk.a_pairs.data() + j * cp, row16, size_t(cp) * 4);  // C = 0: null
    } else {
      uint32_t* dst = pk.b_pairs.data() + (j / kTomePanel) * cp * kTomePanel + j % kTomePanel;
      for (int64_t k = 0; k < cp; ++k)
        dst[k * kTomePanel] = uint32_t(row16[2 * k]) | (uint32_t(row16[2 * k + 1]) << 16);
    }
  }
}

// After normalisation: the batch is screened when its pairs exist and every token is finite
// (the error bound below needs finite unit vectors).
void prepare_screening(BatchPack& pk) {
  TomeOperands& op = pk.op;
  pk.screen = op.a_pairs != nullptr &&
              std::all_of(pk.finite.begin(), pk.finite.end(), [](char f) { return f != 0; });
  // |bf16 score - exact| <= (2^-8 + 2^-16) |a||b| from rounding both operands, plus the fp32
  // accumulation of either sum (<= (c + 2) 2^-24 each, with margin); |a|, |b| <= 1 + 1e-6.
  const double bound = (std::ldexp(1.0, -8) + std::ldexp(1.0, -16) +
                        3.0 * double(2 * op.cp + 2) * std::ldexp(1.0, -24)) * 1.01 + 1e-30;
  op.delta = float(bound);
}

// a-rows per scoring work item: a multiple of 8, several items per thread.
int64_t rows_per_item(int64_t rows) {
  const int64_t items = 4 * int64_t(team_size());
  return std::clamp<int64_t>(((rows + items - 1) / items + 7) / 8 * 8, 8, kTomeMaxRows);
}

// Row maxima of a-rows [a0, a1) of a packed batch.
void score_rows(const BatchPack& pk, int64_t a0, int64_t a1, float* best, int64_t* idx) {
  const TomeKernels& K = tome_kernels();
  (pk.screen ? K.rowmax_bf16 : K.rowmax_exact)(pk.op, a0, a1, best + a0, idx + a0);
}

// Row maxima of every batch. Many batches: one parallel loop over them, each packed and
// scored by one thread. Few: all packed at once, then scored, in one parallel region (each
// region costs a scheduler slice when the cores are shared).
void all_scores(const TensorView& metric, const TomeShape& s, float* best, int64_t* idx) {
  const bool want = screening_enabled() && tome_kernels().rowmax_bf16 != nullptr;
  const int64_t na = s.na(), first = s.class_token ? 1 : 0, rows = na - first;
  const int64_t token_blocks = (s.tokens + kTokenBlock - 1) / kTokenBlock;
  for (int64_t batch = 0; batch < s.batch && first; ++batch) {
    // The class token (a-token 0) scores -inf everywhere: torch's max of an all -inf row.
    best[batch * na] = -INFINITY;
    idx[batch * na] = 0;
  }
  if (rows <= 0) return;
  if (s.batch >= 2 * team_size()) {
    parallel_for(s.batch, [&](int64_t batch) {
      BatchPack pk;  // per batch: nothing stays allocated after the call
      prepare_pack(s, want, pk);
      for (int64_t blk = 0; blk < token_blocks; ++blk) normalise_tokens(metric, s, batch, blk, pk);
      prepare_screening(pk);
      for (int64_t a0 = first; a0 < na; a0 += kTomeMaxRows)
        score_rows(pk, a0, std::min(na, a0 + kTomeMaxRows), best + batch * na, idx + batch * na);
    });
    return;
  }
  std::vector<BatchPack> packs(static_cast<size_t>(s.batch));
  for (auto& pk : packs) prepare_pack(s, want, pk);
  const int64_t per = rows_per_item(rows), score_items = (rows + per - 1) / per;
#pragma omp parallel num_threads(team_size())
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < s.batch * token_blocks; ++item)
      normalise_tokens(metric, s, item / token_blocks, item % token_blocks,
                       packs[size_t(item / token_blocks)]);
#pragma omp single
    for (auto& pk : packs) prepare_screening(pk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < s.batch * score_items; ++item) {
      const int64_t batch = item / score_items, a0 = first + (item % score_items) * per;
      score_rows(packs[size_t(batch)], a0, std::min(na, a0 + per), best + batch * na,
                 idx + batch * na);
    }
  }
}

// Top-r edges of one batch and its maps (see tome.h).
void batch_maps(const TomeShape& s, int64_t batch, const float* best, const int64_t* idx,
                const TomeMapViews& m) {
  const int64_t na = s.na(), nb = s.nb(), r = s.r, n_unm = na - r, n = s.tokens;
  const int64_t rows = s.merged();
  std::vector<uint64_t> keys(static_cast<size_t>(na));
  for (int64_t i = 0; i < na; ++i) keys[size_t(i)] = tome_edge_key(best[i], i);
  auto desc = [](uint64_t x, uint64_t y) { return x > y; };
  auto a_of = [](uint64_t key) { return int64_t(0xffffffffu - uint32_t(key & 0xffffffffu)); };
  int64_t* unm = m.unm_idx.ptr<int64_t>() + batch * n_unm;
  int64_t* src = m.src_idx.ptr<int64_t>() + batch * r;
  int64_t* dst = m.dst_idx.ptr<int64_t>() + batch * r;
  if (s.class_token) {
    // Only the r selected edges are ordered; the kept tokens go in ascending a order.
    if (r < na) std::nth_element(keys.begin(), keys.begin() + r, keys.end(), desc);
    std::sort(keys.begin(), keys.begin() + r, desc);
    std::vector<char> merged(static_cast<size_t>(na), 0);
    for (int64_t k = 0; k < r; ++k) merged[size_t(a_of(keys[size_t(k)]))] = 1;
    int64_t u = 0;
    for (int64_t i = 0; i < na; ++i)
      if (!merged[size_t(i)]) unm[u++] = i;
  } else {
    std::sort(keys.begin(), keys.end(), desc);  // the kept tokens stay in edge order
    for (int64_t u = 0; u < n_unm; ++u) unm[u] = a_of(keys[size_t(r + u)]);
  }
  for (int64_t k = 0; k < r; ++k) {
    src[k] = a_of(keys[size_t(k)]);
    dst[k] = idx[src[k]];
  }
  // Merge plan: row sizes, offsets, members (kept token first, sources in edge order), dest.
  int64_t* offsets = m.offsets.ptr<int64_t>() + batch * (rows + 1);
  int64_t* members = m.members.ptr<int64_t>() + batch * n;
  int64_t* dest = m.dest.ptr<int64_t>() + batch * n;
  std::vector<int64_t> count(static_cast<size_t>(rows), 1);
  for (int64_t k = 0; k < r; ++k) ++count[size_t(tome_dst_row(dst[k], n_unm, s.distill_token))];
  offsets[0] = 0;
  for (int64_t o = 0; o < rows; ++o) offsets[o + 1] = offsets[o] + count[size_t(o)];
  std::vector<int64_t> fill(offsets, offsets + rows);
  for (int64_t u = 0; u < n_unm; ++u) {
    const int64_t o = tome_unm_row(u, n_unm, s.distill_token);
    members[fill[size_t(o)]++] = 2 * unm[u];
    dest[2 * unm[u]] = o;
  }
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t o = tome_dst_row(j, n_unm, s.distill_token);
    members[fill[size_t(o)]++] = 2 * j + 1;
    dest[2 * j + 1] = o;
  }
  for (int64_t k = 0; k < r; ++k) {
    const int64_t o = tome_dst_row(dst[k], n_unm, s.distill_token);
    members[fill[size_t(o)]++] = 2 * src[k];
    dest[2 * src[k]] = o;
  }
}

void check_metric(const TensorView& metric, const TomeShape& s) {
  check_flat(metric, "metric", s.batch * s.tokens * s.channels);
  FM_CHECK(metric.dtype != DType::u8 && metric.dtype != DType::i64,
           "metric must be float32, float16 or bfloat16");
  FM_CHECK(s.r >= 0 && 2 * s.r <= s.tokens, "r=", s.r, " is out of range for ", s.tokens, " tokens");
  FM_CHECK(s.tokens < (int64_t(1) << 31), "at most 2^31 tokens");
}

}  // namespace

void tome_scores_cpu(const TensorView& metric, const TomeShape& s, const TensorView& node_max,
                     const TensorView& node_idx) {
  check_metric(metric, s);
  check_flat(node_max, "node_max", s.batch * s.na());
  check_flat(node_idx, "node_idx", s.batch * s.na());
  FM_CHECK(node_max.dtype == DType::f32 && node_idx.dtype == DType::i64, "score buffer dtypes");
  all_scores(metric, s, node_max.ptr<float>(), node_idx.ptr<int64_t>());
}

void tome_match_cpu(const TensorView& metric, const TomeShape& s, const TomeMapViews& m) {
  check_metric(metric, s);
  const int64_t na = s.na(), n = s.tokens, r = s.r;
  check_flat(m.unm_idx, "unm_idx", s.batch * (na - r));
  check_flat(m.src_idx, "src_idx", s.batch * r);
  check_flat(m.dst_idx, "dst_idx", s.batch * r);
  check_flat(m.offsets, "offsets", s.batch * (s.merged() + 1));
  check_flat(m.members, "members", s.batch * n);
  check_flat(m.dest, "dest", s.batch * n);
  for (const TensorView* t : {&m.unm_idx, &m.src_idx, &m.dst_idx, &m.offsets, &m.members, &m.dest})
    FM_CHECK(t->dtype == DType::i64, "index maps must be int64");
  std::vector<float> best(size_t(s.batch * na), -INFINITY);
  std::vector<int64_t> idx(size_t(s.batch * na), 0);
  // Without merges the scores are not needed (every a-token is kept, in edge order only
  // without a class token, which still needs them).
  if (r > 0 || !s.class_token) {
    all_scores(metric, s, best.data(), idx.data());
  }
  parallel_for(s.batch, [&](int64_t batch) {
    batch_maps(s, batch, best.data() + batch * na, idx.data() + batch * na, m);
  });
}

void tome_merge_cpu(const TensorView& x, const TensorView* size, const TensorView& offsets,
                    const TensorView& members, const TensorView& out, const TensorView* size_out,
                    TomeReduce mode) {
  check_merge_views(x, size, offsets, members, out, size_out);
  const int64_t B = x.shape[0], n = x.shape[1], c = x.shape[2], rows = out.shape[1];
  // Malformed maps would read out of bounds: check them before the (non-throwing) parallel part.
  for (int64_t batch = 0; batch < B; ++batch) {
    const int64_t* off = offsets.ptr<const int64_t>() + batch * (rows + 1);
    const int64_t* mem = members.ptr<const int64_t>() + batch * n;
    FM_CHECK(off[0] == 0 && off[rows] <= n, "corrupt merge offsets");
    for (int64_t o = 0; o < rows; ++o) FM_CHECK(off[o] < off[o + 1], "corrupt merge offsets");
    for (int64_t p = 0; p < off[rows]; ++p) FM_CHECK(mem[p] >= 0 && mem[p] < n, "corrupt merge members");
  }
  advise_huge_pages(out.data, size_t(B * rows * c) * size_t(dtype_size(out.dtype)));
  const int64_t per = std::max<int64_t>(1, 4096 / std::max<int64_t>(c, 1));
  const int64_t blocks = (rows + per - 1) / per;
  parallel_for(B * blocks, [&](int64_t item) {
    const int64_t batch = item / blocks, o0 = (item % blocks) * per;
    const int64_t* off = offsets.ptr<const int64_t>() + batch * (rows + 1);
    const int64_t* mem = members.ptr<const int64_t>() + batch * n;
    std::vector<float> acc(static_cast<size_t>(c)), row(static_cast<size_t>(c));
    for (int64_t o = o0; o < std::min(rows, o0 + per); ++o) {
      float weight = 0.0f;
      for (int64_t p = off[o]; p < off[o + 1]; ++p) {
        const int64_t t = mem[p];
        load_row(x, (batch * n + t) * c, c, row.data());
        if (mode == TomeReduce::max) {
          if (p == off[o]) std::copy(row.begin(), row.end(), acc.begin());
          else
            for (int64_t k = 0; k < c; ++k) acc[k] = tome_max_step(acc[k], row[k]);
          continue;
        }
        const float w = size ? load_one(size->data, size->dtype, batch * n + t) : 1.0f;
        if (p == off[o]) {
          for (int64_t k = 0; k < c; ++k) acc[k] = row[k] * w;
          weight = w;
        } else {
          for (int64_t k = 0; k < c; ++k) acc[k] = acc[k] + row[k] * w;
          weight = weight + w;
        }
      }
      if (mode == TomeReduce::weighted_mean)
        for (int64_t k = 0; k < c; ++k) acc[k] = acc[k] / weight;
      store_row(out, (batch * rows + o) * c, c, acc.data());
      if (size_out) store_row(*size_out, batch * rows + o, 1, &weight);
    }
  });
}

}  // namespace fastmerge
