// Per-instruction-set block kernels for the CPU GTA path (see gta_cpu_kernels.h). Loops are
// written so the compiler vectorises them: no calls, no early exits, fixed-width partial sums.
#include "gta_cpu_kernels.h"

#include "fastmerge/cpu_isa.h"

#if FM_ISA == 2
#include <immintrin.h>
#endif

#include "fastmerge/isa_begin.h"

namespace {

constexpr int kLanes = 16;  // independent partial sums: vectorisable, order fixed per build

// Software prefetch of the bytes four blocks further on: the passes stream 2 to 65 arrays
// block by block, more than the hardware prefetchers follow well.
inline void prefetch_ahead(const void* block_start, int64_t bytes) {
  const char* p = static_cast<const char*>(block_start) + 4 * bytes;
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

void load(const void* src, DType dtype, int64_t offset, int64_t len, float* dst) {
  prefetch_ahead(static_cast<const char*>(src) + offset * dtype_size(dtype), len * dtype_size(dtype));
  switch (dtype) {
    case DType::f32: {
      const float* s = static_cast<const float*>(src) + offset;
      for (int64_t j = 0; j < len; ++j) dst[j] = s[j];
    } break;
    case DType::bf16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int64_t j = 0; j < len; ++j) dst[j] = bits_float(uint32_t(s[j]) << 16);
    } break;
    case DType::f16: {
      const f16_t* s = static_cast<const f16_t*>(src) + offset;
      for (int64_t j = 0; j < len; ++j) dst[j] = to_float(s[j]);
    } break;
    default: break;
  }
}

void store(void* dst, DType dtype, int64_t offset, int64_t len, const float* src) {
  switch (dtype) {
    case DType::f32: {
      float* d = static_cast<float*>(dst) + offset;
      for (int64_t j = 0; j < len; ++j) d[j] = src[j];
    } break;
    case DType::bf16: {
      bf16_t* d = static_cast<bf16_t*>(dst) + offset;
      for (int64_t j = 0; j < len; ++j) d[j] = from_float<bf16_t>(src[j]);
    } break;
    case DType::f16: {
      f16_t* d = static_cast<f16_t*>(dst) + offset;
      for (int64_t j = 0; j < len; ++j) d[j] = from_float<f16_t>(src[j]);
    } break;
    default: break;
  }
}

void subtract(const float* a, const float* b, int64_t len, float* d) {
  if (b == nullptr) {
    for (int64_t j = 0; j < len; ++j) d[j] = a[j];
  } else {
    for (int64_t j = 0; j < len; ++j) d[j] = a[j] - b[j];
  }
}

#if FM_ISA == 2
// Philox4x32-10 for 16 counter blocks at once with AVX-512: 32x32->64 multiplies as
// vpmuludq on even and odd lanes (compilers emit the slow vpmullq for the portable code),
// then a 4x4 transpose so element 4q+k gets word k of block q. Same results as philox.h.
inline void mulhilo16(__m512i a, __m512i m, __m512i& lo, __m512i& hi) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

inline __m512 words_to_uniform16(__m512i w) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)), _mm512_set1_ps(1.0f / 16777216.0f));
}

