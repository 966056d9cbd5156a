// Instantiate a kernel body for each storage type. FM_DISPATCH_DTYPE(dtype, T, body) binds
// the C++ storage type of `dtype` to T inside body.
#pragma once
#include "fastmerge/numeric.h"

#define FM_DISPATCH_DTYPE(DTYPE, T, ...)                \
  switch (DTYPE) {                                      \
    case ::fastmerge::DType::f32: {                     \
      using T = float;                                  \
      __VA_ARGS__;                                      \
    } break;                                            \
    case ::fastmerge::DType::f16: {                     \
      using T = ::fastmerge::f16_t;                     \
      __VA_ARGS__;                                      \
    } break;                                            \
    case ::fastmerge::DType::bf16: {                    \
      using T = ::fastmerge::bf16_t;                    \
      __VA_ARGS__;                                      \
    } break;                                            \
  }
