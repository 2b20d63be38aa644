// Zero-copy array views and whole-step validation (see array_view.h).
#include "array_view.h"

#include "../optkern/overlap.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include <pybind11/numpy.h>

#include "../optkern/cuda_streams.h"
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
  if (*f == 'e' && itemsize == 2) { *out = DType::f16; return true; }
  if (*f == 'h' && itemsize == 2) { *out = DType::i16; return true; }
  return false;
}

// A dtype optkern knows: the flags and its name.
void set_dtype(ArrayView& v, DType d) {
  v.dtype = d;
  v.known = true;
  v.dtype_ok = d == DType::f32 || d == DType::f64;
  v.itemsize = optkern::dtype_size(d);
  std::snprintf(v.dtype_str, sizeof(v.dtype_str), "%s", optkern::dtype_name(d));
}

// A DLPack dtype in words, as NumPy and torch name it ("int32", "bfloat16", "complex64", "bool").
void dlpack_dtype_words(int code, int bits, int lanes, char* out, size_t n) {
  const char* kind = code == 0 ? "int" : code == 1 ? "uint" : code == 2 ? "float" : code == 4 ? "bfloat"
                   : code == 5 ? "complex" : code == 6 ? "bool" : nullptr;
  if (kind == nullptr) std::snprintf(out, n, "an unknown DLPack dtype (code %d, %d bits)", code, bits);
  else if (code == 6) std::snprintf(out, n, "bool");
  else std::snprintf(out, n, "%s%d", kind, bits);
  if (lanes != 1) {
    const size_t len = std::strlen(out);
    std::snprintf(out + len, n - len, " x %d lanes", lanes);
  }
}

}  // namespace

namespace {
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
    known = o.known;
    dtype = o.dtype;
    std::memcpy(dtype_str, o.dtype_str, sizeof(dtype_str));
    ndim = o.ndim;
    std::memcpy(shape, o.shape, sizeof(shape));
    std::memcpy(strides, o.strides, sizeof(strides));
    numel = o.numel;
    itemsize = o.itemsize;
    readonly = o.readonly;
    device = o.device;
    producer_stream = o.producer_stream;
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

namespace {

// A Python integer (anything with __index__ except bool) as a 64-bit value.
enum class IntRead { ok, not_int, out_of_range };

IntRead read_int64(PyObject* o, int64_t* out) {
  if (PyBool_Check(o) || !PyIndex_Check(o)) return IntRead::not_int;
  PyObject* i = PyNumber_Index(o);
  if (!i) throw py::error_already_set();
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(i, &overflow);
  Py_DECREF(i);
  if (overflow) return IntRead::out_of_range;
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  *out = x;
  return IntRead::ok;
}

IntRead read_uint64(PyObject* o, uint64_t* out) {  // negative values are out of range
  if (PyBool_Check(o) || !PyIndex_Check(o)) return IntRead::not_int;
  PyObject* i = PyNumber_Index(o);
  if (!i) throw py::error_already_set();
  const unsigned long long x = PyLong_AsUnsignedLongLong(i);
  Py_DECREF(i);
  if (x == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    if (!PyErr_ExceptionMatches(PyExc_OverflowError)) throw py::error_already_set();
    PyErr_Clear();
    return IntRead::out_of_range;
  }
  *out = x;
  return IntRead::ok;
}

// getattr(o, name) read once: a null object when o has no such attribute; any other error propagates.
py::object get_attr(PyObject* o, const char* name) {
  PyObject* r = PyObject_GetAttrString(o, name);
  if (r) return py::reinterpret_steal<py::object>(r);
  if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw py::error_already_set();
  PyErr_Clear();
  return py::object();
}

std::string short_repr(py::handle h) {
  std::string r = py::repr(h);
  return r.size() > 60 ? r.substr(0, 57) + "..." : r;
}

std::string type_name(py::handle h) { return py::str(py::type::handle_of(h).attr("__name__")); }

// The device index the producer object states: CuPy's a.device.id, torch's a.device.index.  false when it
// states none (a zero-size array's device then cannot be known from its pointer).
bool producer_device(py::handle obj, int* out) {
  py::object dev = get_attr(obj.ptr(), "device");
  if (!dev || dev.is_none()) return false;
  for (const char* name : {"id", "index"}) {
    py::object i = get_attr(dev.ptr(), name);
    int64_t x = -1;
    if (i && read_int64(i.ptr(), &x) == IntRead::ok && x >= 0 && x <= INT32_MAX) {
      *out = static_cast<int>(x);
      return true;
    }
  }
  return false;
}

}  // namespace

// The readers of the three array interfaces (friends of ArrayView).  Each fills a view and raises
// TypeError/ValueError naming the argument for an interface it cannot read; none makes a CUDA call before the
// whole interface has been checked.
struct ArrayReader {
  // The argument's name as the caller passed it ("grads[3]"), built only when an error is raised.
  struct Name {
    const char* kind;
    int64_t index;
    std::string str() const { return index < 0 ? std::string(kind) : std::string(kind) + "[" + std::to_string(index) + "]"; }
    std::string operator+(const std::string& s) const { return str() + s; }
    std::string operator+(const char* s) const { return str() + s; }
  };

