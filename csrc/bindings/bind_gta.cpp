// Bindings of the gta family: the fused generalized task arithmetic merge.
#include "binding.h"
#include "../ops/gta/gta.h"

namespace fastmerge::bindings {

namespace {

void gta_merge(const std::optional<py::capsule>& base_cap, const std::vector<py::capsule>& expert_caps,
               const py::capsule& out_cap, int sparsify, int consensus, int rescale, bool normalize,
               double lambda, uint64_t seed, uint32_t stream_hash, const std::vector<double>& weights,
               const std::vector<double>& densities, const std::vector<double>& gammas,
               const std::vector<double>& epsilons, int64_t rank_outer, int64_t rank_len,
               int64_t rank_inner, bool count_divisor, bool elect_unweighted, int64_t min_keep,
               uintptr_t cuda_stream) {
  std::optional<TensorView> base;
  if (base_cap) base = view_of(*base_cap);
  const std::vector<TensorView> experts = views_of(expert_caps);
  const TensorView out = view_of(out_cap);
  GtaParams p;
  p.sparsify = Sparsify(sparsify);
  p.consensus = Consensus(consensus);
  FM_CHECK(rescale >= 0 && rescale <= 2, "rescale mode must be 0, 1 or 2, got ", rescale);
  p.rescale = Rescale(rescale);
  p.normalize = normalize;
  p.count_divisor = count_divisor;
  p.elect_unweighted = elect_unweighted;
  p.min_keep = min_keep;
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

void gta_sign_mask(const py::capsule& stacked_cap, const py::capsule& mask_cap, int method,
                   uintptr_t cuda_stream) {
  const TensorView stacked = view_of(stacked_cap), mask = view_of(mask_cap);
  FM_CHECK(method == int(Consensus::sum) || method == int(Consensus::count),
           "sign mask method must be 1 (sum) or 2 (count), got ", method);
  const Consensus c = Consensus(method);
  py::gil_scoped_release release;
  dispatch(mask, FM_CUDA_LAUNCH(gta_sign_mask_cuda(stacked, mask, c, cuda_stream)),
           [&] { gta_sign_mask_cpu(stacked, mask, c); });
}

void gta_disjoint_merge(const py::capsule& stacked_cap, const py::capsule& mask_cap,
                        const py::capsule& out_cap, uintptr_t cuda_stream) {
  const TensorView stacked = view_of(stacked_cap), mask = view_of(mask_cap), out = view_of(out_cap);
  py::gil_scoped_release release;
  dispatch(out, FM_CUDA_LAUNCH(gta_disjoint_merge_cuda(stacked, mask, out, cuda_stream)),
           [&] { gta_disjoint_merge_cpu(stacked, mask, out); });
}

}  // namespace

void bind_gta(py::module_& m) {
  m.def("gta_sign_mask", &gta_sign_mask, py::arg("stacked"), py::arg("mask"), py::arg("method"),
        py::arg("cuda_stream"));
  m.def("gta_disjoint_merge", &gta_disjoint_merge, py::arg("stacked"), py::arg("mask"),
        py::arg("out"), py::arg("cuda_stream"));
  m.def("gta_merge", &gta_merge, py::arg("base"), py::arg("experts"), py::arg("out"),
        py::arg("sparsify"), py::arg("consensus"), py::arg("rescale"), py::arg("normalize"),
        py::arg("lambda_"), py::arg("seed"), py::arg("stream_hash"), py::arg("weights"),
        py::arg("densities"), py::arg("gammas"), py::arg("epsilons"), py::arg("rank_outer"),
        py::arg("rank_len"), py::arg("rank_inner"), py::arg("count_divisor"),
        py::arg("elect_unweighted"), py::arg("min_keep"), py::arg("cuda_stream"));
}

}  // namespace fastmerge::bindings
