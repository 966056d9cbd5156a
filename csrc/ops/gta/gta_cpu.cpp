// CPU launcher of the fused GTA merge: a statistics pass (top-k windows, L1 norms) when any
// expert needs one, then one merge pass. Threads take fixed chunks (or, for DELLA, whole rank
// slabs); per-chunk results are reduced in chunk order, so results never depend on threads.
#include <algorithm>
#include <memory>
#include <vector>

#include "fastmerge/memory.h"
#include "fastmerge/parallel.h"
#include "gta.h"
#include "gta_cpu_kernels.h"
#include "gta_plan.h"

namespace fastmerge {
namespace {

// A top-k selection to make for one expert: which boundary of its plan it fills.
struct Selection {
  int expert;
  bool keep_side;  // true: ExpertPlan::keep_from (top k_keep); false: drop_from (top k_drop)
  TopkWindow window;
  bool resolved = false;
  std::shared_ptr<const std::vector<uint64_t>> sample;  // the expert's, for a retry's window
};

// Statistics of one range (chunk or slab).
struct RangeStats {
  std::vector<TopkScanResult> scans;  // per selection
  std::vector<int64_t> cand_offset;   // per selection: where its candidates start in the
  std::vector<int64_t> cand_count;    //   buffer of the thread that scanned this range,
  std::vector<int> cand_thread;       //   how many, and which thread
  std::vector<double> l1_all, l1_kept;  // per expert
};

// Candidate buffers that keep their capacity across calls (no page faults in the hot pass):
// one per worker thread and selection, plus one scratch array per selection to select in.
// Owned by the calling thread, so concurrent merges from several Python threads never share.
// Each thread also counts its candidates per window slice (window_slice_shift), which spares
// the selection a counting pass over them.
struct CandidatePool {
  std::vector<std::vector<std::vector<uint64_t>>> by_thread;
  std::vector<std::vector<std::vector<int64_t>>> slice_counts;  // thread, selection, slice
  std::vector<std::vector<uint64_t>> select_scratch;
};

// Working memory a thread keeps between calls up to this size; beyond it (the candidates or
// keep bits of a very large tensor) it is released after the call rather than held for the
// life of the process.
constexpr size_t kRetainedBytes = size_t(256) << 20;

CandidatePool& thread_candidate_pool() {
  thread_local CandidatePool pool;
  return pool;
}

// The calling thread's pool, emptied and sized for `selections` and a region of `team` threads.
CandidatePool& candidate_pool(size_t selections, int team) {
  CandidatePool& pool = thread_candidate_pool();
  pool.by_thread.resize(size_t(team));
  for (auto& per_thread : pool.by_thread) {
    per_thread.resize(std::max(per_thread.size(), selections));
    for (auto& buf : per_thread) buf.clear();
  }
  pool.slice_counts.resize(size_t(team));
  for (auto& per_thread : pool.slice_counts) {
    per_thread.resize(std::max(per_thread.size(), selections));
    for (auto& counts : per_thread) counts.assign(size_t(kWindowSlices), 0);
  }
  pool.select_scratch.resize(std::max(pool.select_scratch.size(), selections));
  return pool;
}

// Releases the calling thread's candidate buffers when they hold more than kRetainedBytes.
void trim_candidate_pool() {
  CandidatePool& pool = thread_candidate_pool();
  size_t bytes = 0;
  for (const auto& per_thread : pool.by_thread)
    for (const auto& buf : per_thread) bytes += buf.capacity() * sizeof(uint64_t);
  for (const auto& buf : pool.select_scratch) bytes += buf.capacity() * sizeof(uint64_t);
  if (bytes <= kRetainedBytes) return;
  pool.by_thread.clear();
  pool.select_scratch.clear();
  pool.by_thread.shrink_to_fit();
  pool.select_scratch.shrink_to_fit();
}

// Inputs shared by both passes.
struct MergeInputs {
  const TensorView* base;
  const std::vector<TensorView>* experts;
  const GtaParams* params;
  int64_t n;
};

// DARE's and DELLA's keep decisions, packed by the statistics pass (which draws them for the
// L1 rescale) so that the merge pass reads one bit per element instead of drawing the Philox
// uniforms again (and, for DELLA, ranking every slab again): the draws cost more than the rest
// of both passes, and the ranking far more. One word array per expert, in a buffer kept by the
// calling thread (no fresh pages per call), within a memory budget.
struct KeepBits {
  uint64_t* words = nullptr;
  int64_t words_per_expert = 0;
  std::vector<char> packed;  // per expert
  const uint64_t* of(int t) const { return packed[size_t(t)] ? words + t * words_per_expert : nullptr; }
};

constexpr size_t kKeepBitsBudget = size_t(256) << 20;

std::vector<uint64_t>& keep_bit_storage() {
  thread_local std::vector<uint64_t> storage;
  return storage;
}

// Keep bits for the random-mask experts whose statistics pass draws them (the rescaled ones);
// none when that would exceed the budget, or when DELLA's rank slabs do not start on a word
// (each slab's words must belong to the one thread that ranks it).
KeepBits keep_bits_for(const GtaPlan& plan, const GtaParams& p, int64_t n) {
  KeepBits bits;
  const int T = int(plan.experts.size());
  bits.packed.assign(size_t(T), 0);
  if (plan.has_della && (p.rank_len * p.rank_inner) % 64 != 0) return bits;
  bool any = false;
  for (int t = 0; t < T; ++t) {
    const ExpertPlan& x = plan.experts[size_t(t)];
    bits.packed[size_t(t)] = (x.kind == MaskKind::bernoulli || x.kind == MaskKind::della) && x.rescale;
    any |= bits.packed[size_t(t)] != 0;
  }
  bits.words_per_expert = (n + 63) / 64;
  const size_t words = size_t(T) * size_t(bits.words_per_expert);
  if (!any || words * sizeof(uint64_t) > kKeepBitsBudget) {
    bits.packed.assign(size_t(T), 0);
    return bits;
  }
  std::vector<uint64_t>& storage = keep_bit_storage();
  if (storage.size() < words) storage.resize(words);
  bits.words = storage.data();
  return bits;
}

// Releases the calling thread's keep bits when they hold more than kRetainedBytes.
void trim_keep_bits() {
  std::vector<uint64_t>& storage = keep_bit_storage();
  if (storage.capacity() * sizeof(uint64_t) > kRetainedBytes) std::vector<uint64_t>().swap(storage);
}

// Ranges the passes iterate over: fixed chunks, or DELLA's rank slabs (one per dim-0 index).
struct Ranges {
  bool slabs;
  int64_t count, size;
  int64_t begin(int64_t r) const { return r * size; }
  int64_t end(int64_t r, int64_t n) const { return std::min(n, (r + 1) * size); }
};

Ranges make_ranges(const GtaPlan& plan, const GtaParams& p, int64_t n) {
  if (plan.has_della) return Ranges{true, p.rank_outer, p.rank_len * p.rank_inner};
  return Ranges{false, num_chunks(n), kChunk};
}

template <typename Fn>
void for_each_range(const Ranges& ranges, Fn&& fn, int team = team_size()) {
  if (ranges.slabs) {
    parallel_for(ranges.count, fn, team);
  } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (ranges.count > 1)
    for (int64_t r = 0; r < ranges.count; ++r) fn(r);
  }
}

// Per-thread scratch of one range (reused across ranges and calls: see scratch_for).
struct Scratch {
  std::vector<float> base, delta, u, v;
  std::vector<uint64_t> cand;  // window candidates of one range (sized per range)
  std::vector<float> slab_base, slab_delta;  // DELLA
  std::vector<float> probs;                  // DELLA: experts x slab
  std::vector<uint32_t> keys, keys_tmp, order, order_tmp;  // DELLA: one rank group
  // base is zeroed: it stays zero when the merge has no base (deltas are the experts).
  void prepare(int experts) {
    base.assign(kBlock, 0.0f);
    delta.resize(kBlock);
    u.resize(kBlock);
    v.resize(size_t(experts) * kBlock);
  }
};

// The calling thread's scratch, sized for `experts`; kept between ranges and calls so the
// passes do not allocate per chunk (or per row, for DELLA).
Scratch& scratch_for(int experts) {
  thread_local Scratch scratch;
  scratch.prepare(experts);
  return scratch;
}

// Order of one rank group by ascending magnitude key, equal keys with the higher index first
// (the composite-key order: a lower index ranks higher). LSD radix sort, 8 bits a pass, fed in
// descending index order so that stability puts higher indices first among equal keys.
void rank_order(Scratch& s, int64_t L) {
  constexpr int kBits = 8, kBins = 1 << kBits;
  uint32_t any = 0, all = ~0u;  // digits where every key agrees need no pass
  for (int64_t r = 0; r < L; ++r) {
    any |= s.keys[size_t(r)];
    all &= s.keys[size_t(r)];
  }
  for (int shift = 0; shift < 32; shift += kBits) {
    if ((((any ^ all) >> shift) & (kBins - 1)) == 0) continue;
    const uint32_t* keys = s.keys.data();
    const uint32_t* order = s.order.data();
    auto digit = [&](int64_t r) { return (keys[r] >> shift) & (kBins - 1); };
    // Two independent halves, so repeated digits do not serialise one counter chain; the
    // first half's elements still precede the second's within a bin (the sort stays stable).
    const int64_t half = L / 2;
    uint32_t first[kBins] = {}, second[kBins] = {};
    for (int64_t r = 0; r < half; ++r) {
      ++first[digit(r)];
      ++second[digit(half + r)];
    }
    for (int64_t r = 2 * half; r < L; ++r) ++second[digit(r)];
    uint32_t at_first[kBins], at_second[kBins], start = 0;
    for (int b = 0; b < kBins; ++b) {
      at_first[b] = start;
      at_second[b] = start + first[b];
      start += first[b] + second[b];
    }
    for (int64_t r = 0; r < half; ++r) {
      const uint32_t p = at_first[digit(r)]++, q = at_second[digit(half + r)]++;
      s.keys_tmp[p] = keys[r];
      s.order_tmp[p] = order[r];
      s.keys_tmp[q] = keys[half + r];
      s.order_tmp[q] = order[half + r];
    }
    for (int64_t r = 2 * half; r < L; ++r) {
      const uint32_t q = at_second[digit(r)]++;
      s.keys_tmp[q] = keys[r];
      s.order_tmp[q] = order[r];
    }
    std::swap(s.keys, s.keys_tmp);
    std::swap(s.order, s.order_tmp);
  }
}

// DELLA keep probabilities of every expert over slab [begin, end): ranks of |delta| along
// the rank axis (ascending composite order: ties rank lower-index elements higher).
void della_probs(const MergeInputs& in, const GtaPlan& plan, const GtaBlockKernels& K,
                 int64_t begin, int64_t end, Scratch& s) {
  const GtaParams& p = *in.params;
  const int64_t len = end - begin, L = p.rank_len, I = p.rank_inner;
  const int T = int(plan.experts.size());
  s.slab_base.assign(size_t(len), 0.0f);
  s.slab_delta.resize(size_t(len));
  s.probs.resize(size_t(T) * len);
  for (auto* v : {&s.keys, &s.keys_tmp, &s.order, &s.order_tmp}) v->resize(size_t(L));
  if (in.base) K.load(in.base->data, in.base->dtype, begin, len, s.slab_base.data());
  for (int t = 0; t < T; ++t) {
    const ExpertPlan& x = plan.experts[t];
    if (x.kind != MaskKind::della) continue;
    const TensorView& e = (*in.experts)[t];
    K.load(e.data, e.dtype, begin, len, s.slab_delta.data());
    K.subtract(s.slab_delta.data(), s.slab_base.data(), len, s.slab_delta.data());
    float* prob = s.probs.data() + size_t(t) * len;
    for (int64_t c = 0; c < I; ++c) {
      for (int64_t r = 0; r < L; ++r) {
        const int64_t j = L - 1 - r;
        s.keys[size_t(r)] = magnitude_key(s.slab_delta[j * I + c]);
        s.order[size_t(r)] = uint32_t(j);
      }
      rank_order(s, L);
      for (int64_t r = 0; r < L; ++r)
        prob[int64_t(s.order[size_t(r)]) * I + c] =
            x.prob_base + (della_rank_norm(r, L) * 2.0f) * x.prob_span;
    }
  }
}

// One pass over the inputs: scans the unresolved selections' windows and, when gather_l1,
// the L1 norms of rescaled experts. Resolved selections write their boundaries into plan.
void stats_pass(const MergeInputs& in, GtaPlan& plan, std::vector<Selection>& sels,
                bool gather_l1, const KeepBits& keep_bits, const GtaBlockKernels& K) {
  const GtaParams& p = *in.params;
  const int T = int(plan.experts.size());
  const Ranges ranges = make_ranges(plan, p, in.n);
  std::vector<RangeStats> stats(size_t(ranges.count));
  std::vector<int> active;  // selections still to scan
  for (size_t i = 0; i < sels.size(); ++i)
    if (!sels[i].resolved) active.push_back(int(i));
  const int team = team_size();  // the pool's per-thread buffers and the region's threads
  CandidatePool& pool = candidate_pool(sels.size(), team);

  for_each_range(ranges, [&](int64_t r) {
    Scratch& s = scratch_for(T);
    RangeStats& st = stats[size_t(r)];
    st.scans.assign(sels.size(), TopkScanResult{});
    st.cand_offset.assign(sels.size(), 0);
    st.cand_count.assign(sels.size(), 0);
    st.cand_thread.assign(sels.size(), thread_index());
    st.l1_all.assign(size_t(T), 0.0);
    st.l1_kept.assign(size_t(T), 0.0);
    std::vector<std::vector<uint64_t>>& bufs = pool.by_thread[size_t(thread_index())];
    for (int i : active) st.cand_offset[size_t(i)] = int64_t(bufs[size_t(i)].size());
    const int64_t begin = ranges.begin(r), end = ranges.end(r, in.n);
    if (ranges.slabs) della_probs(in, plan, K, begin, end, s);
    // Window scans take the whole range in one call (one expert at a time: the range of the
    // base is re-read from cache, not memory).
    if (!active.empty()) s.cand.resize(size_t(end - begin) + 16);
    for (int i : active) {
      const Selection& sel = sels[size_t(i)];
      const TensorView& e = (*in.experts)[size_t(sel.expert)];
      const BlockSource base{in.base ? in.base->data : nullptr, in.base ? in.base->dtype : e.dtype, begin};
      TopkScanResult& scan = st.scans[size_t(i)];
      K.topk_scan(BlockSource{e.data, e.dtype, begin}, in.base ? &base : nullptr, end - begin, sel.window.lo,
                  sel.window.hi, plan.experts[size_t(sel.expert)].rescale, &scan, s.cand.data());
      bufs[size_t(i)].insert(bufs[size_t(i)].end(), s.cand.begin(), s.cand.begin() + scan.candidates);
      int64_t* counts = pool.slice_counts[size_t(thread_index())][size_t(i)].data();
      const int shift = window_slice_shift(sel.window.lo, sel.window.hi);
      for (int64_t c = 0; c < scan.candidates; ++c) ++counts[(s.cand[size_t(c)] - sel.window.lo) >> shift];
    }
    const bool any_l1 = gather_l1 && std::any_of(plan.experts.begin(), plan.experts.end(),
                                                 [](const ExpertPlan& x) { return x.rescale; });
    for (int64_t b = begin; any_l1 && b < end; b += kBlock) {
      const int64_t len = std::min(kBlock, end - b);
      if (in.base) K.load(in.base->data, in.base->dtype, b, len, s.base.data());
      for (int t = 0; t < T; ++t) {
        const ExpertPlan& x = plan.experts[size_t(t)];
        const TensorView& e = (*in.experts)[size_t(t)];
        if (!x.rescale) continue;
        K.load(e.data, e.dtype, b, len, s.delta.data());
        K.subtract(s.delta.data(), s.base.data(), len, s.delta.data());
        const float* u = nullptr;
        const float* prob = nullptr;
        if (x.kind == MaskKind::bernoulli || x.kind == MaskKind::della) {
          K.uniforms(make_stream(p.seed, p.stream, uint32_t(t)), b, len, s.u.data());
          u = s.u.data();
          if (x.kind == MaskKind::della) prob = s.probs.data() + size_t(t) * (end - begin) + (b - begin);
          if (keep_bits.of(t)) K.pack_keep(u, prob, x.keep_prob, len, keep_bits.words + t * keep_bits.words_per_expert + b / 64);
        }
        K.abs_sums(s.delta.data(), u, prob, x.keep_prob, len, &st.l1_all[size_t(t)],
                   &st.l1_kept[size_t(t)]);
      }
    }
    for (int i : active)
      st.cand_count[size_t(i)] = int64_t(bufs[size_t(i)].size()) - st.cand_offset[size_t(i)];
  }, team);

  // Reduce in range order (never in thread order: results must not depend on threads).
  for (const RangeStats& st : stats)
    for (int t = 0; t < T; ++t) {
      plan.experts[size_t(t)].l1_before += st.l1_all[size_t(t)];
      plan.experts[size_t(t)].l1_after += st.l1_kept[size_t(t)];
    }
  std::vector<char> hit(sels.size(), 0);
  std::vector<int64_t> above_of(sels.size(), 0), candidates_of(sels.size(), 0);  // for a miss
  std::vector<uint64_t> boundary(sels.size(), 0);
  std::vector<double> top_l1(sels.size(), 0.0);
  // Each selection independently: select the k-th among its candidates, range by range.
  parallel_for(int64_t(active.size()), [&](int64_t a) {
    const size_t i = size_t(active[size_t(a)]);
    const Selection& sel = sels[i];
    int64_t above = 0;
    double above_l1 = 0.0;
    std::vector<CandidateSpan> spans;
    spans.reserve(stats.size());
    for (const RangeStats& st : stats) {
      above += st.scans[i].above;
      above_l1 += st.scans[i].above_l1;
      spans.push_back({pool.by_thread[size_t(st.cand_thread[i])][i].data() + st.cand_offset[i], st.cand_count[i]});
    }
    std::vector<int64_t> counts(size_t(kWindowSlices), 0);
    for (const auto& per_thread : pool.slice_counts)
      for (int64_t b = 0; b < kWindowSlices; ++b) counts[size_t(b)] += per_thread[i][size_t(b)];
    above_of[i] = above;
    for (const CandidateSpan& span : spans) candidates_of[i] += span.count;
    if (!resolve_topk(spans, above, sel.window, counts.data(), pool.select_scratch[i], &boundary[i])) return;
    hit[i] = 1;
    if (!plan.experts[size_t(sel.expert)].rescale) return;
    // L1 of the top k: the part above the window plus the kept candidates in range order
    // (|delta| is the float whose bits are the composite's key).
    double l1 = above_l1;
    for (const CandidateSpan& span : spans)
      for (int64_t c = 0; c < span.count; ++c)
        if (span.data[c] >= boundary[i]) l1 += double(bits_float(uint32_t(span.data[c] >> kIndexBits)));
    top_l1[i] = l1;
  });
  for (int a : active) {
    const size_t i = size_t(a);
    Selection& sel = sels[i];
    if (!hit[i]) {
      // A miss (~0.3% of windows): rescan this expert alone over the side the k-th lies on.
      sel.window = next_topk_window(*sel.sample, in.n, sel.window, above_of[i], candidates_of[i]);
      continue;
    }
    sel.resolved = true;
    ExpertPlan& x = plan.experts[size_t(sel.expert)];
    (sel.keep_side ? x.keep_from : x.drop_from) = boundary[i];
    x.l1_after += sel.keep_side ? top_l1[i] : -top_l1[i];
  }
}

// Samples [j0, j1) of the s composites of expert t (sample_position; j0 and j1 multiples of
// kSampleRun). Positions come in runs of kSampleRun consecutive elements, loaded a run at a time.
void sample_composites(const MergeInputs& in, int t, int64_t s, int64_t j0, int64_t j1,
                       const GtaBlockKernels& K, uint64_t* sample) {
  const int64_t n = in.n;
  const TensorView& e = (*in.experts)[size_t(t)];
  const int64_t run = s % kSampleRun == 0 ? kSampleRun : 1;
  float delta[kSampleRun], base[kSampleRun] = {};
  const int64_t esize = dtype_size(e.dtype), bsize = in.base ? dtype_size(in.base->dtype) : 0;
  constexpr int64_t kAhead = 16;  // runs in flight: each is a cache and TLB miss
  for (int64_t j = j0; j < j1; j += run) {
    if (j + kAhead * run < j1) {
      const int64_t ahead = sample_position(j + kAhead * run, n, s);
      __builtin_prefetch(static_cast<const char*>(e.data) + ahead * esize);
      if (in.base) __builtin_prefetch(static_cast<const char*>(in.base->data) + ahead * bsize);
    }
    const int64_t pos = sample_position(j, n, s);
    // Runs are consecutive positions; check it rather than assume it of sample_position.
    const bool consecutive = run > 1 && sample_position(j + run - 1, n, s) == pos + run - 1;
    if (!consecutive) {
      for (int64_t r = 0; r < run; ++r) {
        const int64_t at = sample_position(j + r, n, s);
        const float d = load_host(e, at) - (in.base ? load_host(*in.base, at) : 0.0f);
        sample[j + r] = composite_key(magnitude_key(d), at);
      }
      continue;
    }
    K.load(e.data, e.dtype, pos, run, delta);
    if (in.base) K.load(in.base->data, in.base->dtype, pos, run, base);
    for (int64_t r = 0; r < run; ++r)
      sample[j + r] = composite_key(magnitude_key(delta[r] - base[r]), pos + r);
  }
}

// Plans the selections of every top-k expert from a sample of its composites.
std::vector<Selection> plan_selections(const MergeInputs& in, GtaPlan& plan, const GtaBlockKernels& K) {
  const int64_t n = in.n, s = sample_count(n);
  std::vector<int> topk;
  for (int t = 0; t < int(plan.experts.size()); ++t)
    if (plan.experts[size_t(t)].kind == MaskKind::topk_range) topk.push_back(t);
  // Two sides per expert: keep (top k_keep) and drop (top k_drop).
  std::vector<Selection> sels(topk.size() * 2);
  // Samples first, each expert's split in parts so that the threads share the work evenly
  // (three experts on two threads would otherwise leave one idle half the time).
  std::vector<std::vector<uint64_t>> samples(topk.size());
  for (size_t i = 0; i < topk.size(); ++i) {
    const ExpertPlan& x = plan.experts[size_t(topk[i])];
    if (n > 4 * kSampleSize && ((x.k_keep > 0 && x.k_keep < n) || (x.k_drop > 0 && x.k_drop < n)))
      samples[i].resize(size_t(s));
  }
  constexpr int64_t kParts = 8;
  const int64_t part = (s / kParts + kSampleRun - 1) / kSampleRun * kSampleRun;
  parallel_for(int64_t(topk.size()) * kParts, [&](int64_t task) {
    std::vector<uint64_t>& sample = samples[size_t(task / kParts)];
    const int64_t j0 = std::min(s, (task % kParts) * part), j1 = std::min(s, j0 + part);
    if (!sample.empty() && j0 < j1) sample_composites(in, topk[size_t(task / kParts)], s, j0, j1, K, sample.data());
  });
  parallel_for(int64_t(topk.size()), [&](int64_t i) {
    const int t = topk[size_t(i)];
    const ExpertPlan& x = plan.experts[size_t(t)];
    auto sample = std::make_shared<const std::vector<uint64_t>>(std::move(samples[size_t(i)]));
    for (int side = 0; side < 2; ++side) {
      const bool keep_side = side == 0;
      sels[size_t(i) * 2 + side] =
          Selection{t, keep_side, plan_topk_window(*sample, n, keep_side ? x.k_keep : x.k_drop), false, sample};
    }
  });
  for (Selection& sel : sels) {
    if (!sel.window.trivial) continue;
    ExpertPlan& x = plan.experts[size_t(sel.expert)];
    (sel.keep_side ? x.keep_from : x.drop_from) = sel.window.boundary;
    sel.resolved = true;
  }
  return sels;
}

void merge_pass(const MergeInputs& in, const GtaPlan& plan, const KeepBits& keep_bits, const TensorView& out,
                const GtaBlockKernels& K) {
  const GtaParams& p = *in.params;
  const int T = int(plan.experts.size());
  const Ranges ranges = make_ranges(plan, p, in.n);
  CombineParams cp;
  cp.consensus = p.consensus;
  cp.normalize = p.normalize;
  cp.lambda = float(p.lambda);
  cp.divisor = plan.divisor;

  // Top-k, unsparsified and replayed random merges of up to kMaxFusedExperts same-dtype experts
  // take the fused kernel: every expert's contribution stays in registers.
  bool fused = T <= kMaxFusedExperts &&
               std::all_of(in.experts->begin(), in.experts->end(),
                           [&](const TensorView& e) { return e.dtype == (*in.experts)[0].dtype; });
  bool any_bits = false;
  for (int t = 0; t < T; ++t) {
    const MaskKind kind = plan.experts[size_t(t)].kind;
    const bool range = kind == MaskKind::keep_all || kind == MaskKind::drop_all || kind == MaskKind::topk_range;
    fused = fused && (range || keep_bits.of(t) != nullptr);
    any_bits |= keep_bits.of(t) != nullptr;
  }

  // Experts whose keep decisions were packed replay them: stand-in uniforms (-1 kept, 2
  // dropped) against a keep probability of 1, whatever their mask kind.
  std::vector<ExpertPlan> plans = plan.experts;
  bool rank_slabs = false;  // some DELLA expert still needs its ranks
  for (int t = 0; t < T; ++t) {
    if (keep_bits.of(t)) {
      plans[size_t(t)].kind = MaskKind::bernoulli;
      plans[size_t(t)].keep_prob = 1.0f;
    }
    rank_slabs |= plans[size_t(t)].kind == MaskKind::della;
  }
  // The fused kernel reads a base of the experts' dtype in place (no block of floats to fill).
  const void* base_same = fused && in.base && in.base->dtype == (*in.experts)[0].dtype ? in.base->data : nullptr;
  const bool streaming = size_t(in.n) * size_t(dtype_size(out.dtype)) >= kStreamingStoreBytes;
  const auto store = streaming ? K.stream_store : K.store;

  for_each_range(ranges, [&](int64_t r) {
    Scratch& s = scratch_for(T);
    std::vector<BlockSource> sources(static_cast<size_t>(T));
    std::vector<const float*> keep_u(static_cast<size_t>(T), nullptr);  // fused, with keep bits
    const int64_t begin = ranges.begin(r), end = ranges.end(r, in.n);
    if (rank_slabs) della_probs(in, plan, K, begin, end, s);
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t len = std::min(kBlock, end - b);
      // The block of the base as floats: filled before the fused kernel unless it reads the
      // base in place, and before the general path if not filled yet.
      bool base_loaded = false;
      auto load_base = [&] {
        if (in.base && !base_loaded) K.load(in.base->data, in.base->dtype, b, len, s.base.data());
        base_loaded = true;
      };
      if (fused) {
        for (int t = 0; t < T; ++t) {
          const TensorView& e = (*in.experts)[size_t(t)];
          sources[size_t(t)] = BlockSource{e.data, e.dtype, b};
        }
        if (!base_same) load_base();
        // Replayed keep decisions as stand-in uniforms, one row of s.v per expert with bits.
        for (int t = 0; any_bits && t < T; ++t)
          if (const uint64_t* bits = keep_bits.of(t)) {
            keep_u[size_t(t)] = s.v.data() + size_t(t) * kBlock;
            K.unpack_keep(bits + b / 64, len, s.v.data() + size_t(t) * kBlock);
          }
        if (K.merge_ranges(sources.data(), T, plans.data(), cp, s.base.data(), base_same,
                           any_bits ? keep_u.data() : nullptr, len, s.delta.data())) {
          store(out.data, out.dtype, b, len, s.delta.data());
          continue;
        }
      }
      load_base();
      for (int t = 0; t < T; ++t) {
        const ExpertPlan& x = plans[size_t(t)];
        const TensorView& e = (*in.experts)[size_t(t)];
        const float* prob = nullptr;
        if (const uint64_t* bits = keep_bits.of(t)) {
          K.unpack_keep(bits + b / 64, len, s.u.data());
        } else if (x.kind == MaskKind::bernoulli || x.kind == MaskKind::della) {
          K.uniforms(make_stream(p.seed, p.stream, uint32_t(t)), b, len, s.u.data());
          if (x.kind == MaskKind::della) prob = s.probs.data() + size_t(t) * (end - begin) + (b - begin);
        }
        K.contribution(BlockSource{e.data, e.dtype, b}, s.base.data(), len, x, s.u.data(), prob,
                       s.v.data() + size_t(t) * kBlock);
      }
      K.combine(s.v.data(), kBlock, T, plans.data(), cp, s.base.data(), len, s.delta.data());
      store(out.data, out.dtype, b, len, s.delta.data());
    }
    if (streaming) stream_fence();
  });
}

