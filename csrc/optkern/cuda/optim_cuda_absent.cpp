// Compiled instead of optim_cuda.cu when the package is built without CUDA: CUDA arrays are refused loudly.
#include <stdexcept>

#include "../executors.h"

namespace optkern {
namespace cuda_exec {
namespace {
[[noreturn]] void refuse() {
  throw std::invalid_argument(
      "params: CUDA arrays were given, but this optkern build has no CUDA kernels (rebuild with nvcc on PATH, "
      "or OPTKERN_CUDA=ON to make a missing nvcc an error)");
}
[[noreturn]] void refuse_grads() {  // the global norm's arrays are named grads
  throw std::invalid_argument(
      "grads: CUDA arrays were given, but this optkern build has no CUDA kernels (rebuild with nvcc on PATH, "
      "or OPTKERN_CUDA=ON to make a missing nvcc an error)");
}
}  // namespace
template <class Rule>
void run_rule(const StepBatch&, const CudaStep<Rule>&) {
  refuse();
}
#define OPTKERN_INSTANTIATE(R) template void run_rule<R>(const StepBatch&, const CudaStep<R>&);
OPTKERN_FOR_EACH_RULE(OPTKERN_INSTANTIATE)
#undef OPTKERN_INSTANTIATE
double global_norm_host(const StepBatch&, bool) { refuse_grads(); }
void global_norm_device(const StepBatch&, bool, const NormOutputs&) { refuse_grads(); }
bool available() { return false; }
}  // namespace cuda_exec
bool cuda_built() { return false; }
bool cuda_available() { return false; }
}  // namespace optkern
