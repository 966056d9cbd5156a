// The DLPack C ABI (https://dmlc.github.io/dlpack/latest/c_api.html), declared here so the
// bindings need no framework headers. Legacy (capsule "dltensor") and versioned
// ("dltensor_versioned") managed tensors are both accepted.
#pragma once
#include <cstdint>

extern "C" {
struct FmDLDevice { int32_t device_type; int32_t device_id; };
struct FmDLDataType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct FmDLTensor {
  void* data;
  FmDLDevice device;
  int32_t ndim;
  FmDLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};
struct FmDLManagedTensor {
  FmDLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(FmDLManagedTensor*);
};
struct FmDLPackVersion { uint32_t major; uint32_t minor; };
struct FmDLManagedTensorVersioned {
  FmDLPackVersion version;
  void* manager_ctx;
  void (*deleter)(FmDLManagedTensorVersioned*);
  uint64_t flags;
  FmDLTensor dl_tensor;
};
}

namespace fastmerge::dlpack {
constexpr int32_t kCPU = 1, kCUDA = 2, kCUDAHost = 3;
constexpr uint8_t kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4, kBool = 6;
}  // namespace fastmerge::dlpack
