// optkern._C.lbfgs_dots / lbfgs_lincomb: the fused L-BFGS kernels (csrc/optkern/lbfgs_api.h).
//
// Every array is parsed zero-copy (array_view.cpp) and checked — dtype, element count, device, C-contiguity,
// alignment, writability of out, and out not overlapping any input — before the GIL is released and any kernel
// runs, so a rejected call writes nothing.  Errors name the argument: "stored[3]: expected float64 like
// stored[0], got float32".
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../optkern/lbfgs_api.h"
#include "../optkern/lbfgs_rules.h"
#include "array_view.h"
#include "vec_checks.h"

namespace py = pybind11;
using namespace optkern;
using optkern_py::ArrayView;
using optkern_py::device_str;
using optkern_py::type_error;
using optkern_py::value_error;
using optkern_py::check_one;
using optkern_py::item_name;
using optkern_py::Ref;

namespace {

// Parse a list (or tuple) of 1..64 arrays named kind[i]; ref (when given) fixes dtype/numel/device, else the
// first array does (and *ref is filled).
std::vector<ArrayView> parse_list(py::handle obj, const char* kind, Ref* ref, bool ref_given, int64_t stream) {
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
    type_error(std::string(kind) + ": expected a list of arrays, got " + std::string(py::str(py::type::of(obj))));
  py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
  const size_t m = py::len(seq);
  if (m < 1 || m > static_cast<size_t>(kLbMaxVecs))
    value_error(std::string(kind) + ": expected 1 to " + std::to_string(kLbMaxVecs) + " arrays, got " +
                std::to_string(m));
  std::vector<ArrayView> views;
  views.reserve(m);
  for (size_t i = 0; i < m; ++i) {
    views.push_back(ArrayView::from(seq[i], kind, static_cast<int64_t>(i), stream));
    const ArrayView& v = views.back();
    const std::string name = item_name(kind, i);
    if (i == 0 && !ref_given) {
      check_one(v, name, nullptr);
      ref->name = name;
      ref->dtype = v.dtype;
      ref->numel = v.numel;
      ref->device = v.device;
    } else {
      check_one(v, name, ref);
    }
  }
  return views;
}

VecBatch make_batch(const std::vector<ArrayView>& views, const Ref& ref, int64_t stream) {
  VecBatch b;
  b.dtype = ref.dtype;
  b.device = ref.device;
  b.stream = reinterpret_cast<void*>(static_cast<uintptr_t>(stream));
  b.n = ref.numel;
  for (const ArrayView& v : views) b.vecs.push_back(v.data);
  return b;
}

}  // namespace

void register_lbfgs(py::module_& m) {
  m.def(
      "lbfgs_dots",
      [](py::handle stored, py::handle queries, int64_t stream) {
        Ref ref;
        std::vector<ArrayView> sv = parse_list(stored, "stored", &ref, false, stream);
        std::vector<ArrayView> qv = parse_list(queries, "queries", &ref, true, stream);
        VecBatch sb = make_batch(sv, ref, stream), qb = make_batch(qv, ref, stream);
        const py::ssize_t nq = static_cast<py::ssize_t>(qv.size()), k = static_cast<py::ssize_t>(sv.size());
        py::array_t<double> out({nq, k});
        double* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          lbfgs_dots(sb, qb, o);
        }
        return out;
      },
      py::arg("stored"), py::arg("queries"), py::arg("stream") = 0,
      "out[q, i] = dot(queries[q], stored[i]) for every pair, in one pass over memory; returns a (nq, k) float64 "
      "array.  Deterministic: the same bits for any thread count, CPU instruction set or device.  On CUDA the call "
      "synchronizes `stream` once to return the result.");
  m.def(
      "lbfgs_lincomb",
      [](py::handle vecs, const std::vector<double>& coefs, py::handle out, int64_t stream) {
        Ref ref;
        std::vector<ArrayView> vv = parse_list(vecs, "vecs", &ref, false, stream);
        if (coefs.size() != vv.size())
          value_error("coefs: expected " + std::to_string(vv.size()) + " coefficients (one per array of vecs), got " +
                      std::to_string(coefs.size()));
        ArrayView ov = ArrayView::from(out, "out", -1, stream);
        check_one(ov, "out", &ref);
        if (ov.readonly) value_error("out: is read-only; lbfgs_lincomb writes it and it must be writable");
        for (size_t i = 0; i < vv.size(); ++i)
          if (optkern_py::overlaps(ov, vv[i]))
            value_error("out: overlaps " + item_name("vecs", i) +
                        " in memory; lbfgs_lincomb writes out, so it must not alias any input");
        VecBatch vb = make_batch(vv, ref, stream);
        void* o = ov.data;
        py::gil_scoped_release nogil;
        lbfgs_lincomb(vb, coefs, o);
      },
      py::arg("vecs"), py::arg("coefs"), py::arg("out"), py::arg("stream") = 0,
      "out = sum_i coefs[i] * vecs[i] (coefficients cast to the arrays' dtype, terms added in order), one pass: "
      "every input read once, out written once.  out must not overlap any input.  No synchronization on CUDA.");
}
