// fastmerge._C: one m.def per launcher. Tensors arrive as DLPack capsules that we borrow (the
// Python caller keeps them alive for the call); CUDA launchers also get the caller's stream.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "fastmerge/cpu_isa.h"
#include "fastmerge/dlpack_abi.h"
#include "fastmerge/parallel.h"
#include "fastmerge/tensor.h"
#include "../ops/gta/gta.h"
#include "../ops/interp/interp.h"
#include "../ops/select/select.h"

#ifdef FM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;
using namespace fastmerge;

namespace {

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

bool on_cuda(const TensorView& t) { return t.device == DeviceKind::cuda; }

[[noreturn]] void no_cuda() {
  fail("fastmerge: this build has no CUDA kernels (rebuild with FASTMERGE_CUDA=ON)");
}

#ifdef FM_WITH_CUDA
// Runs a CUDA launcher on the tensor's device, restoring the caller's current device after.
template <typename Fn>
void with_device(const TensorView& t, Fn&& fn) {
  int previous = 0;
  cudaGetDevice(&previous);
  if (previous != t.device_index) cudaSetDevice(t.device_index);
  try {
    fn();
  } catch (...) {
    if (previous != t.device_index) cudaSetDevice(previous);
    throw;
  }
  if (previous != t.device_index) cudaSetDevice(previous);
}
// The CUDA launch of a binding; without CUDA kernels in the build, the error saying so.
#define FM_CUDA_LAUNCH(...) [&] { __VA_ARGS__; }
#else
#define FM_CUDA_LAUNCH(...) [&] { no_cuda(); }
#endif

// Runs the CUDA launch on t's device when t lives on a GPU, the CPU kernel otherwise.
template <typename CudaFn, typename CpuFn>
void dispatch(const TensorView& t, CudaFn&& cuda, CpuFn&& cpu) {
  if (!on_cuda(t)) return cpu();
#ifdef FM_WITH_CUDA
  with_device(t, cuda);
#else
  cuda();
#endif
}

void gta_merge(const std::optional<py::capsule>& base_cap, const std::vector<py::capsule>& expert_caps,
               const py::capsule& out_cap, int sparsify, int consensus, bool rescale, bool normalize,
               double lambda, uint64_t seed, uint32_t stream_hash, const std::vector<double>& weights,
               const std::vector<double>& densities, const std::vector<double>& gammas,
               const std::vector<double>& epsilons, int64_t rank_outer, int64_t rank_len,
               int64_t rank_inner, uintptr_t cuda_stream) {
  std::optional<TensorView> base;
  if (base_cap) base = view_of(*base_cap);
  const std::vector<TensorView> experts = views_of(expert_caps);
  const TensorView out = view_of(out_cap);
  GtaParams p;
  p.sparsify = Sparsify(sparsify);
  p.consensus = Consensus(consensus);
  p.rescale = rescale;
  p.normalize = normalize;
  p.lambda = lambda;
  p.seed = seed;
  p.stream = stream_hash;
  FM_CHECK(weights.size() == experts.size() && densities.size() == experts.size() &&
               gammas.size() == experts.size() && epsilons.size() == experts.size(),
           "one weight, density, gamma and epsilon per expert");
  for (size_t i = 0; i < experts.size(); ++i)
    p.experts.push_back(GtaExpertParams{weights[i], densities[i], gammas[i], epsilons[i]});
  p.rank_outer = rank_outer;
  p.rank_len = rank_len;
  p.rank_inner = rank_inner;
  const TensorView* base_ptr = base ? &*base : nullptr;
  py::gil_scoped_release release;
  dispatch(out, FM_CUDA_LAUNCH(gta_merge_cuda(base_ptr, experts, out, p, cuda_stream)),
           [&] { gta_merge_cpu(base_ptr, experts, out, p); });
}

void magnitude_mask(const py::capsule& x_cap, double density, const py::capsule& mask_cap,
                    uintptr_t cuda_stream) {
  const TensorView x = view_of(x_cap), mask = view_of(mask_cap);
  py::gil_scoped_release release;
  dispatch(x, FM_CUDA_LAUNCH(magnitude_mask_cuda(x, density, mask, cuda_stream)),
           [&] { magnitude_mask_cpu(x, density, mask); });
}

void slerp(const py::capsule& a_cap, const py::capsule& b_cap, const py::capsule& out_cap, double t,
           uintptr_t cuda_stream) {
  const TensorView a = view_of(a_cap), b = view_of(b_cap), out = view_of(out_cap);
  py::gil_scoped_release release;
  dispatch(out, FM_CUDA_LAUNCH(slerp_cuda(a, b, out, t, cuda_stream)),
           [&] { slerp_cpu(a, b, out, t); });
}

void nearswap(const py::capsule& a_cap, const py::capsule& b_cap, const py::capsule& out_cap,
              double t, uintptr_t cuda_stream) {
  const TensorView a = view_of(a_cap), b = view_of(b_cap), out = view_of(out_cap);
  py::gil_scoped_release release;
  dispatch(out, FM_CUDA_LAUNCH(nearswap_cuda(a, b, out, t, cuda_stream)),
           [&] { nearswap_cpu(a, b, out, t); });
}

void model_stock(const py::capsule& base_cap, const std::vector<py::capsule>& expert_caps,
                 const py::capsule& out_cap, int64_t rows, uintptr_t cuda_stream) {
  const TensorView base = view_of(base_cap), out = view_of(out_cap);
  const std::vector<TensorView> experts = views_of(expert_caps);
  py::gil_scoped_release release;
  dispatch(out, FM_CUDA_LAUNCH(model_stock_cuda(base, experts, out, rows, cuda_stream)),
           [&] { model_stock_cpu(base, experts, out, rows); });
}

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
  d["threads"] = max_threads();
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmerge native kernels (CPU and CUDA), torch-ABI free";
  // C++ checks surface as fastmerge.errors.NativeKernelError (a FastmergeError).
  static py::exception<fastmerge::Error> native_error(
      m, "NativeError", py::module_::import("fastmerge.errors").attr("NativeKernelError"));
  m.def("build_info", &build_info);
  m.def("set_num_threads", &set_threads, py::arg("n"));
  m.def("get_num_threads", &max_threads);
  m.def("gta_merge", &gta_merge, py::arg("base"), py::arg("experts"), py::arg("out"),
        py::arg("sparsify"), py::arg("consensus"), py::arg("rescale"), py::arg("normalize"),
        py::arg("lambda_"), py::arg("seed"), py::arg("stream_hash"), py::arg("weights"),
        py::arg("densities"), py::arg("gammas"), py::arg("epsilons"), py::arg("rank_outer"),
        py::arg("rank_len"), py::arg("rank_inner"), py::arg("cuda_stream"));
  m.def("magnitude_mask", &magnitude_mask, py::arg("x"), py::arg("density"), py::arg("mask"),
        py::arg("cuda_stream"));
  m.def("slerp", &slerp, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("t"),
        py::arg("cuda_stream"));
  m.def("nearswap", &nearswap, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("t"),
        py::arg("cuda_stream"));
  m.def("model_stock", &model_stock, py::arg("base"), py::arg("experts"), py::arg("out"),
        py::arg("rows"), py::arg("cuda_stream"));
}
