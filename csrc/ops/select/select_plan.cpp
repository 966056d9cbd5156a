// Host-side parts of the sample-window top-k: planning the window and resolving the k-th
// largest among the candidates. Compiled once (generic ISA); used by the CPU and CUDA paths.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <utility>

#include "select.h"

namespace fastmerge {

namespace {

std::atomic<int64_t> windows_retried{0}, windows_rescanned_whole{0};

// The need-th largest (1 = the largest) of the composites in spans, all within [lo, hi]:
// counts per slice of [lo, hi] (window_slice_shift; given, or counted here) find the slice
// holding it, and only that slice's members (a few hundred of a typical window's ~10^5) are
// partially sorted.
uint64_t kth_largest(const std::vector<CandidateSpan>& spans, int64_t need, uint64_t lo, uint64_t hi,
                     const int64_t* slice_counts, std::vector<uint64_t>& scratch) {
  const int shift = window_slice_shift(lo, hi);
  auto slice = [&](uint64_t c) { return int64_t((c - lo) >> shift); };
  std::vector<int64_t> counted;
  if (slice_counts == nullptr) {
    counted.assign(size_t(kWindowSlices), 0);
    for (const CandidateSpan& span : spans)
      for (int64_t c = 0; c < span.count; ++c) ++counted[size_t(slice(span.data[c]))];
    slice_counts = counted.data();
  }
  int64_t b = kWindowSlices - 1;
  while (slice_counts[b] < need) need -= slice_counts[b--];
  scratch.clear();
  scratch.reserve(size_t(slice_counts[b]));
  for (const CandidateSpan& span : spans)
    for (int64_t c = 0; c < span.count; ++c)
      if (slice(span.data[c]) == b) scratch.push_back(span.data[c]);
  std::nth_element(scratch.begin(), scratch.begin() + (need - 1), scratch.end(), std::greater<uint64_t>());
  return scratch[size_t(need - 1)];
}

// The need_a-th and need_b-th largest of the s values (1 = the largest; need_a <= need_b):
// kth_largest's slices of [min, max], counted once for both, and the members of the one or two
// slices that hold them collected in one more pass.
std::pair<uint64_t, uint64_t> two_largest(const uint64_t* values, int64_t s, int64_t need_a, int64_t need_b) {
  uint64_t lo = ~uint64_t(0), hi = 0;  // a plain loop: vectorised, unlike std::minmax_element
  for (int64_t i = 0; i < s; ++i) {
    lo = std::min(lo, values[i]);
    hi = std::max(hi, values[i]);
  }
  const int shift = window_slice_shift(lo, hi);
  auto slice = [&](uint64_t v) { return int64_t((v - lo) >> shift); };
  std::vector<int64_t> counts(size_t(kWindowSlices), 0);
  for (int64_t i = 0; i < s; ++i) ++counts[size_t(slice(values[i]))];
  // Slice holding the need-th largest, and its rank inside that slice.
  auto find = [&](int64_t need, int64_t* rank_in_slice) {
    int64_t b = kWindowSlices - 1;
    while (counts[size_t(b)] < need) need -= counts[size_t(b--)];
    *rank_in_slice = need;
    return b;
  };
  int64_t rank_a = 0, rank_b = 0;
  const int64_t slice_a = find(need_a, &rank_a), slice_b = find(need_b, &rank_b);
  std::vector<uint64_t> in_a, in_b;
  in_a.reserve(size_t(counts[size_t(slice_a)]));
  if (slice_b != slice_a) in_b.reserve(size_t(counts[size_t(slice_b)]));
  for (int64_t i = 0; i < s; ++i) {
    const int64_t b = slice(values[i]);
    if (b == slice_a) in_a.push_back(values[i]);
    else if (b == slice_b) in_b.push_back(values[i]);
  }
  auto nth = [](std::vector<uint64_t>& members, int64_t rank) {
    std::nth_element(members.begin(), members.begin() + (rank - 1), members.end(), std::greater<uint64_t>());
    return members[size_t(rank - 1)];
  };
  const uint64_t a = nth(in_a, rank_a);
  return {a, nth(slice_b == slice_a ? in_a : in_b, rank_b)};
}

}  // namespace

int64_t magnitude_keep_count(double density, int64_t n) {
  if (n <= 0 || density <= 0.0) return 0;
  if (density >= 1.0) return n;
  return std::max<int64_t>(1, int64_t(density * double(n)));
}

int64_t sample_count(int64_t n) { return std::min<int64_t>(n, kSampleSize); }

int64_t sample_position(int64_t j, int64_t n, int64_t samples) {
  // Evenly spaced runs of kSampleRun consecutive elements (one or two cache lines each, so a
  // sample costs few memory accesses); with fewer elements than that, plain even spacing.
  if (samples % kSampleRun != 0 || n < 4 * samples)
    return int64_t((double(j) + 0.5) * double(n) / double(samples));
  const int64_t runs = samples / kSampleRun;
  int64_t start = int64_t((double(j / kSampleRun) + 0.5) * double(n) / double(runs));
  start = std::min(start, n - kSampleRun);
  return start + j % kSampleRun;
}

TopkWindow full_topk_window(int64_t k) {
  TopkWindow w;
  w.k = k;
  w.lo = 0;
  w.hi = ~uint64_t(0);
  return w;
}

TopkWindow plan_topk_window(const std::vector<uint64_t>& sample, int64_t n, int64_t k, double margin_sd) {
  TopkWindow w;
  w.k = k;
  if (k <= 0) {
    w.trivial = true;
    w.boundary = kKeepNone;
    return w;
  }
  if (k >= n) {
    w.trivial = true;
    w.boundary = 0;
    return w;
  }
  const int64_t s = int64_t(sample.size());
  if (n <= 4 * kSampleSize || s == 0) return full_topk_window(k);
  // The k-th largest of n sits near rank k*s/n of the sample; the rank of a quantile in a
  // sample of s has standard deviation sqrt(s p (1-p)): keep margin_sd of them plus slack.
  const double p = double(k) / double(n);
  const double center = p * double(s);
  const double margin = margin_sd * std::sqrt(double(s) * p * (1.0 - p)) + 16.0;
  const int64_t hi_rank = int64_t(std::floor(center - margin));
  const int64_t lo_rank = int64_t(std::ceil(center + margin));
  // Two order statistics of the sample (descending), or one when the other edge is open.
  const int64_t need_hi = hi_rank >= 0 ? hi_rank + 1 : 0, need_lo = lo_rank < s ? lo_rank + 1 : 0;
  if (need_hi == 0 && need_lo == 0) return full_topk_window(k);
  const auto [first, second] = two_largest(sample.data(), s, need_hi > 0 ? need_hi : need_lo,
                                           need_lo > 0 ? need_lo : need_hi);
  w.hi = need_hi > 0 ? first : ~uint64_t(0);
  w.lo = need_lo > 0 ? second : 0;
  return w;
}

namespace {

// next_topk_window without the counting.
TopkWindow next_window(const std::vector<uint64_t>& sample, int64_t n, const TopkWindow& missed,
                       int64_t above, int64_t candidates) {
  const int64_t k = missed.k;
  TopkWindow next = full_topk_window(k);
  if (missed.retries > 0) return next;
  const TopkWindow wide = plan_topk_window(sample, n, k, kRetryMargin);
  if (wide.trivial || wide.lo > wide.hi) return next;
  if (above >= k) {
    // At least k elements lie above the window: the k-th does too.
    if (missed.hi == ~uint64_t(0)) return next;
    next.lo = missed.hi + 1;
    next.hi = std::max(wide.hi, next.lo);
  } else if (above + candidates < k) {
    // Fewer than k elements reach the window: the k-th lies below it.
    if (missed.lo == 0) return next;
    next.hi = missed.lo - 1;
    next.lo = std::min(wide.lo, next.hi);
  }
  return next;
}

}  // namespace

TopkWindow next_topk_window(const std::vector<uint64_t>& sample, int64_t n, const TopkWindow& missed,
                            int64_t above, int64_t candidates) {
  TopkWindow next = next_window(sample, n, missed, above, candidates);
  next.retries = missed.retries + 1;
  const bool whole = next.lo == 0 && next.hi == ~uint64_t(0);
  (whole ? windows_rescanned_whole : windows_retried).fetch_add(1, std::memory_order_relaxed);
  return next;
}

TopkWindowMisses topk_window_misses() {
  return {windows_retried.load(std::memory_order_relaxed), windows_rescanned_whole.load(std::memory_order_relaxed)};
}

bool resolve_topk(const std::vector<CandidateSpan>& spans, int64_t above, const TopkWindow& window,
                  const int64_t* slice_counts, std::vector<uint64_t>& scratch, uint64_t* boundary) {
  int64_t m = 0;
  for (const CandidateSpan& span : spans) m += span.count;
  const int64_t k = window.k;
  if (!(above < k && k <= above + m)) return false;
  *boundary = kth_largest(spans, k - above, window.lo, window.hi, slice_counts, scratch);
  return true;
}

}  // namespace fastmerge
