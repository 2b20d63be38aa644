// Helpers shared by the CUDA executors (optim_cuda.cu, batch_norm_cuda.cu): every CUDA call is checked and a
// failure throws std::runtime_error naming the call; DeviceGuard selects the arrays' device for one call.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define OK_CUDA_CHECK(expr)                                                                              \
  do {                                                                                                   \
    cudaError_t err_ = (expr);                                                                           \
    if (err_ != cudaSuccess)                                                                             \
      throw std::runtime_error(std::string("optkern CUDA error: ") + cudaGetErrorString(err_) + " in " + \
                               #expr + " (" __FILE__ ":" + std::to_string(__LINE__) + ")");              \
  } while (0)

namespace optkern {
namespace cuda_exec {

struct DeviceGuard {  // select the arrays' device for the duration of a call
  int previous = -1;
  explicit DeviceGuard(int device) {
    OK_CUDA_CHECK(cudaGetDevice(&previous));
    if (previous != device) OK_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous) cudaSetDevice(previous);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
};

}  // namespace cuda_exec
}  // namespace optkern
