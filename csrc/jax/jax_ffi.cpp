// XLA FFI handlers of optkern.jax (liboptkern_jax.so): optimizer steps, global norms and batch norm as XLA custom
// calls on the host (the "cpu" platform), built on optkern's C interface (optkern/optkern.h) only.
//
// Every handler validates what XLA hands it (buffer counts, dtypes, element counts) and returns an ffi::Error whose
// message names the argument ("grads[2]", "hyper.lr"); a failed optkern call returns optkern_last_error()'s
// message.  Errors surface in Python as exceptions raised by the jitted call.
//
// Operand layouts (the Python side, python/optkern/jax/_ffi.py, builds them):
//   optkern_step     args  lr, step, grad_scale, [mu_product], params[n], grads[n], states[k][n] (k-major)
//                    rets  params[n], states[k][n], [mu_product]          (params and states aliased to their args)
//                    attrs algo (string), n, n_states, maximize, has_mu_product, the algorithm's hyperparameters
//                          (float64 and int64 scalars named as in optkern.h; lr comes as the buffer)
//   optkern_global_norm   args arrays[n]; rets one scalar (float32 or float64); attrs norm_type
//   optkern_bn_forward    args x, [weight], [bias], [running_mean, running_var]
//                         rets y, stats (opaque: 2 * channels float64 as uint32 pairs: mean, invstd),
//                              [running_mean, running_var] (aliased)
//   optkern_bn_backward   args x, dy, [weight], stats; rets dx, [dweight, dbias]
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "optkern/optkern.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#define OPTKERN_JAX_EXPORT extern "C" __attribute__((visibility("default")))
OPTKERN_JAX_EXPORT XLA_FFI_Error* optkern_jax_step(XLA_FFI_CallFrame* call_frame);
OPTKERN_JAX_EXPORT XLA_FFI_Error* optkern_jax_global_norm(XLA_FFI_CallFrame* call_frame);
OPTKERN_JAX_EXPORT XLA_FFI_Error* optkern_jax_bn_forward(XLA_FFI_CallFrame* call_frame);
OPTKERN_JAX_EXPORT XLA_FFI_Error* optkern_jax_bn_backward(XLA_FFI_CallFrame* call_frame);
// The C interface's ABI version this library was built against (the Python side checks it against liboptkern's).
OPTKERN_JAX_EXPORT int32_t optkern_jax_abi_version(void) { return OPTKERN_ABI_VERSION; }

namespace {

ffi::Error invalid(const std::string& msg) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, msg); }

// A failed optkern call: its message, prefixed with the call's name.
ffi::Error optkern_failure(const char* call, optkern_status st) {
  ffi::ErrorCode code = st == OPTKERN_INVALID_ARGUMENT ? ffi::ErrorCode::kInvalidArgument
                        : st == OPTKERN_UNSUPPORTED    ? ffi::ErrorCode::kUnimplemented
                                                       : ffi::ErrorCode::kInternal;
  return ffi::Error(code, std::string(call) + ": " + optkern_last_error());
}

// The optkern dtype of an XLA element type, or -1.
int32_t optkern_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return OPTKERN_FLOAT32;
    case ffi::DataType::F64: return OPTKERN_FLOAT64;
    case ffi::DataType::BF16: return OPTKERN_BFLOAT16;
    case ffi::DataType::F16: return OPTKERN_FLOAT16;
    default: return -1;
  }
}

const char* dtype_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    case ffi::DataType::U32: return "uint32";
    default: return "an unsupported dtype";
  }
}

std::string indexed(const char* what, size_t i) { return std::string(what) + "[" + std::to_string(i) + "]"; }

// A scalar buffer (float32/float64/int32/int64) read on the host.
ffi::Error read_scalar(const ffi::AnyBuffer& b, const char* name, double* out) {
  if (b.element_count() != 1) return invalid(std::string(name) + ": expected a scalar, got " +
                                             std::to_string(b.element_count()) + " elements");
  const void* p = b.untyped_data();
  switch (b.element_type()) {
    case ffi::DataType::F32: *out = *static_cast<const float*>(p); break;
    case ffi::DataType::F64: *out = *static_cast<const double*>(p); break;
    case ffi::DataType::S32: *out = *static_cast<const int32_t*>(p); break;
    case ffi::DataType::S64: *out = static_cast<double>(*static_cast<const int64_t*>(p)); break;
    default: return invalid(std::string(name) + ": a scalar of " + dtype_name(b.element_type()) +
                            " (expected float32, float64, int32 or int64)");
  }
  return ffi::Error::Success();
}

