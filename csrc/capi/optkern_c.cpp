// optkern's C interface (include/optkern/optkern.h) over the framework-free C++ core: each call reads its
// structs (struct_size checked), validates every pointer, count, dtype, device, alignment and overlap, then calls
// the same core functions the Python extension calls.  Errors become a status and a thread-local message; no C++
// exception leaves this file.
#include "optkern/optkern.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "../optkern/batch_norm_api.h"
#include "../optkern/cuda_streams.h"
#include "../optkern/global_norm_api.h"
#include "../optkern/lbfgs_api.h"
#include "../optkern/lbfgs_rules.h"
#include "../optkern/optim_api.h"
#include "../optkern/overlap.h"

#ifndef OPTKERN_VERSION_STRING
#error "OPTKERN_VERSION_STRING must be defined by the build (the package version)"
#endif

using namespace optkern;

namespace {

thread_local std::string t_error;

// Valid arguments this build or machine cannot run (OPTKERN_UNSUPPORTED).
struct Unsupported : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void invalid(const std::string& msg) { throw std::invalid_argument(msg); }

optkern_status fail(optkern_status code, const char* msg) {
  try {
    t_error = msg;
  } catch (...) {  // out of memory for the message itself
  }
  return code;
}

template <class F>
optkern_status guarded(F&& f) noexcept {
  try {
    f();
    return OPTKERN_OK;
  } catch (const Unsupported& e) {
    return fail(OPTKERN_UNSUPPORTED, e.what());
  } catch (const std::invalid_argument& e) {
    return fail(OPTKERN_INVALID_ARGUMENT, e.what());
  } catch (const std::bad_alloc&) {
    return fail(OPTKERN_INTERNAL_ERROR, "out of memory");
  } catch (const std::exception& e) {
    return fail(std::strstr(e.what(), "CUDA") ? OPTKERN_CUDA_ERROR : OPTKERN_INTERNAL_ERROR, e.what());
  } catch (...) {
    return fail(OPTKERN_INTERNAL_ERROR, "unknown error");
  }
}

// A caller's struct: struct_size must be this library's size of it (version 1 of every struct).
template <class S>
S read_struct(const S* p, const char* name) {
  if (p == nullptr) invalid(std::string(name) + ": null pointer");
  if (p->struct_size != sizeof(S))
    invalid(std::string(name) + "->struct_size: expected " + std::to_string(sizeof(S)) +
            " (sizeof the struct in this library's optkern.h, ABI " + std::to_string(OPTKERN_ABI_VERSION) +
            "), got " + std::to_string(p->struct_size));
  S s;
  std::memcpy(&s, p, sizeof(S));
  return s;
}

DType read_dtype(int32_t v, const std::string& name, bool half_ok) {
  if (v == OPTKERN_FLOAT32) return DType::f32;
  if (v == OPTKERN_FLOAT64) return DType::f64;
  if (half_ok && v == OPTKERN_BFLOAT16) return DType::bf16;
  if (half_ok && v == OPTKERN_FLOAT16) return DType::f16;
  invalid(name + ": expected " +
          (half_ok ? "OPTKERN_FLOAT32, OPTKERN_FLOAT64, OPTKERN_BFLOAT16 or OPTKERN_FLOAT16"
                   : "OPTKERN_FLOAT32 or OPTKERN_FLOAT64") +
          ", got " + std::to_string(v));
}

Device read_device(int32_t kind, int32_t index, const std::string& who) {
  Device d;
  if (kind == OPTKERN_DEVICE_CPU) {
    if (index != 0) invalid(who + "device_index: expected 0 for OPTKERN_DEVICE_CPU, got " + std::to_string(index));
    return d;
  }
  if (kind != OPTKERN_DEVICE_CUDA)
    invalid(who + "device: expected OPTKERN_DEVICE_CPU (0) or OPTKERN_DEVICE_CUDA (1), got " + std::to_string(kind));
  if (index < 0) invalid(who + "device_index: expected a CUDA device index >= 0, got " + std::to_string(index));
  if (!cuda_built()) throw Unsupported(who + "device: OPTKERN_DEVICE_CUDA, but this liboptkern has no CUDA kernels");
  if (!cuda_available())
    throw Unsupported(who + "device: OPTKERN_DEVICE_CUDA, but no CUDA device can be used here (no driver or GPU)");
  d.kind = DeviceKind::cuda;
  d.index = index;
  return d;
}

// The buffers of one call: each is checked (null, alignment, device) as it is added, then all together for
// overlaps (a written buffer may share no byte with another buffer).
class Buffers {
 public:
  explicit Buffers(const Device& d) : device_(d), probe_host_(d.kind == DeviceKind::cpu && cuda_context_active()) {}

