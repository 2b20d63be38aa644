// CUDA executor: one launch per step, whatever the number of tensors.
//
// The host builds the multi-tensor work plan (work_plan.cpp, tested on the CPU): a table of tensor pointers
// and a table of chunks (tensor, begin, len).  Both are copied to stream-ordered device memory and a
// grid-stride kernel walks the chunks, applying the same per-element rule as the CPU executor
// (optim_rules.h).  Aligned chunks use 16-byte loads and stores; anything else takes the scalar loop.
// Every CUDA call is checked and a failure throws; nothing falls back to the CPU.
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../executors.h"
#include "../work_plan.h"
#include "cuda_util.cuh"

namespace optkern {
namespace cuda_exec {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item (a multiple of every pack width)
constexpr int kThreads = 256;

template <class T>
struct alignas(16) Pack {
  static constexpr int kWidth = 16 / static_cast<int>(sizeof(T));
  T v[kWidth];
};

template <class Rule, class T>
__device__ __forceinline__ void apply_one(const typename Rule::template Coef<T>& c, T* p, const T* g, T* s0, T* s1,
                                          T* s2, int64_t i) {
  T pi = p[i], a = T(0), b = T(0), d = T(0);
  if (Rule::kStates > 0) a = s0[i];
  if (Rule::kStates > 1) b = s1[i];
  if (Rule::kStates > 2) d = s2[i];
  Rule::apply(c, pi, g[i], a, b, d);
  p[i] = pi;
  if (Rule::kStates > 0) s0[i] = a;
  if (Rule::kStates > 1) s1[i] = b;
  if (Rule::kStates > 2) s2[i] = d;
}

template <class Rule, class T>
__global__ void step_kernel(const TensorSlots* __restrict__ tensors, const Chunk* __restrict__ chunks, int nchunks,
                            typename Rule::template Coef<T> c, const float* grad_scale, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // AMP / clip found inf or NaN: skip the step
  if (grad_scale != nullptr) c.gscale = c.gscale * static_cast<T>(*grad_scale);
  constexpr int W = Pack<T>::kWidth;
  for (int ci = blockIdx.x; ci < nchunks; ci += gridDim.x) {
    const Chunk ch = chunks[ci];
    const TensorSlots& t = tensors[ch.tensor];
    T* p = static_cast<T*>(t.ptr[0]) + ch.begin;
    const T* g = static_cast<const T*>(t.ptr[1]) + ch.begin;
    T* s0 = Rule::kStates > 0 ? static_cast<T*>(t.ptr[2]) + ch.begin : nullptr;
    T* s1 = Rule::kStates > 1 ? static_cast<T*>(t.ptr[3]) + ch.begin : nullptr;
    T* s2 = Rule::kStates > 2 ? static_cast<T*>(t.ptr[4]) + ch.begin : nullptr;
    uintptr_t mis = reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g);
    if (Rule::kStates > 0) mis |= reinterpret_cast<uintptr_t>(s0);
    if (Rule::kStates > 1) mis |= reinterpret_cast<uintptr_t>(s1);
    if (Rule::kStates > 2) mis |= reinterpret_cast<uintptr_t>(s2);
    int64_t vec_end = 0;
    if ((mis & 15u) == 0) {  // every buffer 16-byte aligned: packed loads and stores
      const int64_t npacks = ch.len / W;
      vec_end = npacks * W;
      for (int64_t k = threadIdx.x; k < npacks; k += blockDim.x) {
        Pack<T> P = reinterpret_cast<Pack<T>*>(p)[k];
        const Pack<T> G = reinterpret_cast<const Pack<T>*>(g)[k];
        Pack<T> A{}, B{}, D{};
        if (Rule::kStates > 0) A = reinterpret_cast<Pack<T>*>(s0)[k];
        if (Rule::kStates > 1) B = reinterpret_cast<Pack<T>*>(s1)[k];
        if (Rule::kStates > 2) D = reinterpret_cast<Pack<T>*>(s2)[k];
#pragma unroll
        for (int l = 0; l < W; ++l) Rule::apply(c, P.v[l], G.v[l], A.v[l], B.v[l], D.v[l]);
        reinterpret_cast<Pack<T>*>(p)[k] = P;
        if (Rule::kStates > 0) reinterpret_cast<Pack<T>*>(s0)[k] = A;
        if (Rule::kStates > 1) reinterpret_cast<Pack<T>*>(s1)[k] = B;
        if (Rule::kStates > 2) reinterpret_cast<Pack<T>*>(s2)[k] = D;
      }
    }
    for (int64_t i = vec_end + threadIdx.x; i < ch.len; i += blockDim.x) apply_one<Rule, T>(c, p, g, s0, s1, s2, i);
  }
}

// Upload the plan (tensor table + chunk table) into one stream-ordered allocation.
struct DevicePlan {
  void* mem = nullptr;
  cudaStream_t stream = nullptr;
  const TensorSlots* tensors = nullptr;
  const Chunk* chunks = nullptr;
  int nchunks = 0;
  DevicePlan(const StepBatch& b, cudaStream_t s) : stream(s) {
    std::vector<int64_t> numels(b.tensors.size());
    for (size_t i = 0; i < b.tensors.size(); ++i) numels[i] = b.tensors[i].numel;
    std::vector<Chunk> plan = cuda_chunk_plan(numels, kChunk);
    nchunks = static_cast<int>(plan.size());
    if (nchunks == 0) return;
    const size_t tbytes = b.tensors.size() * sizeof(TensorSlots);
    const size_t cbytes = plan.size() * sizeof(Chunk);
    const size_t coff = (tbytes + 15) / 16 * 16;
    std::vector<unsigned char> host(coff + cbytes);
    std::memcpy(host.data(), b.tensors.data(), tbytes);
    std::memcpy(host.data() + coff, plan.data(), cbytes);
    OK_CUDA_CHECK(cudaMallocAsync(&mem, host.size(), stream));
    // Pageable source: the call returns once the bytes are staged, so `host` may go out of scope.
    OK_CUDA_CHECK(cudaMemcpyAsync(mem, host.data(), host.size(), cudaMemcpyHostToDevice, stream));
    tensors = static_cast<const TensorSlots*>(mem);
    chunks = reinterpret_cast<const Chunk*>(static_cast<unsigned char*>(mem) + coff);
  }
  ~DevicePlan() {
    if (mem) cudaFreeAsync(mem, stream);
  }
  DevicePlan(const DevicePlan&) = delete;
  DevicePlan& operator=(const DevicePlan&) = delete;
};

int grid_for(int nchunks) {
  int dev = 0, sms = 0;
  OK_CUDA_CHECK(cudaGetDevice(&dev));
  OK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  int cap = sms * 8;
  return nchunks < cap ? nchunks : cap;
}

template <class Rule, class T>
void launch(const StepBatch& b, const CoefD<Rule>& cd, const DeviceScalars& d) {
  DeviceGuard guard(b.device.index);
  cudaStream_t stream = static_cast<cudaStream_t>(b.stream);
  DevicePlan plan(b, stream);
  if (plan.nchunks == 0) return;
  typename Rule::template Coef<T> c(cd);
  step_kernel<Rule, T><<<grid_for(plan.nchunks), kThreads, 0, stream>>>(plan.tensors, plan.chunks, plan.nchunks, c,
                                                                      d.grad_scale, d.found_inf);
  OK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

template <class Rule>
void run_rule(const StepBatch& b, const CoefD<Rule>& c, const DeviceScalars& d) {
  if (b.dtype == DType::f32)
    launch<Rule, float>(b, c, d);
  else
    launch<Rule, double>(b, c, d);
}

#define OPTKERN_INSTANTIATE(R) template void run_rule<R>(const StepBatch&, const CoefD<R>&, const DeviceScalars&);
OPTKERN_FOR_EACH_RULE(OPTKERN_INSTANTIATE)
#undef OPTKERN_INSTANTIATE

bool available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return false;
  }
  return n > 0;
}

}  // namespace cuda_exec

bool cuda_built() { return true; }
bool cuda_available() { return cuda_exec::available(); }

}  // namespace optkern