double attr_f64(const ffi::Dictionary& d, const char* name, double def) {
  if (!d.contains(name)) return def;
  auto v = d.get<double>(name);
  return v.has_value() ? *v : def;
}

int64_t attr_i64(const ffi::Dictionary& d, const char* name, int64_t def) {
  if (!d.contains(name)) return def;
  auto v = d.get<int64_t>(name);
  return v.has_value() ? *v : def;
}

ffi::Error require_attr(const ffi::Dictionary& d, const char* name) {
  if (!d.contains(name)) return invalid(std::string("missing attribute ") + name);
  return ffi::Error::Success();
}

// A whole step's buffers, decoded from the variadic operands.
struct StepBuffers {
  int64_t n = 0, k = 0;
  std::vector<int64_t> numels;
  std::vector<void*> params;
  std::vector<const void*> grads;
  std::vector<std::vector<void*>> states;  // [k][n]
  int32_t dtype = OPTKERN_FLOAT32, grad_dtype = OPTKERN_FLOAT32, state_dtype = OPTKERN_FLOAT32;
};

// The output buffer of an aliased operand: XLA gives the operand's own buffer (donated, or a copy it made); if
// it ever gives another, the operand's contents are copied in first so the kernel updates them in place.
void* aliased_output(const ffi::AnyBuffer& in, ffi::Result<ffi::AnyBuffer>& out) {
  void* dst = out->untyped_data();
  const void* src = in.untyped_data();
  if (dst != src && in.size_bytes() != 0) std::memmove(dst, src, in.size_bytes());
  return dst;
}

ffi::Error decode_step(ffi::RemainingArgs& args, ffi::RemainingRets& rets, int64_t first_arg, int64_t n, int64_t k,
                       StepBuffers* sb) {
  if (n < 0 || k < 0 || k > OPTKERN_MAX_STATES) return invalid("bad tensor or state count");
  if (static_cast<int64_t>(args.size()) < first_arg + n * (2 + k) || static_cast<int64_t>(rets.size()) < n * (1 + k))
    return invalid("operand count does not match the attributes n and n_states");
  sb->n = n;
  sb->k = k;
  sb->numels.resize(n);
  sb->params.resize(n);
  sb->grads.resize(n);
  sb->states.assign(k, std::vector<void*>(n));
  ffi::DataType pt{}, gt{}, stt{};
  for (int64_t i = 0; i < n; ++i) {
    auto p = args.get<ffi::AnyBuffer>(first_arg + i);
    auto g = args.get<ffi::AnyBuffer>(first_arg + n + i);
    auto po = rets.get<ffi::AnyBuffer>(i);
    if (p.has_error()) return p.error();
    if (g.has_error()) return g.error();
    if (po.has_error()) return po.error();
    if (i == 0) {
      pt = p->element_type();
      gt = g->element_type();
    }
    if (p->element_type() != pt)
      return invalid(indexed("params", i) + ": " + dtype_name(p->element_type()) + ", params[0] is " +
                     dtype_name(pt) + " (every param of one step has one dtype)");
    if (g->element_type() != gt)
      return invalid(indexed("grads", i) + ": " + dtype_name(g->element_type()) + ", grads[0] is " + dtype_name(gt));
    const int64_t numel = static_cast<int64_t>(p->element_count());
    if (static_cast<int64_t>(g->element_count()) != numel)
      return invalid(indexed("grads", i) + ": " + std::to_string(g->element_count()) + " elements, params[" +
                     std::to_string(i) + "] has " + std::to_string(numel));
    if (static_cast<int64_t>((*po)->element_count()) != numel || (*po)->element_type() != pt)
      return invalid(indexed("result params", i) + ": does not match params[" + std::to_string(i) + "]");
    sb->numels[i] = numel;
    sb->params[i] = aliased_output(*p, *po);
    sb->grads[i] = g->untyped_data();
    for (int64_t s = 0; s < k; ++s) {
      auto st = args.get<ffi::AnyBuffer>(first_arg + 2 * n + s * n + i);
      auto so = rets.get<ffi::AnyBuffer>(n + s * n + i);
      if (st.has_error()) return st.error();
      if (so.has_error()) return so.error();
      if (i == 0 && s == 0) stt = st->element_type();
      const std::string name = "states[" + std::to_string(s) + "][" + std::to_string(i) + "]";
      if (st->element_type() != stt)
        return invalid(name + ": " + dtype_name(st->element_type()) + ", states[0][0] is " + dtype_name(stt));
      if (static_cast<int64_t>(st->element_count()) != numel)
        return invalid(name + ": " + std::to_string(st->element_count()) + " elements, params[" +
                       std::to_string(i) + "] has " + std::to_string(numel));
      if (static_cast<int64_t>((*so)->element_count()) != numel || (*so)->element_type() != stt)
        return invalid("result " + name + ": does not match its operand");
      sb->states[s][i] = aliased_output(*st, *so);
    }
  }
  if (n > 0) {
    sb->dtype = optkern_dtype(pt);
    sb->grad_dtype = optkern_dtype(gt);
    sb->state_dtype = k > 0 ? optkern_dtype(stt) : sb->dtype;
    if (sb->dtype < 0) return invalid(std::string("params: ") + dtype_name(pt) + " (expected a floating dtype)");
    if (sb->grad_dtype < 0) return invalid(std::string("grads: ") + dtype_name(gt) + " (expected a floating dtype)");
    if (sb->state_dtype < 0)
      return invalid(std::string("states: ") + dtype_name(stt) + " (expected a floating dtype)");
  }
  return ffi::Error::Success();
}

