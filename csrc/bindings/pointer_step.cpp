// A step plan for front ends that keep their arrays between steps (optkern.torch): the params and state buffers
// are validated once, through the same checks as every step (collect_step), and kept as raw pointers; each step
// then only reads the gradients (`p.grad`), checks them against the cached layout and the cached writable
// ranges, and runs the kernel.  Host work per step is a few attribute reads per param, no DLPack export.
//
// The plan holds strong references to every param and state tensor, so the pointers stay valid while it lives.
// A param whose storage moved (`p.data = ...`) is reported, not written: the front end rebuilds its plan.
// 16-bit storage (masters, param copies, stochastic rounding; the grad, state, master and copy dtypes) is validated
// by collect_step like a step's and carried in the plan's StepBatch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../optkern/optim_api.h"
#include "array_view.h"

namespace py = pybind11;
using namespace optkern;

namespace {

struct Interval {
  uintptr_t begin, end;
};

class PointerPlan {
 public:
  // params: tensors (written; their .grad is read each step); arrays: the same memory in a form collect_step
  // reads (torch: p.detach()); grads: their current gradients (read; validated with the rest, then re-read from
  // p.grad every step); states: one list per state kind (written); counters: addresses of host float scalars
  // advanced by 1 after each kernel call (torch's step tensors), float64 when counters_f64; device_counters: they
  // are device addresses instead (torch's capturable / fused step tensors on the params' CUDA device), read and
  // advanced by the kernel (StepInfo::device_counters), never read here.
  // contiguous[i]: params[i] is C-contiguous (its grads are checked with is_contiguous(), else with stride()).
  // state_dicts[i] / watched[i]: params[i]'s state dict and the objects it must still hold under watch_keys
  // (a tensor replaced in the dict makes gather() report a stale plan).
  // 16-bit storage (optim_api.h: Precision), validated by collect_step like a step's and kept in the plan's batch:
  // masters (float32 for master_weights "fp32", int16 residuals for "split"; written), param_copies (16-bit copies
  // of float32 params; written), stochastic rounding and its seed.  The grads' dtype is `dtype` (torch: the
  // param's); the batch's grad, state, master and copy dtypes are what collect_step found.
  PointerPlan(py::list params, py::list arrays, py::list grads, py::list states, py::list state_names, int64_t stream,
              py::list counters, bool counters_f64, py::list contiguous, py::list strides, py::list shapes,
              py::object dtype, py::list state_dicts, py::list watch_keys, py::list watched, bool device_counters,
              py::object masters, py::object master_weights, py::object param_copies, bool stochastic_rounding,
              uint64_t seed)
      : dtype_(std::move(dtype)), counters_f64_(counters_f64), device_counters_(device_counters) {
    const optkern_py::StepStorage storage =
        optkern_py::parse_storage(masters, master_weights, param_copies, stochastic_rounding, seed);
    optkern_py::CollectedStep cs = optkern_py::collect_step(arrays, grads, states, state_names,
                                                            static_cast<int>(py::len(states)), stream, storage);
    check_precision(cs.batch);  // the storage combination, as a step checks it (nothing runs yet)
    batch_ = cs.batch;
    const size_t n = py::len(params);
    for (size_t i = 0; i < n; ++i) {
      params_.push_back(py::reinterpret_borrow<py::object>(params[i]));
      contiguous_.push_back(contiguous[i].cast<bool>());
      strides_.push_back(py::reinterpret_borrow<py::object>(strides[i]));
      shapes_.push_back(py::reinterpret_borrow<py::object>(shapes[i]));
      grad_itemsize_ = cs.views[n + i].itemsize;  // kind 1: the grads
    }
    for (py::handle l : states)
      for (py::handle t : l) keep_.push_back(py::reinterpret_borrow<py::object>(t));
    for (py::handle extra : {masters, param_copies})
      if (!extra.is_none())
        for (py::handle t : extra) keep_.push_back(py::reinterpret_borrow<py::object>(t));
    grads_.resize(n);
    for (py::handle k : watch_keys) watch_keys_.push_back(py::reinterpret_borrow<py::object>(k));
    for (size_t i = 0; i < n; ++i) {
      state_dicts_.push_back(py::reinterpret_borrow<py::object>(state_dicts[i]));
      if (!PyDict_Check(state_dicts_.back().ptr())) throw py::type_error("state_dicts: expected dicts");
      py::list w = watched[i];
      if (py::len(w) != watch_keys_.size()) throw py::value_error("watched: one object per watch key");
      for (py::handle o : w) watched_.push_back(py::reinterpret_borrow<py::object>(o));
    }
    for (py::handle c : counters) counters_.push_back(reinterpret_cast<void*>(c.cast<uintptr_t>()));
    if (device_counters_) {
      if (batch_.device.kind != DeviceKind::cuda) throw py::value_error("device_counters: the params are not on CUDA");
      if (counters_.size() != batch_.tensors.size())
        throw py::value_error("counters: expected one device counter per param");
      for (size_t i = 0; i < counters_.size(); ++i) {
        if (counters_[i] == nullptr) throw py::value_error("counters: a null address");
        batch_.tensors[i].step = counters_[i];
      }
    }
    // The writable ranges (params, states, masters, copies: every kind but the grads, each at its own itemsize),
    // sorted; collect_step has checked that none overlap.
    for (size_t v = 0; v < cs.views.size(); ++v) {
      const optkern_py::ArrayView& a = cs.views[v];
      if (v / n == 1 || a.numel == 0) continue;
      const uintptr_t b = reinterpret_cast<uintptr_t>(a.data);
      writable_.push_back({b, b + static_cast<uintptr_t>(a.nbytes())});
    }
    std::sort(writable_.begin(), writable_.end(), [](const Interval& a, const Interval& b) { return a.begin < b.begin; });
    param_ptrs_.reserve(n);
    for (const auto& t : batch_.tensors) param_ptrs_.push_back(reinterpret_cast<uintptr_t>(t.ptr[0]));
  }

