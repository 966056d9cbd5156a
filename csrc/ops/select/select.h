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

// Sample-window selection, shared by CPU and CUDA hosts: a sample of composites picks a
// window [lo, hi] that very likely holds the k-th largest; one pass counts the elements above
// the window and collects those inside it; the k-th is then selected among the candidates.
// A miss is detected exactly and retried (next_topk_window).
struct TopkWindow {
  int64_t k = 0;          // how many to keep
  uint64_t lo = 0;        // candidates: lo <= c <= hi
  uint64_t hi = 0;
  bool trivial = false;   // boundary known without a pass (k <= 0 or k >= n)
  uint64_t boundary = 0;  // valid when trivial
  int retries = 0;        // misses before this window
};

// Half-widths of the window, in standard deviations of the k-th's rank in the sample. Every
// candidate costs the scan and the selection, so the first window is narrow: 3 deviations
// miss about 0.3% of the time (4.5 made TIES 4096^2 x 3 bf16 ~3 ms slower in 20, and 2
// gained only ~0.5 ms more). The retry widens the missed side to 9 deviations.
constexpr double kWindowMargin = 3.0;
constexpr double kRetryMargin = 9.0;

constexpr int64_t kSampleSize = 1 << 16;
constexpr int64_t kSampleRun = 16;  // consecutive elements per sampled run

// Positions sampled from a tensor of n elements (evenly spaced, deterministic).
int64_t sample_position(int64_t j, int64_t n, int64_t samples);
int64_t sample_count(int64_t n);

// Window for the top-k given the sample's composites (any order), `margin` deviations wide on
// each side of the k-th's expected rank.
TopkWindow plan_topk_window(const std::vector<uint64_t>& sample, int64_t n, int64_t k,
                            double margin = kWindowMargin);

// Window covering every element: the exact fallback after a miss.
TopkWindow full_topk_window(int64_t k);

// The window to scan after `missed` (which had `above` elements above it and `candidates`
// inside) missed the k-th: only the side the k-th lies on, from just past the missed window to
// the sample's kRetryMargin edge; after a second miss, everything.
TopkWindow next_topk_window(const std::vector<uint64_t>& sample, int64_t n, const TopkWindow& missed,
                            int64_t above, int64_t candidates);

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
// Windows that missed since the process started: retried on one side, and rescanned whole (a
// retry that missed too, or a miss no one-sided window fits). For tests and diagnostics.
struct TopkWindowMisses {
  int64_t retried = 0;
  int64_t rescanned_whole = 0;
};
TopkWindowMisses topk_window_misses();

bool resolve_topk(const std::vector<CandidateSpan>& spans, int64_t above, const TopkWindow& window,
                  const int64_t* slice_counts, std::vector<uint64_t>& scratch, uint64_t* boundary);

// Launchers: mask[i] = 1 iff element i of x is among the top k = max(1, int(density * n)).
void magnitude_mask_cpu(const TensorView& x, double density, const TensorView& mask);
void magnitude_mask_cuda(const TensorView& x, double density, const TensorView& mask, StreamHandle stream);

// Number kept by mergekit's magnitude(): density >= 1 keeps all, <= 0 none, else max(1, int(d*n)).
int64_t magnitude_keep_count(double density, int64_t n);

}  // namespace fastmerge
