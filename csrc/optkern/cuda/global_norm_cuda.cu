// CUDA global norm (optkern::global_norm / global_norm_device on CUDA arrays), in the order of global_norm_api.h,
// so the result equals the CPU executor's bit for bit on any GPU (no order depends on the SM count or the grid).
//
// Two stream-ordered launches, no synchronization:
//  1. gn_partials_kernel: a grid-stride loop over the parts of the host plan (gn_plan), grid sized from occupancy.
//     A block of 256 threads is 16 groups of 16 threads; group g serves the part's slots g, g + 16, g + 32,
//     g + 48 (lane blocks, or 0.0 padding).  A lane row is 256 bytes (64 float or 32 double lanes); thread t of a
//     group holds its 16 bytes (lanes K t .. K t + K - 1, K = 4 float or 2 double) and reads them with one
//     16-byte load (float4 / double2) per row when the block start is 16-byte aligned, four rows in flight,
//     element loads otherwise.  The lanes are widened and joined by the tree w = L / 2, ..., 1 (shuffles down to
//     w = K, then in the thread), and thread 0 adds the tail in order.  The 64 slot totals are joined by one warp
//     (the tree w = 32, ..., 1) into the part's partial.
//  2. gn_combine_kernel (one block of 256 threads): thread s joins the partials s, s + 256, ... in order, the 256
//     slots are joined by the tree w = 128, ..., 1; thread 0 writes the norm (sqrt for norm_type 2) and, for
//     clip_grad_norm, the float32 grad_multiplier and found_inf.
// The plan (pieces and part bounds) and the partials share one DeviceBuffer from optkern's pool.  Every CUDA call
// and launch is checked, a failure throws, and nothing falls back to the CPU.  The host-result variant copies the
// norm back and synchronizes the stream once.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "../executors.h"
#include "../global_norm_api.h"
#include "../precision.h"
#include "cuda_util.cuh"

