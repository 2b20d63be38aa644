// Run an executor call on the path for a device: the CUDA executor for CUDA arrays, else the CPU instruction set
// in use (cpu_isa()).  `call` is the function call without its namespace, e.g. OPTKERN_DISPATCH(dev, f(args)).
#pragma once

#include "optim_api.h"

#define OPTKERN_DISPATCH(dev, call)                     \
  do {                                                  \
    if ((dev).kind == ::optkern::DeviceKind::cuda) {    \
      cuda_exec::call;                                  \
    } else {                                            \
      switch (::optkern::cpu_isa()) {                   \
        case ::optkern::CpuIsa::avx512: cpu_avx512::call; break; \
        case ::optkern::CpuIsa::avx2: cpu_avx2::call; break;     \
        default: cpu_scalar::call; break;               \
      }                                                 \
    }                                                   \
  } while (0)
