// Row max / argmax kernels of the CPU ToMe match, compiled once per instruction set
// (tome_cpu_kernels.cpp) and chosen at run time; tome_cpu.cpp owns packing, threads and maps.
#pragma once
#include <cstdint>

namespace fastmerge {

constexpr int kTomePanel = 16;  // b-tokens per packed panel (one AVX-512 register of floats)

// One batch's normalised, packed operands. Canonical scores (tome.h) are sequential fp32
// sums over c, so every kernel below returns the same best / index.
struct TomeOperands {
  const float* a = nullptr;          // na x c a-tokens, row-major
  const float* b = nullptr;          // nb x c b-tokens, row-major
  const float* b_panels = nullptr;   // [panels][c][16] b-tokens transposed, zero padded
  const float* zero_row = nullptr;   // c zeros (padding rows of a tile)
  const uint32_t* a_pairs = nullptr; // [na][cp] a as bf16 pairs (bf16 path only)
  const uint32_t* b_pairs = nullptr; // [panels][cp][16] b as bf16 pairs (bf16 path only)
  const uint32_t* zero_pairs = nullptr;  // cp zero pairs
  int64_t na = 0, nb = 0, c = 0, cp = 0, panels = 0;
  int64_t b_begin = 0;  // 1 with a distill token: b-token 0 is never a destination
  float delta = 0.0f;   // bound on |bf16-filter score - canonical score| (both directions)
};

// At most this many a-rows per call (per-row candidate state lives on the stack).
constexpr int64_t kTomeMaxRows = 64;

struct TomeKernels {
  // best[i - a0], idx[i - a0] for a-rows [a0, a1): the canonical row max, lowest index on
  // ties, NaN above numbers; -inf / 0 when the row has no candidate column.
  void (*rowmax_exact)(const TomeOperands& op, int64_t a0, int64_t a1, float* best,
                       int64_t* idx);
  // The same results, scores screened with bf16 dot products (AVX512-BF16) and only the
  // columns within 2 * delta of the screened max re-scored canonically. Requires finite
  // operands. Null where this build / processor has no AVX512-BF16.
  void (*rowmax_bf16)(const TomeOperands& op, int64_t a0, int64_t a1, float* best,
                      int64_t* idx);
};

const TomeKernels& tome_kernels();

}  // namespace fastmerge
