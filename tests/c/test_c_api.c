/* Bad input from C: every refused call returns its documented status, optkern_last_error() names the argument,
 * and nothing was written (every buffer the program owns is compared byte for byte with a snapshot taken before
 * the call); a good call after bad ones succeeds.  Built and run by tests/test_c_api.py.
 *
 * Output: one line per check ("ok   ..." or "FAIL ..."), then a summary; the exit status is non-zero on failure.
 * The buffers are carved out of one static pool, so "nothing written" is one memcmp of the pool (a difference is
 * reported with the name of the buffer it falls in).  Pointers are bent (misaligned, overlapping, NULL) inside
 * that pool only, so even a call that wrongly accepted one could not write outside the program's memory.
 */
#define _POSIX_C_SOURCE 200809L /* pthreads */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <optkern/optkern.h>

/* ---- the pool, its snapshot and the checks --------------------------------------------------------------- */

#define POOL_BYTES 65536
static union {
  double d[POOL_BYTES / 8];
  unsigned char b[POOL_BYTES];
} pool;
static unsigned char snapshot[POOL_BYTES];
static size_t pool_used;

#define MAX_REGIONS 128
static struct {
  size_t begin, end;
  const char* name;
} regions[MAX_REGIONS];
static int nregions;

static int nchecks, nfailures;

/* nbytes of the pool, 64-byte aligned, named for the reports. */
static void* carve(size_t nbytes, const char* name) {
  void* p;
  pool_used = (pool_used + 63) & ~(size_t)63;
  if (pool_used + nbytes > POOL_BYTES || nregions == MAX_REGIONS) {
    fprintf(stderr, "test_c_api: the pool is too small\n");
    exit(2);
  }
  p = pool.b + pool_used;
  regions[nregions].begin = pool_used;
  regions[nregions].end = pool_used + nbytes;
  regions[nregions].name = name;
  ++nregions;
  pool_used += nbytes;
  return p;
}

static void take_snapshot(void) { memcpy(snapshot, pool.b, POOL_BYTES); }

/* The name of the first buffer written since the snapshot, or NULL. */
static const char* first_write(void) {
  size_t i;
  int r;
  for (i = 0; i < POOL_BYTES; ++i)
    if (pool.b[i] != snapshot[i]) {
      for (r = 0; r < nregions; ++r)
        if (i >= regions[r].begin && i < regions[r].end) return regions[r].name;
      return "(padding)";
    }
  return NULL;
}

static void report(int ok, const char* name, const char* detail) {
  ++nchecks;
  if (!ok) ++nfailures;
  printf("%s %s: %s\n", ok ? "ok  " : "FAIL", name, detail);
}

/* A refused call: the status, the message naming `needle`, and nothing written since take_snapshot(). */
static void expect_fail(const char* name, optkern_status got, optkern_status want, const char* needle) {
  char detail[1024];
  const char* msg = optkern_last_error();
  const char* written = first_write();
  if (got != want)
    snprintf(detail, sizeof detail, "status %d, expected %d (message: %s)", (int)got, (int)want, msg);
  else if (strstr(msg, needle) == NULL)
    snprintf(detail, sizeof detail, "the message does not name \"%s\": %s", needle, msg);
  else if (written)
    snprintf(detail, sizeof detail, "refused (status %d) but wrote %s", (int)got, written);
  else
    snprintf(detail, sizeof detail, "status %d: %s", (int)got, msg);
  report(got == want && strstr(msg, needle) != NULL && !written, name, detail);
  if (written) take_snapshot(); /* report each stray write once */
}

/* A call that must succeed (and, when `writes`, change something). */
static void expect_ok(const char* name, optkern_status got, int writes) {
  char detail[1024];
  const char* written = first_write();
  if (got != OPTKERN_OK)
    snprintf(detail, sizeof detail, "status %d: %s", (int)got, optkern_last_error());
  else if (writes && !written)
    snprintf(detail, sizeof detail, "OPTKERN_OK but nothing was written");
  else
    snprintf(detail, sizeof detail, "OPTKERN_OK");
  report(got == OPTKERN_OK && (!writes || written), name, detail);
  take_snapshot();
}

static void expect_true(const char* name, int cond, const char* detail) { report(cond != 0, name, detail); }

/* Deterministic, positive contents (valid squares and step sizes for every optimizer). */
static void fill_floats(float* p, int64_t n, float base) {
  int64_t i;
  for (i = 0; i < n; ++i) p[i] = base + 0.125f * (float)(i % 7);
}
static void fill_doubles(double* p, int64_t n, double base) {
  int64_t i;
  for (i = 0; i < n; ++i) p[i] = base + 0.0625 * (double)(i % 5);
}

/* ---- the optimizer fixture: 3 float32 tensors of 5, 7 and 3 elements, up to 3 states ------------------------ */