  static void check_ndim(int64_t ndim, const Name& what) {
    if (ndim < 0) value_error(what + ": a negative number of dimensions (" + std::to_string(ndim) + ")");
    if (ndim > kMaxDims) value_error(what + ": arrays of more than 16 dimensions are not supported");
  }

  // numel from v.shape.  Every extent must be >= 0 and the size in bytes (the product of the non-zero extents
  // times the itemsize, which bounds every stride and extent product computed later) must fit in int64.
  static void set_numel(ArrayView& v, const Name& what) {
    int64_t bytes = v.itemsize, n = 1;
    for (int d = 0; d < v.ndim; ++d) {
      if (v.shape[d] < 0) value_error(what + ": shape " + shape_str(v) + " has a negative extent");
      if (v.shape[d] > 0 && __builtin_mul_overflow(bytes, v.shape[d], &bytes))
        value_error(what + ": shape " + shape_str(v) + " is too large: its size in bytes does not fit in 64 bits");
      n *= v.shape[d];
    }
    v.numel = n;
  }

  static void c_contiguous_strides(ArrayView& v) {  // bounded by set_numel's check
    int64_t s = v.itemsize;
    for (int d = v.ndim - 1; d >= 0; --d) {
      v.strides[d] = s;
      s *= v.shape[d];
    }
  }

  static int& bf16_type_num() {  // ml_dtypes.bfloat16's NumPy type number, once seen (-1 before; GIL held)
    static int num = -1;
    return num;
  }

  // 0. NumPy arrays: the array struct read directly through NumPy's C API (pybind11 loads it at run time).
  static void numpy(ArrayView& v, py::handle obj, const Name& what) {
    const auto* a = py::detail::array_proxy(obj.ptr());
    const auto* d = py::detail::array_descriptor_proxy(a->descr);
    constexpr int kNpyFloat = 11, kNpyDouble = 12;
    constexpr int kWriteable = 0x0400;
    const bool native = d->byteorder != '>';
    constexpr int kNpyShort = 3, kNpyHalf = 23, kNpyUserDef = 256;
    if (d->type_num == kNpyFloat && native) set_dtype(v, DType::f32);
    else if (d->type_num == kNpyDouble && native) set_dtype(v, DType::f64);
    else if (d->type_num == kNpyHalf && native) set_dtype(v, DType::f16);
    else if (d->type_num == kNpyShort && native) set_dtype(v, DType::i16);
    else if (native && d->type_num >= kNpyUserDef && d->type_num == bf16_type_num()) set_dtype(v, DType::bf16);
    else {
      v.itemsize = 1;
      py::object dt = obj.attr("dtype");
      const std::string name = py::str(dt.attr("name"));
      // ml_dtypes.bfloat16 (NumPy's bfloat16: a user-defined dtype of 2 bytes named "bfloat16"); its type number
      // is fixed for the process once registered, so later arrays are recognised by it alone.
      if (d->type_num >= kNpyUserDef && name == "bfloat16" && py::int_(dt.attr("itemsize")).cast<int>() == 2) {
        set_dtype(v, DType::bf16);
        bf16_type_num() = d->type_num;
      } else {
        std::snprintf(v.dtype_str, sizeof(v.dtype_str), "%s", name.c_str());
      }
      if (!native) {
        v.known = v.dtype_ok = false;
        std::snprintf(v.dtype_str, sizeof(v.dtype_str), "%s in a non-native byte order", name.c_str());
      }
    }
    check_ndim(a->nd, what);
    v.data = a->data;
    v.ndim = a->nd;
    for (int k = 0; k < a->nd; ++k) {
      v.shape[k] = a->dimensions[k];
      v.strides[k] = a->strides[k];
    }
    set_numel(v, what);
    v.readonly = (a->flags & kWriteable) == 0;
  }