  void add(const void* p, int64_t numel, int elsize, bool written, std::string name) {
    if (numel <= 0) return;
    if (p == nullptr) invalid(name + ": null pointer for " + std::to_string(numel) + " elements");
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a % static_cast<uintptr_t>(elsize) != 0)
      invalid(name + ": pointer is not aligned to its element size (" + std::to_string(elsize) + " bytes)");
    if (numel > (INT64_MAX / elsize)) invalid(name + ": " + std::to_string(numel) + " elements overflow 64 bits");
    check_device(p, name);
    ranges_.push_back(MemRange{a, a + static_cast<uintptr_t>(numel) * static_cast<uintptr_t>(elsize), written,
                               static_cast<int>(names_.size())});
    names_.push_back(std::move(name));
  }
  void check_device(const void* p, const std::string& name) const {
    if (device_.kind == DeviceKind::cuda) {
      int dev = -1;
      try {
        dev = cuda_pointer_device(p);
      } catch (const std::invalid_argument& e) {
        invalid(name + ": " + e.what() + ", but device is OPTKERN_DEVICE_CUDA");
      }
      if (dev != device_.index)
        invalid(name + ": is memory of CUDA device " + std::to_string(dev) + ", but device_index is " +
                std::to_string(device_.index));
    } else if (probe_host_ && cuda_device_memory(p)) {
      invalid(name + ": is CUDA device memory, but device is OPTKERN_DEVICE_CPU");
    }
  }
  void check_overlaps(const char* why) {
    int a = -1, b = -1;
    if (find_write_overlap(ranges_, &a, &b))
      invalid(names_[static_cast<size_t>(a)] + ": overlaps " + names_[static_cast<size_t>(b)] + " in memory; " + why);
  }

 private:
  Device device_;
  bool probe_host_;
  std::vector<MemRange> ranges_;
  std::vector<std::string> names_;
};

std::string item(const char* kind, int64_t i) { return std::string(kind) + "[" + std::to_string(i) + "]"; }

// ---- optimizer steps ----------------------------------------------------------------------------------------

struct Step {
  StepBatch batch;
  StepInfo info;
};

StepInfo read_info(const optkern_step_info* sp) {
  const optkern_step_info s = read_struct(sp, "info");
  StepInfo r;
  r.step = s.step;
  r.grad_scale = s.grad_scale;
  r.maximize = s.maximize != 0;
  r.grad_scale_device = s.grad_scale_device;
  r.found_inf_device = s.found_inf_device;
  r.device_counters = s.counters_in_memory != 0;
  if (r.device_counters) {
    r.counter_dtype = read_dtype(s.counter_dtype, "info->counter_dtype", false);
    r.product_dtype = read_dtype(s.product_dtype, "info->product_dtype", false);
  }
  check(r);
  return r;
}

