// CPU executor for batch norm: the rules of batch_norm_rules.h over (outer, channels, inner) tensors.
//
// Compiled three times like the optimizer executor (isa_kernel.h).  Two layouts, each read with contiguous
// vector loads (no gathers):
//  - channels-first (inner >= kBnMinInner, e.g. NCHW): a channel is `outer` runs of `inner` contiguous values,
//    cut into units of at most kBnChunk.  When there are at least as many channels as threads, each thread
//    takes whole channels and does reduce -> per-channel scalars -> elementwise pass channel by channel, so the
//    second read of a channel comes from L2 (a channel of (32, 64, 56, 56) float32 is 401 KB; L2 is 2 MB).
//    Otherwise the units are reduced in parallel into a partial buffer, combined, then applied in parallel.
//  - rows (small inner, e.g. (N, C) and channels-last NHWC): rows of width C * inner; each block of 64 rows
//    (4 slices of 16, the plan's) reduces down its columns in vector registers (one partial per column), the
//    blocks of a row group (up to 256 rows) are folded in order, one partial per group, and the elementwise pass
//    streams rows with per-column coefficients.
// Reductions accumulate in T lanes over short blocks and in double across blocks, always in the same order,
// so the result does not depend on the instruction set or the thread count.
// 16-bit x / dy / outputs (bfloat16, float16; float32 parameters and running statistics): the load/store layer
// (Io, below) converts each run or row block into a per-thread float32 tile (convert16.h, exact), the float32
// kernels run on the tiles unchanged, and y / dx tiles are rounded to nearest-even on store.  Every value and
// every order is then the float32 path's: a 16-bit call gives bitwise the float32 result on x's (exact) float32
// values, rounded once.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>


#include "../batch_norm_executors.h"
#include "../batch_norm_rules.h"
#include "../work_plan.h"
#include "isa_kernel.h"
#include "thread_pool.h"
#include "work_split.h"
#include "convert16.h"

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

// Reductions use the 16-lane vector types of simd16.h, so every path adds the same values in the same order and
// the sums agree bitwise.
#include "simd16.h"
constexpr int kLanes = 16;
constexpr int64_t kLaneBlock = 1024;  // values summed in T lanes before the block sum is added in double

template <class T>
inline __attribute__((always_inline)) double lane_sum(V16<T> v) {
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += static_cast<double>(v[l]);
  return s;
}


// ---- channels-first run kernels (one contiguous run of at most kBnChunk values) ----------------------------
// Each walks blocks of kLaneBlock values: 16-lane sums in T, the lanes added in double, then the block's tail
// (fewer than 16 values) in double.

// Channels-first reductions keep kAcc independent 16-lane accumulators (64 lanes: value j goes to lane j % 64), so
// the adds do not wait on each other; the lanes are added in double in lane order, then the block's tail (fewer
// than 64 values) in double.
constexpr int kAcc = 4;
constexpr int kWide = kAcc * kLanes;

// The accumulators' total: the kAcc vectors added pairwise in T, the 16 lanes widened to double and added as a
// fixed tree (8 + 8, 4 + 4, 2 + 2, 1 + 1): a few vector adds instead of a 64-long dependent chain.
template <class T>
OK_ISA_INLINE double lanes_sum(const V16<T>* v) {
  static_assert(kAcc == 4, "pairwise sum of four accumulators");
  return lane_tree<T>((v[0] + v[1]) + (v[2] + v[3]));
}

// Moments of a run: out = (n, mean, m2), m2 the sum of squared deviations.  Each lane block is swept twice while
// it sits in L1: first its rough mean K (lane sums), then the sums of x - K and (x - K)^2, so the shift is always
// near the block's own mean (no cancellation, whatever the data's offset or order); the blocks are then combined
// in double as shifted sums around the first block's mean (BnAcc).
template <class T>
OK_KERNEL void run_moments(const T* __restrict x, int64_t n, double* out) {
  BnAcc acc;
  for (int64_t i = 0; i < n; i += kLaneBlock) {
    const int64_t blk = std::min<int64_t>(kLaneBlock, n - i);
    const int64_t vec = blk / kWide * kWide;
    const T* p = x + i;
    V16<T> s[kAcc] = {};
    for (int64_t j = 0; j < vec; j += kWide)
      for (int k = 0; k < kAcc; ++k) s[k] += load16(p + j + k * kLanes);
    double rough = lanes_sum<T>(s);
    for (int64_t j = vec; j < blk; ++j) rough += static_cast<double>(p[j]);
    const T K = static_cast<T>(rough / static_cast<double>(blk));
    V16<T> a1[kAcc] = {}, a2[kAcc] = {};
    for (int64_t j = 0; j < vec; j += kWide)
      for (int k = 0; k < kAcc; ++k) {
        V16<T> d = load16(p + j + k * kLanes) - K;
        a1[k] += d;
        a2[k] += d * d;
      }
    double b1 = lanes_sum<T>(a1), b2 = lanes_sum<T>(a2);
    for (int64_t j = vec; j < blk; ++j) {
      double d = static_cast<double>(p[j] - K);
      b1 += d;
      b2 += d * d;
    }
    double mean, m2;
    bn_shifted_to_moments(static_cast<double>(blk), static_cast<double>(K), b1, b2, &mean, &m2);
    acc.add<true>(static_cast<double>(blk), mean, m2);
  }
  out[0] = acc.n;
  out[1] = acc.mean();
  out[2] = acc.m2();
}

// Gradient sums: out[0] = sum dy, out[1] = sum dy (x - mean); with dx = a dy written too when dx != null
// (eval backward, one pass).
template <class T>
OK_KERNEL void run_grad_sums(const T* __restrict dy, const T* __restrict x, T* __restrict dx, T a, int64_t n, T mh,
                             T ml, double* out) {
  double s1 = 0.0, s2 = 0.0;
  for (int64_t i = 0; i < n; i += kLaneBlock) {
    const int64_t blk = std::min<int64_t>(kLaneBlock, n - i);
    const int64_t vec = blk / kWide * kWide;
    const T* g = dy + i;
    const T* p = x + i;
    V16<T> a1[kAcc] = {}, a2[kAcc] = {};
    for (int64_t j = 0; j < vec; j += kWide)
      for (int k = 0; k < kAcc; ++k) {
        V16<T> d = load16(g + j + k * kLanes);
        if (dx) store16(dx + i + j + k * kLanes, a * d);
        a1[k] += d;
        a2[k] += d * ((load16(p + j + k * kLanes) - mh) - ml);
      }
    double b1 = lanes_sum<T>(a1), b2 = lanes_sum<T>(a2);
    for (int64_t j = vec; j < blk; ++j) {
      T d = g[j];
      if (dx) dx[i + j] = a * d;
      b1 += static_cast<double>(d);
      b2 += static_cast<double>(d * bn_center(p[j], mh, ml));
    }
    s1 += b1;
    s2 += b2;
  }
  out[0] = s1;
  out[1] = s2;
}

