// L-BFGS kernels: argument checks and dispatch to the CPU or CUDA executor.
#include "lbfgs_api.h"

#include <stdexcept>
#include <string>

#include "lbfgs_executors.h"
#include "lbfgs_rules.h"

#include "dispatch.h"

namespace optkern {
namespace {


void check_batch(const VecBatch& b, const char* name) {
  const size_t m = b.vecs.size();
  if (m < 1 || m > static_cast<size_t>(kLbMaxVecs))
    throw std::invalid_argument(std::string(name) + ": expected 1 to " + std::to_string(kLbMaxVecs) +
                                " vectors, got " + std::to_string(m));
  if (b.n < 0) throw std::invalid_argument(std::string(name) + ": expected n >= 0, got " + std::to_string(b.n));
  if (b.n > 0)
    for (size_t i = 0; i < m; ++i)
      if (b.vecs[i] == nullptr)
        throw std::invalid_argument(std::string(name) + "[" + std::to_string(i) + "]: null data pointer");
}

}  // namespace

void lbfgs_dots(const VecBatch& stored, const VecBatch& queries, double* out) {
  check_batch(stored, "stored");
  check_batch(queries, "queries");
  if (queries.dtype != stored.dtype)
    throw std::invalid_argument(std::string("queries: expected ") + dtype_name(stored.dtype) + " like stored, got " +
                                dtype_name(queries.dtype));
  if (!(queries.device == stored.device))
    throw std::invalid_argument("queries: expected the device of stored");
  if (queries.n != stored.n)
    throw std::invalid_argument("queries: expected n = " + std::to_string(stored.n) + " like stored, got " +
                                std::to_string(queries.n));
  if (out == nullptr) throw std::invalid_argument("out: null pointer");
  const size_t total = stored.vecs.size() * queries.vecs.size();
  if (stored.n == 0) {
    for (size_t p = 0; p < total; ++p) out[p] = 0.0;
    return;
  }
  OPTKERN_DISPATCH(stored.device, lbfgs_dots(stored, queries, out));
}

void lbfgs_lincomb(const VecBatch& vecs, const std::vector<double>& coef, void* out) {
  check_batch(vecs, "vecs");
  if (coef.size() != vecs.vecs.size())
    throw std::invalid_argument("coefs: expected " + std::to_string(vecs.vecs.size()) +
                                " coefficients (one per vector), got " + std::to_string(coef.size()));
  if (vecs.n == 0) return;
  if (out == nullptr) throw std::invalid_argument("out: null pointer");
  OPTKERN_DISPATCH(vecs.device, lbfgs_lincomb(vecs, coef, out));
}

}  // namespace optkern
