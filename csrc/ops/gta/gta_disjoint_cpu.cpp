// CPU launchers of PEFT's sign mask and disjoint merge (gta.h): each output element depends on
// one column of the (T, n) input, so chunks of columns run in parallel with no reduction
// across threads, and results never depend on the thread count.
#include <algorithm>

#include "fastmerge/parallel.h"
#include "gta_disjoint.h"

namespace fastmerge {
namespace {

constexpr int64_t kCols = 256;  // columns per block: T rows of it stay in L1

template <typename S>
void sign_mask_block(const S* x, int64_t tasks, int64_t n, int64_t j0, int64_t len, bool count,
                     uint8_t* mask) {
  float vote[kCols];
  for (int64_t j = 0; j < len; ++j) vote[j] = 0.0f;
  for (int64_t t = 0; t < tasks; ++t) {
    const S* row = x + t * n + j0;
    for (int64_t j = 0; j < len; ++j) vote[j] += vote_of(to_float(row[j]), count);
  }
  for (int64_t t = 0; t < tasks; ++t) {
    const S* row = x + t * n + j0;
    uint8_t* m = mask + t * n + j0;
    for (int64_t j = 0; j < len; ++j) m[j] = uint8_t(agrees(to_float(row[j]), vote[j]));
  }
}

template <typename S, typename O>
void disjoint_block(const S* x, const uint8_t* mask, int64_t tasks, int64_t n, int64_t j0,
                    int64_t len, O* out) {
  float mixed[kCols], kept[kCols];
  for (int64_t j = 0; j < len; ++j) mixed[j] = kept[j] = 0.0f;
  for (int64_t t = 0; t < tasks; ++t) {
    const S* row = x + t * n + j0;
    const uint8_t* m = mask + t * n + j0;
    for (int64_t j = 0; j < len; ++j) {
      const float on = float(m[j] != 0);
      mixed[j] += to_float(row[j]) * on;
      kept[j] += on;
    }
  }
  for (int64_t j = 0; j < len; ++j) out[j0 + j] = from_float<O>(mixed[j] / std::max(kept[j], 1.0f));
}

template <typename Fn>
void with_float_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: fn(float{}); break;
    case DType::bf16: fn(bf16_t{}); break;
    case DType::f16: fn(f16_t{}); break;
    default: break;
  }
}

// Calls fn(j0, len) for every block of columns, chunks in parallel.
template <typename Fn>
void for_each_column_block(int64_t n, Fn&& fn) {
  for_each_chunk(n, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t j0 = begin; j0 < end; j0 += kCols) fn(j0, std::min(kCols, end - j0));
  });
}

}  // namespace

void gta_sign_mask_cpu(const TensorView& stacked, const TensorView& mask, Consensus method) {
  const StackedShape s = check_stacked(stacked, mask, nullptr);
  FM_CHECK(method == Consensus::sum || method == Consensus::count, "sign mask: unknown method");
  if (s.n == 0 || s.tasks == 0) return;
  const bool count = method == Consensus::count;  // (no tasks: the mask is empty)
  with_float_type(stacked.dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* x = stacked.ptr<const S>();
    uint8_t* m = mask.ptr<uint8_t>();
    for_each_column_block(s.n, [&](int64_t j0, int64_t len) {
      sign_mask_block(x, s.tasks, s.n, j0, len, count, m);
    });
  });
}

void gta_disjoint_merge_cpu(const TensorView& stacked, const TensorView& mask, const TensorView& out) {
  const StackedShape s = check_stacked(stacked, mask, &out);
  if (s.n == 0) return;
  const uint8_t* m = mask.ptr<const uint8_t>();
  with_float_type(stacked.dtype, [&](auto in_tag) {
    using S = decltype(in_tag);
    with_float_type(out.dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      const S* x = stacked.ptr<const S>();
      O* o = out.ptr<O>();
      for_each_column_block(s.n, [&](int64_t j0, int64_t len) {
        disjoint_block(x, m, s.tasks, s.n, j0, len, o);
      });
    });
  });
}

}  // namespace fastmerge
