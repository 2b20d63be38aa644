// Nonlinear conjugate gradients (NCG): the per-element direction update and the beta rules, shared by the CPU
// executor (cpu/lbfgs_cpu_kernels.cpp, V a 16-lane GCC vector of T or T itself), the CUDA executor
// (cuda/lbfgs_cuda.cu, V = T) and the host (ncg_api.cpp, double).  Source: LeCun, Bottou, Orr & Mueller,
// "Efficient BackProp" (1998), section "nonlinear conjugated gradients": v_t = beta_t v_{t-1} - grad F(theta_t).
//
// The direction kernel's slope v_new . g is summed in the dot order of lbfgs_rules.h (chunks of kLbChunk, lane
// blocks of kLbLaneBlock, 16 T lanes, the fixed double tree, chunk partials in chunk order), with v_new as the
// stored vector and g as the query: it equals lbfgs_dots({v_new}, {g}) bit for bit on every path.
// No FMA (-ffp-contract=off / --fmad=false): beta * v is rounded in T, then the difference.
#pragma once

#include "common.h"
#include "lbfgs_rules.h"

namespace optkern {

// The new direction: beta v - g (beta cast to T).  ncg_steepest: -g (a restart; v is not read).
template <class V, class C>
OK_HD V ncg_dir(C beta, V v, V g) {
  return beta * v - g;
}
template <class V>
OK_HD V ncg_steepest(V g) {
  return -g;
}

// beta_t from gg = g_t.g_t, ggp = g_t.g_{t-1} and gpgp = g_{t-1}.g_{t-1} (float64, host):
//  Fletcher-Reeves  gg / gpgp;   Polak-Ribiere  (gg - ggp) / gpgp;   PR+  max(PR, 0).
enum class NcgBeta : int { fletcher_reeves = 0, polak_ribiere = 1, polak_ribiere_plus = 2 };

OK_HD double ncg_beta(NcgBeta rule, double gg, double ggp, double gpgp) {
  if (rule == NcgBeta::fletcher_reeves) return gg / gpgp;
  const double pr = (gg - ggp) / gpgp;
  return rule == NcgBeta::polak_ribiere_plus ? (pr > 0.0 ? pr : 0.0) : pr;
}

}  // namespace optkern
