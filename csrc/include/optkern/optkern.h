/* optkern's C interface: fused optimizer steps, global gradient norms, batch norm and the L-BFGS kernels on
 * host memory (AVX-512/AVX2/scalar, threads) or CUDA device memory, updated in place.
 *
 * C99 and C++.  Link with -loptkern (liboptkern.so; `python -m optkern --libs`, pkg-config `optkern`, or CMake
 * `find_package(optkern CONFIG)` and target `optkern::optkern`).
 *
 * Conventions
 *  - Every call returns an optkern_status; OPTKERN_OK (0) is success.  On failure optkern_last_error() returns a
 *    message for the calling thread that names the argument ("params[3]", "tensors->count", "lr" as torch names
 *    it), kept until the thread's next failed call.  No C++ exception crosses this interface.
 *  - Validate before mutate: every argument of a call (pointers, counts, dtypes, devices, alignment, overlaps,
 *    hyperparameters) is checked before any memory is written.  A failed call writes nothing, counters included.
 *  - Structs begin with `struct_size`: set it to sizeof(the struct) -- the optkern_*_init functions do, and set
 *    the defaults (torch.optim's).  The library reads only the first struct_size bytes, so a program built with an
 *    older header keeps working: fields added later take their defaults.  A struct_size larger than this library
 *    knows, or smaller than the first version of the struct, is refused.
 *  - Booleans are int32_t (0 false, anything else true); enums are passed as int32_t.
 *  - Arrays are contiguous, of the given dtype, aligned to their element size.  Pointers are host pointers for
 *    OPTKERN_DEVICE_CPU, device pointers of device `device_index` for OPTKERN_DEVICE_CUDA (work is queued on
 *    `stream`, a cudaStream_t; NULL is the legacy default stream; the calls do not synchronize unless said).
 *
 * Versioning
 *  - optkern_version() is the package version ("0.1.0").  OPTKERN_ABI_VERSION (the header's) and
 *    optkern_abi_version() (the library's) count incompatible changes; a program should check that they agree.
 *  - Within one ABI version, calls, enum values and struct fields are only added (fields at the end of structs);
 *    nothing is removed, renamed, reordered or given a new meaning.  Numerical results may change in the last bits
 *    between versions (a new instruction-set path, a new reduction order) but stay deterministic within one.
 */
#ifndef OPTKERN_OPTKERN_H_
#define OPTKERN_OPTKERN_H_

#include <stddef.h>
#include <stdint.h>

#define OPTKERN_ABI_VERSION 1

#if defined(_WIN32) && defined(OPTKERN_BUILDING)
#define OPTKERN_API __declspec(dllexport)
#elif defined(_WIN32)
#define OPTKERN_API __declspec(dllimport)
#elif defined(__GNUC__)
#define OPTKERN_API __attribute__((visibility("default")))
#else
#define OPTKERN_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status, versions, control ------------------------------------------------------------------------- */

typedef int32_t optkern_status;
enum {
  OPTKERN_OK = 0,
  OPTKERN_INVALID_ARGUMENT = 1, /* a bad pointer, count, dtype, device, layout or hyperparameter */
  OPTKERN_UNSUPPORTED = 2,      /* valid, but not in this build or on this machine (CUDA, an instruction set) */
  OPTKERN_CUDA_ERROR = 3,       /* a CUDA call failed */
  OPTKERN_INTERNAL_ERROR = 4    /* anything else (out of memory, a bug): the message says what */
};

OPTKERN_API const char* optkern_version(void);
OPTKERN_API int32_t optkern_abi_version(void);
/* The calling thread's message for its last failed call ("" when none failed). */
OPTKERN_API const char* optkern_last_error(void);

/* The CPU path: "scalar", "avx2" or "avx512".  optkern_cpu_isa: in use; optkern_cpu_best_isa: the best this
 * machine runs.  optkern_set_cpu_isa refuses (OPTKERN_UNSUPPORTED) a path this machine cannot run. */
OPTKERN_API const char* optkern_cpu_isa(void);
OPTKERN_API const char* optkern_cpu_best_isa(void);
OPTKERN_API optkern_status optkern_set_cpu_isa(const char* isa);
/* Threads of the CPU kernels (n >= 1; the default is the machine's cores). */
OPTKERN_API optkern_status optkern_set_num_threads(int32_t n);
OPTKERN_API int32_t optkern_get_num_threads(void);
/* Whether the CUDA kernels are built in, and whether a CUDA device can be used now. */
OPTKERN_API int32_t optkern_cuda_built(void);
OPTKERN_API int32_t optkern_cuda_available(void);