  // 1. The buffer protocol (anything like NumPy).
  static void buffer(ArrayView& v, py::handle obj, const Name& what) {
    if (PyObject_GetBuffer(obj.ptr(), &v.buffer_, PyBUF_RECORDS_RO) != 0) {
      PyErr_Clear();
      type_error(what + ": its buffer could not be read (expected a strided float32/float64 array)");
    }
    v.has_buffer_ = true;
    const Py_buffer& b = v.buffer_;
    if (b.itemsize < 1 || b.itemsize > 64) value_error(what + ": its buffer has an itemsize of " + std::to_string(b.itemsize));
    v.data = b.buf;
    v.itemsize = static_cast<int>(b.itemsize);
    v.readonly = b.readonly != 0;
    DType bd;
    if (parse_format(b.format, v.itemsize, &bd)) set_dtype(v, bd);
    else std::snprintf(v.dtype_str, sizeof(v.dtype_str), "buffer format '%.40s'", b.format ? b.format : "?");
    check_ndim(b.ndim, what);
    if (b.ndim > 0 && !b.shape) type_error(what + ": its buffer has no shape");
    v.ndim = b.ndim;
    for (int d = 0; d < b.ndim; ++d) v.shape[d] = b.shape[d];
    set_numel(v, what);
    if (b.strides) {
      for (int d = 0; d < b.ndim; ++d) v.strides[d] = b.strides[d];
    } else {
      c_contiguous_strides(v);
    }
  }

