// Row max / argmax kernels of the CPU ToMe match (see tome_cpu_kernels.h). Compiled once per
// instruction set; the AVX512-BF16 screening kernel only in the AVX-512 build.
#include <cstdint>
#include <cstring>

#include "fastmerge/cpu_isa.h"
#include "tome_cpu_kernels.h"

#if defined(FM_ISA) && FM_ISA == 2
#include <immintrin.h>
#endif

#include "fastmerge/isa_begin.h"

namespace {

// GCC vector extension: 16 floats, lowered to whatever registers the ISA has.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

constexpr int kRowsExact = 6;  // a-rows per fp32 tile: 6 accumulators of 16 lanes
constexpr float kNegInf = -__builtin_huge_valf();

// Larger, or NaN over a number (torch's max propagates NaN). Ascending column scans with
// this strict test keep the lowest index among equal maxima.
inline bool beats(float v, float best) { return v > best || (v != v && best == best); }

// Canonical score (tome.h): sequential fp32 sum, product and add rounded separately.
inline float canonical_dot(const float* a, const float* b, int64_t c) {
  float s = 0.0f;
  for (int64_t k = 0; k < c; ++k) s = s + a[k] * b[k];
  return s;
}

// Columns [lo, hi) of panel p that may be destinations.
inline void panel_columns(const fastmerge::TomeOperands& op, int64_t p, int64_t& lo, int64_t& hi) {
  const int64_t j0 = p * fastmerge::kTomePanel;
  lo = op.b_begin > j0 ? op.b_begin : j0;
  hi = op.nb < j0 + fastmerge::kTomePanel ? op.nb : j0 + fastmerge::kTomePanel;
}

void rowmax_exact(const fastmerge::TomeOperands& op, int64_t a0, int64_t a1, float* best,
                  int64_t* idx) {
  for (int64_t i = a0; i < a1; ++i) {
    best[i - a0] = kNegInf;
    idx[i - a0] = 0;
  }
  const int64_t c = op.c;
  for (int64_t g = a0; g < a1; g += kRowsExact) {
    const int64_t rows = a1 - g < kRowsExact ? a1 - g : kRowsExact;
    const float* ar[kRowsExact];
    for (int i = 0; i < kRowsExact; ++i) ar[i] = i < rows ? op.a + (g + i) * c : op.zero_row;
    for (int64_t p = op.b_begin / fastmerge::kTomePanel; p < op.panels; ++p) {
      // Each lane sums its column sequentially over c: the canonical score.
      v16 acc[kRowsExact] = {};
      const float* bp = op.b_panels + p * c * fastmerge::kTomePanel;
      for (int64_t k = 0; k < c; ++k) {
        const v16 bk = *reinterpret_cast<const v16u*>(bp + k * fastmerge::kTomePanel);
#pragma GCC unroll 6
        for (int i = 0; i < kRowsExact; ++i) acc[i] = acc[i] + ar[i][k] * bk;
      }
      int64_t lo, hi;
      panel_columns(op, p, lo, hi);
      const int64_t j0 = p * fastmerge::kTomePanel;
      for (int64_t i = 0; i < rows; ++i) {
        float& b = best[g + i - a0];
        int64_t& x = idx[g + i - a0];
        for (int64_t j = lo; j < hi; ++j) {
          const float v = acc[i][j - j0];
          if (beats(v, b)) {
            b = v;
            x = j;
          }
        }
      }
    }
  }
}

#if FM_ISA == 2

#define FM_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2,avx512bf16")))

constexpr int kRowsBf16 = 8;         // a-rows per bf16 tile
constexpr int64_t kChunkPanels = 16; // b panels per L2-resident chunk (256 tokens)
constexpr int kCandidates = 48;      // screened candidates kept per row before falling back

struct RowState {
  float best, thr;  // screened max and best - 2 delta
  int n;
  bool overflow;    // too many near-maximal columns: re-score the whole row canonically
  int64_t j[kCandidates];
  float v[kCandidates];
};

inline void offer(RowState& s, int64_t j, float v, float two_delta) {
  if (v > s.best) {
    s.best = v;
    s.thr = v - two_delta;
  }
  if (v < s.thr || s.overflow) return;
  if (s.n == kCandidates) {
    int kept = 0;
    for (int q = 0; q < s.n; ++q)
      if (s.v[q] >= s.thr) {
        s.j[kept] = s.j[q];
        s.v[kept] = s.v[q];
        ++kept;
      }
    s.n = kept;
    if (s.n == kCandidates) {
      s.overflow = true;
      return;
    }
  }
  s.j[s.n] = j;
  s.v[s.n] = v;
  ++s.n;
}

// acc[i * NP + q] = bf16 dot products of rows ar[i] with the 16 columns of panel q.
template <int NP>
FM_BF16_TARGET inline void tile_bf16(const uint32_t* const* ar, const uint32_t* bp,
                                     int64_t panel_stride, int64_t cp, __m512* acc) {
  for (int q = 0; q < kRowsBf16 * NP; ++q) acc[q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < cp; ++k) {
    __m512bh bk[NP];
    for (int q = 0; q < NP; ++q)
      bk[q] = (__m512bh)_mm512_loadu_si512(bp + q * panel_stride + k * fastmerge::kTomePanel);
#pragma GCC unroll 8
    for (int i = 0; i < kRowsBf16; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(ar[i][k]));
      for (int q = 0; q < NP; ++q) acc[i * NP + q] = _mm512_dpbf16_ps(acc[i * NP + q], av, bk[q]);
    }
  }
}

