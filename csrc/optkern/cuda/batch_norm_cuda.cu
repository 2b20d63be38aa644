// CUDA executor for batch norm: the rules of batch_norm_rules.h over dense (outer, channels, inner) tensors.
//
// Every op is at most three stream-ordered launches, each thin:
//  1. a reduction kernel that walks the host plan (bn_plan) and writes per-unit partials to scratch, each
//     computed as the CPU executor computes it, in the CPU's order:
//     - channels-first (inner >= kBnMinInner, e.g. NCHW): a unit is at most kBnChunk contiguous values of one
//       run (n, c), cut into lane blocks of 1024 values (the last shorter: blk values, vec = blk / 64 * 64).
//       A lane block is served by 16 threads with four T accumulators each: the CPU's 64 lanes (value j < vec
//       to lane j % 64, thread j % 16, accumulator j % 64 / 16).  A lane block's total is the CPU's lanes_sum:
//       the four accumulators added as (0 + 1) + (2 + 3) in T, widened to double, the 16 lanes added as the
//       fixed tree 8 + 8, 4 + 4, 2 + 2, 1 + 1 (shuffles), then the tail [vec, blk) in double, in order.
//       Statistics (two sweeps per lane block): K = T(total of x / blk); then the totals b1, b2 of d = x - K
//       and d^2 (tail: d = double(x - K)) give the block's (mean, m2) = bn_shifted_to_moments(blk, K, b1, b2);
//       the unit's lane blocks are combined in order as shifted sums around the first block's mean (the
//       CPU's run_moments), and the unit partial is (n, mean, m2).  Gradient sums (one sweep): the lane
//       blocks' totals added in double in order; the unit partial is (n, sum dy, sum dy (x - mean)).
//       A CUDA block of 256 threads holds 16 lane blocks: one unit of up to 16384 values, or several shorter
//       units side by side.
//     - rows (small inner, e.g. (N, C) and channels-last NHWC): the plan's row blocks of 64 rows (4 slices of
//       16) and row groups of `group` blocks.  One thread per (slice, column group of P = 16 / sizeof(T)
//       adjacent columns) walks its P columns down the slice's rows in T, in row order, with one 16-byte load
//       per row when every row of every array is 16-byte aligned (scalar loads otherwise: the same values, the
//       same order).  The slices' sums meet in shared memory and are added as the CPU adds them
//       (bn_slices_sum).  Statistics: sweep 1 sums x, K = bn_block_shift(block sum); sweep 2 sums d = x - K and
//       d^2.  Gradient sums: the two sums in one sweep.  One thread per (group, column) then folds the group's
//       blocks in order (bn_group_add, as the CPU's rows_reduce does) into the group partial (mean, m2) or
//       (sum, sum), its count implied by the group.  (12544, 256) float32 runs 784 slices x 64 = 50k threads,
//       (32 * 56 * 56, 64) 6272 x 16 = 100k threads, each moving 16 bytes per load.
//  2. a per-channel kernel (one warp per channel when it folds partials) that folds the channel's partials in
//     the plan's fixed order (channels-first: units u = n kc + k in order; rows: group by group, column by
//     column) exactly as the CPU's Acc / acc_add does: moments as shifted sums around the first partial's
//     mean (mean = K + a / n, m2 = max(b - a^2 / n, 0)), gradient sums added.  It then applies the
//     per-channel rules: moments, invstd, the running-stat update (over the fold's count), weight gradients,
//     and the per-channel coefficients of the elementwise pass (written to scratch).
//  3. a grid-stride elementwise kernel (normalize, grad input, or dx = a dy) that reads the coefficients
//     (16-byte aligned structs); the channel of each element is tracked incrementally (no division per
//     element), with 16-byte loads when every array is aligned.  With inner == 1 ((N, C), channels-last) the
//     grid stride is a multiple of C, so a thread's channels never change and it loads its coefficients once.
//     Channels-last needs no transpose.
// Grids are sized from the kernels' occupancy (cudaOccupancyMaxActiveBlocksPerMultiprocessor) and the SM count.
// No floating-point atomics and no order that depends on the grid: results are the same run to run, and every
// value is computed with the CPU executor's operations in its order (the GPU is built with --fmad=false, the
// CPU with -ffp-contract=off).  Scratch is owned (DeviceBuffer: stream-ordered, from optkern's pool, freed also
// when a later call throws), every CUDA call and launch is checked, a failure throws, and nothing falls back to
// the CPU.  No call synchronizes the stream.
// 16-bit x / dy / outputs (bfloat16, float16, with float32 parameters and running statistics): the kernels are
// instantiated on a storage type S (Bf16, F16: the 16-bit bits) whose compute type is float; every element is
// loaded with precision.h's exact conversion and every y / dx element stored rounded to nearest-even (ld / st
// below), so the sums, their order and the coefficients are the float32 path's (16-byte packs hold 8 values).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../batch_norm_executors.h"
#include "../batch_norm_rules.h"
#include "../precision.h"
#include "cuda_util.cuh"