/* ---- element types and devices ------------------------------------------------------------------------- */

enum {
  OPTKERN_FLOAT32 = 0,
  OPTKERN_FLOAT64 = 1,
  OPTKERN_BFLOAT16 = 2,
  OPTKERN_FLOAT16 = 3,
  OPTKERN_INT16 = 4 /* only the low halves of "split" float32 masters */
};
enum { OPTKERN_DEVICE_CPU = 0, OPTKERN_DEVICE_CUDA = 1 };

/* ---- optimizer steps ----------------------------------------------------------------------------------------
 *
 * A step updates `count` tensors in one pass: tensor i has numels[i] elements; params[i] (written), grads[i]
 * (read) and states[k][i] (written) for each of the algorithm's state buffers k < optkern_<algo>_num_states
 * (their order is the algorithm's, listed with its hyperparameters).  Every buffer of one kind has one dtype.
 * Written buffers must not overlap each other or any grad; grads may overlap each other.  A tensor with
 * numels[i] == 0 may have NULL pointers.
 *
 * Storage types (the rules compute in float32 for 16-bit and float32 params, in float64 for float64 params):
 *  - mixed == 0: grads and states in `dtype`; the fields after `mixed` are ignored.
 *  - mixed != 0: grad_dtype and state_dtype are read, and
 *      float64 params: everything float64;
 *      float32 params: grads float32, bfloat16 or float16 (the CPU-offload step); states float32; param_copies
 *        (copy_dtype, bfloat16 or float16) optionally receives each updated param rounded to nearest even;
 *      bfloat16/float16 params: grads in the param dtype; states float32, bfloat16 or the param dtype;
 *        master_mode OPTKERN_MASTER_FP32 (masters[i] float32, read and written; the param gets it rounded to
 *        nearest even) or OPTKERN_MASTER_SPLIT (bfloat16 params only: masters[i] int16, the low halves of a
 *        float32 master whose high half is the param); stochastic_rounding (master_mode NONE only) rounds the
 *        param stochastically, keyed by (seed, step, i, element).
 */
#define OPTKERN_MAX_STATES 3
enum { OPTKERN_MASTER_NONE = 0, OPTKERN_MASTER_FP32 = 1, OPTKERN_MASTER_SPLIT = 2 };

typedef struct optkern_tensors {
  size_t struct_size;
  int32_t dtype;        /* the params' */
  int32_t device;       /* OPTKERN_DEVICE_CPU or OPTKERN_DEVICE_CUDA */
  int32_t device_index; /* the CUDA device (0 for the CPU) */
  void* stream;         /* cudaStream_t (CUDA only) */
  int64_t count;        /* tensors, >= 0 */
  const int64_t* numels;
  void* const* params;
  const void* const* grads;
  void* const* states[OPTKERN_MAX_STATES];
  /* 16-bit storage (see above) */
  int32_t mixed;
  int32_t grad_dtype;
  int32_t state_dtype;
  int32_t master_mode;
  void* const* masters;      /* [count] when master_mode != NONE */
  void* const* param_copies; /* [count] or NULL */
  int32_t copy_dtype;
  int32_t stochastic_rounding;
  uint64_t seed;
  /* step counters in memory (optkern_step_info.counters_in_memory): steps[i] points at tensor i's count of steps
   * taken (one element of counter_dtype, host memory on the CPU, device memory on CUDA; tensors may share one);
   * NAdam also needs mu_products[i] (product_dtype): the product of its momentum coefficients so far. */
  void* const* steps;
  void* const* mu_products;
} optkern_tensors;

typedef struct optkern_step_info {
  size_t struct_size;
  int64_t step;       /* steps taken including this one (1 on the first), as torch's state["step"] after it */
  double grad_scale;  /* multiplies every gradient inside the pass (a clip coefficient, an AMP unscale); 1 */
  int32_t maximize;
  /* CUDA only, optional: device float32 scalars, a multiplier of grad_scale and a skip flag (AMP's found_inf:
   * non-zero skips the whole step, counters included), read by the kernel without a host synchronization. */
  const float* grad_scale_device;
  const float* found_inf_device;
  /* Non-zero: the counts live in memory (optkern_tensors.steps / mu_products) and the call advances them; `step`
   * is then unused.  On CUDA nothing is read back to the host (the call can be captured in a CUDA graph). */
  int32_t counters_in_memory;
  int32_t counter_dtype; /* OPTKERN_FLOAT32 or OPTKERN_FLOAT64 */
  int32_t product_dtype;
} optkern_step_info;

