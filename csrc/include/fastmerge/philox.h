// Counter-based Philox4x32-10 (Salmon et al., SC'11). A random draw is a pure function of
// (seed, stream, expert, element index), so masks are identical on CPU and GPU, for any thread
// count, chunking or tensor order.
#pragma once
#include <cstdint>

#include "fastmerge/common.h"

namespace fastmerge {

struct PhiloxKey {
  uint32_t k0, k1;
};

struct Philox4 {
  uint32_t v[4];
};

FM_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t k0 = key.k0, k1 = key.k1;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(kM0) * c0;
    const uint64_t p1 = uint64_t(kM1) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n1 = uint32_t(p1);
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    const uint32_t n3 = uint32_t(p0);
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// One stream of uniforms: element i uses word (i % 4) of the block at counter
// (i / 4, expert, stream). stream is a 32-bit hash of the tensor name (FNV-1a, see Python).
struct RandomStream {
  PhiloxKey key;
  uint32_t expert;
  uint32_t stream;
};

FM_HD RandomStream make_stream(uint64_t seed, uint32_t stream, uint32_t expert) {
  return RandomStream{PhiloxKey{uint32_t(seed), uint32_t(seed >> 32)}, expert, stream};
}

// Uniform in [0, 1) with 24 random bits: exactly representable, so "u < p" is exact.
FM_HD float word_to_uniform(uint32_t w) { return float(w >> 8) * (1.0f / 16777216.0f); }

FM_HD Philox4 philox_block(const RandomStream& s, int64_t block) {
  return philox4x32_10(uint32_t(block), uint32_t(uint64_t(block) >> 32), s.expert, s.stream, s.key);
}

FM_HD float uniform_at(const RandomStream& s, int64_t i) {
  return word_to_uniform(philox_block(s, i >> 2).v[i & 3]);
}

}  // namespace fastmerge