// Uniforms of the 64 elements of quads quad0 .. quad0 + 15.
inline void uniforms64(const RandomStream& stream, int64_t quad0, float* u) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Block index = quad0 + lane; its low/high words, with the carry out of the low word.
  const __m512i low = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(quad0))), lane);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(low, lane);
  __m512i c0 = low;
  __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32(int(uint32_t(uint64_t(quad0) >> 32))), carry,
                                     _mm512_set1_epi32(int(uint32_t(uint64_t(quad0) >> 32))),
                                     _mm512_set1_epi32(1));
  __m512i c2 = _mm512_set1_epi32(int(stream.expert));
  __m512i c3 = _mm512_set1_epi32(int(stream.stream));
  const __m512i m0 = _mm512_set1_epi32(int(0xD2511F53u)), m1 = _mm512_set1_epi32(int(0xCD9E8D57u));
  uint32_t k0 = stream.key.k0, k1 = stream.key.k1;
  for (int round = 0; round < 10; ++round) {
    __m512i lo0, hi0, lo1, hi1;
    mulhilo16(c0, m0, lo0, hi0);
    mulhilo16(c2, m1, lo1, hi1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(int(k0)));
    c1 = lo1;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(int(k1)));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const __m512 a = words_to_uniform16(c0), b = words_to_uniform16(c1);
  const __m512 c = words_to_uniform16(c2), d = words_to_uniform16(c3);
  const __m512 ab_lo = _mm512_unpacklo_ps(a, b), ab_hi = _mm512_unpackhi_ps(a, b);
  const __m512 cd_lo = _mm512_unpacklo_ps(c, d), cd_hi = _mm512_unpackhi_ps(c, d);
  // q_k holds quad 4L + k in 128-bit lane L; transpose the lanes into quads 0-3, 4-7, ...
  const __m512 q0 = _mm512_shuffle_ps(ab_lo, cd_lo, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 q1 = _mm512_shuffle_ps(ab_lo, cd_lo, _MM_SHUFFLE(3, 2, 3, 2));
  const __m512 q2 = _mm512_shuffle_ps(ab_hi, cd_hi, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 q3 = _mm512_shuffle_ps(ab_hi, cd_hi, _MM_SHUFFLE(3, 2, 3, 2));
  const __m512 t0 = _mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 t1 = _mm512_shuffle_f32x4(q2, q3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 t2 = _mm512_shuffle_f32x4(q0, q1, _MM_SHUFFLE(3, 2, 3, 2));
  const __m512 t3 = _mm512_shuffle_f32x4(q2, q3, _MM_SHUFFLE(3, 2, 3, 2));
  _mm512_storeu_ps(u + 0, _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_storeu_ps(u + 16, _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1)));
  _mm512_storeu_ps(u + 32, _mm512_shuffle_f32x4(t2, t3, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_storeu_ps(u + 48, _mm512_shuffle_f32x4(t2, t3, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

void uniforms(const RandomStream& stream, int64_t first, int64_t len, float* u) {
  if ((first & 3) != 0 || (len & 3) != 0) {
    for (int64_t j = 0; j < len; ++j) u[j] = uniform_at(stream, first + j);
    return;
  }
#if FM_ISA == 2
  if ((len & 63) == 0) {
    for (int64_t j = 0; j < len; j += 64) uniforms64(stream, (first + j) >> 2, u + j);
    return;
  }
#endif
  // Philox over a batch of counters in structure-of-arrays form, so each round is one
  // vectorised loop of 32x32->64 multiplies (the same arithmetic as philox4x32_10).
  constexpr int kQuads = int(kBlock / 4);
  uint32_t c0[kQuads], c1[kQuads], c2[kQuads], c3[kQuads];
  const int64_t quad0 = first >> 2;
  for (int64_t q0 = 0; q0 < (len >> 2); q0 += kQuads) {
    const int quads = int((len >> 2) - q0 < kQuads ? (len >> 2) - q0 : kQuads);
    for (int q = 0; q < quads; ++q) {
      const uint64_t block = uint64_t(quad0 + q0 + q);
      c0[q] = uint32_t(block);
      c1[q] = uint32_t(block >> 32);
      c2[q] = stream.expert;
      c3[q] = stream.stream;
    }
    uint32_t k0 = stream.key.k0, k1 = stream.key.k1;
    for (int round = 0; round < 10; ++round) {
      for (int q = 0; q < quads; ++q) {
        const uint64_t p0 = uint64_t(0xD2511F53u) * c0[q];
        const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2[q];
        const uint32_t n0 = uint32_t(p1 >> 32) ^ c1[q] ^ k0;
        const uint32_t n2 = uint32_t(p0 >> 32) ^ c3[q] ^ k1;
        c1[q] = uint32_t(p1);
        c3[q] = uint32_t(p0);
        c0[q] = n0;
        c2[q] = n2;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    float* dst = u + 4 * q0;
    for (int q = 0; q < quads; ++q) {
      dst[4 * q + 0] = word_to_uniform(c0[q]);
      dst[4 * q + 1] = word_to_uniform(c1[q]);
      dst[4 * q + 2] = word_to_uniform(c2[q]);
      dst[4 * q + 3] = word_to_uniform(c3[q]);
    }
  }
}

void abs_sums(const float* d, const float* u, const float* keep_prob, float p, int64_t len,
              double* all, double* kept) {
  float acc_all[kLanes] = {}, acc_kept[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float a = __builtin_fabsf(d[j + l]);
      const float prob = keep_prob ? keep_prob[j + l] : p;
      acc_all[l] += a;
      acc_kept[l] += (u != nullptr && u[j + l] < prob) ? a : 0.0f;
    }
  }
  for (int l = 0; j < len; ++j, ++l) {
    const float a = __builtin_fabsf(d[j]);
    const float prob = keep_prob ? keep_prob[j] : p;
    acc_all[l] += a;
    acc_kept[l] += (u != nullptr && u[j] < prob) ? a : 0.0f;
  }
  double s_all = 0.0, s_kept = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    s_all += acc_all[l];
    s_kept += acc_kept[l];
  }
  *all += s_all;
  *kept += s_kept;
}

// Element access for the fused kernels below (inlined: T is the storage type).
inline float element(const float* p, int64_t j) { return p[j]; }
inline float element(const uint16_t* p, int64_t j) { return bits_float(uint32_t(p[j]) << 16); }
inline float element(const f16_t* p, int64_t j) { return to_float(p[j]); }

template <typename Fn>
void with_storage(BlockSource src, Fn&& fn) {
  switch (src.dtype) {
    case DType::f32: fn(static_cast<const float*>(src.data) + src.offset); break;
    case DType::bf16: fn(static_cast<const uint16_t*>(src.data) + src.offset); break;
    case DType::f16: fn(static_cast<const f16_t*>(src.data) + src.offset); break;
    default: break;
  }
}

// "composite >= boundary" for the elements of a block as 32-bit lane arithmetic: the key
// decides, and on an equal key the block-relative index j must not pass `last`.
struct BlockBoundary {
  uint32_t key;
  int32_t last;  // largest block-relative index that passes on an equal key (-1: none)
};

inline BlockBoundary block_boundary(uint64_t boundary, int64_t first) {
  const int64_t index = int64_t(kIndexMask - (boundary & kIndexMask));
  int64_t last = index - first;
  last = last < -1 ? -1 : (last > kBlock ? kBlock : last);
  return BlockBoundary{uint32_t(boundary >> kIndexBits), int32_t(last)};
}

template <typename T>
void topk_scan_t(const T* e, const float* base, int64_t len, int64_t first, uint64_t lo,
                 uint64_t hi, TopkScanResult* result, uint64_t* candidates) {
  // above: composite >= hi + 1; inside: composite >= lo and not above.
  const BlockBoundary up_from = block_boundary(hi == ~uint64_t(0) ? hi : hi + 1, first);
  const BlockBoundary in_from = block_boundary(lo, first);
  prefetch_ahead(e, len * int64_t(sizeof(T)));
  int32_t above = 0;
  float above_l1 = 0.0f;
  int32_t inside[kBlock];
  uint32_t keys_of[kBlock];
  // One 32-bit lane per element (full vector width); the reduction order is fixed per build.
#pragma omp simd reduction(+ : above, above_l1)
  for (int32_t j = 0; j < int32_t(len); ++j) {
    const float d = element(e, j) - base[j];
    const uint32_t key = magnitude_key(d);
    const bool up = (key > up_from.key) | ((key == up_from.key) & (j <= up_from.last));
    const bool in = (key > in_from.key) | ((key == in_from.key) & (j <= in_from.last));
    above += up;
    above_l1 += up ? __builtin_fabsf(d) : 0.0f;
    inside[j] = in & !up;
    keys_of[j] = key;
  }
  // Candidates are rare (a window around the k-th) and unpredictable: gather them without
  // branches, compressing 8 composites at a time with AVX-512, else one store per element.
  int64_t m = 0;
#if FM_ISA == 2
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t g = 0;
  for (; g + 8 <= len; g += 8) {
    const __mmask8 take = _mm256_test_epi32_mask(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(inside + g)),
                                                 _mm256_set1_epi32(-1));
    const __m512i keys = _mm512_cvtepu32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys_of + g)));
    const __m512i index = _mm512_sub_epi64(_mm512_set1_epi64(int64_t(kIndexMask) - (first + g)), lane);
    const __m512i composite = _mm512_or_si512(_mm512_slli_epi64(keys, kIndexBits), index);
    _mm512_storeu_si512(candidates + m, _mm512_maskz_compress_epi64(take, composite));
    m += __builtin_popcount(unsigned(take));
  }
  for (; g < len; ++g) {
    candidates[m] = composite_key(keys_of[g], first + g);
    m += inside[g];
  }
#else
  for (int64_t j = 0; j < len; ++j) {
    candidates[m] = composite_key(keys_of[j], first + j);
    m += inside[j];
  }
#endif
  const int64_t count = above;
  const double l1 = above_l1;
  result->above += count;
  result->above_l1 += l1;
  result->candidates = m;
}

void topk_scan(BlockSource src, const float* base, int64_t len, uint64_t lo, uint64_t hi,
               TopkScanResult* result, uint64_t* candidates) {
  with_storage(src, [&](auto* e) { topk_scan_t(e, base, len, src.offset, lo, hi, result, candidates); });
}

template <typename T>
void contribution_t(const T* e, const float* base, int64_t len, int64_t first, const ExpertPlan& x,
                    const float* u, const float* keep_prob, float* v) {
  prefetch_ahead(e, len * int64_t(sizeof(T)));
  const float scale = x.scale, w = x.weight;
  switch (x.kind) {
    case MaskKind::keep_all:
      for (int64_t j = 0; j < len; ++j) v[j] = ((element(e, j) - base[j]) * scale) * w;
      break;
    case MaskKind::drop_all:
      for (int64_t j = 0; j < len; ++j) v[j] = 0.0f;
      break;
    case MaskKind::topk_range: {
      const BlockBoundary from = block_boundary(x.keep_from, first);
      const BlockBoundary to = block_boundary(x.drop_from, first);
      for (int32_t j = 0; j < int32_t(len); ++j) {
        const float d = element(e, j) - base[j];
        const uint32_t key = magnitude_key(d);
        const bool in_keep = (key > from.key) | ((key == from.key) & (j <= from.last));
        const bool in_drop = (key > to.key) | ((key == to.key) & (j <= to.last));
        v[j] = (in_keep & !in_drop) ? (d * scale) * w : 0.0f;
      }
    } break;
    case MaskKind::bernoulli: {
      const float p = x.keep_prob;
      for (int64_t j = 0; j < len; ++j)
        v[j] = u[j] < p ? ((element(e, j) - base[j]) * scale) * w : 0.0f;
    } break;
    case MaskKind::della:
      for (int64_t j = 0; j < len; ++j)
        v[j] = u[j] < keep_prob[j] ? ((element(e, j) - base[j]) * scale) * w : 0.0f;
      break;
  }
}

void contribution(BlockSource src, const float* base, int64_t len, const ExpertPlan& x,
                  const float* u, const float* keep_prob, float* v) {
  if (x.kind == MaskKind::drop_all) {
    for (int64_t j = 0; j < len; ++j) v[j] = 0.0f;
    return;
  }
  with_storage(src, [&](auto* e) { contribution_t(e, base, len, src.offset, x, u, keep_prob, v); });
}

// The merged value of one element from its T contributions x (sign election or plain sum,
// normalisation, lambda, plus base): the operation order of combine_any below. x / 1 and
// x * 1 are exact, so divisor 1, lambda 1 and mix weight 1 stand in for "no normalize", "no
// lambda" and "x is already weighted". mw: mix weights (an agreeing x enters the sum as
// x * mw), dw: divisor weights (what an agreeing expert adds to the divisor).
template <int T, Consensus C>
__attribute__((always_inline)) inline float combine_element(const float (&x)[T], const float (&mw)[T],
                                                           const float (&dw)[T], bool normalize,
                                                           float fixed_divisor, float lambda, float base) {
  float mixed, divisor;
  if (C == Consensus::none) {
    mixed = x[0];
    for (int t = 1; t < T; ++t) mixed += x[t];
    divisor = fixed_divisor;
  } else {
    float vote = 0.0f;
    for (int t = 0; t < T; ++t)
      vote += C == Consensus::sum ? x[t] : float(x[t] > 0.0f) - float(x[t] < 0.0f);
    const float majority = vote >= 0.0f ? 1.0f : -1.0f;
    mixed = 0.0f;
    float agreeing = 0.0f;
    for (int t = 0; t < T; ++t) {
      const bool agree = x[t] * majority > 0.0f;
      mixed += agree ? x[t] * mw[t] : 0.0f;
      agreeing += agree ? dw[t] : 0.0f;
    }
    divisor = normalize && agreeing != 0.0f ? agreeing : 1.0f;
  }
  return base + (mixed / divisor) * lambda;
}

// combine for a compile-time expert count and consensus: one branch-free pass over the block
// with every expert's contribution in registers.
template <int T, Consensus C>
void combine_fixed(const float* __restrict v, int64_t stride, const ExpertPlan* plans,
                   const CombineParams& p, const float* __restrict base, int64_t len,
                   float* __restrict out) {
  const float fixed_divisor = p.normalize ? p.divisor : 1.0f;
  float mw[T], dw[T];
  for (int t = 0; t < T; ++t) {
    mw[t] = plans[t].mix_weight;
    dw[t] = plans[t].divisor_weight;
  }
  for (int64_t j = 0; j < len; ++j) {
    float x[T];
    for (int t = 0; t < T; ++t) x[t] = v[t * stride + j];
    out[j] = combine_element<T, C>(x, mw, dw, p.normalize, fixed_divisor, p.lambda, base[j]);
  }
}

template <int T>
void combine_experts(const float* v, int64_t stride, const ExpertPlan* plans, const CombineParams& p,
                     const float* base, int64_t len, float* out) {
  switch (p.consensus) {
    case Consensus::none: return combine_fixed<T, Consensus::none>(v, stride, plans, p, base, len, out);
    case Consensus::sum: return combine_fixed<T, Consensus::sum>(v, stride, plans, p, base, len, out);
    case Consensus::count: return combine_fixed<T, Consensus::count>(v, stride, plans, p, base, len, out);
  }
}

// The whole merge of one block for T experts of storage type S whose masks are all top-k
// ranges (keep_all, drop_all and topk_range are ranges too): deltas, masks, sign election and
// the weighted sum in registers, in the operation order of contribution + combine_fixed.
// kDrop: some expert drops a top range (breadcrumbs); without it the drop test is skipped.
template <int T, typename S, Consensus C, bool kDrop>
void merge_ranges_fixed(const BlockSource* experts, const ExpertPlan* plans, const CombineParams& p,
                        const float* __restrict base, int64_t len, float* __restrict out) {
  const int64_t first = experts[0].offset;
  const S* e[T];
  BlockBoundary from[T], to[T];
  float scale[T], w[T], mw[T], dw[T];
  for (int t = 0; t < T; ++t) {
    e[t] = static_cast<const S*>(experts[t].data) + first;
    prefetch_ahead(e[t], len * int64_t(sizeof(S)));
    const ExpertPlan& x = plans[t];
    from[t] = block_boundary(x.kind == MaskKind::drop_all ? kKeepNone : x.keep_from, first);
    to[t] = block_boundary(x.drop_from, first);
    scale[t] = x.scale;
    w[t] = x.weight;
    mw[t] = x.mix_weight;
    dw[t] = x.divisor_weight;
  }
  const float fixed_divisor = p.normalize ? p.divisor : 1.0f;
  for (int32_t j = 0; j < int32_t(len); ++j) {
    float x[T];
    for (int t = 0; t < T; ++t) {
      const float d = element(e[t], j) - base[j];
      const uint32_t key = magnitude_key(d);
      const bool in_keep = (key > from[t].key) | ((key == from[t].key) & (j <= from[t].last));
      const bool in_drop = kDrop && ((key > to[t].key) | ((key == to[t].key) & (j <= to[t].last)));
      x[t] = (in_keep & !in_drop) ? (d * scale[t]) * w[t] : 0.0f;
    }
    out[j] = combine_element<T, C>(x, mw, dw, p.normalize, fixed_divisor, p.lambda, base[j]);
  }
}

template <int T, typename S, Consensus C>
void merge_ranges_drop(const BlockSource* experts, const ExpertPlan* plans, const CombineParams& p,
                       const float* base, int64_t len, float* out) {
  bool drop = false;
  for (int t = 0; t < T; ++t) drop |= plans[t].drop_from != kKeepNone;
  if (drop) return merge_ranges_fixed<T, S, C, true>(experts, plans, p, base, len, out);
  merge_ranges_fixed<T, S, C, false>(experts, plans, p, base, len, out);
}

template <int T, typename S>
void merge_ranges_storage(const BlockSource* experts, const ExpertPlan* plans, const CombineParams& p,
                          const float* base, int64_t len, float* out) {
  switch (p.consensus) {
    case Consensus::none: return merge_ranges_drop<T, S, Consensus::none>(experts, plans, p, base, len, out);
    case Consensus::sum: return merge_ranges_drop<T, S, Consensus::sum>(experts, plans, p, base, len, out);
    case Consensus::count: return merge_ranges_drop<T, S, Consensus::count>(experts, plans, p, base, len, out);
  }
}

template <int T>
void merge_ranges_count(const BlockSource* experts, const ExpertPlan* plans, const CombineParams& p,
                        const float* base, int64_t len, float* out) {
  switch (experts[0].dtype) {
    case DType::f32: return merge_ranges_storage<T, float>(experts, plans, p, base, len, out);
    case DType::bf16: return merge_ranges_storage<T, uint16_t>(experts, plans, p, base, len, out);
    case DType::f16: return merge_ranges_storage<T, f16_t>(experts, plans, p, base, len, out);
    default: return;
  }
}

bool merge_ranges(const BlockSource* experts, int count, const ExpertPlan* plans,
                  const CombineParams& p, const float* base, int64_t len, float* out) {
  switch (count) {
    case 1: merge_ranges_count<1>(experts, plans, p, base, len, out); return true;
    case 2: merge_ranges_count<2>(experts, plans, p, base, len, out); return true;
    case 3: merge_ranges_count<3>(experts, plans, p, base, len, out); return true;
    case 4: merge_ranges_count<4>(experts, plans, p, base, len, out); return true;
    case 5: merge_ranges_count<5>(experts, plans, p, base, len, out); return true;
    case 6: merge_ranges_count<6>(experts, plans, p, base, len, out); return true;
    case 7: merge_ranges_count<7>(experts, plans, p, base, len, out); return true;
    case 8: merge_ranges_count<8>(experts, plans, p, base, len, out); return true;
    default: return false;
  }
}

void combine_any(const float* v, int64_t stride, int experts, const ExpertPlan* plans,
                 const CombineParams& p, const float* base, int64_t len, float* out);

void combine(const float* v, int64_t stride, int experts, const ExpertPlan* plans,
             const CombineParams& p, const float* base, int64_t len, float* out) {
  switch (experts) {
    case 1: return combine_experts<1>(v, stride, plans, p, base, len, out);
    case 2: return combine_experts<2>(v, stride, plans, p, base, len, out);
    case 3: return combine_experts<3>(v, stride, plans, p, base, len, out);
    case 4: return combine_experts<4>(v, stride, plans, p, base, len, out);
    case 5: return combine_experts<5>(v, stride, plans, p, base, len, out);
    case 6: return combine_experts<6>(v, stride, plans, p, base, len, out);
    case 7: return combine_experts<7>(v, stride, plans, p, base, len, out);
    case 8: return combine_experts<8>(v, stride, plans, p, base, len, out);
    default: return combine_any(v, stride, experts, plans, p, base, len, out);
  }
}

void combine_any(const float* v, int64_t stride, int experts, const ExpertPlan* plans,
                 const CombineParams& p, const float* base, int64_t len, float* out) {
  float mixed[kBlock];
  if (p.consensus == Consensus::none) {
    for (int64_t j = 0; j < len; ++j) mixed[j] = v[j];
    for (int t = 1; t < experts; ++t)
      for (int64_t j = 0; j < len; ++j) mixed[j] += v[t * stride + j];
    if (p.normalize)
      for (int64_t j = 0; j < len; ++j) mixed[j] /= p.divisor;
  } else {
    // Sign election: the majority sign of sum(v) (or of sum(sign(v)) for "count"); an
    // expert agrees when its v has that sign strictly (zeros never agree), branch-free.
    float vote[kBlock], divisor[kBlock];
    for (int64_t j = 0; j < len; ++j) vote[j] = 0.0f;
    if (p.consensus == Consensus::sum) {
      for (int t = 0; t < experts; ++t)
        for (int64_t j = 0; j < len; ++j) vote[j] += v[t * stride + j];
    } else {
      for (int t = 0; t < experts; ++t)
        for (int64_t j = 0; j < len; ++j) {
          const float x = v[t * stride + j];
          vote[j] += float(x > 0.0f) - float(x < 0.0f);
        }
    }
    for (int64_t j = 0; j < len; ++j) {
      vote[j] = vote[j] >= 0.0f ? 1.0f : -1.0f;  // now the majority sign
      mixed[j] = divisor[j] = 0.0f;
    }
    for (int t = 0; t < experts; ++t) {
      const float mw = plans[t].mix_weight, dw = plans[t].divisor_weight;
      for (int64_t j = 0; j < len; ++j) {
        const float x = v[t * stride + j];
        const bool agree = x * vote[j] > 0.0f;
        mixed[j] += agree ? x * mw : 0.0f;
        divisor[j] += agree ? dw : 0.0f;
      }
    }
    if (p.normalize)
      for (int64_t j = 0; j < len; ++j) mixed[j] /= (divisor[j] == 0.0f ? 1.0f : divisor[j]);
  }
  if (p.lambda != 1.0f)
    for (int64_t j = 0; j < len; ++j) mixed[j] *= p.lambda;
  for (int64_t j = 0; j < len; ++j) out[j] = base[j] + mixed[j];
}

}  // namespace

const GtaBlockKernels& block_kernels() {
  static const GtaBlockKernels table = {load,         store,   subtract,    uniforms, abs_sums,
                                        topk_scan,    contribution, combine, merge_ranges};
  return table;
}

#include "fastmerge/isa_end.h"

namespace fastmerge {
#if !defined(FM_ISA) || FM_ISA == 0
#define FM_DECLARE_TABLE(ns) namespace ns { const GtaBlockKernels& block_kernels(); }
FM_FOR_EACH_ISA(FM_DECLARE_TABLE)
#undef FM_DECLARE_TABLE
const GtaBlockKernels& gta_block_kernels() { FM_CPU_DISPATCH(block_kernels) }
#endif
}  // namespace fastmerge
