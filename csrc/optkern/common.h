// optkern common definitions: host/device qualifiers and the small math helpers every rule uses.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define OK_HD __host__ __device__ __forceinline__
#else
#define OK_HD inline __attribute__((always_inline))
#endif

namespace optkern {

// Element types.  f32/f64 are computed in themselves; bf16/f16 are storage types, loaded into float32 and rounded
// back by precision.h (the executors' load/store layer); i16 holds the low halves of "split" float32 masters.
enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3, i16 = 4 };

OK_HD int dtype_size(DType d) { return d == DType::f64 ? 8 : (d == DType::f32 ? 4 : 2); }
inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
    default: return "int16";
  }
}
OK_HD bool is_half(DType d) { return d == DType::bf16 || d == DType::f16; }  // a 16-bit float

constexpr int kMaxStates = 5;  // state buffers per tensor an optimizer rule may have (TensorSlots::ptr: 2 + this)

// Branch-free helpers written as plain ternaries so that the CPU compiler turns them into
// vector blends / min / max and the CUDA compiler into selects.
template <class T>
OK_HD T ok_max(T a, T b) {  // NaN in either operand propagates, like torch.maximum
  return (a < b || b != b) ? b : a;
}
template <class T>
OK_HD T ok_min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
OK_HD T ok_abs(T a) {
  return a < T(0) ? -a : a;
}
template <class T>
OK_HD T ok_sign(T a) {  // torch.sign: -1, 0 or +1 (0 for +-0)
  return a > T(0) ? T(1) : (a < T(0) ? T(-1) : T(0));
}

}  // namespace optkern

#if defined(__CUDACC__)
#define OK_SQRT(x) sqrt(x)
#else
#include <cmath>
#define OK_SQRT(x) std::sqrt(x)
#endif
