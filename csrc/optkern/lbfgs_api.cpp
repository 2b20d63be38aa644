// L-BFGS kernels: argument checks and dispatch to the CPU or CUDA executor.
#include "lbfgs_api.h"

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

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

void lbfgs_direction(const VecBatch& s, const VecBatch& y, const void* g, void* out, double* slope) {
  const size_t k = s.vecs.size();
  if (k > static_cast<size_t>(kLbMaxDirPairs))
    throw std::invalid_argument("s: expected at most " + std::to_string(kLbMaxDirPairs) + " pairs, got " +
                                std::to_string(k));
  if (y.vecs.size() != k)
    throw std::invalid_argument("y: expected " + std::to_string(k) + " vectors like s, got " +
                                std::to_string(y.vecs.size()));
  if (k > 0 && (y.dtype != s.dtype || !(y.device == s.device) || y.n != s.n))
    throw std::invalid_argument("y: expected the dtype, device and length of s");
  VecBatch gb = s;  // g alone (k = 0: s carries the dtype, device and n)
  gb.vecs.assign(1, g);
  if (gb.n > 0 && (g == nullptr || out == nullptr))
    throw std::invalid_argument(g == nullptr ? "g: null data pointer" : "out: null data pointer");
  if (k == 0) {
    if (slope) {
      double gg = 0.0;
      lbfgs_dots(gb, gb, &gg);
      *slope = -gg;
    }
    lbfgs_lincomb(gb, {-1.0}, out);
    return;
  }
  VecBatch stored = s, queries = s;
  stored.vecs.insert(stored.vecs.end(), y.vecs.begin(), y.vecs.end());
  if (slope) stored.vecs.push_back(g);
  queries.vecs.assign(1, g);
  queries.vecs.insert(queries.vecs.end(), y.vecs.begin(), y.vecs.end());
  const size_t ns = stored.vecs.size();
  std::vector<double> P(ns * queries.vecs.size());
  lbfgs_dots(stored, queries, P.data());  // pass 1: P[q * ns + i] = queries[q] . stored[i]
  auto SY = [&](size_t i, size_t j) { return P[(1 + j) * ns + i]; };      // s_i . y_j
  auto YY = [&](size_t i, size_t j) { return P[(1 + j) * ns + k + i]; };  // y_i . y_j
  const double* a = &P[0];      // S^T g
  const double* bv = &P[k];     // Y^T g
  const double gamma = SY(k - 1, k - 1) / YY(k - 1, k - 1);
  for (size_t i = 0; i < k; ++i)
    if (!(SY(i, i) > 0.0 && std::isfinite(SY(i, i))))
      throw std::invalid_argument("s: pair " + std::to_string(i) + " has s.y = " + std::to_string(SY(i, i)) +
                                  " (the L-BFGS pairs need s.y > 0)");
  std::vector<double> u(k), c(k), rhs(k);
  for (size_t i = k; i-- > 0;) {  // R u = a, R upper triangular: R[i][j] = s_i . y_j for i <= j
    double t = a[i];
    for (size_t j = i + 1; j < k; ++j) t -= SY(i, j) * u[j];
    u[i] = t / SY(i, i);
  }
  for (size_t i = 0; i < k; ++i) {  // rhs = D u + gamma YY u - gamma b
    double t = 0.0;
    for (size_t j = 0; j < k; ++j) t += YY(i, j) * u[j];
    rhs[i] = SY(i, i) * u[i] + gamma * t - gamma * bv[i];
  }
  for (size_t i = 0; i < k; ++i) {  // R^T c = rhs, R^T lower triangular
    double t = rhs[i];
    for (size_t j = 0; j < i; ++j) t -= SY(j, i) * c[j];
    c[i] = t / SY(i, i);
  }
  std::vector<double> coefs;
  coefs.reserve(2 * k + 1);
  coefs.push_back(-gamma);
  for (size_t i = 0; i < k; ++i) coefs.push_back(-c[i]);
  for (size_t i = 0; i < k; ++i) coefs.push_back(gamma * u[i]);
  if (slope) {
    double ca = 0.0, ub = 0.0;
    for (size_t i = 0; i < k; ++i) {
      ca += c[i] * a[i];
      ub += u[i] * bv[i];
    }
    *slope = -gamma * P[2 * k] - ca + gamma * ub;
  }
  VecBatch all = s;
  all.vecs.assign(1, g);
  all.vecs.insert(all.vecs.end(), s.vecs.begin(), s.vecs.end());
  all.vecs.insert(all.vecs.end(), y.vecs.begin(), y.vecs.end());
  lbfgs_lincomb(all, coefs, out);  // pass 2
}

}  // namespace optkern
