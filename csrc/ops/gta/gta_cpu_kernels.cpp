// Per-instruction-set block kernels for the CPU GTA path (see gta_cpu_kernels.h). Loops are
// written so the compiler vectorises them: no calls, no early exits, fixed-width partial sums.
#include "gta_cpu_kernels.h"

#include <array>

#include "fastmerge/cpu_isa.h"

#if defined(__x86_64__) || defined(_M_X64)
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

// Copies bytes (a multiple of 64) to 64-byte aligned dst with non-temporal stores.
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
#if FM_ISA == 2
  for (int64_t off = 0; off < bytes; off += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(static_cast<char*>(dst) + off),
                        _mm512_load_si512(static_cast<const char*>(src) + off));
#elif defined(__x86_64__) || defined(_M_X64)
  for (int64_t off = 0; off < bytes; off += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(dst) + off),
                     _mm_load_si128(reinterpret_cast<const __m128i*>(static_cast<const char*>(src) + off)));
#else
  __builtin_memcpy(dst, src, size_t(bytes));
#endif
}

// store with non-temporal writes where the block's bytes are whole aligned cache lines: a large
// output is written once and not read back soon, and ordinary stores first read every line they
// write (a 4-input bf16 merge on one EPYC core: 11.2 ms with ordinary stores, 6.6 ms without).
// The caller fences (stream_fence) before anyone else reads dst.
void stream_store(void* dst, DType dtype, int64_t offset, int64_t len, const float* src) {
  const int64_t bytes = len * dtype_size(dtype);
  char* at = static_cast<char*>(dst) + offset * dtype_size(dtype);
  if ((reinterpret_cast<uintptr_t>(at) & 63) != 0 || (bytes & 63) != 0) return store(dst, dtype, offset, len, src);
  alignas(64) unsigned char staged[kBlock * sizeof(float)];
  store(staged, dtype, 0, len, src);
  stream_copy(at, staged, bytes);
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

void pack_keep(const float* u, const float* keep_prob, float p, int64_t len, uint64_t* bits) {
  for (int64_t w = 0; w * 64 < len; ++w) {
    const int64_t first = w * 64, count = len - first < 64 ? len - first : 64;
    uint64_t word = 0;
#if FM_ISA == 2
    if (count == 64) {
      for (int q = 0; q < 4; ++q) {
        const __m512 prob = keep_prob ? _mm512_loadu_ps(keep_prob + first + 16 * q) : _mm512_set1_ps(p);
        const __mmask16 kept = _mm512_cmp_ps_mask(_mm512_loadu_ps(u + first + 16 * q), prob, _CMP_LT_OQ);
        word |= uint64_t(kept) << (16 * q);
      }
      bits[w] = word;
      continue;
    }
#endif
    for (int64_t j = 0; j < count; ++j)
      word |= uint64_t(u[first + j] < (keep_prob ? keep_prob[first + j] : p)) << j;
    bits[w] = word;
  }
}

void unpack_keep(const uint64_t* bits, int64_t len, float* u) {
#if FM_ISA == 2
  int64_t j = 0;
  for (; j + 16 <= len; j += 16)
    _mm512_storeu_ps(u + j, _mm512_mask_blend_ps(__mmask16(bits[j >> 6] >> (j & 63)), _mm512_set1_ps(2.0f),
                                                 _mm512_set1_ps(-1.0f)));
  for (; j < len; ++j) u[j] = (bits[j >> 6] >> (j & 63)) & 1 ? -1.0f : 2.0f;
#else
  for (int64_t j = 0; j < len; ++j) u[j] = (bits[j >> 6] >> (j & 63)) & 1 ? -1.0f : 2.0f;
#endif
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

// Largest magnitude key (NaN's canonical one): a boundary with a larger key passes nothing.
constexpr uint32_t kMaxMagnitudeKey = 0x7fc00000u;
constexpr uint32_t kInfinityKey = 0x7f800000u;

// The bits of |x|: magnitude_key without folding NaNs into one key. Against a threshold of at
// most +inf's key, or above every NaN's, it compares exactly as the canonical key does.
inline uint32_t abs_bits(float x) { return float_bits(x) & 0x7fffffffu; }

// "composite >= boundary" over a block of len elements as one comparison of abs_bits against
// *threshold, when the tie-break is the same for the whole block: every index wins an equal
// key (threshold K) or none does (K + 1; keys have 31 bits, so no overflow). Left to the exact
// two-part test on magnitude_key (returns false): the block that holds the boundary's own
// index, and boundaries among the NaNs, where raw bits and canonical keys disagree.
inline bool uniform_threshold(uint64_t boundary, int64_t first, int64_t len, uint32_t* threshold) {
  const BlockBoundary b = block_boundary(boundary, first);
  if (b.key > kMaxMagnitudeKey) {
    *threshold = b.key + 1;  // above every key: nothing passes
    return true;
  }
  if (b.key >= kInfinityKey) return false;
  if (b.last < 0) {
    *threshold = b.key + 1;
    return true;
  }
  if (b.last >= len - 1) {
    *threshold = b.key;
    return true;
  }
  return false;
}

// Block classification of one window scan: per element its key and whether it lies inside the
// window; returns the count above the window and (kL1) their |delta| sum. kUniform: both
// window edges are plain key thresholds on this block (see uniform_threshold).
template <bool kUniform, bool kL1, typename T>
inline void classify_block(const T* e, const float* base, int32_t len, BlockBoundary up_from,
                           BlockBoundary in_from, uint32_t up_key, uint32_t in_key, int32_t* above_out,
                           float* above_l1_out, int32_t* inside, uint32_t* keys_of) {
  int32_t above = 0;
  float above_l1 = 0.0f;
  // One 32-bit lane per element (full vector width); the reduction order is fixed per build.
#pragma omp simd reduction(+ : above, above_l1)
  for (int32_t j = 0; j < len; ++j) {
    const float d = element(e, j) - base[j];
    const uint32_t key = magnitude_key(d);
    bool up, in;
    if (kUniform) {
      up = abs_bits(d) >= up_key;
      in = abs_bits(d) >= in_key;
    } else {
      up = (key > up_from.key) | ((key == up_from.key) & (j <= up_from.last));
      in = (key > in_from.key) | ((key == in_from.key) & (j <= in_from.last));
    }
    above += up;
    if (kL1) above_l1 += up ? __builtin_fabsf(d) : 0.0f;
    inside[j] = in & !up;
    keys_of[j] = key;
  }
  *above_out = above;
  *above_l1_out = above_l1;
}

#if FM_ISA == 2
// A range without a base: its deltas are the experts themselves.
struct NoBase {};
inline float element(const NoBase*, int64_t) { return 0.0f; }

// 16 elements as floats; lanes outside `valid` read as zeros.
inline __m512 load16(const float* p, __mmask16 valid) { return _mm512_maskz_loadu_ps(valid, p); }
inline __m512 load16(const uint16_t* p, __mmask16 valid) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, p)), 16));
}
inline __m512 load16(const f16_t* p, __mmask16 valid) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, p)); }
inline __m512 load16(const NoBase*, __mmask16) { return _mm512_setzero_ps(); }

