// The L-BFGS executors: one per CPU instruction set (cpu/lbfgs_cpu_kernels.cpp compiled three times) and one
// for CUDA (cuda/lbfgs_cuda.cu).  lbfgs_api.cpp checks the arguments and picks one; executors see n >= 1.
// They also hold the NCG direction kernel (ncg_api.cpp dispatches to it): it is the dots' reduction order with a
// write, and shares their lane-block and chunk-fold code.
#pragma once

#include <vector>

#include "lbfgs_api.h"

namespace optkern {

#define OPTKERN_DECLARE_LBFGS_EXECUTOR(NS)                                              \
  namespace NS {                                                                        \
  void lbfgs_dots(const VecBatch& stored, const VecBatch& queries, double* out);        \
  void lbfgs_lincomb(const VecBatch& vecs, const std::vector<double>& coef, void* out); \
  void ncg_direction(const VecBatch& g, void* v, double beta, double* slope);           \
  }

OPTKERN_DECLARE_LBFGS_EXECUTOR(cpu_scalar)
OPTKERN_DECLARE_LBFGS_EXECUTOR(cpu_avx2)
OPTKERN_DECLARE_LBFGS_EXECUTOR(cpu_avx512)
OPTKERN_DECLARE_LBFGS_EXECUTOR(cuda_exec)

}  // namespace optkern
