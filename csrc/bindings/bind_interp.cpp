// Bindings of the interp family: slerp, nearswap, model_stock.
#include "binding.h"
#include "../ops/interp/interp.h"

namespace fastmerge::bindings {

namespace {

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

}  // namespace

void bind_interp(py::module_& m) {
  m.def("slerp", &slerp, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("t"),
        py::arg("cuda_stream"));
  m.def("nearswap", &nearswap, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("t"),
        py::arg("cuda_stream"));
  m.def("model_stock", &model_stock, py::arg("base"), py::arg("experts"), py::arg("out"),
        py::arg("rows"), py::arg("cuda_stream"));
}

}  // namespace fastmerge::bindings