/* Hyperparameters, as torch.optim names them (defaults from the _init functions). */
typedef struct optkern_sgd_hyper { /* states: momentum_buffer (when momentum != 0 or velocity) */
  size_t struct_size;
  double lr, momentum, dampening, weight_decay;
  int32_t nesterov;
  int32_t velocity; /* the velocity form v <- momentum v - lr g; theta <- theta + v */
} optkern_sgd_hyper;

typedef struct optkern_adam_hyper { /* states: exp_avg, exp_avg_sq, and max_exp_avg_sq with amsgrad */
  size_t struct_size;
  double lr, beta1, beta2, eps, weight_decay;
  int32_t amsgrad;
  int32_t decoupled_weight_decay; /* AdamW */
  int32_t eps_inside_sqrt;        /* sqrt(v_hat + eps) */
  int32_t bias_correction;        /* 1 */
} optkern_adam_hyper;

typedef struct optkern_adagrad_hyper { /* states: sum */
  size_t struct_size;
  double lr, lr_decay, weight_decay, eps;
} optkern_adagrad_hyper;

typedef struct optkern_rmsprop_hyper { /* states: square_avg, then grad_avg (centered), momentum_buffer */
  size_t struct_size;
  double lr, alpha, eps, weight_decay, momentum;
  int32_t centered;
  int32_t eps_inside_sqrt;
  int32_t nesterov; /* the velocity form with a Nesterov look-ahead (the array holds theta + momentum v) */
} optkern_rmsprop_hyper;

typedef struct optkern_adamax_hyper { /* states: exp_avg, exp_inf */
  size_t struct_size;
  double lr, beta1, beta2, eps, weight_decay;
} optkern_adamax_hyper;

typedef struct optkern_nadam_hyper { /* states: exp_avg, exp_avg_sq */
  size_t struct_size;
  double lr, beta1, beta2, eps, weight_decay, momentum_decay;
  int32_t decoupled_weight_decay;
  int32_t momentum_schedule; /* 1: torch's mu_t schedule; 0: a constant beta1 */
} optkern_nadam_hyper;

typedef struct optkern_adadelta_hyper { /* states: square_avg, acc_delta */
  size_t struct_size;
  double lr, rho, eps, weight_decay;
} optkern_adadelta_hyper;

typedef struct optkern_rprop_hyper { /* states: prev, step_size (initialize step_size to lr, prev to 0) */
  size_t struct_size;
  double lr, etaminus, etaplus, step_size_min, step_size_max;
} optkern_rprop_hyper;

OPTKERN_API void optkern_tensors_init(optkern_tensors* t);
OPTKERN_API void optkern_step_info_init(optkern_step_info* s);
OPTKERN_API void optkern_sgd_hyper_init(optkern_sgd_hyper* h);
OPTKERN_API void optkern_adam_hyper_init(optkern_adam_hyper* h);
OPTKERN_API void optkern_adagrad_hyper_init(optkern_adagrad_hyper* h);
OPTKERN_API void optkern_rmsprop_hyper_init(optkern_rmsprop_hyper* h);
OPTKERN_API void optkern_adamax_hyper_init(optkern_adamax_hyper* h);
OPTKERN_API void optkern_nadam_hyper_init(optkern_nadam_hyper* h);
OPTKERN_API void optkern_adadelta_hyper_init(optkern_adadelta_hyper* h);
OPTKERN_API void optkern_rprop_hyper_init(optkern_rprop_hyper* h);

/* The number of state buffers (into *out) a step with these hyperparameters reads and writes. */
OPTKERN_API optkern_status optkern_sgd_num_states(const optkern_sgd_hyper* h, int32_t* out);
OPTKERN_API optkern_status optkern_adam_num_states(const optkern_adam_hyper* h, int32_t* out);
OPTKERN_API optkern_status optkern_adagrad_num_states(const optkern_adagrad_hyper* h, int32_t* out);
OPTKERN_API optkern_status optkern_rmsprop_num_states(const optkern_rmsprop_hyper* h, int32_t* out);
OPTKERN_API optkern_status optkern_adamax_num_states(const optkern_adamax_hyper* h, int32_t* out);
OPTKERN_API optkern_status optkern_nadam_num_states(const optkern_nadam_hyper* h, int32_t* out);
OPTKERN_API optkern_status optkern_adadelta_num_states(const optkern_adadelta_hyper* h, int32_t* out);
OPTKERN_API optkern_status optkern_rprop_num_states(const optkern_rprop_hyper* h, int32_t* out);

