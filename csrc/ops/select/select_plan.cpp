// Host-side parts of the sample-window top-k: planning the window and resolving the k-th
// largest among the candidates. Compiled once (generic ISA); used by the CPU and CUDA paths.
#include <algorithm>
#include <cmath>
#include <functional>

#include "select.h"

namespace fastmerge {

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

TopkWindow plan_topk_window(std::vector<uint64_t>& sample, int64_t n, int64_t k) {
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
  // sample of s has standard deviation sqrt(s p (1-p)): keep 4.5 of them plus slack.
  const double p = double(k) / double(n);
  const double center = p * double(s);
  const double margin = 4.5 * std::sqrt(double(s) * p * (1.0 - p)) + 16.0;
  const int64_t hi_rank = int64_t(std::floor(center - margin));
  const int64_t lo_rank = int64_t(std::ceil(center + margin));
  // Two order statistics of the sample (descending), no full sort; the second selection
  // only looks right of the first, which nth_element left partitioned.
  int64_t left = 0;
  if (hi_rank >= 0) {
    std::nth_element(sample.begin(), sample.begin() + hi_rank, sample.end(), std::greater<uint64_t>());
    w.hi = sample[size_t(hi_rank)];
    left = hi_rank + 1;
  } else {
    w.hi = ~uint64_t(0);
  }
  if (lo_rank < s) {
    std::nth_element(sample.begin() + left, sample.begin() + lo_rank, sample.end(), std::greater<uint64_t>());
    w.lo = sample[size_t(lo_rank)];
  } else {
    w.lo = 0;
  }
  return w;
}

bool resolve_topk(std::vector<uint64_t>& candidates, int64_t above, int64_t k, uint64_t* boundary) {
  const int64_t m = int64_t(candidates.size());
  if (!(above < k && k <= above + m)) return false;
  const int64_t need = k - above;
  std::nth_element(candidates.begin(), candidates.begin() + (need - 1), candidates.end(),
                   std::greater<uint64_t>());
  *boundary = candidates[size_t(need - 1)];
  return true;
}

}  // namespace fastmerge
