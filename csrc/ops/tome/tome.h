// Token merging ("tome" family): ToMe's bipartite soft matching (Bolya et al., ICLR 2023)
// without the similarity matrix.
//
// Tokens of metric [B, N, C] are split a = even tokens (na = ceil(N/2)), b = odd tokens
// (nb = floor(N/2)), normalised by their L2 norm. For every a-token the best b-token is found
// by streaming over b (row max / argmax), never storing the na x nb scores:
//   score(i, j) = sum_c a[i][c] * b[j][c], summed sequentially over c in fp32 (no FMA), the
//   "canonical" score: every path (fp32 tiles, the bf16-filtered path's exact re-check, CUDA)
//   produces these same values, so results do not depend on the device, ISA or thread count.
// Ties: the lowest b index wins the row max; edges are ordered by similarity descending, then
// a index ascending (composite keys, below). NaN ranks above every number (as in torch).
// Protected tokens: with a class token, a-token 0 scores -inf (never merged); with a distill
// token, b-token 0 is never a destination.
//
// Maps (int64, one row per batch): unm_idx [na - r], src_idx [r], dst_idx [r] (ToMe's, a/b
// local indices), and the merge plan over the N' = N - r output rows: offsets [N' + 1],
// members [N] (per output row its token indices: the kept token first, then the merged
// sources in edge order: the summation order), dest [N] (output row of every token).
#pragma once
#include <cstdint>

#include "fastmerge/common.h"
#include "fastmerge/numeric.h"
#include "fastmerge/tensor.h"

namespace fastmerge {

struct TomeShape {
  int64_t batch = 0, tokens = 0, channels = 0, r = 0;
  bool class_token = false, distill_token = false;
  int64_t na() const { return (tokens + 1) / 2; }
  int64_t nb() const { return tokens / 2; }
  int64_t merged() const { return tokens - r; }
};

// Orderable key of a float: larger float -> larger key; -0 == +0; NaN above +inf.
FM_HD uint32_t tome_order_key(float v) {
  uint32_t u = float_bits(v + 0.0f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffffffu;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Edge rank key: larger key = earlier edge (similarity descending, then a index ascending).
FM_HD uint64_t tome_edge_key(float node_max, int64_t a_index) {
  return (uint64_t(tome_order_key(node_max)) << 32) | (0xffffffffu - uint32_t(a_index));
}

// Output row of a-token i kept unmerged at unmerged position u, and of b-token j, in ToMe's
// layout: [unm, dst], or [unm[0], dst[0], unm[1:], dst[1:]] with a distill token.
FM_HD int64_t tome_unm_row(int64_t u, int64_t n_unm, bool distill) {
  (void)n_unm;
  return distill && u > 0 ? u + 1 : u;
}
FM_HD int64_t tome_dst_row(int64_t j, int64_t n_unm, bool distill) {
  return distill ? (j == 0 ? 1 : n_unm + j) : n_unm + j;
}

enum class TomeReduce : int { weighted_mean = 0, max = 1 };

// The max reduction's step: NaN propagates from either side, as torch's amax does.
FM_HD float tome_max_step(float acc, float v) { return (v > acc || v != v) ? v : acc; }

struct TomeMapViews {
  TensorView unm_idx, src_idx, dst_idx, offsets, members, dest;
};

// Views of the merge (both devices): x [B, N, C] -> out [B, rows, C], the maps' offsets and
// members, optional sizes; flat contiguous buffers of those sizes.
inline void check_merge_views(const TensorView& x, const TensorView* size,
                              const TensorView& offsets, const TensorView& members,
                              const TensorView& out, const TensorView* size_out) {
  FM_CHECK(x.ndim() == 3 && out.ndim() == 3, "x and out must be [B, N, C]");
  const int64_t B = x.shape[0], n = x.shape[1], c = x.shape[2], rows = out.shape[1];
  check_flat(x, "x", B * n * c);
  check_flat(out, "out", B * rows * c);
  check_flat(offsets, "offsets", B * (rows + 1));
  check_flat(members, "members", B * n);
  FM_CHECK(offsets.dtype == DType::i64 && members.dtype == DType::i64,
           "offsets and members must be int64");
  if (size) check_flat(*size, "size", B * n);
  if (size)
    FM_CHECK(size->dtype == DType::f32 || size->dtype == DType::f16 || size->dtype == DType::bf16,
             "size must be a float32, float16 or bfloat16 tensor");
  if (size_out) check_flat(*size_out, "size_out", B * rows);
  check_same_device(out, x, "out");
  check_same_device(offsets, x, "offsets");
  check_same_device(members, x, "members");
  if (size) check_same_device(*size, x, "size");
  if (size_out) check_same_device(*size_out, x, "size_out");
}

// ---- CPU (tome_cpu.cpp) ----

// Row max / argmax of every a-token (node_max [B, na] f32, node_idx [B, na] i64).
void tome_scores_cpu(const TensorView& metric, const TomeShape& s, const TensorView& node_max,
                     const TensorView& node_idx);
// The whole match: scores, top-r edges, maps.
void tome_match_cpu(const TensorView& metric, const TomeShape& s, const TomeMapViews& maps);
// out[b, o] = sum_{t in members of o} x[b, t] * size[b, t] / sum size (weighted_mean; size
// null: weights 1), size_out[b, o] = that sum; or the elementwise max (max; no sizes).
void tome_merge_cpu(const TensorView& x, const TensorView* size, const TensorView& offsets,
                    const TensorView& members, const TensorView& out, const TensorView* size_out,
                    TomeReduce mode);

// ---- CUDA (tome_cuda.cu): scores and merge; the maps are built from the scores by the
// caller (sorts of unique composite keys, deterministic on any device) ----

void tome_scores_cuda(const TensorView& metric, const TomeShape& s, const TensorView& normed,
                      const TensorView& node_max, const TensorView& node_idx,
                      StreamHandle stream);
void tome_merge_cuda(const TensorView& x, const TensorView* size, const TensorView& offsets,
                     const TensorView& members, const TensorView& out,
                     const TensorView* size_out, TomeReduce mode, StreamHandle stream);

}  // namespace fastmerge
