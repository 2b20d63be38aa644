// optkern._C reductions over lists of arrays: global_norm (host result), global_norm_device (device result, and
// the device clip of clip_grad_norm), and _global_norm_plan (the partition, for tests).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <vector>

#include "../optkern/global_norm_api.h"
#include "array_view.h"

namespace py = pybind11;
using namespace optkern;
using optkern_py::ArrayView;
using optkern_py::collect_read;
using optkern_py::CollectedStep;
using optkern_py::device_str;
using optkern_py::value_error;

namespace {

// A one-element writable CUDA output of `dtype` on `device` (the arrays' device).
void* parse_output(py::handle obj, const char* name, DType dtype, const Device& device, int64_t stream,
                   ArrayView* keep) {
  *keep = ArrayView::from(obj, name, -1, stream);
  const ArrayView& v = *keep;
  if (v.device.kind != DeviceKind::cuda || !v.dtype_ok || v.dtype != dtype || v.numel != 1)
    value_error(std::string(name) + ": expected a one-element " + dtype_name(dtype) + " CUDA array");
  if (!(v.device == device))
    value_error(std::string(name) + ": expected an array on " + device_str(device) + " like grads, got " +
                device_str(v.device));
  if (v.readonly) value_error(std::string(name) + ": is read-only; it is written");
  return v.data;
}

}  // namespace

void register_reductions(py::module_& m) {
  m.def(
      "global_norm",
      [](py::handle arrays, double norm_type, int64_t stream) {
        CollectedStep cs = collect_read(arrays, "grads", stream);
        py::gil_scoped_release nogil;
        return global_norm(cs.batch, norm_type);
      },
      py::arg("arrays"), py::arg("norm_type") = 2.0, py::arg("stream") = 0,
      "The norm of the concatenation of the arrays (2 or inf), as a float.  On CUDA the call synchronizes `stream` "
      "once to return it.");
  m.def(
      "global_norm_device",
      [](py::handle arrays, double norm_type, py::handle out, int64_t stream, double max_norm,
         py::handle grad_multiplier, py::handle found_inf) {
        CollectedStep cs = collect_read(arrays, "grads", stream);
        if (cs.batch.device.kind != DeviceKind::cuda)
          value_error("grads: global_norm_device needs CUDA arrays (got " +
                      std::string(cs.batch.tensors.empty() ? "no arrays" : "arrays on the CPU") + ")");
        ArrayView ov, gv, fv;
        NormOutputs o;
        o.norm = static_cast<double*>(parse_output(out, "out", DType::f64, cs.batch.device, stream, &ov));
        if (grad_multiplier.is_none() != found_inf.is_none())
          value_error("grad_multiplier: give grad_multiplier and found_inf together (or neither)");
        if (!grad_multiplier.is_none()) {
          if (!(std::isfinite(max_norm) && max_norm >= 0.0))
            value_error("max_norm: expected a finite number >= 0, got " + std::to_string(max_norm));
          o.grad_multiplier = static_cast<float*>(
              parse_output(grad_multiplier, "grad_multiplier", DType::f32, cs.batch.device, stream, &gv));
          o.found_inf =
              static_cast<float*>(parse_output(found_inf, "found_inf", DType::f32, cs.batch.device, stream, &fv));
          o.max_norm = max_norm;
        }
        py::gil_scoped_release nogil;
        global_norm_device(cs.batch, norm_type, o);
      },
      py::arg("arrays"), py::arg("norm_type"), py::arg("out"), py::arg("stream") = 0, py::arg("max_norm") = 0.0,
      py::arg("grad_multiplier") = py::none(), py::arg("found_inf") = py::none(),
      "Write the norm of CUDA arrays to out (one float64 element on their device), stream-ordered on `stream`, "
      "with no host synchronization.  With grad_multiplier and found_inf (one float32 element each) also write "
      "min(1, max_norm / (norm + 1e-6)) (1 for a norm that is inf or NaN) and 1.0 / 0.0 for a non-finite norm.");
  m.def(
      "_global_norm_plan",
      [](const std::vector<int64_t>& numels) {
        const GnPlan plan = gn_plan(numels);
        py::list pieces;
        for (const GnPiece& p : plan.pieces) pieces.append(py::make_tuple(p.tensor, p.begin, p.len));
        return py::make_tuple(pieces, plan.part_begin);
      },
      py::arg("numels"),
      "The global norm's partition of tensors of these sizes: ([(tensor, begin, len) per piece], part bounds).");
}
