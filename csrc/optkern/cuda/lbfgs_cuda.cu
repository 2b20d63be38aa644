// CUDA executor for the L-BFGS kernels: the rules and the reduction order of lbfgs_rules.h.
//
// dots: two stream-ordered launches and one copy back.
//  1. dots_partials_kernel: a grid-stride loop over the chunks of kLbChunk (4096) values, grid sized from
//     occupancy.  The block's 256 threads are 16 slots of 16 lanes: slot s serves the chunk's lane block s (values
//     [256 s, 256 s + 256)), lane l accumulates values j = l, l + 16, ... < vec in T (lb_dot_step), the 16 lanes
//     are widened to double and added with shuffles as the tree 8 + 8, 4 + 4, 2 + 2, 1 + 1, and lane 0 adds the
//     tail [vec, blk) in order: the CPU's lane-block total, bit for bit.  The block totals of up to 32 (query,
//     stored) pairs wait in shared memory; one thread per pair adds them in block order from 0.0 and writes the
//     chunk's partial to scratch, pair-major (part[p * nchunks + c], p = q * k + i).  Pairs are walked
//     stored-major, so a stored vector's chunk is read once from DRAM and reused (L1) for every query.
//  2. dots_sum_kernel: one warp per pair folds its chunk partials strictly in chunk order from 0.0 (the CPU's
//     order): the lanes load 32 consecutive partials at a time (coalesced, in flight together) and every lane
//     takes them by shuffle, one by one (the batch-norm executor's ordered fold).
//  The nq * k doubles are then copied to the host and the call synchronizes the stream once (the result is
//  host memory); this is the only synchronization in the file.
// lincomb: one grid-stride launch (grid from occupancy), the vector pointers and the coefficients (already cast
// to T) passed by value as a kernel parameter (at most 64 of each, about 1 KB); 16-byte loads and stores when
// every array is 16-byte aligned, one element at a time otherwise.  No synchronization.
// ncg_direction (ncg_rules.h): ncg_partials_kernel walks the chunks like dots_partials_kernel (slot s = lane block
// s, lane l = values l, l + 16, ...), each thread reading g and v, writing v = beta v - g back in place and
// accumulating v_new . g in T; the lanes' tree, the tail by lane 0 (which also writes the tail's v), the block
// totals in block order: the chunk partial of lbfgs_dots({v_new}, {g}).  dots_sum_kernel folds the partials
// (P = 1) and the slope is copied back: one stream synchronization, as for the dots.
// No floating-point atomics and no order that depends on the grid: the results equal the CPU executor's bitwise
// (the GPU is built with --fmad=false, the CPU with -ffp-contract=off).  Scratch is an owned DeviceBuffer from
// optkern's pool (stream-ordered), every CUDA call and launch is checked, a failure throws, and nothing falls back
// to the CPU.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "../lbfgs_executors.h"
#include "../lbfgs_rules.h"
#include "../ncg_rules.h"
#include "cuda_util.cuh"