namespace optkern {
namespace cuda_exec {
namespace {

constexpr int kThreads = 256;            // reduction (channels-first) and elementwise blocks
constexpr int kRowThreads = 256;         // rows reduction blocks: whole row groups (up to 4 blocks x 4 slices) x column groups
constexpr int kChanThreads = 128;        // per-channel kernels (4 warps = 4 channels when adding partials)
constexpr int kLanes = 16;               // threads per lane block (the CPU executor's 16-lane vectors)
constexpr int kAcc = 4;                  // accumulators per thread (the CPU's four 16-lane accumulators)
constexpr int kWide = kAcc * kLanes;     // accumulator lanes per lane block: value j < vec goes to lane j % 64
constexpr int64_t kLaneBlock = 1024;     // values summed in T lanes before the lane sums are added in double
constexpr int kSlots = kThreads / kLanes;  // lane blocks per CUDA block
constexpr int kMaxShards = 256;          // shard counts passed per bn_combine launch (kernel parameters)
static_assert(kBnChunk <= kSlots * kLaneBlock, "a channels-first unit must fit one CUDA block");
static_assert(kThreads % 32 == 0 && kChanThreads % 32 == 0, "whole warps");

__host__ __device__ inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- the load/store layer: storage type S, compute type Compute<S> ---------------------------------------------
struct Bf16 {
  uint16_t u;
};
struct F16 {
  uint16_t u;
};
template <class S>
struct Elem {  // float32 and float64: stored as computed
  using T = S;
  __device__ __forceinline__ static T load(S v) { return v; }
  __device__ __forceinline__ static S store(T v) { return v; }
};
template <>
struct Elem<Bf16> {
  using T = float;
  __device__ __forceinline__ static T load(Bf16 v) { return bf16_to_f32(v.u); }
  __device__ __forceinline__ static Bf16 store(T v) { return Bf16{f32_to_bf16_rne(v)}; }
};
template <>
struct Elem<F16> {
  using T = float;
  __device__ __forceinline__ static T load(F16 v) { return f16_to_f32(v.u); }
  __device__ __forceinline__ static F16 store(T v) { return F16{f32_to_f16_rne(v)}; }
};
template <class S>
using Compute = typename Elem<S>::T;
template <class S>
__device__ __forceinline__ Compute<S> ld(S v) {
  return Elem<S>::load(v);
}
template <class S>
__device__ __forceinline__ S st(Compute<S> v) {
  return Elem<S>::store(v);
}

// ---- host helpers ---------------------------------------------------------------------------------------------


// Grid for a grid-stride kernel over `work` items of `per_block` each: enough blocks to fill the device (the SM
// count times the kernel's resident blocks per SM), no more than the work needs.
unsigned grid_for(int64_t work, int64_t per_block, int sms, int blocks_per_sm) {
  const int64_t need = ceil_div(work, per_block);
  return static_cast<unsigned>(imin(need, static_cast<int64_t>(sms) * blocks_per_sm));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- per-channel arguments (device pointers; null = not wanted) ---------------------------------------------

template <class T>
struct ChanArgs {
  int64_t C = 0;
  const T* weight = nullptr;
  const T* bias = nullptr;
  T* running_mean = nullptr;
  T* running_var = nullptr;
  T* dweight = nullptr;
  T* dbias = nullptr;
  double* mean = nullptr;
  double* invstd = nullptr;
  double* m2 = nullptr;
  double* sum_dy = nullptr;
  double* sum_dy_xmu = nullptr;
  double eps = 0.0, factor = 0.0;
  double count = 0.0;              // values per channel for this op's rules
  BnNormCoef<T>* norm = nullptr;   // out: forward coefficients
  BnGradCoef<T>* grad = nullptr;   // out: backward coefficients
  __device__ double gamma(int64_t c) const { return weight ? static_cast<double>(weight[c]) : 1.0; }
  __device__ double beta(int64_t c) const { return bias ? static_cast<double>(bias[c]) : 0.0; }
};

template <class T>
ChanArgs<T> chan_args(const BnArgs& a, double count) {
  ChanArgs<T> A;
  A.C = a.shape.channels;
  A.weight = static_cast<const T*>(a.weight);
  A.bias = static_cast<const T*>(a.bias);
  A.running_mean = static_cast<T*>(a.running_mean);
  A.running_var = static_cast<T*>(a.running_var);
  A.dweight = static_cast<T*>(a.dweight);
  A.dbias = static_cast<T*>(a.dbias);
  A.mean = a.mean;
  A.invstd = a.invstd;
  A.m2 = a.m2;
  A.sum_dy = a.sum_dy;
  A.sum_dy_xmu = a.sum_dy_xmu;
  A.eps = a.eps;
  A.factor = a.factor;
  A.count = count;
  return A;
}

int64_t global_count(const BnArgs& a) { return a.count > 0 ? a.count : a.shape.count(); }

// Forward finalisation of channel c from (mean, m2) over `count` values: invstd, running stats, coefficients.
template <class T>
__device__ void finish_forward(const ChanArgs<T>& A, int64_t c, double mean, double m2, double count) {
  const double invstd = bn_invstd(m2, count, A.eps);
  if (A.invstd) A.invstd[c] = invstd;
  if (A.running_mean) bn_update_running<T>(A.running_mean + c, A.running_var + c, mean, m2, count, A.factor);
  A.norm[c] = bn_norm_coef<T>(mean, invstd, A.gamma(c), A.beta(c));
}

// Backward finalisation of channel c from its gradient sums: the sums (when wanted), weight gradients (when
// wanted) and the training coefficients (when A.grad).
template <class T>
__device__ void finish_grad(const ChanArgs<T>& A, int64_t c, double sum_dy, double sum_dy_xmu) {
  if (A.sum_dy) A.sum_dy[c] = sum_dy;
  if (A.sum_dy_xmu) A.sum_dy_xmu[c] = sum_dy_xmu;
  if (A.dweight) A.dweight[c] = static_cast<T>(bn_grad_weight(A.invstd[c], sum_dy_xmu));
  if (A.dbias) A.dbias[c] = static_cast<T>(sum_dy);
  if (A.grad)
    A.grad[c] = bn_grad_coef_train<T>(A.count, A.mean[c], A.invstd[c], A.gamma(c), sum_dy, sum_dy_xmu);
}

// Partials are combined with BnAcc (batch_norm_rules.h), the same code as the CPU's, in the CPU's order.
using Acc = BnAcc;
template <bool kMoments>
__device__ __forceinline__ void acc_add(Acc* t, double n, double a, double b) {
  t->add<kMoments>(n, a, b);
}

// ---- reductions ---------------------------------------------------------------------------------------------
// Kind 0: moments (n, mean, m2) from per-lane-block two-sweep shifted sums.
// Kind 1: gradient sums (dy, dy (x - mean)); with dx non-null also dx = a dy (eval backward, a = gamma invstd).

template <class S>
struct ReduceIn {
  using T = Compute<S>;
  const S* x = nullptr;
  const S* dy = nullptr;
  S* dx = nullptr;
  const double* mean = nullptr;
  const double* invstd = nullptr;
  const T* weight = nullptr;
  int64_t C = 0, inner = 0;
};

template <class T>
struct GradRunCoef {
  T k0, k1, a;  // mean_hi, mean_lo and (with dx) a
};

template <class S, class T = Compute<S>>
__device__ __forceinline__ GradRunCoef<T> grad_run_coef(const ReduceIn<S>& in, int64_t c) {
  GradRunCoef<T> r{T(0), T(0), T(0)};
  if (in.dx != nullptr) {
    const double gamma = in.weight ? static_cast<double>(in.weight[c]) : 1.0;
    const BnGradCoef<T> k = bn_grad_coef_eval<T>(in.mean[c], in.invstd[c], gamma);
    r.k0 = k.mean_hi;
    r.k1 = k.mean_lo;
    r.a = k.a;
  } else {
    const BnNormCoef<T> k = bn_norm_coef<T>(in.mean[c], 1.0, 1.0, 0.0);
    r.k0 = k.mean_hi;
    r.k1 = k.mean_lo;
  }
  return r;
}

// Channels-first geometry.  Unit g (0 <= g < total) is (c, u) = (g / units, g % units), u = n kc + k: the
// values [(n C + c) inner + k kBnChunk, + len).  A unit spans up to `lbp` lane blocks (a power of two); a CUDA
// block holds `upb` = kSlots / lbp units, each served by tpu = kLanes lbp threads (kLanes per lane block).
// The grid steps `step` units at a time; step's digits (sc, sn, sk) let a cursor advance without division.
struct CfGeom {
  int64_t C = 0, outer = 0, inner = 0, kc = 0, units = 0, total = 0;
  int lbp = 1, tpu = kLanes, upb = kSlots;
  int64_t step = 0, sc = 0, sn = 0, sk = 0;  // step = sc units + sn kc + sk
};

struct Unit {
  int64_t c, offset, len;
};

// A unit index as its digits (c, n, k): divided out once per thread, then advanced by the grid step with
// additions and carries only (sk < kc and sn < outer, so one subtraction per digit suffices).
struct UnitCursor {
  int64_t g, c, n, k;
  __device__ __forceinline__ void init(const CfGeom& G, int64_t gu) {
    g = gu;
    c = gu / G.units;
    const int64_t u = gu - c * G.units;
    n = u / G.kc;
    k = u - n * G.kc;
  }
  __device__ __forceinline__ void advance(const CfGeom& G) {
    g += G.step;
    k += G.sk;
    int64_t carry = 0;
    if (k >= G.kc) {
      k -= G.kc;
      carry = 1;
    }
    n += G.sn + carry;
    if (n >= G.outer) {
      n -= G.outer;
      c += 1;
    }
    c += G.sc;
  }
  __device__ __forceinline__ Unit unit(const CfGeom& G) const {
    const int64_t begin = k * kBnChunk;
    return Unit{c, (n * G.C + c) * G.inner + begin, imin(kBnChunk, G.inner - begin)};
  }
};

// A lane block of blk values is served by the kLanes threads of one 16-thread group (lane = thread % 16).  The
// CPU's 64 accumulator lanes (value j < vec to lane j % 64, vec = blk / 64 * 64) are split as its 16-lane
// vectors are: thread `lane` holds accumulators k = 0..3 for the values j + 16 k + lane, j = 0, 64, ...
// The CPU's lanes_sum: the four accumulators added pairwise in T, (v0 + v1) + (v2 + v3), widened to double, then
// the 16 lanes added as the fixed tree h[l] += h[l + w], w = 8, 4, 2, 1 (shuffles inside the group; the whole
// warp calls it).  Lane 0 of the group ends with the total.
template <class T>
__device__ __forceinline__ double lanes_sum(const T* v) {
  double h = static_cast<double>((v[0] + v[1]) + (v[2] + v[3]));
#pragma unroll
  for (int w = kLanes / 2; w >= 1; w /= 2) h += __shfl_down_sync(0xffffffffu, h, w, kLanes);
  return h;
}

// Kind 0, one lane block (blk may be 0 for an idle group: then nothing is read and the results are unused).
// Sweep 1: rough = lanes_sum of the values, then the tail values [vec, blk) in double, in order (lane 0);
// K = T(rough / blk), broadcast to the group.  Sweep 2: the lanes accumulate d = x - K, d^2 in T; b1, b2 =
// lanes_sum, then the tail's d = double(x - K) and d^2 in order (lane 0); lane 0 ends with the block's
// (mean, m2) = bn_shifted_to_moments(blk, K, b1, b2).
template <class S, class T = Compute<S>>
__device__ __forceinline__ void lane_block_moments(const S* __restrict p, int64_t blk, int lane, double* mean,
                                                   double* m2) {
  const int64_t vec = blk / kWide * kWide;
  T s[kAcc] = {T(0), T(0), T(0), T(0)};
  for (int64_t j = 0; j < vec; j += kWide) {
#pragma unroll
    for (int k = 0; k < kAcc; ++k) s[k] += ld(p[j + k * kLanes + lane]);
  }
  double rough = lanes_sum<T>(s);
  T K = T(0);
  if (lane == 0 && blk > 0) {
    for (int64_t j = vec; j < blk; ++j) rough += static_cast<double>(ld(p[j]));
    K = static_cast<T>(rough / static_cast<double>(blk));
  }
  K = __shfl_sync(0xffffffffu, K, 0, kLanes);
  T a1[kAcc] = {T(0), T(0), T(0), T(0)}, a2[kAcc] = {T(0), T(0), T(0), T(0)};
  for (int64_t j = 0; j < vec; j += kWide) {
#pragma unroll
    for (int k = 0; k < kAcc; ++k) {
      const T d = ld(p[j + k * kLanes + lane]) - K;
      a1[k] += d;
      a2[k] += d * d;
    }
  }
  double b1 = lanes_sum<T>(a1), b2 = lanes_sum<T>(a2);
  *mean = 0.0;
  *m2 = 0.0;
  if (lane == 0 && blk > 0) {
    for (int64_t j = vec; j < blk; ++j) {
      const double d = static_cast<double>(ld(p[j]) - K);
      b1 += d;
      b2 += d * d;
    }
    bn_shifted_to_moments(static_cast<double>(blk), static_cast<double>(K), b1, b2, mean, m2);
  }
}

// Kind 1, one lane block (same lanes as above, one sweep): lane 0 ends with the block's (sum dy, sum dy (x -
// mean)): the lanes_sum of the T lanes, then the tail's terms in double, in order.
template <class S, class T = Compute<S>>
__device__ __forceinline__ void lane_block_grad_sums(const ReduceIn<S>& in, int64_t off, int64_t blk, int lane,
                                                     const GradRunCoef<T>& k, double* s1, double* s2) {
  const int64_t vec = blk / kWide * kWide;
  const S* p = in.x + off;
  const S* g = in.dy + off;
  S* o = in.dx != nullptr ? in.dx + off : nullptr;
  T a1[kAcc] = {T(0), T(0), T(0), T(0)}, a2[kAcc] = {T(0), T(0), T(0), T(0)};
  for (int64_t j = 0; j < vec; j += kWide) {
#pragma unroll
    for (int q = 0; q < kAcc; ++q) {
      const int64_t m = j + q * kLanes + lane;
      const T d = ld(g[m]);
      if (o) o[m] = st<S>(k.a * d);
      a1[q] += d;
      a2[q] += d * bn_center(ld(p[m]), k.k0, k.k1);
    }
  }
  double b1 = lanes_sum<T>(a1), b2 = lanes_sum<T>(a2);
  if (lane == 0) {
    for (int64_t m = vec; m < blk; ++m) {
      const T d = ld(g[m]);
      if (o) o[m] = st<S>(k.a * d);
      b1 += static_cast<double>(d);
      b2 += static_cast<double>(d * bn_center(ld(p[m]), k.k0, k.k1));
    }
  }
  *s1 = b1;
  *s2 = b2;
}

// Channels-first: partial[3 gu + {0, 1, 2}] = unit gu's (n, mean, m2) (Kind 0, its lane blocks combined in
// order as the CPU's run_moments does) or (n, sum dy, sum dy (x - mean)) (Kind 1, lane-block sums added in
// order).  Grid-stride over groups of upb units; every thread of the block runs every group (the lane sums
// shuffle within whole warps).
template <class S, int Kind>
__global__ void __launch_bounds__(kThreads) cf_reduce_kernel(CfGeom g, ReduceIn<S> in, double* partial) {
  using T = Compute<S>;
  __shared__ double blk1[kSlots], blk2[kSlots];
  const int t = static_cast<int>(threadIdx.x);
  const int slot = t / g.tpu, lb = (t % g.tpu) / kLanes, lane = t % kLanes, q = t / kLanes;
  // Cursors on unit first + slot (step 1) and unit first + t (step 2), advanced by the grid step g.step.
  UnitCursor u1, u2;
  u1.init(g, static_cast<int64_t>(blockIdx.x) * g.upb + slot);
  u2.init(g, static_cast<int64_t>(blockIdx.x) * g.upb + t);
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * g.upb; first < g.total;
       first += g.step, u1.advance(g), u2.advance(g)) {
    // 1. Each 16-thread group: lane block lb of unit `slot` (blk = 0 past the unit's end or the last unit).
    {
      const int64_t gu = u1.g;
      int64_t off = 0, blk = 0, c = 0;
      if (gu < g.total) {
        const Unit u = u1.unit(g);
        const int64_t begin = lb * kLaneBlock;
        c = u.c;
        if (begin < u.len) {
          off = u.offset + begin;
          blk = imin(kLaneBlock, u.len - begin);
        }
      }
      double b1, b2;
      if constexpr (Kind == 0) {
        lane_block_moments<S>(in.x + off, blk, lane, &b1, &b2);
      } else {
        GradRunCoef<T> k{T(0), T(0), T(0)};
        if (blk > 0) k = grad_run_coef<S>(in, c);
        lane_block_grad_sums<S>(in, off, blk, lane, k, &b1, &b2);
      }
      if (lane == 0) {
        blk1[q] = b1;
        blk2[q] = b2;
      }
    }
    __syncthreads();
    // 2. Thread s < upb: unit s's lane blocks, in order.
    if (t < g.upb) {
      const int64_t gu = u2.g;
      if (gu < g.total) {
        const Unit u = u2.unit(g);
        const int64_t nlb = (u.len + kLaneBlock - 1) / kLaneBlock;
        double* out = partial + 3 * gu;
        if constexpr (Kind == 0) {
          double cn = 0.0, ca = 0.0, cb = 0.0, cK = 0.0;
          for (int64_t j = 0; j < nlb; ++j) {
            const double nb = static_cast<double>(imin(kLaneBlock, u.len - j * kLaneBlock));
            const double mean = blk1[t * g.lbp + j], m2 = blk2[t * g.lbp + j];
            if (cn == 0.0) cK = mean;
            const double d = mean - cK;
            cn += nb;
            ca += nb * d;
            cb += m2 + nb * d * d;
          }
          const double mean = cn > 0.0 ? cK + ca / cn : 0.0, m2 = cn > 0.0 ? cb - ca * (ca / cn) : 0.0;
          out[0] = cn;
          out[1] = mean;
          out[2] = m2 > 0.0 ? m2 : 0.0;
        } else {
          double s1 = 0.0, s2 = 0.0;
          for (int64_t j = 0; j < nlb; ++j) {
            s1 += blk1[t * g.lbp + j];
            s2 += blk2[t * g.lbp + j];
          }
          out[0] = static_cast<double>(u.len);
          out[1] = s1;
          out[2] = s2;
        }
      }
    }
    __syncthreads();  // the shared arrays are reused by the next group
  }
}

// 16-byte packs of P = 16 / sizeof(S) stored values (rows reduction and elementwise kernels).
template <class T, int P>
struct alignas(sizeof(T) * P) Vec {
  T v[P];
};

template <class T, int P>
__device__ __forceinline__ Vec<T, P> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, P>*>(p);
}
template <class T, int P>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, P>& v) {
  *reinterpret_cast<Vec<T, P>*>(p) = v;
}

// Rows geometry (host-computed from the plan).  Column group q is the P columns [q P, q P + P) (the last one may
// be cut by the width); a tile is one row group x tc column groups, served by group x 4 x tc threads: thread
// (rbi, q, cgl) of a tile takes slice q (16 rows) of row block rbi of the group, for column group cgl of the
// tile.  A CUDA block holds tpb tiles.
constexpr int kRowSlices = static_cast<int>(kBnRowBlock / kBnRowSlice);
static_assert(kRowSlices == 4, "bn_slices_sum adds four slices");
struct RowGeom {
  int64_t rows = 0, width = 0, row_block = 0, nblocks = 0, group = 1, ngroups = 0;
  int64_t ntc = 0;    // tiles across the width
  int64_t tiles = 0;  // ngroups x ntc
  int tc = 1;         // column groups per tile (a power of two; tc x 4 x group <= kRowThreads)
  int tpb = 1;        // tiles per CUDA block: kRowThreads / (tc x 4 x group)
  bool vec = false;   // 16-byte loads: every row of every array read or written is 16-byte aligned
};

// The P values of row r of `base` at columns [j0, j0 + P): one 16-byte load, or scalar loads of the m columns
// inside the width (zeros past it, never used).
template <class S, int P, class T = Compute<S>>
__device__ __forceinline__ void load_cols(const S* base, const RowGeom& g, int64_t r, int64_t j0, int m, T* v) {
  const S* p = base + r * g.width + j0;
  if (g.vec) {
    const Vec<S, P> u = load_vec<S, P>(p);
#pragma unroll
    for (int l = 0; l < P; ++l) v[l] = ld(u.v[l]);
  } else {
#pragma unroll
    for (int l = 0; l < P; ++l) v[l] = l < m ? ld(p[l]) : T(0);
  }
}

template <class S, int P, class T = Compute<S>>
__device__ __forceinline__ void store_cols(S* base, const RowGeom& g, int64_t r, int64_t j0, int m, const T* v) {
  S* p = base + r * g.width + j0;
  if (g.vec) {
    Vec<S, P> u;
#pragma unroll
    for (int l = 0; l < P; ++l) u.v[l] = st<S>(v[l]);
    store_vec<S, P>(p, u);
  } else {
#pragma unroll
    for (int l = 0; l < P; ++l)
      if (l < m) p[l] = st<S>(v[l]);
  }
}

// Shared index of slice q of block k of tile tl, column cl of the tile (cols = tc P columns per tile): the slot
// of thread ((tl group + k) 4 + q) tc + cl / P, value cl % P.
__device__ __forceinline__ int slice_slot(int tl, int k, int q, int cl, int group, int cols) {
  return ((tl * group + k) * kRowSlices + q) * cols + cl;
}

// Rows: group partials partial[2 grp W + col] and partial[(2 grp + 1) W + col], each sum as the CPU's rows_sums
// and rows_reduce take it.  Each thread walks its slice's rows for its P columns in T, in row order (16-byte loads
// when g.vec), and leaves its slice sums in shared memory.  Kind 0: sweep 1 sums x; every thread then takes its
// block's K = bn_block_shift(bn_slices_sum(the 4 slices), nr); sweep 2 sums d = x - K and d^2.  Kind 1: sum dy and
// sum dy (x - mean) in one sweep, with dx = a dy written when in.dx is set.  Then one thread per (tile, column)
// folds the group's blocks in block order: bn_slices_sum of the slices, widened, bn_group_add then
// bn_group_moments (Kind 0), or added from 0 (Kind 1).  Grid-stride over sets of tpb tiles; every thread runs
// every set (the block synchronizes between the steps).
template <class S, int Kind>
__global__ void __launch_bounds__(kRowThreads) rows_reduce_kernel(RowGeom g, ReduceIn<S> in, double* partial) {
  using T = Compute<S>;
  constexpr int P = 16 / static_cast<int>(sizeof(S));
  __shared__ T shS[Kind == 0 ? kRowThreads * P : 1], shA[kRowThreads * P], shB[kRowThreads * P];
  const int t = static_cast<int>(threadIdx.x);
  const int G = static_cast<int>(g.group);
  const int cols = g.tc * P;  // columns per tile
  const int tile_threads = g.tc * kRowSlices * G;
  const int tl = t / tile_threads, rbi = (t / (g.tc * kRowSlices)) % G, q = (t / g.tc) % kRowSlices;
  const int cgl = t % g.tc;
  const int nfold = g.tpb * cols;  // fold tasks per set of tiles
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * g.tpb; first < g.tiles;
       first += static_cast<int64_t>(gridDim.x) * g.tpb) {
    // 1. This thread's slice: rows [lo, hi) of block b, columns [j0, j0 + m).
    int64_t lo = 0, hi = 0, j0 = 0, nr = 0;
    const int64_t tile = first + tl;
    if (tl < g.tpb && tile < g.tiles) {
      const int64_t grp = tile / g.ntc, ct = tile - grp * g.ntc;
      const int64_t b = grp * g.group + rbi;
      j0 = (ct * g.tc + cgl) * P;
      if (b < g.nblocks && j0 < g.width) {
        const int64_t r0 = b * g.row_block, r1 = imin(g.rows, r0 + g.row_block);
        nr = r1 - r0;
        lo = imin(r1, r0 + q * kBnRowSlice);
        hi = imin(r1, lo + kBnRowSlice);
      }
    }
    const int m = static_cast<int>(imin(P, g.width - j0));
    T v[P], a1[P], a2[P];
#pragma unroll
    for (int l = 0; l < P; ++l) a1[l] = a2[l] = T(0);
    if constexpr (Kind == 0) {
#pragma unroll 4
      for (int64_t r = lo; r < hi; ++r) {
        load_cols<S, P>(in.x, g, r, j0, m, v);
#pragma unroll
        for (int l = 0; l < P; ++l) a1[l] += v[l];
      }
#pragma unroll
      for (int l = 0; l < P; ++l) shS[t * P + l] = a1[l];
      __syncthreads();
      T K[P];
      const int s0 = t - q * g.tc;  // this block's slice 0 (same column group)
#pragma unroll
      for (int l = 0; l < P; ++l) {
        const T tot = bn_slices_sum<T>(shS[s0 * P + l], shS[(s0 + g.tc) * P + l], shS[(s0 + 2 * g.tc) * P + l],
                                       shS[(s0 + 3 * g.tc) * P + l]);
        K[l] = nr > 0 ? bn_block_shift<T>(tot, static_cast<double>(nr)) : T(0);
        a1[l] = a2[l] = T(0);
      }
#pragma unroll 4
      for (int64_t r = lo; r < hi; ++r) {
        load_cols<S, P>(in.x, g, r, j0, m, v);
#pragma unroll
        for (int l = 0; l < P; ++l) {
          const T d = v[l] - K[l];
          a1[l] += d;
          a2[l] += d * d;
        }
      }
    } else {
      GradRunCoef<T> k[P];
#pragma unroll
      for (int l = 0; l < P; ++l) {
        k[l] = GradRunCoef<T>{T(0), T(0), T(0)};
        if (l < m && hi > lo) k[l] = grad_run_coef<S>(in, in.inner == 1 ? j0 + l : (j0 + l) / in.inner);
      }
      T d[P], o[P];
#pragma unroll 4
      for (int64_t r = lo; r < hi; ++r) {
        load_cols<S, P>(in.dy, g, r, j0, m, d);
        load_cols<S, P>(in.x, g, r, j0, m, v);
        if (in.dx != nullptr) {
#pragma unroll
          for (int l = 0; l < P; ++l) o[l] = k[l].a * d[l];
          store_cols<S, P>(in.dx, g, r, j0, m, o);
        }
#pragma unroll
        for (int l = 0; l < P; ++l) {
          a1[l] += d[l];
          a2[l] += d[l] * bn_center(v[l], k[l].k0, k[l].k1);
        }
      }
    }
#pragma unroll
    for (int l = 0; l < P; ++l) {
      shA[t * P + l] = a1[l];
      shB[t * P + l] = a2[l];
    }
    __syncthreads();
    // 2. One thread per (tile, column): the group's blocks in order.
    for (int f = t; f < nfold; f += kRowThreads) {
      const int ftl = f / cols, cl = f - ftl * cols;
      const int64_t ftile = first + ftl;
      if (ftile >= g.tiles) continue;
      const int64_t grp = ftile / g.ntc, ct = ftile - grp * g.ntc;
      const int64_t col = ct * cols + cl;
      if (col >= g.width) continue;
      const int64_t b0 = grp * g.group;
      const int nb = static_cast<int>(imin(g.group, g.nblocks - b0));
      double n = 0.0, Gs = 0.0, a = 0.0, b = 0.0;
      for (int k = 0; k < nb; ++k) {
        const int64_t r0 = (b0 + k) * g.row_block;
        const double nrk = static_cast<double>(imin(g.rows, r0 + g.row_block) - r0);
        const int i0 = slice_slot(ftl, k, 0, cl, G, cols), di = cols;  // slice q at i0 + q di
        const T A = bn_slices_sum<T>(shA[i0], shA[i0 + di], shA[i0 + 2 * di], shA[i0 + 3 * di]);
        const T B = bn_slices_sum<T>(shB[i0], shB[i0 + di], shB[i0 + 2 * di], shB[i0 + 3 * di]);
        if constexpr (Kind == 0) {
          const T K = bn_block_shift<T>(bn_slices_sum<T>(shS[i0], shS[i0 + di], shS[i0 + 2 * di], shS[i0 + 3 * di]),
                                        nrk);
          if (k == 0) Gs = static_cast<double>(K);
          bn_group_add(nrk, static_cast<double>(K), static_cast<double>(A), static_cast<double>(B), Gs, &a, &b);
        } else {
          a = a + static_cast<double>(A);
          b = b + static_cast<double>(B);
        }
        n += nrk;
      }
      double* out = partial + 2 * grp * g.width + col;
      if constexpr (Kind == 0) {
        bn_group_moments(n, Gs, a, b, &out[0], &out[g.width]);
      } else {
        out[0] = a;
        out[g.width] = b;
      }
    }
    __syncthreads();  // the shared arrays are reused by the next set
  }
}