void fill_tensors(const StepBuffers& sb, optkern_tensors* t) {
  optkern_tensors_init(t);
  t->dtype = sb.dtype;
  t->device = OPTKERN_DEVICE_CPU;
  t->count = sb.n;
  t->numels = sb.numels.data();
  t->params = sb.params.data();
  t->grads = sb.grads.data();
  for (int64_t s = 0; s < sb.k; ++s) t->states[s] = sb.states[s].data();
  if (sb.grad_dtype != sb.dtype || sb.state_dtype != sb.dtype) {  // 16-bit storage (optkern.h)
    t->mixed = 1;
    t->grad_dtype = sb.grad_dtype;
    t->state_dtype = sb.state_dtype;
    t->master_mode = OPTKERN_MASTER_NONE;
  }
}

// The hyperparameters of each algorithm from the attributes (named as the struct fields), over the C interface's
// defaults; lr comes from its buffer (run_algo).
void read_attr(const ffi::Dictionary& d, const char* name, double* field) { *field = attr_f64(d, name, *field); }
void read_attr(const ffi::Dictionary& d, const char* name, int32_t* field) {
  *field = static_cast<int32_t>(attr_i64(d, name, *field));
}
#define OK_ATTR(field) read_attr(d, #field, &h->field)
void read_hyper(const ffi::Dictionary& d, optkern_sgd_hyper* h) {
  optkern_sgd_hyper_init(h);
  OK_ATTR(momentum), OK_ATTR(dampening), OK_ATTR(weight_decay), OK_ATTR(nesterov), OK_ATTR(velocity);
}
void read_hyper(const ffi::Dictionary& d, optkern_adam_hyper* h) {
  optkern_adam_hyper_init(h);
  OK_ATTR(beta1), OK_ATTR(beta2), OK_ATTR(eps), OK_ATTR(weight_decay), OK_ATTR(amsgrad);
  OK_ATTR(decoupled_weight_decay), OK_ATTR(eps_inside_sqrt), OK_ATTR(bias_correction);
}
void read_hyper(const ffi::Dictionary& d, optkern_adagrad_hyper* h) {
  optkern_adagrad_hyper_init(h);
  OK_ATTR(lr_decay), OK_ATTR(weight_decay), OK_ATTR(eps);
}
void read_hyper(const ffi::Dictionary& d, optkern_rmsprop_hyper* h) {
  optkern_rmsprop_hyper_init(h);
  OK_ATTR(alpha), OK_ATTR(eps), OK_ATTR(weight_decay), OK_ATTR(momentum), OK_ATTR(centered);
  OK_ATTR(eps_inside_sqrt), OK_ATTR(nesterov);
}
void read_hyper(const ffi::Dictionary& d, optkern_adamax_hyper* h) {
  optkern_adamax_hyper_init(h);
  OK_ATTR(beta1), OK_ATTR(beta2), OK_ATTR(eps), OK_ATTR(weight_decay);
}
void read_hyper(const ffi::Dictionary& d, optkern_nadam_hyper* h) {
  optkern_nadam_hyper_init(h);
  OK_ATTR(beta1), OK_ATTR(beta2), OK_ATTR(eps), OK_ATTR(weight_decay), OK_ATTR(momentum_decay);
  OK_ATTR(decoupled_weight_decay), OK_ATTR(momentum_schedule);
}
void read_hyper(const ffi::Dictionary& d, optkern_adadelta_hyper* h) {
  optkern_adadelta_hyper_init(h);
  OK_ATTR(rho), OK_ATTR(eps), OK_ATTR(weight_decay);
}
void read_hyper(const ffi::Dictionary& d, optkern_rprop_hyper* h) {
  optkern_rprop_hyper_init(h);
  OK_ATTR(etaminus), OK_ATTR(etaplus), OK_ATTR(step_size_min), OK_ATTR(step_size_max);
}
#undef OK_ATTR