namespace optkern {
namespace cuda_exec {
namespace {

constexpr int kThreads = 256;                        // partials blocks
constexpr int kGroup = 16;                           // threads per lane block
constexpr int kGroups = kThreads / kGroup;           // lane blocks served at once
static_assert(kGnPartBlocks % kGroups == 0, "every group serves the same number of slots (shuffles)");
static_assert(kGnSlots == kThreads, "one combine thread per slot");

// A piece on the device: its first element, its length, and its first slot in its part.
struct DevPiece {
  const void* ptr;
  int32_t len;
  int32_t slot;
};

// The 16 bytes of a thread's lanes in one row: K = 16 / sizeof(T) consecutive values (lanes K t .. K t + K - 1 of
// the row's 256 bytes), one float4 / double2 load when aligned, element loads otherwise.  16-bit grads (kHalf:
// the DType of the storage, T = float, the lanes' type) are read as K = 4 values of 8 bytes and converted by
// precision.h's functions, so the lanes hold the float32 values the CPU's tiles hold.
template <class T>
struct Lanes16B {
  static constexpr int K = static_cast<int>(16 / sizeof(T));
  static_assert(kGroup * K == gn_lanes<T>, "16 threads of 16 bytes make a lane row");
  T v[K];
};
constexpr int kNoHalf = -1;
template <class T, int kHalf>
__device__ __forceinline__ T elem(const void* __restrict__ x, int64_t j) {
  if constexpr (kHalf == kNoHalf) return static_cast<const T*>(x)[j];
  else return half_to_f32(static_cast<DType>(kHalf), static_cast<const uint16_t*>(x)[j]);
}
template <class T, int kHalf>
__device__ __forceinline__ Lanes16B<T> load16B(const void* __restrict__ x, int64_t j, bool vec16) {
  Lanes16B<T> r;
  if constexpr (kHalf != kNoHalf) {
    const uint16_t* p = static_cast<const uint16_t*>(x) + j;
    if (vec16) {
      const uint2 q = *reinterpret_cast<const uint2*>(p);
      const uint16_t h[4] = {static_cast<uint16_t>(q.x), static_cast<uint16_t>(q.x >> 16), static_cast<uint16_t>(q.y),
                             static_cast<uint16_t>(q.y >> 16)};
#pragma unroll
      for (int e = 0; e < 4; ++e) r.v[e] = half_to_f32(static_cast<DType>(kHalf), h[e]);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) r.v[e] = half_to_f32(static_cast<DType>(kHalf), p[e]);
    }
  } else if (vec16) {
    const T* p = static_cast<const T*>(x) + j;
    if constexpr (sizeof(T) == 4) {
      const float4 q = *reinterpret_cast<const float4*>(p);
      r.v[0] = q.x; r.v[1] = q.y; r.v[2] = q.z; r.v[3] = q.w;
    } else {
      const double2 q = *reinterpret_cast<const double2*>(p);
      r.v[0] = q.x; r.v[1] = q.y;
    }
  } else {
    const T* p = static_cast<const T*>(x) + j;
#pragma unroll
    for (int e = 0; e < Lanes16B<T>::K; ++e) r.v[e] = p[e];
  }
  return r;
}

// The lane block total of x[0, blk) (blk may be 0: a padding slot, total 0.0), valid in thread 0 of the group.
// Every thread of the warp calls it together (shuffles of width 16).
template <bool kMax, class T, int kHalf>
__device__ __forceinline__ double lane_block_total(const void* __restrict__ x, int64_t blk, int t) {
  constexpr int L = gn_lanes<T>, K = Lanes16B<T>::K, kInFlight = 4;
  T a[K];
#pragma unroll
  for (int e = 0; e < K; ++e) a[e] = T(0);
  const int64_t vec = blk / L * L, rows = vec / L;
  if (rows > 0) {
    const unsigned align = kHalf != kNoHalf ? 7u : 15u;  // then every thread's lanes are aligned
    const bool vec16 = (reinterpret_cast<uintptr_t>(x) & align) == 0;
    const int64_t j0 = K * t;
    int64_t r = 0;
    for (; r + kInFlight <= rows; r += kInFlight) {  // four rows' loads in flight, then the lanes in row order
      Lanes16B<T> v[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) v[u] = load16B<T, kHalf>(x, j0 + (r + u) * L, vec16);
#pragma unroll
      for (int u = 0; u < kInFlight; ++u)
#pragma unroll
        for (int e = 0; e < K; ++e) a[e] = gn_lane<kMax>(a[e], v[u].v[e]);
    }
    for (; r < rows; ++r) {
      const Lanes16B<T> v = load16B<T, kHalf>(x, j0 + r * L, vec16);
#pragma unroll
      for (int e = 0; e < K; ++e) a[e] = gn_lane<kMax>(a[e], v.v[e]);
    }
  }
  double h[K];
#pragma unroll
  for (int e = 0; e < K; ++e) h[e] = static_cast<double>(a[e]);
  // Lane K t + e: the tree's steps w = L / 2 .. K are the threads t + 8, + 4, + 2, + 1 (same e); then the steps
  // w = K / 2 .. 1 inside thread 0.
#pragma unroll
  for (int d = kGroup / 2; d >= 1; d /= 2)
#pragma unroll
    for (int e = 0; e < K; ++e) h[e] = gn_join<kMax>(h[e], __shfl_down_sync(0xffffffffu, h[e], d, kGroup));
  double s = 0.0;
  if (t == 0) {
#pragma unroll
    for (int w = K / 2; w >= 1; w /= 2)
#pragma unroll
      for (int e = 0; e < w; ++e) h[e] = gn_join<kMax>(h[e], h[e + w]);
    s = h[0];
    for (int64_t j = vec; j < blk; ++j) s = gn_join<kMax>(s, static_cast<double>(gn_lane<kMax>(T(0), elem<T, kHalf>(x, j))));
  }
  return s;
}

template <bool kMax, class T, int kHalf>
__global__ void __launch_bounds__(kThreads) gn_partials_kernel(const DevPiece* __restrict__ pieces,
                                                               const int32_t* __restrict__ part_begin, int nparts,
                                                               double* __restrict__ partials) {
  __shared__ DevPiece sp[kGnPartBlocks];  // a part has at most 64 pieces (each has >= 1 lane block)
  __shared__ double red[kGnPartBlocks];
  const int g = static_cast<int>(threadIdx.x) / kGroup, t = static_cast<int>(threadIdx.x) % kGroup;
  for (int p = blockIdx.x; p < nparts; p += gridDim.x) {
    const int k0 = part_begin[p], np = part_begin[p + 1] - k0;
    if (static_cast<int>(threadIdx.x) < np) sp[threadIdx.x] = pieces[k0 + threadIdx.x];
    __syncthreads();
    for (int s = g; s < kGnPartBlocks; s += kGroups) {
      int k = 0;  // the piece holding slot s: the last one starting at or before it
      while (k + 1 < np && sp[k + 1].slot <= s) ++k;
      const int64_t o = static_cast<int64_t>(s - sp[k].slot) * kGnBlock;
      const int64_t len = sp[k].len;
      const int64_t blk = o < len ? (len - o < kGnBlock ? len - o : kGnBlock) : 0;
      const int64_t esize = kHalf != kNoHalf ? 2 : static_cast<int64_t>(sizeof(T));
      const void* x = static_cast<const char*>(sp[k].ptr) + (blk > 0 ? o : 0) * esize;
      const double total = lane_block_total<kMax, T, kHalf>(x, blk, t);
      if (t == 0) red[s] = total;
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // the slots' tree: w = 32 from shared memory, then 16 .. 1 by shuffles
      double v = gn_join<kMax>(red[threadIdx.x], red[threadIdx.x + 32]);
#pragma unroll
      for (int w = 16; w >= 1; w /= 2) v = gn_join<kMax>(v, __shfl_down_sync(0xffffffffu, v, w));
      if (threadIdx.x == 0) partials[p] = v;
    }
    __syncthreads();  // sp and red are reused by the block's next part
  }
}

template <bool kMax>
__global__ void __launch_bounds__(kGnSlots) gn_combine_kernel(const double* __restrict__ partials, int nparts,
                                                              NormOutputs out) {
  __shared__ double h[kGnSlots];
  const int s = static_cast<int>(threadIdx.x);
  double acc = 0.0;
  for (int p = s; p < nparts; p += kGnSlots) acc = gn_join<kMax>(acc, partials[p]);
  h[s] = acc;
  __syncthreads();
  for (int w = kGnSlots / 2; w >= 32; w /= 2) {
    if (s < w) h[s] = gn_join<kMax>(h[s], h[s + w]);
    __syncthreads();
  }
  if (s < 32) {
    double v = h[s];
#pragma unroll
    for (int w = 16; w >= 1; w /= 2) v = gn_join<kMax>(v, __shfl_down_sync(0xffffffffu, v, w));
    if (s == 0) {
      const double norm = kMax ? v : sqrt(v);
      *out.norm = norm;
      if (out.grad_multiplier != nullptr) {
        *out.grad_multiplier = static_cast<float>(gn_clip_multiplier(norm, out.max_norm));
        *out.found_inf = gn_nonfinite(norm) ? 1.0f : 0.0f;
      }
    }
  }
}

template <bool kMax, class T, int kHalf>
void launch(const StepBatch& b, const NormOutputs& out, cudaStream_t stream) {
  const int64_t esize = kHalf != kNoHalf ? 2 : static_cast<int64_t>(sizeof(T));
  const GnPlan plan = gn_plan(b);
  const int np = plan.nparts();
  // One allocation: the device pieces, the part bounds, the partials.
  const size_t pbytes = plan.pieces.size() * sizeof(DevPiece);
  const size_t bbytes = plan.part_begin.size() * sizeof(int32_t);
  const size_t boff = pbytes, qoff = (pbytes + bbytes + 15) / 16 * 16;
  DeviceBuffer mem(np > 0 ? qoff + static_cast<size_t>(np) * sizeof(double) : 0, stream);
  double* partials = nullptr;
  if (np > 0) {
    std::vector<unsigned char> host(qoff);
    DevPiece* hp = reinterpret_cast<DevPiece*>(host.data());
    for (int p = 0; p < np; ++p) {
      int32_t slot = 0;
      for (int32_t k = plan.part_begin[p]; k < plan.part_begin[p + 1]; ++k) {
        const GnPiece& pc = plan.pieces[static_cast<size_t>(k)];
        hp[k].ptr = static_cast<const char*>(b.tensors[static_cast<size_t>(pc.tensor)].ptr[0]) + pc.begin * esize;
        hp[k].len = pc.len;
        hp[k].slot = slot;
        slot += static_cast<int32_t>(gn_blocks(pc.len));
      }
    }
    std::memcpy(host.data() + boff, plan.part_begin.data(), bbytes);
    OK_CUDA_CHECK(cudaMemcpyAsync(mem.as<void>(), host.data(), qoff, cudaMemcpyHostToDevice, stream));
    const DevPiece* pieces = mem.as<const DevPiece>();
    const int32_t* bounds = reinterpret_cast<const int32_t*>(mem.as<unsigned char>() + boff);
    partials = reinterpret_cast<double*>(mem.as<unsigned char>() + qoff);
    const int cap = resident_blocks_per_sm(gn_partials_kernel<kMax, T, kHalf>, kThreads) * sm_count(b.device.index);
    const int grid = np < cap ? np : cap;
    gn_partials_kernel<kMax, T, kHalf><<<grid, kThreads, 0, stream>>>(pieces, bounds, np, partials);
    OK_CUDA_CHECK(cudaGetLastError());
  }
  gn_combine_kernel<kMax><<<1, kGnSlots, 0, stream>>>(partials, np, out);
  OK_CUDA_CHECK(cudaGetLastError());
}

// Refused before anything is enqueued: the plan upload from pageable host memory cannot be captured.
void check_not_capturing(cudaStream_t stream) {
  if (stream_capturing(stream))
    throw std::invalid_argument(
        "grads: the global norm cannot be captured into a CUDA graph (it uploads its plan from host memory); "
        "compute it outside the capture");
}

void run(const StepBatch& b, bool inf, const NormOutputs& out) {
  cudaStream_t stream = static_cast<cudaStream_t>(b.stream);
  constexpr int kBf = static_cast<int>(DType::bf16), kHf = static_cast<int>(DType::f16);
  if (inf) {
    if (b.dtype == DType::f32) launch<true, float, kNoHalf>(b, out, stream);
    else if (b.dtype == DType::bf16) launch<true, float, kBf>(b, out, stream);
    else if (b.dtype == DType::f16) launch<true, float, kHf>(b, out, stream);
    else launch<true, double, kNoHalf>(b, out, stream);
  } else {
    if (b.dtype == DType::f32) launch<false, float, kNoHalf>(b, out, stream);
    else if (b.dtype == DType::bf16) launch<false, float, kBf>(b, out, stream);
    else if (b.dtype == DType::f16) launch<false, float, kHf>(b, out, stream);
    else launch<false, double, kNoHalf>(b, out, stream);
  }
}

}  // namespace

void global_norm_device(const StepBatch& b, bool inf, const NormOutputs& out) {
  DeviceGuard guard(b.device.index);
  check_not_capturing(static_cast<cudaStream_t>(b.stream));
  run(b, inf, out);
}

double global_norm_host(const StepBatch& b, bool inf) {
  DeviceGuard guard(b.device.index);
  cudaStream_t stream = static_cast<cudaStream_t>(b.stream);
  check_not_capturing(stream);
  DeviceBuffer res(sizeof(double), stream);
  NormOutputs out;
  out.norm = res.as<double>();
  run(b, inf, out);
  double norm = 0.0;
  OK_CUDA_CHECK(cudaMemcpyAsync(&norm, out.norm, sizeof(double), cudaMemcpyDeviceToHost, stream));
  OK_CUDA_CHECK(cudaStreamSynchronize(stream));  // the norm is returned to the host
  return norm;
}

}  // namespace cuda_exec
}  // namespace optkern