// Elementwise runs.  With nt (outputs too large to stay in cache) the body uses non-temporal 64-byte stores; the
// head up to the first aligned output and the tail use the same formula with ordinary stores.
template <class T>
OK_KERNEL void run_normalize(const T* __restrict x, T* __restrict y, int64_t n, BnNormCoef<T> c, bool nt) {
  int64_t i = 0;
  if (nt) {
    for (; i < n && !aligned64(y + i); ++i) y[i] = bn_normalize(c, x[i]);
    for (; i + kLanes <= n; i += kLanes) stream16(y + i, ((load16(x + i) - c.mean_hi) - c.mean_lo) * c.scale + c.shift);
    stream_fence();
  }
  for (; i < n; ++i) y[i] = bn_normalize(c, x[i]);
}

template <class T>
OK_KERNEL void run_grad_input(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t n,
                              BnGradCoef<T> k, bool nt) {
  int64_t i = 0;
  if (nt) {
    for (; i < n && !aligned64(dx + i); ++i) dx[i] = bn_grad_input(k, dy[i], x[i]);
    for (; i + kLanes <= n; i += kLanes)
      stream16(dx + i, k.a * load16(dy + i) + k.b * ((load16(x + i) - k.mean_hi) - k.mean_lo) + k.c);
    stream_fence();
  }
  for (; i < n; ++i) dx[i] = bn_grad_input(k, dy[i], x[i]);
}

// ---- rows kernels (a block of rows of `width` columns) --------------------------------------------------------

// A row group's running fold, per column (G = the first block's K, a, b: bn_group_add), which each block's
// column sums are added into as they leave the accumulators (no partial buffer in between).  The same
// per-column operations, in the same block order, as the CUDA rows kernel.
struct GroupFold {
  double nr;     // the block's rows
  bool first;    // the group's first block: start the fold
  double* G;     // moments only
  double* a;
  double* b;
};

// Fold w columns [j0, j0 + w) of a block into the group: K (kind 0), t1, t2 the block's per-column sums in T.
// Restrict pointers and the `first` test out of the loop, so the loop vectorizes.
template <class T, int Kind>
inline __attribute__((always_inline)) void fold_columns(const GroupFold& f, int64_t j0, int64_t w, const T* K,
                                                        const T* t1, const T* t2) {
  double* __restrict G = f.G + j0;
  double* __restrict a = f.a + j0;
  double* __restrict b = f.b + j0;
  const double nr = f.nr;
  if (f.first)
    for (int64_t j = 0; j < w; ++j) {
      if (Kind == 0) G[j] = static_cast<double>(K[j]);
      a[j] = 0.0;
      b[j] = 0.0;
    }
  if (Kind == 0) {
    for (int64_t j = 0; j < w; ++j)
      bn_group_add(nr, static_cast<double>(K[j]), static_cast<double>(t1[j]), static_cast<double>(t2[j]), G[j],
                   &a[j], &b[j]);
  } else {
    for (int64_t j = 0; j < w; ++j) {
      a[j] = a[j] + static_cast<double>(t1[j]);
      b[j] = b[j] + static_cast<double>(t2[j]);
    }
  }
}

// Column reductions over a row block (at most 64 rows: 4 slices of 16, the plan's), streaming whole rows
// (contiguous, prefetch-friendly) into per-column accumulators kept in registers or L1, one set per slice, a chunk
// of kColChunk columns at a time; the slices' sums are added as bn_slices_sum and folded into the group's fold f.
// Kind 0: two sweeps (the block stays in L1/L2): K = bn_block_shift(sum x), then sum (x - K) and sum (x - K)^2;
// kind 1: gradient sums, sum dy and sum dy (x - mean[j]) with the mean split in c0 (hi) and c1 (lo); kind 2:
// kind 1 plus dx = c2[j] dy (eval backward, one pass).  Each column of each slice is accumulated in T in row
// order, whatever the instruction set (the CUDA rows kernel's order).
constexpr int kSlices = static_cast<int>(kBnRowBlock / kBnRowSlice);
static_assert(kSlices == 4, "bn_slices_sum adds four slices");

inline void slice_rows(int64_t rows, int q, int64_t* lo, int64_t* hi) {
  *lo = std::min<int64_t>(rows, q * kBnRowSlice);
  *hi = std::min<int64_t>(rows, *lo + kBnRowSlice);
}

