// Closes the region opened by isa_begin.h.
}  // namespace FM_ISA_NS
}  // namespace fastmerge

#if FM_ISA != 0
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
#endif
#undef FM_ISA_NS
