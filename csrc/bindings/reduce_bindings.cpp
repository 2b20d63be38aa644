// optkern._C reductions over lists of arrays: global_norm.
#include <pybind11/pybind11.h>

#include "../optkern/global_norm_api.h"
#include "array_view.h"

namespace py = pybind11;
using namespace optkern;
using optkern_py::collect_read;
using optkern_py::CollectedStep;

void register_reductions(py::module_& m) {
  m.def(
      "global_norm",
      [](py::handle arrays, double norm_type, int64_t stream) {
        CollectedStep cs = collect_read(arrays, "grads", stream);
        py::gil_scoped_release nogil;
        return global_norm(cs.batch, norm_type);
      },
      py::arg("arrays"), py::arg("norm_type") = 2.0, py::arg("stream") = 0);
}