FM_BF16_TARGET void rowmax_bf16(const fastmerge::TomeOperands& op, int64_t a0, int64_t a1,
                                float* best, int64_t* idx) {
  RowState st[fastmerge::kTomeMaxRows];
  const int64_t rows_total = a1 - a0;
  for (int64_t i = 0; i < rows_total; ++i) {
    st[i].best = kNegInf;
    st[i].thr = kNegInf;
    st[i].n = 0;
    st[i].overflow = false;
  }
  const float two_delta = 2.0f * op.delta;
  const int64_t panel_stride = op.cp * fastmerge::kTomePanel;
  for (int64_t pc = op.b_begin / fastmerge::kTomePanel; pc < op.panels; pc += kChunkPanels) {
    const int64_t pe = pc + kChunkPanels < op.panels ? pc + kChunkPanels : op.panels;
    for (int64_t g = a0; g < a1; g += kRowsBf16) {
      const int64_t rows = a1 - g < kRowsBf16 ? a1 - g : kRowsBf16;
      const uint32_t* ar[kRowsBf16];
      for (int i = 0; i < kRowsBf16; ++i)
        ar[i] = i < rows ? op.a_pairs + (g + i) * op.cp : op.zero_pairs;
      for (int64_t p = pc; p < pe; p += 2) {
        const int np = pe - p >= 2 ? 2 : 1;
        __m512 acc[kRowsBf16 * 2];
        const uint32_t* bp = op.b_pairs + p * panel_stride;
        if (np == 2) tile_bf16<2>(ar, bp, panel_stride, op.cp, acc);
        else tile_bf16<1>(ar, bp, panel_stride, op.cp, acc);
        for (int q = 0; q < np; ++q) {
          int64_t lo, hi;
          panel_columns(op, p + q, lo, hi);
          const int64_t j0 = (p + q) * fastmerge::kTomePanel;
          if (hi <= lo) continue;
          const uint32_t valid = ((hi - j0 >= 16 ? 0xffffu : ((1u << (hi - j0)) - 1u)) &
                                  ~((1u << (lo - j0)) - 1u));
          for (int64_t i = 0; i < rows; ++i) {
            RowState& s = st[g + i - a0];
            uint32_t m = uint32_t(_mm512_cmp_ps_mask(acc[i * np + q], _mm512_set1_ps(s.thr),
                                                     _CMP_GE_OQ)) & valid;
            if (!m) continue;
            alignas(64) float lanes[fastmerge::kTomePanel];
            _mm512_store_ps(lanes, acc[i * np + q]);
            while (m) {
              const int l = __builtin_ctz(m);
              m &= m - 1;
              offer(s, j0 + l, lanes[l], two_delta);
            }
          }
        }
      }
    }
  }
  // Every column whose canonical score can be the row max is a candidate; re-score them.
  for (int64_t i = 0; i < rows_total; ++i) {
    const RowState& s = st[i];
    if (s.overflow) {
      rowmax_exact(op, a0 + i, a0 + i + 1, best + i, idx + i);
      continue;
    }
    float b = kNegInf;
    int64_t x = 0;
    const float* arow = op.a + (a0 + i) * op.c;
    int64_t js[kCandidates];
    int m = 0;
    for (int q = 0; q < s.n; ++q)
      if (s.v[q] >= s.thr) js[m++] = s.j[q];
    // Canonical scores of the candidates, four independent sequential sums at a time.
    for (int q = 0; q < m; q += 4) {
      const float* bq[4];
      for (int t = 0; t < 4; ++t) bq[t] = op.b + js[q + t < m ? q + t : q] * op.c;
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int64_t k = 0; k < op.c; ++k) {
        const float ak = arow[k];
        for (int t = 0; t < 4; ++t) acc[t] = acc[t] + ak * bq[t][k];
      }
      for (int t = 0; t < 4 && q + t < m; ++t)
        if (beats(acc[t], b) || (acc[t] == b && js[q + t] < x)) {
          b = acc[t];
          x = js[q + t];
        }
    }
    best[i] = b;
    idx[i] = x;
  }
}

bool has_bf16() { return __builtin_cpu_supports("avx512bf16"); }

#else

bool has_bf16() { return false; }

#endif

}  // namespace

const fastmerge::TomeKernels& tome_kernel_table() {
  static const fastmerge::TomeKernels table{
      rowmax_exact,
#if FM_ISA == 2
      has_bf16() ? rowmax_bf16 : nullptr,
#else
      nullptr,
#endif
  };
  return table;
}

#include "fastmerge/isa_end.h"

#if !defined(FM_ISA) || FM_ISA == 0
namespace fastmerge {
#define FM_DECLARE_TOME_TABLE(ns) \
  namespace ns {                  \
  const TomeKernels& tome_kernel_table(); \
  }
FM_FOR_EACH_ISA(FM_DECLARE_TOME_TABLE)
#undef FM_DECLARE_TOME_TABLE
const TomeKernels& tome_kernels() { FM_CPU_DISPATCH(tome_kernel_table) }
}  // namespace fastmerge
#endif
