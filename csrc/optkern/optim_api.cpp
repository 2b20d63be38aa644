// Hyperparameter checks, per-step host scalars and dispatch to the CPU or CUDA executor.
#include "optim_api.h"

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

#include "cpu/thread_pool.h"
#include "executors.h"

#include "arg_error.h"

namespace optkern {
namespace {

[[noreturn]] void bad(const char* name, const char* expected, double got) { bad_arg(name, expected, got); }
void finite_ge0(const char* name, double v) {
  if (!(std::isfinite(v) && v >= 0.0)) bad(name, "a finite number >= 0", v);
}
void unit_open(const char* name, double v) {  // [0, 1)
  if (!(v >= 0.0 && v < 1.0)) bad(name, "a number in [0, 1)", v);
}
void unit_closed(const char* name, double v) {  // [0, 1]
  if (!(v >= 0.0 && v <= 1.0)) bad(name, "a number in [0, 1]", v);
}

// ---- CPU instruction-set dispatch -------------------------------------------------------------------
CpuIsa detect_best() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    return CpuIsa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::avx2;
#endif
  return CpuIsa::scalar;
}
CpuIsa& current_isa() {
  static CpuIsa isa = detect_best();
  return isa;
}

template <class Rule>
void run(const StepBatch& b, const CoefD<Rule>& c, const StepInfo& s) {
  if (b.device.kind == DeviceKind::cuda) {
    cuda_exec::run_rule<Rule>(b, c, DeviceScalars{s.grad_scale_device, s.found_inf_device});
    return;
  }
  if (s.grad_scale_device || s.found_inf_device)
    throw std::invalid_argument("grad_scale/found_inf: device scalars are for CUDA arrays; pass numbers on the CPU");
  switch (current_isa()) {
    case CpuIsa::avx512: cpu_avx512::run_rule<Rule>(b, c); break;
    case CpuIsa::avx2: cpu_avx2::run_rule<Rule>(b, c); break;
    default: cpu_scalar::run_rule<Rule>(b, c); break;
  }
}

double grad_sign_scale(const StepInfo& s) { return s.maximize ? -s.grad_scale : s.grad_scale; }

}  // namespace

// ---- checks -------------------------------------------------------------------------------------------
void check(const StepInfo& s) {
  if (s.step < 1) bad("step", "an integer >= 1 (the count of steps including this one)", double(s.step));
  if (!std::isfinite(s.grad_scale)) bad("grad_scale", "a finite number", s.grad_scale);
}
void check(const SgdHyper& h) {
  finite_ge0("lr", h.lr);
  finite_ge0("momentum", h.momentum);
  if (!std::isfinite(h.dampening)) bad("dampening", "a finite number", h.dampening);
  finite_ge0("weight_decay", h.weight_decay);
  if (h.nesterov && (h.momentum <= 0.0 || h.dampening != 0.0))
    throw std::invalid_argument("nesterov: requires momentum > 0 and dampening = 0");
  if (h.velocity && h.dampening != 0.0)
    throw std::invalid_argument("dampening: must be 0 with velocity=True (Algorithms 8.2/8.3 have none)");
}
void check(const AdamHyper& h) {
  finite_ge0("lr", h.lr);
  unit_open("beta1 (betas[0])", h.beta1);
  unit_open("beta2 (betas[1])", h.beta2);
  finite_ge0("eps", h.eps);
  finite_ge0("weight_decay", h.weight_decay);
}
void check(const AdagradHyper& h) {
  finite_ge0("lr", h.lr);
  finite_ge0("lr_decay", h.lr_decay);
  finite_ge0("weight_decay", h.weight_decay);
  finite_ge0("eps", h.eps);
}
void check(const RmspropHyper& h) {
  finite_ge0("lr", h.lr);
  unit_closed("alpha", h.alpha);
  finite_ge0("eps", h.eps);
  finite_ge0("weight_decay", h.weight_decay);
  finite_ge0("momentum", h.momentum);
  if (h.nesterov && h.momentum <= 0.0) throw std::invalid_argument("nesterov: requires momentum > 0");
}
void check(const AdamaxHyper& h) {
  finite_ge0("lr", h.lr);
  unit_open("beta1 (betas[0])", h.beta1);
  unit_open("beta2 (betas[1])", h.beta2);
  finite_ge0("eps", h.eps);
  finite_ge0("weight_decay", h.weight_decay);
}
void check(const NadamHyper& h) {
  finite_ge0("lr", h.lr);
  unit_open("beta1 (betas[0])", h.beta1);
  unit_open("beta2 (betas[1])", h.beta2);
  finite_ge0("eps", h.eps);
  finite_ge0("weight_decay", h.weight_decay);
  finite_ge0("momentum_decay", h.momentum_decay);
}
void check(const AdadeltaHyper& h) {
  finite_ge0("lr", h.lr);
  unit_closed("rho", h.rho);
  finite_ge0("eps", h.eps);
  finite_ge0("weight_decay", h.weight_decay);
}
void check(const RpropHyper& h) {
  finite_ge0("lr", h.lr);
  if (!(h.etaminus > 0.0 && h.etaminus < 1.0)) bad("etas[0] (etaminus)", "a number in (0, 1)", h.etaminus);
  if (!(std::isfinite(h.etaplus) && h.etaplus > 1.0)) bad("etas[1] (etaplus)", "a finite number > 1", h.etaplus);
  finite_ge0("step_sizes[0] (min)", h.step_size_min);
  if (!(std::isfinite(h.step_size_max) && h.step_size_max >= h.step_size_min))
    bad("step_sizes[1] (max)", "a finite number >= step_sizes[0]", h.step_size_max);
}

