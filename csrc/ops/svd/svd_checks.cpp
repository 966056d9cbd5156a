// Launcher-side checks of the batched SVD, shared by the CPU and CUDA launchers.
#include "svd.h"

namespace fastmerge {

int64_t check_svd_inputs(const TensorView& x, const TensorView& u, const TensorView& s,
                         const TensorView& vh) {
  FM_CHECK(x.ndim() == 3, "batched_svd: x must be [batch, m, n], got ", x.ndim(), " dims");
  const int64_t batch = x.shape[0], m = x.shape[1], n = x.shape[2];
  const int64_t k = m < n ? m : n;
  FM_CHECK(x.is_contiguous() && u.is_contiguous() && s.is_contiguous() && vh.is_contiguous(),
           "batched_svd: tensors must be contiguous");
  FM_CHECK(u.dtype == DType::f32 && s.dtype == DType::f32 && vh.dtype == DType::f32,
           "batched_svd: u, s and vh must be float32");
  FM_CHECK(u.numel() == batch * m * k && s.numel() == batch * k && vh.numel() == batch * k * n,
           "batched_svd: outputs must be [batch, m, k], [batch, k] and [batch, k, n]");
  FM_CHECK(x.device == u.device && x.device == s.device && x.device == vh.device,
           "batched_svd: tensors must be on one device");
  FM_CHECK(m <= (int64_t(1) << 20) && n <= (int64_t(1) << 20),
           "batched_svd: matrices are limited to 2^20 rows and columns");
  return k;
}

}  // namespace fastmerge