// Where channel c's partials are, in the order they are combined (the plan's fixed order), each as (n, a, b).
struct Partials {
  const double* p = nullptr;
  int64_t per_channel = 0;               // partials per channel
  bool rows = false;
  int64_t width = 0, inner = 0;          // rows: partial k = (group k / inner, column c inner + k % inner)
  int64_t nrows = 0, group_rows = 0;     // rows: group g covers rows [g group_rows, min(nrows, (g + 1) group_rows))
  __device__ __forceinline__ void load(int64_t c, int64_t k, double* n, double* a, double* b) const {
    if (rows) {
      const int64_t grp = inner == 1 ? k : k / inner, i = k - grp * inner;
      const double* q = p + 2 * grp * width + c * inner + i;
      *n = static_cast<double>(imin(nrows, (grp + 1) * group_rows) - grp * group_rows);
      *a = q[0];
      *b = q[width];
    } else {
      const double* q = p + 3 * (c * per_channel + k);
      *n = q[0];
      *a = q[1];
      *b = q[2];
    }
  }
};

// The whole warp folds channel c's partials strictly in order (every lane ends with the same value): the lanes
// load 32 partials at a time (coalesced, in flight together) and every lane takes them by shuffle, one by one,
// into its Acc: the CPU's sequential acc_add, in the CPU's order.
template <bool kMoments>
__device__ __forceinline__ Acc ordered_channel_fold(const Partials& P, int64_t c) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  Acc t;
  for (int64_t base = 0; base < P.per_channel; base += 32) {
    double vn = 0.0, va = 0.0, vb = 0.0;
    if (base + lane < P.per_channel) P.load(c, base + lane, &vn, &va, &vb);
    const int m = static_cast<int>(imin(32, P.per_channel - base));
    for (int k = 0; k < m; ++k) {
      const double n = __shfl_sync(0xffffffffu, vn, k);
      const double a = __shfl_sync(0xffffffffu, va, k);
      const double b = __shfl_sync(0xffffffffu, vb, k);
      acc_add<kMoments>(&t, n, a, b);
    }
  }
  return t;
}