  // Read every param's .grad into the plan.  Returns -1 when every grad is present and valid, i >= 0 when
  // params[i] has no grad (the caller takes its general path), and -2 - i when params[i]'s plan is stale: its
  // storage moved, a watched state entry was replaced, or a step counter does not hold `steps_taken`.
  // Raises TypeError / ValueError naming "grads[i]" for a grad of another dtype, layout, or one that overlaps a
  // param or state buffer.
  int64_t gather(double steps_taken) {
    const size_t nk = watch_keys_.size();
    for (size_t i = 0; i < params_.size(); ++i) {
      for (size_t k = 0; k < nk; ++k) {
        PyObject* v = PyDict_GetItemWithError(state_dicts_[i].ptr(), watch_keys_[k].ptr());
        if (!v && PyErr_Occurred()) throw py::error_already_set();
        if (v != watched_[i * nk + k].ptr()) return -2 - static_cast<int64_t>(i);
      }
    }
    for (size_t i = 0; i < counters_.size() && !device_counters_; ++i) {  // device counts are the kernel's
      const double v = counters_f64_ ? *static_cast<double*>(counters_[i]) : *static_cast<float*>(counters_[i]);
      if (v != steps_taken) return -2 - static_cast<int64_t>(i);
    }
    static PyObject* s_grad = PyUnicode_InternFromString("grad");
    static PyObject* s_data_ptr = PyUnicode_InternFromString("data_ptr");
    static PyObject* s_dtype = PyUnicode_InternFromString("dtype");
    static PyObject* s_is_contiguous = PyUnicode_InternFromString("is_contiguous");
    static PyObject* s_stride = PyUnicode_InternFromString("stride");
    static PyObject* s_shape = PyUnicode_InternFromString("shape");
    const size_t n = params_.size();
    // Every param first: a param whose storage moved has freed its old memory, where a new grad may now live,
    // and the cached writable ranges would then report that grad as overlapping.
    // A param resized in place (p.data = p.data[:k] keeps the address) is stale too.
    for (size_t i = 0; i < n; ++i)
      if (address(params_[i].ptr(), s_data_ptr) != param_ptrs_[i] || !same_shape(params_[i].ptr(), i, s_shape))
        return -2 - static_cast<int64_t>(i);
    for (size_t i = 0; i < n; ++i) {
      PyObject* p = params_[i].ptr();
      py::object g = py::reinterpret_steal<py::object>(PyObject_GetAttr(p, s_grad));
      if (!g) throw py::error_already_set();
      if (g.is_none()) return static_cast<int64_t>(i);
      auto name = [&] { return "grads[" + std::to_string(i) + "]"; };
      py::object dt = py::reinterpret_steal<py::object>(PyObject_GetAttr(g.ptr(), s_dtype));
      if (!dt) throw py::error_already_set();
      if (!dt.is(dtype_)) throw py::type_error(name() + ": expected " + std::string(py::str(dtype_)) +
                                               " like the param, got " + std::string(py::str(dt)));
      // torch checks a grad's size when it is assigned, but p.grad.set_() / resize_() bypass that check
      if (!same_shape(g.ptr(), i, s_shape))
        throw py::value_error(name() + ": has another shape than the param");
      const uintptr_t a = address(g.ptr(), s_data_ptr);  // raises for a sparse grad (no storage)
      bool same_layout;
      if (contiguous_[i]) {
        py::object c = py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(g.ptr(), s_is_contiguous));
        if (!c) throw py::error_already_set();
        same_layout = c.ptr() == Py_True;
      } else {
        py::object st = py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(g.ptr(), s_stride));
        if (!st) throw py::error_already_set();
        same_layout = st.equal(strides_[i]);
      }
      if (!same_layout)
        throw py::value_error(name() + ": has another memory layout (strides) than the param; the fused step needs "
                              "the grad in the param's layout");
      const int64_t numel = batch_.tensors[i].numel;
      if (numel > 0) {
        if (a % static_cast<uintptr_t>(grad_itemsize_) != 0)
          throw py::value_error(name() + ": data pointer is not aligned to its itemsize");
        const uintptr_t end = a + static_cast<uintptr_t>(numel) * static_cast<uintptr_t>(grad_itemsize_);
        auto it = std::upper_bound(writable_.begin(), writable_.end(), a,
                                   [](uintptr_t v, const Interval& r) { return v < r.end; });
        if (it != writable_.end() && it->begin < end)
          throw py::value_error(name() + ": overlaps a param or state buffer in memory; a step writes params and "
                                "states in place, so they must not alias the grads");
      }
      batch_.tensors[i].ptr[1] = reinterpret_cast<void*>(a);
      grads_[i] = std::move(g);
    }
    return -1;
  }

  void release_grads() {
    for (auto& g : grads_) g = py::object();
  }

  template <class Run>
  auto run(Run&& fn, int64_t step, double grad_multiplier, bool maximize, int64_t stream, uintptr_t gs_dev,
           uintptr_t fi_dev) {
    StepInfo info;
    info.step = step;
    info.grad_scale = grad_multiplier;
    info.maximize = maximize;
    info.grad_scale_device = reinterpret_cast<const float*>(gs_dev);
    info.found_inf_device = reinterpret_cast<const float*>(fi_dev);
    info.device_counters = device_counters_;
    info.counter_dtype = counters_f64_ ? DType::f64 : DType::f32;
    info.product_dtype = products_f64_ ? DType::f64 : DType::f32;
    check(info);
    batch_.stream = reinterpret_cast<void*>(static_cast<uintptr_t>(stream));
    decltype(fn(batch_, info)) r;
    struct Release {  // the plan keeps no gradient alive between steps, also when the step throws
      PointerPlan* plan;
      ~Release() { plan->release_grads(); }
    } release{this};
    {
      py::gil_scoped_release nogil;
      r = fn(batch_, info);
      for (void* p : counters_) {  // before the GIL is taken back: the counts advance with the buffers
        if (device_counters_) break;  // advanced on the device by the step
        if (counters_f64_) *static_cast<double*>(p) += 1.0;
        else *static_cast<float*>(p) += 1.0f;
      }
    }
    return r;  // (release: zero_grad(set_to_none) can then free the grads)
  }

  size_t size() const { return params_.size(); }
  bool device_counters() const { return device_counters_; }

  // NAdam with device counters: the params' device products (torch's capturable mu_product), set once.
  void set_device_products(const std::vector<uintptr_t>& products, bool f64) {
    if (!device_counters_ || products.size() != batch_.tensors.size())
      throw py::value_error("mu_products: one device product per param, with device counters");
    for (size_t i = 0; i < products.size(); ++i) {
      if (products[i] == 0) throw py::value_error("mu_products: a null address");
      batch_.tensors[i].mu_product = reinterpret_cast<void*>(products[i]);
    }
    products_f64_ = f64;
  }

 private:
  bool same_shape(PyObject* t, size_t i, PyObject* attr) const {
    py::object sh = py::reinterpret_steal<py::object>(PyObject_GetAttr(t, attr));
    if (!sh) throw py::error_already_set();
    return sh.equal(shapes_[i]);
  }

  static uintptr_t address(PyObject* t, PyObject* method) {
    py::object v = py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(t, method));
    if (!v) throw py::error_already_set();
    return v.cast<uintptr_t>();
  }

  StepBatch batch_;
  py::object dtype_;
  bool counters_f64_;
  bool device_counters_ = false;
  bool products_f64_ = false;
  int grad_itemsize_ = 4;
  std::vector<py::object> params_, strides_, shapes_, keep_, grads_, state_dicts_, watch_keys_, watched_;
  std::vector<char> contiguous_;
  std::vector<uintptr_t> param_ptrs_;
  std::vector<void*> counters_;
  std::vector<Interval> writable_;
};

