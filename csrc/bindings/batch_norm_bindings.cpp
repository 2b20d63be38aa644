// optkern._C.batch_norm: the one binding behind every batch-norm call of optkern/batch_norm.py.
//
// The Python layer passes the op name and a dict of arrays by role; here every array is parsed (zero-copy,
// array_view.cpp) and checked against the op's contract — dtype, shape, the channel layout of x, device,
// writability, alignment and aliasing — before the GIL is released and any kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "../optkern/batch_norm_api.h"
#include "array_view.h"

namespace py = pybind11;
using namespace optkern;
using optkern_py::ArrayView;
using optkern_py::device_str;
using optkern_py::type_error;
using optkern_py::value_error;

namespace {


std::string strides_str(const ArrayView& a) {
  std::string s = "(";
  for (int d = 0; d < a.ndim; ++d) s += (d ? ", " : "") + std::to_string(a.strides[d] / std::max(a.itemsize, 1));
  return s + (a.ndim == 1 ? ",)" : ")");
}

// The (outer, channels, inner) view of x with the channel on `axis` (already normalized), or an error.
BnShape channel_layout(const ArrayView& x, int axis) {
  BnShape s;
  s.channels = x.shape[axis];
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < axis; ++d) outer *= x.shape[d];
  for (int d = axis + 1; d < x.ndim; ++d) inner *= x.shape[d];
  if (x.numel == 0 || s.channels == 1) {  // any dense layout is (1 or outer, 1, ...): channels == 1 is one block
    s.outer = s.channels == 1 ? 1 : outer;
    s.inner = s.channels == 1 ? x.numel : inner;
    return s;
  }
  auto fail = [&]() {
    value_error("x: the channel axis " + std::to_string(axis) + " must cut x's memory into (outer, channels, inner) "
                "blocks: every other axis must lie wholly outside or inside the channel stride (e.g. C-contiguous "
                "NCHW with axis=1, or NHWC with axis=-1); got shape " + optkern_py::shape_str(x) + " with strides " +
                strides_str(x) + " (in elements)");
  };
  const int64_t it = x.itemsize;
  const int64_t sc = x.strides[axis] / it;
  std::vector<std::pair<int64_t, int64_t>> in_axes, out_axes;  // (stride, size)
  for (int d = 0; d < x.ndim; ++d) {
    if (d == axis || x.shape[d] == 1) continue;
    if (x.strides[d] % it != 0) fail();
    const int64_t st = x.strides[d] / it;
    if (st <= 0) fail();
    (st < sc ? in_axes : out_axes).emplace_back(st, x.shape[d]);
  }
  std::sort(in_axes.begin(), in_axes.end());
  std::sort(out_axes.begin(), out_axes.end());
  int64_t e = 1;
  for (auto& a : in_axes) {
    if (a.first != e) fail();
    e *= a.second;
  }
  if (sc != e) fail();
  s.inner = e;
  e *= s.channels;
  for (auto& a : out_axes) {
    if (a.first != e) fail();
    e *= a.second;
  }
  s.outer = e / (s.inner * s.channels);
  return s;
}

// x's dtype: float32, float64, or (torch's mixed batch norm) bfloat16 / float16 with float32 parameters.
void check_x_dtype(const ArrayView& x) {
  if (!x.known || x.dtype == DType::i16)
    type_error(std::string("x: expected float32, float64, bfloat16 or float16, got ") + x.dtype_str);
}

// The dtype of a per-channel parameter or running statistic for x of dtype d: x's own, float32 for 16-bit x.
DType per_channel_dtype(DType d) { return is_half(d) ? DType::f32 : d; }

// x's checks that need no other argument (rank, axis, density, alignment, layout; its dtype is checked first by
// the caller): the (outer, channels, inner) view, or the error naming x or axis.
BnShape x_layout(const ArrayView& ref, int axis) {
  if (ref.ndim < 2) value_error("x: expected at least 2 dimensions (batch, channels, ...), got shape " + optkern_py::shape_str(ref));
  if (axis < -ref.ndim || axis >= ref.ndim)
    value_error("axis: expected an axis of x in [" + std::to_string(-ref.ndim) + ", " + std::to_string(ref.ndim - 1) +
                "], got " + std::to_string(axis));
  const int ax = axis < 0 ? axis + ref.ndim : axis;
  if (ref.numel > 0 && !ref.dense())
    value_error("x: expected a dense array (strides that neither skip nor repeat elements)");
  if (ref.numel > 0 && reinterpret_cast<uintptr_t>(ref.data) % static_cast<uintptr_t>(ref.itemsize) != 0)
    value_error("x: data pointer is not aligned to its itemsize");
  if (ref.shape[ax] < 1)
    value_error("x: expected at least one channel (axis " + std::to_string(axis) + " of shape " +
                optkern_py::shape_str(ref) + " is empty)");
  return channel_layout(ref, ax);
}

