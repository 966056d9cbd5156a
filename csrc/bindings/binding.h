// What every family's binding file shares: DLPack capsule -> TensorView, and the dispatch of a
// launcher to its CPU or CUDA kernel. Each family registers its functions in bind_<family>.cpp
// (one `void bind_<family>(pybind11::module_&)` each, called from module.cpp).
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "fastmerge/tensor.h"

#ifdef FM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fastmerge::bindings {

namespace py = pybind11;

// A borrowed view of the tensor a DLPack capsule describes (the caller keeps it alive).
TensorView view_of(const py::capsule& cap);
std::vector<TensorView> views_of(const std::vector<py::capsule>& caps);

[[noreturn]] void no_cuda();

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
#define FM_CUDA_LAUNCH(...) [&] { ::fastmerge::bindings::no_cuda(); }
#endif

// Runs the CUDA launch on t's device when t lives on a GPU, the CPU kernel otherwise.
template <typename CudaFn, typename CpuFn>
void dispatch(const TensorView& t, CudaFn&& cuda, CpuFn&& cpu) {
  if (t.device != DeviceKind::cuda) return cpu();
#ifdef FM_WITH_CUDA
  with_device(t, cuda);
#else
  cuda();
#endif
}

void bind_select(py::module_& m);
void bind_gta(py::module_& m);
void bind_interp(py::module_& m);
void bind_svd(py::module_& m);
void bind_consensus(py::module_& m);
void bind_sphere(py::module_& m);
void bind_kvmerge(py::module_& m);
void bind_tome(py::module_& m);
void bind_memory(py::module_& m);  // recycled output buffers for CPU results

}  // namespace fastmerge::bindings