#define NT 3
#define CAP 64 /* floats per buffer: room for every numel used here and for views into a buffer */

static float* params[NT];
static float* grads[NT];
static float* states[OPTKERN_MAX_STATES][NT];
static float* masters[NT];
static float* steps; /* counters in memory: one float32 per tensor */
static double* mu_products;
static double* mu_product; /* nadam's host product */
static double* norm_out;

static int64_t numels[NT];
static void* pp[NT];
static const void* gp[NT];
static void* sp[OPTKERN_MAX_STATES][NT];
static void* mp[NT];
static void* stp[NT];
static void* mup[NT];
static optkern_tensors t;
static optkern_step_info info;

static const char* const kParamNames[NT] = {"params[0]", "params[1]", "params[2]"};
static const char* const kGradNames[NT] = {"grads[0]", "grads[1]", "grads[2]"};
static const char* const kStateNames[OPTKERN_MAX_STATES][NT] = {
    {"states[0][0]", "states[0][1]", "states[0][2]"},
    {"states[1][0]", "states[1][1]", "states[1][2]"},
    {"states[2][0]", "states[2][1]", "states[2][2]"}};
static const char* const kMasterNames[NT] = {"masters[0]", "masters[1]", "masters[2]"};

static void carve_optimizer(void) {
  int i, k;
  for (i = 0; i < NT; ++i) {
    params[i] = (float*)carve(CAP * sizeof(float), kParamNames[i]);
    grads[i] = (float*)carve(CAP * sizeof(float), kGradNames[i]);
    for (k = 0; k < OPTKERN_MAX_STATES; ++k) states[k][i] = (float*)carve(CAP * sizeof(float), kStateNames[k][i]);
    masters[i] = (float*)carve(CAP * sizeof(float), kMasterNames[i]);
  }
  steps = (float*)carve(NT * sizeof(float), "steps (counters)");
  mu_products = (double*)carve(NT * sizeof(double), "mu_products (counters)");
  mu_product = (double*)carve(sizeof(double), "mu_product");
  norm_out = (double*)carve(sizeof(double), "norm");
}

/* Fresh contents and a fresh, valid description of the 3 tensors with nstates states; takes the snapshot. */
static void reset_step(int nstates) {
  int i, k;
  numels[0] = 5;
  numels[1] = 7;
  numels[2] = 3;
  for (i = 0; i < NT; ++i) {
    fill_floats(params[i], CAP, 0.5f + (float)i);
    fill_floats(grads[i], CAP, 0.25f);
    for (k = 0; k < OPTKERN_MAX_STATES; ++k) fill_floats(states[k][i], CAP, 0.125f * (float)(k + 1));
    fill_floats(masters[i], CAP, 0.5f + (float)i);
    pp[i] = params[i];
    gp[i] = grads[i];
    for (k = 0; k < OPTKERN_MAX_STATES; ++k) sp[k][i] = states[k][i];
    mp[i] = masters[i];
    steps[i] = 3.0f;
    mu_products[i] = 0.9;
    stp[i] = &steps[i];
    mup[i] = &mu_products[i];
  }
  *mu_product = 0.75;
  *norm_out = -1.0;
  optkern_tensors_init(&t); /* float32 on the CPU */
  t.count = NT;
  t.numels = numels;
  t.params = pp;
  t.grads = gp;
  for (k = 0; k < nstates; ++k) t.states[k] = sp[k];
  optkern_step_info_init(&info);
  info.step = 4;
  take_snapshot();
}

static optkern_adam_hyper adam;

static optkern_status adam_call(void) { return optkern_adam_step(&t, &adam, &info); }

/* A fresh fixture, the statements that break it, and the refused Adam step that must name `needle`. */
#define BAD_STEP(name, needle, ...)                                         \
  do {                                                                      \
    reset_step(2);                                                          \
    __VA_ARGS__;                                                            \
    expect_fail(name, adam_call(), OPTKERN_INVALID_ARGUMENT, needle);       \
  } while (0)

/* A misaligned view: one byte into a buffer (never dereferenced here). */
static void* odd(void* p) { return (unsigned char*)p + 1; }