enum Role { kX, kDy, kOut, kChanT, kChanF64, kStacked };

struct Slot {
  const char* key;
  Role role;
  bool write;
  bool required;
};

// What each op reads and writes.
const std::map<std::string, std::vector<Slot>>& op_table() {
  static const std::map<std::string, std::vector<Slot>> t = {
      {"forward_train",
       {{"x", kX, false, true}, {"out", kOut, true, true}, {"weight", kChanT, false, false},
        {"bias", kChanT, false, false}, {"running_mean", kChanT, true, false}, {"running_var", kChanT, true, false},
        {"mean", kChanF64, true, true}, {"invstd", kChanF64, true, true}}},
      {"forward_eval",
       {{"x", kX, false, true}, {"out", kOut, true, true}, {"weight", kChanT, false, false},
        {"bias", kChanT, false, false}, {"running_mean", kChanT, false, true}, {"running_var", kChanT, false, true},
        {"mean", kChanF64, true, true}, {"invstd", kChanF64, true, true}}},
      {"stats", {{"x", kX, false, true}, {"mean", kChanF64, true, true}, {"m2", kChanF64, true, true}}},
      {"combine",
       {{"means", kStacked, false, true}, {"m2s", kStacked, false, true}, {"mean", kChanF64, true, true},
        {"m2", kChanF64, true, true}}},
      {"normalize",
       {{"x", kX, false, true}, {"out", kOut, true, true}, {"weight", kChanT, false, false},
        {"bias", kChanT, false, false}, {"running_mean", kChanT, true, false}, {"running_var", kChanT, true, false},
        {"mean", kChanF64, false, true}, {"m2", kChanF64, false, true}, {"invstd", kChanF64, true, true}}},
      {"backward_train",
       {{"dy", kDy, false, true}, {"x", kX, false, true}, {"out", kOut, true, true}, {"weight", kChanT, false, false},
        {"mean", kChanF64, false, true}, {"invstd", kChanF64, false, true}, {"dweight", kChanT, true, false},
        {"dbias", kChanT, true, false}}},
      {"backward_eval",
       {{"dy", kDy, false, true}, {"x", kX, false, true}, {"out", kOut, true, true}, {"weight", kChanT, false, false},
        {"mean", kChanF64, false, true}, {"invstd", kChanF64, false, true}, {"dweight", kChanT, true, false},
        {"dbias", kChanT, true, false}}},
      {"backward_reduce",
       {{"dy", kDy, false, true}, {"x", kX, false, true}, {"mean", kChanF64, false, true},
        {"sum_dy", kChanF64, true, true}, {"sum_dy_xmu", kChanF64, true, true}}},
      {"backward_dx",
       {{"dy", kDy, false, true}, {"x", kX, false, true}, {"out", kOut, true, true}, {"weight", kChanT, false, false},
        {"mean", kChanF64, false, true}, {"invstd", kChanF64, false, true}, {"sum_dy", kChanF64, false, true},
        {"sum_dy_xmu", kChanF64, false, true}, {"dweight", kChanT, true, false}, {"dbias", kChanT, true, false}}},
  };
  return t;
}

struct Parsed {
  std::map<std::string, ArrayView> views;
  BnArgs args;
  int64_t shards = 0;
  void* get(const char* k) {
    auto it = views.find(k);
    return it == views.end() ? nullptr : it->second.data;
  }
};

struct Range {
  uintptr_t begin, end;
  bool write;
  std::string name;
};

void check_no_overlap(const std::vector<Range>& rs) {
  for (size_t i = 0; i < rs.size(); ++i)
    for (size_t j = i + 1; j < rs.size(); ++j) {
      const Range &a = rs[i], &b = rs[j];
      if ((a.write || b.write) && a.begin < b.end && b.begin < a.end) {
        const Range& w = a.write ? a : b;
        const Range& o = a.write ? b : a;
        value_error(w.name + ": overlaps " + o.name + " in memory; batch norm writes " + w.name +
                    ", so it must not alias any other argument");
      }
    }
}