// One window edge over a range, in groups of 16 elements: "composite >= boundary" is
// abs_bits >= `before` in the groups before group `split` (their indices win an equal key),
// abs_bits >= `after` in the groups after it, and the exact test in group `split` itself.
struct EdgeThresholds {
  uint32_t before, after;
  int64_t split;  // -1: every group is after the boundary's index
};

// False for a boundary among the NaNs (raw bits and canonical keys disagree there).
inline bool edge_thresholds(uint64_t boundary, int64_t first, EdgeThresholds* edge) {
  const uint32_t key = uint32_t(boundary >> kIndexBits);
  const int64_t index = int64_t(kIndexMask - (boundary & kIndexMask));
  if (key > kMaxMagnitudeKey) {
    *edge = EdgeThresholds{key + 1, key + 1, -1};  // above every key: nothing passes
    return true;
  }
  if (key >= kInfinityKey) return false;
  *edge = EdgeThresholds{key, key + 1, index < first ? -1 : (index - first) / 16};
  return true;
}

// The exact window test of elements [from, to) of block `block` (a boundary's own index is
// among them): appends in-window positions to at, returns how many it appended.
template <bool kL1, typename SE, typename SB>
inline int32_t scan_exact(const SE* e, const SB* b, int64_t block, int32_t from, int32_t to, int64_t first,
                          uint64_t up_boundary, uint64_t lo, int64_t* above, double* above_l1, uint32_t* at) {
  int32_t found = 0;
  for (int32_t j = from; j < to; ++j) {
    const float d = element(e, block + j) - element(b, block + j);
    const uint64_t c = composite_key(magnitude_key(d), first + block + j);
    const bool is_up = c >= up_boundary;
    *above += is_up;
    if (kL1 && is_up) *above_l1 += double(__builtin_fabsf(d));
    at[found] = uint32_t(j);
    found += !is_up && c >= lo;
  }
  return found;
}