static void test_step_pointers(void) {
  optkern_status st;
  optkern_adam_hyper_init(&adam);

  reset_step(2);
  expect_fail("tensors NULL", optkern_adam_step(NULL, &adam, &info), OPTKERN_INVALID_ARGUMENT, "tensors");
  expect_fail("hyper NULL", optkern_adam_step(&t, NULL, &info), OPTKERN_INVALID_ARGUMENT, "hyper");
  expect_fail("info NULL", optkern_adam_step(&t, &adam, NULL), OPTKERN_INVALID_ARGUMENT, "info");

  BAD_STEP("numels NULL", "tensors->numels", t.numels = NULL);
  BAD_STEP("params NULL", "tensors->params", t.params = NULL);
  BAD_STEP("grads NULL", "tensors->grads", t.grads = NULL);
  BAD_STEP("states[1] NULL (adam needs 2)", "tensors->states[1]", t.states[1] = NULL);
  reset_step(2);
  adam.amsgrad = 1; /* needs a third state */
  expect_fail("states[2] NULL (amsgrad needs 3)", adam_call(), OPTKERN_INVALID_ARGUMENT, "tensors->states[2]");
  adam.amsgrad = 0;

  /* one bad tensor among good ones: the last of three */
  BAD_STEP("params[2] NULL with numel 3", "params[2]", pp[2] = NULL);
  BAD_STEP("grads[2] NULL with numel 3", "grads[2]", gp[2] = NULL);
  BAD_STEP("states[1][2] NULL with numel 3", "states[1][2]", sp[1][2] = NULL);
  BAD_STEP("numels[2] = -1", "tensors->numels[2]", numels[2] = -1);
  BAD_STEP("params[2] misaligned (odd byte address)", "params[2]", pp[2] = odd(params[2]));
  BAD_STEP("grads[2] misaligned", "grads[2]", gp[2] = odd(grads[2]));
  BAD_STEP("states[0][2] misaligned", "states[0][2]", sp[0][2] = odd(states[0][2]));

  BAD_STEP("count = -1", "tensors->count", t.count = -1);

  /* numel 0 may come with NULL pointers; count 0 with no arrays at all */
  reset_step(2);
  numels[1] = 0;
  pp[1] = NULL;
  gp[1] = NULL;
  sp[0][1] = sp[1][1] = NULL;
  st = adam_call();
  expect_true("numels[1] = 0: tensor 1 untouched",
              memcmp(params[1], snapshot + ((unsigned char*)params[1] - pool.b), CAP * sizeof(float)) == 0,
              "params[1] as it was");
  expect_ok("numels[1] = 0 with NULL pointers", st, 1);
  reset_step(2);
  t.count = 0;
  t.numels = NULL;
  t.params = NULL;
  t.grads = NULL;
  t.states[0] = t.states[1] = NULL;
  expect_ok("count = 0 with NULL arrays", adam_call(), 0);
}

static void test_struct_sizes_and_enums(void) {
  BAD_STEP("tensors struct_size too small", "tensors->struct_size", t.struct_size = sizeof(optkern_tensors) - 8);
  BAD_STEP("tensors struct_size too large", "tensors->struct_size", t.struct_size = sizeof(optkern_tensors) + 8);
  BAD_STEP("hyper struct_size 0", "hyper->struct_size", adam.struct_size = 0);
  adam.struct_size = sizeof adam;
  BAD_STEP("info struct_size too large", "info->struct_size", info.struct_size = sizeof(optkern_step_info) + 16);

  BAD_STEP("unknown dtype", "tensors->dtype", t.dtype = 99);
  BAD_STEP("dtype OPTKERN_INT16 for params", "tensors->dtype", t.dtype = OPTKERN_INT16);
  BAD_STEP("unknown device", "tensors->device", t.device = 7);
  BAD_STEP("device_index 1 on the CPU", "device_index", t.device_index = 1);
  BAD_STEP("unknown master_mode", "tensors->master_mode", t.mixed = 1; t.master_mode = 7);
  BAD_STEP("unknown grad_dtype", "tensors->grad_dtype", t.mixed = 1; t.grad_dtype = 42);
  BAD_STEP("unknown state_dtype", "tensors->state_dtype", t.mixed = 1; t.state_dtype = -1);
  BAD_STEP("master_mode FP32 with masters NULL", "tensors->masters", t.dtype = OPTKERN_BFLOAT16; t.mixed = 1;
           t.grad_dtype = OPTKERN_BFLOAT16; t.master_mode = OPTKERN_MASTER_FP32);
  t.masters = mp;
  mp[2] = odd(masters[2]);
  expect_fail("masters[2] misaligned", adam_call(), OPTKERN_INVALID_ARGUMENT, "masters[2]");
  mp[2] = masters[2];
  t.dtype = OPTKERN_FLOAT16;
  t.grad_dtype = OPTKERN_FLOAT16;
  t.master_mode = OPTKERN_MASTER_SPLIT;
  expect_fail("master_mode SPLIT with float16 params", adam_call(), OPTKERN_INVALID_ARGUMENT, "split");

  BAD_STEP("unknown counter_dtype", "info->counter_dtype", info.counters_in_memory = 1; info.counter_dtype = 5);
  info.counter_dtype = OPTKERN_FLOAT32;
  info.product_dtype = OPTKERN_FLOAT64;
  expect_fail("counters in memory, steps NULL", adam_call(), OPTKERN_INVALID_ARGUMENT, "tensors->steps");
  t.steps = stp;
  pp[2] = odd(params[2]);
  expect_fail("counters in memory, params[2] misaligned: counters kept", adam_call(), OPTKERN_INVALID_ARGUMENT,
              "params[2]");
  pp[2] = params[2];
  stp[1] = odd(&steps[1]);
  expect_fail("steps[1] misaligned", adam_call(), OPTKERN_INVALID_ARGUMENT, "tensors->steps[1]");
  stp[1] = &steps[1];
  expect_ok("counters in memory (good)", adam_call(), 1);
  expect_true("... steps advanced to 4", steps[0] == 4.0f && steps[1] == 4.0f && steps[2] == 4.0f,
              "every counter + 1");
}

