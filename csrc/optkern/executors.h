// The executors that apply a rule to every element of a StepBatch: one per CPU instruction set (the same
// source compiled with different flags) and one for CUDA.  The dispatcher (optim_api.cpp) picks one.
#pragma once

#include "optim_api.h"
#include "optim_rules.h"

namespace optkern {

template <class Rule>
using CoefD = typename Rule::template Coef<double>;

// Every memory layout a step can have is a rule type of its own (compile-time state count).
using SgdPlain = SgdRule<0>;
using SgdMomentum = SgdRule<1>;
using AdamPlain = AdamRule<0>;
using AdamAmsgrad = AdamRule<1>;
using RmspropPlain = RmspropRule<0, 0>;
using RmspropMomentum = RmspropRule<0, 1>;
using RmspropCentered = RmspropRule<1, 0>;
using RmspropCenteredMomentum = RmspropRule<1, 1>;

#define OPTKERN_FOR_EACH_RULE(X)                                                                              \
  X(SgdPlain) X(SgdMomentum) X(SgdVelocityRule) X(AdamPlain) X(AdamAmsgrad) X(AdagradRule) X(RmspropPlain)     \
  X(RmspropMomentum) X(RmspropCentered) X(RmspropCenteredMomentum) X(AdamaxRule) X(NadamRule) X(AdadeltaRule) \
  X(RpropRule)

// Device-side extras a CUDA step may read instead of host values (no host sync): a float scale multiplied
// into grad_scale and a float flag that skips the whole step when non-zero.
struct DeviceScalars {
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;
};

// The global norm's reductions (global_norm_api.h: the order, the plan and the outputs).
struct GnPlan;
struct NormOutputs;

#define OPTKERN_DECLARE_CPU_EXECUTOR(NS)                                     \
  namespace NS {                                                             \
  template <class Rule>                                                      \
  void run_rule(const StepBatch& b, const CoefD<Rule>& c);                   \
  double sum_squares(const StepBatch& b, const GnPlan& plan);                \
  double max_abs(const StepBatch& b, const GnPlan& plan);                    \
  }

OPTKERN_DECLARE_CPU_EXECUTOR(cpu_scalar)
OPTKERN_DECLARE_CPU_EXECUTOR(cpu_avx2)
OPTKERN_DECLARE_CPU_EXECUTOR(cpu_avx512)

namespace cuda_exec {
template <class Rule>
void run_rule(const StepBatch& b, const CoefD<Rule>& c, const DeviceScalars& d);
double global_norm_host(const StepBatch& b, bool inf);  // the norm, copied to the host (one sync)
void global_norm_device(const StepBatch& b, bool inf, const NormOutputs& out);  // no sync
bool available();
}  // namespace cuda_exec

}  // namespace optkern
