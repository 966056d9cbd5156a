// Bindings of the tome family: ToMe's bipartite soft matching and merges.
#include <optional>

#include "binding.h"
#include "../ops/tome/tome.h"

namespace fastmerge::bindings {

namespace {

TomeShape shape_of(const TensorView& metric, int64_t r, bool class_token, bool distill_token) {
  FM_CHECK(metric.ndim() == 3, "metric must be [B, N, C]");
  TomeShape s;
  s.batch = metric.shape[0];
  s.tokens = metric.shape[1];
  s.channels = metric.shape[2];
  s.r = r;
  s.class_token = class_token;
  s.distill_token = distill_token;
  return s;
}

void tome_match(const py::capsule& metric_cap, int64_t r, bool class_token, bool distill_token,
                const py::capsule& unm, const py::capsule& src, const py::capsule& dst,
                const py::capsule& offsets, const py::capsule& members, const py::capsule& dest) {
  const TensorView metric = view_of(metric_cap);
  const TomeShape s = shape_of(metric, r, class_token, distill_token);
  const TomeMapViews maps{view_of(unm),     view_of(src),     view_of(dst),
                          view_of(offsets), view_of(members), view_of(dest)};
  FM_CHECK(metric.device == DeviceKind::cpu, "tome_match runs on CPU tensors (CUDA: tome_scores)");
  py::gil_scoped_release release;
  tome_match_cpu(metric, s, maps);
}

void tome_scores(const py::capsule& metric_cap, bool class_token, bool distill_token,
                 const std::optional<py::capsule>& normed_cap, const py::capsule& node_max_cap,
                 const py::capsule& node_idx_cap, uintptr_t cuda_stream) {
  const TensorView metric = view_of(metric_cap);
  const TomeShape s = shape_of(metric, 0, class_token, distill_token);
  const TensorView node_max = view_of(node_max_cap), node_idx = view_of(node_idx_cap);
  std::optional<TensorView> normed;
  if (normed_cap) normed = view_of(*normed_cap);
  py::gil_scoped_release release;
  dispatch(metric, FM_CUDA_LAUNCH({
             FM_CHECK(normed.has_value(), "tome_scores on CUDA needs a normed buffer");
             tome_scores_cuda(metric, s, *normed, node_max, node_idx, cuda_stream);
           }),
           [&] { tome_scores_cpu(metric, s, node_max, node_idx); });
}

void tome_merge(const py::capsule& x_cap, const std::optional<py::capsule>& size_cap,
                const py::capsule& offsets_cap, const py::capsule& members_cap,
                const py::capsule& out_cap, const std::optional<py::capsule>& size_out_cap,
                bool amax, uintptr_t cuda_stream) {
  const TensorView x = view_of(x_cap), offsets = view_of(offsets_cap);
  const TensorView members = view_of(members_cap), out = view_of(out_cap);
  std::optional<TensorView> size, size_out;
  if (size_cap) size = view_of(*size_cap);
  if (size_out_cap) size_out = view_of(*size_out_cap);
  const TensorView* sp = size ? &*size : nullptr;
  const TensorView* so = size_out ? &*size_out : nullptr;
  const TomeReduce mode = amax ? TomeReduce::max : TomeReduce::weighted_mean;
  py::gil_scoped_release release;
  dispatch(x, FM_CUDA_LAUNCH(tome_merge_cuda(x, sp, offsets, members, out, so, mode, cuda_stream)),
           [&] { tome_merge_cpu(x, sp, offsets, members, out, so, mode); });
}

}  // namespace

void bind_tome(py::module_& m) {
  m.def("tome_match", &tome_match, py::arg("metric"), py::arg("r"), py::arg("class_token"),
        py::arg("distill_token"), py::arg("unm_idx"), py::arg("src_idx"), py::arg("dst_idx"),
        py::arg("offsets"), py::arg("members"), py::arg("dest"));
  m.def("tome_scores", &tome_scores, py::arg("metric"), py::arg("class_token"),
        py::arg("distill_token"), py::arg("normed"), py::arg("node_max"), py::arg("node_idx"),
        py::arg("cuda_stream"));
  m.def("tome_merge", &tome_merge, py::arg("x"), py::arg("size"), py::arg("offsets"),
        py::arg("members"), py::arg("out"), py::arg("size_out"), py::arg("amax"),
        py::arg("cuda_stream"));
}

}  // namespace fastmerge::bindings
