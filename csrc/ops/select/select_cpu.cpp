// CPU magnitude_mask: the GTA planner's exact selection (one expert, no base), then one pass
// writing mask[i] = composite(i) >= boundary.
#include <cstring>

#include "fastmerge/memory.h"
#include "fastmerge/parallel.h"
#include "../gta/gta_plan.h"
#include "select.h"

namespace fastmerge {

namespace {
template <typename T>
void write_mask(const T* x, int64_t n, uint64_t boundary, uint8_t* mask) {
  for_each_chunk(n, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      mask[i] = composite_key(magnitude_key(to_float(x[i])), i) >= boundary;
  });
}
}  // namespace

void magnitude_mask_cpu(const TensorView& x, double density, const TensorView& mask) {
  const int64_t n = x.numel();
  check_flat(x, "x", n);
  FM_CHECK(mask.is_contiguous() && mask.numel() == n, "mask must be contiguous with x's numel");
  if (n == 0) return;
  GtaParams params;
  params.sparsify = Sparsify::magnitude;
  params.experts.resize(1);
  params.experts[0].density = density;
  const std::vector<TensorView> experts{x};
  const GtaPlan plan = gta_prepare_cpu(nullptr, experts, params, n);
  const ExpertPlan& e = plan.experts[0];
  uint8_t* m = mask.ptr<uint8_t>();
  advise_huge_pages(m, size_t(n));
  if (e.kind != MaskKind::topk_range) {
    std::memset(m, e.kind == MaskKind::drop_all ? 0 : 1, size_t(n));
    return;
  }
  switch (x.dtype) {
    case DType::f32: write_mask(x.ptr<const float>(), n, e.keep_from, m); break;
    case DType::f16: write_mask(x.ptr<const f16_t>(), n, e.keep_from, m); break;
    case DType::bf16: write_mask(x.ptr<const bf16_t>(), n, e.keep_from, m); break;
    default: fail("magnitude_mask: unsupported dtype");
  }
}

}  // namespace fastmerge
