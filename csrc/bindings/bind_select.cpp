// Bindings of the select family: exact magnitude top-k masks.
#include "binding.h"
#include "../ops/select/select.h"

namespace fastmerge::bindings {

namespace {

void magnitude_mask(const py::capsule& x_cap, double density, const py::capsule& mask_cap,
                    uintptr_t cuda_stream) {
  const TensorView x = view_of(x_cap), mask = view_of(mask_cap);
  py::gil_scoped_release release;
  dispatch(x, FM_CUDA_LAUNCH(magnitude_mask_cuda(x, density, mask, cuda_stream)),
           [&] { magnitude_mask_cpu(x, density, mask); });
}

}  // namespace

void bind_select(py::module_& m) {
  m.def("magnitude_mask", &magnitude_mask, py::arg("x"), py::arg("density"), py::arg("mask"),
        py::arg("cuda_stream"));
  m.def("topk_window_misses", [] {
    const TopkWindowMisses misses = topk_window_misses();
    py::dict d;
    d["retried"] = misses.retried;
    d["rescanned_whole"] = misses.rescanned_whole;
    return d;
  }, "Sample windows of the top-k that missed the k-th since the process started: retried on "
     "one side, and rescanned whole after a second miss.");
}

}  // namespace fastmerge::bindings
