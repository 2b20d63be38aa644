// optkern's framework-free C++ API for fused optimizer steps.
//
// A caller (the Python binding, or another framework linking the core) describes N tensors as raw pointers
// in a StepBatch, fills the hyperparameter struct of one algorithm and calls its *_step function.  The
// hyperparameters are checked first (std::invalid_argument naming the argument); then the per-step scalars
// are computed once on the host and every element of every tensor is updated in one pass, on the CPU (SIMD
// dispatch, threads) or on a CUDA device (one launch walking a multi-tensor work plan).
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace optkern {

enum class DeviceKind : int { cpu = 0, cuda = 1 };

struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
};

// One tensor of a step: ptr[0] = param, ptr[1] = grad, ptr[2..] = state buffers in the rule's order.
// step / mu_product: the tensor's device-resident counters (StepInfo::device_counters), else unused.
// master / copy: see Precision (unused unless it asks for them).
struct TensorSlots {
  void* ptr[7] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};  // 2 + kMaxStates
  int64_t numel = 0;
  void* step = nullptr;        // one float32/float64 element: the steps this tensor has taken (torch's state["step"])
  void* mu_product = nullptr;  // NAdam: one float32/float64 element, the product of mu_1..mu_{taken}
  void* master = nullptr;      // float32 master (MasterMode::fp32) or int16 low halves (MasterMode::split)
  void* copy = nullptr;        // a 16-bit copy of the updated param (Precision::copy)
  int64_t key_index = -1;      // stochastic rounding's tensor index (-1: the tensor's position in the batch)
};

// How a 16-bit param's float32 result is kept between steps (precision.h defines every rounding).
//   none:  rounded into the param (to nearest even, or stochastically with Precision::stochastic);
//   fp32:  slots.master holds a float32 master the step reads and writes; the param gets it rounded to nearest even;
//   split: bfloat16 params only: the param is the float32 master's high half (rounded toward zero) and
//          slots.master (int16) its low half, so the pair is the float32 master bit for bit.
enum class MasterMode : int { none = 0, fp32 = 1, split = 2 };
const char* master_mode_name(MasterMode m);

// The storage types of a step.  Every rule computes in float32 for 16-bit and float32 params (float64 for float64
// params); the executors convert on load and store.  Allowed (check_precision):
//   params float64:           everything float64;
//   params float32:           grads float32, bfloat16 or float16 (the CPU-offload step); states float32;
//                             optionally a 16-bit copy of each updated param (slots.copy, rounded to nearest even);
//   params bfloat16/float16:  grads in the param dtype; states float32, bfloat16 or the param dtype; a master mode;
//                             stochastic rounding (master none only).
struct Precision {
  bool mixed = false;  // false: grads and states in the params' dtype, no master, no copy (the fields below unused)
  DType grad = DType::f32, state = DType::f32;
  MasterMode master = MasterMode::none;
  bool copy = false;
  DType copy_dtype = DType::bf16;
  bool stochastic = false;  // round the param stochastically, keyed by (seed, step, tensor index, element)
  uint64_t seed = 0;        // (the step of the key: StepInfo::step, or the count in memory + 1)
};

struct StepBatch {
  DType dtype = DType::f32;  // the params'
  Device device;
  void* stream = nullptr;  // cudaStream_t on CUDA devices (nullptr: the legacy default stream)
  std::vector<TensorSlots> tensors;
  Precision prec;
  DType grad_dtype() const { return prec.mixed ? prec.grad : dtype; }
  DType state_dtype() const { return prec.mixed ? prec.state : dtype; }
};

// Check a step's storage types (std::invalid_argument naming what is wrong), before anything is touched.
void check_precision(const StepBatch& b);

// What every step has in common.  `step` counts steps including this one (1 on the first step), as
// torch's state["step"] after its increment.  grad_scale multiplies the gradient inside the pass (a
// global-norm clip coefficient or an AMP unscale).
struct StepInfo {
  int64_t step = 1;
  double grad_scale = 1.0;
  bool maximize = false;
  // CUDA only, optional: a device float32 scalar multiplied into grad_scale, and a device float32 flag that
  // skips the whole step when non-zero (AMP's found_inf).  Read by the kernel: no host synchronisation.
  const float* grad_scale_device = nullptr;
  const float* found_inf_device = nullptr;
  // The step counts live in memory: on a CUDA device, as torch's capturable state["step"] tensors (and NAdam's
  // mu_product) do, or in host memory for CPU arrays.  Every tensor's slots.step (and, for NAdam,
  // slots.mu_product) points at its counter, of counter_dtype (product_dtype); several tensors may share one.  The kernel computes each
  // tensor's coefficients on the device from its count + 1 (optim_coefs.h, the same functions as the host's), and
  // a second launch advances every distinct counter by one (and the products) unless found_inf_device is
  // non-zero: a skipped step changes nothing, counts included.  `step` is then unused.  On CUDA nothing is read
  // back to the host, so the step can be captured in a CUDA graph and replayed.  The CPU runs the same per-counter
  // function (optim_coefs.h: counter_step).
  bool device_counters = false;
  DType counter_dtype = DType::f32;
  DType product_dtype = DType::f32;
};

struct SgdHyper {
  double lr = 1e-3, momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false;
  bool velocity = false;  // seeds' Algorithms 8.2/8.3: v <- alpha v - lr g; theta <- theta + v
};

