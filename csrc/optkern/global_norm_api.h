// Gradient norms over a list of tensors (one multi-tensor reduction), on the CPU or a CUDA device, in one order
// fixed by the tensor sizes alone: the CPU (any thread count, any instruction set) and CUDA (any GPU, any launch
// shape) give the same bits.
//
// The order (the partition is gn_plan below; the per-element math is the OK_HD functions after it):
//  - pieces: each non-empty tensor is cut at tensor-local offsets that are multiples of kGnPart (65536), so
//    every piece starts at its tensor's alignment; empty tensors give none.
//  - parts: the pieces in order (tensor order, then offset) are packed greedily: a piece joins the current part
//    while the part's lane blocks (below) stay <= kGnPartBlocks (64), else it starts the next part.  A full
//    piece is a part of its own; small tensors share parts.
//  - a piece is cut into lane blocks of kGnBlock (1024) values from its start (the last shorter, blk values).
//    A lane block has L = gn_lanes<T> lanes (256 bytes: 64 float or 32 double lanes).  Value j < vec
//    (vec = blk / L * L) goes to lane j % L, which accumulates gn_lane in T in increasing j from T(0) (x * x
//    rounded in T, or max |x|); the L lanes are widened to double and joined as the fixed tree
//    h[l] = gn_join(h[l], h[l + w]) for l < w, w = L / 2, ..., 1; then the tail values j in [vec, blk) are joined
//    in order as double(gn_lane(T(0), x[j])).
//  - a part's partial: its lane block totals in slots 0, 1, ... (pieces in order, blocks in order), the slots
//    up to kGnPartBlocks padded with 0.0, joined by the same kind of tree (w = 32, ..., 1).
//  - the result: kGnSlots (256) slots, slot s = 0.0 joined with the partials s, s + 256, s + 512, ... in order;
//    then the tree over the 256 slots (w = 128, ..., 1).  norm_type 2 takes the square root of that (IEEE on
//    both sides).
// Padding with 0.0 is exact (a sum of squares is >= +0.0, a max of |x| too).  No FMA (-ffp-contract=off /
// --fmad=false).  float32 error: every lane sums at most 16 squares in float32 before the sums are joined in
// double, so the relative error of the sum of squares is below 16 * 2^-24 (about 1e-6), typically ~1e-7; float64
// lanes sum at most 32.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"
#include "optim_api.h"

namespace optkern {

// ---- the public API ---------------------------------------------------------------------------------------

// ptr[0] of each slot is read.  norm_type 2 returns sqrt(sum x^2) (lane sums in T, joined in double); norm_type
// inf returns max |x| (NaN propagates).  On CUDA the call synchronizes the batch's stream once to return the norm.
double global_norm(const StepBatch& b, double norm_type);

// Device outputs of global_norm_device (CUDA device memory on the batch's device).  norm is required;
// grad_multiplier and found_inf are both given or both null (the clip of clip_grad_norm, computed on the device):
// grad_multiplier = float(gn_clip_multiplier(norm, max_norm)), found_inf = 1.0f when the norm is inf or NaN, else
// 0.0f: the step's device grad_multiplier and found_inf as they are.
struct NormOutputs {
  double* norm = nullptr;
  float* grad_multiplier = nullptr;
  float* found_inf = nullptr;
  double max_norm = 0.0;  // read when grad_multiplier is given: finite and >= 0
};

// The norm of a CUDA batch written to device memory, with no host synchronization (stream-ordered on b.stream).
// Throws std::invalid_argument (naming the argument) for a CPU batch, bad norm_type, outputs or max_norm, and
// for a stream being captured into a CUDA graph (the call uploads its plan from host memory).
void global_norm_device(const StepBatch& b, double norm_type, const NormOutputs& out);

// ---- the partition (host code, shared by the executors; tested through _C._global_norm_plan) ----------------

constexpr int64_t kGnPart = 65536;     // most values of one piece; piece starts are multiples of it
constexpr int64_t kGnBlock = 1024;     // values per lane block
template <class T>
constexpr int gn_lanes = static_cast<int>(256 / sizeof(T));  // T lanes of a lane block: 64 float, 32 double
constexpr int kGnPartBlocks = 64;      // lane blocks (slots) per part
constexpr int kGnSlots = 256;          // slots of the final join
static_assert(kGnPart == kGnBlock * kGnPartBlocks, "a full piece fills one part");
static_assert(kGnBlock % gn_lanes<float> == 0 && kGnBlock % gn_lanes<double> == 0, "whole lane rows per block");

struct GnPiece {
  int32_t tensor;
  int32_t len;    // 1 .. kGnPart
  int64_t begin;  // tensor-local offset, a multiple of kGnPart
};
struct GnPlan {
  std::vector<GnPiece> pieces;
  std::vector<int32_t> part_begin;  // part p holds pieces [part_begin[p], part_begin[p + 1]); size nparts + 1
  int nparts() const { return static_cast<int>(part_begin.size()) - 1; }
};
GnPlan gn_plan(const std::vector<int64_t>& numels);
GnPlan gn_plan(const StepBatch& b);

inline int64_t gn_blocks(int64_t len) { return (len + kGnBlock - 1) / kGnBlock; }

// ---- the per-element math (CPU and CUDA) --------------------------------------------------------------------

// One lane step in T: acc + x * x (sum of squares) or max(acc, |x|) (NaN propagates).
template <bool kMax, class T>
OK_HD T gn_lane(T acc, T x) {
  if constexpr (kMax) return ok_max(acc, ok_abs(x));
  else return acc + x * x;
}
// Two double totals joined: a + b, or max(a, b) with NaN propagating.
template <bool kMax>
OK_HD double gn_join(double a, double b) {
  if constexpr (kMax) return ok_max(a, b);
  else return a + b;
}
// A norm that is inf or NaN (the step's found_inf).
OK_HD bool gn_nonfinite(double norm) { return !(norm - norm == 0.0); }
// torch's clip coefficient min(1, max_norm / (norm + 1e-6)), and 1 (no scaling) for a norm that is inf or NaN
// (found_inf then skips the step).
OK_HD double gn_clip_multiplier(double norm, double max_norm) {
  if (gn_nonfinite(norm)) return 1.0;
  const double c = max_norm / (norm + 1e-6);
  return c < 1.0 ? c : 1.0;
}

}  // namespace optkern
