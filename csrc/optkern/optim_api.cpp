// Hyperparameter checks, per-step host scalars and dispatch to the CPU or CUDA executor.
#include "optim_api.h"

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

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
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return CpuIsa::avx2;
#endif
  return CpuIsa::scalar;
}
CpuIsa& current_isa() {
  static CpuIsa isa = detect_best();
  return isa;
}

template <class Rule>
void run_cpu(const StepBatch& b, const CoefD<Rule>& c, int64_t sr_step) {
  switch (current_isa()) {
    case CpuIsa::avx512: cpu_avx512::run_rule<Rule>(b, c, sr_step); break;
    case CpuIsa::avx2: cpu_avx2::run_rule<Rule>(b, c, sr_step); break;
    default: cpu_scalar::run_rule<Rule>(b, c, sr_step); break;
  }
}

// CPU arrays whose step counts are kept in (host) memory, as the CUDA executor keeps device counts: per distinct
// counter, counter_step (optim_coefs.h, what each GPU thread runs) makes the coefficients of its count + 1; the
// tensors sharing it take one executor call; then every counter (and NAdam product) takes its next value.
template <class Rule>
void run_counted(const StepBatch& b, const HyperT<Rule>& h, const StepScalars& sc, const StepInfo& s) {
  std::vector<void*> order;                               // distinct counters, first use first
  std::unordered_map<void*, StepBatch> groups;
  for (size_t i = 0; i < b.tensors.size(); ++i) {
    TensorSlots t = b.tensors[i];
    if (t.key_index < 0) t.key_index = static_cast<int64_t>(i);  // its position in the call, kept when regrouped
    if (t.step == nullptr) throw std::invalid_argument("step: a tensor without its step counter");
    auto it = groups.find(t.step);
    if (it == groups.end()) {
      order.push_back(t.step);
      it = groups.emplace(t.step, StepBatch{b.dtype, b.device, b.stream, {}, b.prec}).first;
    }
    it->second.tensors.push_back(t);
  }
  struct Next {
    void* step;
    void* product;
    double taken, mu;
  };
  std::vector<Next> next;
  for (void* key : order) {
    const StepBatch& g = groups[key];
    void* prod = g.tensors.front().mu_product;
    CoefD<Rule> c;
    Next n{key, prod, 0.0, 1.0};
    const double taken = load_counter(key, s.counter_dtype);
    counter_step(h, sc, taken, prod != nullptr, prod != nullptr ? load_counter(prod, s.product_dtype) : 1.0, &c,
                 &n.taken, &n.mu);
    run_cpu<Rule>(g, c, static_cast<int64_t>(taken) + 1);  // stochastic rounding's key: this step's count
    next.push_back(n);
  }
  for (const Next& n : next) {  // after every update: a counter is read once, before any is written
    if (n.product != nullptr) store_counter(n.product, s.product_dtype, n.mu);
    store_counter(n.step, s.counter_dtype, n.taken);
  }
}

// Make the rule's coefficients on the host (optim_coefs.h) and run the executor.  A CUDA step gets the
// hyperparameters and scalars too: with device counters its kernel makes the same coefficients on the device.
template <class Rule>
void run(const StepBatch& b, const HyperT<Rule>& h, const StepInfo& s, const StepScalars& sc) {
  check_precision(b);
  if (b.prec.stochastic && s.device_counters && b.device.kind == DeviceKind::cuda)
    throw std::invalid_argument(
        "stochastic_rounding: needs the step count on the host (the key of the rounding); device step counters "
        "are not supported with it");
  CoefD<Rule> c;
  make_coef(h, sc, &c);
  if (b.device.kind == DeviceKind::cuda) {
    CudaStep<Rule> cs;
    cs.hyper = h;
    cs.scalars = sc;
    cs.coef = c;
    cs.grad_scale = s.grad_scale_device;
    cs.found_inf = s.found_inf_device;
    cs.device_counters = s.device_counters;
    cs.counter_dtype = s.counter_dtype;
    cs.product_dtype = s.product_dtype;
    cs.step_dependent = depends_on_step(h);
    cs.sr_step = s.step;
    cuda_exec::run_rule<Rule>(b, cs);
    return;
  }
  if (s.grad_scale_device || s.found_inf_device)
    throw std::invalid_argument("grad_scale/found_inf: device scalars are for CUDA arrays; pass numbers on the CPU");
  if (s.device_counters) {
    run_counted<Rule>(b, h, sc, s);
    return;
  }
  run_cpu<Rule>(b, c, s.step);
}

