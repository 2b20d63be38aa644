// optkern's framework-free C++ API for the two fused L-BFGS kernels (the memory-bound passes of the two-loop
// recursion): all the dot products of a few query vectors with the stored history in one pass over memory, and
// a linear combination of vectors in one pass.
//
// A VecBatch is a list of vectors of n elements each, of one dtype, on one device (host or one CUDA device;
// on CUDA, `stream` is the cudaStream_t the kernels are ordered on).  The caller (the binding) checks every
// pointer; these functions check the counts and the agreement of the batches (std::invalid_argument naming the
// argument) before touching memory, then run on the CPU (SIMD dispatch, threads) or on the CUDA device.
//
// Results are deterministic: the reduction order is fixed by n alone (lbfgs_rules.h), so they do not depend on
// the thread count, the CPU instruction set, or the CUDA launch shape, and the CPU and CUDA paths agree bitwise.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"
#include "optim_api.h"

namespace optkern {

struct VecBatch {
  DType dtype = DType::f32;
  Device device;
  void* stream = nullptr;          // cudaStream_t on CUDA devices
  int64_t n = 0;                   // elements per vector
  std::vector<const void*> vecs;   // 1 .. kLbMaxVecs (64) pointers to n elements of dtype each
};

// out[q * k + i] = dot(queries.vecs[q], stored.vecs[i]) for q < nq, i < k (k = stored.vecs.size(),
// nq = queries.vecs.size()), computed in one pass over memory: chunk by chunk, every stored vector's chunk is
// read once while the query chunks stay in cache.  `out` is host memory of nq * k doubles.  On CUDA the call
// waits for its own kernels (one stream synchronization) to copy the result to the host.
// Throws std::invalid_argument for k or nq outside [1, 64], or queries that differ from stored in dtype,
// device or n.
void lbfgs_dots(const VecBatch& stored, const VecBatch& queries, double* out);

// out = sum_i coef[i] * vecs.vecs[i] elementwise, coefficients applied in T as static_cast<T>(coef[i]) and
// added in order (lbfgs_rules.h); every input is read once and out written once.  out (n elements of the
// batch's dtype on its device) must not overlap any input.  No synchronization on CUDA.
// Throws std::invalid_argument for a vector count outside [1, 64] or coef.size() != vecs.vecs.size().
void lbfgs_lincomb(const VecBatch& vecs, const std::vector<double>& coef, void* out);

// The L-BFGS direction out = -H g from the k pairs (s.vecs[j], y.vecs[j]), oldest first, H0 = gamma I with
// gamma = s.y / y.y of the newest pair: the compact form of Byrd, Nocedal & Schnabel (1994) in two passes (the
// Python LBFGSHistory's, without its cached Gram matrices): pass 1, one lbfgs_dots of [g, y_0 .. y_{k-1}] with
// [S, Y] (and g when slope is wanted) gives S^T g, Y^T g, SY = S^T Y and YY = Y^T Y; on the host in double,
// R = triu(SY), D = diag(SY), R u = S^T g, R^T c = (D + gamma YY) u - gamma Y^T g; pass 2, one lbfgs_lincomb:
// out = -gamma g - S c + gamma Y u.  k = 0 gives out = -g.  *slope (when non-null) receives g.d from the same
// products: -gamma g.g - c.(S^T g) + gamma u.(Y^T g).  Throws std::invalid_argument for k > kLbMaxDirPairs (31),
// s and y of different counts, a g/out that differs from them in dtype/device/n, or a pair with s.y <= 0 or not
// finite (not a curvature pair; R would be singular or the direction not descend).  On CUDA pass 1
// synchronizes the stream once.
constexpr int kLbMaxDirPairs = 31;  // [g, S, Y] in one lincomb: 2k + 1 <= kLbMaxVecs
void lbfgs_direction(const VecBatch& s, const VecBatch& y, const void* g, void* out, double* slope);

}  // namespace optkern
