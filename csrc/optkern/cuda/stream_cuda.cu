// Stream ordering after a producer's stream, and the device of a device pointer (see cuda_streams.h).
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda_streams.h"
#include "../optim_api.h"
#include "cuda_util.cuh"

namespace optkern {
namespace {

using cuda_exec::DeviceGuard;

bool special(uintptr_t s) { return s == 0 || s == kLegacyDefaultStream || s == kPerThreadDefaultStream; }

cudaStream_t as_stream(uintptr_t s) {
  // 0 is the step's spelling of the legacy default stream; 1 and 2 are the runtime's own special handles.
  return s == 0 ? cudaStreamLegacy : reinterpret_cast<cudaStream_t>(s);
}

// One event per device, reused: recorded and waited on under `mu`, so two threads never interleave a record and
// a wait on the same event (a wait takes the work recorded at the time of the call, so reuse is then safe).
// Kept for the life of the process, like the scratch pools.
std::mutex mu;
std::vector<cudaEvent_t> events;

cudaEvent_t event_for(int device) {  // called with mu held
  if (device < 0) throw std::runtime_error("optkern CUDA error: negative device index");
  if (static_cast<size_t>(device) >= events.size()) events.resize(device + 1, nullptr);
  if (events[device] == nullptr) {
    DeviceGuard guard(device);
    cudaEvent_t ev = nullptr;
    OK_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    events[device] = ev;
  }
  return events[device];
}

}  // namespace

void order_after_stream(int device, uintptr_t producer, uintptr_t consumer) {
  if (same_stream(producer, consumer)) return;
  DeviceGuard guard(device);  // the special handles name this device's streams
  const cudaStream_t p = as_stream(producer), c = as_stream(consumer);
  // A graph capture keeps cross-stream order only between streams of the same capture.
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  unsigned long long cid = 0;
  OK_CUDA_CHECK(cudaStreamGetCaptureInfo(c, &cs, &cid));
  if (cs == cudaStreamCaptureStatusInvalidated)
    throw std::runtime_error("optkern CUDA error: the step's stream is in an invalidated graph capture");
  if (cs == cudaStreamCaptureStatusActive) {
    cudaStreamCaptureStatus ps = cudaStreamCaptureStatusNone;
    unsigned long long pid = 0;
    OK_CUDA_CHECK(cudaStreamGetCaptureInfo(p, &ps, &pid));
    if (ps != cudaStreamCaptureStatusActive || pid != cid)
      throw std::runtime_error(
          "optkern CUDA error: the step's stream is being captured into a CUDA graph, but an array's producer "
          "stream (__cuda_array_interface__ 'stream') is not part of that capture, so the step cannot be ordered "
          "after it; produce the array on a stream of the capture");
  }
  int pdev = device;
  if (!special(producer)) OK_CUDA_CHECK(cudaStreamGetDevice(p, &pdev));
  std::lock_guard<std::mutex> lock(mu);
  cudaEvent_t ev = event_for(pdev);
  {
    DeviceGuard on_producer(pdev);  // an event is recorded on a stream of its own device
    OK_CUDA_CHECK(cudaEventRecord(ev, p));
  }
  OK_CUDA_CHECK(cudaStreamWaitEvent(c, ev, 0));  // a stream may wait on another device's event
}

int cuda_pointer_device(const void* ptr) {
  cudaPointerAttributes a = {};
  const cudaError_t err = cudaPointerGetAttributes(&a, ptr);
  if (err == cudaErrorInvalidValue) {
    (void)cudaGetLastError();  // not sticky: clear it so a later launch check does not see it
    throw std::invalid_argument("its data pointer is not CUDA memory");
  }
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("optkern CUDA error: ") + cudaGetErrorString(err) +
                             " in cudaPointerGetAttributes (" __FILE__ ")");
  if (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged) return a.device;
  throw std::invalid_argument(std::string("its data pointer is ") +
                              (a.type == cudaMemoryTypeHost ? "pinned host memory" : "host memory") +
                              ", not CUDA device memory");
}

namespace {
// cuDevicePrimaryCtxGetState through the runtime's driver entry point (no link against libcuda): whether a
// device's primary context is active, asked without creating it.
using PrimaryCtxGetState = int (*)(int dev, unsigned int* flags, int* active);  // CUresult, CUdevice
PrimaryCtxGetState primary_ctx_get_state() {
  static PrimaryCtxGetState fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &p, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      p = nullptr;
    }
    return reinterpret_cast<PrimaryCtxGetState>(p);
  }();
  return fn;
}
}  // namespace

bool cuda_context_active() {
  if (!cuda_available()) return false;
  const PrimaryCtxGetState get = primary_ctx_get_state();
  int n = 0;
  if (!get || cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  for (int d = 0; d < n; ++d) {
    unsigned int flags = 0;
    int active = 0;
    if (get(d, &flags, &active) == 0 && active) return true;
  }
  return false;
}

bool cuda_device_memory(const void* ptr) {
  cudaPointerAttributes a = {};
  if (cudaPointerGetAttributes(&a, ptr) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeDevice;
}

}  // namespace optkern
