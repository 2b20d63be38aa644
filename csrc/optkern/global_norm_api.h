// Gradient norms over a list of tensors (one multi-tensor reduction), on the CPU or a CUDA device.
#pragma once

#include "optim_api.h"

namespace optkern {

// ptr[0] of each slot is read.  norm_type 2 returns sqrt(sum x^2) accumulated in double; norm_type inf returns
// max |x| (NaN propagates).
double global_norm(const StepBatch& b, double norm_type);

}  // namespace optkern
