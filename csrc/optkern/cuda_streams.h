// Host-side CUDA stream ordering and pointer queries the array front ends need, in the framework-free core:
// a consumer of another library's array orders its step after the producer's stream (the
// __cuda_array_interface__ v3 contract) and finds the device of a bare device pointer.  Implemented in
// cuda/stream_cuda.cu; a build without CUDA refuses every call loudly (cuda/stream_cuda_absent.cpp).
#pragma once

#include <cstdint>

namespace optkern {

// Stream handles as integers, as callers pass them: 0 = the legacy default stream (a step's stream as
// StepBatch::stream = nullptr), 1 = the legacy default stream (cudaStreamLegacy, CAI v3's spelling), 2 = the
// per-thread default stream (cudaStreamPerThread), anything else a cudaStream_t.
constexpr uintptr_t kLegacyDefaultStream = 1;
constexpr uintptr_t kPerThreadDefaultStream = 2;

// Whether two stream handles name the same stream (0 and 1 are both the legacy default stream).
inline bool same_stream(uintptr_t a, uintptr_t b) {
  return (a == 0 ? kLegacyDefaultStream : a) == (b == 0 ? kLegacyDefaultStream : b);
}

// Order everything later queued on `consumer` (a step's stream on CUDA device `device`) after all work queued
// so far on `producer`: an event (one cached per device) is recorded on the producer's stream and the consumer
// waits on it, without a host synchronisation.  Nothing happens when both name the same stream.  The special
// handles 1 and 2 are the streams of `device`.  Throws std::runtime_error on a CUDA error, and when the consumer
// is being captured into a CUDA graph and the producer is not part of that capture (the order cannot be kept).
void order_after_stream(int device, uintptr_t producer, uintptr_t consumer);

// The CUDA device that owns device (or managed) memory at `ptr` (cudaPointerGetAttributes).  Throws
// std::invalid_argument when `ptr` is host or unregistered memory, or when the build has no CUDA.
int cuda_pointer_device(const void* ptr);

// For host-memory callers (the C interface's CPU checks): whether a CUDA context is active in this process (a
// primary context of some device, queried without creating one), and whether `ptr` is CUDA device memory that
// the host cannot read (device memory, not managed or pinned).  Both false without CUDA or a driver; the second
// is only asked when the first is true, so a CPU-only caller never creates a CUDA context.
bool cuda_context_active();
bool cuda_device_memory(const void* ptr);

}  // namespace optkern