static void test_cuda_and_isa(void) {
  const int built = optkern_cuda_built(), available = optkern_cuda_available();
  /* A host pointer for a CUDA device where CUDA runs is a bad argument; a machine or build without CUDA cannot
   * run the call at all (OPTKERN_UNSUPPORTED). */
  const optkern_status want = (built && available) ? OPTKERN_INVALID_ARGUMENT : OPTKERN_UNSUPPORTED;
  char name[128];
  const char* before = optkern_cpu_isa();
  snprintf(name, sizeof name, "OPTKERN_DEVICE_CUDA (cuda built %d, available %d)", built, available);
  reset_step(2);
  t.device = OPTKERN_DEVICE_CUDA;
  expect_fail(name, adam_call(), want, (built && available) ? "params[0]" : "OPTKERN_DEVICE_CUDA");

  reset_step(2);
  expect_fail("set_cpu_isa(NULL)", optkern_set_cpu_isa(NULL), OPTKERN_INVALID_ARGUMENT, "isa");
  expect_fail("set_cpu_isa(\"avx1024\")", optkern_set_cpu_isa("avx1024"), OPTKERN_INVALID_ARGUMENT, "avx1024");
  if (strcmp(optkern_cpu_best_isa(), "avx512") != 0)
    expect_fail("set_cpu_isa(\"avx512\") on a CPU without it", optkern_set_cpu_isa("avx512"), OPTKERN_UNSUPPORTED,
                "avx512");
  expect_true("... the CPU path is unchanged", strcmp(optkern_cpu_isa(), before) == 0, optkern_cpu_isa());
  expect_fail("set_num_threads(0)", optkern_set_num_threads(0), OPTKERN_INVALID_ARGUMENT, "n");
}

static void test_overlaps(void) {
  BAD_STEP("params[2] is params[0]", "params[", pp[2] = params[0]; numels[2] = 5);
  expect_true("... the message names both", strstr(optkern_last_error(), "params[0]") &&
                                                 strstr(optkern_last_error(), "params[2]"),
              optkern_last_error());
  reset_step(2);
  pp[1] = params[0] + 2; /* a partial overlap: params[1] starts inside params[0] */
  expect_fail("params[1] starts inside params[0]", adam_call(), OPTKERN_INVALID_ARGUMENT, "params[");
  BAD_STEP("states[0][1] is grads[1]", "states[0][1]", sp[0][1] = grads[1]);
  expect_true("... the message names the grad", strstr(optkern_last_error(), "grads[1]") != NULL,
              optkern_last_error());
  BAD_STEP("states[1][2] overlaps params[2]", "states[1][2]", sp[1][2] = params[2] + 1);
  reset_step(2);
  gp[1] = grads[0]; /* grads may overlap each other */
  gp[2] = grads[0];
  expect_ok("grads sharing memory (allowed)", adam_call(), 1);
}

/* One out-of-range field over the _init defaults: refused, naming the field, nothing written. */
#define BAD_HYPER(algo, field, value, needle)                                                  \
  do {                                                                                         \
    optkern_##algo##_hyper h_;                                                                 \
    optkern_##algo##_hyper_init(&h_);                                                          \
    h_.field = value;                                                                          \
    expect_fail(#algo " " #field " = " #value, optkern_##algo##_step(&t, &h_, &info),          \
                OPTKERN_INVALID_ARGUMENT, needle);                                             \
  } while (0)

