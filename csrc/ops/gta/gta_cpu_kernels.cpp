// Per-instruction-set block kernels for the CPU GTA path (see gta_cpu_kernels.h). Loops are
// written so the compiler vectorises them: no calls, no early exits, fixed-width partial sums.
#include "gta_cpu_kernels.h"

#include "fastmerge/cpu_isa.h"
#include "fastmerge/isa_begin.h"

namespace {

constexpr int kLanes = 16;  // independent partial sums: vectorisable, order fixed per build

void load(const void* src, DType dtype, int64_t offset, int64_t len, float* dst) {
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

void uniforms(const RandomStream& stream, int64_t first, int64_t len, float* u) {
  if ((first & 3) == 0 && (len & 3) == 0) {
    const int64_t quad0 = first >> 2;
    for (int64_t q = 0; q < (len >> 2); ++q) {
      const Philox4 r = philox_block(stream, quad0 + q);
      u[4 * q + 0] = word_to_uniform(r.v[0]);
      u[4 * q + 1] = word_to_uniform(r.v[1]);
      u[4 * q + 2] = word_to_uniform(r.v[2]);
      u[4 * q + 3] = word_to_uniform(r.v[3]);
    }
    return;
  }
  for (int64_t j = 0; j < len; ++j) u[j] = uniform_at(stream, first + j);
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

void topk_scan(const float* d, int64_t len, int64_t first, uint64_t lo, uint64_t hi,
               TopkScanResult* result, uint64_t* candidates) {
  int64_t above[kLanes] = {};
  float above_l1[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t c = composite_key(magnitude_key(d[j + l]), first + j + l);
      const bool up = c > hi;
      above[l] += up;
      above_l1[l] += up ? __builtin_fabsf(d[j + l]) : 0.0f;
    }
  }
  for (int l = 0; j < len; ++j, ++l) {
    const uint64_t c = composite_key(magnitude_key(d[j]), first + j);
    const bool up = c > hi;
    above[l] += up;
    above_l1[l] += up ? __builtin_fabsf(d[j]) : 0.0f;
  }
  // Candidates are rare (a window around the k-th): a branch-free append.
  int64_t m = 0;
  for (int64_t i = 0; i < len; ++i) {
    const uint64_t c = composite_key(magnitude_key(d[i]), first + i);
    candidates[m] = c;
    m += (c >= lo) & (c <= hi);
  }
  double l1 = 0.0;
  int64_t count = 0;
  for (int l = 0; l < kLanes; ++l) {
    count += above[l];
    l1 += above_l1[l];
  }
  result->above += count;
  result->above_l1 += l1;
  result->candidates = m;
}

void contribution(const float* d, int64_t len, int64_t first, const ExpertPlan& x, const float* u,
                  const float* keep_prob, float* v) {
  const float scale = x.scale, w = x.weight;
  switch (x.kind) {
    case MaskKind::keep_all:
      for (int64_t j = 0; j < len; ++j) v[j] = (d[j] * scale) * w;
      break;
    case MaskKind::drop_all:
      for (int64_t j = 0; j < len; ++j) v[j] = 0.0f;
      break;
    case MaskKind::topk_range: {
      const uint64_t from = x.keep_from, to = x.drop_from;
      for (int64_t j = 0; j < len; ++j) {
        const uint64_t c = composite_key(magnitude_key(d[j]), first + j);
        v[j] = (c >= from && c < to) ? (d[j] * scale) * w : 0.0f;
      }
    } break;
    case MaskKind::bernoulli: {
      const float p = x.keep_prob;
      for (int64_t j = 0; j < len; ++j) v[j] = u[j] < p ? (d[j] * scale) * w : 0.0f;
    } break;
    case MaskKind::della:
      for (int64_t j = 0; j < len; ++j) v[j] = u[j] < keep_prob[j] ? (d[j] * scale) * w : 0.0f;
      break;
  }
}

void combine(const float* v, int64_t stride, int experts, const float* weights,
             const CombineParams& p, const float* base, int64_t len, float* out) {
  float mixed[kBlock];
  if (p.consensus == Consensus::none) {
    for (int64_t j = 0; j < len; ++j) mixed[j] = v[j];
    for (int t = 1; t < experts; ++t)
      for (int64_t j = 0; j < len; ++j) mixed[j] += v[t * stride + j];
    if (p.normalize)
      for (int64_t j = 0; j < len; ++j) mixed[j] /= p.divisor;
  } else {
    float vote[kBlock], divisor[kBlock];
    const bool by_sum = p.consensus == Consensus::sum;
    for (int64_t j = 0; j < len; ++j) vote[j] = 0.0f;
    for (int t = 0; t < experts; ++t)
      for (int64_t j = 0; j < len; ++j) {
        const float x = v[t * stride + j];
        const float sign = x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
        vote[j] += by_sum ? x : sign;
      }
    for (int64_t j = 0; j < len; ++j) mixed[j] = divisor[j] = 0.0f;
    for (int t = 0; t < experts; ++t) {
      const float w = weights[t];
      for (int64_t j = 0; j < len; ++j) {
        const float x = v[t * stride + j];
        const bool agree = vote[j] >= 0.0f ? x > 0.0f : x < 0.0f;
        mixed[j] += agree ? x : 0.0f;
        divisor[j] += agree ? w : 0.0f;
      }
    }
    if (p.normalize)
      for (int64_t j = 0; j < len; ++j) mixed[j] /= (divisor[j] == 0.0f ? 1.0f : divisor[j]);
  }
  if (p.lambda != 1.0f)
    for (int64_t j = 0; j < len; ++j) mixed[j] *= p.lambda;
  if (base != nullptr) {
    for (int64_t j = 0; j < len; ++j) out[j] = base[j] + mixed[j];
  } else {
    for (int64_t j = 0; j < len; ++j) out[j] = mixed[j];
  }
}

}  // namespace

const GtaBlockKernels& block_kernels() {
  static const GtaBlockKernels table = {load, store, subtract, uniforms, abs_sums, topk_scan,
                                        contribution, combine};
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
