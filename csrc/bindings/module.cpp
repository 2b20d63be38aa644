// optkern._C: the only file that sees both Python and the core.  Each step function validates the
// hyperparameters, then every array (array_view.cpp), then releases the GIL and runs the fused kernel.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "../optkern/optim_api.h"
#include "../optkern/work_plan.h"
#include "array_view.h"

namespace py = pybind11;
using namespace optkern;
using optkern_py::ArrayView;
using optkern_py::collect_read;
using optkern_py::collect_step;
using optkern_py::CollectedStep;

void register_batch_norm(py::module_& m);  // batch_norm_bindings.cpp
void register_lbfgs(py::module_& m);       // lbfgs_bindings.cpp
void register_ncg(py::module_& m);         // ncg_bindings.cpp
void register_pointer_step(py::module_& m);  // pointer_step.cpp (cached step plans for optkern.torch)
void register_reductions(py::module_& m);    // reduce_bindings.cpp (global_norm)

namespace {

// Optional device scalar (CUDA float32, one element) for grad_scale / found_inf.
struct DeviceScalarArg {
  ArrayView view;
  const float* ptr = nullptr;
};
void parse_device_scalar(py::handle obj, const char* name, int64_t stream, DeviceScalarArg* out) {
  if (obj.is_none()) return;
  out->view = ArrayView::from(obj, name, -1, stream);
  const ArrayView& v = out->view;
  if (v.device.kind != DeviceKind::cuda || !v.dtype_ok || v.dtype != DType::f32 || v.numel != 1)
    throw py::value_error(std::string(name) + ": expected a one-element float32 CUDA array");
  out->ptr = static_cast<const float*>(v.data);
}

// Host counters a front end advances in the same call as the kernel (torch's per-param `step` tensors; NAdam's
// `mu_product`, see nadam_step below): addresses of float32/float64 host scalars, written right after the kernel
// returns, before the GIL is taken back, so no Python code (a KeyboardInterrupt, another thread) sees the buffers
// and the counts disagree.  The caller owns the memory and keeps it alive for the call.
struct HostCounters {
  std::vector<void*> steps;  // each += 1
  bool steps_f64 = false;
};
std::vector<void*> parse_addresses(py::handle seq, const char* name) {
  std::vector<void*> out;
  if (seq.is_none()) return out;
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr()))
    throw py::type_error(std::string(name) + ": expected a list of addresses (ints)");
  for (py::handle a : seq) {
    if (!PyLong_Check(a.ptr())) throw py::type_error(std::string(name) + ": expected a list of addresses (ints)");
    const uintptr_t v = a.cast<uintptr_t>();
    if (v == 0) throw py::value_error(std::string(name) + ": a null address");
    out.push_back(reinterpret_cast<void*>(v));
  }
  return out;
}
void bump(const HostCounters& c) {
  for (void* p : c.steps) {
    if (c.steps_f64) *static_cast<double*>(p) += 1.0;
    else *static_cast<float*>(p) += 1.0f;
  }
}

// Step counters kept in memory (StepInfo::device_counters): one-element float32/float64 arrays on the params'
// device (CUDA, or host memory for CPU params), one per param or one shared by all, written by the step (the
// steps taken, advanced by one unless found_inf skips the step).  Held as views for the call.
struct DeviceCounters {
  std::vector<ArrayView> views;
  DType dtype = DType::f32;
};
void parse_device_counters(py::handle seq, const char* name, size_t nparams, const Device& device, int64_t stream,
                           DeviceCounters* out) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr()))
    throw py::type_error(std::string(name) + ": expected a list of one-element CUDA arrays");
  const size_t n = py::len(seq);
  if (n != 1 && n != nparams)
    throw py::value_error(std::string(name) + ": expected one counter per param (" + std::to_string(nparams) +
                          ") or one for all, got " + std::to_string(n));
  size_t i = 0;
  for (py::handle c : seq) {
    ArrayView v = ArrayView::from(c, name, static_cast<int64_t>(i), stream);
    const std::string who = std::string(name) + "[" + std::to_string(i) + "]";
    if (!(v.device == device))
      throw py::value_error(who + ": a step counter must be on the params' device (" +
                            optkern_py::device_str(device) + "), got " + optkern_py::device_str(v.device));
    if (!v.dtype_ok || v.numel != 1)
      throw py::type_error(who + ": expected a one-element float32 or float64 array");
    if (v.readonly) throw py::value_error(who + ": is read-only (the step advances it)");
    if (i == 0) out->dtype = v.dtype;
    else if (v.dtype != out->dtype) throw py::type_error(who + ": every counter of a call needs the same dtype");
    out->views.push_back(std::move(v));
    ++i;
  }
}