// One algorithm's step: hyperparameters, the state count check, the call.
template <class Hyper, class NumStates, class Step>
ffi::Error run_algo(const char* name, const ffi::Dictionary& d, double lr, const StepBuffers& sb,
                    const optkern_step_info& info, NumStates num_states, Step step) {
  Hyper h;
  read_hyper(d, &h);
  h.lr = lr;
  int32_t k = 0;
  if (optkern_status st = num_states(&h, &k)) return optkern_failure(name, st);
  if (k != sb.k)
    return invalid(std::string(name) + ": these hyperparameters use " + std::to_string(k) +
                   " state buffers per tensor, the call passed " + std::to_string(sb.k));
  optkern_tensors t;
  fill_tensors(sb, &t);
  if (optkern_status st = step(&t, &h, &info)) return optkern_failure(name, st);
  return ffi::Error::Success();
}

ffi::Error StepImpl(ffi::RemainingArgs args, ffi::RemainingRets rets, ffi::Dictionary attrs) {
  for (const char* a : {"algo", "n", "n_states"})
    if (auto e = require_attr(attrs, a); e.failure()) return e;
  auto algo_or = attrs.get<std::string_view>("algo");
  if (algo_or.has_error()) return algo_or.error();
  const std::string algo(*algo_or);
  const int64_t n = attr_i64(attrs, "n", 0), k = attr_i64(attrs, "n_states", 0);
  const bool has_product = attr_i64(attrs, "has_mu_product", 0) != 0;
  const int64_t first = has_product ? 4 : 3;
  if (args.size() < static_cast<size_t>(first)) return invalid("too few operands");

  double lr = 0.0, step = 0.0, grad_scale = 1.0, mu_product = 1.0;
  auto lr_b = args.get<ffi::AnyBuffer>(0);
  auto step_b = args.get<ffi::AnyBuffer>(1);
  auto scale_b = args.get<ffi::AnyBuffer>(2);
  if (lr_b.has_error()) return lr_b.error();
  if (step_b.has_error()) return step_b.error();
  if (scale_b.has_error()) return scale_b.error();
  if (auto e = read_scalar(*lr_b, "lr", &lr); e.failure()) return e;
  if (auto e = read_scalar(*step_b, "step", &step); e.failure()) return e;
  if (auto e = read_scalar(*scale_b, "grad_scale", &grad_scale); e.failure()) return e;
  if (!(std::isfinite(lr) && lr >= 0.0))
    return invalid("hyper.lr: the learning rate must be finite and >= 0, got " + std::to_string(lr));
  if (!(step >= 1.0 && step == std::floor(step)))
    return invalid("step: the step count (including this step) must be an integer >= 1, got " +
                   std::to_string(step));

  StepBuffers sb;
  if (auto e = decode_step(args, rets, first, n, k, &sb); e.failure()) return e;

  optkern_step_info info;
  optkern_step_info_init(&info);
  info.step = static_cast<int64_t>(step);
  info.grad_scale = grad_scale;
  info.maximize = static_cast<int32_t>(attr_i64(attrs, "maximize", 0));

  if (algo == "sgd") return run_algo<optkern_sgd_hyper>("optkern_sgd_step", attrs, lr, sb, info,
                                                        optkern_sgd_num_states, optkern_sgd_step);
  if (algo == "adam") return run_algo<optkern_adam_hyper>("optkern_adam_step", attrs, lr, sb, info,
                                                          optkern_adam_num_states, optkern_adam_step);
  if (algo == "adagrad") return run_algo<optkern_adagrad_hyper>("optkern_adagrad_step", attrs, lr, sb, info,
                                                                optkern_adagrad_num_states, optkern_adagrad_step);
  if (algo == "rmsprop") return run_algo<optkern_rmsprop_hyper>("optkern_rmsprop_step", attrs, lr, sb, info,
                                                                optkern_rmsprop_num_states, optkern_rmsprop_step);
  if (algo == "adamax") return run_algo<optkern_adamax_hyper>("optkern_adamax_step", attrs, lr, sb, info,
                                                              optkern_adamax_num_states, optkern_adamax_step);
  if (algo == "adadelta") return run_algo<optkern_adadelta_hyper>(
      "optkern_adadelta_step", attrs, lr, sb, info, optkern_adadelta_num_states, optkern_adadelta_step);
  if (algo == "rprop") return run_algo<optkern_rprop_hyper>("optkern_rprop_step", attrs, lr, sb, info,
                                                            optkern_rprop_num_states, optkern_rprop_step);
  if (algo == "nadam") {
    // NAdam's running product of its momentum coefficients: a scalar operand (arg 3) and the last result.
    if (!has_product) return invalid("nadam: the mu_product operand is required");
    auto pb = args.get<ffi::AnyBuffer>(3);
    if (pb.has_error()) return pb.error();
    if (auto e = read_scalar(*pb, "mu_product", &mu_product); e.failure()) return e;
    if (rets.size() != static_cast<size_t>(n * (1 + k) + 1)) return invalid("nadam: missing the mu_product result");
    auto po = rets.get<ffi::AnyBuffer>(n * (1 + k));
    if (po.has_error()) return po.error();
    const ffi::DataType pdt = (*po)->element_type();
    if ((*po)->element_count() != 1 || (pdt != ffi::DataType::F32 && pdt != ffi::DataType::F64))
      return invalid("mu_product: expected a float32 or float64 scalar");
    const bool in_f32 = pdt == ffi::DataType::F32;
    auto step_fn = [&](const optkern_tensors* t, const optkern_nadam_hyper* h, const optkern_step_info* s) {
      return optkern_nadam_step(t, h, s, &mu_product, in_f32 ? 1 : 0);
    };
    if (auto e = run_algo<optkern_nadam_hyper>("optkern_nadam_step", attrs, lr, sb, info, optkern_nadam_num_states,
                                               step_fn);
        e.failure())
      return e;
    if (in_f32) *static_cast<float*>((*po)->untyped_data()) = static_cast<float>(mu_product);
    else *static_cast<double*>((*po)->untyped_data()) = mu_product;
    return ffi::Error::Success();
  }
  return invalid("unknown algorithm '" + algo + "'");
}

