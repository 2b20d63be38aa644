/* Five AdamW steps (lr 1e-2, weight_decay 0.01, decoupled) on three float32 tensors through optkern's C interface.
 *
 * The params and each step's grads come from a tiny LCG (below), so tests/test_c_api.py can rebuild the same
 * numbers in Python and check this program's output bit for bit against optkern.adam_step.  Output: lines starting
 * with '#' (the version, a deliberately bad call and its message), then every param, one per line ("%.9g": enough
 * digits to give the float32 back exactly).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <optkern/optkern.h>

#define NTENSORS 3
#define NSTEPS 5

/* x <- 1664525 x + 1013904223 (mod 2^32); the value is the top 24 bits scaled to [-1, 1), exact in float32. */
static uint32_t lcg_state = 12345u;
static float lcg_next(void) {
  lcg_state = lcg_state * 1664525u + 1013904223u;
  return (float)(lcg_state >> 8) * (1.0f / 8388608.0f) - 1.0f;
}

static void check(optkern_status st, const char* what) {
  if (st != OPTKERN_OK) {
    fprintf(stderr, "%s failed: status %d: %s\n", what, (int)st, optkern_last_error());
    exit(1);
  }
}

static float* alloc_floats(int64_t n) {
  float* p = (float*)calloc((size_t)n, sizeof(float)); /* zeros: Adam's states start at 0 */
  if (!p) {
    fprintf(stderr, "out of memory\n");
    exit(1);
  }
  return p;
}

int main(void) {
  const int64_t numels[NTENSORS] = {1000, 17, 1};
  void* params[NTENSORS];
  const void* grads[NTENSORS];
  void* exp_avgs[NTENSORS];
  void* exp_avg_sqs[NTENSORS];
  float* g[NTENSORS];
  optkern_tensors t;
  optkern_adam_hyper h;
  optkern_step_info info;
  optkern_status st;
  int i, step;
  int64_t j;

  if (optkern_abi_version() != OPTKERN_ABI_VERSION) {
    fprintf(stderr, "liboptkern ABI %d, but this program was built against ABI %d\n", (int)optkern_abi_version(),
            OPTKERN_ABI_VERSION);
    return 1;
  }
  printf("# optkern %s (ABI %d, CPU path %s)\n", optkern_version(), (int)optkern_abi_version(), optkern_cpu_isa());

  for (i = 0; i < NTENSORS; ++i) {
    float* p = alloc_floats(numels[i]);
    for (j = 0; j < numels[i]; ++j) p[j] = lcg_next();
    params[i] = p;
    g[i] = alloc_floats(numels[i]);
    grads[i] = g[i];
    exp_avgs[i] = alloc_floats(numels[i]);
    exp_avg_sqs[i] = alloc_floats(numels[i]);
  }

  optkern_tensors_init(&t); /* struct_size and defaults: float32 on the CPU */
  t.dtype = OPTKERN_FLOAT32;
  t.device = OPTKERN_DEVICE_CPU;
  t.count = NTENSORS;
  t.numels = numels;
  t.params = params;
  t.grads = grads;
  t.states[0] = exp_avgs;
  t.states[1] = exp_avg_sqs;

  optkern_adam_hyper_init(&h); /* torch.optim.Adam's defaults */
  h.lr = 1e-2;
  h.weight_decay = 0.01;
  h.decoupled_weight_decay = 1; /* AdamW */

  optkern_step_info_init(&info);
  for (step = 1; step <= NSTEPS; ++step) {
    for (i = 0; i < NTENSORS; ++i)
      for (j = 0; j < numels[i]; ++j) g[i][j] = 0.5f * lcg_next();
    info.step = step;
    check(optkern_adam_step(&t, &h, &info), "optkern_adam_step");
  }

  /* A bad call: refused with a status and a message naming the argument; nothing is written. */
  t.count = -1;
  st = optkern_adam_step(&t, &h, &info);
  printf("# bad call (count = -1): status %d: %s\n", (int)st, optkern_last_error());
  if (st != OPTKERN_INVALID_ARGUMENT) {
    fprintf(stderr, "expected OPTKERN_INVALID_ARGUMENT\n");
    return 1;
  }
  t.count = NTENSORS;

  for (i = 0; i < NTENSORS; ++i) {
    const float* p = (const float*)params[i];
    for (j = 0; j < numels[i]; ++j) printf("%.9g\n", (double)p[j]);
  }
  for (i = 0; i < NTENSORS; ++i) {
    free(params[i]);
    free(g[i]);
    free(exp_avgs[i]);
    free(exp_avg_sqs[i]);
  }
  return 0;
}
