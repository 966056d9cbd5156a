// Run-time choice among CPU kernel builds. Each *_cpu.cpp is compiled once per instruction set
// (CMake defines FM_ISA_NS to isa_avx512, isa_avx2 or isa_generic and sets the flags), and the
// public entry point calls the best build the running processor supports, so one wheel runs
// on any x86-64 and still uses AVX-512 where it exists.
#pragma once

namespace fastmerge {

enum class CpuIsa : int { generic = 0, avx2 = 1, avx512 = 2 };

CpuIsa detected_cpu_isa();          // what this processor supports (and this build has)
CpuIsa active_cpu_isa();            // detected, unless lowered by FASTMERGE_CPU_ISA
const char* cpu_isa_name(CpuIsa isa);

}  // namespace fastmerge

#if defined(FM_HAVE_AVX512) && defined(FM_HAVE_AVX2)
#define FM_FOR_EACH_ISA(X) X(isa_generic) X(isa_avx2) X(isa_avx512)
#define FM_CPU_DISPATCH(fn, ...)                                          \
  switch (::fastmerge::active_cpu_isa()) {                                \
    case ::fastmerge::CpuIsa::avx512: return isa_avx512::fn(__VA_ARGS__); \
    case ::fastmerge::CpuIsa::avx2: return isa_avx2::fn(__VA_ARGS__);     \
    default: return isa_generic::fn(__VA_ARGS__);                         \
  }
#else
#define FM_FOR_EACH_ISA(X) X(isa_generic)
#define FM_CPU_DISPATCH(fn, ...) return isa_generic::fn(__VA_ARGS__);
#endif
