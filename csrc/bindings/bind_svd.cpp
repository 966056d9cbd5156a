// Bindings of the svd family: batched thin SVD of small matrices.
#include "binding.h"
#include "../ops/svd/svd.h"

namespace fastmerge::bindings {

namespace {

void batched_svd(const py::capsule& x_cap, const py::capsule& u_cap, const py::capsule& s_cap,
                 const py::capsule& vh_cap, uintptr_t cuda_stream) {
  const TensorView x = view_of(x_cap), u = view_of(u_cap), s = view_of(s_cap),
                   vh = view_of(vh_cap);
  py::gil_scoped_release release;
  dispatch(x, FM_CUDA_LAUNCH(batched_svd_cuda(x, u, s, vh, cuda_stream)),
           [&] { batched_svd_cpu(x, u, s, vh); });
}

}  // namespace

void bind_svd(py::module_& m) {
  m.def("batched_svd", &batched_svd, py::arg("x"), py::arg("u"), py::arg("s"), py::arg("vh"),
        py::arg("cuda_stream"));
}

}  // namespace fastmerge::bindings