// The thresholds of one block of a range scan. A block holding a boundary's own index is
// split: it takes the exact test (scan_exact) throughout.
struct BlockKeys {
  bool split;
  uint32_t up, in;
};
inline BlockKeys block_keys(const EdgeThresholds& up, const EdgeThresholds& in, int64_t block) {
  constexpr int64_t kGroups = kBlock / 16;
  const int64_t group0 = block / 16;
  return BlockKeys{(up.split >= group0 && up.split < group0 + kGroups) || (in.split >= group0 && in.split < group0 + kGroups),
                   group0 < up.split ? up.before : up.after, group0 < in.split ? in.before : in.after};
}

// The end of a block of a range scan: the elements from `full` on (a split block, or a range's
// last partial step) one at a time, then the composites of the block's `found` in-window
// positions at[].
template <bool kL1, typename SE, typename SB>
inline void finish_block(const SE* e, const SB* b, int64_t block, int32_t full, int32_t n, int64_t first,
                         uint64_t up_boundary, uint64_t lo, int64_t* above, double* above_l1, uint32_t* at,
                         int32_t found, uint64_t* candidates, int64_t* m) {
  if (full < n) found += scan_exact<kL1>(e, b, block, full, n, first, up_boundary, lo, above, above_l1, at + found);
  for (int32_t c = 0; c < found; ++c) {
    const int64_t j = block + at[c];
    candidates[(*m)++] = composite_key(magnitude_key(element(e, j) - element(b, j)), first + j);
  }
}

// The window scan of a whole range in one AVX-512 loop, base read in its own storage type:
// per 16 elements two key comparisons, and the positions inside the window compressed into a
// list with no branch (a few per block of kBlock; their composites are formed per block).
template <bool kL1, typename SE, typename SB>
void scan_range(const SE* e, const SB* b, int64_t len, int64_t first, uint64_t up_boundary, uint64_t lo,
                const EdgeThresholds& up, const EdgeThresholds& in, TopkScanResult* result,
                uint64_t* candidates) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  int64_t above = 0, m = 0;
  double above_l1 = 0.0;
  alignas(64) uint32_t at[kBlock + 16];
  for (int64_t block = 0; block < len; block += kBlock) {
    const int32_t n = int32_t(len - block < kBlock ? len - block : kBlock);
    prefetch_ahead(e + block, n * int64_t(sizeof(SE)));
    const BlockKeys keys = block_keys(up, in, block);
    const __m512i up_key = _mm512_set1_epi32(int(keys.up));
    const __m512i in_key = _mm512_set1_epi32(int(keys.in));
    const int32_t full = keys.split ? 0 : n & ~15;  // groups of the fast loop
    __m512 l1 = _mm512_setzero_ps();
    int32_t found = 0;
    for (int32_t g = 0; g < full; g += 16) {
      const __m512 d = _mm512_sub_ps(load16(e + block + g, 0xffff), load16(b + block + g, 0xffff));
      const __m512i a = _mm512_and_si512(_mm512_castps_si512(d), abs_mask);  // abs_bits
      const __mmask16 is_up = _mm512_cmpge_epu32_mask(a, up_key);
      const __mmask16 is_in = _mm512_mask_cmpge_epu32_mask(__mmask16(~is_up), a, in_key);
      above += __builtin_popcount(unsigned(is_up));
      if (kL1) l1 = _mm512_mask_add_ps(l1, is_up, l1, _mm512_castsi512_ps(a));
      _mm512_storeu_si512(at + found, _mm512_maskz_compress_epi32(is_in, _mm512_add_epi32(_mm512_set1_epi32(g), lane)));
      found += __builtin_popcount(unsigned(is_in));
    }
    if (kL1) above_l1 += double(_mm512_reduce_add_ps(l1));
    finish_block<kL1>(e, b, block, full, n, first, up_boundary, lo, &above, &above_l1, at, found, candidates, &m);
  }
  result->above += above;
  result->above_l1 += above_l1;
  result->candidates = m;
}