namespace optkern {
namespace cuda_exec {
namespace {

constexpr int kThreads = 256;                                   // both dots kernels and lincomb
constexpr int kSlots = static_cast<int>(kLbChunk / kLbLaneBlock);  // lane blocks per chunk = 16
constexpr int kPairBatch = 32;                                  // pair totals held in shared memory at once
static_assert(kSlots * kLbLanes == kThreads, "one thread per lane of every lane block of a chunk");
static_assert(kPairBatch <= kThreads, "one thread per pair folds the block totals");

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }


// ---- dots -------------------------------------------------------------------------------------------------

// This thread's place in the chunk at off (of n values): slot = its lane block, lane = its lane; the block
// starts at b0 and holds blk values (0 past the chunk's end), vec of them in whole 16-lane rows; nblocks lane
// blocks in the chunk.  Shared by the dots and the NCG direction.
struct LaneBlock {
  int slot, lane, nblocks;
  int64_t b0, blk, vec;
  __device__ __forceinline__ LaneBlock(int64_t n, int64_t off) {
    const int64_t len = n - off < kLbChunk ? n - off : kLbChunk;
    slot = static_cast<int>(threadIdx.x) / kLbLanes;
    lane = static_cast<int>(threadIdx.x) % kLbLanes;
    b0 = static_cast<int64_t>(slot) * kLbLaneBlock;
    const int64_t rest = len - b0;
    blk = rest <= 0 ? 0 : (rest < kLbLaneBlock ? rest : kLbLaneBlock);
    vec = blk / kLbLanes * kLbLanes;
    nblocks = static_cast<int>(ceil_div(len, kLbLaneBlock));
  }
};

template <class T>
struct DotPtrs {
  const T* stored[kLbMaxVecs];
  const T* queries[kLbMaxVecs];
};

// One chunk c: the partials of every pair (see the file comment).
template <class T>
__device__ __forceinline__ void chunk_partials(const DotPtrs<T>& ptrs, int k, int nq, int64_t n, int64_t nchunks,
                                               int64_t c, double (*red)[kSlots + 1], double* __restrict__ part) {
  const int64_t off = c * kLbChunk;
  const LaneBlock lb(n, off);
  const int slot = lb.slot, lane = lb.lane, nblocks = lb.nblocks;
  const int64_t b0 = lb.b0, blk = lb.blk, vec = lb.vec;
  const int P = k * nq;
  for (int pb = 0; pb < P; pb += kPairBatch) {
    const int pe = P - pb < kPairBatch ? P : pb + kPairBatch;
    for (int idx = pb; idx < pe; ++idx) {  // stored-major: idx = i * nq + q
      const int i = idx / nq, q = idx % nq;
      T acc = T(0);
      double h = 0.0;
      if (blk > 0) {
        const T* a = ptrs.stored[i] + off + b0;
        const T* b = ptrs.queries[q] + off + b0;
#pragma unroll 4
        for (int64_t j = lane; j < vec; j += kLbLanes) acc = lb_dot_step(acc, a[j], b[j]);
        h = static_cast<double>(acc);
      }
      // All 32 lanes of the warp take part (both of its slots reach here together).
#pragma unroll
      for (int w = kLbLanes / 2; w >= 1; w /= 2) h += __shfl_down_sync(0xffffffffu, h, w, kLbLanes);
      if (lane == 0 && blk > 0) {
        const T* a = ptrs.stored[i] + off + b0;
        const T* b = ptrs.queries[q] + off + b0;
        for (int64_t j = vec; j < blk; ++j) h += static_cast<double>(lb_prod(a[j], b[j]));
        red[idx - pb][slot] = h;
      }
    }
    __syncthreads();
    const int t = static_cast<int>(threadIdx.x);
    if (t < pe - pb) {
      const int idx = pb + t;
      const int i = idx / nq, q = idx % nq;
      double s = 0.0;
      for (int s_ = 0; s_ < nblocks; ++s_) s += red[t][s_];
      part[(static_cast<int64_t>(q) * k + i) * nchunks + c] = s;
    }
    __syncthreads();
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) dots_partials_kernel(DotPtrs<T> ptrs, int k, int nq, int64_t n,
                                                                 int64_t nchunks, double* __restrict__ part) {
  __shared__ double red[kPairBatch][kSlots + 1];
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) chunk_partials(ptrs, k, nq, n, nchunks, c, red, part);
}

// One warp per pair p: 0.0 plus the chunk partials part[p * nchunks + c] in chunk order.
__global__ void __launch_bounds__(kThreads) dots_sum_kernel(const double* __restrict__ part, int64_t nchunks, int P,
                                                            double* __restrict__ out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (p >= P) return;  // whole warps
  const double* pp = part + p * nchunks;
  double s = 0.0;
  for (int64_t base = 0; base < nchunks; base += 32) {
    const double v = base + lane < nchunks ? pp[base + lane] : 0.0;
    const int m = nchunks - base < 32 ? static_cast<int>(nchunks - base) : 32;
    for (int j = 0; j < m; ++j) s += __shfl_sync(0xffffffffu, v, j);
  }
  if (lane == 0) out[p] = s;
}

template <class T>
void dots_typed(const VecBatch& stored, const VecBatch& queries, double* out) {
  DeviceGuard guard(stored.device.index);
  cudaStream_t stream = static_cast<cudaStream_t>(stored.stream);
  const int k = static_cast<int>(stored.vecs.size());
  const int nq = static_cast<int>(queries.vecs.size());
  const int P = k * nq;
  DotPtrs<T> ptrs{};
  for (int i = 0; i < k; ++i) ptrs.stored[i] = static_cast<const T*>(stored.vecs[static_cast<size_t>(i)]);
  for (int q = 0; q < nq; ++q) ptrs.queries[q] = static_cast<const T*>(queries.vecs[static_cast<size_t>(q)]);
  const int64_t nchunks = lb_num_chunks(stored.n);
  if (nchunks > 0x7fffffff) throw std::invalid_argument("stored: too many elements for one CUDA launch");
  DeviceBuffer buf(static_cast<size_t>(nchunks * P + P) * sizeof(double), stream);
  double* part = buf.as<double>();
  double* dev_out = part + nchunks * P;
  const int64_t cap =
      static_cast<int64_t>(resident_blocks_per_sm(dots_partials_kernel<T>, kThreads)) * sm_count(stored.device.index);
  const unsigned grid = static_cast<unsigned>(nchunks < cap ? nchunks : cap);
  dots_partials_kernel<T><<<grid, kThreads, 0, stream>>>(ptrs, k, nq, stored.n, nchunks, part);
  OK_CUDA_CHECK(cudaGetLastError());
  const unsigned sum_grid = static_cast<unsigned>(ceil_div(static_cast<int64_t>(P) * 32, kThreads));
  dots_sum_kernel<<<sum_grid, kThreads, 0, stream>>>(part, nchunks, P, dev_out);
  OK_CUDA_CHECK(cudaGetLastError());
  OK_CUDA_CHECK(cudaMemcpyAsync(out, dev_out, static_cast<size_t>(P) * sizeof(double), cudaMemcpyDeviceToHost,
                                stream));
  OK_CUDA_CHECK(cudaStreamSynchronize(stream));  // the dots are returned in host memory
}

// ---- lincomb ----------------------------------------------------------------------------------------------

template <class T>
struct CombArgs {
  const T* v[kLbMaxVecs];
  T c[kLbMaxVecs];
  int m;
};

template <class T>
struct Pack16;  // 16 bytes of T
template <>
struct Pack16<float> {
  using type = float4;
  static constexpr int kCount = 4;
};
template <>
struct Pack16<double> {
  using type = double2;
  static constexpr int kCount = 2;
};

template <class T>
__device__ __forceinline__ T comb_at(const CombArgs<T>& A, int64_t j) {
  T acc = lb_comb_first(A.c[0], A.v[0][j]);
  for (int i = 1; i < A.m; ++i) acc = lb_comb_step(acc, A.c[i], A.v[i][j]);
  return acc;
}

template <class T, bool kPacked>
__global__ void __launch_bounds__(kThreads) lincomb_kernel(CombArgs<T> A, T* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (kPacked) {
    using P = typename Pack16<T>::type;
    constexpr int W = Pack16<T>::kCount;
    const int64_t npacks = n / W;
    for (int64_t p = tid; p < npacks; p += stride) {
      T acc[W];
      {
        const P x = reinterpret_cast<const P*>(A.v[0])[p];
        const T* xs = reinterpret_cast<const T*>(&x);
#pragma unroll
        for (int e = 0; e < W; ++e) acc[e] = lb_comb_first(A.c[0], xs[e]);
      }
      for (int i = 1; i < A.m; ++i) {
        const P x = reinterpret_cast<const P*>(A.v[i])[p];
        const T* xs = reinterpret_cast<const T*>(&x);
#pragma unroll
        for (int e = 0; e < W; ++e) acc[e] = lb_comb_step(acc[e], A.c[i], xs[e]);
      }
      P o;
      T* os = reinterpret_cast<T*>(&o);
#pragma unroll
      for (int e = 0; e < W; ++e) os[e] = acc[e];
      reinterpret_cast<P*>(out)[p] = o;
    }
    done = npacks * W;
  }
  for (int64_t j = done + tid; j < n; j += stride) out[j] = comb_at(A, j);
}

template <class T>
void lincomb_typed(const VecBatch& vecs, const std::vector<double>& coef, void* out_) {
  DeviceGuard guard(vecs.device.index);
  cudaStream_t stream = static_cast<cudaStream_t>(vecs.stream);
  CombArgs<T> A{};
  A.m = static_cast<int>(vecs.vecs.size());
  bool aligned = (reinterpret_cast<uintptr_t>(out_) & 15) == 0;
  for (int i = 0; i < A.m; ++i) {
    A.v[i] = static_cast<const T*>(vecs.vecs[static_cast<size_t>(i)]);
    A.c[i] = static_cast<T>(coef[static_cast<size_t>(i)]);
    aligned = aligned && (reinterpret_cast<uintptr_t>(A.v[i]) & 15) == 0;
  }
  T* out = static_cast<T*>(out_);
  const int64_t n = vecs.n;
  const int64_t items = aligned ? ceil_div(n, Pack16<T>::kCount) : n;
  const int64_t need = ceil_div(items, kThreads);
  const int resident = aligned ? resident_blocks_per_sm(lincomb_kernel<T, true>, kThreads)
                                : resident_blocks_per_sm(lincomb_kernel<T, false>, kThreads);
  const int64_t cap = static_cast<int64_t>(resident) * sm_count(vecs.device.index);
  const unsigned grid = static_cast<unsigned>(need < cap ? need : cap);
  if (aligned) lincomb_kernel<T, true><<<grid, kThreads, 0, stream>>>(A, out, n);
  else lincomb_kernel<T, false><<<grid, kThreads, 0, stream>>>(A, out, n);
  OK_CUDA_CHECK(cudaGetLastError());
}


// ---- NCG direction ----------------------------------------------------------------------------------------

// One chunk c: v = beta v - g (kSteepest: -g, v not read) in place, and part[c] = the chunk's v_new . g partial.
template <class T, bool kSteepest>
__device__ __forceinline__ void ncg_chunk(const T* __restrict__ g, T* __restrict__ v, T beta, int64_t n, int64_t c,
                                          double* red, double* __restrict__ part) {
  const int64_t off = c * kLbChunk;
  const LaneBlock lb(n, off);
  const int slot = lb.slot, lane = lb.lane, nblocks = lb.nblocks;
  const int64_t b0 = lb.b0, blk = lb.blk, vec = lb.vec;
  const T* gb = g + off + b0;
  T* vb = v + off + b0;
  T acc = T(0);
  double h = 0.0;
  if (blk > 0) {
#pragma unroll 4
    for (int64_t j = lane; j < vec; j += kLbLanes) {
      const T gj = gb[j];
      const T vn = kSteepest ? ncg_steepest(gj) : ncg_dir(beta, vb[j], gj);
      vb[j] = vn;
      acc = lb_dot_step(acc, vn, gj);
    }
    h = static_cast<double>(acc);
  }
  // All 32 lanes of the warp take part (both of its slots reach here together).
#pragma unroll
  for (int w = kLbLanes / 2; w >= 1; w /= 2) h += __shfl_down_sync(0xffffffffu, h, w, kLbLanes);
  if (lane == 0 && blk > 0) {
    for (int64_t j = vec; j < blk; ++j) {
      const T vn = kSteepest ? ncg_steepest(gb[j]) : ncg_dir(beta, vb[j], gb[j]);
      vb[j] = vn;
      h += static_cast<double>(lb_prod(vn, gb[j]));
    }
    red[slot] = h;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0.0;
    for (int b = 0; b < nblocks; ++b) s += red[b];
    part[c] = s;
  }
  __syncthreads();
}

template <class T, bool kSteepest>
__global__ void __launch_bounds__(kThreads) ncg_partials_kernel(const T* __restrict__ g, T* __restrict__ v, T beta,
                                                                int64_t n, int64_t nchunks, double* __restrict__ part) {
  __shared__ double red[kSlots];
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) ncg_chunk<T, kSteepest>(g, v, beta, n, c, red, part);
}

template <class T, bool kSteepest>
void ncg_launch(const T* g, T* v, T beta, int64_t n, int64_t nchunks, double* part, int device, cudaStream_t stream) {
  const int64_t cap =
      static_cast<int64_t>(resident_blocks_per_sm(ncg_partials_kernel<T, kSteepest>, kThreads)) * sm_count(device);
  const unsigned grid = static_cast<unsigned>(nchunks < cap ? nchunks : cap);
  ncg_partials_kernel<T, kSteepest><<<grid, kThreads, 0, stream>>>(g, v, beta, n, nchunks, part);
  OK_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void ncg_typed(const VecBatch& gb, void* v_, double beta, double* slope) {
  DeviceGuard guard(gb.device.index);
  cudaStream_t stream = static_cast<cudaStream_t>(gb.stream);
  const T* g = static_cast<const T*>(gb.vecs[0]);
  T* v = static_cast<T*>(v_);
  const int64_t nchunks = lb_num_chunks(gb.n);
  if (nchunks > 0x7fffffff) throw std::invalid_argument("g: too many elements for one CUDA launch");
  DeviceBuffer buf(static_cast<size_t>(nchunks + 1) * sizeof(double), stream);
  double* part = buf.as<double>();
  double* dev_out = part + nchunks;
  if (beta == 0.0) ncg_launch<T, true>(g, v, T(0), gb.n, nchunks, part, gb.device.index, stream);
  else ncg_launch<T, false>(g, v, static_cast<T>(beta), gb.n, nchunks, part, gb.device.index, stream);
  dots_sum_kernel<<<1, kThreads, 0, stream>>>(part, nchunks, 1, dev_out);
  OK_CUDA_CHECK(cudaGetLastError());
  OK_CUDA_CHECK(cudaMemcpyAsync(slope, dev_out, sizeof(double), cudaMemcpyDeviceToHost, stream));
  OK_CUDA_CHECK(cudaStreamSynchronize(stream));  // the slope is returned in host memory
}

}  // namespace

void lbfgs_dots(const VecBatch& stored, const VecBatch& queries, double* out) {
  if (stored.dtype == DType::f32) dots_typed<float>(stored, queries, out);
  else dots_typed<double>(stored, queries, out);
}

void lbfgs_lincomb(const VecBatch& vecs, const std::vector<double>& coef, void* out) {
  if (vecs.dtype == DType::f32) lincomb_typed<float>(vecs, coef, out);
  else lincomb_typed<double>(vecs, coef, out);
}

void ncg_direction(const VecBatch& g, void* v, double beta, double* slope) {
  if (g.dtype == DType::f32) ncg_typed<float>(g, v, beta, slope);
  else ncg_typed<double>(g, v, beta, slope);
}

}  // namespace cuda_exec
}  // namespace optkern