// The plan, with its statistics pass when it needs one (which fills keep_bits where it has room).
GtaPlan prepare(const MergeInputs& in, KeepBits* keep_bits) {
  GtaPlan plan = make_gta_plan(*in.params, in.n);
  if (in.n == 0) return plan;
  const GtaBlockKernels& K = gta_block_kernels();
  if (keep_bits) *keep_bits = keep_bits_for(plan, *in.params, in.n);
  const KeepBits none;
  if (plan.needs_stats_pass) {
    std::vector<Selection> sels = plan_selections(in, plan, K);
    stats_pass(in, plan, sels, /*gather_l1=*/true, keep_bits ? *keep_bits : none, K);
    // Windows that missed the k-th are rescanned, each with its next window.
    while (std::any_of(sels.begin(), sels.end(), [](const Selection& s) { return !s.resolved; }))
      stats_pass(in, plan, sels, /*gather_l1=*/false, none, K);
    // Trivial sides of rescaled top-k experts: boundary 0 selects everything.
    for (const Selection& sel : sels) {
      ExpertPlan& x = plan.experts[size_t(sel.expert)];
      if (x.rescale && sel.window.trivial && sel.window.boundary == 0)
        x.l1_after += sel.keep_side ? x.l1_before : -x.l1_before;
    }
    trim_candidate_pool();
  }
  finish_gta_plan(plan);
  return plan;
}

}  // namespace

GtaPlan gta_prepare_cpu(const TensorView* base, const std::vector<TensorView>& experts,
                        const GtaParams& params, int64_t n) {
  return prepare(MergeInputs{base, &experts, &params, n}, nullptr);
}

void gta_merge_cpu(const TensorView* base, const std::vector<TensorView>& experts,
                   const TensorView& out, const GtaParams& params) {
  const int64_t n = check_gta_inputs(base, experts, out, params);
  const MergeInputs in{base, &experts, &params, n};
  KeepBits keep_bits;
  const GtaPlan plan = prepare(in, &keep_bits);
  if (n == 0) return;
  advise_huge_pages(out.data, size_t(n) * size_t(dtype_size(out.dtype)));
  merge_pass(in, plan, keep_bits, out, gta_block_kernels());
  trim_keep_bits();
}

}  // namespace fastmerge
