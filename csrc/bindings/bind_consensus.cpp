// Bindings of the consensus family: ram, ramplus_tl, sce, arcee_fusion.
#include "binding.h"
#include "../ops/consensus/consensus.h"

namespace fastmerge::bindings {

namespace {

void ram(const py::capsule& base_cap, const std::vector<py::capsule>& expert_caps,
         const py::capsule& out_cap, double epsilon, uintptr_t cuda_stream) {
  const TensorView base = view_of(base_cap), out = view_of(out_cap);
  const std::vector<TensorView> experts = views_of(expert_caps);
  py::gil_scoped_release release;
  dispatch(out, FM_CUDA_LAUNCH(ram_cuda(base, experts, out, epsilon, cuda_stream)),
           [&] { ram_cpu(base, experts, out, epsilon); });
}

void ramplus_tl(const py::capsule& base_cap, const std::vector<py::capsule>& expert_caps,
                const py::capsule& out_cap, double r, double alpha, double epsilon,
                uintptr_t cuda_stream) {
  const TensorView base = view_of(base_cap), out = view_of(out_cap);
  const std::vector<TensorView> experts = views_of(expert_caps);
  py::gil_scoped_release release;
  dispatch(out, FM_CUDA_LAUNCH(ramplus_tl_cuda(base, experts, out, r, alpha, epsilon, cuda_stream)),
           [&] { ramplus_tl_cpu(base, experts, out, r, alpha, epsilon); });
}

void sce(const py::capsule& base_cap, const std::vector<py::capsule>& expert_caps,
         const py::capsule& out_cap, double select_topk, uintptr_t cuda_stream) {
  const TensorView base = view_of(base_cap), out = view_of(out_cap);
  const std::vector<TensorView> experts = views_of(expert_caps);
  py::gil_scoped_release release;
  dispatch(out, FM_CUDA_LAUNCH(sce_cuda(base, experts, out, select_topk, cuda_stream)),
           [&] { sce_cpu(base, experts, out, select_topk); });
}

void arcee_fusion(const py::capsule& base_cap, const py::capsule& other_cap,
                  const py::capsule& out_cap, int64_t row_len, uintptr_t cuda_stream) {
  const TensorView base = view_of(base_cap), other = view_of(other_cap), out = view_of(out_cap);
  py::gil_scoped_release release;
  dispatch(out, FM_CUDA_LAUNCH(arcee_fusion_cuda(base, other, out, row_len, cuda_stream)),
           [&] { arcee_fusion_cpu(base, other, out, row_len); });
}

}  // namespace

void bind_consensus(py::module_& m) {
  m.def("ram", &ram, py::arg("base"), py::arg("experts"), py::arg("out"), py::arg("epsilon"),
        py::arg("cuda_stream"));
  m.def("ramplus_tl", &ramplus_tl, py::arg("base"), py::arg("experts"), py::arg("out"),
        py::arg("r"), py::arg("alpha"), py::arg("epsilon"), py::arg("cuda_stream"));
  m.def("sce", &sce, py::arg("base"), py::arg("experts"), py::arg("out"), py::arg("select_topk"),
        py::arg("cuda_stream"));
  m.def("arcee_fusion", &arcee_fusion, py::arg("base"), py::arg("other"), py::arg("out"),
        py::arg("row_len"), py::arg("cuda_stream"));
}

}  // namespace fastmerge::bindings
