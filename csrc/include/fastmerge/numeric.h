// Element types and the conversions of the numerics contract: every kernel loads its inputs
// as float, computes in float, and rounds once (round-to-nearest-even) to the output type.
// Software conversions on raw bits, identical on host and device and easy to vectorise.
#pragma once
#include <cstdint>
#include <cstring>

#include "fastmerge/common.h"

namespace fastmerge {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, u8 = 3, i64 = 4 };  // u8: masks, i64: index maps

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::u8: return "uint8";
    case DType::i64: return "int64";
  }
  return "?";
}

inline int dtype_size(DType d) {
  return d == DType::f32 ? 4 : d == DType::u8 ? 1 : d == DType::i64 ? 8 : 2;
}

// Storage types for the 16-bit formats: plain bit containers.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

FM_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FM_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

FM_HD float to_float(float x) { return x; }
FM_HD float to_float(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }

// IEEE binary16 -> binary32, exact, branch-light (normals, subnormals, inf, nan).
FM_HD float to_float(f16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t expo_mant = h & 0x7fffu;
  // Shift exponent+mantissa into place and rebias by multiplying with 2^112.
  float mag = bits_float(expo_mant << 13) * bits_float(0x77800000u);  // 2^112
  // Inf/NaN: force the exponent to all ones.
  if (expo_mant >= 0x7c00u) mag = bits_float((expo_mant << 13) | 0x7f800000u);
  return bits_float(float_bits(mag) | sign);
}

template <typename T> FM_HD T from_float(float f);

template <> FM_HD float from_float<float>(float f) { return f; }

template <> FM_HD bf16_t from_float<bf16_t>(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

// binary32 -> binary16 with round-to-nearest-even, overflow to inf, subnormals, NaN kept.
template <> FM_HD f16_t from_float<f16_t>(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  uint32_t h;
  if (a > 0x7f800000u) {
    h = 0x7e00u;  // NaN
  } else if (a >= 0x477ff000u) {
    h = 0x7c00u;  // rounds to >= 65520: inf
  } else if (a < 0x38800000u) {
    // Result is subnormal (or zero): add 0.5 (as float) so the FPU rounds the mantissa for us.
    h = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  } else {
    const uint32_t odd = (a >> 13) & 1u;
    h = (a + 0xc8000fffu + odd) >> 13;  // rebias exponent (-112 << 23) and round
  }
  return f16_t{uint16_t(h | sign)};
}

// Magnitude key: the bits of |x| as an unsigned integer order |x| exactly. NaNs share one key
// above +inf so that composite keys below never reach UINT64_MAX.
FM_HD uint32_t magnitude_key(float x) {
  const uint32_t a = float_bits(x) & 0x7fffffffu;
  return a > 0x7f800000u ? 0x7fc00000u : a;
}

// Priority order of the top-k contract: larger magnitude first, then lower flat index.
// composite(i) = key << 33 | (2^33 - 1 - i) is larger exactly when element i ranks higher,
// so "element i is among the top k" is one comparison against the k-th largest composite.
constexpr int kIndexBits = 33;
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;
constexpr int64_t kMaxNumel = int64_t(kIndexMask);

FM_HD uint64_t composite_key(uint32_t key, int64_t index) {
  return (uint64_t(key) << kIndexBits) | (kIndexMask - uint64_t(index));
}

}  // namespace fastmerge
