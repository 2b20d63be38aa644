// Checks shared by the vector-kernel bindings (lbfgs_bindings.cpp, ncg_bindings.cpp): each array is a 1-D-able,
// C-contiguous, itemsize-aligned float32/float64 array agreeing with the call's first array (its Ref) in dtype,
// element count and device; errors name the argument as the caller passed it.
#pragma once

#include <cstdint>
#include <string>

#include "../optkern/common.h"
#include "array_view.h"

namespace optkern_py {

using optkern::dtype_name;

inline std::string item_name(const char* kind, size_t i) { return std::string(kind) + "[" + std::to_string(i) + "]"; }

inline bool c_contiguous(const ArrayView& v) {
  int64_t expect = v.itemsize;
  for (int d = v.ndim - 1; d >= 0; --d) {
    if (v.shape[d] == 1) continue;
    if (v.strides[d] != expect) return false;
    expect *= v.shape[d];
  }
  return true;
}

// The reference for a call: dtype, element count and device of its first array.
struct Ref {
  std::string name;
  DType dtype = DType::f32;
  int64_t numel = 0;
  Device device;
};

inline void check_one(const ArrayView& v, const std::string& name, const Ref* ref) {
  if (!v.dtype_ok) type_error(name + ": expected float32 or float64, got " + v.dtype_str);
  if (ref) {
    if (v.dtype != ref->dtype)
      type_error(name + ": expected " + dtype_name(ref->dtype) + " like " + ref->name + ", got " + dtype_name(v.dtype));
    if (!(v.device == ref->device))
      value_error(name + ": expected an array on " + device_str(ref->device) + " like " + ref->name + ", got " +
                  device_str(v.device));
    if (v.numel != ref->numel)
      value_error(name + ": expected " + std::to_string(ref->numel) + " elements like " + ref->name + ", got shape " +
                  optkern_py::shape_str(v));
  }
  if (v.numel > 0 && !c_contiguous(v))
    value_error(name + ": expected a C-contiguous array (the kernels never copy); got shape " +
                optkern_py::shape_str(v) + " with non-contiguous strides");
  if (v.numel > 0 && reinterpret_cast<uintptr_t>(v.data) % static_cast<uintptr_t>(v.itemsize) != 0)
    value_error(name + ": data pointer is not aligned to its itemsize");
}

// true when the byte ranges of a and b overlap (raw addresses: also two arrays wrapping the same memory).
inline bool overlaps(const ArrayView& a, const ArrayView& b) {
  if (a.numel == 0 || b.numel == 0) return false;
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(a.data), a1 = a0 + static_cast<uintptr_t>(a.nbytes());
  const uintptr_t b0 = reinterpret_cast<uintptr_t>(b.data), b1 = b0 + static_cast<uintptr_t>(b.nbytes());
  return a0 < b1 && b0 < a1;
}

}  // namespace optkern_py
