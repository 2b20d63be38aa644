// The per-step scalars of every optimizer (the rules' Coef<double>), computed from the hyperparameters and the
// step count: the one place they are written.  The same functions run on the host (optim_api.cpp, for the CPU
// executor and for CUDA steps whose count is a host number) and on the device (cuda/optim_cuda.cu, for steps whose
// count lives in device memory: torch's capturable state["step"], replayed by CUDA graphs), so the two give the
// same coefficients bit for bit.  To make that hold they use only +, -, *, / and sqrt (IEEE-rounded on both
// sides; no FMA contraction on either) and no libm call: a power beta^t is computed by binary powering in double
// (ok_powi), the same sequence of multiplications on both sides.  Its value can differ from pow(beta, t) (what
// torch computes) in the last bits of a double, about log2(t) ulp at most, far below float32 resolution.
// NAdam's 0.96^(t psi) is q^t with q = 0.96^psi computed once by the host's pow (StepScalars::nadam_q).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.h"
#include "optim_api.h"
#include "optim_rules.h"

namespace optkern {

// beta^n for an integral n >= 0 (given as a double: the counters are float32 or float64), by binary powering.
OK_HD double ok_powi(double beta, double n) {
  uint64_t k = static_cast<uint64_t>(n);
  double result = 1.0, x = beta;
  while (k != 0) {
    if (k & 1u) result = result * x;
    x = x * x;
    k >>= 1;
  }
  return result;
}

// What a step's scalars depend on besides the hyperparameters.
struct StepScalars {
  double t = 1.0;           // the count of steps including this one (1 on the first)
  double gscale = 1.0;      // grad_scale * (maximize ? -1 : 1), before a device grad_scale is multiplied in
  double mu_product = 1.0;  // NAdam: the product of mu_1..mu_{t-1} (1 before the first step)
  bool product_f32 = false; // NAdam: the product is kept (and rounded) in float32, as torch's state tensor
  double nadam_q = 1.0;     // NAdam: 0.96^momentum_decay (host pow, computed once per call)
};

// Whether the coefficients change with the step count (a step captured in a CUDA graph then needs a device count).
inline bool depends_on_step(const SgdHyper& h) { return h.momentum != 0.0 && !h.velocity; }
inline bool depends_on_step(const AdamHyper& h) { return h.bias_correction; }
inline bool depends_on_step(const AdagradHyper& h) { return h.lr_decay != 0.0; }
inline bool depends_on_step(const RmspropHyper&) { return false; }
inline bool depends_on_step(const AdamaxHyper&) { return true; }
inline bool depends_on_step(const NadamHyper&) { return true; }
inline bool depends_on_step(const AdadeltaHyper&) { return false; }
inline bool depends_on_step(const RpropHyper&) { return false; }
inline bool depends_on_step(const OgrHyper&) { return true; }  // the first step and the warm-up

// ---- one function per rule's Coef type (overloaded on the output) -------------------------------------------------
OK_HD void make_coef(const SgdHyper& h, const StepScalars& s, SgdCoef<double>* c) {
  c->gscale = s.gscale;
  c->wd = h.weight_decay;
  c->neg_lr = -h.lr;
  c->momentum = h.momentum;
  c->one_minus_dampening = 1.0 - h.dampening;
  c->nesterov = h.nesterov;
  c->first_step = s.t == 1.0;
}

OK_HD void make_coef(const SgdHyper& h, const StepScalars& s, SgdVelocityRule::Coef<double>* c) {
  c->gscale = s.gscale;
  c->wd = h.weight_decay;
  c->neg_lr = -h.lr;
  c->momentum = h.momentum;
  c->one_plus_momentum = 1.0 + h.momentum;
  c->nesterov = h.nesterov;
}

// The fields Adam and NAdam share: weight decay (decoupled or L2) and the two moments' weights.
template <class Hyper, class CoefDT>
OK_HD void moment_coefs(const Hyper& h, const StepScalars& s, CoefDT* c) {
  c->gscale = s.gscale;
  c->decay = h.decoupled_weight_decay ? 1.0 - h.lr * h.weight_decay : 1.0;
  c->wd = h.decoupled_weight_decay ? 0.0 : h.weight_decay;
  c->beta1_w = 1.0 - h.beta1;
  c->beta2 = h.beta2;
  c->one_minus_beta2 = 1.0 - h.beta2;
}

OK_HD void make_coef(const AdamHyper& h, const StepScalars& s, AdamCoef<double>* c) {
  const double bc1 = h.bias_correction ? 1.0 - ok_powi(h.beta1, s.t) : 1.0;
  const double bc2 = h.bias_correction ? 1.0 - ok_powi(h.beta2, s.t) : 1.0;
  moment_coefs(h, s, c);
  if (h.eps_inside_sqrt) {  // Algorithm 8.7: sqrt(r / (1 - rho2^t) + delta)
    c->bc2_in = bc2;
    c->eps_in = h.eps;
    c->bc2_sqrt_out = 1.0;
    c->eps_out = 0.0;
  } else {  // torch: sqrt(v) / sqrt(1 - beta2^t) + eps
    c->bc2_in = 1.0;
    c->eps_in = 0.0;
    c->bc2_sqrt_out = OK_SQRT(bc2);
    c->eps_out = h.eps;
  }
  c->neg_step_size = -h.lr / bc1;
}

OK_HD void make_coef(const AdagradHyper& h, const StepScalars& s, AdagradRule::Coef<double>* c) {
  c->gscale = s.gscale;
  c->wd = h.weight_decay;
  c->eps = h.eps;
  c->neg_clr = -(h.lr / (1.0 + (s.t - 1.0) * h.lr_decay));
}

OK_HD void make_coef(const RmspropHyper& h, const StepScalars& s, RmspropCoef<double>* c) {
  c->gscale = s.gscale;
  c->wd = h.weight_decay;
  c->alpha = h.alpha;
  c->one_minus_alpha = 1.0 - h.alpha;
  c->eps_in = h.eps_inside_sqrt ? h.eps : 0.0;
  c->eps_out = h.eps_inside_sqrt ? 0.0 : h.eps;
  c->neg_lr = -h.lr;
  c->momentum = h.momentum;
  c->buf_gain = h.nesterov ? -h.lr : 1.0;
  c->one_plus_momentum = 1.0 + h.momentum;
  c->nesterov = h.nesterov;
}

OK_HD void make_coef(const AdamaxHyper& h, const StepScalars& s, AdamaxRule::Coef<double>* c) {
  c->gscale = s.gscale;
  c->wd = h.weight_decay;
  c->beta1_w = 1.0 - h.beta1;
  c->beta2 = h.beta2;
  c->eps = h.eps;
  c->neg_clr = -(h.lr / (1.0 - ok_powi(h.beta1, s.t)));
}

// NAdam's mu_t = beta1 (1 - 0.5 * 0.96^(t psi)) (torch / Dozat), with 0.96^(t psi) = q^t.
OK_HD double nadam_mu(const NadamHyper& h, const StepScalars& s, double t) {
  return h.beta1 * (1.0 - 0.5 * ok_powi(s.nadam_q, t));
}

// The product of mu_1..mu_t after step t (what the state keeps for the next step).
OK_HD double nadam_product_after(const NadamHyper& h, const StepScalars& s) {
  const double mu = h.momentum_schedule ? nadam_mu(h, s, s.t) : h.beta1;
  return s.product_f32 ? static_cast<double>(static_cast<float>(s.mu_product) * static_cast<float>(mu))
                       : s.mu_product * mu;
}

OK_HD void make_coef(const NadamHyper& h, const StepScalars& s, NadamRule::Coef<double>* c) {
  moment_coefs(h, s, c);
  c->bc2 = 1.0 - ok_powi(h.beta2, s.t);
  c->eps = h.eps;
  if (h.momentum_schedule) {  // torch: coef_g = -lr (1 - mu_t) / (1 - prod mu), coef_m = -lr mu_{t+1} / (1 - prod mu_{t+1})
    const double mu = nadam_mu(h, s, s.t);
    const double mu_next = nadam_mu(h, s, s.t + 1.0);
    const double product = nadam_product_after(h, s);
    c->coef_g = -h.lr * (1.0 - mu) / (1.0 - product);
    c->coef_m = (-h.lr * mu_next) / (1.0 - product * mu_next);
  } else {  // seed 002: (beta1 m + (1 - beta1) g) / (1 - beta1^t)
    const double bc1 = 1.0 - ok_powi(h.beta1, s.t);
    c->coef_g = -h.lr * (1.0 - h.beta1) / bc1;
    c->coef_m = -h.lr * h.beta1 / bc1;
  }
}

OK_HD void make_coef(const AdadeltaHyper& h, const StepScalars& s, AdadeltaRule::Coef<double>* c) {
  c->gscale = s.gscale;
  c->wd = h.weight_decay;
  c->rho = h.rho;
  c->one_minus_rho = 1.0 - h.rho;
  c->eps = h.eps;
  c->neg_lr = -h.lr;
}

OK_HD void make_coef(const RpropHyper& h, const StepScalars& s, RpropRule::Coef<double>* c) {
  c->gscale = s.gscale;
  c->etaminus = h.etaminus;
  c->etaplus = h.etaplus;
  c->step_min = h.step_size_min;
  c->step_max = h.step_size_max;
}

OK_HD void make_coef(const OgrHyper& h, const StepScalars& s, OgrRule::Coef<double>* c) {
  c->gscale = s.gscale;
  c->wd = h.weight_decay;
  c->beta = h.beta;
  c->one_minus_beta = 1.0 - h.beta;
  c->neg_alpha = -h.lr;
  c->neg_sgd_lr = -h.sgd_lr;
  c->sgd_lr = h.sgd_lr;
  c->trust = h.trust;
  c->eps = h.eps;
  c->first_step = s.t == 1.0;
  c->fit = s.t > static_cast<double>(h.warmup);
}

// ---- step counters kept in memory (StepInfo::device_counters) ------------------------------------------------------
// A counter's value (a float32 or float64 element), read and written the same way on host and device.
OK_HD double load_counter(const void* p, DType dt) {
  return dt == DType::f64 ? *static_cast<const double*>(p) : static_cast<double>(*static_cast<const float*>(p));
}
OK_HD void store_counter(void* p, DType dt, double v) {
  if (dt == DType::f64) *static_cast<double*>(p) = v;
  else *static_cast<float*>(p) = static_cast<float>(v);
}

// One counter's work in a step: the coefficients of step `taken + 1` (with NAdam's running product when the counter
// has one) and the counter's next values.  The CUDA executor runs it in one thread per distinct counter; the CPU
// executor (host-memory counters) runs it per distinct counter too, so the CPU tests check what each GPU thread does.
template <class Hyper, class CoefDT>
OK_HD void counter_step(const Hyper& h, const StepScalars& base, double taken, bool has_product, double product,
                        CoefDT* c, double* next_taken, double* next_product) {
  StepScalars s = base;
  s.t = taken + 1.0;
  if (has_product) s.mu_product = product;
  make_coef(h, s, c);
  *next_taken = taken + 1.0;
  *next_product = product;
  if constexpr (std::is_same<Hyper, NadamHyper>::value) {  // the only hyperparameters with a running product
    if (has_product) *next_product = nadam_product_after(h, s);
  }
}

}  // namespace optkern