__device__ __forceinline__ int64_t warp_channel() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
}
__device__ __forceinline__ int64_t thread_channel() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// ---- per-channel kernels ------------------------------------------------------------------------------------

// Moments -> mean, m2; with A.norm also the forward finalisation over the channel's count (the fold's n, which
// is shape.count()).
template <class T>
__global__ void __launch_bounds__(kChanThreads) stats_finish_kernel(Partials P, ChanArgs<T> A) {
  const int64_t c = warp_channel();
  if (c >= A.C) return;  // whole warps
  const Acc t = ordered_channel_fold<true>(P, c);
  if (threadIdx.x % 32 != 0) return;
  const double mean = t.mean(), m2 = t.m2();
  if (A.mean) A.mean[c] = mean;
  if (A.m2) A.m2[c] = m2;
  if (A.norm) finish_forward(A, c, mean, m2, t.n);
}

// Gradient sums -> finish_grad (which outputs are written is set by the host through A's pointers).
template <class T>
__global__ void __launch_bounds__(kChanThreads) grad_finish_kernel(Partials P, ChanArgs<T> A) {
  const int64_t c = warp_channel();
  if (c >= A.C) return;
  const Acc t = ordered_channel_fold<false>(P, c);
  if (threadIdx.x % 32 == 0) finish_grad(A, c, t.a, t.b);
}