// Narrow rows (width = NV * 16 <= 64, e.g. channels-last with 16..64 channels): the current slice's accumulators
// stay in registers and the block is read strictly sequentially; the finished slices wait on the stack for the
// tree (p = s0 + s1, then p + (s2 + s3)).  Same per-column operations and order as below.
template <class T, int Kind, int NV>
inline __attribute__((always_inline)) void rows_sums_narrow(const T* __restrict x, const T* __restrict dy,
                                                            T* __restrict dx, int64_t rows, const T* c0, const T* c1,
                                                            const T* c2, const GroupFold& f) {
  constexpr int64_t W = NV * kLanes;
  const double nr = static_cast<double>(rows);
  V16<T> k0[NV], k1[NV], k2[NV];
  alignas(64) T kk[W], t1[W], t2[W];
  if constexpr (Kind == 0) {
    V16<T> p[NV], h[NV];  // the tree: p = s0 + s1, h = s2 (then s2 + s3)
    for (int q = 0; q < kSlices; ++q) {
      int64_t lo, hi;
      slice_rows(rows, q, &lo, &hi);
      V16<T> sum[NV] = {};
      for (int64_t r = lo; r < hi; ++r)
        for (int v = 0; v < NV; ++v) sum[v] += load16(x + r * W + v * kLanes);
      for (int v = 0; v < NV; ++v) {
        if (q == 0) p[v] = sum[v];
        else if (q == 1) p[v] = p[v] + sum[v];
        else if (q == 2) h[v] = sum[v];
        else p[v] = p[v] + (h[v] + sum[v]);  // bn_slices_sum: (s0 + s1) + (s2 + s3)
      }
    }
    for (int v = 0; v < NV; ++v) {
      for (int l = 0; l < kLanes; ++l) k0[v][l] = bn_block_shift<T>(p[v][l], nr);
      store16(kk + v * kLanes, k0[v]);
    }
  } else {
    for (int v = 0; v < NV; ++v) {
      k0[v] = load16(c0 + v * kLanes);
      k1[v] = load16(c1 + v * kLanes);
      if constexpr (Kind == 2) k2[v] = load16(c2 + v * kLanes);
    }
  }
  V16<T> p1[NV], p2[NV], h1[NV], h2[NV];
  for (int q = 0; q < kSlices; ++q) {
    int64_t lo, hi;
    slice_rows(rows, q, &lo, &hi);
    V16<T> a1[NV] = {}, a2[NV] = {};
    for (int64_t r = lo; r < hi; ++r)
      for (int v = 0; v < NV; ++v) {
        if constexpr (Kind == 0) {
          V16<T> d = load16(x + r * W + v * kLanes) - k0[v];
          a1[v] += d;
          a2[v] += d * d;
        } else {
          V16<T> d = load16(dy + r * W + v * kLanes);
          if constexpr (Kind == 2) store16(dx + r * W + v * kLanes, k2[v] * d);
          a1[v] += d;
          a2[v] += d * ((load16(x + r * W + v * kLanes) - k0[v]) - k1[v]);
        }
      }
    for (int v = 0; v < NV; ++v) {
      if (q == 0) {
        p1[v] = a1[v];
        p2[v] = a2[v];
      } else if (q == 1) {
        p1[v] = p1[v] + a1[v];
        p2[v] = p2[v] + a2[v];
      } else if (q == 2) {
        h1[v] = a1[v];
        h2[v] = a2[v];
      } else {
        p1[v] = p1[v] + (h1[v] + a1[v]);  // bn_slices_sum: (s0 + s1) + (s2 + s3)
        p2[v] = p2[v] + (h2[v] + a2[v]);
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    store16(t1 + v * kLanes, p1[v]);
    store16(t2 + v * kLanes, p2[v]);
  }
  fold_columns<T, Kind == 0 ? 0 : 1>(f, 0, W, kk, t1, t2);
}

// The general path, for any width (WC == 0) or for one small width known at compile time (WC = width, 1..8: the
// column loops unroll, so very narrow rows such as channels-last with 3 channels pay no loop overhead per row).
constexpr int64_t kColChunk = 512;
template <class T, int Kind, int WC>
inline __attribute__((always_inline)) void rows_sums_cols(const T* __restrict x, const T* __restrict dy,
                                                          T* __restrict dx, int64_t rows, int64_t width,
                                                          const T* __restrict c0, const T* __restrict c1,
                                                          const T* __restrict c2, const GroupFold& f) {
  if constexpr (WC > 0) width = WC;
  alignas(64) T s1[kSlices][kColChunk], s2[kSlices][kColChunk], kk[kColChunk];
  const double nr = static_cast<double>(rows);
  for (int64_t j0 = 0; j0 < width; j0 += kColChunk) {
    const int64_t w = WC > 0 ? WC : std::min(kColChunk, width - j0);
    if constexpr (Kind == 0) {
      for (int q = 0; q < kSlices; ++q) {
        int64_t lo, hi;
        slice_rows(rows, q, &lo, &hi);
        T* s = s1[q];
        for (int64_t j = 0; j < w; ++j) s[j] = T(0);
        for (int64_t r = lo; r < hi; ++r) {
          const T* xr = x + r * width + j0;
          for (int64_t j = 0; j < w; ++j) s[j] += xr[j];
        }
      }
      for (int64_t j = 0; j < w; ++j)
        kk[j] = bn_block_shift<T>(bn_slices_sum<T>(s1[0][j], s1[1][j], s1[2][j], s1[3][j]), nr);
    }
    for (int q = 0; q < kSlices; ++q) {
      int64_t lo, hi;
      slice_rows(rows, q, &lo, &hi);
      T* t1 = s1[q];
      T* t2 = s2[q];
      for (int64_t j = 0; j < w; ++j) t1[j] = t2[j] = T(0);
      for (int64_t r = lo; r < hi; ++r) {
        const T* xr = x + r * width + j0;
        if constexpr (Kind == 0) {
          for (int64_t j = 0; j < w; ++j) {
            T d = xr[j] - kk[j];
            t1[j] += d;
            t2[j] += d * d;
          }
        } else {
          const T* gr = dy + r * width + j0;
          const T* m0 = c0 + j0;
          const T* m1 = c1 + j0;
          if constexpr (Kind == 2) {
            T* orow = dx + r * width + j0;
            const T* a = c2 + j0;
            for (int64_t j = 0; j < w; ++j) orow[j] = a[j] * gr[j];
          }
          for (int64_t j = 0; j < w; ++j) {
            T d = gr[j];
            t1[j] += d;
            t2[j] += d * bn_center(xr[j], m0[j], m1[j]);
          }
        }
      }
    }
    for (int64_t j = 0; j < w; ++j) {  // the slices' tree, into slice 0's arrays
      s1[0][j] = bn_slices_sum<T>(s1[0][j], s1[1][j], s1[2][j], s1[3][j]);
      s2[0][j] = bn_slices_sum<T>(s2[0][j], s2[1][j], s2[2][j], s2[3][j]);
    }
    fold_columns<T, Kind == 0 ? 0 : 1>(f, j0, w, kk, s1[0], s2[0]);
  }
}

template <class T, int Kind>
OK_KERNEL void rows_sums(const T* __restrict x, const T* __restrict dy, T* __restrict dx, int64_t rows,
                         int64_t width, const T* __restrict c0, const T* __restrict c1, const T* __restrict c2,
                         GroupFold f) {
#define OK_BN_SMALL(W) \
  case W: return rows_sums_cols<T, Kind, W>(x, dy, dx, rows, width, c0, c1, c2, f);
  switch (width) {
    case 16: return rows_sums_narrow<T, Kind, 1>(x, dy, dx, rows, c0, c1, c2, f);
    case 32: return rows_sums_narrow<T, Kind, 2>(x, dy, dx, rows, c0, c1, c2, f);
    case 48: return rows_sums_narrow<T, Kind, 3>(x, dy, dx, rows, c0, c1, c2, f);
    case 64: return rows_sums_narrow<T, Kind, 4>(x, dy, dx, rows, c0, c1, c2, f);
    OK_BN_SMALL(1) OK_BN_SMALL(2) OK_BN_SMALL(3) OK_BN_SMALL(4) OK_BN_SMALL(5) OK_BN_SMALL(6) OK_BN_SMALL(7)
    OK_BN_SMALL(8)
    default: return rows_sums_cols<T, Kind, 0>(x, dy, dx, rows, width, c0, c1, c2, f);
  }
#undef OK_BN_SMALL
}

template <class T>
OK_KERNEL void run_scale(const T* __restrict dy, T* __restrict dx, int64_t n, T a, bool nt) {
  int64_t i = 0;
  if (nt) {
    for (; i < n && !aligned64(dx + i); ++i) dx[i] = a * dy[i];
    for (; i + kLanes <= n; i += kLanes) stream16(dx + i, a * load16(dy + i));
    stream_fence();
  }
  for (; i < n; ++i) dx[i] = a * dy[i];
}

// Rows elementwise passes: per-column coefficient arrays, one row at a time.
template <class T>
OK_KERNEL void rows_scale(const T* __restrict dy, T* __restrict dx, int64_t rows, int64_t width,
                          const T* __restrict a, bool nt) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* gr = dy + r * width;
    T* orow = dx + r * width;
    int64_t j = 0;
    if (nt) {
      for (; j < width && !aligned64(orow + j); ++j) orow[j] = a[j] * gr[j];
      for (; j + kLanes <= width; j += kLanes) stream16(orow + j, load16(a + j) * load16(gr + j));
    }
    for (; j < width; ++j) orow[j] = a[j] * gr[j];
  }
  if (nt) stream_fence();
}