// 32 bf16 values as two vectors of floats: each 32-bit lane holds a pair, whose first element
// widens with one shift and whose second with one mask (the "even" and "odd" elements).
inline void widen32(const uint16_t* p, __m512& even, __m512& odd) {
  const __m512i pair = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(int(0xffff0000u))));
}
inline void widen32(const NoBase*, __m512& even, __m512& odd) { even = odd = _mm512_setzero_ps(); }
inline const uint16_t* advance(const uint16_t* p, int64_t i) { return p + i; }
inline const NoBase* advance(const NoBase* p, int64_t) { return p; }

// scan_range for bf16 experts over a bf16 base (or none), 32 elements per step through
// widen32: half the widening work of two 16-element steps. Above-counts are kept per lane;
// in-window positions are compressed per half step, even elements then odd ones (candidate
// order within a block does not matter: composites are unique).
template <bool kL1, typename SB>
void scan_range_bf16(const uint16_t* e, const SB* b, int64_t len, int64_t first, uint64_t up_boundary,
                     uint64_t lo, const EdgeThresholds& up, const EdgeThresholds& in, TopkScanResult* result,
                     uint64_t* candidates) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  int64_t above = 0, m = 0;
  double above_l1 = 0.0;
  __m512i above_lanes = _mm512_setzero_si512();
  // Element positions of a step's even and odd lanes.
  const __m512i even_at = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_at = _mm512_add_epi32(even_at, _mm512_set1_epi32(1));
  alignas(64) uint32_t at[kBlock + 32];
  for (int64_t block = 0; block < len; block += kBlock) {
    const int32_t n = int32_t(len - block < kBlock ? len - block : kBlock);
    prefetch_ahead(e + block, n * int64_t(sizeof(uint16_t)));
    const BlockKeys keys = block_keys(up, in, block);
    // In the window: keys.in <= a < keys.up, one unsigned comparison of a - keys.in (an empty
    // window, keys.in >= keys.up, has width 0 and takes nothing).
    const __m512i up_v = _mm512_set1_epi32(int(keys.up));
    const __m512i in_v = _mm512_set1_epi32(int(keys.in));
    const __m512i width_v = _mm512_set1_epi32(int(keys.up > keys.in ? keys.up - keys.in : 0));
    const int32_t full = keys.split ? 0 : n & ~31;
    __m512 l1 = _mm512_setzero_ps();
    int32_t found = 0;
    for (int32_t g = 0; g < full; g += 32) {
      __m512 e_even, e_odd, b_even, b_odd;
      widen32(e + block + g, e_even, e_odd);
      widen32(advance(b, block + g), b_even, b_odd);
      const __m512i a_even = _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(e_even, b_even)), abs_mask);
      const __m512i a_odd = _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(e_odd, b_odd)), abs_mask);
      const __mmask16 up_even = _mm512_cmpge_epu32_mask(a_even, up_v);
      const __mmask16 up_odd = _mm512_cmpge_epu32_mask(a_odd, up_v);
      above_lanes = _mm512_mask_sub_epi32(above_lanes, up_even, above_lanes, _mm512_set1_epi32(-1));
      above_lanes = _mm512_mask_sub_epi32(above_lanes, up_odd, above_lanes, _mm512_set1_epi32(-1));
      if (kL1) {
        l1 = _mm512_mask_add_ps(l1, up_even, l1, _mm512_castsi512_ps(a_even));
        l1 = _mm512_mask_add_ps(l1, up_odd, l1, _mm512_castsi512_ps(a_odd));
      }
      const __mmask16 in_even = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(a_even, in_v), width_v);
      const __mmask16 in_odd = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(a_odd, in_v), width_v);
      const __m512i step_at = _mm512_set1_epi32(g);
      _mm512_storeu_si512(at + found, _mm512_maskz_compress_epi32(in_even, _mm512_add_epi32(step_at, even_at)));
      found += __builtin_popcount(unsigned(in_even));
      _mm512_storeu_si512(at + found, _mm512_maskz_compress_epi32(in_odd, _mm512_add_epi32(step_at, odd_at)));
      found += __builtin_popcount(unsigned(in_odd));
    }
    if (kL1) above_l1 += double(_mm512_reduce_add_ps(l1));
    finish_block<kL1>(e, b, block, full, n, first, up_boundary, lo, &above, &above_l1, at, found, candidates, &m);
  }
  above += _mm512_reduce_add_epi32(above_lanes);
  result->above += above;
  result->above_l1 += above_l1;
  result->candidates = m;
}