ffi::Error GlobalNormImpl(ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> out, double norm_type) {
  const size_t n = args.size();
  std::vector<int64_t> numels(n);
  std::vector<const void*> data(n);
  ffi::DataType dt = out->element_type();
  for (size_t i = 0; i < n; ++i) {
    auto b = args.get<ffi::AnyBuffer>(i);
    if (b.has_error()) return b.error();
    if (i == 0) dt = b->element_type();
    if (b->element_type() != dt)
      return invalid(indexed("arrays", i) + ": " + dtype_name(b->element_type()) + ", arrays[0] is " +
                     dtype_name(dt) + " (one dtype per call)");
    numels[i] = static_cast<int64_t>(b->element_count());
    data[i] = b->untyped_data();
  }
  double norm = 0.0;
  if (n > 0) {
    optkern_arrays a;
    optkern_arrays_init(&a);
    a.dtype = optkern_dtype(dt);
    if (a.dtype < 0) return invalid(std::string("arrays: ") + dtype_name(dt) + " (expected a floating dtype)");
    a.device = OPTKERN_DEVICE_CPU;
    a.count = static_cast<int64_t>(n);
    a.numels = numels.data();
    a.data = data.data();
    if (optkern_status st = optkern_global_norm(&a, norm_type, &norm)) return optkern_failure("optkern_global_norm", st);
  }
  switch (out->element_type()) {
    case ffi::DataType::F32: *static_cast<float*>(out->untyped_data()) = static_cast<float>(norm); break;
    case ffi::DataType::F64: *static_cast<double*>(out->untyped_data()) = norm; break;
    default: return invalid("global_norm: the result must be float32 or float64");
  }
  return ffi::Error::Success();
}

// ---- batch norm ----------------------------------------------------------------------------------------------

