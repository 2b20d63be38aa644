// Compiled instead of lbfgs_cuda.cu when the package is built without CUDA: CUDA arrays are refused loudly.
#include <stdexcept>
#include <string>

#include "../lbfgs_executors.h"

namespace optkern {
namespace cuda_exec {
namespace {
[[noreturn]] void refuse(const char* name) {
  throw std::invalid_argument(std::string(name) +
                              ": CUDA arrays were given, but this optkern build has no CUDA kernels (rebuild with "
                              "nvcc on PATH, or OPTKERN_CUDA=ON to make a missing nvcc an error)");
}
}  // namespace
void lbfgs_dots(const VecBatch&, const VecBatch&, double*) { refuse("stored"); }
void lbfgs_lincomb(const VecBatch&, const std::vector<double>&, void*) { refuse("vecs"); }
void ncg_direction(const VecBatch&, void*, double, double*) { refuse("g"); }
}  // namespace cuda_exec
}  // namespace optkern
