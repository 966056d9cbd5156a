// A borrowed, non-owning view of a tensor that crossed from Python as a DLPack capsule.
// Kernels see only this struct: data pointer, dtype, shape, element strides and device.
#pragma once
#include <cstdint>
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/numeric.h"

namespace fastmerge {

enum class DeviceKind : int { cpu = 0, cuda = 1 };

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  DeviceKind device = DeviceKind::cpu;
  int device_index = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  int ndim() const { return int(shape.size()); }
  bool is_contiguous() const {
    if (numel() == 0) return true;
    int64_t expected = 1;
    for (int d = ndim() - 1; d >= 0; --d) {
      if (shape[d] != 1 && strides[d] != expected) return false;
      expected *= shape[d];
    }
    return true;
  }
  template <typename T> T* ptr() const { return static_cast<T*>(data); }
};

// Every launcher works on flat contiguous storage; Python makes inputs contiguous first.
inline void check_flat(const TensorView& t, const char* what, int64_t numel) {
  FM_CHECK(t.is_contiguous(), what, " must be contiguous");
  FM_CHECK(t.numel() == numel, what, " has ", t.numel(), " elements, expected ", numel);
  FM_CHECK(numel <= kMaxNumel, what, " has more than 2^33 elements");
}

// A launcher handed a tensor on another device would dereference a foreign pointer (a crash on
// the CPU, a poisoned context on the GPU); Python checks first, this keeps a direct call safe.
inline void check_same_device(const TensorView& t, const TensorView& like, const char* what) {
  FM_CHECK(t.device == like.device && t.device_index == like.device_index, what,
           " is on another device than the other tensors");
}

// One element of a host tensor as float / stored from float (scalar paths: sampling, interp).
inline float load_host(const TensorView& t, int64_t i) {
  switch (t.dtype) {
    case DType::f32: return t.ptr<const float>()[i];
    case DType::bf16: return to_float(t.ptr<const bf16_t>()[i]);
    case DType::f16: return to_float(t.ptr<const f16_t>()[i]);
    default: return 0.0f;
  }
}

inline void store_host(const TensorView& t, int64_t i, float v) {
  switch (t.dtype) {
    case DType::f32: t.ptr<float>()[i] = v; break;
    case DType::bf16: t.ptr<bf16_t>()[i] = from_float<bf16_t>(v); break;
    case DType::f16: t.ptr<f16_t>()[i] = from_float<f16_t>(v); break;
    default: break;
  }
}

// Handle of the caller's CUDA stream (cudaStream_t as an integer); 0 on CPU.
using StreamHandle = uintptr_t;

}  // namespace fastmerge