static void test_hyperparameters(void) {
  optkern_nadam_hyper nad;
  int32_t n = -1;

  reset_step(3); /* 3 states: as many as any of these steps reads */
  BAD_HYPER(adam, lr, -1e-3, "lr");
  BAD_HYPER(adam, lr, INFINITY, "lr");
  BAD_HYPER(adam, beta1, 1.0, "beta1");
  BAD_HYPER(adam, beta2, 1.5, "beta2");
  BAD_HYPER(adam, eps, -1e-8, "eps");
  BAD_HYPER(adam, weight_decay, NAN, "weight_decay");
  BAD_HYPER(sgd, lr, -0.1, "lr");
  BAD_HYPER(sgd, momentum, -0.9, "momentum");
  BAD_HYPER(sgd, nesterov, 1, "nesterov"); /* the default momentum is 0 */
  BAD_HYPER(rmsprop, alpha, 1.5, "alpha");
  BAD_HYPER(rmsprop, eps, -1.0, "eps");
  BAD_HYPER(adadelta, rho, 2.0, "rho");
  BAD_HYPER(rprop, etaminus, 1.0, "etaminus");
  BAD_HYPER(rprop, etaplus, 0.5, "etaplus");
  BAD_HYPER(adamax, beta2, 1.0, "beta2");
  BAD_HYPER(adagrad, lr_decay, -1.0, "lr_decay");

  optkern_adam_hyper_init(&adam);
  expect_fail("adam_num_states(out NULL)", optkern_adam_num_states(&adam, NULL), OPTKERN_INVALID_ARGUMENT, "out");
  adam.beta1 = -0.5;
  expect_fail("adam_num_states(bad beta1)", optkern_adam_num_states(&adam, &n), OPTKERN_INVALID_ARGUMENT, "beta1");
  expect_true("... out untouched", n == -1, "n is -1");
  optkern_adam_hyper_init(&adam);

  info.step = 0;
  expect_fail("step = 0", adam_call(), OPTKERN_INVALID_ARGUMENT, "step");
  info.step = 4;
  info.grad_scale = INFINITY;
  expect_fail("grad_scale inf", adam_call(), OPTKERN_INVALID_ARGUMENT, "grad_scale");
  info.grad_scale = 1.0;

  /* NAdam: the host product is not written by a failed call */
  reset_step(2);
  optkern_nadam_hyper_init(&nad);
  nad.momentum_decay = -1.0;
  expect_fail("nadam momentum_decay < 0", optkern_nadam_step(&t, &nad, &info, mu_product, 0),
              OPTKERN_INVALID_ARGUMENT, "momentum_decay");
  optkern_nadam_hyper_init(&nad);
  pp[2] = odd(params[2]);
  expect_fail("nadam params[2] misaligned: mu_product kept", optkern_nadam_step(&t, &nad, &info, mu_product, 0),
              OPTKERN_INVALID_ARGUMENT, "params[2]");
  pp[2] = params[2];
  expect_fail("nadam mu_product NULL", optkern_nadam_step(&t, &nad, &info, NULL, 0), OPTKERN_INVALID_ARGUMENT,
              "mu_product");
  *mu_product = -1.0;
  take_snapshot();
  expect_fail("nadam mu_product < 0", optkern_nadam_step(&t, &nad, &info, mu_product, 0), OPTKERN_INVALID_ARGUMENT,
              "mu_product");
  *mu_product = 0.75;
  take_snapshot();
  expect_ok("nadam (good)", optkern_nadam_step(&t, &nad, &info, mu_product, 0), 1);
  expect_true("... mu_product advanced", *mu_product < 0.75 && *mu_product > 0.0, "0 < product < 0.75");
  /* counters in memory: the products too are kept on failure */
  reset_step(2);
  info.counters_in_memory = 1;
  info.counter_dtype = OPTKERN_FLOAT32;
  info.product_dtype = OPTKERN_FLOAT64;
  t.steps = stp;
  expect_fail("nadam counters, mu_products NULL", optkern_nadam_step(&t, &nad, &info, mu_product, 0),
              OPTKERN_INVALID_ARGUMENT, "tensors->mu_products");
  t.mu_products = mup;
  sp[0][2] = odd(states[0][2]);
  expect_fail("nadam counters, states[0][2] misaligned: counters and products kept",
              optkern_nadam_step(&t, &nad, &info, mu_product, 0), OPTKERN_INVALID_ARGUMENT, "states[0][2]");
}

/* ---- global norm and L-BFGS --------------------------------------------------------------------------------- */

