// Four steps of SGD with Nesterov momentum (lr 0.05, momentum 0.9, weight_decay 1e-3) on three float32 tensors
// held in std::vector, through optkern's C interface (optkern/optkern.h) from C++17.
//
// The params and each step's grads come from the LCG of examples/c/adam.c (seeded differently), so
// tests/test_c_api.py can rebuild them in Python and check the output bit for bit against optkern.sgd_step.
// Output: '#' lines (version and CPU path), then every param, one per line ("%.9g").
#include <optkern/optkern.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

// x <- 1664525 x + 1013904223 (mod 2^32); the value is the top 24 bits scaled to [-1, 1), exact in float32.
struct Lcg {
  uint32_t state;
  float next() {
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) * (1.0f / 8388608.0f) - 1.0f;
  }
};

void check(optkern_status st, const char* what) {
  if (st != OPTKERN_OK) {
    std::fprintf(stderr, "%s failed: status %d: %s\n", what, static_cast<int>(st), optkern_last_error());
    std::exit(1);
  }
}

}  // namespace

int main() {
  if (optkern_abi_version() != OPTKERN_ABI_VERSION) {
    std::fprintf(stderr, "liboptkern ABI %d, but this program was built against ABI %d\n",
                 static_cast<int>(optkern_abi_version()), OPTKERN_ABI_VERSION);
    return 1;
  }
  std::printf("# optkern %s, CPU path %s (best %s)\n", optkern_version(), optkern_cpu_isa(), optkern_cpu_best_isa());

  const std::vector<int64_t> numels = {513, 8, 1};
  const size_t n = numels.size();
  Lcg rng{2024u};
  std::vector<std::vector<float>> params(n), grads(n), momentum_buffers(n);
  for (size_t i = 0; i < n; ++i) {
    params[i].resize(static_cast<size_t>(numels[i]));
    for (float& v : params[i]) v = rng.next();
    grads[i].assign(params[i].size(), 0.0f);
    momentum_buffers[i].assign(params[i].size(), 0.0f);
  }
  std::vector<void*> p(n), m(n);
  std::vector<const void*> g(n);
  for (size_t i = 0; i < n; ++i) {
    p[i] = params[i].data();
    g[i] = grads[i].data();
    m[i] = momentum_buffers[i].data();
  }

  optkern_tensors t;
  optkern_tensors_init(&t);
  t.dtype = OPTKERN_FLOAT32;
  t.device = OPTKERN_DEVICE_CPU;
  t.count = static_cast<int64_t>(n);
  t.numels = numels.data();
  t.params = p.data();
  t.grads = g.data();
  t.states[0] = m.data();

  optkern_sgd_hyper h;
  optkern_sgd_hyper_init(&h);
  h.lr = 0.05;
  h.momentum = 0.9;
  h.weight_decay = 1e-3;
  h.nesterov = 1;
  int32_t nstates = 0;
  check(optkern_sgd_num_states(&h, &nstates), "optkern_sgd_num_states");
  if (nstates != 1) {
    std::fprintf(stderr, "expected 1 state buffer (momentum_buffer), got %d\n", static_cast<int>(nstates));
    return 1;
  }

  optkern_step_info info;
  optkern_step_info_init(&info);
  for (int step = 1; step <= 4; ++step) {
    for (auto& gi : grads)
      for (float& v : gi) v = 0.5f * rng.next();
    info.step = step;
    check(optkern_sgd_step(&t, &h, &info), "optkern_sgd_step");
  }

  for (const auto& pi : params)
    for (float v : pi) std::printf("%.9g\n", static_cast<double>(v));
  return 0;
}