// Every pointer of the step, checked, as a StepBatch.  nstates: the algorithm's state buffers; nadam: the
// counters in memory include products.
Step read_step(const optkern_tensors* tp, const optkern_step_info* sp, int nstates, bool nadam) {
  const optkern_tensors t = read_struct(tp, "tensors");
  Step st;
  st.info = read_info(sp);
  StepBatch& b = st.batch;
  b.dtype = read_dtype(t.dtype, "tensors->dtype", true);
  b.device = read_device(t.device, t.device_index, "tensors->");
  b.stream = t.stream;
  if (t.count < 0) invalid("tensors->count: expected >= 0, got " + std::to_string(t.count));
  if (t.count > (INT32_MAX / 8)) invalid("tensors->count: expected at most " + std::to_string(INT32_MAX / 8));
  const int64_t n = t.count;
  Precision& pr = b.prec;
  pr.mixed = t.mixed != 0;
  if (pr.mixed) {
    pr.grad = read_dtype(t.grad_dtype, "tensors->grad_dtype", true);
    pr.state = read_dtype(t.state_dtype, "tensors->state_dtype", true);
    if (t.master_mode < OPTKERN_MASTER_NONE || t.master_mode > OPTKERN_MASTER_SPLIT)
      invalid("tensors->master_mode: expected OPTKERN_MASTER_NONE, _FP32 or _SPLIT, got " +
              std::to_string(t.master_mode));
    pr.master = static_cast<MasterMode>(t.master_mode);
    pr.copy = t.param_copies != nullptr;
    if (pr.copy) {
      pr.copy_dtype = read_dtype(t.copy_dtype, "tensors->copy_dtype", true);
      if (!is_half(pr.copy_dtype)) invalid("tensors->copy_dtype: expected OPTKERN_BFLOAT16 or OPTKERN_FLOAT16");
    }
    pr.stochastic = t.stochastic_rounding != 0;
    pr.seed = t.seed;
  }
  if (n > 0) {
    if (!t.numels) invalid("tensors->numels: null pointer for " + std::to_string(n) + " tensors");
    if (!t.params) invalid("tensors->params: null pointer for " + std::to_string(n) + " tensors");
    if (!t.grads) invalid("tensors->grads: null pointer for " + std::to_string(n) + " tensors");
    for (int k = 0; k < nstates; ++k)
      if (!t.states[k])
        invalid("tensors->states[" + std::to_string(k) + "]: null pointer; this step needs " +
                std::to_string(nstates) + " state buffers per tensor");
    if (pr.mixed && pr.master != MasterMode::none && !t.masters)
      invalid("tensors->masters: null pointer, but master_mode is not OPTKERN_MASTER_NONE");
    if (st.info.device_counters) {
      if (!t.steps) invalid("tensors->steps: null pointer, but info->counters_in_memory is set");
      if (nadam && !t.mu_products) invalid("tensors->mu_products: null pointer, but info->counters_in_memory is set");
    }
  }
  const int psize = dtype_size(b.dtype), gsize = dtype_size(b.grad_dtype()), ssize = dtype_size(b.state_dtype());
  const int msize = pr.master == MasterMode::split ? 2 : 4, csize = dtype_size(pr.copy_dtype);
  const bool masters = pr.mixed && pr.master != MasterMode::none;
  Buffers bufs(b.device);
  b.tensors.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    TensorSlots& s = b.tensors[static_cast<size_t>(i)];
    s.numel = t.numels[i];
    if (s.numel < 0) invalid(item("tensors->numels", i) + ": expected >= 0, got " + std::to_string(s.numel));
    s.ptr[0] = t.params[i];
    s.ptr[1] = const_cast<void*>(t.grads[i]);
    bufs.add(s.ptr[0], s.numel, psize, true, item("params", i));
    bufs.add(s.ptr[1], s.numel, gsize, false, item("grads", i));
    for (int k = 0; k < nstates; ++k) {
      s.ptr[2 + k] = t.states[k][i];
      bufs.add(s.ptr[2 + k], s.numel, ssize, true, "states[" + std::to_string(k) + "][" + std::to_string(i) + "]");
    }
    if (masters) {
      s.master = t.masters[i];
      bufs.add(s.master, s.numel, msize, true, item("masters", i));
    }
    if (pr.copy) {
      s.copy = t.param_copies[i];
      bufs.add(s.copy, s.numel, csize, true, item("param_copies", i));
    }
    if (st.info.device_counters) {
      s.step = t.steps[i];
      if (!s.step) invalid(item("tensors->steps", i) + ": null pointer");
      if (reinterpret_cast<uintptr_t>(s.step) % static_cast<uintptr_t>(dtype_size(st.info.counter_dtype)))
        invalid(item("tensors->steps", i) + ": pointer is not aligned to its element size");
      bufs.check_device(s.step, item("tensors->steps", i));
      if (nadam) {
        s.mu_product = t.mu_products[i];
        if (!s.mu_product) invalid(item("tensors->mu_products", i) + ": null pointer");
        if (reinterpret_cast<uintptr_t>(s.mu_product) % static_cast<uintptr_t>(dtype_size(st.info.product_dtype)))
          invalid(item("tensors->mu_products", i) + ": pointer is not aligned to its element size");
        bufs.check_device(s.mu_product, item("tensors->mu_products", i));
      }
    }
  }
  bufs.check_overlaps("a step writes params and states in place, so they must not alias each other or the grads");
  check_precision(b);
  return st;
}

// The fields of each hyperparameter struct, once: F(name) a double, B(name) a boolean (int32_t in C, bool in the
// core).  The C struct and the core struct name every field alike.
#define OPTKERN_SGD_FIELDS(F, B) F(lr) F(momentum) F(dampening) F(weight_decay) B(nesterov) B(velocity)
#define OPTKERN_ADAM_FIELDS(F, B) \
  F(lr) F(beta1) F(beta2) F(eps) F(weight_decay) B(amsgrad) B(decoupled_weight_decay) B(eps_inside_sqrt) \
  B(bias_correction)
#define OPTKERN_ADAGRAD_FIELDS(F, B) F(lr) F(lr_decay) F(weight_decay) F(eps)
#define OPTKERN_RMSPROP_FIELDS(F, B) \
  F(lr) F(alpha) F(eps) F(weight_decay) F(momentum) B(centered) B(eps_inside_sqrt) B(nesterov)
#define OPTKERN_ADAMAX_FIELDS(F, B) F(lr) F(beta1) F(beta2) F(eps) F(weight_decay)
#define OPTKERN_NADAM_FIELDS(F, B) \
  F(lr) F(beta1) F(beta2) F(eps) F(weight_decay) F(momentum_decay) B(decoupled_weight_decay) B(momentum_schedule)
