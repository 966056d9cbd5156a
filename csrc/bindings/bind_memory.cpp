// Output buffers for large CPU results, handed to torch through DLPack and recycled.
//
// A fresh multi-MiB tensor from torch.empty is memory the kernel has never touched: the first
// write to each page faults and the OS zeroes it. On the 2-core EPYC VM that costs ~8 ms per
// 32 MiB output (with huge pages), as much as the TIES merge that fills it. Results are
// usually dropped soon (the next tensor of a `fastmerge run`, the next call of a loop), so a
// freed output buffer is kept and handed out again for the next result of the same rounded
// size. Idle buffers are bounded (FASTMERGE_OUTPUT_CACHE_MB, default 256; 0 disables) and the
// oldest are freed first; a buffer larger than the bound is never kept.
#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "binding.h"
#include "fastmerge/dlpack_abi.h"

namespace fastmerge::bindings {
namespace {

constexpr size_t kHugePage = size_t(1) << 21;

size_t limit_from_environment() {
  const char* mb = std::getenv("FASTMERGE_OUTPUT_CACHE_MB");
  if (mb == nullptr || *mb == '\0') return size_t(256) << 20;
  char* end = nullptr;
  const long long value = std::strtoll(mb, &end, 10);
  if (end == mb || value < 0) return size_t(256) << 20;
  return size_t(value) << 20;
}

class OutputBufferCache {
 public:
  // A buffer of at least `bytes` (rounded up to whole huge pages), recycled when one is idle.
  std::pair<void*, size_t> acquire(size_t bytes) {
    const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
        if (it->first != size) continue;
        void* data = it->second;
        idle_.erase(std::next(it).base());
        idle_bytes_ -= size;
        ++hits_;
        return {data, size};
      }
      ++misses_;
    }
    void* data = allocate(size);
    return {data, size};
  }

  void release(void* data, size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (size > limit_) return deallocate(data);
    idle_.emplace_back(size, data);
    idle_bytes_ += size;
    trim_locked();
  }

  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    trim_locked();
  }

  py::dict info() {
    std::lock_guard<std::mutex> lock(mutex_);
    py::dict d;
    d["limit_bytes"] = limit_;
    d["idle_bytes"] = idle_bytes_;
    d["idle_buffers"] = idle_.size();
    d["hits"] = hits_;
    d["misses"] = misses_;
    return d;
  }

 private:
  static void* allocate(size_t size) {
    void* data = nullptr;
#if defined(_WIN32)
    data = _aligned_malloc(size, kHugePage);
#else
    if (posix_memalign(&data, kHugePage, size) != 0) data = nullptr;
#endif
    if (data == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data, size, MADV_HUGEPAGE);  // a hint: fewer faults on first use
#endif
    return data;
  }

  static void deallocate(void* data) {
#if defined(_WIN32)
    _aligned_free(data);
#else
    std::free(data);
#endif
  }

  void trim_locked() {
    while (idle_bytes_ > limit_ && !idle_.empty()) {
      idle_bytes_ -= idle_.front().first;
      deallocate(idle_.front().second);
      idle_.pop_front();
    }
  }

  std::mutex mutex_;
  std::deque<std::pair<size_t, void*>> idle_;  // oldest first
  size_t idle_bytes_ = 0;
  size_t limit_ = limit_from_environment();
  uint64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: torch may free the last tensor after static destructors have run.
OutputBufferCache& output_buffers() {
  static OutputBufferCache* cache = new OutputBufferCache();
  return *cache;
}

// One exported buffer: both DLPack forms, so either capsule name can be handed out.
struct ExportedBuffer {
  FmDLManagedTensor legacy;
  FmDLManagedTensorVersioned versioned;
  std::vector<int64_t> shape;
  size_t size;  // allocated bytes (what release gets back)
};