int sgd_num_states(const SgdHyper& h) { return (h.momentum != 0.0 || h.velocity) ? 1 : 0; }
int adam_num_states(const AdamHyper& h) { return h.amsgrad ? 3 : 2; }
int rmsprop_num_states(const RmspropHyper& h) { return 1 + (h.centered ? 1 : 0) + (h.momentum > 0.0 ? 1 : 0); }

// ---- steps: host scalars, then one pass -----------------------------------------------------------------
void sgd_step(const StepBatch& b, const SgdHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  if (h.velocity) {
    CoefD<SgdVelocityRule> c;
    c.gscale = grad_sign_scale(s);
    c.wd = h.weight_decay;
    c.neg_lr = -h.lr;
    c.momentum = h.momentum;
    c.one_plus_momentum = 1.0 + h.momentum;
    c.nesterov = h.nesterov;
    run<SgdVelocityRule>(b, c, s);
    return;
  }
  CoefD<SgdMomentum> c;
  c.gscale = grad_sign_scale(s);
  c.wd = h.weight_decay;
  c.neg_lr = -h.lr;
  c.momentum = h.momentum;
  c.one_minus_dampening = 1.0 - h.dampening;
  c.nesterov = h.nesterov;
  c.first_step = s.step == 1;
  if (h.momentum != 0.0)
    run<SgdMomentum>(b, c, s);
  else
    run<SgdPlain>(b, c, s);  // same coefficients; the plain rule reads no momentum field
}

void adam_step(const StepBatch& b, const AdamHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  const double t = static_cast<double>(s.step);
  const double bc1 = h.bias_correction ? 1.0 - std::pow(h.beta1, t) : 1.0;
  const double bc2 = h.bias_correction ? 1.0 - std::pow(h.beta2, t) : 1.0;
  CoefD<AdamPlain> c;
  c.gscale = grad_sign_scale(s);
  c.decay = h.decoupled_weight_decay ? 1.0 - h.lr * h.weight_decay : 1.0;
  c.wd = h.decoupled_weight_decay ? 0.0 : h.weight_decay;
  c.beta1_w = 1.0 - h.beta1;
  c.beta2 = h.beta2;
  c.one_minus_beta2 = 1.0 - h.beta2;
  if (h.eps_inside_sqrt) {  // Algorithm 8.7: sqrt(r / (1 - rho2^t) + delta)
    c.bc2_in = bc2;
    c.eps_in = h.eps;
    c.bc2_sqrt_out = 1.0;
    c.eps_out = 0.0;
  } else {  // torch: sqrt(v) / sqrt(1 - beta2^t) + eps
    c.bc2_in = 1.0;
    c.eps_in = 0.0;
    c.bc2_sqrt_out = std::sqrt(bc2);
    c.eps_out = h.eps;
  }
  c.neg_step_size = -h.lr / bc1;
  if (h.amsgrad) {
    CoefD<AdamAmsgrad> a(c);
    run<AdamAmsgrad>(b, a, s);
  } else {
    run<AdamPlain>(b, c, s);
  }
}

void adagrad_step(const StepBatch& b, const AdagradHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  CoefD<AdagradRule> c;
  c.gscale = grad_sign_scale(s);
  c.wd = h.weight_decay;
  c.eps = h.eps;
  c.neg_clr = -(h.lr / (1.0 + (static_cast<double>(s.step) - 1.0) * h.lr_decay));
  run<AdagradRule>(b, c, s);
}