  // 2. __cuda_array_interface__ (CuPy, Numba, PyTorch CUDA tensors), versions 0 to 3, read from the dict `cai`.
  static void cuda_array_interface(ArrayView& v, py::handle obj, py::handle cai, const Name& what) {
    const auto prefix = [&] { return what + ": __cuda_array_interface__ "; };
    if (!PyDict_Check(cai.ptr())) type_error(prefix() + "is not a dict (got " + type_name(cai) + ")");
    // Strong references: reading an entry may run Python code (__index__) that changes the dict.
    const auto field = [&](const char* key) {
      return py::reinterpret_borrow<py::object>(PyDict_GetItemString(cai.ptr(), key));
    };
    const auto missing = [&](const char* key) { type_error(prefix() + "has no '" + key + "'"); };
    const auto bad = [&](const char* key, py::handle got, const char* expected) {
      type_error(prefix() + "'" + key + "' must be " + expected + ", got " + short_repr(got));
    };
    // A tuple or list as a tuple (a list is copied so that reading its items cannot resize it).
    const auto as_tuple = [&](py::object o, const char* key, const char* expected) {
      if (PyTuple_Check(o.ptr())) return py::reinterpret_borrow<py::tuple>(o);
      if (!PyList_Check(o.ptr())) bad(key, o, expected);
      PyObject* t = PySequence_Tuple(o.ptr());
      if (!t) throw py::error_already_set();
      return py::reinterpret_steal<py::tuple>(t);
    };
    const auto int64_at = [&](py::handle item, const char* key) {
      int64_t x = 0;
      const IntRead r = read_int64(item.ptr(), &x);
      if (r == IntRead::not_int) type_error(prefix() + "'" + key + "' must hold ints, got " + short_repr(item));
      if (r == IntRead::out_of_range) value_error(prefix() + "'" + key + "' holds " + short_repr(item) + ", which does not fit in 64 bits");
      return x;
    };

    py::object version = field("version");
    if (!version) missing("version");
    int64_t ver = -1;
    const IntRead vr = read_int64(version.ptr(), &ver);
    if (vr == IntRead::not_int) bad("version", version, "an int");
    if (vr == IntRead::out_of_range || ver < 0 || ver > 3)
      value_error(prefix() + "version " + short_repr(version) + " is not supported (versions 0 to 3 are)");

    py::object typestr = field("typestr");
    if (!typestr) missing("typestr");
    if (!PyUnicode_Check(typestr.ptr())) bad("typestr", typestr, "a str");
    const std::string ts = py::str(typestr);
    {  // the typestr in words ("<i4" -> int32), for messages
      const char k = ts.size() >= 3 ? ts[1] : '?';
      const int bytes = ts.size() >= 3 ? std::atoi(ts.c_str() + 2) : 0;
      const char* kind = k == 'i' ? "int" : k == 'u' ? "uint" : k == 'f' ? "float" : k == 'c' ? "complex" : nullptr;
      if (k == 'b') std::snprintf(v.dtype_str, sizeof(v.dtype_str), "bool");
      else if (kind && bytes > 0) std::snprintf(v.dtype_str, sizeof(v.dtype_str), "%s%d", kind, 8 * bytes);
      else std::snprintf(v.dtype_str, sizeof(v.dtype_str), "typestr '%.40s'", ts.c_str());
    }
    if (ts == "<f4") set_dtype(v, DType::f32);
    else if (ts == "<f8") set_dtype(v, DType::f64);
    else if (ts == "<f2") set_dtype(v, DType::f16);
    else if (ts == "<i2") set_dtype(v, DType::i16);
    else { v.itemsize = 1; }

    py::object shape_o = field("shape");
    if (!shape_o) missing("shape");
    py::tuple shape = as_tuple(shape_o, "shape", "a tuple of ints");
    check_ndim(static_cast<int64_t>(shape.size()), what);
    v.ndim = static_cast<int>(shape.size());
    for (int d = 0; d < v.ndim; ++d) v.shape[d] = int64_at(shape[d], "shape");
    set_numel(v, what);

    py::object data_o = field("data");
    if (!data_o) missing("data");
    py::tuple data = as_tuple(data_o, "data", "a (pointer, read-only) pair");
    if (data.size() != 2 || !PyBool_Check(data[1].ptr())) bad("data", data_o, "a (pointer: int, read-only: bool) pair");
    uint64_t ptr = 0;
    const IntRead pr = read_uint64(data[0].ptr(), &ptr);
    if (pr == IntRead::not_int) bad("data", data_o, "a (pointer: int, read-only: bool) pair");
    if (pr == IntRead::out_of_range) value_error(prefix() + "data pointer " + short_repr(data[0]) + " is not an address");
    if (ptr == 0 && v.numel > 0)
      value_error(prefix() + "data pointer is 0 (null) for an array of " + std::to_string(v.numel) + " elements");
    v.data = reinterpret_cast<void*>(static_cast<uintptr_t>(ptr));
    v.readonly = data[1].ptr() == Py_True;

    py::object strides_o = field("strides");
    if (!strides_o || strides_o.is_none()) {
      c_contiguous_strides(v);
    } else {
      py::tuple st = as_tuple(strides_o, "strides", "None or a tuple of ints");
      if (static_cast<int>(st.size()) != v.ndim)
        value_error(prefix() + "'strides' has " + std::to_string(st.size()) + " entries for a " +
                    std::to_string(v.ndim) + "-dimensional shape");
      for (int d = 0; d < v.ndim; ++d) v.strides[d] = int64_at(st[d], "strides");
    }

    py::object mask = field("mask");
    if (mask && !mask.is_none()) value_error(prefix() + "has a 'mask'; masked arrays are not supported");

    // v3: the stream the producer's work on the array is queued on; the step is ordered after it.
    py::object stream = field("stream");
    if (ver >= 3 && stream && !stream.is_none()) {
      uint64_t s = 0;
      const IntRead sr = read_uint64(stream.ptr(), &s);
      if (sr == IntRead::not_int) bad("stream", stream, "None or an int");
      if (sr == IntRead::out_of_range || s == 0)
        value_error(prefix() + "'stream' is " + short_repr(stream) +
                    ", not a stream (the interface disallows 0; 1 is the legacy default stream, 2 the per-thread "
                    "default stream, other values a cudaStream_t)");
      v.producer_stream = static_cast<uintptr_t>(s);
    }

    // The device: as the producer states it (a zero-size array has no pointer to ask), else the pointer's.
    v.device.kind = optkern::DeviceKind::cuda;
    int dev = -1;
    if (producer_device(obj, &dev)) {
      v.device.index = dev;
    } else if (v.data != nullptr) {
      try {
        v.device.index = optkern::cuda_pointer_device(v.data);
      } catch (const std::invalid_argument& e) {
        value_error(what + ": " + e.what());
      }
    } else {
      value_error(what + ": a zero-size CUDA array (data pointer 0) whose device is unknown: the object has no "
                         ".device with an integer id or index, and there is no pointer to ask");
    }
  }