template <bool kL1, typename SE>
void scan_range_base(const SE* e, const BlockSource* base, int64_t len, int64_t first, uint64_t up_boundary,
                     uint64_t lo, const EdgeThresholds& up, const EdgeThresholds& in, TopkScanResult* result,
                     uint64_t* candidates) {
  if constexpr (std::is_same_v<SE, uint16_t>) {
    if (base == nullptr) {
      const NoBase none;
      return scan_range_bf16<kL1>(e, &none, len, first, up_boundary, lo, up, in, result, candidates);
    }
    if (base->dtype == DType::bf16) {
      const uint16_t* b = static_cast<const uint16_t*>(base->data) + base->offset;
      return scan_range_bf16<kL1>(e, b, len, first, up_boundary, lo, up, in, result, candidates);
    }
  }
  if (base == nullptr) {
    const NoBase none;
    return scan_range<kL1>(e, &none, len, first, up_boundary, lo, up, in, result, candidates);
  }
  with_storage(*base, [&](auto* b) { scan_range<kL1>(e, b, len, first, up_boundary, lo, up, in, result, candidates); });
}
#endif

template <typename T>
void topk_scan_t(const T* e, const float* base, int64_t len, int64_t first, uint64_t lo,
                 uint64_t hi, bool sum_l1, TopkScanResult* result, uint64_t* candidates) {
  // above: composite >= hi + 1; inside: composite >= lo and not above.
  const uint64_t up_boundary = hi == ~uint64_t(0) ? hi : hi + 1;
  const BlockBoundary up_from = block_boundary(up_boundary, first);
  const BlockBoundary in_from = block_boundary(lo, first);
  uint32_t up_key = 0, in_key = 0;
  const bool uniform = uniform_threshold(up_boundary, first, len, &up_key) &&
                       uniform_threshold(lo, first, len, &in_key);
  prefetch_ahead(e, len * int64_t(sizeof(T)));
  int32_t above = 0;
  float above_l1 = 0.0f;
  alignas(64) int32_t inside[kBlock];
  alignas(64) uint32_t keys_of[kBlock];
  const int32_t n = int32_t(len);
  if (uniform && sum_l1)
    classify_block<true, true>(e, base, n, up_from, in_from, up_key, in_key, &above, &above_l1, inside, keys_of);
  else if (uniform)
    classify_block<true, false>(e, base, n, up_from, in_from, up_key, in_key, &above, &above_l1, inside, keys_of);
  else
    classify_block<false, true>(e, base, n, up_from, in_from, up_key, in_key, &above, &above_l1, inside, keys_of);
  // Candidates are rare (a window around the k-th, a few per block): with AVX2 or AVX-512, a
  // bit mask per vector of elements and a walk over its set bits; else one branch-free store
  // per element.
  int64_t m = 0;
#if FM_ISA >= 1
  int32_t g = 0;
#if FM_ISA == 2
  constexpr int32_t kWidth = 16;
  auto mask_of = [&](int32_t at) {
    return unsigned(_mm512_test_epi32_mask(_mm512_load_si512(inside + at), _mm512_set1_epi32(-1)));
  };
#else
  constexpr int32_t kWidth = 8;
  auto mask_of = [&](int32_t at) {
    const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(inside + at));
    return unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(v, _mm256_setzero_si256()))));
  };
