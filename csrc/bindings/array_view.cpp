// Zero-copy array views and whole-step validation (see array_view.h).
#include "array_view.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include <pybind11/numpy.h>

#include "dlpack.h"

namespace optkern_py {

void type_error(const std::string& msg) { throw py::type_error(msg); }
void value_error(const std::string& msg) { throw py::value_error(msg); }
std::string device_str(const Device& d) {
  return d.kind == optkern::DeviceKind::cpu ? "cpu" : "cuda:" + std::to_string(d.index);
}

namespace {

bool parse_format(const char* f, int itemsize, DType* out) {
  if (!f) return false;
  if (*f == '<' || *f == '=' || *f == '@') ++f;
  if (f[0] == '\0' || f[1] != '\0') return false;
  if (*f == 'f' && itemsize == 4) { *out = DType::f32; return true; }
  if (*f == 'd' && itemsize == 8) { *out = DType::f64; return true; }
  return false;
}

const char* kDLPackName = "dltensor";
const char* kDLPackUsed = "used_dltensor";
const char* kDLPackVersionedName = "dltensor_versioned";
const char* kDLPackVersionedUsed = "used_dltensor_versioned";

}  // namespace

ArrayView::ArrayView(ArrayView&& o) noexcept { *this = std::move(o); }

ArrayView& ArrayView::operator=(ArrayView&& o) noexcept {
  if (this != &o) {
    release();
    data = o.data;
    dtype_ok = o.dtype_ok;
    dtype = o.dtype;
    std::memcpy(dtype_str, o.dtype_str, sizeof(dtype_str));
    ndim = o.ndim;
    std::memcpy(shape, o.shape, sizeof(shape));
    std::memcpy(strides, o.strides, sizeof(strides));
    numel = o.numel;
    itemsize = o.itemsize;
    readonly = o.readonly;
    device = o.device;
    buffer_ = o.buffer_;
    has_buffer_ = o.has_buffer_;
    o.has_buffer_ = false;
    capsule_ = o.capsule_;
    o.capsule_ = nullptr;
    versioned_ = o.versioned_;
    keepalive_ = std::move(o.keepalive_);
  }
  return *this;
}

ArrayView::~ArrayView() { release(); }

void ArrayView::release() {
  if (has_buffer_) {
    PyBuffer_Release(&buffer_);
    has_buffer_ = false;
  }
  if (capsule_) {
    if (versioned_) {
      auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(capsule_, kDLPackVersionedUsed));
      if (m && m->deleter) m->deleter(m);
    } else {
      auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule_, kDLPackUsed));
      if (m && m->deleter) m->deleter(m);
    }
    PyErr_Clear();
    Py_DECREF(capsule_);
    capsule_ = nullptr;
  }
  keepalive_ = py::object();
}

bool ArrayView::dense() const {
  // Sort the non-trivial axes by stride; each stride must equal the product of the smaller extents.
  int idx[kMaxDims];
  int n = 0;
  for (int d = 0; d < ndim; ++d)
    if (shape[d] > 1) idx[n++] = d;
  std::sort(idx, idx + n, [&](int a, int b) { return strides[a] < strides[b]; });
  int64_t expect = itemsize;
  for (int k = 0; k < n; ++k) {
    if (strides[idx[k]] != expect) return false;
    expect *= shape[idx[k]];
  }
  return true;
}

std::string shape_str(const ArrayView& a) {
  std::ostringstream os;
  os << "(";
  for (int d = 0; d < a.ndim; ++d) os << (d ? ", " : "") << a.shape[d];
  if (a.ndim == 1) os << ",";
  os << ")";
  return os.str();
}