Parsed parse(const std::string& op, const py::dict& arrays, int axis, int64_t stream) {
  auto it = op_table().find(op);
  if (it == op_table().end()) value_error("op: unknown batch-norm op '" + op + "'");
  const std::vector<Slot>& slots = it->second;
  for (auto item : arrays) {
    std::string k = py::str(item.first);
    bool known = false;
    for (const Slot& s : slots) known |= k == s.key;
    if (!known) value_error(k + ": is not an argument of batch-norm op '" + op + "'");
  }
  Parsed p;
  for (const Slot& s : slots) {
    if (!arrays.contains(s.key) || arrays[s.key].is_none()) {
      if (s.required) value_error(std::string(s.key) + ": is required");
      continue;
    }
    p.views.emplace(s.key, ArrayView::from(arrays[s.key], s.key, -1, stream));
  }
  // The tensor that fixes dtype, device and layout: x, or for combine the stacked means.
  const bool combine = op == "combine";
  const ArrayView& ref = p.views.at(combine ? "means" : "x");
  const char* ref_name = combine ? "means" : "x";
  if (combine) {
    if (!ref.dtype_ok) type_error(std::string(ref_name) + ": expected float32 or float64, got " + ref.dtype_str);
  } else {
    check_x_dtype(ref);
  }
  BnArgs& a = p.args;
  a.dtype = combine ? DType::f64 : ref.dtype;
  a.device = ref.device;
  a.stream = reinterpret_cast<void*>(static_cast<uintptr_t>(stream));
  if (combine) {
    if (ref.ndim != 2) value_error("means: expected a 2-D array (shards, channels), got shape " + optkern_py::shape_str(ref));
    p.shards = ref.shape[0];
    a.shape = BnShape{1, ref.shape[1], 1};
  } else {
    a.shape = x_layout(ref, axis);
  }
  const int64_t C = a.shape.channels;
  std::vector<Range> ranges;
  for (const Slot& s : slots) {
    auto vi = p.views.find(s.key);
    if (vi == p.views.end()) continue;
    const ArrayView& v = vi->second;
    const std::string name = s.key;
    if (!(v.device == a.device))
      value_error(name + ": expected an array on " + device_str(a.device) + " like " + ref_name + ", got " + device_str(v.device));
    if (s.write && v.readonly) value_error(name + ": is read-only; batch norm writes it and it must be writable");
    const bool f64 = s.role == kChanF64 || s.role == kStacked;
    const bool mixed = s.role == kChanT && is_half(a.dtype);  // 16-bit x: float32 parameters and statistics
    const DType want = f64 ? DType::f64 : (s.role == kChanT ? per_channel_dtype(a.dtype) : a.dtype);
    if (!v.known || v.dtype != want)
      type_error(name + ": expected " + dtype_name(want) +
                 (f64 ? " (per-channel statistics are float64)"
                      : mixed ? std::string(" (the parameters and running statistics of ") + dtype_name(a.dtype) +
                                    " x are float32)"
                              : std::string(" like x")) +
                 ", got " + v.dtype_str);
    if (s.role == kDy || s.role == kOut) {
      bool same = v.ndim == ref.ndim;
      for (int d = 0; same && d < ref.ndim; ++d) same = v.shape[d] == ref.shape[d];
      if (!same) value_error(name + ": expected shape " + optkern_py::shape_str(ref) + " like x, got " + optkern_py::shape_str(v));
      for (int d = 0; v.numel > 0 && d < ref.ndim; ++d)
        if (ref.shape[d] > 1 && v.strides[d] != ref.strides[d])
          value_error(name + ": has a different memory layout from x (strides " + strides_str(v) + " against " +
                      strides_str(ref) + "); it must match x's (allocate it with empty_like(x))");
    } else if (s.role == kChanT || s.role == kChanF64) {
      if (v.ndim != 1 || v.shape[0] != C)
        value_error(name + ": expected shape (" + std::to_string(C) + ",) (one value per channel of x), got " +
                    optkern_py::shape_str(v));
      if (C > 1 && v.strides[0] != v.itemsize) value_error(name + ": expected a contiguous array");
    } else if (s.role == kStacked) {
      if (v.ndim != 2 || v.shape[0] != p.shards || v.shape[1] != C)
        value_error(name + ": expected shape (" + std::to_string(p.shards) + ", " + std::to_string(C) + ") like means, got " +
                    optkern_py::shape_str(v));
      if (v.numel > 0 && !(v.strides[1] == 8 && v.strides[0] == 8 * C))
        value_error(name + ": expected a C-contiguous array");
    }
    if (v.numel > 0 && reinterpret_cast<uintptr_t>(v.data) % static_cast<uintptr_t>(v.itemsize) != 0)
      value_error(name + ": data pointer is not aligned to its itemsize");
    if (v.numel > 0) {
      uintptr_t b = reinterpret_cast<uintptr_t>(v.data);
      ranges.push_back(Range{b, b + static_cast<uintptr_t>(v.nbytes()), s.write, name});
    }
  }
  check_no_overlap(ranges);
  if ((p.views.count("running_mean") != 0) != (p.views.count("running_var") != 0))
    value_error(std::string(p.views.count("running_mean") ? "running_var" : "running_mean") +
                ": running_mean and running_var must be given together");

  a.x = p.get("x");
  a.dy = p.get("dy");
  a.out = p.get("out");
  a.weight = p.get("weight");
  a.bias = p.get("bias");
  a.running_mean = p.get("running_mean");
  a.running_var = p.get("running_var");
  a.dweight = p.get("dweight");
  a.dbias = p.get("dbias");
  a.mean = static_cast<double*>(p.get("mean"));
  a.invstd = static_cast<double*>(p.get("invstd"));
  a.m2 = static_cast<double*>(p.get("m2"));
  a.sum_dy = static_cast<double*>(p.get("sum_dy"));
  a.sum_dy_xmu = static_cast<double*>(p.get("sum_dy_xmu"));
  return p;
}

}  // namespace