#endif
  for (; g + kWidth <= n; g += kWidth) {
    for (unsigned take = mask_of(g); take != 0; take &= take - 1) {
      const int32_t j = g + __builtin_ctz(take);
      candidates[m++] = composite_key(keys_of[j], first + j);
    }
  }
  for (; g < n; ++g) {
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
  const double l1 = sum_l1 ? double(above_l1) : 0.0;
  result->above += count;
  result->above_l1 += l1;
  result->candidates = m;
}

void topk_scan(BlockSource src, const BlockSource* base, int64_t len, uint64_t lo, uint64_t hi, bool sum_l1,
               TopkScanResult* result, uint64_t* candidates) {
  // above: composite >= hi + 1; inside: composite >= lo and not above.
  const uint64_t up_boundary = hi == ~uint64_t(0) ? hi : hi + 1;
#if FM_ISA == 2
  EdgeThresholds up, in;
  if (edge_thresholds(up_boundary, src.offset, &up) && edge_thresholds(lo, src.offset, &in)) {
    with_storage(src, [&](auto* e) {
      if (sum_l1) scan_range_base<true>(e, base, len, src.offset, up_boundary, lo, up, in, result, candidates);
      else scan_range_base<false>(e, base, len, src.offset, up_boundary, lo, up, in, result, candidates);
    });
    return;
  }
#endif
  // Block by block, the base converted to floats.
  alignas(64) float base_block[kBlock] = {};
  int64_t m = 0;
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t n = len - b < kBlock ? len - b : kBlock;
    if (base) load(base->data, base->dtype, base->offset + b, n, base_block);
    TopkScanResult part;
    with_storage(BlockSource{src.data, src.dtype, src.offset + b}, [&](auto* e) {
      topk_scan_t(e, base_block, n, src.offset + b, lo, hi, sum_l1, &part, candidates + m);
    });
    result->above += part.above;
    result->above_l1 += part.above_l1;
    m += part.candidates;
  }
  result->candidates = m;
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
// kLean: every mix weight and lambda is 1, so those steps are left out, and the division
// happens only when kDivide (normalize with consensus, a divisor other than 1 without): the
// same result with fewer operations.
template <int T, Consensus C, bool kLean = false, bool kDivide = true>
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
      mixed += agree ? (kLean ? x[t] : x[t] * mw[t]) : 0.0f;
      agreeing += agree ? dw[t] : 0.0f;
    }
    divisor = normalize && agreeing != 0.0f ? agreeing : 1.0f;
  }
  if (kLean) return base + (kDivide ? mixed / divisor : mixed);
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
// ranges (keep_all, drop_all and topk_range are ranges too) with uniform thresholds on this
// block, or (kBits) keep decisions replayed from packed bits: keep_u[t][j] < 1 (unpack_keep's
// stand-in uniforms against keep probability 1; constant rows for keep_all and drop_all).
// Deltas, masks, sign election and the weighted sum in registers, in the operation order of
// contribution + combine_fixed.
template <int T, typename S, Consensus C, bool kBits, typename B>
void merge_ranges_general(const S* const (&e)[T], const uint32_t (&keep_key)[T], const uint32_t (&drop_key)[T],
                          const float* const (&keep_u)[T], const ExpertPlan* plans, const CombineParams& p,
                          const B* __restrict base, int32_t len, float* __restrict out) {
  float scale[T], w[T], mw[T], dw[T];
  for (int t = 0; t < T; ++t) {
    const ExpertPlan& x = plans[t];
    scale[t] = x.scale;
    w[t] = x.weight;
    mw[t] = x.mix_weight;
    dw[t] = x.divisor_weight;
  }
  const float fixed_divisor = p.normalize ? p.divisor : 1.0f;
  for (int32_t j = 0; j < len; ++j) {
    const float b = element(base, j);
    float x[T];
    for (int t = 0; t < T; ++t) {
      const float d = element(e[t], j) - b;
      const bool kept = kBits ? keep_u[t][j] < 1.0f : (abs_bits(d) >= keep_key[t]) & (abs_bits(d) < drop_key[t]);
      x[t] = kept ? (d * scale[t]) * w[t] : 0.0f;
    }
    out[j] = combine_element<T, C>(x, mw, dw, p.normalize, fixed_divisor, p.lambda, b);
  }
}