ArrayView ArrayView::from(py::handle obj, const char* kind, int64_t index, int64_t cuda_stream) {
  ArrayView v;
  struct LazyName {
    const char* kind;
    int64_t index;
    operator std::string() const { return index < 0 ? std::string(kind) : std::string(kind) + "[" + std::to_string(index) + "]"; }
    std::string operator+(const std::string& s) const { return std::string(*this) + s; }
    std::string operator+(const char* s) const { return std::string(*this) + s; }
  } what{kind, index};
  PyObject* o = obj.ptr();
  // 0. NumPy arrays: read the array struct directly through NumPy's C API (pybind11 loads it at run time).
  {
    auto& api = py::detail::npy_api::get();
    if (api.PyArray_Check_(o)) {
      const auto* a = py::detail::array_proxy(o);
      const auto* d = py::detail::array_descriptor_proxy(a->descr);
      constexpr int kNpyFloat = 11, kNpyDouble = 12;
      constexpr int kWriteable = 0x0400;
      const bool native = d->byteorder != '>';
      if (d->type_num == kNpyFloat && native) { v.dtype = DType::f32; v.itemsize = 4; v.dtype_ok = true; }
      else if (d->type_num == kNpyDouble && native) { v.dtype = DType::f64; v.itemsize = 8; v.dtype_ok = true; }
      else {
        v.itemsize = 1;
        std::snprintf(v.dtype_str, sizeof(v.dtype_str), "%s", std::string(py::str(obj.attr("dtype"))).c_str());
        if (!native) std::snprintf(v.dtype_str, sizeof(v.dtype_str), "a non-native byte order");
      }
      if (a->nd > kMaxDims) value_error(what + ": arrays of more than 16 dimensions are not supported");
      v.data = a->data;
      v.ndim = a->nd;
      v.numel = 1;
      for (int k = 0; k < a->nd; ++k) {
        v.shape[k] = a->dimensions[k];
        v.strides[k] = a->strides[k];
        v.numel *= a->dimensions[k];
      }
      v.readonly = (a->flags & kWriteable) == 0;
      v.keepalive_ = py::reinterpret_borrow<py::object>(obj);
      return v;
    }
  }
  // 1. The buffer protocol (NumPy and anything like it): the fast path.
  if (PyObject_CheckBuffer(o)) {
    if (PyObject_GetBuffer(o, &v.buffer_, PyBUF_RECORDS_RO) != 0) {
      PyErr_Clear();
      type_error(what + ": its buffer could not be read (expected a strided float32/float64 array)");
    }
    v.has_buffer_ = true;
    const Py_buffer& b = v.buffer_;
    v.data = b.buf;
    v.itemsize = static_cast<int>(b.itemsize);
    v.readonly = b.readonly != 0;
    v.dtype_ok = parse_format(b.format, v.itemsize, &v.dtype);
    if (!v.dtype_ok) std::snprintf(v.dtype_str, sizeof(v.dtype_str), "buffer format '%.40s'", b.format ? b.format : "?");
    if (b.ndim > kMaxDims) value_error(what + ": arrays of more than 16 dimensions are not supported");
    v.ndim = b.ndim;
    v.numel = 1;
    for (int d = 0; d < b.ndim; ++d) {
      v.shape[d] = b.shape[d];
      v.strides[d] = b.strides ? b.strides[d] : 0;
      v.numel *= b.shape[d];
    }
    if (!b.strides) {  // C-contiguous
      int64_t s = v.itemsize;
      for (int d = b.ndim - 1; d >= 0; --d) {
        v.strides[d] = s;
        s *= v.shape[d];
      }
    }
    return v;
  }
  // 2. __cuda_array_interface__ (CuPy, Numba, PyTorch CUDA tensors).
  if (PyObject_HasAttrString(o, "__cuda_array_interface__")) {
    py::dict cai = obj.attr("__cuda_array_interface__");
    py::tuple shape = cai["shape"];
    std::string typestr = py::str(cai["typestr"]);
    py::tuple data = cai["data"];
    v.data = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
    v.readonly = data[1].cast<bool>();
    std::snprintf(v.dtype_str, sizeof(v.dtype_str), "typestr '%.40s'", typestr.c_str());
    if (typestr == "<f4") { v.dtype = DType::f32; v.itemsize = 4; v.dtype_ok = true; }
    else if (typestr == "<f8") { v.dtype = DType::f64; v.itemsize = 8; v.dtype_ok = true; }
    else { v.itemsize = 1; }
    if (shape.size() > kMaxDims) value_error(what + ": arrays of more than 16 dimensions are not supported");
    v.ndim = static_cast<int>(shape.size());
    v.numel = 1;
    for (int d = 0; d < v.ndim; ++d) {
      v.shape[d] = shape[d].cast<int64_t>();
      v.numel *= v.shape[d];
    }
    py::object st = cai.contains("strides") ? py::object(cai["strides"]) : py::none();
    if (st.is_none()) {
      int64_t s = v.itemsize;
      for (int d = v.ndim - 1; d >= 0; --d) {
        v.strides[d] = s;
        s *= v.shape[d];
      }
    } else {
      py::tuple t = st;
      for (int d = 0; d < v.ndim; ++d) v.strides[d] = t[d].cast<int64_t>();
    }
    v.device.kind = optkern::DeviceKind::cuda;
    v.device.index = 0;
    if (v.data != nullptr) {
      // The pointer's device (the interface does not carry it).
      py::object dev = py::getattr(obj, "device", py::none());
      py::object id = dev.is_none() ? py::object(py::none()) : py::getattr(dev, "id", py::getattr(dev, "index", py::none()));
      if (!id.is_none()) v.device.index = id.cast<int>();
    }
    v.keepalive_ = py::reinterpret_borrow<py::object>(obj);
    return v;
  }
  // 3. DLPack (PyTorch CPU tensors, JAX, ...).
  if (PyObject_HasAttrString(o, "__dlpack__")) {
    py::object fn = obj.attr("__dlpack__");
    py::object cap;
    py::object dev_type = py::none();
    if (PyObject_HasAttrString(o, "__dlpack_device__")) {
      py::tuple dv = obj.attr("__dlpack_device__")();
      dev_type = dv[0];
    }
    py::dict kw;
    if (!dev_type.is_none() && dev_type.cast<int>() == kDLCUDA) kw["stream"] = py::int_(cuda_stream == 0 ? 1 : cuda_stream);
    try {
      py::dict kw2 = kw;
      kw2["max_version"] = py::make_tuple(1, 0);
      cap = fn(**kw2);
    } catch (py::error_already_set& e) {
      if (!e.matches(PyExc_TypeError)) throw;
      cap = fn(**kw);
    }
    PyObject* c = cap.ptr();
    DLTensor* t = nullptr;
    if (PyCapsule_IsValid(c, kDLPackVersionedName)) {
      auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(c, kDLPackVersionedName));
      if (m->version.major > 1) type_error(what + ": DLPack major version " + std::to_string(m->version.major) + " is not supported");
      PyCapsule_SetName(c, kDLPackVersionedUsed);
      v.capsule_ = c;
      Py_INCREF(c);
      v.versioned_ = true;
      v.readonly = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
      // A copied export would take the in-place update away from the caller: treat it as not writable.
      if (m->flags & DLPACK_FLAG_BITMASK_IS_COPIED) v.readonly = true;
      t = &m->dl_tensor;
    } else if (PyCapsule_IsValid(c, kDLPackName)) {
      auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, kDLPackName));
      PyCapsule_SetName(c, kDLPackUsed);
      v.capsule_ = c;
      Py_INCREF(c);
      t = &m->dl_tensor;
    } else {
      type_error(what + ": __dlpack__ did not return a DLPack capsule");
    }
    v.data = static_cast<char*>(t->data) + t->byte_offset;
    if (t->dtype.code == kDLFloat && t->dtype.lanes == 1 && (t->dtype.bits == 32 || t->dtype.bits == 64)) {
      v.dtype_ok = true;
      v.dtype = t->dtype.bits == 32 ? DType::f32 : DType::f64;
    }
    v.itemsize = t->dtype.bits / 8 > 0 ? t->dtype.bits / 8 : 1;
    std::snprintf(v.dtype_str, sizeof(v.dtype_str), "DLPack dtype (code %d, bits %d)", int(t->dtype.code), int(t->dtype.bits));
    if (t->ndim > kMaxDims) value_error(what + ": arrays of more than 16 dimensions are not supported");
    v.ndim = t->ndim;
    v.numel = 1;
    for (int d = 0; d < t->ndim; ++d) {
      v.shape[d] = t->shape[d];
      v.numel *= t->shape[d];
    }
    if (t->strides) {
      for (int d = 0; d < t->ndim; ++d) v.strides[d] = t->strides[d] * v.itemsize;
    } else {
      int64_t s = v.itemsize;
      for (int d = t->ndim - 1; d >= 0; --d) {
        v.strides[d] = s;
        s *= v.shape[d];
      }
    }
    switch (t->device.device_type) {
      case kDLCPU:
      case kDLCUDAHost:
        v.device.kind = optkern::DeviceKind::cpu;
        break;
      case kDLCUDA:
      case kDLCUDAManaged:
        v.device.kind = optkern::DeviceKind::cuda;
        v.device.index = t->device.device_id;
        break;
      default:
        type_error(what + ": DLPack device type " + std::to_string(t->device.device_type) +
                   " is not supported (expected CPU or CUDA)");
    }
    v.keepalive_ = py::reinterpret_borrow<py::object>(obj);
    return v;
  }
  type_error(what + ": expected an array (NumPy, CuPy, or an object with __dlpack__), got " +
             std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
}

