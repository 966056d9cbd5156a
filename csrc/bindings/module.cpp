// fastmerge._C: the module. Tensors arrive as DLPack capsules that we borrow (the Python caller
// keeps them alive for the call); CUDA launchers also get the caller's stream. Each op family
// registers its functions from its own bind_<family>.cpp.
#include <string>

#include "binding.h"
#include "fastmerge/cpu_isa.h"
#include "fastmerge/dlpack_abi.h"
#include "fastmerge/parallel.h"

namespace fastmerge::bindings {

TensorView view_of(const py::capsule& cap) {
  const FmDLTensor* t = nullptr;
  const char* name = PyCapsule_GetName(cap.ptr());
  if (name && std::string(name) == "dltensor") {
    t = &static_cast<FmDLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), name))->dl_tensor;
  } else if (name && std::string(name) == "dltensor_versioned") {
    t = &static_cast<FmDLManagedTensorVersioned*>(PyCapsule_GetPointer(cap.ptr(), name))->dl_tensor;
  } else {
    fail("fastmerge: expected an unused DLPack capsule");
  }
  TensorView v;
  FM_CHECK(t->dtype.lanes == 1, "vector dtypes are not supported");
  if (t->dtype.code == dlpack::kFloat && t->dtype.bits == 32) v.dtype = DType::f32;
  else if (t->dtype.code == dlpack::kFloat && t->dtype.bits == 16) v.dtype = DType::f16;
  else if (t->dtype.code == dlpack::kBfloat && t->dtype.bits == 16) v.dtype = DType::bf16;
  else if ((t->dtype.code == dlpack::kUInt || t->dtype.code == dlpack::kBool) && t->dtype.bits == 8) v.dtype = DType::u8;
  else if (t->dtype.code == dlpack::kInt && t->dtype.bits == 64) v.dtype = DType::i64;
  else fail("fastmerge: unsupported dtype code ", int(t->dtype.code), " bits ", int(t->dtype.bits));
  if (t->device.device_type == dlpack::kCPU || t->device.device_type == dlpack::kCUDAHost) {
    v.device = DeviceKind::cpu;
  } else if (t->device.device_type == dlpack::kCUDA) {
    v.device = DeviceKind::cuda;
  } else {
    fail("fastmerge: unsupported device type ", t->device.device_type);
  }
  v.device_index = t->device.device_id;
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  v.shape.assign(t->shape, t->shape + t->ndim);
  v.strides.resize(size_t(t->ndim));
  int64_t stride = 1;
  for (int d = t->ndim - 1; d >= 0; --d) {
    v.strides[size_t(d)] = t->strides ? t->strides[d] : stride;
    stride *= t->shape[d];
  }
  return v;
}

std::vector<TensorView> views_of(const std::vector<py::capsule>& caps) {
  std::vector<TensorView> out;
  out.reserve(caps.size());
  for (const auto& c : caps) out.push_back(view_of(c));
  return out;
}

[[noreturn]] void no_cuda() {
  fail("fastmerge: this build has no CUDA kernels (rebuild with FASTMERGE_CUDA=ON)");
}

namespace {

py::dict build_info() {
  py::dict d;
  d["version"] = FM_VERSION;
#ifdef FM_WITH_CUDA
  d["cuda"] = true;
  py::list archs;
  for (int a : {FM_CUDA_ARCH_LIST}) archs.append(a);
  d["cuda_archs"] = archs;
  d["cuda_runtime"] = CUDART_VERSION;
#else
  d["cuda"] = false;
  d["cuda_archs"] = py::list();
#endif
  d["cpu_simd"] = cpu_isa_name(active_cpu_isa());
  d["cpu_simd_detected"] = cpu_isa_name(detected_cpu_isa());
  d["threads"] = team_size();
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

}  // namespace

}  // namespace fastmerge::bindings

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  using namespace fastmerge::bindings;
  m.doc() = "fastmerge native kernels (CPU and CUDA), torch-ABI free";
  // C++ checks surface as fastmerge.errors.NativeKernelError (a FastmergeError).
  py::register_exception<fastmerge::Error>(
      m, "NativeError", py::module_::import("fastmerge.errors").attr("NativeKernelError"));
  m.def("build_info", &build_info);
  m.def("set_num_threads", &fastmerge::set_threads, py::arg("n"));
  m.def("get_num_threads", &fastmerge::team_size);
  m.def("requested_num_threads", [] { return fastmerge::requested_threads().load(); });
  bind_select(m);
  bind_gta(m);
  bind_interp(m);
  bind_svd(m);
  bind_consensus(m);
  bind_sphere(m);
  bind_kvmerge(m);
  bind_tome(m);
  bind_memory(m);
}