template <class T>
OK_KERNEL void rows_normalize(const T* __restrict x, T* __restrict y, int64_t rows, int64_t width,
                              const T* __restrict mh, const T* __restrict ml, const T* __restrict sc,
                              const T* __restrict sh, bool nt) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * width;
    T* yr = y + r * width;
    int64_t j = 0;
    if (nt) {
      for (; j < width && !aligned64(yr + j); ++j) yr[j] = bn_center(xr[j], mh[j], ml[j]) * sc[j] + sh[j];
      for (; j + kLanes <= width; j += kLanes)
        stream16(yr + j, ((load16(xr + j) - load16(mh + j)) - load16(ml + j)) * load16(sc + j) + load16(sh + j));
    }
    for (; j < width; ++j) yr[j] = bn_center(xr[j], mh[j], ml[j]) * sc[j] + sh[j];
  }
  if (nt) stream_fence();
}

template <class T>
OK_KERNEL void rows_grad_input(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t rows,
                               int64_t width, const T* __restrict mh, const T* __restrict ml, const T* __restrict ka,
                               const T* __restrict kb, const T* __restrict kc, bool nt) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * width;
    const T* gr = dy + r * width;
    T* orow = dx + r * width;
    int64_t j = 0;
    if (nt) {
      for (; j < width && !aligned64(orow + j); ++j)
        orow[j] = ka[j] * gr[j] + kb[j] * bn_center(xr[j], mh[j], ml[j]) + kc[j];
      for (; j + kLanes <= width; j += kLanes)
        stream16(orow + j, load16(ka + j) * load16(gr + j) +
                               load16(kb + j) * ((load16(xr + j) - load16(mh + j)) - load16(ml + j)) + load16(kc + j));
    }
    for (; j < width; ++j) orow[j] = ka[j] * gr[j] + kb[j] * bn_center(xr[j], mh[j], ml[j]) + kc[j];
  }
  if (nt) stream_fence();
}

// ---- drivers ----------------------------------------------------------------------------------------------

// Outputs at least this large are written with non-temporal stores (they would not survive in L2 + L3 anyway).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

int threads_for(const BnShape& s) { return threads_for_total(s.numel()); }

int64_t chunks_per_run(const BnShape& s) { return (s.inner + kBnChunk - 1) / kBnChunk; }

// Channels-first: unit u of channel c is (n, k): values [(n C + c) inner + k kBnChunk, + len).
struct Unit {
  int64_t offset, len;
};
Unit cf_unit(const BnShape& s, int64_t c, int64_t u) {
  const int64_t kc = chunks_per_run(s);
  const int64_t n = u / kc, k = u % kc;
  const int64_t begin = k * kBnChunk;
  return Unit{(n * s.channels + c) * s.inner + begin, std::min(kBnChunk, s.inner - begin)};
}

// Partials are combined with BnAcc (batch_norm_rules.h), always in a fixed order, never in thread order.
using Acc = BnAcc;
template <bool kMoments>
inline void acc_add(Acc* t, double n, double a, double b) {
  t->add<kMoments>(n, a, b);
}

// reduce(c, Unit, double[3]) writes a unit's (n, a, b); finish(c, const Acc&) computes the channel's scalars;
// apply(c, Unit) (when has_apply) runs the elementwise pass.
template <bool kMoments, class Reduce, class Finish, class Apply>
void cf_drive(const BnShape& s, Reduce&& reduce, Finish&& finish, Apply&& apply, bool has_apply) {
  const int64_t C = s.channels;
  const int64_t units = s.outer * chunks_per_run(s);
  const int nt = threads_for(s);
  auto whole_channel = [&](int64_t c) {
    Acc tot;
    double part[3];
    for (int64_t u = 0; u < units; ++u) {
      reduce(c, cf_unit(s, c, u), part);
      acc_add<kMoments>(&tot, part[0], part[1], part[2]);
    }
    finish(c, tot);
    if (has_apply)
      for (int64_t u = 0; u < units; ++u) apply(c, cf_unit(s, c, u));
  };
  if (nt <= 1) {
    for (int64_t c = 0; c < C; ++c) whole_channel(c);
    return;
  }
  if (C >= nt) {
    parallel_run(nt, [&](int tid, int n) {
      int64_t lo, hi;
      part_bounds(C, tid, n, 1, &lo, &hi);
      for (int64_t c = lo; c < hi; ++c) whole_channel(c);
    });
    return;
  }
  // Few channels: reduce every unit in parallel, combine in order, then apply in parallel.
  const int64_t total = C * units;
  std::vector<double> partial(static_cast<size_t>(3 * total));
  parallel_run(nt, [&](int tid, int n) {
    int64_t lo, hi;
    part_bounds(total, tid, n, 1, &lo, &hi);
    for (int64_t g = lo; g < hi; ++g) reduce(g / units, cf_unit(s, g / units, g % units), &partial[3 * g]);
  });
  for (int64_t c = 0; c < C; ++c) {
    Acc tot;
    for (int64_t u = 0; u < units; ++u) {
      const double* q = &partial[static_cast<size_t>(3 * (c * units + u))];
      acc_add<kMoments>(&tot, q[0], q[1], q[2]);
    }
    finish(c, tot);
  }
  if (!has_apply) return;
  parallel_run(nt, [&](int tid, int n) {
    int64_t lo, hi;
    part_bounds(total, tid, n, 1, &lo, &hi);
    for (int64_t g = lo; g < hi; ++g) apply(g / units, cf_unit(s, g / units, g % units));
  });
}

