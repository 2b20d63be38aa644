// Compiled instead of batch_norm_cuda.cu when the package is built without CUDA: CUDA arrays are refused loudly.
#include <stdexcept>

#include "../batch_norm_executors.h"

namespace optkern {
namespace cuda_exec {
namespace {
[[noreturn]] void refuse() {
  throw std::invalid_argument(
      "x: CUDA arrays were given, but this optkern build has no CUDA kernels (rebuild with nvcc on PATH, "
      "or OPTKERN_CUDA=ON to make a missing nvcc an error)");
}
}  // namespace
void bn_forward_train(const BnArgs&) { refuse(); }
void bn_forward_eval(const BnArgs&) { refuse(); }
void bn_backward_train(const BnArgs&) { refuse(); }
void bn_backward_eval(const BnArgs&) { refuse(); }
void bn_stats(const BnArgs&) { refuse(); }
void bn_combine(const BnArgs&, const std::vector<int64_t>&, const double*, const double*) { refuse(); }
void bn_normalize(const BnArgs&) { refuse(); }
void bn_backward_reduce(const BnArgs&) { refuse(); }
void bn_backward_dx(const BnArgs&) { refuse(); }
}  // namespace cuda_exec
}  // namespace optkern
