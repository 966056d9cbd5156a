// Deterministic CPU parallelism: work is cut into fixed-size chunks that do not depend on the
// thread count, per-chunk partial results are stored, and reductions walk the chunks in order.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastmerge {

constexpr int64_t kChunk = 1 << 16;  // elements per chunk

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// The kernels' thread count set by set_threads, for the whole process (0: OpenMP's default of
// the calling thread). omp_set_num_threads alone would reach only the thread that called it,
// not a thread pool's or a server's workers.
inline std::atomic<int>& requested_threads() {
  static std::atomic<int> count{0};
  return count;
}

// Threads of the next parallel region. Code that sizes per-thread state reads it once and
// passes the same value to its region, so a concurrent set_threads cannot outgrow that state.
inline int team_size() {
  const int requested = requested_threads().load(std::memory_order_relaxed);
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// Calls fn(chunk_index, begin, end) for every chunk, in parallel when it pays. Chunks are
// handed out dynamically (a busy core does not stall the others); results never depend on
// which thread ran a chunk.
template <typename Fn>
void for_each_chunk(int64_t n, Fn&& fn) {
  const int64_t chunks = num_chunks(n);
  const int team = team_size();
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk;
    fn(c, begin, std::min(n, begin + kChunk));
  }
}

// Calls fn(i) for i in [0, count), in parallel, dynamic schedule (for uneven items such as rows).
template <typename Fn>
void parallel_for(int64_t count, Fn&& fn, int team = team_size()) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (count > 1)
  for (int64_t i = 0; i < count; ++i) fn(i);
}

// Index of the calling thread inside a parallel region (0 outside one).
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Sets the kernels' thread count for every thread, and the calling thread's OpenMP count (which
// torch's CPU wheels share, as torch.set_num_threads sets ours in its calling thread). 0 unsets
// it: the kernels follow each calling thread's OpenMP count again.
inline void set_threads(int n) {
  if (n < 0) return;
  requested_threads().store(n, std::memory_order_relaxed);
#ifdef _OPENMP
  if (n > 0) omp_set_num_threads(n);
#endif
}

}  // namespace fastmerge