namespace {

py::sequence as_sequence(py::handle h, const char* name) {
  if (!PyList_Check(h.ptr()) && !PyTuple_Check(h.ptr()))
    type_error(std::string(name) + ": expected a list or tuple of arrays");
  return py::reinterpret_borrow<py::sequence>(h);
}

struct Range {
  uintptr_t begin, end;
  bool writable;
  int view;
};

std::string view_name(const std::vector<std::string>& names, size_t nt, size_t view) {
  size_t kind = view / nt, i = view % nt;
  return names[kind] + "[" + std::to_string(i) + "]";
}

}  // namespace

CollectedStep collect_step(py::handle params_h, py::handle grads_h, py::handle states_h, py::handle names_h,
                           int nstates, int64_t cuda_stream) {
  py::sequence params = as_sequence(params_h, "params");
  py::sequence grads = as_sequence(grads_h, "grads");
  py::sequence states = as_sequence(states_h, "states");
  py::sequence names_seq = as_sequence(names_h, "state_names");
  const size_t nt = static_cast<size_t>(py::len(params));
  if (nstates < 0 || nstates > 3) value_error("states: at most 3 state lists are supported, got " + std::to_string(nstates));
  if (static_cast<int>(py::len(states)) != nstates || static_cast<int>(py::len(names_seq)) != nstates)
    value_error("states: expected " + std::to_string(nstates) + " state lists for these hyperparameters, got " +
                std::to_string(py::len(states)));
  std::vector<std::string> names = {"params", "grads"};
  std::vector<py::sequence> lists = {params, grads};
  for (int k = 0; k < nstates; ++k) {
    names.push_back(py::str(names_seq[k]));
    lists.push_back(as_sequence(states[k], names.back().c_str()));
  }
  for (size_t k = 1; k < lists.size(); ++k)
    if (py::len(lists[k]) != nt)
      value_error(names[k] + ": expected " + std::to_string(nt) + " arrays (one per param), got " +
                  std::to_string(py::len(lists[k])));

  CollectedStep out;
  const size_t nkinds = lists.size();
  out.views.reserve(nkinds * nt);
  for (size_t k = 0; k < nkinds; ++k) {
    PyObject* seq = lists[k].ptr();
    const bool is_list = PyList_Check(seq);
    for (size_t i = 0; i < nt; ++i) {
      PyObject* item = is_list ? PyList_GET_ITEM(seq, i) : PyTuple_GET_ITEM(seq, i);
      out.views.push_back(ArrayView::from(item, names[k].c_str(), static_cast<int64_t>(i), cuda_stream));
    }
  }
  // Per-tensor checks: dtype, shape, layout, device, writability, alignment.
  Device device;
  bool have_device = false;
  for (size_t i = 0; i < nt; ++i) {
    const ArrayView& p = out.views[i];
    auto pn_str = [&] { return "params[" + std::to_string(i) + "]"; };
    if (!p.dtype_ok) type_error(pn_str() + ": expected float32 or float64, got " + p.dtype_str);
    if (i > 0 && p.dtype != out.views[0].dtype)
      type_error(pn_str() + ": expected " + optkern::dtype_name(out.views[0].dtype) + " like params[0] (one dtype per call), got " +
                 optkern::dtype_name(p.dtype));
    if (!have_device) {
      device = p.device;
      have_device = true;
    }
    for (size_t k = 0; k < nkinds; ++k) {
      const ArrayView& a = out.views[k * nt + i];
      auto an_str = [&] { return names[k] + "[" + std::to_string(i) + "]"; };
      if (k > 0) {
        if (!a.dtype_ok || a.dtype != p.dtype)
          type_error(an_str() + ": expected " + optkern::dtype_name(p.dtype) + " like " + pn_str() + ", got " +
                     (a.dtype_ok ? std::string(optkern::dtype_name(a.dtype)) : a.dtype_str));
        bool same_shape = a.ndim == p.ndim;
        for (int d = 0; same_shape && d < p.ndim; ++d) same_shape = a.shape[d] == p.shape[d];
        if (!same_shape) value_error(an_str() + ": expected shape " + shape_str(p) + " like " + pn_str() + ", got " + shape_str(a));
      }
      if (!(a.device == device))
        value_error(an_str() + ": expected an array on " + device_str(device) + " like params[0], got " + device_str(a.device));
      if (k != 1 && a.readonly) value_error(an_str() + ": is read-only; it is updated in place and must be writable");
      if (a.numel > 0) {
        if (reinterpret_cast<uintptr_t>(a.data) % static_cast<uintptr_t>(a.itemsize) != 0)
          value_error(an_str() + ": data pointer is not aligned to its itemsize (" + std::to_string(a.itemsize) + " bytes)");
        if (!a.dense())
          value_error(an_str() + ": expected a contiguous (dense) array; got strides that skip or repeat elements");
        if (k > 0)
          for (int d = 0; d < p.ndim; ++d)
            if (p.shape[d] > 1 && a.strides[d] != p.strides[d])
              value_error(an_str() + ": has a different memory layout (strides) from " + pn_str() +
                          "; elementwise steps need the same layout (e.g. both C-contiguous)");
      }
    }
  }
  // No two buffers may overlap if either is written (grads may share memory with each other).
  std::vector<Range> ranges;
  ranges.reserve(out.views.size());
  for (size_t v = 0; v < out.views.size(); ++v) {
    const ArrayView& a = out.views[v];
    if (a.numel == 0) continue;
    uintptr_t b = reinterpret_cast<uintptr_t>(a.data);
    ranges.push_back(Range{b, b + static_cast<uintptr_t>(a.nbytes()), (v / nt) != 1, static_cast<int>(v)});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& x, const Range& y) { return x.begin < y.begin; });
  uintptr_t end_all = 0, end_w = 0;
  int who_all = -1, who_w = -1;
  for (const Range& r : ranges) {
    int other = -1;
    if (r.begin < end_w) other = who_w;
    else if (r.writable && r.begin < end_all) other = who_all;
    if (other >= 0)
      value_error(view_name(names, nt, static_cast<size_t>(r.view)) + ": overlaps " +
                  view_name(names, nt, static_cast<size_t>(other)) +
                  " in memory; a step writes params and states in place, so they must not alias each other or the grads");
    if (r.end > end_all) { end_all = r.end; who_all = r.view; }
    if (r.writable && r.end > end_w) { end_w = r.end; who_w = r.view; }
  }

  optkern::StepBatch& b = out.batch;
  b.dtype = nt ? out.views[0].dtype : DType::f32;
  b.device = device;
  b.stream = reinterpret_cast<void*>(static_cast<uintptr_t>(cuda_stream));
  b.tensors.resize(nt);
  for (size_t i = 0; i < nt; ++i) {
    optkern::TensorSlots& s = b.tensors[i];
    s.numel = out.views[i].numel;
    for (size_t k = 0; k < nkinds; ++k) s.ptr[k] = out.views[k * nt + i].data;
  }
  return out;
}