template <class Hyper, class Fn>
void def_plan_step(py::module_& m, const char* name, Fn fn) {
  m.def(
      name,
      [fn](PointerPlan& plan, const Hyper& h, int64_t step, double grad_multiplier, bool maximize, int64_t stream,
           uintptr_t grad_scale_device, uintptr_t found_inf_device) {
        check(h);
        plan.run([&](const StepBatch& b, const StepInfo& s) { fn(b, h, s); return 0; }, step, grad_multiplier,
                 maximize, stream, grad_scale_device, found_inf_device);
      },
      py::arg("plan"), py::arg("hyper"), py::arg("step"), py::arg("grad_multiplier") = 1.0,
      py::arg("maximize") = false, py::arg("stream") = 0, py::arg("grad_scale_device") = 0,
      py::arg("found_inf_device") = 0);
}

}  // namespace

void register_pointer_step(py::module_& m) {
  py::class_<PointerPlan>(m, "PointerPlan")
      .def(py::init<py::list, py::list, py::list, py::list, py::list, int64_t, py::list, bool, py::list, py::list,
                    py::list, py::object, py::list, py::list, py::list, bool, py::object, py::object, py::object, bool,
                    uint64_t>(),
           py::arg("params"), py::arg("arrays"), py::arg("grads"), py::arg("states"), py::arg("state_names"),
           py::arg("stream"), py::arg("counters"), py::arg("counters_f64"), py::arg("contiguous"), py::arg("strides"),
           py::arg("shapes"), py::arg("dtype"),
           py::arg("state_dicts"), py::arg("watch_keys"), py::arg("watched"), py::arg("device_counters") = false,
           py::kw_only(), py::arg("masters") = py::none(), py::arg("master_weights") = py::none(),
           py::arg("param_copies") = py::none(), py::arg("stochastic_rounding") = false, py::arg("seed") = 0)
      .def("gather", &PointerPlan::gather, py::arg("steps_taken"))
      .def("set_device_products", &PointerPlan::set_device_products, py::arg("products"), py::arg("f64"))
      .def_property_readonly("device_counters", &PointerPlan::device_counters)
      .def("release_grads", &PointerPlan::release_grads)
      .def("__len__", &PointerPlan::size);
  def_plan_step<SgdHyper>(m, "plan_sgd_step", [](auto& b, auto& h, auto& s) { sgd_step(b, h, s); });
  def_plan_step<AdamHyper>(m, "plan_adam_step", [](auto& b, auto& h, auto& s) { adam_step(b, h, s); });
  def_plan_step<AdagradHyper>(m, "plan_adagrad_step", [](auto& b, auto& h, auto& s) { adagrad_step(b, h, s); });
  def_plan_step<RmspropHyper>(m, "plan_rmsprop_step", [](auto& b, auto& h, auto& s) { rmsprop_step(b, h, s); });
  def_plan_step<AdamaxHyper>(m, "plan_adamax_step", [](auto& b, auto& h, auto& s) { adamax_step(b, h, s); });
  def_plan_step<AdadeltaHyper>(m, "plan_adadelta_step", [](auto& b, auto& h, auto& s) { adadelta_step(b, h, s); });
  def_plan_step<RpropHyper>(m, "plan_rprop_step", [](auto& b, auto& h, auto& s) { rprop_step(b, h, s); });
  def_plan_step<OgrHyper>(m, "plan_ogr_step", [](auto& b, auto& h, auto& s) { ogr_step(b, h, s); });
  m.def(
      "plan_nadam_step",
      [](PointerPlan& plan, const NadamHyper& h, int64_t step, double mu_product, bool mu_product_float32,
         std::vector<uintptr_t> mu_products, bool mu_products_f64, double grad_multiplier, bool maximize,
         int64_t stream, uintptr_t grad_scale_device, uintptr_t found_inf_device) {
        check(h);
        return plan.run(
            [&](const StepBatch& b, const StepInfo& s) {
              const double r = nadam_step(b, h, s, mu_product, mu_product_float32);
              if (s.device_counters) return r;  // the products were advanced on the device
              for (uintptr_t a : mu_products) {
                if (mu_products_f64) *reinterpret_cast<double*>(a) = r;
                else *reinterpret_cast<float*>(a) = static_cast<float>(r);
              }
              return r;
            },
            step, grad_multiplier, maximize, stream, grad_scale_device, found_inf_device);
      },
      py::arg("plan"), py::arg("hyper"), py::arg("step"), py::arg("mu_product"), py::arg("mu_product_float32"),
      py::arg("mu_products"), py::arg("mu_products_f64"), py::arg("grad_multiplier") = 1.0,
      py::arg("maximize") = false, py::arg("stream") = 0, py::arg("grad_scale_device") = 0,
      py::arg("found_inf_device") = 0);
}