// Staged normalize: invstd from the combined (mean, m2) over A.count values, running stats, coefficients.
template <class T>
__global__ void __launch_bounds__(kChanThreads) normalize_coef_kernel(ChanArgs<T> A) {
  const int64_t c = thread_channel();
  if (c < A.C) finish_forward(A, c, A.mean[c], A.m2[c], A.count);
}

// Eval forward: mean = running_mean, invstd = 1 / sqrt(running_var + eps) (bn_invstd with count 1), coefficients.
template <class T>
__global__ void __launch_bounds__(kChanThreads) eval_coef_kernel(ChanArgs<T> A) {
  const int64_t c = thread_channel();
  if (c >= A.C) return;
  const double mean = static_cast<double>(A.running_mean[c]);
  const double invstd = bn_invstd(static_cast<double>(A.running_var[c]), 1.0, A.eps);
  if (A.mean) A.mean[c] = mean;
  if (A.invstd) A.invstd[c] = invstd;
  A.norm[c] = bn_norm_coef<T>(mean, invstd, A.gamma(c), A.beta(c));
}

// Staged backward dx: weight gradients and training coefficients from the (global) sums.
template <class T>
__global__ void __launch_bounds__(kChanThreads) dx_coef_kernel(ChanArgs<T> A, const double* sum_dy,
                                                               const double* sum_dy_xmu) {
  const int64_t c = thread_channel();
  if (c < A.C) finish_grad(A, c, sum_dy[c], sum_dy_xmu[c]);
}