double grad_sign_scale(const StepInfo& s) { return s.maximize ? -s.grad_scale : s.grad_scale; }

StepScalars scalars_of(const StepInfo& s) {
  StepScalars sc;
  sc.t = static_cast<double>(s.step);
  sc.gscale = grad_sign_scale(s);
  return sc;
}

}  // namespace

// ---- checks -------------------------------------------------------------------------------------------
const char* master_mode_name(MasterMode m) {
  switch (m) {
    case MasterMode::fp32: return "fp32";
    case MasterMode::split: return "split";
    default: return "None";
  }
}

void check_precision(const StepBatch& b) {
  const Precision& p = b.prec;
  if (!p.mixed) {
    if (b.dtype != DType::f32 && b.dtype != DType::f64 && !is_half(b.dtype))
      throw std::invalid_argument(std::string("params: ") + dtype_name(b.dtype) + " params are not supported");
    if (is_half(b.dtype))
      throw std::invalid_argument("params: 16-bit params need their storage types described (Precision::mixed)");
    return;
  }
  const std::string pd = dtype_name(b.dtype);
  if (b.dtype == DType::f64) throw std::invalid_argument("params: float64 params take float64 grads and states only");
  if (b.dtype == DType::f32) {
    if (!(p.grad == DType::f32 || is_half(p.grad)))
      throw std::invalid_argument(std::string("grads: expected float32, bfloat16 or float16 for float32 params, got ") +
                                  dtype_name(p.grad));
    if (p.state != DType::f32)
      throw std::invalid_argument(std::string("states: float32 params keep float32 state, got ") + dtype_name(p.state));
    if (p.master != MasterMode::none)
      throw std::invalid_argument("master_weights: float32 params are their own master (use None)");
    if (p.stochastic) throw std::invalid_argument("stochastic_rounding: applies to 16-bit params only");
    if (p.copy && !is_half(p.copy_dtype))
      throw std::invalid_argument(std::string("param_copies: expected bfloat16 or float16 copies, got ") +
                                  dtype_name(p.copy_dtype));
    return;
  }
  if (!is_half(b.dtype)) throw std::invalid_argument("params: " + pd + " params are not supported");
  if (p.grad != b.dtype)
    throw std::invalid_argument("grads: expected " + pd + " like the params (16-bit params take grads of their own "
                                "dtype), got " + dtype_name(p.grad));
  if (!(p.state == DType::f32 || p.state == b.dtype || p.state == DType::bf16))
    throw std::invalid_argument("states: expected float32, bfloat16 or " + pd + " state for " + pd +
                                " params, got " + dtype_name(p.state));
  if (p.master == MasterMode::split && b.dtype != DType::bf16)
    throw std::invalid_argument("master_weights: \"split\" needs bfloat16 params (the float32 master's high half is "
                                "a bfloat16), got " + pd + "; use \"fp32\"");
  if (p.stochastic && p.master != MasterMode::none)
    throw std::invalid_argument(std::string("stochastic_rounding: only without a master copy (master_weights=None); "
                                            "got master_weights=") + master_mode_name(p.master));
  if (p.copy) throw std::invalid_argument("param_copies: only for float32 params (16-bit params are the copy)");
  for (size_t i = 0; i < b.tensors.size(); ++i)
    if (p.master != MasterMode::none && b.tensors[i].numel > 0 && b.tensors[i].master == nullptr)
      throw std::invalid_argument("masters[" + std::to_string(i) + "]: missing");
}

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

void check(const OgrHyper& h) {
  if (!(std::isfinite(h.lr) && h.lr >= 0.0)) bad("lr", "a finite number >= 0 (the step factor alpha)", h.lr);
  finite_ge0("sgd_lr", h.sgd_lr);
  if (!(h.beta > 0.0 && h.beta < 1.0)) bad("beta", "a number in (0, 1)", h.beta);
  if (!(std::isfinite(h.trust) && h.trust > 0.0)) bad("trust", "a finite number > 0", h.trust);
  finite_ge0("eps", h.eps);
  finite_ge0("weight_decay", h.weight_decay);
  if (h.warmup < 0 || h.warmup >= (int64_t(1) << 62))
    bad("warmup", "an integer >= 0 and < 2**62", static_cast<double>(h.warmup));
}

