// Helpers shared by the CUDA executors (optim_cuda.cu, batch_norm_cuda.cu, lbfgs_cuda.cu): every CUDA call is
// checked and a failure throws std::runtime_error naming the call; DeviceGuard selects the arrays' device for one
// call; DeviceBuffer is owned, stream-ordered scratch from optkern's own memory pool (freed memory kept).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

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

// Scratch memory comes from one pool per device that keeps what is freed (release threshold: unlimited), so a
// synchronize does not unmap it and the next call's allocation is a pool hit.  It is optkern's own pool: the
// device's default pool (which torch and CuPy may use or tune) is left as it is.
inline cudaMemPool_t scratch_pool(int device) {
  static std::mutex mu;
  static std::vector<cudaMemPool_t> pools;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0) throw std::runtime_error("optkern CUDA error: negative device index");
  if (static_cast<size_t>(device) >= pools.size()) pools.resize(device + 1, nullptr);
  if (pools[device] == nullptr) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    OK_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
    uint64_t keep = UINT64_MAX;
    OK_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    pools[device] = pool;
  }
  return pools[device];
}

inline int current_device() {
  int dev = 0;
  OK_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

// One stream-ordered scratch allocation from the current device's pool, owned: freed (stream-ordered) when the
// owner goes out of scope, also when a later call of the owner's constructor or function throws.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t bytes, cudaStream_t stream) { allocate(bytes, stream); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : mem_(o.mem_), bytes_(o.bytes_), stream_(o.stream_) { o.mem_ = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      mem_ = o.mem_;
      bytes_ = o.bytes_;
      stream_ = o.stream_;
      o.mem_ = nullptr;
    }
    return *this;
  }
  void allocate(size_t bytes, cudaStream_t stream) {
    release();
    stream_ = stream;
    bytes_ = bytes;
    if (bytes > 0) OK_CUDA_CHECK(cudaMallocFromPoolAsync(&mem_, bytes, scratch_pool(current_device()), stream_));
  }
  // The stream the memory is freed on (a cached buffer used later on another stream is freed there).
  void set_stream(cudaStream_t stream) { stream_ = stream; }
  template <class P>
  P* as() const {
    return static_cast<P*>(mem_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void release() noexcept {
    if (mem_ != nullptr) cudaFreeAsync(mem_, stream_);
    mem_ = nullptr;
  }
  void* mem_ = nullptr;
  size_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
};

// Whether `stream` is being captured into a CUDA graph (a step then must not allocate, upload or synchronize).
inline bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  OK_CUDA_CHECK(cudaStreamIsCapturing(stream, &st));
  return st != cudaStreamCaptureStatusNone;
}

// Blocks per SM the kernel can keep resident at this block size (occupancy), at least 1: grids are sized from it.
template <class K>
int resident_blocks_per_sm(K kernel, int threads, size_t dyn_smem = 0) {
  int n = 0;
  OK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, dyn_smem));
  return n > 0 ? n : 1;
}

inline int sm_count(int device) {
  int sms = 0;
  OK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms > 0 ? sms : 1;
}

}  // namespace cuda_exec
}  // namespace optkern