  // 3. DLPack (PyTorch CPU tensors, JAX, ...): fn is obj.__dlpack__.
  static void dlpack(ArrayView& v, py::handle obj, py::object fn, const Name& what, int64_t cuda_stream) {
    py::object cap;
    py::object dev_type = py::none();
    if (py::object dev_fn = get_attr(obj.ptr(), "__dlpack_device__")) {
      py::tuple dv = dev_fn();
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
    v.itemsize = t->dtype.bits / 8 > 0 ? t->dtype.bits / 8 : 1;
    dlpack_dtype_words(int(t->dtype.code), int(t->dtype.bits), int(t->dtype.lanes), v.dtype_str, sizeof(v.dtype_str));
    if (t->dtype.lanes == 1) {
      const int code = t->dtype.code, bits = t->dtype.bits;
      if (code == kDLFloat && bits == 32) set_dtype(v, DType::f32);
      else if (code == kDLFloat && bits == 64) set_dtype(v, DType::f64);
      else if (code == kDLFloat && bits == 16) set_dtype(v, DType::f16);
      else if (code == kDLBfloat && bits == 16) set_dtype(v, DType::bf16);
      else if (code == kDLInt && bits == 16) set_dtype(v, DType::i16);
    }
    check_ndim(t->ndim, what);
    if (t->ndim > 0 && !t->shape) type_error(what + ": its DLPack tensor has no shape");
    v.ndim = t->ndim;
    for (int d = 0; d < t->ndim; ++d) v.shape[d] = t->shape[d];
    set_numel(v, what);
    if (t->strides) {
      for (int d = 0; d < t->ndim; ++d)
        if (__builtin_mul_overflow(t->strides[d], static_cast<int64_t>(v.itemsize), &v.strides[d]))
          value_error(what + ": its DLPack strides do not fit in 64 bits");
    } else {
      c_contiguous_strides(v);
    }
    if (t->data == nullptr && v.numel > 0)
      value_error(what + ": its DLPack data pointer is null for an array of " + std::to_string(v.numel) + " elements");
    v.data = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(t->data) + static_cast<uintptr_t>(t->byte_offset));
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
  }
};

ArrayView ArrayView::parse(py::handle obj, const char* kind, int64_t index, int64_t cuda_stream) {
  ArrayView v;
  const ArrayReader::Name what{kind, index};
  PyObject* o = obj.ptr();
  if (py::detail::npy_api::get().PyArray_Check_(o)) {
    ArrayReader::numpy(v, obj, what);
  } else if (PyObject_CheckBuffer(o)) {
    ArrayReader::buffer(v, obj, what);
  } else if (py::object cai = get_attr(o, "__cuda_array_interface__")) {  // read once: for torch it is Python code
    ArrayReader::cuda_array_interface(v, obj, cai, what);
  } else if (py::object fn = get_attr(o, "__dlpack__")) {
    ArrayReader::dlpack(v, obj, std::move(fn), what, cuda_stream);
  } else {
    type_error(what + ": expected an array (NumPy, CuPy, or an object with __dlpack__), got " + type_name(obj));
  }
  v.keepalive_ = py::reinterpret_borrow<py::object>(obj);
  return v;
}

ArrayView ArrayView::from(py::handle obj, const char* kind, int64_t index, int64_t cuda_stream) {
  ArrayView v = parse(obj, kind, index, cuda_stream);
  if (v.producer_stream != 0 && v.numel > 0) {
    try {
      optkern::order_after_stream(v.device.index, v.producer_stream, static_cast<uintptr_t>(cuda_stream));
    } catch (const std::invalid_argument& e) {  // a build without CUDA
      value_error(ArrayReader::Name{kind, index} + ": " + e.what());
    }
  }
  return v;
}

void order_after_producers(const std::vector<ArrayView>& views, const Device& device, int64_t cuda_stream) {
  if (device.kind != optkern::DeviceKind::cuda) return;
  const uintptr_t step = static_cast<uintptr_t>(cuda_stream);
  std::vector<uintptr_t> done;  // the distinct producer streams ordered after so far
  for (const ArrayView& v : views) {
    const uintptr_t s = v.producer_stream;
    if (s == 0 || v.numel == 0 || optkern::same_stream(s, step)) continue;  // nothing to wait for
    bool seen = false;
    for (uintptr_t d : done) seen = seen || optkern::same_stream(d, s);
    if (seen) continue;
    done.push_back(s);
    optkern::order_after_stream(device.index, s, step);
  }
}

namespace {

py::sequence as_sequence(py::handle h, const char* name) {
  if (!PyList_Check(h.ptr()) && !PyTuple_Check(h.ptr()))
    type_error(std::string(name) + ": expected a list or tuple of arrays");
  return py::reinterpret_borrow<py::sequence>(h);
}

std::string view_name(const std::vector<std::string>& names, size_t nt, size_t view) {
  size_t kind = view / nt, i = view % nt;
  return names[kind] + "[" + std::to_string(i) + "]";
}

}  // namespace

CollectedStep collect_step(py::handle params_h, py::handle grads_h, py::handle states_h, py::handle names_h,
                           int nstates, int64_t cuda_stream, const StepStorage& storage) {
  py::sequence params = as_sequence(params_h, "params");
  py::sequence grads = as_sequence(grads_h, "grads");
  py::sequence states = as_sequence(states_h, "states");
  py::sequence names_seq = as_sequence(names_h, "state_names");
  const size_t nt = static_cast<size_t>(py::len(params));
  if (nstates < 0 || nstates > optkern::kMaxStates)
    value_error("states: at most " + std::to_string(optkern::kMaxStates) + " state lists are supported, got " +
                std::to_string(nstates));
  if (static_cast<int>(py::len(states)) != nstates || static_cast<int>(py::len(names_seq)) != nstates)
    value_error("states: expected " + std::to_string(nstates) + " state lists for these hyperparameters, got " +
                std::to_string(py::len(states)));
  using optkern::MasterMode;
  const bool want_masters = storage.master != MasterMode::none;
  if (want_masters && storage.masters.is_none())
    value_error(std::string("masters: master_weights=\"") + optkern::master_mode_name(storage.master) +
                "\" needs one master array per param");
  if (!want_masters && !storage.masters.is_none())
    value_error("masters: given without master_weights (\"fp32\" or \"split\")");
  std::vector<std::string> names = {"params", "grads"};
  std::vector<py::sequence> lists = {params, grads};
  for (int k = 0; k < nstates; ++k) {
    names.push_back(py::str(names_seq[k]));
    lists.push_back(as_sequence(states[k], names.back().c_str()));
  }
  size_t k_master = 0, k_copy = 0;  // kinds of the extra lists (0: absent)
  if (want_masters) {
    k_master = lists.size();
    names.push_back("masters");
    lists.push_back(as_sequence(storage.masters, "masters"));
  }
  if (!storage.copies.is_none()) {
    k_copy = lists.size();
    names.push_back("param_copies");
    lists.push_back(as_sequence(storage.copies, "param_copies"));
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
      out.views.push_back(ArrayView::parse(item, names[k].c_str(), static_cast<int64_t>(i), cuda_stream));
    }
  }
  // The storage types: params float32/float64/bfloat16/float16, one dtype per call; grads in the params' dtype or,
  // for float32 params, 16-bit (the offload step); states in the params' dtype or, for 16-bit params, float32 or
  // bfloat16, one dtype for every state of the call; masters float32 ("fp32") or int16 ("split"); copies 16-bit.
  const DType pd = nt ? out.views[0].dtype : DType::f32;
  const bool half = nt && optkern::is_half(pd);
  DType gd = pd, sd = pd, cd = DType::bf16;
  auto dtype_words = [](const ArrayView& a) { return std::string(a.dtype_str); };
  for (size_t k = 0; k < nkinds && nt; ++k) {
    for (size_t i = 0; i < nt; ++i) {
      const ArrayView& a = out.views[k * nt + i];
      auto an_str = [&] { return names[k] + "[" + std::to_string(i) + "]"; };
      if (k == 0) {
        if (!a.known || a.dtype == DType::i16)
          type_error(an_str() + ": expected float32, float64, bfloat16 or float16, got " + dtype_words(a));
        if (i > 0 && a.dtype != pd)
          type_error(an_str() + ": expected " + optkern::dtype_name(pd) + " like params[0] (one dtype per call), got " +
                     dtype_words(a));
      } else if (k == 1) {
        if (i == 0) {
          const bool ok = a.known && (a.dtype == pd || (pd == DType::f32 && optkern::is_half(a.dtype)));
          if (!ok)
            type_error(an_str() + ": expected " + optkern::dtype_name(pd) + " like params[0]" +
                       (pd == DType::f32 ? " (or bfloat16/float16 grads for float32 params)" : "") + ", got " +
                       dtype_words(a));
          gd = a.dtype;
        } else if (!a.known || a.dtype != gd) {
          type_error(an_str() + ": expected " + optkern::dtype_name(gd) +
                     (gd == pd ? " like params[" + std::to_string(i) + "]" : std::string(" like grads[0] (one grad dtype per call)")) +
                     ", got " + dtype_words(a));
        }
      } else if (k == k_master && k_master) {
        const DType want = storage.master == MasterMode::split ? DType::i16 : DType::f32;
        if (!a.known || a.dtype != want)
          type_error(an_str() + ": expected " + optkern::dtype_name(want) + " (master_weights=\"" +
                     optkern::master_mode_name(storage.master) + "\" keeps " +
                     (want == DType::i16 ? "the float32 master's low halves" : "a float32 master") + "), got " +
                     dtype_words(a));
      } else if (k == k_copy && k_copy) {
        if (i == 0) {
          if (!a.known || !optkern::is_half(a.dtype))
            type_error(an_str() + ": expected a bfloat16 or float16 array (the 16-bit copy of params[0]), got " +
                       dtype_words(a));
          cd = a.dtype;
        } else if (!a.known || a.dtype != cd) {
          type_error(an_str() + ": expected " + optkern::dtype_name(cd) + " like param_copies[0], got " +
                     dtype_words(a));
        }
      } else {  // a state
        if (k == 2 && i == 0) {
          const bool ok = a.known && (a.dtype == pd || (half && (a.dtype == DType::f32 || a.dtype == DType::bf16)));
          if (!ok)
            type_error(an_str() + ": expected " + optkern::dtype_name(pd) + " like params[0]" +
                       (half ? std::string(" (or float32/bfloat16 state for ") + optkern::dtype_name(pd) + " params)"
                             : std::string()) +
                       ", got " + dtype_words(a));
          sd = a.dtype;
        } else if (!a.known || a.dtype != sd) {
          type_error(an_str() + ": expected " + optkern::dtype_name(sd) +
                     (sd == pd && i > 0 ? " like params[" + std::to_string(i) + "]"
                                        : " like " + names[2] + "[0] (one state dtype per call)") +
                     ", got " + dtype_words(a));
        }
      }
    }
  }
  if (storage.master == MasterMode::split && nt && pd != DType::bf16)
    value_error(std::string("master_weights: \"split\" needs bfloat16 params (the float32 master's high half), got ") +
                optkern::dtype_name(pd) + " params; use \"fp32\"");
  if (want_masters && nt && !half)
    value_error(std::string("master_weights: a master copy is for 16-bit params; ") + optkern::dtype_name(pd) +
                " params are their own master (use None)");
  if (storage.stochastic && nt && !half)
    value_error(std::string("stochastic_rounding: applies to 16-bit params, got ") + optkern::dtype_name(pd));
  if (storage.stochastic && want_masters)
    value_error(std::string("stochastic_rounding: only without a master copy (master_weights=None), got "
                            "master_weights=\"") + optkern::master_mode_name(storage.master) + "\"");
  if (k_copy && nt && pd != DType::f32)
    value_error(std::string("param_copies: only for float32 params (the offload step), got ") +
                optkern::dtype_name(pd) + " params");