void release_buffer(ExportedBuffer* exported) {
  output_buffers().release(exported->legacy.dl_tensor.data, exported->size);
  delete exported;
}
void release_legacy(FmDLManagedTensor* m) { release_buffer(static_cast<ExportedBuffer*>(m->manager_ctx)); }
void release_versioned(FmDLManagedTensorVersioned* m) {
  release_buffer(static_cast<ExportedBuffer*>(m->manager_ctx));
}

// DLPack protocol: a capsule still under its original name was never consumed, so it owns the
// tensor.
void destroy_legacy_capsule(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, "dltensor")) return;
  auto* m = static_cast<FmDLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  if (m != nullptr && m->deleter != nullptr) m->deleter(m);
}
void destroy_versioned_capsule(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, "dltensor_versioned")) return;
  auto* m = static_cast<FmDLManagedTensorVersioned*>(PyCapsule_GetPointer(capsule, "dltensor_versioned"));
  if (m != nullptr && m->deleter != nullptr) m->deleter(m);
}

// uint16: bf16 bits for numpy, which has no bfloat16 (host_kernels.HostArray).
FmDLDataType dlpack_type(const std::string& dtype) {
  if (dtype == "float32") return FmDLDataType{dlpack::kFloat, 32, 1};
  if (dtype == "float16") return FmDLDataType{dlpack::kFloat, 16, 1};
  if (dtype == "bfloat16") return FmDLDataType{dlpack::kBfloat, 16, 1};
  if (dtype == "uint16") return FmDLDataType{dlpack::kUInt, 16, 1};
  throw std::invalid_argument("output_buffer: dtype must be float32, float16, bfloat16 or uint16, got " + dtype);
}

// An uninitialised contiguous CPU tensor as a DLPack capsule for from_dlpack to take over:
// "dltensor" (what torch.utils.dlpack.from_dlpack reads in every torch >= 2.4) or, when
// versioned, "dltensor_versioned" (numpy makes arrays from the legacy form read-only).
py::capsule output_buffer(const std::vector<int64_t>& shape, const std::string& dtype, bool versioned) {
  const FmDLDataType type = dlpack_type(dtype);
  int64_t numel = 1;
  for (int64_t extent : shape) {
    if (extent < 0) throw std::invalid_argument("output_buffer: negative extent");
    numel *= extent;
  }
  const size_t nbytes = size_t(numel) * (type.bits / 8);
  if (nbytes == 0) throw std::invalid_argument("output_buffer: empty tensor");
  auto [data, size] = output_buffers().acquire(nbytes);
  auto* exported = new ExportedBuffer();
  exported->shape = shape;
  exported->size = size;
  FmDLTensor t;
  t.data = data;
  t.device = FmDLDevice{dlpack::kCPU, 0};
  t.ndim = int32_t(shape.size());
  t.dtype = type;
  t.shape = exported->shape.data();
  t.strides = nullptr;
  t.byte_offset = 0;
  exported->legacy = FmDLManagedTensor{t, exported, release_legacy};
  exported->versioned = FmDLManagedTensorVersioned{FmDLPackVersion{1, 0}, exported, release_versioned, 0, t};
  PyObject* capsule = versioned
                          ? PyCapsule_New(&exported->versioned, "dltensor_versioned", destroy_versioned_capsule)
                          : PyCapsule_New(&exported->legacy, "dltensor", destroy_legacy_capsule);
  if (capsule == nullptr) {
    release_buffer(exported);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(capsule);
}

}  // namespace

void bind_memory(py::module_& m) {
  m.def("output_buffer", &output_buffer, py::arg("shape"), py::arg("dtype"), py::arg("versioned") = false,
        "An uninitialised CPU tensor (recycled, huge-page aligned) as a DLPack capsule.");
  m.def("set_output_cache_limit", [](int64_t bytes) { output_buffers().set_limit(size_t(bytes < 0 ? 0 : bytes)); },
        py::arg("bytes"));
  m.def("output_cache_info", [] { return output_buffers().info(); });
}

}  // namespace fastmerge::bindings
