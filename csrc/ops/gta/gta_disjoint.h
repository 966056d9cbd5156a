// Shared checks and per-element math of the sign-mask and disjoint-merge launchers (CPU and
// CUDA follow one definition).
#pragma once
#include <cstdint>

#include "gta.h"

namespace fastmerge {

// (T, n) of a stacked input: T = shape[0], n = the rest; checks mask (and out) fit.
struct StackedShape {
  int64_t tasks, n;
};

inline StackedShape check_stacked(const TensorView& stacked, const TensorView& mask,
                                  const TensorView* out) {
  FM_CHECK(stacked.ndim() >= 1, "stacked tensors need a leading task dimension");
  FM_CHECK(stacked.dtype != DType::u8, "stacked tensors must be float32, float16 or bfloat16");
  FM_CHECK(mask.dtype == DType::u8, "the sign mask must be bool");
  const int64_t total = stacked.numel(), tasks = stacked.shape[0];
  int64_t n = 1;  // elements per task (also with no tasks: out is then all zeros)
  for (int d = 1; d < stacked.ndim(); ++d) n *= stacked.shape[size_t(d)];
  check_flat(stacked, "stacked", total);
  check_flat(mask, "mask", total);
  if (out) {
    FM_CHECK(out->dtype != DType::u8, "out must be float32, float16 or bfloat16");
    check_flat(*out, "out", n);
  }
  return StackedShape{tasks, n};
}

// One vote of x: x itself (sum) or its sign (count).
FM_HD float vote_of(float x, bool count) {
  return count ? float(x > 0.0f) - float(x < 0.0f) : x;
}

// Whether x agrees with the majority elected by vote (vote >= 0 elects +1; NaN elects -1).
FM_HD bool agrees(float x, float vote) { return vote >= 0.0f ? x > 0.0f : x < 0.0f; }

}  // namespace fastmerge
