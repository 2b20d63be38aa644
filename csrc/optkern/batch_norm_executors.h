// The batch-norm executors: one per CPU instruction set (cpu/batch_norm_cpu_kernels.cpp compiled three times)
// and one for CUDA (cuda/batch_norm_cuda.cu).  batch_norm_api.cpp checks the scalars and picks one.
#pragma once

#include <vector>

#include "batch_norm_api.h"

namespace optkern {

#define OPTKERN_DECLARE_BN_EXECUTOR(NS)                                                                  \
  namespace NS {                                                                                         \
  void bn_forward_train(const BnArgs& a);                                                                \
  void bn_forward_eval(const BnArgs& a);                                                                 \
  void bn_backward_train(const BnArgs& a);                                                               \
  void bn_backward_eval(const BnArgs& a);                                                                \
  void bn_stats(const BnArgs& a);                                                                        \
  void bn_combine(const BnArgs& a, const std::vector<int64_t>& counts, const double* means,              \
                  const double* m2s);                                                                    \
  void bn_normalize(const BnArgs& a);                                                                    \
  void bn_backward_reduce(const BnArgs& a);                                                              \
  void bn_backward_dx(const BnArgs& a);                                                                  \
  }

OPTKERN_DECLARE_BN_EXECUTOR(cpu_scalar)
OPTKERN_DECLARE_BN_EXECUTOR(cpu_avx2)
OPTKERN_DECLARE_BN_EXECUTOR(cpu_avx512)
OPTKERN_DECLARE_BN_EXECUTOR(cuda_exec)

}  // namespace optkern