  // Per-tensor checks: shape, layout, device, writability, alignment.
  Device device;
  bool have_device = false;
  for (size_t i = 0; i < nt; ++i) {
    const ArrayView& p = out.views[i];
    auto pn_str = [&] { return "params[" + std::to_string(i) + "]"; };
    if (!have_device) {
      device = p.device;
      have_device = true;
    }
    for (size_t k = 0; k < nkinds; ++k) {
      const ArrayView& a = out.views[k * nt + i];
      auto an_str = [&] { return names[k] + "[" + std::to_string(i) + "]"; };
      if (k > 0) {
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
          for (int d = 0; d < p.ndim; ++d)  // compared in elements: the dtypes may differ
            if (p.shape[d] > 1 && a.strides[d] * p.itemsize != p.strides[d] * a.itemsize)
              value_error(an_str() + ": has a different memory layout (strides) from " + pn_str() +
                          "; elementwise steps need the same layout (e.g. both C-contiguous)");
      }
    }
  }
  // No two buffers may overlap if either is written (grads may share memory with each other).
  std::vector<optkern::MemRange> ranges;
  ranges.reserve(out.views.size());
  for (size_t v = 0; v < out.views.size(); ++v) {
    const ArrayView& a = out.views[v];
    if (a.numel == 0) continue;
    uintptr_t b = reinterpret_cast<uintptr_t>(a.data);
    ranges.push_back(optkern::MemRange{b, b + static_cast<uintptr_t>(a.nbytes()), (v / nt) != 1, static_cast<int>(v)});
  }
  int who = -1, other = -1;
  if (optkern::find_write_overlap(ranges, &who, &other))
    value_error(view_name(names, nt, static_cast<size_t>(who)) + ": overlaps " +
                view_name(names, nt, static_cast<size_t>(other)) +
                " in memory; a step writes params and states in place, so they must not alias each other or the grads");