// Channels-first elementwise pass alone (the per-channel scalars are known): apply(c, Unit) over every unit in
// memory order (runs (n, c) one after the other, so the hardware prefetchers see one stream per thread), the
// units split evenly across threads.
template <class Apply>
void cf_apply_all(const BnShape& s, Apply&& apply) {
  const int64_t kc = chunks_per_run(s), total = s.channels * s.outer * kc;
  auto body = [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t run = g / kc, n = run / s.channels, c = run % s.channels;
      apply(c, cf_unit(s, c, n * kc + g % kc));
    }
  };
  const int nt = static_cast<int>(std::min<int64_t>(threads_for(s), total));
  if (nt <= 1) {
    body(0, total);
    return;
  }
  parallel_run(nt, [&](int tid, int n) {
    int64_t lo, hi;
    part_bounds(total, tid, n, 1, &lo, &hi);
    body(lo, hi);
  });
}

// A row group's partial per column from its fold: (mean, m2) (bn_group_moments) or the two sums.
template <bool kMoments>
OK_KERNEL void rows_group_out(int64_t W, double n, const double* __restrict G, const double* __restrict a,
                              const double* __restrict b, double* __restrict p1, double* __restrict p2) {
  for (int64_t j = 0; j < W; ++j) {
    if (kMoments) {
      bn_group_moments(n, G[j], a[j], b[j], &p1[j], &p2[j]);
    } else {
      p1[j] = a[j];
      p2[j] = b[j];
    }
  }
}

// Rows: block_sums(r0, r1, fold) adds the row block [r0, r1)'s column sums into the group's fold, block after
// block (as the CUDA rows kernel does); the group's partial is then one per column; channel c's value folds its columns' group partials group by group, column by column (BnAcc).  Then
// finish(c, Acc) per channel.  Threads take whole groups.
template <bool kMoments, class BlockSums, class Finish>
void rows_reduce(const BnShape& s, const BnPlan& plan, BlockSums&& block_sums, Finish&& finish) {
  const int64_t W = plan.width, ng = plan.ngroups;
  std::vector<Acc> tot(static_cast<size_t>(s.channels));
  if (W == 0 || ng == 0) {  // no values (numel 0): every channel's fold is empty
    for (int64_t c = 0; c < s.channels; ++c) finish(c, tot[static_cast<size_t>(c)]);
    return;
  }
  std::vector<double> partial(static_cast<size_t>(2 * ng * W));
  auto run_groups = [&](int64_t lo, int64_t hi) {
    std::vector<double> scratch(static_cast<size_t>(3 * W));  // the group's fold (G, a, b)
    double *G = scratch.data(), *ga = G + W, *gb = ga + W;
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t b0 = g * plan.group, b1 = std::min(plan.nblocks, b0 + plan.group);
      double n = 0.0;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * plan.row_block, r1 = std::min(plan.rows, r0 + plan.row_block);
        const double nr = static_cast<double>(r1 - r0);
        block_sums(r0, r1, GroupFold{nr, b == b0, G, ga, gb});
        n += nr;
      }
      double* p1 = partial.data() + 2 * g * W;
      rows_group_out<kMoments>(W, n, G, ga, gb, p1, p1 + W);
    }
  };
  const int nt = static_cast<int>(std::min<int64_t>(threads_for(s), ng));
  if (nt <= 1) {
    run_groups(0, ng);
  } else {
    parallel_run(nt, [&](int tid, int n) {
      int64_t lo, hi;
      part_bounds(ng, tid, n, 1, &lo, &hi);
      run_groups(lo, hi);
    });
  }
  // Each channel takes its partials group by group, column by column; the loops run group-major so the partial
  // buffer is read sequentially.
  const int64_t gr = plan.group_rows();
  for (int64_t g = 0; g < ng; ++g) {
    const double nr = static_cast<double>(std::min(plan.rows, (g + 1) * gr) - g * gr);
    const double* p1 = partial.data() + 2 * g * W;
    const double* p2 = p1 + W;
    for (int64_t c = 0; c < s.channels; ++c)
      for (int64_t i = 0; i < s.inner; ++i)
        acc_add<kMoments>(&tot[static_cast<size_t>(c)], nr, p1[c * s.inner + i], p2[c * s.inner + i]);
  }
  for (int64_t c = 0; c < s.channels; ++c) finish(c, tot[static_cast<size_t>(c)]);
}

// Rows elementwise passes run over "super-rows" of m consecutive rows (m * width >= 512 values), with per-column
// coefficient arrays repeated m times, so narrow rows (channels-last with few channels) still get long vector
// loops.  apply(row0, nrows, w) covers rows [row0, row0 + nrows * w / width) as nrows rows of w values.
inline int64_t super_rows(int64_t width) { return width >= 512 || width < 1 ? 1 : (512 + width - 1) / width; }

template <class Apply>
void rows_apply(const BnShape& s, const BnPlan& plan, Apply&& apply) {
  const int64_t m = super_rows(plan.width), supers = plan.rows / m, rest = plan.rows - supers * m;
  const int nt = static_cast<int>(std::min<int64_t>(threads_for(s), std::max<int64_t>(supers, 1)));
  auto part = [&](int64_t lo, int64_t hi, bool last) {
    if (lo < hi) apply(lo * m, hi - lo, m * plan.width);
    if (last && rest > 0) apply(supers * m, rest, plan.width);
  };
  if (nt <= 1) {
    part(0, supers, true);
    return;
  }
  parallel_run(nt, [&](int tid, int n) {
    int64_t lo, hi;
    part_bounds(supers, tid, n, 1, &lo, &hi);
    part(lo, hi, tid == n - 1);
  });
}

// ---- the 16-bit load/store layer ----------------------------------------------------------------------------
// S is the storage type of x, dy and the output (y or dx): T itself (float32, float64: read and written in place)
// or uint16_t holding bfloat16/float16 bits with T = float.  A 16-bit run is converted into a per-thread float32
// tile (slot 0: x, 1: dy, 2: the output), the float32 kernel runs on the tiles, and the output tile is rounded to
// nearest-even into the array (convert16.h: precision.h's roundings).  Tiles hold at most kTileValues values,
// except a rows reduction's row block (at most kBnRowBlock x kColChunk).
constexpr int64_t kTileValues = kBnChunk;

template <class T, class S>
struct Io {
  static constexpr bool kHalf = !std::is_same<T, S>::value;
  static_assert(!kHalf || std::is_same<T, float>::value, "16-bit storage computes in float32");
  DType d;
  static T* tile(int slot, int64_t n) {
    thread_local std::vector<T> buf[3];
    std::vector<T>& b = buf[slot];
    if (b.size() < static_cast<size_t>(n)) b.resize(static_cast<size_t>(n));
    return b.data();
  }
  // n values at src as T: src itself, or slot's tile holding their exact float32 values.
  const T* in(const S* src, int64_t n, int slot) const {
    if constexpr (kHalf) {
      T* t = tile(slot, n);
      load_tile16(d, src, n, t);
      return t;
    } else {
      return src;
    }
  }
  // Where the kernel writes n outputs for dst: dst itself, or the output tile (then commit()).
  T* out(S* dst, int64_t n) const {
    if constexpr (kHalf) return tile(2, n);
    else return dst;
  }
  void commit(S* dst, const T* t, int64_t n) const {
    if constexpr (kHalf) store_tile16_rne(d, dst, t, n);
  }
};