static void test_arrays(void) {
  optkern_arrays a, b;
  const void* data[NT];
  const void* vd[4];
  const void* many[33];
  double* vec[4];
  double* out;
  double* dots;
  int64_t vn[4] = {16, 16, 16, 16};
  double coef[4] = {1.0, -0.5, 0.25, 2.0};
  int i;

  for (i = 0; i < 4; ++i) vec[i] = (double*)params[i % NT]; /* 16 doubles inside each 64-float buffer */
  vec[3] = (double*)grads[0];
  out = (double*)grads[1];
  dots = (double*)grads[2];

  reset_step(0);
  for (i = 0; i < NT; ++i) data[i] = grads[i];
  optkern_arrays_init(&a);
  a.dtype = OPTKERN_FLOAT32;
  a.count = NT;
  a.numels = numels;
  a.data = data;
  expect_fail("global_norm arrays NULL", optkern_global_norm(NULL, 2.0, norm_out), OPTKERN_INVALID_ARGUMENT,
              "arrays");
  expect_fail("global_norm norm NULL", optkern_global_norm(&a, 2.0, NULL), OPTKERN_INVALID_ARGUMENT, "norm");
  expect_fail("global_norm norm_type 1", optkern_global_norm(&a, 1.0, norm_out), OPTKERN_INVALID_ARGUMENT,
              "norm_type");
  data[2] = odd(grads[2]);
  expect_fail("global_norm data[2] misaligned", optkern_global_norm(&a, 2.0, norm_out), OPTKERN_INVALID_ARGUMENT,
              "arrays->data[2]");
  data[2] = NULL;
  expect_fail("global_norm data[2] NULL", optkern_global_norm(&a, 2.0, norm_out), OPTKERN_INVALID_ARGUMENT,
              "arrays->data[2]");
  data[2] = grads[2];
  a.count = -2;
  expect_fail("global_norm count < 0", optkern_global_norm(&a, 2.0, norm_out), OPTKERN_INVALID_ARGUMENT,
              "arrays->count");
  a.count = NT;
  a.struct_size = 4;
  expect_fail("global_norm struct_size", optkern_global_norm(&a, 2.0, norm_out), OPTKERN_INVALID_ARGUMENT,
              "arrays->struct_size");
  a.struct_size = sizeof a;
  a.dtype = OPTKERN_INT16;
  expect_fail("global_norm dtype INT16", optkern_global_norm(&a, 2.0, norm_out), OPTKERN_INVALID_ARGUMENT,
              "arrays->dtype");
  a.dtype = OPTKERN_FLOAT32;
  expect_fail("global_norm_device on CPU arrays", optkern_global_norm_device(&a, 2.0, norm_out, NULL, NULL, 1.0),
              OPTKERN_INVALID_ARGUMENT, "device");
  expect_ok("global_norm (good)", optkern_global_norm(&a, 2.0, norm_out), 1);

  /* L-BFGS: float64 vectors of 16 elements */
  reset_step(0);
  for (i = 0; i < 4; ++i) {
    fill_doubles(vec[i], 16, 0.5 + i);
    vd[i] = vec[i];
  }
  take_snapshot();
  optkern_arrays_init(&a);
  a.dtype = OPTKERN_FLOAT64;
  a.count = 3;
  a.numels = vn;
  a.data = vd;
  optkern_arrays_init(&b);
  b.dtype = OPTKERN_FLOAT64;
  b.count = 1;
  b.numels = vn;
  b.data = vd + 3;
  expect_fail("lbfgs_dots out NULL", optkern_lbfgs_dots(&a, &b, NULL), OPTKERN_INVALID_ARGUMENT, "out");
  a.count = 0;
  expect_fail("lbfgs_dots stored->count 0", optkern_lbfgs_dots(&a, &b, dots), OPTKERN_INVALID_ARGUMENT,
              "stored->count");
  a.count = 65;
  expect_fail("lbfgs_dots stored->count 65", optkern_lbfgs_dots(&a, &b, dots), OPTKERN_INVALID_ARGUMENT,
              "stored->count");
  a.count = 3;
  b.dtype = OPTKERN_FLOAT32;
  expect_fail("lbfgs_dots queries of another dtype", optkern_lbfgs_dots(&a, &b, dots), OPTKERN_INVALID_ARGUMENT,
              "queries");
  b.dtype = OPTKERN_FLOAT64;
  vn[0] = -16;
  expect_fail("lbfgs_dots numels[0] < 0", optkern_lbfgs_dots(&a, &b, dots), OPTKERN_INVALID_ARGUMENT,
              "stored->numels[0]");
  vn[0] = 16;
  vn[2] = 15; /* only numels[0] is read: "numels may be of length 1" */
  expect_ok("lbfgs_dots reads numels[0] only", optkern_lbfgs_dots(&a, &b, dots), 1);
  vn[2] = 16;
  vd[2] = odd(vec[2]);
  expect_fail("lbfgs_dots stored[2] misaligned", optkern_lbfgs_dots(&a, &b, dots), OPTKERN_INVALID_ARGUMENT,
              "stored->data[2]");
  vd[2] = vec[2];

  a.count = 4;
  expect_fail("lbfgs_lincomb coef NULL", optkern_lbfgs_lincomb(&a, NULL, out), OPTKERN_INVALID_ARGUMENT, "coef");
  expect_fail("lbfgs_lincomb out NULL", optkern_lbfgs_lincomb(&a, coef, NULL), OPTKERN_INVALID_ARGUMENT, "out");
  expect_fail("lbfgs_lincomb out overlaps vecs[1]", optkern_lbfgs_lincomb(&a, coef, vec[1] + 2),
              OPTKERN_INVALID_ARGUMENT, "vecs->data[1]");
  expect_fail("lbfgs_lincomb out misaligned", optkern_lbfgs_lincomb(&a, coef, odd(out)), OPTKERN_INVALID_ARGUMENT,
              "out");
  expect_ok("lbfgs_lincomb (good)", optkern_lbfgs_lincomb(&a, coef, out), 1);

  /* direction: s = vecs 0..1, y = vecs 2..3 */
  a.count = 2;
  a.data = vd;
  b.count = 2;
  b.data = vd + 2;
  expect_fail("lbfgs_direction out overlaps g", optkern_lbfgs_direction(&a, &b, out, out + 3, NULL),
              OPTKERN_INVALID_ARGUMENT, "out");
  expect_fail("lbfgs_direction out is y[1]", optkern_lbfgs_direction(&a, &b, out, vec[3], NULL),
              OPTKERN_INVALID_ARGUMENT, "y->data[1]");
  b.count = 1;
  expect_fail("lbfgs_direction y->count != s->count", optkern_lbfgs_direction(&a, &b, out, dots, NULL),
              OPTKERN_INVALID_ARGUMENT, "y->count");
  for (i = 0; i < 33; ++i) many[i] = vec[i % 2];
  a.count = b.count = 33;
  a.data = b.data = many;
  expect_fail("lbfgs_direction 33 pairs", optkern_lbfgs_direction(&a, &b, out, dots, NULL),
              OPTKERN_INVALID_ARGUMENT, "s->count");
  a.count = b.count = 2;
  a.data = vd;
  b.data = vd + 2;
  expect_fail("lbfgs_direction g NULL", optkern_lbfgs_direction(&a, &b, NULL, dots, NULL),
              OPTKERN_INVALID_ARGUMENT, "g");
  memset(vec[3], 0, 16 * sizeof(double)); /* y[1] = 0: s.y = 0 */
  take_snapshot();
  expect_fail("lbfgs_direction a pair with s.y = 0", optkern_lbfgs_direction(&a, &b, out, dots, NULL),
              OPTKERN_INVALID_ARGUMENT, "s.y");
  fill_doubles(vec[3], 16, 3.5);
  take_snapshot();
  expect_ok("lbfgs_direction (good)", optkern_lbfgs_direction(&a, &b, out, dots, NULL), 1);
}

