// Helpers shared by the CUDA executors (optim_cuda.cu, batch_norm_cuda.cu, lbfgs_cuda.cu): every CUDA call is
// checked and a failure throws std::runtime_error naming the call; DeviceGuard selects the arrays' device for one
// call; DeviceBuffer is stream-ordered scratch.
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

// One stream-ordered scratch allocation, freed (stream-ordered) when the call returns or throws.
class DeviceBuffer {
 public:
  DeviceBuffer(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes > 0) OK_CUDA_CHECK(cudaMallocAsync(&mem_, bytes, stream_));
  }
  ~DeviceBuffer() {
    if (mem_ != nullptr) cudaFreeAsync(mem_, stream_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class P>
  P* as() const {
    return static_cast<P*>(mem_);
  }

 private:
  void* mem_ = nullptr;
  cudaStream_t stream_;
};

inline int sm_count(int device) {
  int sms = 0;
  OK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms > 0 ? sms : 1;
}

}  // namespace cuda_exec
}  // namespace optkern