int sgd_num_states(const SgdHyper& h) { return (h.momentum != 0.0 || h.velocity) ? 1 : 0; }
int adam_num_states(const AdamHyper& h) { return h.amsgrad ? 3 : 2; }
int rmsprop_num_states(const RmspropHyper& h) { return 1 + (h.centered ? 1 : 0) + (h.momentum > 0.0 ? 1 : 0); }

// ---- steps: host scalars, then one pass -----------------------------------------------------------------
void sgd_step(const StepBatch& b, const SgdHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  const StepScalars sc = scalars_of(s);
  if (h.velocity) run<SgdVelocityRule>(b, h, s, sc);
  else if (h.momentum != 0.0) run<SgdMomentum>(b, h, s, sc);
  else run<SgdPlain>(b, h, s, sc);  // same coefficients; the plain rule reads no momentum field
}

void adam_step(const StepBatch& b, const AdamHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  const StepScalars sc = scalars_of(s);
  if (h.eps_inside_sqrt) {
    if (h.amsgrad) run<AdamAmsgradEpsInside>(b, h, s, sc);
    else run<AdamEpsInside>(b, h, s, sc);
  } else if (h.amsgrad) {
    run<AdamAmsgrad>(b, h, s, sc);
  } else {
    run<AdamPlain>(b, h, s, sc);
  }
}

void adagrad_step(const StepBatch& b, const AdagradHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  run<AdagradRule>(b, h, s, scalars_of(s));
}

void rmsprop_step(const StepBatch& b, const RmspropHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  const StepScalars sc = scalars_of(s);
  const bool mom = h.momentum > 0.0;
  if (h.centered && mom) run<RmspropCenteredMomentum>(b, h, s, sc);
  else if (h.centered) run<RmspropCentered>(b, h, s, sc);
  else if (mom) run<RmspropMomentum>(b, h, s, sc);
  else run<RmspropPlain>(b, h, s, sc);
}

void adamax_step(const StepBatch& b, const AdamaxHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  run<AdamaxRule>(b, h, s, scalars_of(s));
}

double nadam_step(const StepBatch& b, const NadamHyper& h, const StepInfo& s, double mu_product,
                  bool product_in_float32) {
  check(h);
  check(s);
  if (!(mu_product >= 0.0 && mu_product <= 1.0))  // may underflow to 0 after many steps with a small beta1
    bad("mu_product", "a number in [0, 1] (the product of mu_1..mu_{t-1}; 1 before the first step)", mu_product);
  StepScalars sc = scalars_of(s);
  sc.mu_product = mu_product;
  sc.product_f32 = s.device_counters ? s.product_dtype == DType::f32 : product_in_float32;
  sc.nadam_q = std::pow(0.96, h.momentum_decay);  // mu_t = beta1 (1 - 0.5 q^t), see optim_coefs.h
  run<NadamRule>(b, h, s, sc);
  return s.device_counters ? std::nan("") : nadam_product_after(h, sc);
}

void adadelta_step(const StepBatch& b, const AdadeltaHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  run<AdadeltaRule>(b, h, s, scalars_of(s));
}

void rprop_step(const StepBatch& b, const RpropHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  run<RpropRule>(b, h, s, scalars_of(s));
}

void ogr_step(const StepBatch& b, const OgrHyper& h, const StepInfo& s) {
  check(h);
  check(s);
  run<OgrRule>(b, h, s, scalars_of(s));
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
void cpu_convert_half(int op, DType d, const void* src, void* dst, int64_t n, uint64_t seed, uint32_t step,
                      uint32_t tensor, uint64_t index0) {
  if (!is_half(d)) throw std::invalid_argument("dtype: expected bfloat16 or float16");
  if (op < 0 || op > 2) throw std::invalid_argument("op: expected 0, 1 or 2");
  switch (current_isa()) {
    case CpuIsa::avx512: cpu_avx512::convert_half(op, d, src, dst, n, seed, step, tensor, index0); break;
    case CpuIsa::avx2: cpu_avx2::convert_half(op, d, src, dst, n, seed, step, tensor, index0); break;
    default: cpu_scalar::convert_half(op, d, src, dst, n, seed, step, tensor, index0); break;
  }
}
void set_num_threads(int n) { pool_set_num_threads(n); }
int get_num_threads() { return pool_num_threads(); }

}  // namespace optkern