/* ---- batch norm ---------------------------------------------------------------------------------------------- */

static void test_batch_norm(void) {
  /* (outer 4, channels 3, inner 5) float32 in the optimizer's buffers: 60 floats each */
  float* x = params[0];
  float* dy = params[1];
  float* y = params[2];
  float* w = grads[0];
  float* bias = grads[0] + 8;
  float* rm = grads[0] + 16;
  float* rv = grads[0] + 24;
  float* dw = grads[0] + 32;
  float* db = grads[0] + 40;
  double* mean = (double*)grads[1];
  double* invstd = (double*)grads[1] + 8;
  optkern_batch_norm_args a;

  reset_step(0);
  optkern_batch_norm_args_init(&a);
  a.dtype = OPTKERN_FLOAT32;
  a.outer = 4;
  a.channels = 3;
  a.inner = 5;
  a.x = x;
  a.out = y;
  a.weight = w;
  a.bias = bias;
  a.running_mean = rm;
  a.running_var = rv;
  a.mean = mean;
  a.invstd = invstd;
  expect_fail("batch_norm args NULL", optkern_batch_norm_forward_train(NULL), OPTKERN_INVALID_ARGUMENT, "args");
  a.out = (void*)x;
  expect_fail("batch_norm out is x", optkern_batch_norm_forward_train(&a), OPTKERN_INVALID_ARGUMENT, "args->x");
  a.out = x + 7;
  expect_fail("batch_norm out overlaps x", optkern_batch_norm_forward_train(&a), OPTKERN_INVALID_ARGUMENT,
              "args->out");
  a.out = y;
  a.running_mean = rv;
  expect_fail("batch_norm running_mean is running_var", optkern_batch_norm_forward_train(&a),
              OPTKERN_INVALID_ARGUMENT, "args->running_");
  a.running_mean = rm;
  a.running_var = NULL;
  expect_fail("batch_norm running_var NULL, running_mean given", optkern_batch_norm_forward_train(&a),
              OPTKERN_INVALID_ARGUMENT, "args->running_var");
  a.running_var = rv;
  a.mean = NULL;
  expect_fail("batch_norm mean NULL", optkern_batch_norm_forward_train(&a), OPTKERN_INVALID_ARGUMENT, "args->mean");
  a.mean = mean;
  a.x = odd(x);
  expect_fail("batch_norm x misaligned", optkern_batch_norm_forward_train(&a), OPTKERN_INVALID_ARGUMENT, "args->x");
  a.x = x;
  a.channels = 0;
  expect_fail("batch_norm channels 0", optkern_batch_norm_forward_train(&a), OPTKERN_INVALID_ARGUMENT, "channels");
  a.channels = 3;
  a.dtype = 12;
  expect_fail("batch_norm unknown dtype", optkern_batch_norm_forward_train(&a), OPTKERN_INVALID_ARGUMENT,
              "args->dtype");
  a.dtype = OPTKERN_FLOAT32;
  a.struct_size = sizeof a - 8;
  expect_fail("batch_norm struct_size", optkern_batch_norm_forward_train(&a), OPTKERN_INVALID_ARGUMENT,
              "args->struct_size");
  a.struct_size = sizeof a;
  a.eps = -1.0;
  expect_fail("batch_norm eps < 0", optkern_batch_norm_forward_train(&a), OPTKERN_INVALID_ARGUMENT, "eps");
  a.eps = 1e-5;
  a.momentum = NAN;
  expect_fail("batch_norm momentum NaN", optkern_batch_norm_forward_train(&a), OPTKERN_INVALID_ARGUMENT,
              "momentum");
  a.momentum = 0.1;
  a.device = OPTKERN_DEVICE_CUDA + 4;
  expect_fail("batch_norm unknown device", optkern_batch_norm_forward_train(&a), OPTKERN_INVALID_ARGUMENT,
              "args->device");
  a.device = OPTKERN_DEVICE_CPU;
  expect_ok("batch_norm forward_train (good)", optkern_batch_norm_forward_train(&a), 1);

  a.dy = dy;
  a.out = (void*)dy;
  a.dweight = dw;
  a.dbias = db;
  expect_fail("batch_norm backward out is dy", optkern_batch_norm_backward_train(&a), OPTKERN_INVALID_ARGUMENT,
              "args->dy");
  a.out = y;
  a.dweight = (void*)w;
  expect_fail("batch_norm backward dweight is weight", optkern_batch_norm_backward_train(&a),
              OPTKERN_INVALID_ARGUMENT, "args->dweight");
  a.dweight = dw;
  a.invstd = NULL;
  expect_fail("batch_norm backward invstd NULL", optkern_batch_norm_backward_train(&a), OPTKERN_INVALID_ARGUMENT,
              "args->invstd");
  a.invstd = invstd;
  expect_ok("batch_norm backward_train (good)", optkern_batch_norm_backward_train(&a), 1);
}

