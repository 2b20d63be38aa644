// Zero-copy views of caller arrays: NumPy (buffer protocol), CuPy and friends (__cuda_array_interface__) and
// anything with __dlpack__ (PyTorch, JAX).  A view holds what keeps the memory alive until the step is done
// and never copies.  Validation of a whole step (dtype, shape, layout, device, writability, aliasing) lives
// in collect_step(), which raises before any kernel touches memory.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../optkern/optim_api.h"

namespace optkern_py {

namespace py = pybind11;
using optkern::Device;
using optkern::DType;

constexpr int kMaxDims = 16;

class ArrayView {
 public:
  ArrayView() = default;
  ArrayView(ArrayView&& o) noexcept;
  ArrayView& operator=(ArrayView&& o) noexcept;
  ArrayView(const ArrayView&) = delete;
  ArrayView& operator=(const ArrayView&) = delete;
  ~ArrayView();

  // Parse obj; kind[index] names it in error messages (e.g. "grads[3]"), built only when an error is raised.
  // index < 0 names it by kind alone.  cuda_stream is handed to __dlpack__.
  static ArrayView from(py::handle obj, const char* kind, int64_t index, int64_t cuda_stream);

  void* data = nullptr;
  bool dtype_ok = false;  // float32 or float64
  DType dtype = DType::f32;
  char dtype_str[64] = {0};  // for messages when unsupported
  int ndim = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t strides[kMaxDims] = {0};  // bytes
  int64_t numel = 0;
  int itemsize = 0;
  bool readonly = false;
  Device device;

  bool dense() const;  // the elements fill one contiguous block, in some axis order
  int64_t nbytes() const { return numel * itemsize; }

 private:
  void release();
  Py_buffer buffer_{};
  bool has_buffer_ = false;
  PyObject* capsule_ = nullptr;  // a consumed DLPack capsule, deleter called on release
  bool versioned_ = false;
  py::object keepalive_;
};

std::string shape_str(const ArrayView& a);

// The binding's errors: TypeError / ValueError with the message as given (it names the argument).
[[noreturn]] void type_error(const std::string& msg);
[[noreturn]] void value_error(const std::string& msg);
std::string device_str(const Device& d);  // "cpu" or "cuda:<index>"

// One step's arrays, validated and turned into a StepBatch.
struct CollectedStep {
  std::vector<ArrayView> views;  // keep the memory alive while the kernel runs
  optkern::StepBatch batch;
};

// params: sequence of arrays (written); grads: sequence (read); states: sequence of sequences (written), one
// per state buffer kind, named by state_names.  nstates must equal len(states).
CollectedStep collect_step(py::handle params, py::handle grads, py::handle states, py::handle state_names,
                           int nstates, int64_t cuda_stream);

// A read-only list of arrays (for norms).
CollectedStep collect_read(py::handle arrays, const char* name, int64_t cuda_stream);

}  // namespace optkern_py