// Split nrows rows of w values into contiguous pieces of at most kTileValues: fn(row, nr, col, cols) covers rows
// [row, row + nr), columns [col, col + cols) (whole rows, or one row cut in column chunks).
template <class F>
void row_tiles(int64_t nrows, int64_t w, F&& fn) {
  if (w <= kTileValues) {
    const int64_t k = std::max<int64_t>(1, kTileValues / std::max<int64_t>(w, 1));
    for (int64_t r = 0; r < nrows; r += k) fn(r, std::min(k, nrows - r), int64_t(0), w);
    return;
  }
  for (int64_t r = 0; r < nrows; ++r)
    for (int64_t c = 0; c < w; c += kTileValues) fn(r, int64_t(1), c, std::min(kTileValues, w - c));
}

// ---- typed implementations ----------------------------------------------------------------------------------

// T: the compute type (and that of weight, bias, running statistics and weight gradients); S: the storage type
// of x, dy and the output (Io).
template <class T, class S>
struct Typed {
  const BnArgs& a;
  const BnShape& s;
  BnPlan plan;
  Io<T, S> io;
  const S* x;
  const S* dy;
  S* out;
  const T* w;
  const T* b;
  bool nt;  // stream the output past the caches (it is too large to stay in them; not for 16-bit tiles)
  explicit Typed(const BnArgs& args)
      : a(args), s(args.shape), plan(bn_plan(args.shape, args.dtype)), io{args.dtype},
        x(static_cast<const S*>(args.x)), dy(static_cast<const S*>(args.dy)), out(static_cast<S*>(args.out)),
        w(static_cast<const T*>(args.weight)), b(static_cast<const T*>(args.bias)),
        nt(!Io<T, S>::kHalf && args.shape.numel() * static_cast<int64_t>(sizeof(T)) >= kStreamBytes) {}

  // ---- the load/store layer around the kernels ----
  // Channels-first elementwise runs.
  void cf_normalize(int64_t c, Unit u) const {
    const T* xs = io.in(x + u.offset, u.len, 0);
    T* ys = io.out(out + u.offset, u.len);
    run_normalize<T>(xs, ys, u.len, norm_coef(c), nt);
    io.commit(out + u.offset, ys, u.len);
  }
  void cf_grad_input(const BnGradCoef<T>& k, Unit u) const {
    const T* gs = io.in(dy + u.offset, u.len, 1);
    const T* xs = io.in(x + u.offset, u.len, 0);
    T* os = io.out(out + u.offset, u.len);
    run_grad_input<T>(gs, xs, os, u.len, k, nt);
    io.commit(out + u.offset, os, u.len);
  }
  // Channels-first gradient sums of a run (with dx = k.a dy written when with_dx: eval backward).
  void cf_grad_sums(const BnGradCoef<T>& k, Unit u, bool with_dx, double* o) const {
    const T* gs = io.in(dy + u.offset, u.len, 1);
    const T* xs = io.in(x + u.offset, u.len, 0);
    T* os = with_dx ? io.out(out + u.offset, u.len) : nullptr;
    run_grad_sums<T>(gs, xs, os, k.a, u.len, k.mean_hi, k.mean_lo, o);
    if (with_dx) io.commit(out + u.offset, os, u.len);
  }
  // Rows: a row block's column sums (rows_sums, Kind 0 / 1 / 2) folded into f.  16-bit rows are converted in
  // column chunks of at most kColChunk (each column's sums are independent of the others': the float32 path's).
  template <int Kind>
  void block_sums(int64_t r0, int64_t r1, const GroupFold& f, const T* c0, const T* c1, const T* c2) const {
    const int64_t W = plan.width, nr = r1 - r0, o = r0 * W;
    if constexpr (!Io<T, S>::kHalf) {
      rows_sums<T, Kind>(x + o, Kind > 0 ? dy + o : nullptr, Kind == 2 ? out + o : nullptr, nr, W, c0, c1, c2, f);
    } else {
      const int64_t chunk = std::min<int64_t>(W, kColChunk);
      for (int64_t j0 = 0; j0 < W; j0 += chunk) {
        const int64_t w = std::min(chunk, W - j0);
        // one row block's columns [j0, j0 + w) as nr x w tiles (one conversion when they are whole rows)
        auto gather = [&](const S* src, int slot) -> const T* {
          if (w == W) return io.in(src + o, nr * W, slot);
          T* t = Io<T, S>::tile(slot, nr * w);
          for (int64_t r = 0; r < nr; ++r) load_tile16(io.d, src + o + r * W + j0, w, t + r * w);
          return t;
        };
        const T* xs = gather(x, 0);
        const T* gs = Kind > 0 ? gather(dy, 1) : nullptr;
        T* os = Kind == 2 ? Io<T, S>::tile(2, nr * w) : nullptr;
        const GroupFold fj{f.nr, f.first, f.G + j0, f.a + j0, f.b + j0};
        rows_sums<T, Kind>(xs, gs, os, nr, w, c0 ? c0 + j0 : nullptr, c1 ? c1 + j0 : nullptr,
                           c2 ? c2 + j0 : nullptr, fj);
        if constexpr (Kind == 2)
          for (int64_t r = 0; r < nr; ++r) store_tile16_rne(io.d, out + o + r * W + j0, os + r * w, w);
      }
    }
  }
  // Rows elementwise: fn(xs, gs, os, rows, cols, col) on tiles of the region of nr rows of w values at offset o
  // (gs only when with_dy), then the output committed.
  template <class F>
  void rows_tiles(int64_t o, int64_t nr, int64_t w, bool with_dy, F&& fn) const {
    if constexpr (!Io<T, S>::kHalf) {
      fn(x + o, with_dy ? dy + o : nullptr, out + o, nr, w, int64_t(0));
    } else {
      row_tiles(nr, w, [&](int64_t r, int64_t k, int64_t col, int64_t cols) {
        const int64_t p = o + r * w + col, n = k * cols;
        const T* xs = io.in(x + p, n, 0);
        const T* gs = with_dy ? io.in(dy + p, n, 1) : nullptr;
        T* os = io.out(out + p, n);
        fn(xs, gs, os, k, cols, col);
        io.commit(out + p, os, n);
      });
    }
  }