/* ---- the message is the calling thread's ------------------------------------------------------------------- */

static char thread_message[512];
static optkern_status thread_status;

static void* fail_in_thread(void* arg) {
  (void)arg;
  thread_status = optkern_set_num_threads(-5);
  snprintf(thread_message, sizeof thread_message, "%s", optkern_last_error());
  return NULL;
}

static void test_thread_local_message(void) {
  pthread_t th;
  char detail[1024];
  expect_fail("set_cpu_isa(\"nonsense\") on the main thread", optkern_set_cpu_isa("nonsense"),
              OPTKERN_INVALID_ARGUMENT, "nonsense");
  if (pthread_create(&th, NULL, fail_in_thread, NULL) != 0 || pthread_join(th, NULL) != 0) {
    report(0, "thread", "pthread_create/join failed");
    return;
  }
  snprintf(detail, sizeof detail, "status %d: %s", (int)thread_status, thread_message);
  expect_true("another thread's failure: its own message", thread_status == OPTKERN_INVALID_ARGUMENT &&
                                                               strstr(thread_message, "-5") != NULL, detail);
  expect_true("... the main thread's message is kept", strstr(optkern_last_error(), "nonsense") != NULL,
              optkern_last_error());
}

int main(void) {
  carve_optimizer();
  printf("# liboptkern %s, ABI %d (header %d), CPU path %s, CUDA built %d\n", optkern_version(),
         (int)optkern_abi_version(), OPTKERN_ABI_VERSION, optkern_cpu_isa(), (int)optkern_cuda_built());
  expect_true("ABI version", optkern_abi_version() == OPTKERN_ABI_VERSION, "library and header agree");
  test_step_pointers();
  test_struct_sizes_and_enums();
  test_cuda_and_isa();
  test_overlaps();
  test_hyperparameters();
  test_arrays();
  test_batch_norm();
  test_thread_local_message();
  /* after all those refusals, a good call works */
  optkern_adam_hyper_init(&adam);
  reset_step(2);
  expect_ok("adam after the bad calls", adam_call(), 1);
  printf("%d checks, %d failures\n", nchecks, nfailures);
  return nfailures ? 1 : 0;
}
