// Exact magnitude top-k ("select" family).
//
// Contract: the top k elements of x by |x| are the k largest composite keys
// composite_key(magnitude_key(x_i), i) (numeric.h): larger magnitude first, ties broken by the
// lowest flat index. A selection is therefore one 64-bit boundary B: element i is kept iff
// composite(i) >= B. B = 0 keeps everything, B = kKeepNone keeps nothing.
#pragma once
#include <cstdint>
#include <vector>

#include "fastmerge/tensor.h"

namespace fastmerge {

constexpr uint64_t kKeepNone = ~uint64_t(0);

// Sample-window selection, shared by CPU and CUDA hosts: a sorted sample of composites picks a
// window [lo, hi] that almost surely holds the k-th largest; one pass counts the elements above
// the window and collects those inside it; the k-th is then selected among the candidates.
// A miss (rare) is detected exactly and retried with the window widened to everything.
struct TopkWindow {
  int64_t k = 0;          // how many to keep
  uint64_t lo = 0;        // candidates: lo <= c <= hi
  uint64_t hi = 0;
  bool trivial = false;   // boundary known without a pass (k <= 0 or k >= n)
  uint64_t boundary = 0;  // valid when trivial
};

constexpr int64_t kSampleSize = 1 << 16;
constexpr int64_t kSampleRun = 16;  // consecutive elements per sampled run

// Positions sampled from a tensor of n elements (evenly spaced, deterministic).
int64_t sample_position(int64_t j, int64_t n, int64_t samples);
int64_t sample_count(int64_t n);

// Window for the top-k given the sample's composites (any order).
TopkWindow plan_topk_window(const std::vector<uint64_t>& sample, int64_t n, int64_t k);

// Window covering every element: the exact fallback after a miss.
TopkWindow full_topk_window(int64_t k);

// One run of candidate composites: a range's share of a selection's candidates.
struct CandidateSpan {
  const uint64_t* data;
  int64_t count;
};

// Candidates are counted in 2^11 equal slices of their window [lo, hi]: composite c falls in
// slice (c - lo) >> window_slice_shift(lo, hi).
constexpr int kWindowSliceBits = 11;
constexpr int64_t kWindowSlices = int64_t(1) << kWindowSliceBits;
inline int window_slice_shift(uint64_t lo, uint64_t hi) {
  const uint64_t width = hi - lo;
  const int bits = width == 0 ? 0 : 64 - __builtin_clzll(width);
  return bits > kWindowSliceBits ? bits - kWindowSliceBits : 0;
}

// k-th largest composite (window.k) given `above` elements lie strictly above the window and
// the spans hold every candidate inside it; slice_counts: the candidates' counts per window
// slice when the caller has them (else null: counted here); scratch is working memory.
// Returns false when the window missed (the k-th is not among the candidates).
bool resolve_topk(const std::vector<CandidateSpan>& spans, int64_t above, const TopkWindow& window,
                  const int64_t* slice_counts, std::vector<uint64_t>& scratch, uint64_t* boundary);

// Launchers: mask[i] = 1 iff element i of x is among the top k = max(1, int(density * n)).
void magnitude_mask_cpu(const TensorView& x, double density, const TensorView& mask);
void magnitude_mask_cuda(const TensorView& x, double density, const TensorView& mask, StreamHandle stream);

// Number kept by mergekit's magnitude(): density >= 1 keeps all, <= 0 none, else max(1, int(d*n)).
int64_t magnitude_keep_count(double density, int64_t n);

}  // namespace fastmerge