#define OPTKERN_ADADELTA_FIELDS(F, B) F(lr) F(rho) F(eps) F(weight_decay)
#define OPTKERN_RPROP_FIELDS(F, B) F(lr) F(etaminus) F(etaplus) F(step_size_min) F(step_size_max)
#define OPTKERN_FOR_EACH_HYPER(X)                                                                          \
  X(sgd, SgdHyper, OPTKERN_SGD_FIELDS) X(adam, AdamHyper, OPTKERN_ADAM_FIELDS)                            \
  X(adagrad, AdagradHyper, OPTKERN_ADAGRAD_FIELDS) X(rmsprop, RmspropHyper, OPTKERN_RMSPROP_FIELDS)       \
  X(adamax, AdamaxHyper, OPTKERN_ADAMAX_FIELDS) X(nadam, NadamHyper, OPTKERN_NADAM_FIELDS)                \
  X(adadelta, AdadeltaHyper, OPTKERN_ADADELTA_FIELDS) X(rprop, RpropHyper, OPTKERN_RPROP_FIELDS)

#define OPTKERN_TO_CORE_F(f) r.f = h.f;
#define OPTKERN_TO_CORE_B(f) r.f = h.f != 0;
#define OPTKERN_FROM_CORE(f) h->f = c.f;
#define OPTKERN_HYPER_CONVERT(name, Core, FIELDS)                  \
  Core to_core(const optkern_##name##_hyper& h) {                  \
    Core r;                                                        \
    FIELDS(OPTKERN_TO_CORE_F, OPTKERN_TO_CORE_B)                   \
    return r;                                                      \
  }                                                                \
  void from_core(const Core& c, optkern_##name##_hyper* h) { FIELDS(OPTKERN_FROM_CORE, OPTKERN_FROM_CORE) }
OPTKERN_FOR_EACH_HYPER(OPTKERN_HYPER_CONVERT)
#undef OPTKERN_HYPER_CONVERT
#undef OPTKERN_TO_CORE_F
#undef OPTKERN_TO_CORE_B
#undef OPTKERN_FROM_CORE

int num_states(const SgdHyper& h) { return sgd_num_states(h); }
int num_states(const AdamHyper& h) { return adam_num_states(h); }
int num_states(const AdagradHyper&) { return adagrad_num_states(); }
int num_states(const RmspropHyper& h) { return rmsprop_num_states(h); }
int num_states(const AdamaxHyper&) { return adamax_num_states(); }
int num_states(const NadamHyper&) { return nadam_num_states(); }
int num_states(const AdadeltaHyper&) { return adadelta_num_states(); }
int num_states(const RpropHyper&) { return rprop_num_states(); }

// The hyperparameters, checked (core messages name the field as torch does: "lr", "betas[0]" ...).
template <class CHyper>
auto read_hyper(const CHyper* hp) {
  auto h = to_core(read_struct(hp, "hyper"));
  check(h);
  return h;
}

template <class CHyper>
optkern_status count_states(const CHyper* hp, int32_t* out) {
  return guarded([&] {
    if (!out) invalid("out: null pointer");
    *out = num_states(read_hyper(hp));
  });
}

template <class CHyper, class Run>
optkern_status run_step(const optkern_tensors* t, const CHyper* hp, const optkern_step_info* s, Run run) {
  return guarded([&] {
    const auto h = read_hyper(hp);
    const Step st = read_step(t, s, num_states(h), false);
    run(st.batch, h, st.info);
  });
}

// ---- lists of read-only arrays --------------------------------------------------------------------------------

// A global-norm list: the arrays as a StepBatch (ptr[0] of each slot).
StepBatch read_norm_arrays(const optkern_arrays* ap, Buffers** keep, std::vector<Buffers>& store) {
  const optkern_arrays a = read_struct(ap, "arrays");
  StepBatch b;
  b.dtype = read_dtype(a.dtype, "arrays->dtype", true);
  b.device = read_device(a.device, a.device_index, "arrays->");
  b.stream = a.stream;
  if (a.count < 0) invalid("arrays->count: expected >= 0, got " + std::to_string(a.count));
  if (a.count > 0 && (!a.numels || !a.data))
    invalid(std::string("arrays->") + (a.numels ? "data" : "numels") + ": null pointer for " +
            std::to_string(a.count) + " arrays");
  store.emplace_back(b.device);
  Buffers& bufs = store.back();
  b.tensors.resize(static_cast<size_t>(a.count));
  for (int64_t i = 0; i < a.count; ++i) {
    TensorSlots& s = b.tensors[static_cast<size_t>(i)];
    s.numel = a.numels[i];
    if (s.numel < 0) invalid(item("arrays->numels", i) + ": expected >= 0, got " + std::to_string(s.numel));
    s.ptr[0] = const_cast<void*>(a.data[i]);
    bufs.add(s.ptr[0], s.numel, dtype_size(b.dtype), false, item("arrays->data", i));
  }
  *keep = &bufs;
  return b;
}

// An L-BFGS list: vectors of one length n (numels[0]; for an empty list numels[0] still gives n).  Only numels[0]
// is read: the header lets numels be of length 1.
VecBatch read_vectors(const optkern_arrays* ap, const char* name, bool allow_empty) {
  const optkern_arrays a = read_struct(ap, name);
  const std::string nm(name);
  VecBatch v;
  v.dtype = read_dtype(a.dtype, nm + "->dtype", false);
  v.device = read_device(a.device, a.device_index, nm + "->");
  v.stream = a.stream;
  if (a.count < (allow_empty ? 0 : 1) || a.count > kLbMaxVecs)
    invalid(nm + "->count: expected " + (allow_empty ? "0" : "1") + " to " + std::to_string(kLbMaxVecs) +
            " vectors, got " + std::to_string(a.count));
  if (!a.numels) invalid(nm + "->numels: null pointer (numels[0] is the vectors' length)");
  v.n = a.numels[0];
  if (v.n < 0) invalid(nm + "->numels[0]: expected >= 0, got " + std::to_string(v.n));
  if (a.count > 0 && !a.data) invalid(nm + "->data: null pointer for " + std::to_string(a.count) + " vectors");
  for (int64_t i = 0; i < a.count; ++i) v.vecs.push_back(a.data[i]);
  return v;
}

// The vectors' pointers, checked (read-only).
void add_vectors(Buffers& bufs, const VecBatch& v, const char* name) {
  for (size_t i = 0; i < v.vecs.size(); ++i)
    bufs.add(v.vecs[i], v.n, dtype_size(v.dtype), false, item(name, static_cast<int64_t>(i)));
}

void same_kind(const VecBatch& a, const VecBatch& b, const char* bname, const char* aname) {
  if (a.dtype != b.dtype || !(a.device == b.device) || a.n != b.n || a.stream != b.stream)
    invalid(std::string(bname) + ": expected the dtype, device, stream and length of " + aname);
}

// ---- batch norm -------------------------------------------------------------------------------------------------

enum BnCall { kFwdTrain, kFwdEval, kBwdTrain, kBwdEval, kStats, kNormalize, kBwdReduce, kBwdDx, kCombine };

// The args, every given pointer checked against its size; `written` lists what this call writes.
BnArgs read_bn(const optkern_batch_norm_args* ap, BnCall call) {
  const optkern_batch_norm_args a = read_struct(ap, "args");
  BnArgs r;
  r.dtype = read_dtype(a.dtype, "args->dtype", true);
  r.device = read_device(a.device, a.device_index, "args->");
  r.stream = a.stream;
  if (a.outer < 0 || a.channels < 1 || a.inner < 0)
    invalid("args: expected outer >= 0, channels >= 1 and inner >= 0, got (" + std::to_string(a.outer) + ", " +
            std::to_string(a.channels) + ", " + std::to_string(a.inner) + ")");
  r.shape.outer = a.outer;
  r.shape.channels = a.channels;
  r.shape.inner = a.inner;
  r.x = a.x;
  r.dy = a.dy;
  r.out = a.out;
  r.weight = a.weight;
  r.bias = a.bias;
  r.running_mean = a.running_mean;
  r.running_var = a.running_var;
  r.dweight = a.dweight;
  r.dbias = a.dbias;
  r.mean = a.mean;
  r.invstd = a.invstd;
  r.m2 = a.m2;
  r.sum_dy = a.sum_dy;
  r.sum_dy_xmu = a.sum_dy_xmu;
  r.eps = a.eps;
  r.factor = a.momentum;
  r.count = a.count;
  if (a.count < 0) invalid("args->count: expected >= 0, got " + std::to_string(a.count));
  if ((a.running_mean == nullptr) != (a.running_var == nullptr))
    invalid(std::string("args->") + (a.running_mean ? "running_var" : "running_mean") +
            ": running_mean and running_var are given together or not at all");
  const int64_t numel = r.shape.numel(), C = a.channels;
  if (a.outer > 0 && a.inner > 0 && numel / a.outer / a.inner != C) invalid("args: outer * channels * inner overflows");
  const int tsize = dtype_size(r.dtype), psize = is_half(r.dtype) ? 4 : tsize;
  const bool fwd = call == kFwdTrain || call == kFwdEval || call == kNormalize;
  const bool dx = call == kBwdTrain || call == kBwdEval || call == kBwdDx;
  // What each call reads and writes, and what it requires.
  struct Slot {
    const void* p;
    int64_t n;
    int size;
    bool written, required;
    const char* name;
    bool dx_only;
  };
  const bool needs_x = call != kBwdEval && call != kCombine;
  const bool needs_dy = dx || call == kBwdReduce;
  const bool mean_out = call == kFwdTrain || call == kFwdEval || call == kStats || call == kCombine;
  const bool invstd_out = call == kFwdTrain || call == kFwdEval || call == kNormalize;
  const bool needs_mean = call != kCombine && call != kStats && call != kFwdEval;  // read (or written) statistics
  const bool needs_invstd = call == kBwdTrain || call == kBwdEval || call == kBwdDx || invstd_out;
  const bool m2_used = call == kStats || call == kCombine || call == kNormalize;
  const bool sums_out = call == kBwdReduce || call == kBwdTrain;  // backward_train: when given (else scratch)
  const bool sums_req = call == kBwdReduce || call == kBwdDx;
  const Slot slots[] = {
      {a.x, numel, tsize, false, needs_x, "args->x", false},
      {a.dy, numel, tsize, false, needs_dy, "args->dy", false},
      {a.out, numel, tsize, true, fwd || dx, "args->out", false},
      {a.weight, C, psize, false, false, "args->weight", false},
      {a.bias, C, psize, false, false, "args->bias", false},
      {a.running_mean, C, psize, call == kFwdTrain || call == kNormalize, call == kFwdEval, "args->running_mean", false},
      {a.running_var, C, psize, call == kFwdTrain || call == kNormalize, call == kFwdEval, "args->running_var", false},
      {a.dweight, C, psize, true, false, "args->dweight", true},
      {a.dbias, C, psize, true, false, "args->dbias", true},
      {a.mean, C, 8, mean_out, needs_mean || mean_out, "args->mean", false},
      {a.invstd, C, 8, invstd_out, needs_invstd, "args->invstd", false},
      {a.m2, C, 8, call == kStats || call == kCombine, m2_used, "args->m2", false},
      {a.sum_dy, C, 8, sums_out, sums_req, "args->sum_dy", false},
      {a.sum_dy_xmu, C, 8, sums_out, sums_req, "args->sum_dy_xmu", false},
  };
  Buffers bufs(r.device);
  for (const Slot& s : slots) {
    if (s.required && s.p == nullptr && s.n > 0) invalid(std::string(s.name) + ": null pointer; this call needs it");
    if (s.dx_only && !dx) continue;  // dweight/dbias: written by the dx calls, ignored by the others
    if (s.p) bufs.add(s.p, s.n, s.size, s.written, s.name);
  }
  bufs.check_overlaps("a written buffer must not alias another buffer of the call");
  return r;
}

template <class F>
optkern_status bn_call(const optkern_batch_norm_args* a, BnCall call, F f) {
  return guarded([&] { f(read_bn(a, call)); });
}


}  // namespace