// Eval backward without weight gradients: dx = a dy with a from bn_grad_coef_eval.
template <class T>
__global__ void __launch_bounds__(kChanThreads) eval_grad_coef_kernel(ChanArgs<T> A) {
  const int64_t c = thread_channel();
  if (c < A.C) A.grad[c] = bn_grad_coef_eval<T>(A.mean[c], A.invstd[c], A.gamma(c));
}

// bn_combine: fold shards [s0, s0 + n) into (mean, m2), starting from n0 values already folded (s0 > 0: the
// state is in mean / m2 from the previous launch).  The fold of all shards is the CPU's, in shard order.
struct ShardCounts {
  int n;
  double count[kMaxShards];
};

__global__ void __launch_bounds__(kChanThreads) combine_kernel(ShardCounts sc, int64_t s0, double n0,
                                                               const double* means, const double* m2s, int64_t C,
                                                               double* mean_out, double* m2_out) {
  const int64_t c = thread_channel();
  if (c >= C) return;
  double n = n0, mean = 0.0, m2 = 0.0;
  if (s0 > 0) {
    mean = mean_out[c];
    m2 = m2_out[c];
  }
  for (int k = 0; k < sc.n; ++k)
    bn_chan_combine(&n, &mean, &m2, sc.count[k], means[(s0 + k) * C + c], m2s[(s0 + k) * C + c]);
  mean_out[c] = mean;
  m2_out[c] = m2;
}

// ---- elementwise kernels ------------------------------------------------------------------------------------

// Each op applies the rule to the P values at i (16-byte aligned when P > 1), element l with coefficients k[l].
template <class S>
struct NormOp {
  using Coef = BnNormCoef<Compute<S>>;
  const S* x;
  S* y;
  const Coef* coef;
  uintptr_t address_bits() const { return reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y); }
  template <int P>
  __device__ __forceinline__ void apply(int64_t i, const Coef* k) const {
    const Vec<S, P> xv = load_vec<S, P>(x + i);
    Vec<S, P> yv;
#pragma unroll
    for (int l = 0; l < P; ++l) yv.v[l] = st<S>(bn_normalize(k[l], ld(xv.v[l])));
    store_vec<S, P>(y + i, yv);
  }
};

template <class S>
struct GradOp {
  using Coef = BnGradCoef<Compute<S>>;
  const S* dy;
  const S* x;
  S* dx;
  const Coef* coef;
  uintptr_t address_bits() const {
    return reinterpret_cast<uintptr_t>(dy) | reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(dx);
  }
  template <int P>
  __device__ __forceinline__ void apply(int64_t i, const Coef* k) const {
    const Vec<S, P> gv = load_vec<S, P>(dy + i);
    const Vec<S, P> xv = load_vec<S, P>(x + i);
    Vec<S, P> ov;
#pragma unroll
    for (int l = 0; l < P; ++l) ov.v[l] = st<S>(bn_grad_input(k[l], ld(gv.v[l]), ld(xv.v[l])));
    store_vec<S, P>(dx + i, ov);
  }
};

template <class S>
struct ScaleOp {  // eval backward: dx = a dy
  using Coef = BnGradCoef<Compute<S>>;
  const S* dy;
  S* dx;
  const Coef* coef;
  uintptr_t address_bits() const { return reinterpret_cast<uintptr_t>(dy) | reinterpret_cast<uintptr_t>(dx); }
  template <int P>
  __device__ __forceinline__ void apply(int64_t i, const Coef* k) const {
    const Vec<S, P> gv = load_vec<S, P>(dy + i);
    Vec<S, P> ov;
#pragma unroll
    for (int l = 0; l < P; ++l) ov.v[l] = st<S>(k[l].a * ld(gv.v[l]));
    store_vec<S, P>(dx + i, ov);
  }
};

// Grid-stride over packs of P values.  The cursor (r, c): flat element e = q inner + r, channel c = q mod C; it
// is computed once per thread and then advanced by the stride with additions only.
template <int P, class Op>
__device__ __forceinline__ void walk(const Op& op, int64_t npacks, int64_t C, int64_t inner) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= npacks) return;
  const int64_t e0 = p * P;
  int64_t r = e0 % inner, c = (e0 / inner) % C;
  const int64_t step = stride * P, dr = step % inner, dc = (step / inner) % C;
  for (; p < npacks; p += stride) {
    typename Op::Coef k[P];
    int64_t rr = r, cc = c;
#pragma unroll
    for (int l = 0; l < P; ++l) {
      k[l] = op.coef[cc];
      if (++rr == inner) {
        rr = 0;
        if (++cc == C) cc = 0;
      }
    }
    op.template apply<P>(p * P, k);
    r += dr;
    int64_t carry = 0;
    if (r >= inner) {
      r -= inner;
      carry = 1;
    }
    c += dc + carry;  // < 2 C
    if (c >= C) c -= C;
  }
}