struct BnShape {
  int64_t outer, channels, inner;
};

ffi::Error bn_shape(const ffi::Dictionary& d, const ffi::AnyBuffer& x, BnShape* s) {
  for (const char* a : {"outer", "channels", "inner"})
    if (auto e = require_attr(d, a); e.failure()) return e;
  s->outer = attr_i64(d, "outer", 0);
  s->channels = attr_i64(d, "channels", 0);
  s->inner = attr_i64(d, "inner", 0);
  if (s->outer < 0 || s->channels < 1 || s->inner < 0 ||
      static_cast<int64_t>(x.element_count()) != s->outer * s->channels * s->inner)
    return invalid("x: its element count does not match (outer, channels, inner)");
  return ffi::Error::Success();
}

// The arguments every batch-norm call shares: x's layout, dtype and data (host memory).
ffi::Error bn_args(const ffi::Dictionary& d, const ffi::AnyBuffer& x, optkern_batch_norm_args* a) {
  BnShape sh{};
  if (auto e = bn_shape(d, x, &sh); e.failure()) return e;
  optkern_batch_norm_args_init(a);
  a->dtype = optkern_dtype(x.element_type());
  if (a->dtype < 0) return invalid(std::string("x: ") + dtype_name(x.element_type()) + " (expected a floating dtype)");
  a->device = OPTKERN_DEVICE_CPU;
  a->outer = sh.outer;
  a->channels = sh.channels;
  a->inner = sh.inner;
  a->x = x.untyped_data();
  return ffi::Error::Success();
}

ffi::Error check_channel_vector(const ffi::AnyBuffer& b, const char* name, int64_t channels) {
  if (static_cast<int64_t>(b.element_count()) != channels)
    return invalid(std::string(name) + ": " + std::to_string(b.element_count()) + " elements, expected channels = " +
                   std::to_string(channels));
  return ffi::Error::Success();
}

// The saved statistics: 2 * channels float64 (mean then invstd) carried by XLA as 4 * channels uint32.
ffi::Error stats_pointers(void* data, size_t bytes, int64_t channels, double** mean, double** invstd) {
  if (bytes != static_cast<size_t>(2 * channels) * sizeof(double))
    return invalid("stats: expected 2 * channels float64 values (the forward pass's residual)");
  *mean = static_cast<double*>(data);
  *invstd = *mean + channels;
  return ffi::Error::Success();
}

ffi::Error BnForwardImpl(ffi::RemainingArgs args, ffi::RemainingRets rets, ffi::Dictionary attrs) {
  const bool training = attr_i64(attrs, "training", 1) != 0;
  const bool has_w = attr_i64(attrs, "has_weight", 0) != 0, has_b = attr_i64(attrs, "has_bias", 0) != 0;
  const bool has_rs = attr_i64(attrs, "has_running", 0) != 0;
  if (args.size() != static_cast<size_t>(1 + has_w + has_b + 2 * has_rs) || rets.size() != 2u + 2u * has_rs)
    return invalid("batch_norm: operand count does not match has_weight/has_bias/has_running");
  auto x = args.get<ffi::AnyBuffer>(0);
  if (x.has_error()) return x.error();
  optkern_batch_norm_args a;
  if (auto e = bn_args(attrs, *x, &a); e.failure()) return e;
  const BnShape sh{a.outer, a.channels, a.inner};
  a.eps = attr_f64(attrs, "eps", a.eps);
  a.momentum = attr_f64(attrs, "momentum", a.momentum);
  size_t ai = 1;
  if (has_w) {
    auto w = args.get<ffi::AnyBuffer>(ai++);
    if (w.has_error()) return w.error();
    if (auto e = check_channel_vector(*w, "weight", sh.channels); e.failure()) return e;
    a.weight = w->untyped_data();
  }
  if (has_b) {
    auto b = args.get<ffi::AnyBuffer>(ai++);
    if (b.has_error()) return b.error();
    if (auto e = check_channel_vector(*b, "bias", sh.channels); e.failure()) return e;
    a.bias = b->untyped_data();
  }
  auto y = rets.get<ffi::AnyBuffer>(0);
  auto stats = rets.get<ffi::AnyBuffer>(1);
  if (y.has_error()) return y.error();
  if (stats.has_error()) return stats.error();
  a.out = (*y)->untyped_data();
  if (auto e = stats_pointers((*stats)->untyped_data(), (*stats)->size_bytes(), sh.channels, &a.mean, &a.invstd);
      e.failure())
    return e;
  if (has_rs) {
    auto rm = args.get<ffi::AnyBuffer>(ai++);
    auto rv = args.get<ffi::AnyBuffer>(ai++);
    auto rmo = rets.get<ffi::AnyBuffer>(2);
    auto rvo = rets.get<ffi::AnyBuffer>(3);
    if (rm.has_error()) return rm.error();
    if (rv.has_error()) return rv.error();
    if (rmo.has_error()) return rmo.error();
    if (rvo.has_error()) return rvo.error();
    if (auto e = check_channel_vector(*rm, "running_mean", sh.channels); e.failure()) return e;
    if (auto e = check_channel_vector(*rv, "running_var", sh.channels); e.failure()) return e;
    a.running_mean = aliased_output(*rm, *rmo);
    a.running_var = aliased_output(*rv, *rvo);
  } else if (!training) {
    return invalid("batch_norm: evaluation needs running_mean and running_var");
  }
  optkern_status st = training ? optkern_batch_norm_forward_train(&a) : optkern_batch_norm_forward_eval(&a);
  if (st) return optkern_failure(training ? "optkern_batch_norm_forward_train" : "optkern_batch_norm_forward_eval", st);
  return ffi::Error::Success();
}