  optkern::StepBatch& b = out.batch;
  b.dtype = nt ? pd : DType::f32;
  b.device = device;
  b.stream = reinterpret_cast<void*>(static_cast<uintptr_t>(cuda_stream));
  b.tensors.resize(nt);
  const size_t nbase = 2 + static_cast<size_t>(nstates);
  for (size_t i = 0; i < nt; ++i) {
    optkern::TensorSlots& s = b.tensors[i];
    s.numel = out.views[i].numel;
    for (size_t k = 0; k < nbase; ++k) s.ptr[k] = out.views[k * nt + i].data;
    if (k_master) s.master = out.views[k_master * nt + i].data;
    if (k_copy) s.copy = out.views[k_copy * nt + i].data;
  }
  optkern::Precision& pr = b.prec;
  pr.mixed = half || gd != pd || k_copy != 0;
  pr.grad = gd;
  pr.state = nstates > 0 ? sd : (half ? DType::f32 : pd);
  pr.master = storage.master;
  pr.copy = k_copy != 0;
  pr.copy_dtype = cd;
  pr.stochastic = storage.stochastic && nt;
  pr.seed = storage.seed;
  if (nt == 0) pr = optkern::Precision{};
  order_after_producers(out.views, device, cuda_stream);  // everything checked: now order the step's stream
  return out;
}