// inner == 1: element e is in channel e mod C.  The host makes the stride S (in packs) a multiple of
// C / gcd(C, P), so S P is a multiple of C and pack p + S has the channels of pack p: the thread loads its P
// coefficient structs once and keeps them in registers.
template <int P, class Op>
__device__ __forceinline__ void walk_fixed(const Op& op, int64_t npacks, int64_t C, int64_t S) {
  int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= npacks || p >= S) return;
  typename Op::Coef k[P];
  int64_t cc = (p * P) % C;
#pragma unroll
  for (int l = 0; l < P; ++l) {
    k[l] = op.coef[cc];
    if (++cc == C) cc = 0;
  }
  for (; p < npacks; p += S) op.template apply<P>(p * P, k);
}

// fixed_stride > 0: inner == 1 and walk_fixed with that stride; 0: the general walk (grid stride).
template <class S, class Op>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(Op op, int64_t numel, int64_t C, int64_t inner,
                                                               bool packed, int64_t fixed_stride) {
  constexpr int W = 16 / static_cast<int>(sizeof(S));
  const int64_t npacks = packed ? numel / W : numel;
  if (packed) {
    if (fixed_stride > 0) walk_fixed<W>(op, npacks, C, fixed_stride);
    else walk<W>(op, npacks, C, inner);
  } else {
    if (fixed_stride > 0) walk_fixed<1>(op, npacks, C, fixed_stride);
    else walk<1>(op, npacks, C, inner);
    return;
  }
  const int64_t i = npacks * W + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // the tail
  if (i < numel) {
    const typename Op::Coef k = op.coef[(i / inner) % C];
    op.template apply<1>(i, &k);
  }
}

int64_t gcd64(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// ---- host drivers -------------------------------------------------------------------------------------------

// S: the storage type of x, dy and out; T: the compute type (and that of the per-channel arrays).
template <class S>
struct Exec {
  using T = Compute<S>;
  const BnArgs& a;
  BnShape s;
  BnPlan plan;
  cudaStream_t stream;
  int sms;

  explicit Exec(const BnArgs& args)
      : a(args), s(args.shape), plan(bn_plan(args.shape, args.dtype)), stream(static_cast<cudaStream_t>(args.stream)),
        sms(sm_count(args.device.index)) {}

  const S* x() const { return static_cast<const S*>(a.x); }
  const S* dy() const { return static_cast<const S*>(a.dy); }
  S* out() const { return static_cast<S*>(a.out); }

  unsigned chan_grid(int64_t threads_per_channel) const {
    return static_cast<unsigned>(ceil_div(s.channels * threads_per_channel, kChanThreads));
  }

  ReduceIn<S> reduce_in() const {
    ReduceIn<S> in;
    in.x = x();
    in.C = s.channels;
    in.inner = s.inner;
    return in;
  }

  // Launch the plan's reduction into `buf` (allocated here) and say where each channel's partials are.
  template <int Kind>
  Partials reduce(const ReduceIn<S>& in, DeviceBuffer& buf) const {
    Partials P;
    if (plan.channels_first) {
      CfGeom g;
      g.C = s.channels;
      g.outer = s.outer;
      g.inner = s.inner;
      g.kc = ceil_div(s.inner, kBnChunk);
      g.units = s.outer * g.kc;
      g.total = g.C * g.units;
      const int64_t nlb = ceil_div(imin(s.inner, kBnChunk), kLaneBlock);
      while (g.lbp < nlb) g.lbp *= 2;
      g.tpu = kLanes * g.lbp;
      g.upb = kSlots / g.lbp;
      P.per_channel = g.units;
      if (g.total == 0) return P;
      buf.allocate(static_cast<size_t>(3 * g.total) * sizeof(double), stream);
      P.p = buf.as<double>();
      const unsigned grid =
          grid_for(g.total, g.upb, sms, resident_blocks_per_sm(cf_reduce_kernel<S, Kind>, kThreads));
      g.step = static_cast<int64_t>(grid) * g.upb;  // the grid step's digits, for the kernel's cursors
      g.sc = g.step / g.units;
      const int64_t su = g.step - g.sc * g.units;
      g.sn = su / g.kc;
      g.sk = su - g.sn * g.kc;
      cf_reduce_kernel<S, Kind><<<grid, kThreads, 0, stream>>>(g, in, buf.as<double>());
      OK_CUDA_CHECK(cudaGetLastError());
    } else {
      P.rows = true;
      P.width = plan.width;
      P.inner = s.inner;
      P.nrows = plan.rows;
      P.group_rows = plan.group_rows();
      P.per_channel = plan.ngroups * s.inner;
      if (P.per_channel == 0) return P;  // no rows, or width 0: every channel's fold is empty
      constexpr int Pc = 16 / static_cast<int>(sizeof(S));
      RowGeom g;
      g.rows = plan.rows;
      g.width = plan.width;
      g.row_block = plan.row_block;
      g.nblocks = plan.nblocks;
      g.group = plan.group;
      g.ngroups = plan.ngroups;
      const int64_t ncg = ceil_div(plan.width, Pc);
      while (g.tc * 2 * kRowSlices * g.group <= kRowThreads && g.tc < ncg) g.tc *= 2;
      g.ntc = ceil_div(ncg, g.tc);
      g.tiles = g.ngroups * g.ntc;
      g.tpb = kRowThreads / (g.tc * kRowSlices * static_cast<int>(g.group));
      g.vec = plan.width % Pc == 0 && aligned16(in.x) &&
              (Kind == 0 || (aligned16(in.dy) && (in.dx == nullptr || aligned16(in.dx))));
      buf.allocate(static_cast<size_t>(2 * plan.ngroups * plan.width) * sizeof(double), stream);
      P.p = buf.as<double>();
      const unsigned grid =
          grid_for(g.tiles, g.tpb, sms, resident_blocks_per_sm(rows_reduce_kernel<S, Kind>, kRowThreads));
      rows_reduce_kernel<S, Kind><<<grid, kRowThreads, 0, stream>>>(g, in, buf.as<double>());
      OK_CUDA_CHECK(cudaGetLastError());
    }
    return P;
  }

  template <class Op>
  void elementwise(const Op& op) const {
    const int64_t numel = s.numel();
    if (numel == 0) return;
    constexpr int W = 16 / static_cast<int>(sizeof(S));
    const bool packed = (op.address_bits() & 15u) == 0 && numel >= W;
    const int64_t work = packed ? numel / W : numel;
    const int bpsm = resident_blocks_per_sm(elementwise_kernel<S, Op>, kThreads);
    int64_t fixed = 0;  // inner == 1: a stride (in packs) under which every thread keeps its channels
    unsigned grid;
    if (s.inner == 1) {
      const int64_t m = s.channels / gcd64(s.channels, packed ? W : 1);
      const int64_t cap = static_cast<int64_t>(sms) * bpsm * kThreads;
      fixed = cap >= m ? cap / m * m : m;
      grid = static_cast<unsigned>(ceil_div(imin(fixed, work), kThreads));
    } else {
      grid = grid_for(work, kThreads, sms, bpsm);
    }
    elementwise_kernel<S, Op><<<grid, kThreads, 0, stream>>>(op, numel, s.channels, s.inner, packed, fixed);
    OK_CUDA_CHECK(cudaGetLastError());
  }

  // ---- ops ----
  void stats(bool forward) const {  // bn_stats, or (forward) bn_forward_train
    ChanArgs<T> A = chan_args<T>(a, static_cast<double>(s.count()));
    DeviceBuffer coef, partial;
    if (forward) {
      coef.allocate(static_cast<size_t>(s.channels) * sizeof(BnNormCoef<T>), stream);
      A.norm = coef.as<BnNormCoef<T>>();
    }
    const Partials P = reduce<0>(reduce_in(), partial);
    stats_finish_kernel<T><<<chan_grid(32), kChanThreads, 0, stream>>>(P, A);
    OK_CUDA_CHECK(cudaGetLastError());
    if (forward) elementwise(NormOp<S>{x(), out(), A.norm});
  }

  void normalize() const {  // staged: from the combined (count, mean, m2)
    ChanArgs<T> A = chan_args<T>(a, static_cast<double>(global_count(a)));
    DeviceBuffer coef(static_cast<size_t>(s.channels) * sizeof(BnNormCoef<T>), stream);
    A.norm = coef.as<BnNormCoef<T>>();
    normalize_coef_kernel<T><<<chan_grid(1), kChanThreads, 0, stream>>>(A);
    OK_CUDA_CHECK(cudaGetLastError());
    elementwise(NormOp<S>{x(), out(), A.norm});
  }

  void forward_eval() const {
    ChanArgs<T> A = chan_args<T>(a, 0.0);
    DeviceBuffer coef(static_cast<size_t>(s.channels) * sizeof(BnNormCoef<T>), stream);
    A.norm = coef.as<BnNormCoef<T>>();
    eval_coef_kernel<T><<<chan_grid(1), kChanThreads, 0, stream>>>(A);
    OK_CUDA_CHECK(cudaGetLastError());
    elementwise(NormOp<S>{x(), out(), A.norm});
  }

  ReduceIn<S> grad_in(bool eval_dx) const {
    ReduceIn<S> in = reduce_in();
    in.dy = dy();
    in.mean = a.mean;
    if (eval_dx) {
      in.dx = out();
      in.invstd = a.invstd;
      in.weight = static_cast<const T*>(a.weight);
    }
    return in;
  }

  void grad_sums(bool then_dx) const {  // bn_backward_train (then_dx) or bn_backward_reduce
    ChanArgs<T> A = chan_args<T>(a, static_cast<double>(global_count(a)));
    DeviceBuffer coef, partial;
    if (then_dx) {
      coef.allocate(static_cast<size_t>(s.channels) * sizeof(BnGradCoef<T>), stream);
      A.grad = coef.as<BnGradCoef<T>>();
    } else {
      A.dweight = nullptr;  // bn_backward_reduce writes the sums only
      A.dbias = nullptr;
    }
    const Partials P = reduce<1>(grad_in(false), partial);
    grad_finish_kernel<T><<<chan_grid(32), kChanThreads, 0, stream>>>(P, A);
    OK_CUDA_CHECK(cudaGetLastError());
    if (then_dx) elementwise(GradOp<S>{dy(), x(), out(), A.grad});
  }

  void backward_dx() const {  // staged: from the global sums
    ChanArgs<T> A = chan_args<T>(a, static_cast<double>(global_count(a)));
    A.sum_dy = nullptr;  // inputs here, not outputs
    A.sum_dy_xmu = nullptr;
    DeviceBuffer coef(static_cast<size_t>(s.channels) * sizeof(BnGradCoef<T>), stream);
    A.grad = coef.as<BnGradCoef<T>>();
    dx_coef_kernel<T><<<chan_grid(1), kChanThreads, 0, stream>>>(A, a.sum_dy, a.sum_dy_xmu);
    OK_CUDA_CHECK(cudaGetLastError());
    elementwise(GradOp<S>{dy(), x(), out(), A.grad});
  }

  void backward_eval() const {
    ChanArgs<T> A = chan_args<T>(a, 0.0);
    A.sum_dy = nullptr;  // eval backward writes dx, dweight and dbias only
    A.sum_dy_xmu = nullptr;
    if (a.dweight == nullptr && a.dbias == nullptr) {
      if (s.numel() == 0) return;
      DeviceBuffer coef(static_cast<size_t>(s.channels) * sizeof(BnGradCoef<T>), stream);
      A.grad = coef.as<BnGradCoef<T>>();
      eval_grad_coef_kernel<T><<<chan_grid(1), kChanThreads, 0, stream>>>(A);
      OK_CUDA_CHECK(cudaGetLastError());
      elementwise(ScaleOp<S>{dy(), out(), A.grad});
      return;
    }
    // One pass writes dx = a dy and reduces the gradient sums; then dweight = invstd sum_dy_xmu, dbias = sum_dy.
    DeviceBuffer partial;
    const Partials P = reduce<1>(grad_in(true), partial);
    grad_finish_kernel<T><<<chan_grid(32), kChanThreads, 0, stream>>>(P, A);
    OK_CUDA_CHECK(cudaGetLastError());
  }
};

template <class F>
void typed(const BnArgs& a, F&& f) {
  DeviceGuard guard(a.device.index);
  if (a.dtype == DType::f32) {
    Exec<float> e(a);
    f(e);
  } else if (a.dtype == DType::f64) {
    Exec<double> e(a);
    f(e);
  } else if (a.dtype == DType::bf16) {
    Exec<Bf16> e(a);
    f(e);
  } else {
    Exec<F16> e(a);
    f(e);
  }
}

}  // namespace

