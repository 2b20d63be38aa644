// Gradient norms over a list of tensors: dispatch to the CPU instruction set in use or to the CUDA executor.
#include "global_norm_api.h"

#include <cmath>

#include "arg_error.h"
#include "executors.h"

namespace optkern {

double global_norm(const StepBatch& b, double norm_type) {
  const bool inf = std::isinf(norm_type) && norm_type > 0;
  if (!(inf || norm_type == 2.0)) bad_arg("norm_type", "2.0 or inf", norm_type);
  if (b.device.kind == DeviceKind::cuda) {
    return inf ? cuda_exec::max_abs(b) : std::sqrt(cuda_exec::sum_squares(b));
  }
  switch (cpu_isa()) {
    case CpuIsa::avx512: return inf ? cpu_avx512::max_abs(b) : std::sqrt(cpu_avx512::sum_squares(b));
    case CpuIsa::avx2: return inf ? cpu_avx2::max_abs(b) : std::sqrt(cpu_avx2::sum_squares(b));
    default: return inf ? cpu_scalar::max_abs(b) : std::sqrt(cpu_scalar::sum_squares(b));
  }
}

}  // namespace optkern