void register_batch_norm(py::module_& m) {
  m.def(
      "batch_norm",
      [](const std::string& op, const py::dict& arrays, int axis, double eps, double momentum, int64_t count,
         const std::vector<int64_t>& counts, int64_t stream) {
        bn_check_eps(eps);
        bn_check_factor(momentum);
        Parsed p = parse(op, arrays, axis, stream);
        BnArgs& a = p.args;
        a.eps = eps;
        a.factor = momentum;
        a.count = count;
        if (op == "combine" && static_cast<int64_t>(counts.size()) != p.shards)
          value_error("counts: expected " + std::to_string(p.shards) + " counts (one per row of means), got " +
                      std::to_string(counts.size()));
        const double* means = static_cast<const double*>(p.get("means"));
        const double* m2s = static_cast<const double*>(p.get("m2s"));
        py::gil_scoped_release nogil;
        if (op == "forward_train") bn_forward_train(a);
        else if (op == "forward_eval") bn_forward_eval(a);
        else if (op == "stats") bn_stats(a);
        else if (op == "combine") bn_combine(a, counts, means, m2s);
        else if (op == "normalize") bn_normalize(a);
        else if (op == "backward_train") bn_backward_train(a);
        else if (op == "backward_eval") bn_backward_eval(a);
        else if (op == "backward_reduce") bn_backward_reduce(a);
        else bn_backward_dx(a);
        return a.shape.count();
      },
      py::arg("op"), py::arg("arrays"), py::arg("axis") = 1, py::arg("eps") = 1e-5, py::arg("momentum") = 0.1,
      py::arg("count") = 0, py::arg("counts") = std::vector<int64_t>{}, py::arg("stream") = 0,
      "Run one batch-norm op on a dict of arrays by role (see optkern/batch_norm.py); returns the values per channel.");
  m.def(
      "batch_norm_layout",
      [](py::handle x, int axis) {
        ArrayView v = ArrayView::from(x, "x", -1, 0);
        if (v.ndim < 1 || axis < -v.ndim || axis >= v.ndim) value_error("axis: out of range");
        BnShape s = channel_layout(v, axis < 0 ? axis + v.ndim : axis);
        return py::make_tuple(s.outer, s.channels, s.inner);
      },
      py::arg("x"), py::arg("axis"), "The (outer, channels, inner) memory view of x for a channel axis.");
  m.def(
      "_bn_check_x",
      [](py::handle x, int axis) {
        ArrayView v = ArrayView::from(x, "x", -1, 0);
        check_x_dtype(v);
        BnShape s = x_layout(v, axis);
        return py::make_tuple(s.outer, s.channels, s.inner);
      },
      py::arg("x"), py::arg("axis"),
      "x's own checks (dtype, rank, axis, density, alignment, layout; the errors of batch_norm), before anything is "
      "allocated: its (outer, channels, inner) view.");
  m.def(
      "_bn_plan",
      [](int64_t outer, int64_t channels, int64_t inner) {
        BnPlan p = bn_plan(BnShape{outer, channels, inner}, DType::f32);
        return py::make_tuple(p.channels_first, p.rows, p.width, p.row_block, p.nblocks);
      },
      "The reduction plan for an (outer, channels, inner) layout: (channels_first, rows, width, row_block, nblocks).");
  m.def(
      "_bn_row_groups",
      [](int64_t outer, int64_t channels, int64_t inner) {
        BnPlan p = bn_plan(BnShape{outer, channels, inner}, DType::f32);
        return py::make_tuple(p.group, p.ngroups);
      },
      "The rows plan's row groups for an (outer, channels, inner) layout: (blocks per group, groups).");
}
