// L-BFGS kernels: the per-element math and the fixed reduction order, shared by the CPU executor
// (cpu/lbfgs_cpu_kernels.cpp, where V is a 16-lane GCC vector of T or T itself) and the CUDA executor
// (cuda/lbfgs_cuda.cu, V = T).  No FMA anywhere (-ffp-contract=off / --fmad=false): every step is a product
// rounded in T, then a sum rounded in T.
//
// Dot order (lbfgs_dots), identical on every path:
//  - the n elements are cut into chunks of kLbChunk; chunk c covers [c * kLbChunk, min(n, (c + 1) * kLbChunk));
//  - a chunk is cut into lane blocks of kLbLaneBlock values; in a block of blk values, value j < vec
//    (vec = blk / 16 * 16) goes to lane j % 16, which accumulates lb_dot_step in T in increasing j, from T(0);
//  - the block total: the 16 lanes widened to double and added as the fixed tree 8 + 8, 4 + 4, 2 + 2, 1 + 1
//    (h[l] += h[l + w]), then the tail values j in [vec, blk) added in order as double(lb_prod(a, b));
//  - the chunk partial: 0.0 plus the block totals in block order (double);
//  - the result: 0.0 plus the chunk partials in chunk order (double).
// Lincomb order (lbfgs_lincomb): out[j] = lb_comb_first(c0, v0[j]), then acc = lb_comb_step(acc, c_i, v_i[j])
// for i = 1, 2, ... in order, with c_i = static_cast<T>(coef[i]).
#pragma once

#include <cstdint>

#include "common.h"

namespace optkern {

constexpr int64_t kLbChunk = 4096;      // values per dot partial (one CUDA block, one CPU work item)
constexpr int64_t kLbLaneBlock = 256;   // values summed in 16 T lanes before the lanes are added in double
constexpr int kLbLanes = 16;
constexpr int kLbMaxVecs = 64;          // most stored / query / lincomb vectors per call
static_assert(kLbChunk % kLbLaneBlock == 0 && kLbLaneBlock % kLbLanes == 0, "whole lane blocks per chunk");

// One dot step: acc + a * b (product rounded, then sum rounded).  V: T or a vector of T.
template <class V>
OK_HD V lb_dot_step(V acc, V a, V b) {
  return acc + a * b;
}
// A tail product (added to the block total in double after rounding in T).
template <class T>
OK_HD T lb_prod(T a, T b) {
  return a * b;
}
// Linear combination: the first term, then each next term added in order.  C: T (the coefficient cast to T).
template <class V, class C>
OK_HD V lb_comb_first(C c, V x) {
  return c * x;
}
template <class V, class C>
OK_HD V lb_comb_step(V acc, C c, V x) {
  return acc + c * x;
}

inline int64_t lb_num_chunks(int64_t n) { return (n + kLbChunk - 1) / kLbChunk; }

}  // namespace optkern