// merge_ranges_general for the common plans whose optional steps are all exact no-ops (scale
// 1, mix weight 1, lambda 1, no dropped top range): they are left out, which leaves the same
// result. kDivide: the normalisation divides (by the agreeing weights, or a divisor other than
// 1); kMasked: some expert keeps less than everything on this block (else no key test).
template <int T, typename S, Consensus C, bool kDivide, bool kMasked, typename B>
void merge_ranges_lean(const S* const (&e)[T], const uint32_t (&keep_key)[T], const ExpertPlan* plans,
                       float fixed_divisor, const B* __restrict base, int32_t len, float* __restrict out) {
  float w[T], mw[T], dw[T];
  for (int t = 0; t < T; ++t) {
    w[t] = plans[t].weight;
    mw[t] = plans[t].mix_weight;  // 1 here: unused
    dw[t] = plans[t].divisor_weight;
  }
  for (int32_t j = 0; j < len; ++j) {
    const float b = element(base, j);
    float x[T];
    for (int t = 0; t < T; ++t) {
      const float d = element(e[t], j) - b;
      x[t] = !kMasked || abs_bits(d) >= keep_key[t] ? d * w[t] : 0.0f;
    }
    out[j] = combine_element<T, C, true, kDivide>(x, mw, dw, kDivide, fixed_divisor, 1.0f, b);
  }
}

// Stand-in uniforms of a keep_all (-1: kept) or drop_all (2: dropped) expert beside experts
// with packed keep bits.
const float* constant_keep(bool kept) {
  static const std::array<float, kBlock> all = [] {
    std::array<float, kBlock> u;
    u.fill(-1.0f);
    return u;
  }();
  static const std::array<float, kBlock> none = [] {
    std::array<float, kBlock> u;
    u.fill(2.0f);
    return u;
  }();
  return kept ? all.data() : none.data();
}

template <int T, typename S, Consensus C>
bool merge_ranges_block(const BlockSource* experts, const ExpertPlan* plans, const CombineParams& p,
                        const float* base, const void* base_same, const float* const* keep_u, int64_t len,
                        float* out) {
  const int64_t first = experts[0].offset;
  const S* e[T];
  uint32_t keep_key[T], drop_key[T];
  // With packed keep bits the other experts must keep all or nothing (their masks become
  // constant rows); any other mix takes contribution + combine.
  const float* u[T] = {};
  const bool bits = keep_u != nullptr;
  for (int t = 0; t < T && bits; ++t) {
    const MaskKind kind = plans[t].kind;
    if (keep_u[t]) u[t] = keep_u[t];
    else if (kind == MaskKind::keep_all || kind == MaskKind::drop_all) u[t] = constant_keep(kind == MaskKind::keep_all);
    else return false;
  }
  bool lean = p.lambda == 1.0f, masked = false;
  for (int t = 0; t < T; ++t) {
    const ExpertPlan& x = plans[t];
    // No software prefetch here: the fused loop reads its streams in lockstep, which the
    // hardware prefetchers follow; the prefetches cost more than they saved (EPYC Zen 4,
    // interleaved A/B: task_arithmetic 6.1 -> 5.3 ms, ties 19.4 -> 18.8 ms on 4096^2 x 3 bf16).
    e[t] = static_cast<const S*>(experts[t].data) + first;
    if (!uniform_threshold(x.kind == MaskKind::drop_all ? kKeepNone : x.keep_from, first, len, &keep_key[t]) ||
        !uniform_threshold(x.drop_from, first, len, &drop_key[t]))
      return false;
    lean = lean && x.drop_from == kKeepNone && x.scale == 1.0f && x.mix_weight == 1.0f;
    masked |= keep_key[t] != 0;
  }
  const int32_t n = int32_t(len);
  const float fixed_divisor = p.normalize ? p.divisor : 1.0f;
  const bool divide = C == Consensus::none ? fixed_divisor != 1.0f : p.normalize;
  auto run = [&](const auto* b) {
    // Replayed masks take the general form only (DARE's rescale makes it the common case, and
    // a lean form for them would add a third more instantiations to this file's build).
    if (bits) merge_ranges_general<T, S, C, true>(e, keep_key, drop_key, u, plans, p, b, n, out);
    else if (!lean) merge_ranges_general<T, S, C, false>(e, keep_key, drop_key, u, plans, p, b, n, out);
    else if (divide && masked) merge_ranges_lean<T, S, C, true, true>(e, keep_key, plans, fixed_divisor, b, n, out);
    else if (divide) merge_ranges_lean<T, S, C, true, false>(e, keep_key, plans, fixed_divisor, b, n, out);
    else if (masked) merge_ranges_lean<T, S, C, false, true>(e, keep_key, plans, fixed_divisor, b, n, out);
    else merge_ranges_lean<T, S, C, false, false>(e, keep_key, plans, fixed_divisor, b, n, out);
  };
  if (base_same != nullptr) run(static_cast<const S*>(base_same) + first);
  else run(base);
  return true;
}

