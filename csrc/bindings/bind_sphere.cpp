// Bindings of the sphere family: nuslerp, multislerp, karcher.
#include <optional>

#include "binding.h"
#include "../ops/sphere/sphere.h"

namespace fastmerge::bindings {

namespace {

void nuslerp(const std::optional<py::capsule>& base_cap, const py::capsule& v0_cap,
             const py::capsule& v1_cap, const py::capsule& out_cap, int64_t outer, int64_t len,
             int64_t inner, double t, double eps, uintptr_t cuda_stream) {
  std::optional<TensorView> base;
  if (base_cap) base = view_of(*base_cap);
  const TensorView v0 = view_of(v0_cap), v1 = view_of(v1_cap), out = view_of(out_cap);
  const TensorView* b = base ? &*base : nullptr;
  const VectorLayout layout{outer, len, inner};
  py::gil_scoped_release release;
  dispatch(out, FM_CUDA_LAUNCH(nuslerp_cuda(b, v0, v1, out, layout, t, eps, cuda_stream)),
           [&] { nuslerp_cpu(b, v0, v1, out, layout, t, eps); });
}

// False where mergekit raises ValueError (the weighted mean of the unit vectors vanishes).
bool multislerp(const std::optional<py::capsule>& base_cap, const std::vector<py::capsule>& caps,
                const py::capsule& out_cap, const std::vector<double>& weights, bool normalize,
                double eps, uintptr_t cuda_stream) {
  std::optional<TensorView> base;
  if (base_cap) base = view_of(*base_cap);
  const std::vector<TensorView> xs = views_of(caps);
  const TensorView out = view_of(out_cap);
  const TensorView* b = base ? &*base : nullptr;
  bool ok = true;
  py::gil_scoped_release release;
  dispatch(out,
           FM_CUDA_LAUNCH(ok = multislerp_cuda(b, xs, out, weights, normalize, eps, cuda_stream)),
           [&] { ok = multislerp_cpu(b, xs, out, weights, normalize, eps); });
  return ok;
}

void karcher(const std::vector<py::capsule>& caps, const py::capsule& out_cap,
             const std::vector<double>& alphas, int max_iter, double tol, uintptr_t cuda_stream) {
  const std::vector<TensorView> xs = views_of(caps);
  const TensorView out = view_of(out_cap);
  py::gil_scoped_release release;
  dispatch(out, FM_CUDA_LAUNCH(karcher_cuda(xs, out, alphas, max_iter, tol, cuda_stream)),
           [&] { karcher_cpu(xs, out, alphas, max_iter, tol); });
}

}  // namespace

void bind_sphere(py::module_& m) {
  m.def("nuslerp", &nuslerp, py::arg("base"), py::arg("v0"), py::arg("v1"), py::arg("out"),
        py::arg("outer"), py::arg("len"), py::arg("inner"), py::arg("t"), py::arg("eps"),
        py::arg("cuda_stream"));
  m.def("multislerp", &multislerp, py::arg("base"), py::arg("inputs"), py::arg("out"),
        py::arg("weights"), py::arg("normalize"), py::arg("eps"), py::arg("cuda_stream"));
  m.def("karcher", &karcher, py::arg("inputs"), py::arg("out"), py::arg("alphas"),
        py::arg("max_iter"), py::arg("tol"), py::arg("cuda_stream"));
}

}  // namespace fastmerge::bindings