template <class Hyper, class NumStates, class Step>
auto bind_step(NumStates num_states, Step step_fn) {
  return [num_states, step_fn](py::handle params, py::handle grads, py::handle states, py::handle state_names,
                               const Hyper& h, int64_t step, double grad_scale, bool maximize, int64_t stream,
                               py::handle grad_scale_device, py::handle found_inf_device, py::handle counters,
                               bool counters_f64, py::handle step_counters, py::handle mu_product_counters,
                               py::handle masters, py::handle master_weights, py::handle param_copies,
                               bool stochastic_rounding, uint64_t seed) {
    check(h);  // hyperparameters first: they decide how many state lists are expected
    StepInfo info;
    info.step = step;
    info.grad_scale = grad_scale;
    info.maximize = maximize;
    check(info);
    CollectedStep cs = collect_step(params, grads, states, state_names, num_states(h), stream,
                                    optkern_py::parse_storage(masters, master_weights, param_copies,
                                                              stochastic_rounding, seed));
    DeviceScalarArg gs, fi;
    parse_device_scalar(grad_scale_device, "grad_scale", stream, &gs);
    parse_device_scalar(found_inf_device, "found_inf", stream, &fi);
    for (const DeviceScalarArg* d : {&gs, &fi})
      if (d->ptr && !(d->view.device == cs.batch.device))
        throw py::value_error(std::string(d == &gs ? "grad_scale" : "found_inf") +
                              ": must be on the same CUDA device as the params");
    info.grad_scale_device = gs.ptr;
    info.found_inf_device = fi.ptr;
    DeviceCounters dc, dp;
    if (!step_counters.is_none()) {
      if (!counters.is_none()) throw py::value_error("counters: host counters and step_counters exclude each other");
      const size_t n = cs.batch.tensors.size();
      parse_device_counters(step_counters, "step", n, cs.batch.device, stream, &dc);
      info.device_counters = true;
      info.counter_dtype = dc.dtype;
      for (size_t i = 0; i < n; ++i) cs.batch.tensors[i].step = dc.views[dc.views.size() == 1 ? 0 : i].data;
      if (!mu_product_counters.is_none()) {
        parse_device_counters(mu_product_counters, "mu_product", n, cs.batch.device, stream, &dp);
        if (dp.views.size() != dc.views.size())
          throw py::value_error("mu_product_counters: expected one product per step counter");
        info.product_dtype = dp.dtype;
        for (size_t i = 0; i < n; ++i) cs.batch.tensors[i].mu_product = dp.views[dp.views.size() == 1 ? 0 : i].data;
        // The kernel advances each distinct counter once, with its product: the pairing must be one to one.
        std::unordered_map<const void*, const void*> product_of, step_of;
        for (size_t i = 0; i < n; ++i) {
          const TensorSlots& t = cs.batch.tensors[i];
          auto a = product_of.emplace(t.step, t.mu_product);
          auto b = step_of.emplace(t.mu_product, t.step);
          if (a.first->second != t.mu_product || b.first->second != t.step)
            throw py::value_error("mu_product[" + std::to_string(i) + "]: each step counter needs its own product "
                                  "(a counter shared by several params shares one product, and only then)");
        }
      }
    } else if (!mu_product_counters.is_none()) {
      throw py::value_error("mu_product_counters: device products go with step_counters");
    }
    HostCounters hc;
    hc.steps = parse_addresses(counters, "counters");
    hc.steps_f64 = counters_f64;
    py::gil_scoped_release nogil;
    if constexpr (std::is_void_v<decltype(step_fn(cs.batch, h, info))>) {
      step_fn(cs.batch, h, info);
      bump(hc);
    } else {
      auto r = step_fn(cs.batch, h, info);
      bump(hc);
      return r;
    }
  };
}