ffi::Error BnBackwardImpl(ffi::RemainingArgs args, ffi::RemainingRets rets, ffi::Dictionary attrs) {
  const bool training = attr_i64(attrs, "training", 1) != 0;
  const bool has_w = attr_i64(attrs, "has_weight", 0) != 0;
  const bool want_dw = attr_i64(attrs, "want_dweight", 0) != 0;
  if (args.size() != static_cast<size_t>(3 + has_w) || rets.size() != 1u + 2u * want_dw)
    return invalid("batch_norm backward: operand count does not match has_weight/want_dweight");
  auto x = args.get<ffi::AnyBuffer>(0);
  auto dy = args.get<ffi::AnyBuffer>(1);
  if (x.has_error()) return x.error();
  if (dy.has_error()) return dy.error();
  optkern_batch_norm_args a;
  if (auto e = bn_args(attrs, *x, &a); e.failure()) return e;
  const BnShape sh{a.outer, a.channels, a.inner};
  if (dy->element_count() != x->element_count() || dy->element_type() != x->element_type())
    return invalid("dy: does not match x");
  a.dy = dy->untyped_data();
  a.eps = attr_f64(attrs, "eps", a.eps);
  size_t ai = 2;
  if (has_w) {
    auto w = args.get<ffi::AnyBuffer>(ai++);
    if (w.has_error()) return w.error();
    if (auto e = check_channel_vector(*w, "weight", sh.channels); e.failure()) return e;
    a.weight = w->untyped_data();
  }
  auto stats = args.get<ffi::AnyBuffer>(ai++);
  if (stats.has_error()) return stats.error();
  if (auto e = stats_pointers(stats->untyped_data(), stats->size_bytes(), sh.channels, &a.mean, &a.invstd);
      e.failure())
    return e;
  auto dx = rets.get<ffi::AnyBuffer>(0);
  if (dx.has_error()) return dx.error();
  a.out = (*dx)->untyped_data();
  if (want_dw) {
    auto dw = rets.get<ffi::AnyBuffer>(1);
    auto db = rets.get<ffi::AnyBuffer>(2);
    if (dw.has_error()) return dw.error();
    if (db.has_error()) return db.error();
    a.dweight = (*dw)->untyped_data();
    a.dbias = (*db)->untyped_data();
  }
  optkern_status st = training ? optkern_batch_norm_backward_train(&a) : optkern_batch_norm_backward_eval(&a);
  if (st) return optkern_failure(training ? "optkern_batch_norm_backward_train" : "optkern_batch_norm_backward_eval",
                                 st);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(optkern_jax_step, StepImpl,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attrs());
XLA_FFI_DEFINE_HANDLER_SYMBOL(optkern_jax_global_norm, GlobalNormImpl,
                              ffi::Ffi::Bind().RemainingArgs().Ret<ffi::AnyBuffer>().Attr<double>("norm_type"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(optkern_jax_bn_forward, BnForwardImpl,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attrs());
XLA_FFI_DEFINE_HANDLER_SYMBOL(optkern_jax_bn_backward, BnBackwardImpl,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attrs());