OPTKERN_API optkern_status optkern_sgd_step(const optkern_tensors* t, const optkern_sgd_hyper* h,
                                            const optkern_step_info* s);
OPTKERN_API optkern_status optkern_adam_step(const optkern_tensors* t, const optkern_adam_hyper* h,
                                             const optkern_step_info* s);
OPTKERN_API optkern_status optkern_adagrad_step(const optkern_tensors* t, const optkern_adagrad_hyper* h,
                                                const optkern_step_info* s);
OPTKERN_API optkern_status optkern_rmsprop_step(const optkern_tensors* t, const optkern_rmsprop_hyper* h,
                                                const optkern_step_info* s);
OPTKERN_API optkern_status optkern_adamax_step(const optkern_tensors* t, const optkern_adamax_hyper* h,
                                               const optkern_step_info* s);
/* NAdam's schedule needs the product of mu_1 .. mu_{step-1}: *mu_product holds it on entry (1.0 before the first
 * step) and the product through mu_step on return (unchanged when the call fails; NaN with counters in memory,
 * whose products live in optkern_tensors.mu_products).  product_in_float32: round the product to float32 as
 * torch's float32 mu_product state does. */
OPTKERN_API optkern_status optkern_nadam_step(const optkern_tensors* t, const optkern_nadam_hyper* h,
                                              const optkern_step_info* s, double* mu_product,
                                              int32_t product_in_float32);
OPTKERN_API optkern_status optkern_adadelta_step(const optkern_tensors* t, const optkern_adadelta_hyper* h,
                                                 const optkern_step_info* s);
OPTKERN_API optkern_status optkern_rprop_step(const optkern_tensors* t, const optkern_rprop_hyper* h,
                                              const optkern_step_info* s);

/* ---- lists of read-only arrays: global norms, L-BFGS ---------------------------------------------------------
 * `count` arrays data[i] of numels[i] elements of `dtype` (float32 or float64; global norms also bfloat16 and
 * float16).  For the L-BFGS kernels every vector has numels[0] elements (numels may then be of length 1). */
typedef struct optkern_arrays {
  size_t struct_size;
  int32_t dtype;
  int32_t device;
  int32_t device_index;
  void* stream;
  int64_t count;
  const int64_t* numels;
  const void* const* data;
} optkern_arrays;
OPTKERN_API void optkern_arrays_init(optkern_arrays* a);

/* The norm of all the arrays together: norm_type 2 (sqrt of the sum of squares) or INFINITY (max |x|; NaN
 * propagates), into *norm (host memory).  Deterministic: the same bits on any thread count, instruction set or
 * GPU.  On CUDA the call synchronizes the stream once. */
OPTKERN_API optkern_status optkern_global_norm(const optkern_arrays* a, double norm_type, double* norm);
/* CUDA only, no host synchronization: the norm into device memory (*norm_device, one double) and, when
 * grad_multiplier and found_inf are given (device float32 scalars), torch's clip coefficient
 * min(1, max_norm / (norm + 1e-6)) (1 for a non-finite norm) and 1.0f / 0.0f for a non-finite / finite norm:
 * optkern_step_info.grad_scale_device and found_inf_device as they are. */
OPTKERN_API optkern_status optkern_global_norm_device(const optkern_arrays* a, double norm_type,
                                                      double* norm_device, float* grad_multiplier, float* found_inf,
                                                      double max_norm);

/* ---- L-BFGS -------------------------------------------------------------------------------------------------
 * out[q * k + i] = dot(queries[q], stored[i]) (float64, host memory) for k = stored->count and
 * nq = queries->count, both in 1..64, in one pass over memory.  On CUDA the call synchronizes once. */
OPTKERN_API optkern_status optkern_lbfgs_dots(const optkern_arrays* stored, const optkern_arrays* queries,
                                              double* out);
/* out = sum_i coef[i] vecs[i] (vecs->count in 1..64 coefficients), every input read once and out written once;
 * out must not overlap an input. */
