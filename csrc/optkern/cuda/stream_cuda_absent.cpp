// Compiled instead of stream_cuda.cu when the package is built without CUDA: CUDA arrays are refused loudly.
#include <stdexcept>

#include "../cuda_streams.h"

namespace optkern {
namespace {
[[noreturn]] void refuse() {
  throw std::invalid_argument(
      "a CUDA array was given, but this optkern build has no CUDA kernels (rebuild with nvcc on PATH, or "
      "OPTKERN_CUDA=ON to make a missing nvcc an error)");
}
}  // namespace
void order_after_stream(int, uintptr_t, uintptr_t) { refuse(); }
int cuda_pointer_device(const void*) { refuse(); }
bool cuda_context_active() { return false; }
bool cuda_device_memory(const void*) { return false; }
}  // namespace optkern
