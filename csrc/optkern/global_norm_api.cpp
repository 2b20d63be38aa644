// Gradient norms over a list of tensors: the partition (gn_plan), argument checks, and dispatch to the CPU
// instruction set in use or to the CUDA executor.
#include "global_norm_api.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "arg_error.h"
#include "executors.h"

namespace optkern {

GnPlan gn_plan(const std::vector<int64_t>& numels) {
  GnPlan plan;
  plan.part_begin.push_back(0);
  int used = 0;  // lane blocks in the current part
  for (size_t t = 0; t < numels.size(); ++t) {
    if (numels[t] < 0) throw std::invalid_argument("gn_plan: negative tensor size");
    for (int64_t s = 0; s < numels[t]; s += kGnPart) {
      const int64_t len = numels[t] - s < kGnPart ? numels[t] - s : kGnPart;
      const int nb = static_cast<int>(gn_blocks(len));
      if (used > 0 && used + nb > kGnPartBlocks) {  // close the current part
        plan.part_begin.push_back(static_cast<int32_t>(plan.pieces.size()));
        used = 0;
      }
      plan.pieces.push_back(GnPiece{static_cast<int32_t>(t), static_cast<int32_t>(len), s});
      used += nb;
    }
  }
  if (used > 0) plan.part_begin.push_back(static_cast<int32_t>(plan.pieces.size()));
  if (plan.pieces.size() > static_cast<size_t>(INT32_MAX))
    throw std::invalid_argument("grads: too many elements for one global norm");
  return plan;
}

GnPlan gn_plan(const StepBatch& b) {
  std::vector<int64_t> numels(b.tensors.size());
  for (size_t i = 0; i < b.tensors.size(); ++i) numels[i] = b.tensors[i].numel;
  return gn_plan(numels);
}

namespace {
bool check_norm_type(double norm_type) {  // -> true for the max-norm
  const bool inf = std::isinf(norm_type) && norm_type > 0;
  if (!(inf || norm_type == 2.0)) bad_arg("norm_type", "2.0 or inf", norm_type);
  return inf;
}
}  // namespace

double global_norm(const StepBatch& b, double norm_type) {
  const bool inf = check_norm_type(norm_type);
  if (b.device.kind == DeviceKind::cuda) return cuda_exec::global_norm_host(b, inf);
  const GnPlan plan = gn_plan(b);
  double r;
  switch (cpu_isa()) {
    case CpuIsa::avx512: r = inf ? cpu_avx512::max_abs(b, plan) : cpu_avx512::sum_squares(b, plan); break;
    case CpuIsa::avx2: r = inf ? cpu_avx2::max_abs(b, plan) : cpu_avx2::sum_squares(b, plan); break;
    default: r = inf ? cpu_scalar::max_abs(b, plan) : cpu_scalar::sum_squares(b, plan); break;
  }
  return inf ? r : std::sqrt(r);
}

void global_norm_device(const StepBatch& b, double norm_type, const NormOutputs& out) {
  const bool inf = check_norm_type(norm_type);
  if (b.device.kind != DeviceKind::cuda)
    throw std::invalid_argument("grads: a norm written to device memory needs CUDA arrays");
  if (out.norm == nullptr) throw std::invalid_argument("out: null pointer");
  if ((out.grad_multiplier == nullptr) != (out.found_inf == nullptr))
    throw std::invalid_argument("grad_multiplier: give grad_multiplier and found_inf outputs together");
  if (out.grad_multiplier != nullptr && !(std::isfinite(out.max_norm) && out.max_norm >= 0.0))
    bad_arg("max_norm", "a finite number >= 0", out.max_norm);
  cuda_exec::global_norm_device(b, inf, out);
}

}  // namespace optkern