void rmsprop_step(const StepBatch& b, const RmspropHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  CoefD<RmspropPlain> c;
  c.gscale = grad_sign_scale(s);
  c.wd = h.weight_decay;
  c.alpha = h.alpha;
  c.one_minus_alpha = 1.0 - h.alpha;
  c.eps_in = h.eps_inside_sqrt ? h.eps : 0.0;
  c.eps_out = h.eps_inside_sqrt ? 0.0 : h.eps;
  c.neg_lr = -h.lr;
  c.momentum = h.momentum;
  c.buf_gain = h.nesterov ? -h.lr : 1.0;
  c.one_plus_momentum = 1.0 + h.momentum;
  c.nesterov = h.nesterov;
  const bool mom = h.momentum > 0.0;
  if (h.centered && mom) run<RmspropCenteredMomentum>(b, CoefD<RmspropCenteredMomentum>(c), s);
  else if (h.centered) run<RmspropCentered>(b, CoefD<RmspropCentered>(c), s);
  else if (mom) run<RmspropMomentum>(b, CoefD<RmspropMomentum>(c), s);
  else run<RmspropPlain>(b, c, s);
}

void adamax_step(const StepBatch& b, const AdamaxHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  CoefD<AdamaxRule> c;
  c.gscale = grad_sign_scale(s);
  c.wd = h.weight_decay;
  c.beta1_w = 1.0 - h.beta1;
  c.beta2 = h.beta2;
  c.eps = h.eps;
  c.neg_clr = -(h.lr / (1.0 - std::pow(h.beta1, static_cast<double>(s.step))));
  run<AdamaxRule>(b, c, s);
}

double nadam_step(const StepBatch& b, const NadamHyper& h, const StepInfo& s, double mu_product,
                  bool product_in_float32) {
  check(h);
  check(s);
  if (!(mu_product >= 0.0 && mu_product <= 1.0))  // may underflow to 0 after many steps with a small beta1
    bad("mu_product", "a number in [0, 1] (the product of mu_1..mu_{t-1}; 1 before the first step)", mu_product);
  const double t = static_cast<double>(s.step);
  CoefD<NadamRule> c;
  c.gscale = grad_sign_scale(s);
  c.decay = h.decoupled_weight_decay ? 1.0 - h.lr * h.weight_decay : 1.0;
  c.wd = h.decoupled_weight_decay ? 0.0 : h.weight_decay;
  c.beta1_w = 1.0 - h.beta1;
  c.beta2 = h.beta2;
  c.one_minus_beta2 = 1.0 - h.beta2;
  c.bc2 = 1.0 - std::pow(h.beta2, t);
  c.eps = h.eps;
  double new_product;
  if (h.momentum_schedule) {  // torch / Dozat: mu_t = beta1 (1 - 0.5 * 0.96^(t psi))
    const double mu = h.beta1 * (1.0 - 0.5 * std::pow(0.96, t * h.momentum_decay));
    const double mu_next = h.beta1 * (1.0 - 0.5 * std::pow(0.96, (t + 1.0) * h.momentum_decay));
    new_product = product_in_float32 ? double(float(mu_product) * float(mu)) : mu_product * mu;
    c.coef_g = -h.lr * (1.0 - mu) / (1.0 - new_product);
    c.coef_m = (-h.lr * mu_next) / (1.0 - new_product * mu_next);
  } else {  // seed 002: (beta1 m + (1 - beta1) g) / (1 - beta1^t)
    const double bc1 = 1.0 - std::pow(h.beta1, t);
    new_product = product_in_float32 ? double(float(mu_product) * float(h.beta1)) : mu_product * h.beta1;
    c.coef_g = -h.lr * (1.0 - h.beta1) / bc1;
    c.coef_m = -h.lr * h.beta1 / bc1;
  }
  run<NadamRule>(b, c, s);
  return new_product;
}

void adadelta_step(const StepBatch& b, const AdadeltaHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  CoefD<AdadeltaRule> c;
  c.gscale = grad_sign_scale(s);
  c.wd = h.weight_decay;
  c.rho = h.rho;
  c.one_minus_rho = 1.0 - h.rho;
  c.eps = h.eps;
  c.neg_lr = -h.lr;
  run<AdadeltaRule>(b, c, s);
}

void rprop_step(const StepBatch& b, const RpropHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  CoefD<RpropRule> c;
  c.gscale = grad_sign_scale(s);
  c.etaminus = h.etaminus;
  c.etaplus = h.etaplus;
  c.step_min = h.step_size_min;
  c.step_max = h.step_size_max;
  run<RpropRule>(b, c, s);
}

// ---- CPU control ------------------------------------------------------------------------------------------
CpuIsa cpu_isa() { return current_isa(); }
CpuIsa cpu_best_isa() {
  static CpuIsa best = detect_best();
  return best;
}
const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "scalar";
  }
}
void set_cpu_isa(CpuIsa isa) {
  if (static_cast<int>(isa) > static_cast<int>(cpu_best_isa()))
    throw std::invalid_argument(std::string("isa: ") + cpu_isa_name(isa) + " is not supported by this CPU (best: " +
                                cpu_isa_name(cpu_best_isa()) + ")");
  current_isa() = isa;
}
void set_num_threads(int n) { pool_set_num_threads(n); }
int get_num_threads() { return pool_num_threads(); }

}  // namespace optkern