StepStorage parse_storage(py::handle masters, py::handle master_weights, py::handle param_copies,
                          bool stochastic_rounding, uint64_t seed) {
  StepStorage st;
  if (!master_weights.is_none()) {
    const std::string s = PyUnicode_Check(master_weights.ptr()) ? std::string(py::str(master_weights)) : "";
    if (s == "fp32") st.master = optkern::MasterMode::fp32;
    else if (s == "split") st.master = optkern::MasterMode::split;
    else value_error("master_weights: expected None, \"fp32\" or \"split\", got " + std::string(py::repr(master_weights)));
  }
  st.masters = masters;
  st.copies = param_copies;
  st.stochastic = stochastic_rounding;
  st.seed = seed;
  return st;
}

CollectedStep collect_read(py::handle arrays_h, const char* name, int64_t cuda_stream) {
  py::sequence arrays = as_sequence(arrays_h, name);
  const size_t n = static_cast<size_t>(py::len(arrays));
  CollectedStep out;
  out.views.reserve(n);
  for (size_t i = 0; i < n; ++i)
    out.views.push_back(ArrayView::parse(arrays[i], name, static_cast<int64_t>(i), cuda_stream));
  for (size_t i = 0; i < n; ++i) {
    const ArrayView& a = out.views[i];
    auto an_str = [&] { return std::string(name) + "[" + std::to_string(i) + "]"; };
    if (!a.known || a.dtype == DType::i16)
      type_error(an_str() + ": expected float32, float64, bfloat16 or float16, got " + a.dtype_str);
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
  order_after_producers(out.views, b.device, cuda_stream);
  return out;
}

}  // namespace optkern_py