CollectedStep collect_read(py::handle arrays_h, const char* name, int64_t cuda_stream) {
  py::sequence arrays = as_sequence(arrays_h, name);
  const size_t n = static_cast<size_t>(py::len(arrays));
  CollectedStep out;
  out.views.reserve(n);
  for (size_t i = 0; i < n; ++i)
    out.views.push_back(ArrayView::from(arrays[i], name, static_cast<int64_t>(i), cuda_stream));
  for (size_t i = 0; i < n; ++i) {
    const ArrayView& a = out.views[i];
    auto an_str = [&] { return std::string(name) + "[" + std::to_string(i) + "]"; };
    if (!a.dtype_ok) type_error(an_str() + ": expected float32 or float64, got " + a.dtype_str);
    if (a.dtype != out.views[0].dtype)
      type_error(an_str() + ": expected " + optkern::dtype_name(out.views[0].dtype) + " like " + name + "[0], got " +
                 optkern::dtype_name(a.dtype));
    if (!(a.device == out.views[0].device))
      value_error(an_str() + ": expected an array on " + device_str(out.views[0].device) + " like " + name + "[0]");
    if (a.numel > 0 && !a.dense()) value_error(an_str() + ": expected a contiguous (dense) array");
    if (a.numel > 0 && reinterpret_cast<uintptr_t>(a.data) % static_cast<uintptr_t>(a.itemsize) != 0)
      value_error(an_str() + ": data pointer is not aligned to its itemsize");
  }
  optkern::StepBatch& b = out.batch;
  b.dtype = n ? out.views[0].dtype : DType::f32;
  b.device = n ? out.views[0].device : Device{};
  b.stream = reinterpret_cast<void*>(static_cast<uintptr_t>(cuda_stream));
  b.tensors.resize(n);
  for (size_t i = 0; i < n; ++i) {
    b.tensors[i].numel = out.views[i].numel;
    b.tensors[i].ptr[0] = out.views[i].data;
  }
  return out;
}

}  // namespace optkern_py
