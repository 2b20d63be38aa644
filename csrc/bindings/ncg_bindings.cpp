// optkern._C.ncg_direction / ncg_beta: the NCG direction kernel and beta rules (csrc/optkern/ncg_api.h,
// ncg_rules.h).
//
// g and v are parsed zero-copy and checked (dtype, element count, device, C-contiguity, alignment, v writable and
// not overlapping g, beta finite) before the GIL is released and the kernel runs, so a rejected call writes
// nothing.  Errors name the argument.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "../optkern/ncg_api.h"
#include "array_view.h"
#include "vec_checks.h"

namespace py = pybind11;
using namespace optkern;
using optkern_py::ArrayView;
using optkern_py::check_one;
using optkern_py::Ref;
using optkern_py::value_error;

namespace {

NcgBeta parse_rule(const std::string& rule) {
  if (rule == "fr") return NcgBeta::fletcher_reeves;
  if (rule == "pr") return NcgBeta::polak_ribiere;
  if (rule == "pr+") return NcgBeta::polak_ribiere_plus;
  value_error("beta: expected 'fr', 'pr' or 'pr+', got '" + rule + "'");
}

}  // namespace

void register_ncg(py::module_& m) {
  m.def(
      "ncg_direction",
      [](py::handle g, py::handle v, double beta, int64_t stream) {
        ArrayView gv = ArrayView::from(g, "g", -1, stream);
        check_one(gv, "g", nullptr);
        Ref ref{"g", gv.dtype, gv.numel, gv.device};
        ArrayView vv = ArrayView::from(v, "v", -1, stream);
        check_one(vv, "v", &ref);
        if (vv.readonly) value_error("v: is read-only; ncg_direction writes the new direction into it");
        if (optkern_py::overlaps(vv, gv))
          value_error("v: overlaps g in memory; ncg_direction writes v, so it must not alias g");
        if (!std::isfinite(beta)) value_error("beta: expected a finite number, got " + std::to_string(beta));
        VecBatch gb;
        gb.dtype = ref.dtype;
        gb.device = ref.device;
        gb.stream = reinterpret_cast<void*>(static_cast<uintptr_t>(stream));
        gb.n = ref.numel;
        gb.vecs.assign(1, gv.data);
        void* vp = vv.data;
        py::gil_scoped_release nogil;
        return ncg_direction(gb, vp, beta);
      },
      py::arg("g"), py::arg("v"), py::arg("beta"), py::arg("stream") = 0,
      "v = beta v - g in place (beta == 0: v = -g, v not read), one pass over g and v; returns the slope "
      "dot(v_new, g) as float, bitwise lbfgs_dots([v_new], [g]).  On CUDA the call synchronizes `stream` once.");
  m.def(
      "ncg_beta",
      [](const std::string& rule, double gg, double ggp, double gpgp) {
        return ncg_beta(parse_rule(rule), gg, ggp, gpgp);
      },
      py::arg("rule"), py::arg("gg"), py::arg("ggp"), py::arg("gpgp"),
      "beta from g.g, g.g_prev and g_prev.g_prev: 'fr' gg / gpgp, 'pr' (gg - ggp) / gpgp, 'pr+' max(pr, 0).");
}
