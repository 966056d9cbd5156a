// Bindings of the kvmerge family: kv_merge_plan (similarities + tokens removed per head) and
// kv_merge_apply (selection, sets, Gaussian-weighted merge, compaction).
#include "binding.h"
#include "../ops/kvmerge/kvmerge.h"

namespace fastmerge::bindings {

namespace {

KvMergeParams params_of(int64_t batch_heads, int64_t seq, int64_t key_dim, int64_t value_dim,
                        int64_t lo, int64_t hi, int64_t target, double eps, double sigma) {
  KvMergeParams p;
  p.batch_heads = batch_heads;
  p.seq = seq;
  p.key_dim = key_dim;
  p.value_dim = value_dim;
  p.lo = lo;
  p.hi = hi;
  p.target = target;
  p.eps = eps;
  p.sigma = sigma;
  return p;
}

int64_t kv_merge_plan(const py::capsule& keys_cap, const py::capsule& sims_cap,
                      int64_t batch_heads, int64_t seq, int64_t key_dim, int64_t lo, int64_t hi,
                      int64_t target, double eps, uintptr_t cuda_stream) {
  const TensorView keys = view_of(keys_cap), sims = view_of(sims_cap);
  const KvMergeParams p = params_of(batch_heads, seq, key_dim, key_dim, lo, hi, target, eps, 1.0);
  int64_t removed = 0;
  py::gil_scoped_release release;
  dispatch(keys, FM_CUDA_LAUNCH(removed = kv_merge_plan_cuda(keys, sims, p, cuda_stream)),
           [&] { removed = kv_merge_plan_cpu(keys, sims, p); });
  return removed;
}

// positions: the data pointer of a contiguous int64 tensor of batch_heads * (seq - removed)
// elements on the keys' device (0: not wanted); the caller keeps it alive for the call.
void kv_merge_apply(const py::capsule& keys_cap, const py::capsule& values_cap,
                    const py::capsule& scores_cap, const py::capsule& sims_cap,
                    const py::capsule& keys_out_cap, const py::capsule& values_out_cap,
                    uintptr_t positions, int64_t batch_heads, int64_t seq, int64_t key_dim,
                    int64_t value_dim, int64_t lo, int64_t hi, int64_t target, double eps,
                    double sigma, int64_t removed, uintptr_t cuda_stream) {
  const TensorView keys = view_of(keys_cap), values = view_of(values_cap);
  const TensorView scores = view_of(scores_cap), sims = view_of(sims_cap);
  const TensorView keys_out = view_of(keys_out_cap), values_out = view_of(values_out_cap);
  const KvMergeParams p =
      params_of(batch_heads, seq, key_dim, value_dim, lo, hi, target, eps, sigma);
  int64_t* pos = reinterpret_cast<int64_t*>(positions);
  py::gil_scoped_release release;
  dispatch(keys,
           FM_CUDA_LAUNCH(kv_merge_apply_cuda(keys, values, scores, sims, p, removed, keys_out,
                                              values_out, pos, cuda_stream)),
           [&] {
             kv_merge_apply_cpu(keys, values, scores, sims, p, removed, keys_out, values_out, pos);
           });
}

}  // namespace

void bind_kvmerge(py::module_& m) {
  m.def("kv_merge_plan", &kv_merge_plan, py::arg("keys"), py::arg("sims"),
        py::arg("batch_heads"), py::arg("seq"), py::arg("key_dim"), py::arg("lo"), py::arg("hi"),
        py::arg("target"), py::arg("eps"), py::arg("cuda_stream"));
  m.def("kv_merge_apply", &kv_merge_apply, py::arg("keys"), py::arg("values"), py::arg("scores"),
        py::arg("sims"), py::arg("keys_out"), py::arg("values_out"), py::arg("positions"),
        py::arg("batch_heads"), py::arg("seq"), py::arg("key_dim"), py::arg("value_dim"),
        py::arg("lo"), py::arg("hi"), py::arg("target"), py::arg("eps"), py::arg("sigma"),
        py::arg("removed"), py::arg("cuda_stream"));
}

}  // namespace fastmerge::bindings