// ---- the interface ------------------------------------------------------------------------------------------------

extern "C" {

const char* optkern_version(void) { return OPTKERN_VERSION_STRING; }
int32_t optkern_abi_version(void) { return OPTKERN_ABI_VERSION; }
const char* optkern_last_error(void) { return t_error.c_str(); }

const char* optkern_cpu_isa(void) { return cpu_isa_name(cpu_isa()); }
const char* optkern_cpu_best_isa(void) { return cpu_isa_name(cpu_best_isa()); }
optkern_status optkern_set_cpu_isa(const char* isa) {
  return guarded([&] {
    if (!isa) invalid("isa: null pointer");
    const std::string s(isa);
    CpuIsa want;
    if (s == "scalar") want = CpuIsa::scalar;
    else if (s == "avx2") want = CpuIsa::avx2;
    else if (s == "avx512") want = CpuIsa::avx512;
    else invalid("isa: expected \"scalar\", \"avx2\" or \"avx512\", got \"" + s + "\"");
    if (static_cast<int>(want) > static_cast<int>(cpu_best_isa()))
      throw Unsupported("isa: \"" + s + "\" is not supported by this CPU (best: " + cpu_isa_name(cpu_best_isa()) +
                        ")");
    set_cpu_isa(want);
  });
}
optkern_status optkern_set_num_threads(int32_t n) {
  return guarded([&] {
    if (n < 1) invalid("n: expected a thread count >= 1, got " + std::to_string(n));
    set_num_threads(n);
  });
}
int32_t optkern_get_num_threads(void) { return get_num_threads(); }
int32_t optkern_cuda_built(void) { return cuda_built() ? 1 : 0; }
int32_t optkern_cuda_available(void) {
  try {
    return cuda_available() ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

void optkern_tensors_init(optkern_tensors* t) {
  if (!t) return;
  std::memset(t, 0, sizeof(*t));
  t->struct_size = sizeof(*t);
  t->grad_dtype = t->state_dtype = OPTKERN_FLOAT32;
  t->copy_dtype = OPTKERN_BFLOAT16;
}
void optkern_step_info_init(optkern_step_info* s) {
  if (!s) return;
  std::memset(s, 0, sizeof(*s));
  s->struct_size = sizeof(*s);
  s->step = 1;
  s->grad_scale = 1.0;
}
void optkern_arrays_init(optkern_arrays* a) {
  if (!a) return;
  std::memset(a, 0, sizeof(*a));
  a->struct_size = sizeof(*a);
}
void optkern_batch_norm_args_init(optkern_batch_norm_args* a) {
  if (!a) return;
  std::memset(a, 0, sizeof(*a));
  a->struct_size = sizeof(*a);
  a->eps = 1e-5;
  a->momentum = 0.1;
}

// The hyperparameter defaults are the core structs' (torch.optim's).
#define OPTKERN_HYPER_INIT(name, Core, FIELDS)         \
  void optkern_##name##_hyper_init(optkern_##name##_hyper* h) { \
    if (!h) return;                                    \
    std::memset(h, 0, sizeof(*h));                     \
    h->struct_size = sizeof(*h);                       \
    from_core(Core(), h);                              \
  }
OPTKERN_FOR_EACH_HYPER(OPTKERN_HYPER_INIT)
#undef OPTKERN_HYPER_INIT

#define OPTKERN_NUM_STATES(name, Core, FIELDS)                                                \
  optkern_status optkern_##name##_num_states(const optkern_##name##_hyper* h, int32_t* out) { \
    return count_states(h, out);                                                               \
  }
OPTKERN_FOR_EACH_HYPER(OPTKERN_NUM_STATES)
#undef OPTKERN_NUM_STATES

// Every step but NAdam's (its product of momentum coefficients is an extra argument).
#define OPTKERN_STEP(name, Core, FIELDS)                                                                    \
  optkern_status optkern_##name##_step(const optkern_tensors* t, const optkern_##name##_hyper* h,          \
                                       const optkern_step_info* s) {                                       \
    return run_step(t, h, s, [](const StepBatch& b, const Core& hh, const StepInfo& i) { name##_step(b, hh, i); }); \
  }
OPTKERN_STEP(sgd, SgdHyper, _)
OPTKERN_STEP(adam, AdamHyper, _)
OPTKERN_STEP(adagrad, AdagradHyper, _)
OPTKERN_STEP(rmsprop, RmspropHyper, _)
OPTKERN_STEP(adamax, AdamaxHyper, _)
OPTKERN_STEP(adadelta, AdadeltaHyper, _)
OPTKERN_STEP(rprop, RpropHyper, _)
#undef OPTKERN_STEP

optkern_status optkern_nadam_step(const optkern_tensors* t, const optkern_nadam_hyper* h, const optkern_step_info* s,
                                  double* mu_product, int32_t product_in_float32) {
  return guarded([&] {
    if (!mu_product) invalid("mu_product: null pointer");
    const NadamHyper hh = read_hyper(h);
    const Step st = read_step(t, s, nadam_num_states(), true);
    if (!st.info.device_counters && !(std::isfinite(*mu_product) && *mu_product > 0.0))
      invalid("mu_product: expected the finite product (> 0) of the momentum coefficients so far, got " +
              std::to_string(*mu_product));
    *mu_product = nadam_step(st.batch, hh, st.info, *mu_product, product_in_float32 != 0);
  });
}

optkern_status optkern_global_norm(const optkern_arrays* a, double norm_type, double* norm) {
  return guarded([&] {
    std::vector<Buffers> store;
    Buffers* bufs = nullptr;
    const StepBatch b = read_norm_arrays(a, &bufs, store);
    if (!norm) invalid("norm: null pointer");
    *norm = global_norm(b, norm_type);
  });
}

optkern_status optkern_global_norm_device(const optkern_arrays* a, double norm_type, double* norm_device,
                                          float* grad_multiplier, float* found_inf, double max_norm) {
  return guarded([&] {
    std::vector<Buffers> store;
    Buffers* bufs = nullptr;
    const StepBatch b = read_norm_arrays(a, &bufs, store);
    if (b.device.kind != DeviceKind::cuda) invalid("arrays->device: optkern_global_norm_device needs CUDA arrays");
    bufs->add(norm_device, 1, 8, true, "norm_device");
    if (!norm_device) invalid("norm_device: null pointer");
    if ((grad_multiplier == nullptr) != (found_inf == nullptr))
      invalid("grad_multiplier: grad_multiplier and found_inf are given together or not at all");
    if (grad_multiplier) {
      bufs->add(grad_multiplier, 1, 4, true, "grad_multiplier");
      bufs->add(found_inf, 1, 4, true, "found_inf");
    }
    bufs->check_overlaps("the outputs must not alias the arrays or each other");
    NormOutputs o;
    o.norm = norm_device;
    o.grad_multiplier = grad_multiplier;
    o.found_inf = found_inf;
    o.max_norm = max_norm;
    global_norm_device(b, norm_type, o);
  });
}

optkern_status optkern_lbfgs_dots(const optkern_arrays* stored, const optkern_arrays* queries, double* out) {
  return guarded([&] {
    const VecBatch s = read_vectors(stored, "stored", false);
    const VecBatch q = read_vectors(queries, "queries", false);
    same_kind(s, q, "queries", "stored");
    Buffers bufs(s.device);
    add_vectors(bufs, s, "stored->data");
    add_vectors(bufs, q, "queries->data");
    if (!out) invalid("out: null pointer");
    lbfgs_dots(s, q, out);
  });
}

optkern_status optkern_lbfgs_lincomb(const optkern_arrays* vecs, const double* coef, void* out) {
  return guarded([&] {
    const VecBatch v = read_vectors(vecs, "vecs", false);
    Buffers bufs(v.device);
    add_vectors(bufs, v, "vecs->data");
    if (!coef) invalid("coef: null pointer");
    bufs.add(out, v.n, dtype_size(v.dtype), true, "out");
    bufs.check_overlaps("lbfgs_lincomb writes out, so it must not alias any input");
    lbfgs_lincomb(v, std::vector<double>(coef, coef + v.vecs.size()), out);
  });
}

optkern_status optkern_lbfgs_direction(const optkern_arrays* s, const optkern_arrays* y, const void* g, void* out,
                                       double* slope) {
  return guarded([&] {
    const VecBatch sv = read_vectors(s, "s", true);
    const VecBatch yv = read_vectors(y, "y", true);
    same_kind(sv, yv, "y", "s");
    if (yv.vecs.size() != sv.vecs.size())
      invalid("y->count: expected " + std::to_string(sv.vecs.size()) + " like s->count, got " +
              std::to_string(yv.vecs.size()));
    if (sv.vecs.size() > static_cast<size_t>(kLbMaxDirPairs))
      invalid("s->count: expected at most " + std::to_string(kLbMaxDirPairs) + " pairs, got " +
              std::to_string(sv.vecs.size()));
    Buffers bufs(sv.device);
    const int es = dtype_size(sv.dtype);
    add_vectors(bufs, sv, "s->data");
    add_vectors(bufs, yv, "y->data");
    bufs.add(g, sv.n, es, false, "g");
    bufs.add(out, sv.n, es, true, "out");
    bufs.check_overlaps("the direction is written to out, so it must not alias g, s or y");
    lbfgs_direction(sv, yv, g, out, slope);
  });
}

optkern_status optkern_batch_norm_forward_train(const optkern_batch_norm_args* a) {
  return bn_call(a, kFwdTrain, [](const BnArgs& r) { bn_forward_train(r); });
}
optkern_status optkern_batch_norm_forward_eval(const optkern_batch_norm_args* a) {
  return bn_call(a, kFwdEval, [](const BnArgs& r) { bn_forward_eval(r); });
}
optkern_status optkern_batch_norm_backward_train(const optkern_batch_norm_args* a) {
  return bn_call(a, kBwdTrain, [](const BnArgs& r) { bn_backward_train(r); });
}
optkern_status optkern_batch_norm_backward_eval(const optkern_batch_norm_args* a) {
  return bn_call(a, kBwdEval, [](const BnArgs& r) { bn_backward_eval(r); });
}
optkern_status optkern_batch_norm_stats(const optkern_batch_norm_args* a) {
  return bn_call(a, kStats, [](const BnArgs& r) { bn_stats(r); });
}
optkern_status optkern_batch_norm_combine(const optkern_batch_norm_args* a, int64_t nshards, const int64_t* counts,
                                          const double* means, const double* m2s) {
  return guarded([&] {
    const BnArgs r = read_bn(a, kCombine);
    if (nshards < 1) invalid("nshards: expected >= 1, got " + std::to_string(nshards));
    if (!counts || !means || !m2s)
      invalid(std::string(!counts ? "counts" : (!means ? "means" : "m2s")) + ": null pointer");
    Buffers bufs(r.device);
    const int64_t n = nshards * r.shape.channels;
    bufs.add(means, n, 8, false, "means");
    bufs.add(m2s, n, 8, false, "m2s");
    bufs.add(r.mean, r.shape.channels, 8, true, "args->mean");
    bufs.add(r.m2, r.shape.channels, 8, true, "args->m2");
    bufs.check_overlaps("combine writes mean and m2, so they must not alias the shard statistics");
    bn_combine(r, std::vector<int64_t>(counts, counts + nshards), means, m2s);
  });
}
optkern_status optkern_batch_norm_normalize(const optkern_batch_norm_args* a) {
  return bn_call(a, kNormalize, [](const BnArgs& r) { bn_normalize(r); });
}
optkern_status optkern_batch_norm_backward_reduce(const optkern_batch_norm_args* a) {
  return bn_call(a, kBwdReduce, [](const BnArgs& r) { bn_backward_reduce(r); });
}
optkern_status optkern_batch_norm_backward_dx(const optkern_batch_norm_args* a) {
  return bn_call(a, kBwdDx, [](const BnArgs& r) { bn_backward_dx(r); });
}

}  // extern "C"