void bn_forward_train(const BnArgs& a) {
  typed(a, [](const auto& e) { e.stats(true); });
}
void bn_forward_eval(const BnArgs& a) {
  typed(a, [](const auto& e) { e.forward_eval(); });
}
void bn_backward_train(const BnArgs& a) {
  typed(a, [](const auto& e) { e.grad_sums(true); });
}
void bn_backward_eval(const BnArgs& a) {
  typed(a, [](const auto& e) { e.backward_eval(); });
}
void bn_stats(const BnArgs& a) {
  typed(a, [](const auto& e) { e.stats(false); });
}
void bn_normalize(const BnArgs& a) {
  typed(a, [](const auto& e) { e.normalize(); });
}
void bn_backward_reduce(const BnArgs& a) {
  typed(a, [](const auto& e) { e.grad_sums(false); });
}
void bn_backward_dx(const BnArgs& a) {
  typed(a, [](const auto& e) { e.backward_dx(); });
}

void bn_combine(const BnArgs& a, const std::vector<int64_t>& counts, const double* means, const double* m2s) {
  DeviceGuard guard(a.device.index);
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const int64_t C = a.shape.channels;
  const unsigned grid = static_cast<unsigned>(ceil_div(C, kChanThreads));
  double n = 0.0;  // values folded so far, accumulated exactly as bn_chan_combine does
  const int64_t S = static_cast<int64_t>(counts.size());
  for (int64_t s0 = 0; s0 < S; s0 += kMaxShards) {
    ShardCounts sc{};
    sc.n = static_cast<int>(imin(kMaxShards, S - s0));
    for (int k = 0; k < sc.n; ++k) sc.count[k] = static_cast<double>(counts[static_cast<size_t>(s0 + k)]);
    combine_kernel<<<grid, kChanThreads, 0, stream>>>(sc, s0, n, means, m2s, C, a.mean, a.m2);
    OK_CUDA_CHECK(cudaGetLastError());
    for (int k = 0; k < sc.n; ++k)
      if (sc.count[k] > 0.0) n = n + sc.count[k];
  }
}

}  // namespace cuda_exec
}  // namespace optkern
