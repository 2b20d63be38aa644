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

  // Read and check obj's array interface (read once); kind[index] names it in error messages (e.g. "grads[3]"),
  // built only when an error is raised; index < 0 names it by kind alone.  cuda_stream (the step's stream) is
  // handed to __dlpack__.  A malformed interface (missing or mistyped fields, a size that overflows 64 bits, an
  // unknown version) raises TypeError/ValueError before any CUDA call.  parse() leaves the ordering after a
  // __cuda_array_interface__ producer's stream to the caller (order_after_producers, below).
  static ArrayView parse(py::handle obj, const char* kind, int64_t index, int64_t cuda_stream);
  // parse(), then order cuda_stream after the producer's stream if the interface named one.
  static ArrayView from(py::handle obj, const char* kind, int64_t index, int64_t cuda_stream);

  void* data = nullptr;
  bool dtype_ok = false;  // float32 or float64 (what every float32/float64-only kernel accepts)
  bool known = false;     // one of optkern's DTypes: float32, float64, bfloat16, float16, int16
  DType dtype = DType::f32;
  char dtype_str[64] = {0};  // the dtype in words ("bfloat16", "int32", "complex64"), for messages
  int ndim = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t strides[kMaxDims] = {0};  // bytes
  int64_t numel = 0;
  int itemsize = 0;
  bool readonly = false;
  Device device;
  // __cuda_array_interface__ v3 'stream': the stream the producer's work on this array is queued on (1: legacy
  // default, 2: per-thread default, else a cudaStream_t); 0 when none was given.
  uintptr_t producer_stream = 0;

  bool dense() const;  // the elements fill one contiguous block, in some axis order
  int64_t nbytes() const { return numel * itemsize; }

 private:
  friend struct ArrayReader;  // array_view.cpp: one reader per interface
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

// Order cuda_stream (the call's stream on `device`) after every distinct producer stream of `views` (views
// from parse()): one event record and wait per distinct stream that is not cuda_stream itself; nothing on the CPU.
void order_after_producers(const std::vector<ArrayView>& views, const Device& device, int64_t cuda_stream);

// One step's arrays, validated and turned into a StepBatch.
struct CollectedStep {
  std::vector<ArrayView> views;  // keep the memory alive while the kernel runs
  optkern::StepBatch batch;
};

// params: sequence of arrays (written); grads: sequence (read); states: sequence of sequences (written), one
// per state buffer kind, named by state_names.  nstates must equal len(states).  Every array is parsed and
// checked first; only then is cuda_stream ordered after the arrays' producer streams.
// storage: 16-bit extras (optim_api.h: Precision): masters (a list, one per param: float32 for "fp32", int16 for
// "split"), param copies (a list of 16-bit arrays, float32 params only), stochastic rounding and its seed.  The
// storage types are checked here (TypeError naming the array) and set in the batch's Precision.
struct StepStorage {
  py::handle masters = py::none();
  optkern::MasterMode master = optkern::MasterMode::none;
  py::handle copies = py::none();
  bool stochastic = false;
  uint64_t seed = 0;
};
CollectedStep collect_step(py::handle params, py::handle grads, py::handle states, py::handle state_names,
                           int nstates, int64_t cuda_stream, const StepStorage& storage = StepStorage());
// The storage of a step from the bindings' keywords (master_weights: None, "fp32" or "split"; else ValueError).
StepStorage parse_storage(py::handle masters, py::handle master_weights, py::handle param_copies,
                          bool stochastic_rounding, uint64_t seed);

// A read-only list of arrays (for norms).
CollectedStep collect_read(py::handle arrays, const char* name, int64_t cuda_stream);

}  // namespace optkern_py
