// optkern's framework-free C++ API for batch norm (forward, backward, and the staged SyncBatchNorm pattern).
//
// A tensor of any rank is described by its channel layout: its elements, in memory order, form a contiguous
// (outer, channels, inner) block.  (N, C) is (N, C, 1); NCHW is (N, C, H*W); NHWC with the channel last is
// (N*H*W, C, 1).  The caller (the binding) derives this from shapes and strides and checks every pointer;
// these functions check the scalar arguments (std::invalid_argument naming the argument) before any memory is
// touched, then run on the CPU (SIMD dispatch, threads) or on a CUDA device.
//
// Per-channel statistics are float64 arrays of `channels` elements on the tensor's device: mean, invstd, m2
// (sum of squared deviations), sum_dy, sum_dy_xmu.  weight, bias, running stats, dweight and dbias have the
// tensor's dtype, except for 16-bit tensors (torch's mixed batch norm): x, dy and the output (y or dx) in
// bfloat16 or float16 (one dtype), weight, bias, running stats, dweight and dbias float32.  16-bit values are
// loaded into float32 and the outputs rounded to nearest-even (precision.h) in the executors' load/store layer;
// the math and the statistics are the float32 path's, in the same order.  Optional pointers may be null.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"
#include "optim_api.h"

namespace optkern {

struct BnShape {
  int64_t outer = 0, channels = 0, inner = 0;
  int64_t count() const { return outer * inner; }  // values per channel
  int64_t numel() const { return outer * channels * inner; }
};

struct BnArgs {
  DType dtype = DType::f32;  // of x, dy and out: f32, f64, bf16 or f16 (then the per-channel arrays are f32)
  Device device;
  void* stream = nullptr;  // cudaStream_t on CUDA devices
  BnShape shape;
  // tensors of `shape`
  const void* x = nullptr;
  const void* dy = nullptr;
  void* out = nullptr;  // y (forward) or dx (backward)
  // per-channel, of the tensor's dtype (float32 for a 16-bit tensor)
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* running_mean = nullptr;
  void* running_var = nullptr;
  void* dweight = nullptr;
  void* dbias = nullptr;
  // per-channel, float64
  double* mean = nullptr;
  double* invstd = nullptr;
  double* m2 = nullptr;
  double* sum_dy = nullptr;
  double* sum_dy_xmu = nullptr;
  // scalars
  double eps = 1e-5;
  double factor = 0.1;  // running-stat update factor (momentum), used when running_mean is non-null
  int64_t count = 0;     // values per channel over all shards (staged calls); 0: shape.count()
};

// How the reduction work is cut (host code, shared by the CPU and CUDA executors and tested from Python).
// Channels-first layouts (inner >= kBnMinInner) reduce each channel's N slices of `inner` contiguous values;
// row layouts (small inner, e.g. (N, C) and channels-last) view the tensor as rows of width C * inner and reduce
// down the columns in row blocks of kBnRowBlock = 64 rows, each summed in T as 4 slices of 16 rows (each slice
// in row order) added as the tree (s0 + s1) + (s2 + s3); a block's partials (one per column) are folded in order
// into row groups of `group` blocks (at most kBnMaxGroup: 256 rows), whose partials are folded in order per
// channel.  Both executors compute every sum and every fold the same way, so the result never depends on the
// thread count, the grid or the device.  A GPU gives each (slice, 16 bytes of columns) its own thread (many
// independent chains); the CPU adds the slices in registers and pays the double-precision fold once per 64 rows;
// the groups keep the per-channel fold short (at most ~rows / 256 steps, and about 16 for small batches).
constexpr int64_t kBnMinInner = 64;
constexpr int64_t kBnChunk = 16384;  // channels-first: values per reduction unit (one CUDA block, one CPU call)
constexpr int64_t kBnRowSlice = 16;  // rows: rows per slice (summed in T in row order)
constexpr int64_t kBnRowBlock = 64;  // rows: rows per row block (4 slices, added as a tree in T)
constexpr int64_t kBnMaxGroup = 4;   // rows: row blocks per row group, at most (a power of two)
struct BnPlan {
  bool channels_first = false;
  int64_t rows = 0, width = 0;           // row layout: rows x width (= outer x channels*inner)
  int64_t row_block = 0, nblocks = 0;    // row layout: rows per block, number of blocks
  int64_t group = 0, ngroups = 0;        // row layout: blocks per group (a power of two), number of groups
  int64_t slices = 0;                    // row layout: slices of kBnRowSlice rows per block
  int64_t group_rows() const { return group * row_block; }
};
BnPlan bn_plan(const BnShape& s, DType dtype);

// Validate scalars (eps > 0 finite, momentum finite, count > 1 for training) without touching memory.
void bn_check_eps(double eps);
void bn_check_factor(double factor);
void bn_check_training_count(int64_t count, int64_t channels);

// ---- fused calls ----
// Training forward: statistics, running-stat update (when running_mean is non-null), y; writes mean and invstd (save_mean /
// save_invstd).  Reads x at most twice (on the CPU, twice from DRAM only when one channel outgrows L2).
void bn_forward_train(const BnArgs& a);
// Eval forward: mean = running_mean, invstd = 1/sqrt(running_var + eps) (both written), then y.
void bn_forward_eval(const BnArgs& a);
// Training backward from (mean, invstd): dx, and dweight/dbias when non-null.  Two reads each of x and dy.
void bn_backward_train(const BnArgs& a);
// Eval backward: dx = gamma invstd dy in one pass that also reduces dweight/dbias (when non-null).
void bn_backward_eval(const BnArgs& a);

// ---- staged calls (data-parallel training); the fused calls above are built from the same kernels ----
// Local statistics: mean and m2 of each channel over shape.count() values.
void bn_stats(const BnArgs& a);
// Combine shard statistics: counts[s], means[s * C + c], m2s[s * C + c] -> mean, m2 (in shard order).
void bn_combine(const BnArgs& a, const std::vector<int64_t>& counts, const double* means, const double* m2s);
// Finalize and normalize: from (count, mean, m2): invstd (written), running-stat update, y.
void bn_normalize(const BnArgs& a);
// Backward reduction: sum_dy and sum_dy_xmu = sum dy (x - mean) of the local values.
void bn_backward_reduce(const BnArgs& a);
// Backward elementwise: dx from (count, mean, invstd, sum_dy, sum_dy_xmu) summed over all shards; also
// dweight/dbias when non-null.
void bn_backward_dx(const BnArgs& a);

}  // namespace optkern