  double gamma(int64_t c) const { return w ? static_cast<double>(w[c]) : 1.0; }
  double beta(int64_t c) const { return b ? static_cast<double>(b[c]) : 0.0; }
  int64_t global_count() const { return a.count > 0 ? a.count : s.count(); }

  // Expand per-channel values to per-column arrays (rows layout).
  template <class F>
  std::vector<T> per_column(F&& f) const {
    const int64_t m = super_rows(plan.width);  // repeated for rows_apply's super-rows
    std::vector<T> v(static_cast<size_t>(m * plan.width));
    for (int64_t c = 0; c < s.channels; ++c)
      for (int64_t i = 0; i < s.inner; ++i) v[static_cast<size_t>(c * s.inner + i)] = f(c);
    for (int64_t k = 1; k < m; ++k)
      std::copy(v.begin(), v.begin() + plan.width, v.begin() + k * plan.width);
    return v;
  }

  // From a channel's moments: mean and m2 (written to a.mean / a.m2 when present), and the forward
  // finalisation when `finalize`: invstd, running stats.
  void finish_stats(int64_t c, const Acc& t, bool finalize) const {
    const double mean = t.mean(), m2 = t.m2();
    a.mean[c] = mean;
    if (a.m2) a.m2[c] = m2;
    if (finalize) finalize_channel(c, mean, m2, t.n);
  }
  void finalize_channel(int64_t c, double mean, double m2, double n) const {
    a.invstd[c] = bn_invstd(m2, n, a.eps);
    if (a.running_mean)
      bn_update_running(static_cast<T*>(a.running_mean) + c, static_cast<T*>(a.running_var) + c, mean, m2, n,
                        a.factor);
  }
  BnNormCoef<T> norm_coef(int64_t c) const { return bn_norm_coef<T>(a.mean[c], a.invstd[c], gamma(c), beta(c)); }
  BnGradCoef<T> grad_coef(int64_t c) const {
    return bn_grad_coef_train<T>(static_cast<double>(global_count()), a.mean[c], a.invstd[c], gamma(c),
                                 a.sum_dy[c], a.sum_dy_xmu[c]);
  }
  void finish_weight_grads(int64_t c) const {
    if (a.dweight) static_cast<T*>(a.dweight)[c] = static_cast<T>(bn_grad_weight(a.invstd[c], a.sum_dy_xmu[c]));
    if (a.dbias) static_cast<T*>(a.dbias)[c] = static_cast<T>(a.sum_dy[c]);
  }

  // ---- statistics (+ optional finalisation and normalisation) ----
  void stats(bool finalize, bool normalize) {
    if (plan.channels_first) {
      auto reduce = [&](int64_t, Unit u, double* o) { run_moments<T>(io.in(x + u.offset, u.len, 0), u.len, o); };
      auto finish = [&](int64_t c, const Acc& t) { finish_stats(c, t, finalize); };
      auto apply = [&](int64_t c, Unit u) { cf_normalize(c, u); };
      cf_drive<true>(s, reduce, finish, apply, normalize);
      return;
    }
    rows_reduce<true>(
        s, plan,
        [&](int64_t r0, int64_t r1, const GroupFold& f) { block_sums<0>(r0, r1, f, nullptr, nullptr, nullptr); },
        [&](int64_t c, const Acc& t) { finish_stats(c, t, finalize); });
    if (normalize) rows_normalize_all();
  }

  void rows_normalize_all() {
    std::vector<BnNormCoef<T>> cc(static_cast<size_t>(s.channels));
    for (int64_t c = 0; c < s.channels; ++c) cc[static_cast<size_t>(c)] = norm_coef(c);
    auto mh = per_column([&](int64_t c) { return cc[c].mean_hi; });
    auto ml = per_column([&](int64_t c) { return cc[c].mean_lo; });
    auto sc = per_column([&](int64_t c) { return cc[c].scale; });
    auto sh = per_column([&](int64_t c) { return cc[c].shift; });
    rows_apply(s, plan, [&](int64_t r0, int64_t nr, int64_t w) {
      rows_tiles(r0 * plan.width, nr, w, false, [&](const T* xs, const T*, T* ys, int64_t k, int64_t cols, int64_t j) {
        rows_normalize<T>(xs, ys, k, cols, mh.data() + j, ml.data() + j, sc.data() + j, sh.data() + j, nt);
      });
    });
  }

  void normalize_only() {  // mean and invstd are already in a.mean / a.invstd
    if (plan.channels_first) {
      cf_apply_all(s, [&](int64_t c, Unit u) { cf_normalize(c, u); });
      return;
    }
    rows_normalize_all();
  }

  // ---- backward ----
  void grad_sums(bool then_dx) {  // sum_dy, sum_dy_xmu; then (training) dx and weight grads
    auto finish = [&](int64_t c, const Acc& t) {
      a.sum_dy[c] = t.a;
      a.sum_dy_xmu[c] = t.b;
      if (then_dx) finish_weight_grads(c);
    };
    if (plan.channels_first) {
      auto reduce = [&](int64_t c, Unit u, double* o) {
        const BnNormCoef<T> m = bn_norm_coef<T>(a.mean[c], 1.0, 1.0, 0.0);
        BnGradCoef<T> k{};
        k.mean_hi = m.mean_hi;
        k.mean_lo = m.mean_lo;
        cf_grad_sums(k, u, false, o + 1);
        o[0] = static_cast<double>(u.len);
      };
      auto apply = [&](int64_t c, Unit u) { cf_grad_input(grad_coef(c), u); };
      cf_drive<false>(s, reduce, finish, apply, then_dx);
      return;
    }
    std::vector<BnNormCoef<T>> cc(static_cast<size_t>(s.channels));
    for (int64_t c = 0; c < s.channels; ++c) cc[static_cast<size_t>(c)] = bn_norm_coef<T>(a.mean[c], 1.0, 1.0, 0.0);
    auto mh = per_column([&](int64_t c) { return cc[c].mean_hi; });
    auto ml = per_column([&](int64_t c) { return cc[c].mean_lo; });
    rows_reduce<false>(
        s, plan,
        [&](int64_t r0, int64_t r1, const GroupFold& f) { block_sums<1>(r0, r1, f, mh.data(), ml.data(), nullptr); },
        finish);
    if (then_dx) rows_dx_all();
  }

