// Deterministic CPU parallelism: work is cut into fixed-size chunks that do not depend on the
// thread count, per-chunk partial results are stored, and reductions walk the chunks in order.
#pragma once
#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastmerge {

constexpr int64_t kChunk = 1 << 16;  // elements per chunk

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Calls fn(chunk_index, begin, end) for every chunk, in parallel when it pays. Chunks are
// handed out dynamically (a busy core does not stall the others); results never depend on
// which thread ran a chunk.
template <typename Fn>
void for_each_chunk(int64_t n, Fn&& fn) {
  const int64_t chunks = num_chunks(n);
#pragma omp parallel for schedule(dynamic, 1) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk;
    fn(c, begin, std::min(n, begin + kChunk));
  }
}

// Calls fn(i) for i in [0, count), in parallel, dynamic schedule (for uneven items such as rows).
template <typename Fn>
void parallel_for(int64_t count, Fn&& fn) {
#pragma omp parallel for schedule(dynamic, 1) if (count > 1)
  for (int64_t i = 0; i < count; ++i) fn(i);
}

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Index of the calling thread inside a parallel region (0 outside one).
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline void set_threads(int n) {
#ifdef _OPENMP
  if (n > 0) omp_set_num_threads(n);
#else
  (void)n;
#endif
}

}  // namespace fastmerge
