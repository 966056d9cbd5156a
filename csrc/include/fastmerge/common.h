// Shared macros and the error type every launcher throws. No torch, no Python headers.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline
#endif

namespace fastmerge {

// Raised by C++ checks; the bindings translate it into fastmerge.FastmergeError.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append(os, rest...);
}
}  // namespace detail

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  detail::append(os, args...);
  throw Error(os.str());
}

}  // namespace fastmerge

// Minimal checks that keep kernels from faulting; friendly validation lives in Python.
#define FM_CHECK(cond, ...)                                     \
  do {                                                          \
    if (!(cond)) ::fastmerge::fail("fastmerge: ", __VA_ARGS__); \
  } while (0)