#define STORAGE_ARGS                                                                                 \
  py::arg("masters") = py::none(), py::arg("master_weights") = py::none(), py::arg("param_copies") = py::none(), \
      py::arg("stochastic_rounding") = false, py::arg("seed") = 0

#define STEP_ARGS                                                                                       \
  py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("state_names"), py::arg("hyper"),     \
      py::arg("step"), py::arg("grad_scale") = 1.0, py::arg("maximize") = false, py::arg("stream") = 0, \
      py::arg("grad_scale_device") = py::none(), py::arg("found_inf_device") = py::none(),             \
      py::arg("counters") = py::none(), py::arg("counters_f64") = false, py::arg("step_counters") = py::none(), \
      py::arg("mu_product_counters") = py::none(), STORAGE_ARGS

CpuIsa isa_from_name(const std::string& s) {
  if (s == "avx512") return CpuIsa::avx512;
  if (s == "avx2") return CpuIsa::avx2;
  if (s == "scalar") return CpuIsa::scalar;
  throw std::invalid_argument("isa: expected 'avx512', 'avx2' or 'scalar', got '" + s + "'");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "optkern compiled core: fused optimizer steps and batch norm on CPU (AVX-512/AVX2/scalar) and CUDA";
  register_batch_norm(m);
  register_lbfgs(m);
  register_ncg(m);
  register_pointer_step(m);
  register_reductions(m);

  // ---- hyperparameter structs (validated by the core before any memory is touched) ----
  py::class_<SgdHyper>(m, "SgdHyper")
      .def(py::init<>())
      .def_readwrite("lr", &SgdHyper::lr).def_readwrite("momentum", &SgdHyper::momentum)
      .def_readwrite("dampening", &SgdHyper::dampening).def_readwrite("weight_decay", &SgdHyper::weight_decay)
      .def_readwrite("nesterov", &SgdHyper::nesterov).def_readwrite("velocity", &SgdHyper::velocity);
  py::class_<AdamHyper>(m, "AdamHyper")
      .def(py::init<>())
      .def_readwrite("lr", &AdamHyper::lr).def_readwrite("beta1", &AdamHyper::beta1)
      .def_readwrite("beta2", &AdamHyper::beta2).def_readwrite("eps", &AdamHyper::eps)
      .def_readwrite("weight_decay", &AdamHyper::weight_decay).def_readwrite("amsgrad", &AdamHyper::amsgrad)
      .def_readwrite("decoupled_weight_decay", &AdamHyper::decoupled_weight_decay)
      .def_readwrite("eps_inside_sqrt", &AdamHyper::eps_inside_sqrt)
      .def_readwrite("bias_correction", &AdamHyper::bias_correction);
  py::class_<AdagradHyper>(m, "AdagradHyper")
      .def(py::init<>())
      .def_readwrite("lr", &AdagradHyper::lr).def_readwrite("lr_decay", &AdagradHyper::lr_decay)
      .def_readwrite("weight_decay", &AdagradHyper::weight_decay).def_readwrite("eps", &AdagradHyper::eps);
  py::class_<RmspropHyper>(m, "RmspropHyper")
      .def(py::init<>())
      .def_readwrite("lr", &RmspropHyper::lr).def_readwrite("alpha", &RmspropHyper::alpha)
      .def_readwrite("eps", &RmspropHyper::eps).def_readwrite("weight_decay", &RmspropHyper::weight_decay)
      .def_readwrite("momentum", &RmspropHyper::momentum).def_readwrite("centered", &RmspropHyper::centered)
      .def_readwrite("eps_inside_sqrt", &RmspropHyper::eps_inside_sqrt)
      .def_readwrite("nesterov", &RmspropHyper::nesterov);
  py::class_<AdamaxHyper>(m, "AdamaxHyper")
      .def(py::init<>())
      .def_readwrite("lr", &AdamaxHyper::lr).def_readwrite("beta1", &AdamaxHyper::beta1)
      .def_readwrite("beta2", &AdamaxHyper::beta2).def_readwrite("eps", &AdamaxHyper::eps)
      .def_readwrite("weight_decay", &AdamaxHyper::weight_decay);
  py::class_<NadamHyper>(m, "NadamHyper")
      .def(py::init<>())
      .def_readwrite("lr", &NadamHyper::lr).def_readwrite("beta1", &NadamHyper::beta1)
      .def_readwrite("beta2", &NadamHyper::beta2).def_readwrite("eps", &NadamHyper::eps)
      .def_readwrite("weight_decay", &NadamHyper::weight_decay)
      .def_readwrite("momentum_decay", &NadamHyper::momentum_decay)
      .def_readwrite("decoupled_weight_decay", &NadamHyper::decoupled_weight_decay)
      .def_readwrite("momentum_schedule", &NadamHyper::momentum_schedule);
  py::class_<AdadeltaHyper>(m, "AdadeltaHyper")
      .def(py::init<>())
      .def_readwrite("lr", &AdadeltaHyper::lr).def_readwrite("rho", &AdadeltaHyper::rho)
      .def_readwrite("eps", &AdadeltaHyper::eps).def_readwrite("weight_decay", &AdadeltaHyper::weight_decay);
  py::class_<RpropHyper>(m, "RpropHyper")
      .def(py::init<>())
      .def_readwrite("lr", &RpropHyper::lr).def_readwrite("etaminus", &RpropHyper::etaminus)
      .def_readwrite("etaplus", &RpropHyper::etaplus).def_readwrite("step_size_min", &RpropHyper::step_size_min)
      .def_readwrite("step_size_max", &RpropHyper::step_size_max);
  py::class_<OgrHyper>(m, "OgrHyper")
      .def(py::init<>())
      .def_readwrite("lr", &OgrHyper::lr).def_readwrite("sgd_lr", &OgrHyper::sgd_lr)
      .def_readwrite("beta", &OgrHyper::beta).def_readwrite("trust", &OgrHyper::trust)
      .def_readwrite("eps", &OgrHyper::eps).def_readwrite("weight_decay", &OgrHyper::weight_decay)
      .def_readwrite("warmup", &OgrHyper::warmup);

  m.def("check_hyper", [](const SgdHyper& h) { check(h); });
  m.def("check_hyper", [](const AdamHyper& h) { check(h); });
  m.def("check_hyper", [](const AdagradHyper& h) { check(h); });
  m.def("check_hyper", [](const RmspropHyper& h) { check(h); });
  m.def("check_hyper", [](const AdamaxHyper& h) { check(h); });
  m.def("check_hyper", [](const NadamHyper& h) { check(h); });
  m.def("check_hyper", [](const AdadeltaHyper& h) { check(h); });
  m.def("check_hyper", [](const RpropHyper& h) { check(h); });
  m.def("check_hyper", [](const OgrHyper& h) { check(h); });

  m.def("sgd_num_states", [](const SgdHyper& h) { return sgd_num_states(h); });
  m.def("adam_num_states", [](const AdamHyper& h) { return adam_num_states(h); });
  m.def("rmsprop_num_states", [](const RmspropHyper& h) { return rmsprop_num_states(h); });

  // ---- steps ----
  m.def("sgd_step", bind_step<SgdHyper>(sgd_num_states, [](const StepBatch& b, const SgdHyper& h, const StepInfo& s) {
          sgd_step(b, h, s);
        }), STEP_ARGS);
  m.def("adam_step", bind_step<AdamHyper>(adam_num_states, [](const StepBatch& b, const AdamHyper& h, const StepInfo& s) {
          adam_step(b, h, s);
        }), STEP_ARGS);
  m.def("adagrad_step", bind_step<AdagradHyper>([](const AdagradHyper&) { return adagrad_num_states(); },
                                               [](const StepBatch& b, const AdagradHyper& h, const StepInfo& s) {
                                                 adagrad_step(b, h, s);
                                               }), STEP_ARGS);
  m.def("rmsprop_step", bind_step<RmspropHyper>(rmsprop_num_states,
                                               [](const StepBatch& b, const RmspropHyper& h, const StepInfo& s) {
                                                 rmsprop_step(b, h, s);
                                               }), STEP_ARGS);
  m.def("adamax_step", bind_step<AdamaxHyper>([](const AdamaxHyper&) { return adamax_num_states(); },
                                             [](const StepBatch& b, const AdamaxHyper& h, const StepInfo& s) {
                                               adamax_step(b, h, s);
                                             }), STEP_ARGS);
  m.def("adadelta_step", bind_step<AdadeltaHyper>([](const AdadeltaHyper&) { return adadelta_num_states(); },
                                                 [](const StepBatch& b, const AdadeltaHyper& h, const StepInfo& s) {
                                                   adadelta_step(b, h, s);
                                                 }), STEP_ARGS);
  m.def("rprop_step", bind_step<RpropHyper>([](const RpropHyper&) { return rprop_num_states(); },
                                           [](const StepBatch& b, const RpropHyper& h, const StepInfo& s) {
                                             rprop_step(b, h, s);
                                           }), STEP_ARGS);
  m.def("ogr_step", bind_step<OgrHyper>([](const OgrHyper&) { return ogr_num_states(); },
                                       [](const StepBatch& b, const OgrHyper& h, const StepInfo& s) {
                                         ogr_step(b, h, s);
                                       }), STEP_ARGS);
  m.def(
      "nadam_step",
      [](py::handle params, py::handle grads, py::handle states, py::handle state_names, const NadamHyper& h,
         int64_t step, double mu_product, double grad_scale, bool maximize, int64_t stream, py::handle grad_scale_device,
         py::handle found_inf_device, py::handle counters, bool counters_f64, bool mu_product_float32,
         py::handle mu_products, bool mu_products_f64, py::handle step_counters, py::handle mu_product_counters,
         py::handle masters, py::handle master_weights, py::handle param_copies, bool stochastic_rounding,
         uint64_t seed) {
        if (!step_counters.is_none() && mu_product_counters.is_none())
          throw py::value_error("mu_product_counters: NAdam with step_counters needs its products on the device too");
        std::vector<void*> products = parse_addresses(mu_products, "mu_products");
        return bind_step<NadamHyper>(
            [](const NadamHyper&) { return nadam_num_states(); },
            [mu_product, mu_product_float32, products, mu_products_f64](const StepBatch& b, const NadamHyper& hh,
                                                                        const StepInfo& s) {
              const double r = nadam_step(b, hh, s, mu_product, mu_product_float32);
              for (void* p : products) {  // written before the GIL is taken back, as the step counters are
                if (mu_products_f64) *static_cast<double*>(p) = r;
                else *static_cast<float*>(p) = static_cast<float>(r);
              }
              return r;
            })(params, grads, states, state_names, h, step, grad_scale, maximize, stream, grad_scale_device,
               found_inf_device, counters, counters_f64, step_counters, mu_product_counters, masters,
               master_weights, param_copies, stochastic_rounding, seed);
      },
      py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("state_names"), py::arg("hyper"),
      py::arg("step"), py::arg("mu_product"), py::arg("grad_scale") = 1.0, py::arg("maximize") = false,
      py::arg("stream") = 0, py::arg("grad_scale_device") = py::none(), py::arg("found_inf_device") = py::none(),
      py::arg("counters") = py::none(), py::arg("counters_f64") = false, py::arg("mu_product_float32") = false,
      py::arg("mu_products") = py::none(), py::arg("mu_products_f64") = false,
      py::arg("step_counters") = py::none(), py::arg("mu_product_counters") = py::none(), STORAGE_ARGS,
      "Returns the updated product of NAdam's momentum coefficients.  counters: addresses of host float scalars "
      "incremented after the kernel; mu_products: addresses the new product is written to (float32 unless "
      "mu_products_f64); mu_product_float32: keep the product in float32 as torch's state tensor does.");

  m.def(
      "check_arrays",
      [](py::handle params, py::handle grads, py::handle states, py::handle names, int nstates, int64_t stream,
         py::handle masters, py::handle master_weights, py::handle param_copies, bool stochastic_rounding,
         uint64_t seed) {
        CollectedStep cs = collect_step(params, grads, states, names, nstates, stream,
                                        optkern_py::parse_storage(masters, master_weights, param_copies,
                                                                  stochastic_rounding, seed));
        check_precision(cs.batch);
      },
      py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("names"), py::arg("nstates"),
      py::arg("stream") = 0, STORAGE_ARGS, "Validate a step's arrays without running it (raises like a step would).");

  // ---- CPU control ----
  m.def("cpu_isa", [] { return std::string(cpu_isa_name(cpu_isa())); });
  m.def("cpu_best_isa", [] { return std::string(cpu_isa_name(cpu_best_isa())); });
  m.def("set_cpu_isa", [](const std::string& s) { set_cpu_isa(isa_from_name(s)); }, py::arg("isa"));
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("get_num_threads", &get_num_threads);
  m.def("cuda_built", &cuda_built);
  m.def("cuda_available", &cuda_available);

  // ---- 16-bit conversions (precision.h, run by the CPU path in use; exposed for tests) ----
  m.def(
      "_convert_half",
      [](py::array src, py::array dst, const std::string& dtype, int op, uint64_t seed, uint32_t step,
         uint32_t tensor, uint64_t index0) {
        const DType d = dtype == "bfloat16" ? DType::bf16 : dtype == "float16" ? DType::f16 : DType::f32;
        if (d == DType::f32) throw py::value_error("dtype: expected 'bfloat16' or 'float16'");
        const size_t in_size = op == 0 ? 2 : 4, out_size = op == 0 ? 4 : 2;
        if (!(src.flags() & py::array::c_style) || !(dst.flags() & py::array::c_style) || !dst.writeable() ||
            src.itemsize() != static_cast<py::ssize_t>(in_size) || dst.itemsize() != static_cast<py::ssize_t>(out_size) ||
            src.size() != dst.size())
          throw py::value_error("src/dst: C-contiguous arrays of equal size, 2- and 4-byte items as op needs");
        cpu_convert_half(op, d, src.data(), dst.mutable_data(), static_cast<int64_t>(src.size()), seed, step, tensor,
                         index0);
      },
      py::arg("src"), py::arg("dst"), py::arg("dtype"), py::arg("op"), py::arg("seed") = 0, py::arg("step") = 0,
      py::arg("tensor") = 0, py::arg("index0") = 0);

  // ---- work plans (host code shared with the executors; exposed for tests) ----
  m.def("_cpu_plan", [](const std::vector<int64_t>& numels, int nparts, int64_t align) {
    py::list out;
    for (const auto& part : cpu_plan(numels, nparts, align)) {
      py::list l;
      for (const auto& r : part) l.append(py::make_tuple(r.tensor, r.begin, r.end));
      out.append(l);
    }
    return out;
  });
  m.def("_cuda_chunk_lookup", [](const std::vector<int64_t>& numels, int64_t chunk) {
    // The CUDA executor's O(tensors) table walked as its kernel walks it: chunk ci -> (tensor, begin, len).
    int64_t total = 0;
    const std::vector<int64_t> starts = chunk_starts(numels, chunk, &total);
    py::list out;
    const int64_t n = static_cast<int64_t>(numels.size());
    for (int64_t ci = 0; ci < total; ++ci) {
      const int64_t t = chunk_tensor(starts.data(), n, ci);
      int64_t begin, len;
      chunk_range(starts.data(), t, numels[t], chunk, ci, &begin, &len);
      out.append(py::make_tuple(t, begin, len));
    }
    return py::make_tuple(py::cast(starts), total, out);
  });
  m.def("_cuda_chunk_plan", [](const std::vector<int64_t>& numels, int64_t chunk) {
    py::list out;
    for (const auto& c : cuda_chunk_plan(numels, chunk)) out.append(py::make_tuple(c.tensor, c.begin, c.len));
    return out;
  });
}