template <int T, typename S>
bool merge_ranges_storage(const BlockSource* experts, const ExpertPlan* plans, const CombineParams& p,
                          const float* base, const void* base_same, const float* const* keep_u, int64_t len,
                          float* out) {
  switch (p.consensus) {
    case Consensus::none: return merge_ranges_block<T, S, Consensus::none>(experts, plans, p, base, base_same, keep_u, len, out);
    case Consensus::sum: return merge_ranges_block<T, S, Consensus::sum>(experts, plans, p, base, base_same, keep_u, len, out);
    case Consensus::count: return merge_ranges_block<T, S, Consensus::count>(experts, plans, p, base, base_same, keep_u, len, out);
  }
  return false;
}

template <int T>
bool merge_ranges_count(const BlockSource* experts, const ExpertPlan* plans, const CombineParams& p,
                        const float* base, const void* base_same, const float* const* keep_u, int64_t len,
                        float* out) {
  switch (experts[0].dtype) {
    case DType::f32: return merge_ranges_storage<T, float>(experts, plans, p, base, base_same, keep_u, len, out);
    case DType::bf16: return merge_ranges_storage<T, uint16_t>(experts, plans, p, base, base_same, keep_u, len, out);
    case DType::f16: return merge_ranges_storage<T, f16_t>(experts, plans, p, base, base_same, keep_u, len, out);
    default: return false;
  }
}

bool merge_ranges(const BlockSource* experts, int count, const ExpertPlan* plans,
                  const CombineParams& p, const float* base, const void* base_same, const float* const* keep_u,
                  int64_t len, float* out) {
  switch (count) {
    case 1: return merge_ranges_count<1>(experts, plans, p, base, base_same, keep_u, len, out);
    case 2: return merge_ranges_count<2>(experts, plans, p, base, base_same, keep_u, len, out);
    case 3: return merge_ranges_count<3>(experts, plans, p, base, base_same, keep_u, len, out);
    case 4: return merge_ranges_count<4>(experts, plans, p, base, base_same, keep_u, len, out);
    case 5: return merge_ranges_count<5>(experts, plans, p, base, base_same, keep_u, len, out);
    case 6: return merge_ranges_count<6>(experts, plans, p, base, base_same, keep_u, len, out);
    case 7: return merge_ranges_count<7>(experts, plans, p, base, base_same, keep_u, len, out);
    case 8: return merge_ranges_count<8>(experts, plans, p, base, base_same, keep_u, len, out);
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
  static const GtaBlockKernels table = {load,     store,       stream_store, subtract,     uniforms,
                                        pack_keep, unpack_keep, abs_sums,     topk_scan,    contribution,
                                        combine,   merge_ranges};
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