  void rows_dx_all() {
    std::vector<BnGradCoef<T>> kk(static_cast<size_t>(s.channels));
    for (int64_t c = 0; c < s.channels; ++c) kk[static_cast<size_t>(c)] = grad_coef(c);
    auto mh = per_column([&](int64_t c) { return kk[c].mean_hi; });
    auto ml = per_column([&](int64_t c) { return kk[c].mean_lo; });
    auto ka = per_column([&](int64_t c) { return kk[c].a; });
    auto kb = per_column([&](int64_t c) { return kk[c].b; });
    auto kc = per_column([&](int64_t c) { return kk[c].c; });
    rows_apply(s, plan, [&](int64_t r0, int64_t nr, int64_t w) {
      rows_tiles(r0 * plan.width, nr, w, true, [&](const T* xs, const T* gs, T* os, int64_t k, int64_t cols, int64_t j) {
        rows_grad_input<T>(gs, xs, os, k, cols, mh.data() + j, ml.data() + j, ka.data() + j, kb.data() + j,
                           kc.data() + j, nt);
      });
    });
  }

  void dx_only() {  // training dx from the (global) sums already in a.sum_dy / a.sum_dy_xmu
    for (int64_t c = 0; c < s.channels; ++c) finish_weight_grads(c);
    if (plan.channels_first) {
      cf_apply_all(s, [&](int64_t c, Unit u) { cf_grad_input(grad_coef(c), u); });
      return;
    }
    rows_dx_all();
  }

  void backward_eval() {
    const bool want = a.dweight != nullptr || a.dbias != nullptr;
    std::vector<double> sums(want ? static_cast<size_t>(2 * s.channels) : 0);
    auto finish = [&](int64_t c, const Acc& t) {
      if (a.dweight) static_cast<T*>(a.dweight)[c] = static_cast<T>(bn_grad_weight(a.invstd[c], t.b));
      if (a.dbias) static_cast<T*>(a.dbias)[c] = static_cast<T>(t.a);
    };
    auto coef = [&](int64_t c) { return bn_grad_coef_eval<T>(a.mean[c], a.invstd[c], gamma(c)); };
    if (plan.channels_first) {
      auto reduce = [&](int64_t c, Unit u, double* o) {
        const BnGradCoef<T> k = coef(c);
        o[0] = static_cast<double>(u.len);
        if (want) {
          cf_grad_sums(k, u, true, o + 1);
        } else {
          const T* gs = io.in(dy + u.offset, u.len, 1);
          T* os = io.out(out + u.offset, u.len);
          run_scale<T>(gs, os, u.len, k.a, nt);
          io.commit(out + u.offset, os, u.len);
          o[1] = o[2] = 0.0;
        }
      };
      cf_drive<false>(s, reduce, finish, [](int64_t, Unit) {}, false);
      return;
    }
    std::vector<BnGradCoef<T>> kk(static_cast<size_t>(s.channels));
    for (int64_t c = 0; c < s.channels; ++c) kk[static_cast<size_t>(c)] = coef(c);
    auto ka = per_column([&](int64_t c) { return kk[c].a; });
    if (!want) {
      rows_apply(s, plan, [&](int64_t r0, int64_t nr, int64_t w) {
        rows_tiles(r0 * plan.width, nr, w, true, [&](const T*, const T* gs, T* os, int64_t k, int64_t cols, int64_t j) {
          rows_scale<T>(gs, os, k, cols, ka.data() + j, nt);
        });
      });
      return;
    }
    auto mh = per_column([&](int64_t c) { return kk[c].mean_hi; });
    auto ml = per_column([&](int64_t c) { return kk[c].mean_lo; });
    rows_reduce<false>(
        s, plan,
        [&](int64_t r0, int64_t r1, const GroupFold& f) { block_sums<2>(r0, r1, f, mh.data(), ml.data(), ka.data()); },
        finish);
  }
};

// float32 and float64 compute in themselves; bfloat16 and float16 are stored as uint16_t and computed in float32.
template <template <class, class> class Op, class... A>
void typed(const BnArgs& a, A&&... args) {
  if (a.dtype == DType::f32) Op<float, float>::run(a, args...);
  else if (a.dtype == DType::f64) Op<double, double>::run(a, args...);
  else Op<float, uint16_t>::run(a, args...);
}

template <class T, class S> struct ForwardTrain { static void run(const BnArgs& a) { Typed<T, S>(a).stats(true, true); } };
template <class T, class S> struct Stats { static void run(const BnArgs& a) { Typed<T, S>(a).stats(false, false); } };
template <class T, class S> struct Normalize {
  static void run(const BnArgs& a) {
    Typed<T, S> t(a);
    const double n = static_cast<double>(t.global_count());
    for (int64_t c = 0; c < a.shape.channels; ++c) t.finalize_channel(c, a.mean[c], a.m2[c], n);
    t.normalize_only();
  }
};
template <class T, class S> struct ForwardEval {
  static void run(const BnArgs& a) {
    Typed<T, S> t(a);
    const T* rm = static_cast<const T*>(a.running_mean);
    const T* rv = static_cast<const T*>(a.running_var);
    for (int64_t c = 0; c < a.shape.channels; ++c) {
      a.mean[c] = static_cast<double>(rm[c]);
      a.invstd[c] = 1.0 / std::sqrt(static_cast<double>(rv[c]) + a.eps);
    }
    t.normalize_only();
  }
};
template <class T, class S> struct BackwardTrain { static void run(const BnArgs& a) { Typed<T, S>(a).grad_sums(true); } };
template <class T, class S> struct BackwardReduce { static void run(const BnArgs& a) { Typed<T, S>(a).grad_sums(false); } };
template <class T, class S> struct BackwardDx { static void run(const BnArgs& a) { Typed<T, S>(a).dx_only(); } };
template <class T, class S> struct BackwardEval { static void run(const BnArgs& a) { Typed<T, S>(a).backward_eval(); } };

}  // namespace

void bn_forward_train(const BnArgs& a) { typed<ForwardTrain>(a); }
void bn_forward_eval(const BnArgs& a) { typed<ForwardEval>(a); }
void bn_backward_train(const BnArgs& a) { typed<BackwardTrain>(a); }
void bn_backward_eval(const BnArgs& a) { typed<BackwardEval>(a); }
void bn_stats(const BnArgs& a) { typed<Stats>(a); }
void bn_normalize(const BnArgs& a) { typed<Normalize>(a); }
void bn_backward_reduce(const BnArgs& a) { typed<BackwardReduce>(a); }
void bn_backward_dx(const BnArgs& a) { typed<BackwardDx>(a); }

void bn_combine(const BnArgs& a, const std::vector<int64_t>& counts, const double* means, const double* m2s) {
  const int64_t C = a.shape.channels;
  for (int64_t c = 0; c < C; ++c) {
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (size_t k = 0; k < counts.size(); ++k)
      bn_chan_combine(&n, &mean, &m2, static_cast<double>(counts[k]), means[k * C + c], m2s[k * C + c]);
    a.mean[c] = mean;
    a.m2[c] = m2;
  }
}

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