struct AdamHyper {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  bool amsgrad = false, decoupled_weight_decay = false;
  bool eps_inside_sqrt = false;  // seeds' Algorithm 8.7: sqrt(r_hat + delta)
  bool bias_correction = true;   // false: Reddi et al.'s AMSGrad as in seed 002 (no bias correction)
};

struct AdagradHyper {
  double lr = 1e-2, lr_decay = 0.0, weight_decay = 0.0, eps = 1e-10;
};

struct RmspropHyper {
  double lr = 1e-2, alpha = 0.99, eps = 1e-8, weight_decay = 0.0, momentum = 0.0;
  bool centered = false;
  bool eps_inside_sqrt = false;  // seeds' Algorithms 8.5/8.6: sqrt(delta + r)
  bool nesterov = false;         // seeds' Algorithm 8.6: velocity form, the array holds theta + alpha v
};

struct AdamaxHyper {
  double lr = 2e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

struct NadamHyper {
  double lr = 2e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0, momentum_decay = 4e-3;
  bool decoupled_weight_decay = false;
  bool momentum_schedule = true;  // false: seed 002's Nadam, constant beta1 (Ruder's form)
};

struct AdadeltaHyper {
  double lr = 1.0, rho = 0.9, eps = 1e-6, weight_decay = 0.0;
};

struct RpropHyper {
  double lr = 1e-2, etaminus = 0.5, etaplus = 1.2, step_size_min = 1e-6, step_size_max = 50.0;
};

// OGR (online gradient linear regression, optim_rules.h: OgrRule): lr is the step factor alpha toward (or away
// from) the fitted parabola's vertex; sgd_lr the plain SGD step's learning rate during the first `warmup` steps and
// whenever a guard refuses the fit; trust the step-length limit relative to the previous step (floored by the SGD
// step); eps the guards' threshold (var(theta) and |lambda|).
struct OgrHyper {
  double lr = 0.5, sgd_lr = 1e-3, beta = 0.9, trust = 2.0, eps = 1e-6, weight_decay = 0.0;
  int64_t warmup = 5;
};

// How many state buffers a step reads and writes for these hyperparameters (the order is the rule's).
int sgd_num_states(const SgdHyper& h);
int adam_num_states(const AdamHyper& h);
int rmsprop_num_states(const RmspropHyper& h);
inline int adagrad_num_states() { return 1; }
inline int adamax_num_states() { return 2; }
inline int nadam_num_states() { return 2; }
inline int adadelta_num_states() { return 2; }
inline int rprop_num_states() { return 2; }
inline int ogr_num_states() { return 5; }  // mean(theta), mean(g), var(theta), cov(g, theta), last step length

// Validate hyperparameters (std::invalid_argument naming the argument) without touching memory.
void check(const SgdHyper& h);
void check(const AdamHyper& h);
void check(const AdagradHyper& h);
void check(const RmspropHyper& h);
void check(const AdamaxHyper& h);
void check(const NadamHyper& h);
void check(const AdadeltaHyper& h);
void check(const RpropHyper& h);
void check(const OgrHyper& h);
void check(const StepInfo& s);

// The steps.  Each checks its hyperparameters and StepInfo, then updates every tensor in place.
void sgd_step(const StepBatch& b, const SgdHyper& h, const StepInfo& s);
void adam_step(const StepBatch& b, const AdamHyper& h, const StepInfo& s);
void adagrad_step(const StepBatch& b, const AdagradHyper& h, const StepInfo& s);
void rmsprop_step(const StepBatch& b, const RmspropHyper& h, const StepInfo& s);
void adamax_step(const StepBatch& b, const AdamaxHyper& h, const StepInfo& s);
// NAdam's momentum schedule needs the running product of mu_1..mu_{t-1}; returns the product through mu_t.
// product_in_float32: the product is kept as a float32 number, as torch's float32 `mu_product` state tensor
// keeps it (mu_product * mu_t computed and rounded in float32); the coefficients then use that rounded value.
// With device counters the products live on the device (slots.mu_product) and the return value is NaN.
double nadam_step(const StepBatch& b, const NadamHyper& h, const StepInfo& s, double mu_product,
                  bool product_in_float32 = false);
void adadelta_step(const StepBatch& b, const AdadeltaHyper& h, const StepInfo& s);
void rprop_step(const StepBatch& b, const RpropHyper& h, const StepInfo& s);
void ogr_step(const StepBatch& b, const OgrHyper& h, const StepInfo& s);

// CPU execution control.
enum class CpuIsa : int { scalar = 0, avx2 = 1, avx512 = 2 };
CpuIsa cpu_isa();                 // the path in use
CpuIsa cpu_best_isa();            // the best this machine supports
void set_cpu_isa(CpuIsa isa);     // throws std::invalid_argument if unsupported here
const char* cpu_isa_name(CpuIsa isa);
void set_num_threads(int n);
int get_num_threads();

// precision.h's conversions as the CPU path in use runs them (for tests): op 0: 16-bit -> float32; 1: float32 ->
// 16-bit, to nearest even; 2: stochastic, keyed by (seed, step, tensor, element index0 + i).  d: bf16 or f16.
void cpu_convert_half(int op, DType d, const void* src, void* dst, int64_t n, uint64_t seed, uint32_t step,
                      uint32_t tensor, uint64_t index0);

// CUDA availability (false when built without CUDA or when no driver/device is present).
bool cuda_built();
bool cuda_available();

}  // namespace optkern