OPTKERN_API optkern_status optkern_lbfgs_lincomb(const optkern_arrays* vecs, const double* coef, void* out);
/* The L-BFGS direction out = -H g from k stored pairs (s_j, y_j), oldest first (0 <= k <= 31, as [g, S, Y]
 * must fit one lbfgs_lincomb of 64 vectors; k = 0 gives -g),
 * H0 = (s.y / y.y of the newest pair) I: the compact form of Byrd, Nocedal & Schnabel (1994) in two passes
 * over memory (one lbfgs_dots with every y as a query, small float64 solves on the host, one lbfgs_lincomb).
 * s and y: k vectors each (arrays of the same dtype, device and length as g); *slope (optional) receives g.d.
 * Every pair needs s.y > 0 (else OPTKERN_INVALID_ARGUMENT, out not written).  Stateless: the Gram matrices are
 * recomputed from the vectors on each call. */
OPTKERN_API optkern_status optkern_lbfgs_direction(const optkern_arrays* s, const optkern_arrays* y,
                                                   const void* g, void* out, double* slope);

/* ---- batch norm ---------------------------------------------------------------------------------------------
 * A tensor is described by its channel layout: its elements in memory order form a contiguous
 * (outer, channels, inner) block: (N, C) is (N, C, 1), NCHW is (N, C, H*W), NHWC is (N*H*W, C, 1).  x, dy and out
 * (y or dx) have `dtype` (float32, float64, bfloat16 or float16); weight, bias, running stats, dweight and dbias
 * the same dtype, or float32 for a 16-bit tensor; mean, invstd, m2, sum_dy and sum_dy_xmu are `channels` float64
 * values.  All on one device.  Optional pointers may be NULL (weight/bias: 1 and 0; running stats: no update;
 * dweight/dbias: not computed). */
typedef struct optkern_batch_norm_args {
  size_t struct_size;
  int32_t dtype;
  int32_t device;
  int32_t device_index;
  void* stream;
  int64_t outer, channels, inner;
  const void* x;
  const void* dy;
  void* out;
  const void* weight;
  const void* bias;
  void* running_mean;
  void* running_var;
  void* dweight;
  void* dbias;
  double* mean;
  double* invstd;
  double* m2;
  double* sum_dy;
  double* sum_dy_xmu;
  double eps;      /* 1e-5 */
  double momentum; /* 0.1: running = (1 - momentum) running + momentum batch (unbiased variance) */
  int64_t count;   /* values per channel over all shards (staged calls); 0: outer * inner */
} optkern_batch_norm_args;
OPTKERN_API void optkern_batch_norm_args_init(optkern_batch_norm_args* a);

/* Training forward: batch statistics into mean and invstd (required), the running stats, y into out. */
OPTKERN_API optkern_status optkern_batch_norm_forward_train(const optkern_batch_norm_args* a);
/* Eval forward from the running stats (required): mean and invstd (required) written, then y. */
OPTKERN_API optkern_status optkern_batch_norm_forward_eval(const optkern_batch_norm_args* a);
/* Training backward from (mean, invstd): dx into out, and dweight/dbias when given. */
OPTKERN_API optkern_status optkern_batch_norm_backward_train(const optkern_batch_norm_args* a);
/* Eval backward: dx = weight invstd dy, and dweight/dbias when given. */
OPTKERN_API optkern_status optkern_batch_norm_backward_eval(const optkern_batch_norm_args* a);
/* Staged (data-parallel) calls: local mean and m2; combine nshards shards (counts[s], means[s * C + c],
 * m2s[s * C + c], host memory on the CPU, device memory on CUDA) into mean and m2; normalize from (count, mean,
 * m2) (invstd written, running stats, y); the backward reduction (sum_dy, sum_dy_xmu); dx from the summed
 * reductions (and dweight/dbias when given). */
OPTKERN_API optkern_status optkern_batch_norm_stats(const optkern_batch_norm_args* a);
OPTKERN_API optkern_status optkern_batch_norm_combine(const optkern_batch_norm_args* a, int64_t nshards,
                                                      const int64_t* counts, const double* means,
                                                      const double* m2s);
OPTKERN_API optkern_status optkern_batch_norm_normalize(const optkern_batch_norm_args* a);
OPTKERN_API optkern_status optkern_batch_norm_backward_reduce(const optkern_batch_norm_args* a);
OPTKERN_API optkern_status optkern_batch_norm_backward_dx(const optkern_batch_norm_args* a);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* OPTKERN_OPTKERN_H_ */
