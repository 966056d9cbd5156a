// Opens the instruction-set region of a CPU kernel file. CMake compiles such a file once per
// FM_ISA level; everything between isa_begin.h and isa_end.h lands in namespace
// fastmerge::FM_ISA_NS with that level's target options. Include every other header BEFORE this
// one, and use no standard-library templates inside the region: an instantiation there could
// carry AVX-512 code into a symbol the generic build shares.
#if !defined(FM_ISA)
#define FM_ISA 0
#endif

#if FM_ISA == 2
#define FM_ISA_NS isa_avx512
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2,prefer-vector-width=512")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"))), apply_to = function)
#endif
#elif FM_ISA == 1
#define FM_ISA_NS isa_avx2
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi2"))), apply_to = function)
#endif
#else
#define FM_ISA_NS isa_generic
#endif

namespace fastmerge {
namespace FM_ISA_NS {
