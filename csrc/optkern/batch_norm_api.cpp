// Batch norm: scalar checks, the reduction plan, and dispatch to the CPU or CUDA executor.
#include "batch_norm_api.h"

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "batch_norm_executors.h"

#include "arg_error.h"

#include "dispatch.h"

namespace optkern {
namespace {

[[noreturn]] void bad(const char* name, const char* expected, double got) { bad_arg(name, expected, got); }

// x's layout, and its dtype (int16 is a storage type of "split" masters, not a batch-norm input).
void check_shape(const BnArgs& a) {
  const BnShape& s = a.shape;
  if (s.outer < 0 || s.channels < 1 || s.inner < 0)
    throw std::invalid_argument("x: expected a layout with at least one channel");
  if (a.dtype == DType::i16)
    throw std::invalid_argument("x: expected float32, float64, bfloat16 or float16, got int16");
}


// CPU callers of the C++ API may leave per-channel outputs they do not want null: give them host scratch.
struct HostScratch {
  std::vector<double> buf[5];
  BnArgs args;
  HostScratch(const BnArgs& a, bool mean, bool invstd, bool m2, bool sums) : args(a) {
    const size_t C = static_cast<size_t>(a.shape.channels);
    auto fill = [&](double*& p, int k) {
      if (p == nullptr) {
        buf[k].assign(C, 0.0);
        p = buf[k].data();
      }
    };
    if (a.device.kind != DeviceKind::cpu) return;  // the CUDA executor manages its own scratch
    if (mean) fill(args.mean, 0);
    if (invstd) fill(args.invstd, 1);
    if (m2) fill(args.m2, 2);
    if (sums) {
      fill(args.sum_dy, 3);
      fill(args.sum_dy_xmu, 4);
    }
  }
};

// Staged calls: the global count covers the local values (count 0 only for an empty local batch).
void check_global_count(const BnArgs& a) {
  const int64_t local = a.shape.count();
  if (a.count < local) {
    std::ostringstream os;
    os << "count: expected the number of values per channel over all shards (at least the local " << local
       << "), got " << a.count;
    throw std::invalid_argument(os.str());
  }
  bn_check_training_count(a.count, a.shape.channels);
}

}  // namespace

BnPlan bn_plan(const BnShape& s, DType) {
  BnPlan p;
  p.channels_first = s.inner >= kBnMinInner;
  p.rows = s.outer;
  p.width = s.channels * s.inner;
  if (!p.channels_first) {
    // Fixed by the shape alone (never by the thread count or the device): blocks of 64 rows (4 slices of 16);
    // groups of 1, 2 or 4 blocks, the fewest that keep the groups to about 16 (so a small batch still splits over
    // threads).
    p.row_block = kBnRowBlock;
    p.nblocks = s.outer > 0 ? (s.outer + p.row_block - 1) / p.row_block : 0;
    p.group = 1;
    while (p.group < kBnMaxGroup && p.nblocks > 16 * p.group) p.group *= 2;
    p.slices = kBnRowBlock / kBnRowSlice;
    p.ngroups = (p.nblocks + p.group - 1) / p.group;
  }
  return p;
}

void bn_check_eps(double eps) {
  if (!(std::isfinite(eps) && eps > 0.0)) bad("eps", "a finite number > 0", eps);
}
void bn_check_factor(double factor) {
  if (!std::isfinite(factor)) bad("momentum", "a finite number", factor);
}
// torch refuses exactly one value per channel; an empty batch (count 0) is allowed: no statistics (see
// bn_invstd), running statistics untouched, zero weight gradients.
void bn_check_training_count(int64_t count, int64_t channels) {
  if (count == 1 || count < 0) {
    std::ostringstream os;
    os << "x: Expected more than 1 value per channel when training, got " << count << " value"
       << (count == 1 ? "" : "s") << " for each of " << channels << " channels";
    throw std::invalid_argument(os.str());
  }
}

void bn_forward_train(const BnArgs& a) {
  check_shape(a);
  bn_check_eps(a.eps);
  bn_check_factor(a.factor);
  bn_check_training_count(a.shape.count(), a.shape.channels);
  HostScratch h(a, true, true, false, false);
  OPTKERN_DISPATCH(a.device, bn_forward_train(h.args));
}

void bn_forward_eval(const BnArgs& a) {
  check_shape(a);
  bn_check_eps(a.eps);
  if (!a.running_mean || !a.running_var)
    throw std::invalid_argument("running_mean: running statistics are required when training=False");
  HostScratch h(a, true, true, false, false);
  OPTKERN_DISPATCH(a.device, bn_forward_eval(h.args));
}

void bn_backward_train(const BnArgs& a) {
  check_shape(a);
  bn_check_training_count(a.count > 0 ? a.count : a.shape.count(), a.shape.channels);
  if (!a.mean || !a.invstd) throw std::invalid_argument("save_mean: the saved statistics are required");
  HostScratch h(a, false, false, false, true);
  OPTKERN_DISPATCH(a.device, bn_backward_train(h.args));
}

void bn_backward_eval(const BnArgs& a) {
  check_shape(a);
  if (!a.mean || !a.invstd) throw std::invalid_argument("save_mean: the saved statistics are required");
  OPTKERN_DISPATCH(a.device, bn_backward_eval(a));
}

void bn_stats(const BnArgs& a) {
  check_shape(a);  // an empty shard (count 0) gives mean 0, m2 0: combine gives it no weight
  HostScratch h(a, true, false, true, false);
  OPTKERN_DISPATCH(a.device, bn_stats(h.args));
}

void bn_combine(const BnArgs& a, const std::vector<int64_t>& counts, const double* means, const double* m2s) {
  if (a.shape.channels < 1) throw std::invalid_argument("means: expected at least one channel");
  if (counts.empty()) throw std::invalid_argument("counts: expected statistics from at least one shard");
  for (int64_t n : counts)
    if (n < 0) bad("counts", "counts >= 0", double(n));
  if (!a.mean || !a.m2) throw std::invalid_argument("mean: output buffers are required");
  OPTKERN_DISPATCH(a.device, bn_combine(a, counts, means, m2s));
}

void bn_normalize(const BnArgs& a) {
  check_shape(a);
  bn_check_eps(a.eps);
  bn_check_factor(a.factor);
  check_global_count(a);
  if (!a.mean || !a.m2) throw std::invalid_argument("mean: the combined statistics are required");
  HostScratch h(a, false, true, false, false);
  OPTKERN_DISPATCH(a.device, bn_normalize(h.args));
}

void bn_backward_reduce(const BnArgs& a) {
  check_shape(a);
  if (!a.mean) throw std::invalid_argument("mean: the saved mean is required");
  if (!a.sum_dy || !a.sum_dy_xmu) throw std::invalid_argument("sum_dy: output buffers are required");
  OPTKERN_DISPATCH(a.device, bn_backward_reduce(a));
}

void bn_backward_dx(const BnArgs& a) {
  check_shape(a);
  check_global_count(a);
  if (!a.mean || !a.invstd || !a.sum_dy || !a.sum_dy_xmu)
    throw std::invalid_argument("sum_dy: the saved statistics and the reduced sums are required");
  OPTKERN_DISPATCH(a.device, bn_backward_dx(a));
}

}  // namespace optkern
