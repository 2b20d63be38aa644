// The executors that apply a rule to every element of a StepBatch: one per CPU instruction set (the same
// source compiled with different flags) and one for CUDA.  The dispatcher (optim_api.cpp) picks one.
#pragma once

#include "optim_api.h"
#include "optim_coefs.h"
#include "optim_rules.h"

namespace optkern {

template <class Rule>
using CoefD = typename Rule::template Coef<double>;

// Every memory layout a step can have is a rule type of its own (compile-time state count).
using SgdPlain = SgdRule<0>;
using SgdMomentum = SgdRule<1>;
using AdamPlain = AdamRule<0>;
using AdamAmsgrad = AdamRule<1>;
using AdamEpsInside = AdamRule<0, 1>;          // seeds' Algorithm 8.7 (eps_inside_sqrt)
using AdamAmsgradEpsInside = AdamRule<1, 1>;
using RmspropPlain = RmspropRule<0, 0>;
using RmspropMomentum = RmspropRule<0, 1>;
using RmspropCentered = RmspropRule<1, 0>;
using RmspropCenteredMomentum = RmspropRule<1, 1>;

#define OPTKERN_FOR_EACH_RULE(X)                                                                           \
  X(SgdPlain) X(SgdMomentum) X(SgdVelocityRule) X(AdamPlain) X(AdamAmsgrad) X(AdamEpsInside)                \
  X(AdamAmsgradEpsInside) X(AdagradRule) X(RmspropPlain) X(RmspropMomentum) X(RmspropCentered)              \
  X(RmspropCenteredMomentum) X(AdamaxRule) X(NadamRule) X(AdadeltaRule) X(RpropRule) \
  X(OgrRule)

// The hyperparameter struct each rule's coefficients are made from (optim_coefs.h).
template <class Rule>
struct HyperOf;
template <int M>
struct HyperOf<SgdRule<M>> { using type = SgdHyper; };
template <>
struct HyperOf<SgdVelocityRule> { using type = SgdHyper; };
template <int A, int E>
struct HyperOf<AdamRule<A, E>> { using type = AdamHyper; };
template <>
struct HyperOf<AdagradRule> { using type = AdagradHyper; };
template <int C, int M>
struct HyperOf<RmspropRule<C, M>> { using type = RmspropHyper; };
template <>
struct HyperOf<AdamaxRule> { using type = AdamaxHyper; };
template <>
struct HyperOf<NadamRule> { using type = NadamHyper; };
template <>
struct HyperOf<AdadeltaRule> { using type = AdadeltaHyper; };
template <>
struct HyperOf<RpropRule> { using type = RpropHyper; };
template <>
struct HyperOf<OgrRule> { using type = OgrHyper; };
template <class Rule>
using HyperT = typename HyperOf<Rule>::type;

// What a CUDA step is given besides the batch: the hyperparameters and host scalars (from which the kernel makes
// the coefficients itself when the counts are on the device), the host-made coefficients (used otherwise), and
// the device-side extras read by the kernel instead of host values (no host sync): a float scale multiplied into
// grad_scale and a float flag that skips the whole step when non-zero.
template <class Rule>
struct CudaStep {
  HyperT<Rule> hyper;
  StepScalars scalars;
  CoefD<Rule> coef;
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;
  bool device_counters = false;
  DType counter_dtype = DType::f32;
  DType product_dtype = DType::f32;
  bool step_dependent = true;  // the coefficients change with the count (capture then needs device counters)
  int64_t sr_step = 0;         // stochastic rounding's key: this step's count (host counts only)
};

// The global norm's reductions (global_norm_api.h: the order, the plan and the outputs).
struct GnPlan;
struct NormOutputs;

#define OPTKERN_DECLARE_CPU_EXECUTOR(NS)                                     \
  namespace NS {                                                             \
  template <class Rule>                                                      \
  void run_rule(const StepBatch& b, const CoefD<Rule>& c, int64_t sr_step);  \
  double sum_squares(const StepBatch& b, const GnPlan& plan);                \
  double max_abs(const StepBatch& b, const GnPlan& plan);                    \
  void convert_half(int op, DType d, const void* src, void* dst, int64_t n,  \
                    uint64_t seed, uint32_t step, uint32_t tensor, uint64_t index0); \
  }

OPTKERN_DECLARE_CPU_EXECUTOR(cpu_scalar)
OPTKERN_DECLARE_CPU_EXECUTOR(cpu_avx2)
OPTKERN_DECLARE_CPU_EXECUTOR(cpu_avx512)

namespace cuda_exec {
template <class Rule>
void run_rule(const StepBatch& b, const CudaStep<Rule>& step);
double global_norm_host(const StepBatch& b, bool inf);  // the norm, copied to the host (one sync)
void global_norm_device(const StepBatch& b, bool inf, const NormOutputs& out);  // no sync
bool available();
}  // namespace cuda_exec

}  // namespace optkern
