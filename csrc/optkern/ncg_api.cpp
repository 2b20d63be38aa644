// NCG direction kernel: argument checks and dispatch to the CPU or CUDA executor.
#include "ncg_api.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "dispatch.h"
#include "lbfgs_executors.h"

namespace optkern {

double ncg_direction(const VecBatch& g, void* v, double beta) {
  if (g.vecs.size() != 1)
    throw std::invalid_argument("g: expected one vector, got " + std::to_string(g.vecs.size()));
  if (g.n < 0) throw std::invalid_argument("g: expected n >= 0, got " + std::to_string(g.n));
  if (!std::isfinite(beta)) throw std::invalid_argument("beta: expected a finite number, got " + std::to_string(beta));
  if (g.n == 0) return 0.0;
  if (g.vecs[0] == nullptr) throw std::invalid_argument("g: null data pointer");
  if (v == nullptr) throw std::invalid_argument("v: null data pointer");
  double slope = 0.0;
  OPTKERN_DISPATCH(g.device, ncg_direction(g, v, beta, &slope));
  return slope;
}

}  // namespace optkern
