#include "fastmerge/cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace fastmerge {

CpuIsa detected_cpu_isa() {
#if defined(FM_HAVE_AVX512) && (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return CpuIsa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("bmi2"))
      return CpuIsa::avx2;
    return CpuIsa::generic;
  }();
  return isa;
#else
  return CpuIsa::generic;
#endif
}

CpuIsa active_cpu_isa() {
  // FASTMERGE_CPU_ISA=generic|avx2 lowers the level (for tests and comparisons), never raises it.
  static const CpuIsa isa = [] {
    CpuIsa best = detected_cpu_isa();
    if (const char* env = std::getenv("FASTMERGE_CPU_ISA")) {
      CpuIsa want = best;
      if (!std::strcmp(env, "generic")) want = CpuIsa::generic;
      else if (!std::strcmp(env, "avx2")) want = CpuIsa::avx2;
      else if (!std::strcmp(env, "avx512")) want = CpuIsa::avx512;
      if (int(want) < int(best)) best = want;
    }
    return best;
  }();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace fastmerge
