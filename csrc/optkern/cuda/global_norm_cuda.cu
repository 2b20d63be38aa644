// CUDA global norm (optkern::global_norm on CUDA arrays): per-block partials of sum x^2 or max |x|, then one
// block combines them in a fixed order.  Moved out of optim_cuda.cu; see global_norm_api.cpp for the dispatch.
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "../executors.h"
#include "../work_plan.h"
#include "cuda_util.cuh"

namespace optkern {
namespace cuda_exec {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int kThreads = 256;

// The plan (tensor table + chunk table) in one owned stream-ordered allocation.
struct ReducePlan {
  DeviceBuffer mem;
  const TensorSlots* tensors = nullptr;
  const Chunk* chunks = nullptr;
  int nchunks = 0;
  ReducePlan(const StepBatch& b, cudaStream_t stream) {
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
    mem.allocate(host.size(), stream);
    OK_CUDA_CHECK(cudaMemcpyAsync(mem.as<void>(), host.data(), host.size(), cudaMemcpyHostToDevice, stream));
    tensors = mem.as<const TensorSlots>();
    chunks = reinterpret_cast<const Chunk*>(mem.as<unsigned char>() + coff);
  }
};

int grid_for(int nchunks) {
  int dev = 0, sms = 0;
  OK_CUDA_CHECK(cudaGetDevice(&dev));
  OK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  int cap = sms * 8;
  return nchunks < cap ? nchunks : cap;
}

// ---- reductions for the global norm: per-block partials, then one block combines them in a fixed order ----
template <class T, bool kMax>
__global__ void partial_kernel(const TensorSlots* __restrict__ tensors, const Chunk* __restrict__ chunks, int nchunks,
                               double* partials) {
  __shared__ double sh[kThreads];
  double acc = 0.0;
  bool nan = false;
  for (int ci = blockIdx.x; ci < nchunks; ci += gridDim.x) {
    const Chunk ch = chunks[ci];
    const T* x = static_cast<const T*>(tensors[ch.tensor].ptr[0]) + ch.begin;
    for (int64_t i = threadIdx.x; i < ch.len; i += blockDim.x) {
      double v = static_cast<double>(x[i]);
      if (kMax) {
        nan |= (v != v);
        acc = fmax(acc, fabs(v));
      } else {
        acc += v * v;
      }
    }
  }
  if (kMax && nan) acc = NAN;
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      double a = sh[threadIdx.x], o = sh[threadIdx.x + s];
      sh[threadIdx.x] = kMax ? ((a != a || o != o) ? NAN : fmax(a, o)) : a + o;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = sh[0];
}

template <bool kMax>
__global__ void combine_kernel(const double* partials, int n, double* out) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double acc = 0.0;
  for (int i = 0; i < n; ++i) acc = kMax ? ((acc != acc || partials[i] != partials[i]) ? NAN : fmax(acc, partials[i]))
                                         : acc + partials[i];
  *out = acc;
}

template <bool kMax>
double reduce(const StepBatch& b) {
  DeviceGuard guard(b.device.index);
  cudaStream_t stream = static_cast<cudaStream_t>(b.stream);
  ReducePlan plan(b, stream);
  if (plan.nchunks == 0) return 0.0;
  const int grid = grid_for(plan.nchunks);
  DeviceBuffer scratch((grid + 1) * sizeof(double), stream);
  double* buf = scratch.as<double>();
  if (b.dtype == DType::f32)
    partial_kernel<float, kMax><<<grid, kThreads, 0, stream>>>(plan.tensors, plan.chunks, plan.nchunks, buf);
  else
    partial_kernel<double, kMax><<<grid, kThreads, 0, stream>>>(plan.tensors, plan.chunks, plan.nchunks, buf);
  OK_CUDA_CHECK(cudaGetLastError());
  combine_kernel<kMax><<<1, 1, 0, stream>>>(buf, grid, buf + grid);
  OK_CUDA_CHECK(cudaGetLastError());
  double result = 0.0;
  OK_CUDA_CHECK(cudaMemcpyAsync(&result, buf + grid, sizeof(double), cudaMemcpyDeviceToHost, stream));
  OK_CUDA_CHECK(cudaStreamSynchronize(stream));  // the norm is returned to the host
  return result;
}

}  // namespace

double sum_squares(const StepBatch& b) { return reduce<false>(b); }
double max_abs(const StepBatch& b) { return reduce<true>(b); }

}  // namespace cuda_exec
}  // namespace optkern
